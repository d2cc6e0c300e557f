"""Dense transfer: `droppos segment` (linear head frozen or fine-tuned, dense kNN), its data
layouts and its scores."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from droppos import create_model
from droppos.cli.main import main
from droppos.data.segmentation import (
    IGNORE,
    SCENE_SIZE,
    VOC_CLASSES,
    SegmentationView,
    segmentation_source,
)
from droppos.engine.logging import read_metrics
from droppos.evaluation.dense_heads import PatchFeatures, upsampled
from droppos.evaluation.dense_knn import (
    DenseKnnSection,
    MemoryBank,
    knn_segment,
    patch_label_distributions,
    sample_patches,
)
from droppos.evaluation.metrics import confusion_matrix, segmentation_scores
from droppos.interop.backbone import build_vit, load_backbone
from droppos.interop.schema import TrainingCheckpoint, load_object

TINY = [
    "--model.checkpoint", "random", "--model.encoder.img_size", "28",
    "--model.encoder.patch_size", "7", "--model.encoder.embed_dim", "32",
    "--model.encoder.depth", "2", "--model.encoder.num_heads", "2",
]  # fmt: skip
SMALL = ["--data.train_images", "48", "--data.val_from_train", "16", "--data.batch_size", "16"]
QUIET = ["--data.num_workers", "0", "--run.progress", "false", "--run.precision", "fp32"]


pytestmark = pytest.mark.usefixtures("one_thread")


def results(folder):
    return json.loads((folder / "results.json").read_text())


def write_pair(image_path, mask_path, labels, mode="L"):
    """An RGB image whose pixels show their label, and the label PNG."""
    labels = np.asarray(labels, dtype=np.uint8)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.stack([labels.astype(np.int64) * 40 % 256] * 3, axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(image_path)
    if mode == "P":
        mask = Image.fromarray(labels, "P")
        mask.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    else:
        mask = Image.fromarray(labels, mode)
    mask.save(mask_path)


def blocks(size=28, patch=7, classes=3, seed=0):
    """A label map of `patch`-sized squares of random classes."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, classes, size=(size // patch, size // patch))
    return np.kron(cells, np.ones((patch, patch), dtype=np.int64))


def make_layout(root, layout, count=6, classes=3, reduce=False):
    """A tiny dataset in `layout` (ade20k, voc or pairs), made here."""
    for split in ("train", "val"):
        names = [f"{split}_{i}" for i in range(count)]
        for i, name in enumerate(names):
            labels = blocks(classes=classes, seed=i + (split == "val") * 100) + reduce
            if layout == "ade20k":
                folder = {"train": "training", "val": "validation"}[split]
                write_pair(root / "images" / folder / f"{name}.jpg",
                           root / "annotations" / folder / f"{name}.png", labels)  # fmt: skip
            elif layout == "voc":
                labels[0, 0] = IGNORE  # a border pixel
                write_pair(root / "JPEGImages" / f"{name}.jpg",
                           root / "SegmentationClass" / f"{name}.png", labels, "P")  # fmt: skip
            else:
                write_pair(root / split / "images" / f"{name}.png",
                           root / split / "masks" / f"{name}.png", labels)  # fmt: skip
        if layout == "voc":
            listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
            listing.parent.mkdir(parents=True, exist_ok=True)
            listing.write_text("\n".join(names) + "\n")
    return root


# -- data layouts ---------------------------------------------------------------------------------


def test_the_ade20k_layout_ignores_label_zero_and_shifts_the_rest(tmp_path):
    root = make_layout(tmp_path / "ade", "ade20k", reduce=True)  # stored labels 1..3
    (root / "images" / "training" / "train_0.jpg").rename(root / "x.jpg")  # fewer, still paired
    (root / "annotations" / "training" / "train_0.png").unlink()
    train = segmentation_source(str(root), "train")
    assert len(train) == 5 and train.classes == ["class_0", "class_1", "class_2"]
    sample = train.sample(0)
    stored = np.asarray(Image.open(train.pairs[0][1]))
    assert np.array_equal(np.asarray(sample.mask), stored - 1)
    assert sample.image.size == sample.mask.size == (28, 28)
    kept = segmentation_source(str(root), "val", reduce=False)
    assert kept.num_classes == 4  # label 0 is then a class like the others


def test_the_voc_layout_reads_palette_indices_and_names_its_21_classes(tmp_path):
    root = make_layout(tmp_path / "voc", "voc", classes=21)
    val = segmentation_source(str(root), "val")
    assert val.classes == list(VOC_CLASSES) and len(val) == 6
    mask = np.asarray(val.sample(2).mask)
    assert mask[0, 0] == IGNORE and mask[mask != IGNORE].max() < 21


def test_the_pair_layout_takes_its_class_names_from_classes_txt(tmp_path):
    root = make_layout(tmp_path / "pairs", "pairs")
    (root / "classes.txt").write_text("sky\nroad\ncar\n")
    train = segmentation_source(str(root), "train")
    assert train.classes == ["sky", "road", "car"]
    image, mask = SegmentationView(14, 3, None, None)(train.sample(1))
    assert image.shape == (3, 14, 14) and mask.shape == (14, 14) and mask.dtype == torch.int64


def test_the_built_in_scenes_are_deterministic_and_labelled_by_item(tmp_path):
    first = segmentation_source("demo-scenes", "train").sample(7)
    again = segmentation_source("demo-scenes", "train").sample(7)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert first.image.size == (SCENE_SIZE, SCENE_SIZE)
    image, mask = np.asarray(first.image), np.asarray(first.mask)
    assert set(np.unique(mask)) - {0} and mask.max() <= 10  # background and 1-10
    assert (image[mask > 0] > 24).all() and (image[mask == 0] == 0).all()
    val = segmentation_source("demo-scenes", "val").sample(7)
    assert not np.array_equal(np.asarray(val.image), image)  # other items: the test images


@pytest.mark.parametrize(
    "damage, said",
    [
        ("resize", "the mask is 14 x 14, its image"),
        ("label", "label 9 is outside the 3 classes"),
        ("missing", "has no mask: expected"),
        ("rgb", "a RGB mask; a mask holds one class index per pixel"),
    ],
)
def test_bad_segmentation_data_is_one_line_naming_the_file(tmp_path, capsys, damage, said):
    root = make_layout(tmp_path / "pairs", "pairs")
    (root / "classes.txt").write_text("a\nb\nc\n")
    mask = root / "train" / "masks" / "train_2.png"
    if damage == "resize":
        Image.open(mask).resize((14, 14)).save(mask)
    elif damage == "label":
        Image.fromarray(np.full((28, 28), 9, np.uint8)).save(mask)
    elif damage == "missing":
        mask.unlink()
    else:
        Image.open(mask).convert("RGB").save(mask)
    code = main(["segment", *TINY, "--data.source", str(root), "--run.output_dir",
                 str(tmp_path / "out"), *QUIET])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and said in err and "train_2" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_folder_in_no_layout_is_one_line(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    code = main(["segment", *TINY, "--data.source", str(tmp_path / "data"), *QUIET,
                 "--run.output_dir", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "no segmentation layout" in err and len(err.splitlines()) == 1


# -- scores ---------------------------------------------------------------------------------------


def test_miou_of_a_hand_made_case():
    truth = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, 1]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 3]])
    confusion = confusion_matrix(predicted, truth, 4)
    assert confusion.sum() == 7  # the ignored pixel is not counted
    scores = segmentation_scores(confusion, ["a", "b", "c", "d"])
    # a: 1 hit, 1 missed, 1 wrongly claimed -> 1/3; b: 2 of (3 true + 1 claimed) -> 2/4;
    # c: 1 of 2 -> 1/2; d: never true, claimed once -> 0 (present through the prediction)
    assert scores["class_iou"] == {"a": 33.333, "b": 50.0, "c": 50.0, "d": 0.0}
    assert scores["miou"] == pytest.approx((100 / 3 + 50 + 50 + 0) / 4, abs=1e-3)
    assert scores["pixel_accuracy"] == pytest.approx(400 / 7, abs=1e-3)
    absent = segmentation_scores(confusion_matrix(predicted, truth, 5))
    assert absent["class_iou"]["4"] is None and absent["miou"] == scores["miou"]


def test_upsampling_is_bilinear_interpolation():
    logits = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    expected = torch.nn.functional.interpolate(
        logits, size=(28, 28), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(upsampled(logits, 28), expected)


def test_the_frozen_features_are_the_backbones_patch_tokens(tmp_path):
    encoder = create_model(
        "droppos_vit_tiny_patch16", img_size=28, patch_size=7, in_chans=1, depth=3
    ).eval()
    torch.save({"model": encoder.state_dict()}, tmp_path / "model.pth")
    backbone = load_backbone(tmp_path / "model.pth")
    extractor = PatchFeatures(build_vit(backbone, dynamic_img_size=True), 1).eval()
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ours = extractor(images)
        tokens = encoder.forward_features(images)[:, 1:]  # final norm, every position
    assert ours.shape == (2, 192, 4, 4)
    torch.testing.assert_close(ours.flatten(2).transpose(1, 2), tokens, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a larger image: the positional embedding follows its grid
        assert extractor(torch.randn(1, 1, 56, 56)).shape == (1, 192, 8, 8)
    two = PatchFeatures(build_vit(backbone, dynamic_img_size=True), 2).eval()
    with torch.no_grad():
        assert two(images).shape == (2, 384, 4, 4)
        torch.testing.assert_close(two(images)[:, 192:], ours)


# -- dense kNN --------------------------------------------------------------------------------


def test_dense_knn_labels_patches_that_carry_their_label():
    """Patch features that encode their class (one-hot plus noise): every val patch's nearest
    bank patches share its class, so retrieval labels every patch right."""
    classes, patch, generator = 4, 7, torch.Generator().manual_seed(0)

    def scene(seed):
        labels = torch.from_numpy(blocks(28, patch, classes, seed))
        cells = labels[::patch, ::patch]
        features = torch.nn.functional.one_hot(cells, classes).permute(2, 0, 1).float()
        return features + 0.05 * torch.randn(features.shape, generator=generator), labels

    train = [scene(s) for s in range(8)]
    features = torch.stack([f for f, _ in train])
    masks = torch.stack([m for _, m in train])
    picked, share, kept = sample_patches(
        features, masks, torch.arange(8), classes, per_image=16, seed=0
    )
    assert kept.all() and torch.allclose(share.sum(-1), torch.ones(8, 16))
    bank = MemoryBank(picked.flatten(0, 1), share.flatten(0, 1))
    val = [scene(s) for s in range(100, 104)]
    val_features, val_masks = torch.stack([f for f, _ in val]), torch.stack([m for _, m in val])
    section = DenseKnnSection(k=5, query_batch=7)
    per_patch = knn_segment(val_features, bank, 4, section)  # the 4 x 4 grid itself
    assert torch.equal(per_patch, val_masks[:, ::patch, ::patch])
    per_pixel = knn_segment(val_features, bank, 28, section)  # bilinear between patches
    assert (per_pixel == val_masks).float().mean() > 0.9


def test_patch_label_distributions_leave_out_ignored_pixels():
    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    mask[0, :2, :2] = torch.tensor([[1, 1], [2, IGNORE]])
    mask[0, 2:, 2:] = IGNORE
    share, labelled = patch_label_distributions(mask, 3, 2)
    torch.testing.assert_close(share[0, 0, 0], torch.tensor([0.0, 2 / 3, 1 / 3]))
    assert labelled.tolist() == [[[True, True], [True, False]]]


# -- the command ------------------------------------------------------------------------------


def test_segment_with_a_linear_probe_and_dense_knn_on_the_demo_scenes(tmp_path):
    out = tmp_path / "linear"
    assert main(["segment", *TINY, *SMALL, "--probe.epochs", "2", "--run.output_dir",
                 str(out), *QUIET]) == 0  # fmt: skip
    found = results(out)
    assert found["head"] == "linear" and found["frozen"] and found["num_classes"] == 11
    assert found["train_size"] == 48 and found["val_size"] == 16 and found["img_size"] == 56
    assert len(found["sweep"]) == 3 and found["best_lr"] in (1e-2, 3e-2, 1e-1)
    assert 0 < found["miou"] <= 100 and found["class_iou"]["background"] > 50
    assert (out / "predictions.png").is_file() and (out / "config.yaml").is_file()
    assert read_metrics(out / "metrics.jsonl", "probe_epoch")
    picture = Image.open(out / "predictions.png")
    assert picture.width == 3 * 168 + 32

    out = tmp_path / "knn"
    assert main(["segment", "--head.name", "knn", *TINY, *SMALL, "--knn.bank_patches", "500",
                 "--run.output_dir", str(out), *QUIET]) == 0  # fmt: skip
    found = results(out)
    assert found["head"] == "knn" and found["bank_patches"] == 500
    assert found["class_iou"]["background"] > 50


def test_segment_reads_a_hugging_face_folder_and_an_original_mae_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=28, patch_size=7, num_channels=1,
    )  # fmt: skip
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "hf")
    mae = create_model("mae_vit_tiny_patch16", img_size=28, patch_size=7, in_chans=1, depth=2)
    torch.save({"model": mae.state_dict()}, tmp_path / "mae_pretrain_vit.pth")
    for name in ("hf", "mae_pretrain_vit.pth"):
        out = tmp_path / f"out-{name}"
        code = main(["segment", "--model.checkpoint", str(tmp_path / name), *SMALL,
                     "--probe.epochs", "1", "--run.output_dir", str(out), *QUIET])  # fmt: skip
        assert code == 0, name
        assert results(out)["checkpoint_kind"] in (
            "Hugging Face ViTModel",
            "original DropPos/MAE checkpoint",
        )


def fine_tune_args(out, *extra):
    return ["segment", *TINY, *SMALL, "--model.freeze", "false", "--optim.epochs", "2",
            "--optim.batch_size", "8", "--run.output_dir", str(out),
            "--run.tensorboard", "false", "--run.pictures", "2", *QUIET, *extra]  # fmt: skip


def test_an_interrupted_fine_tuned_segmentation_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from droppos.engine.loop import TrainLoop

    extra = ("--run.save_every_steps", "4")
    assert main(fine_tune_args(tmp_path / "straight", *extra)) == 0
    original, saves = TrainLoop.save, []

    def save_then_crash(loop, *args, **kwargs):
        original(loop, *args, **kwargs)
        saves.append(loop.progress.step)
        if len(saves) == 1:  # 6 steps per epoch: the first save is mid-epoch, at step 4
            raise KeyboardInterrupt

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(TrainLoop, "save", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            main(fine_tune_args(interrupted, *extra))
    stopped = TrainingCheckpoint.read(interrupted / "last.pth").progress
    assert (stopped.epoch, stopped.batch) == (0, 4)
    assert main(fine_tune_args(interrupted, *extra)) == 0
    straight = load_object(tmp_path / "straight" / "last.pth")["model"]
    resumed = load_object(interrupted / "last.pth")["model"]
    assert set(straight) == set(resumed) and any(k.startswith("head.") for k in straight)
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    assert results(interrupted)["miou"] == results(tmp_path / "straight")["miou"]
    assert (interrupted / "best.pth").is_file() and (interrupted / "predictions.png").is_file()
    assert load_backbone(interrupted / "last.pth").encoder.embed_dim == 32  # its encoder


@pytest.mark.parametrize(
    "extra, said",
    [
        (("--head.name", "knn", "--model.freeze", "false"), "frozen backbone"),
        (("--data.img_size", "30"), "not a multiple of the backbone's patch size 7"),
        (("--probe.lrs", "[0]"), "--probe.lrs needs positive"),
        (("--head.name", "mlp"), "--head.name"),
        (("--data.val_from_train", "5000"), "leaves no training image"),
    ],
)
def test_segment_mistakes_are_one_line(tmp_path, capsys, extra, said):
    code = main(["segment", *TINY, *extra, "--run.output_dir", str(tmp_path / "o"), *QUIET])
    err = capsys.readouterr().err.strip()
    assert code == 2 and said in err and len(err.splitlines()) == 1, err


@pytest.mark.slow  # four torchrun launches: a minute on an idle 2-core machine
def test_torchrun_two_processes_give_the_single_process_scores(tmp_path):
    """Each rank extracts its share and the shares are gathered back in order (the frozen
    head, the kNN bank); the confusion matrices are summed over ranks."""
    import subprocess
    import sys

    def launch(args, processes):
        runner = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node", str(processes), "-m", "droppos.cli.main"]  # fmt: skip
        done = subprocess.run([*runner, *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]

    for head in ("linear", "knn"):
        for processes in (1, 2):
            out = tmp_path / f"{head}-{processes}"
            launch(["segment", "--head.name", head, *TINY, *SMALL, "--probe.epochs", "1",
                    "--knn.bank_patches", "400", "--run.pictures", "0",
                    "--run.output_dir", str(out), *QUIET], processes)  # fmt: skip
        one, two = results(tmp_path / f"{head}-1"), results(tmp_path / f"{head}-2")
        assert one["class_iou"] == two["class_iou"] and one["miou"] == two["miou"], head


def test_the_ade20k_preset_is_dinov2s_linear_evaluation_at_512():
    from droppos.cli.main import parser_for, resolve_presets, to_config

    argv = resolve_presets(["segment", "--config", "segment_ade20k"])
    parser = parser_for(argv)
    config = to_config(parser, parser.parse_args(argv), "segment")
    assert config.data.img_size == 512 and config.data.reduce_zero_label is True
    assert config.head.name == "linear" and config.model.freeze
    assert main(["knn", "--config", "segment_ade20k"]) == 2  # a preset of another command

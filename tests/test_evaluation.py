"""Evaluation: pre-train -> fine-tune -> linear probe -> kNN through the CLI, and their parts."""

import argparse
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from droppos import create_model
from droppos.cli.main import main, parser_for, resolve_presets, to_config
from droppos.engine.checkpointing import LAST
from droppos.engine.logging import read_metrics
from droppos.engine.optim import build_adamw
from droppos.evaluation.knn import knn_accuracy, knn_scores
from droppos.evaluation.metrics import topk_correct
from droppos.interop.backbone import build_vit, load_backbone
from droppos.interop.schema import load_object
from tests.helpers import progress_of, tiny_droppos

TINY_ENCODER = [
    "--model.encoder.img_size", "28",
    "--model.encoder.patch_size", "7",
    "--model.encoder.embed_dim", "32",
    "--model.encoder.depth", "2",
    "--model.encoder.num_heads", "2",
]  # fmt: skip
QUIET = ["--data.num_workers", "0", "--run.progress", "false"]


def results(folder):
    return json.loads((folder / "results.json").read_text())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """One epoch of DropPos on the embedded demo set with a 2-block, 32-wide ViT."""
    out = tmp_path_factory.mktemp("pretrain")
    args = [
        "pretrain", *TINY_ENCODER, "--model.decoder_embed_dim", "32",
        "--model.decoder_num_heads", "2", "--optim.epochs", "1", "--optim.batch_size", "256",
        "--run.output_dir", str(out), "--run.tensorboard", "false", "--run.precision", "fp32",
        *QUIET,
    ]  # fmt: skip
    assert main(args) == 0
    return out / "last.pth"


@pytest.mark.slow  # the whole demo walkthrough; each command has its own tests in the default run
def test_pretrain_then_finetune_linprobe_knn_on_the_demo_set(tmp_path, demo_checkpoint):
    finetune = tmp_path / "finetune"
    args = [
        "finetune", "--model.checkpoint", str(demo_checkpoint), "--optim.epochs", "1",
        "--optim.warmup_epochs", "0", "--optim.batch_size", "250", "--model.ema", "true",
        "--run.output_dir", str(finetune), "--run.tensorboard", "false",
        "--run.precision", "fp32", *QUIET,
    ]  # fmt: skip
    assert main(args) == 0
    tuned = results(finetune)
    assert tuned["command"] == "finetune" and tuned["num_classes"] == 10
    assert tuned["top1"] > 15 and tuned["top5"] > tuned["top1"]  # chance: 10% and 50%
    assert "ema_top1" in tuned
    assert (tuned["train_size"], tuned["val_size"]) == (4000, 1000)
    for name in ("best.pth", "last.pth", "config.yaml", "metrics.jsonl"):
        assert (finetune / name).exists(), name
    epoch = read_metrics(finetune / "metrics.jsonl", "epoch")[0]
    assert {"loss", "top1", "top5", "ema_top1"} <= set(epoch)

    probe = tmp_path / "linprobe"
    args = [
        "linprobe", "--model.checkpoint", str(demo_checkpoint), "--probe.epochs", "3",
        "--probe.warmup_epochs", "1", "--probe.base_lrs", "[1, 10]",
        "--run.output_dir", str(probe), *QUIET,
    ]  # fmt: skip
    assert main(args) == 0
    probed = results(probe)
    assert [p["base_lr"] for p in probed["probes"]] == [1, 10]
    assert probed["top1"] == max(p["top1"] for p in probed["probes"])
    assert probed["top1"] > 20  # chance is 10%

    knn = tmp_path / "knn"
    args = ["knn", "--model.checkpoint", str(demo_checkpoint), "--run.output_dir", str(knn)]
    assert main([*args, *QUIET]) == 0
    voted = results(knn)
    assert voted["k"] == 20 and voted["temperature"] == 0.07
    assert voted["top1"] > 20  # chance is 10%: even one epoch of tiny pre-training beats it

    # The fine-tuned checkpoint is itself a checkpoint every evaluation accepts.
    again = tmp_path / "knn-finetuned"
    args = ["knn", "--model.checkpoint", str(finetune / "best.pth"), "--model.feature", "avg"]
    assert main([*args, "--run.output_dir", str(again), *QUIET]) == 0
    assert results(again)["checkpoint_kind"] == "droppos fine-tuned classifier"


def test_a_random_encoder_is_the_baseline_of_every_evaluation(tmp_path, demo_checkpoint):
    shaped = tmp_path / "shaped-like-the-checkpoint"
    args = ["knn", "--model.checkpoint", str(demo_checkpoint), "--model.random_init", "true"]
    assert main([*args, "--run.output_dir", str(shaped), *QUIET]) == 0
    assert results(shaped)["checkpoint"].startswith("random init shaped like")

    named = tmp_path / "named-shape"
    args = ["knn", "--model.checkpoint", "random", *TINY_ENCODER, "--run.output_dir", str(named)]
    assert main([*args, *QUIET]) == 0
    assert results(named)["checkpoint_kind"] == "random init"
    assert results(named)["feature_dim"] == 32
    # Same shape, same seed: the same fresh weights, whichever way the shape was given.
    assert results(named)["top1"] == results(shaped)["top1"]


def test_knn_on_features_that_separate_the_classes_scores_100_percent():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 64, generator=generator) * 10

    def sample(per_class):
        labels = torch.arange(10).repeat_interleave(per_class)
        return centres[labels] + torch.randn(len(labels), 64, generator=generator), labels

    train, train_labels = sample(30)
    query, query_labels = sample(5)
    accuracy = knn_accuracy(train, train_labels, query, query_labels, 10, query_batch=7)
    assert accuracy == {"top1": 100.0, "top5": 100.0}


def test_knn_votes_are_similarity_weighted():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    scores = knn_scores(train, labels, torch.tensor([[1.0, 0.1]]), 2, k=3, temperature=0.07)
    assert scores.argmax().item() == 0  # one close neighbour outweighs two farther ones
    assert knn_scores(train, labels, torch.tensor([[1.0, 0.1]]), 2, k=1)[0, 1] == 0


def test_topk_caps_k_at_the_number_of_classes():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    assert topk_correct(scores, torch.tensor([2, 1])).tolist() == [0, 2]


def test_layer_decay_gives_the_patch_embedding_the_smallest_and_the_head_the_largest_scale():
    encoder = create_model("vit_tiny_patch16", img_size=32, patch_size=8, depth=3)
    backbone = load_backbone_from_state(encoder.state_dict())
    model = build_vit(backbone, num_classes=10, global_pool="avg", fc_norm=True)
    optimizer = build_adamw(model, lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scale_of = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            scale_of[param] = group["lr_scale"]
    named = dict(model.named_parameters())
    scales = {name: scale_of[p] for name, p in named.items()}
    assert scales["patch_embed.proj.weight"] == min(scales.values()) == pytest.approx(0.75**4)
    assert scales["head.weight"] == max(scales.values()) == 1.0
    assert scales["blocks.0.attn.qkv.weight"] < scales["blocks.2.attn.qkv.weight"]
    no_decay = {n for n, p in named.items() for g in optimizer.param_groups
                if any(p is q for q in g["params"]) and g["weight_decay"] == 0}  # fmt: skip
    assert {"cls_token", "pos_embed", "head.bias", "fc_norm.weight"} <= no_decay
    assert "head.weight" not in no_decay


def test_build_vit_initialises_a_new_head_and_keeps_a_loaded_one():
    """The head is decided once, where the weights are loaded: `init_new_head` runs on a head
    the file could not give, never on one it did."""
    encoder = create_model("vit_tiny_patch16", img_size=32, patch_size=8, depth=1)
    initialised = []
    new = build_vit(load_backbone_from_state(encoder.state_dict()), num_classes=3,
                    init_new_head=initialised.append)  # fmt: skip
    assert initialised == [new.head]
    trained = dict(new.state_dict())
    trained["head.weight"] = torch.ones_like(trained["head.weight"])
    again = build_vit(
        load_backbone_from_state(trained), num_classes=3, init_new_head=initialised.append
    )
    assert initialised == [new.head] and torch.equal(again.head.weight, trained["head.weight"])
    build_vit(load_backbone_from_state(trained), num_classes=5, init_new_head=initialised.append)
    assert len(initialised) == 2  # another class count: a new head


def load_backbone_from_state(state, tmp_path=None, **extra):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "encoder.pth"
    torch.save({"model": state, **extra}, path)
    return load_backbone(path)


def test_original_droppos_and_mae_checkpoints_are_accepted(tmp_path):
    source = create_model(
        "droppos_vit_tiny_patch16", img_size=32, patch_size=4, depth=2, decoder_depth=8
    )
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "DropPos_pretrain_vit_tiny.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-3), "epoch": 199}, path)
    backbone = load_backbone(path)  # width 192 -> 3 heads, by the standard table
    assert (backbone.encoder.depth, backbone.encoder.num_heads) == (2, 3)
    images = torch.randn(2, 3, 32, 32)
    model = build_vit(backbone).eval()
    torch.testing.assert_close(model.forward_features(images), source.forward_features(images))

    mae = create_model("mae_vit_tiny_patch16", img_size=32, patch_size=4, depth=2)
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"state_dict": mae.state_dict()}, path)
    assert load_backbone(path).encoder.embed_dim == 192


def test_foreign_or_unreadable_checkpoints_fail_with_one_line(tmp_path, capsys):
    odd_width = tmp_path / "odd.pth"
    torch.save({"model": tiny_droppos().state_dict()}, odd_width)  # 64 wide: heads unknown
    not_a_vit = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(8, 3, 7, 7)}}, not_a_vit)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello, these are notes\n")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(odd_width.read_bytes()[:1000])
    payload = tmp_path / "payload.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "hook": argparse.ArgumentParser}, payload)
    cases = [
        (odd_width, "--model.num_heads"),
        (not_a_vit, "holds no ViT encoder"),
        (tmp_path / "missing.pth", "no checkpoint at"),
        (notes, "not a PyTorch or safetensors file"),
        (empty, "is empty"),
        (truncated, "truncated"),
        (payload, "asks to run code while loading (argparse.ArgumentParser)"),
    ]
    for path, message in cases:
        args = ["knn", "--model.checkpoint", str(path), "--run.output_dir", str(tmp_path / "x")]
        assert main([*args, *QUIET]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    args = ["knn", "--model.checkpoint", str(odd_width), "--model.num_heads", "4"]
    args += ["--run.output_dir", str(tmp_path / "ok"), "--data.source", "/no/such/data"]
    assert main(args) == 2
    assert "data source" in capsys.readouterr().err


@pytest.fixture(scope="module")
def shaded_folder(tmp_path_factory):
    """train/ and val/ with two classes of 8x8-pixel RGB squares (bright vs dark)."""
    root = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 16), ("val", 8)):
        for i in range(count):
            label = i % 2
            folder = root / split / ("bright" if label else "dark")
            folder.mkdir(parents=True, exist_ok=True)
            base = 170 if label else 40
            pixels = base + torch.randint(0, 60, (16, 16, 3), generator=generator)
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{i}.png")
    return root


def finetune_args(output_dir, source, *extra):
    return [
        "finetune", "--model.checkpoint", "random", "--model.encoder.img_size", "16",
        "--model.encoder.patch_size", "4", "--model.encoder.in_chans", "3",
        "--model.encoder.embed_dim", "32", "--model.encoder.depth", "1",
        "--model.encoder.num_heads", "2", "--data.source", str(source),
        "--optim.batch_size", "4", "--optim.epochs", "2", "--optim.warmup_epochs", "1",
        "--run.output_dir", str(output_dir), "--run.log_every", "1",
        "--run.tensorboard", "false", "--run.precision", "fp32", *QUIET, *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("crash_at", [1, 2], ids=["mid-epoch-1", "after-epoch-1"])
def test_an_interrupted_finetuning_resumes_to_the_same_weights(
    tmp_path, shaded_folder, monkeypatch, crash_at
):
    from droppos.engine.loop import TrainLoop

    extra = ("--run.save_every_steps", "3", "--model.ema", "true")
    assert main(finetune_args(tmp_path / "straight", shaded_folder, *extra)) == 0

    original, saves = TrainLoop.save, []

    def save_then_crash(loop, *args, **kwargs):
        original(loop, *args, **kwargs)
        saves.append(loop.progress.step)
        if len(saves) == crash_at:  # 4 steps per epoch: saves at steps 3, 4, 6, 8
            raise KeyboardInterrupt

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(TrainLoop, "save", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            main(finetune_args(interrupted, shaded_folder, *extra))
    stopped = progress_of(interrupted / "last.pth")
    assert (stopped.epoch, stopped.batch) == ((0, 3) if crash_at == 1 else (1, 0))
    assert main(finetune_args(interrupted, shaded_folder, *extra)) == 0

    straight = load_object(tmp_path / "straight" / "last.pth")
    resumed = load_object(interrupted / "last.pth")
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    ema = straight["method_state"]["model_ema"]
    for name, value in ema.items():
        assert torch.equal(value, resumed["method_state"]["model_ema"][name]), name
    assert results(interrupted)["top1"] == results(tmp_path / "straight")["top1"]
    epochs = [r["epoch"] for r in read_metrics(interrupted / "metrics.jsonl", "epoch")]
    assert epochs == [1, 2]


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--optim.batch_size", "3", "--augment.mixup", "0.8"), "even --optim.batch_size"),
        (("--optim.layer_decay", "0"), "--optim.layer_decay"),
        (("--augment.auto_augment", "v0"), "RandAugment"),
        (("--model.encoder.patch_size", "5"), "not a multiple of patch_size"),
    ],
)
def test_finetune_user_mistakes_exit_2_with_one_line(
    tmp_path, shaded_folder, capsys, extra, message
):
    assert main(finetune_args(tmp_path, shaded_folder, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def parse(command, *argv):
    args = resolve_presets([command, *argv])
    parser = parser_for(args)
    config = to_config(parser, parser.parse_args(args), command)
    config.validate()
    return config


@pytest.mark.parametrize("preset", ["finetune_vit_base_in1k", "finetune_vit_large_in1k"])
def test_finetune_presets_are_the_recipe_of_the_spec(preset):
    config = parse("finetune", "--config", preset)
    o, a, m = config.optim, config.augment, config.model
    assert o.batch_size * o.accum_steps * 8 == 1024 and o.base_lr == 1e-3
    assert (o.layer_decay, o.warmup_epochs, o.weight_decay) == (0.75, 5, 0.05)
    assert o.epochs == (100 if "base" in preset else 50)
    assert (a.mixup, a.cutmix, a.label_smoothing, a.reprob) == (0.8, 1.0, 0.1, 0.25)
    assert a.auto_augment == "rand-m9-mstd0.5-inc1"
    assert (m.drop_path_rate, m.global_pool, config.data.crop_pct) == (0.1, "avg", 0.875)
    shape = m.encoder
    assert (shape.img_size, shape.patch_size, shape.in_chans) == (224, 16, 3)
    assert shape.embed_dim == (768 if "base" in preset else 1024)


def test_probe_presets_follow_mae():
    probe = parse("linprobe", "--config", "linprobe_vit_base_in1k").probe
    assert (probe.optimizer, probe.batch_size, probe.epochs, probe.warmup_epochs) == (
        "lars",
        16384,
        90,
        10,
    )
    assert 0.1 in probe.base_lrs and probe.weight_decay == 0
    knn = parse("knn", "--config", "knn_vit_base_in1k").knn
    assert (knn.k, knn.temperature) == (20, 0.07)


@pytest.mark.parametrize("command", ["finetune", "linprobe", "knn", "export", "visualize"])
def test_defaults_evaluate_the_default_pretraining_output(command):
    checkpoint = parse(command).model.checkpoint
    pretrain = parse("pretrain")  # the file `droppos pretrain` with no options writes
    assert Path(checkpoint) == Path(pretrain.run.output_dir) / LAST


@pytest.mark.slow
def test_torchrun_two_processes_give_the_single_process_results(tmp_path, shaded_folder):
    """Features are sharded over ranks and gathered back in order; evaluation counts add up."""
    import subprocess
    import sys

    def launch(command_args, processes):
        runner = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        runner += ["--nproc_per_node", str(processes), "-m", "droppos.cli.main"]
        done = subprocess.run([*runner, *command_args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]

    shape = finetune_args(tmp_path, shaded_folder)[1:17]  # the random encoder and the data
    for processes in (1, 2):
        out = tmp_path / f"knn-{processes}"
        launch(["knn", *shape, "--knn.k", "10", "--run.output_dir", str(out), *QUIET], processes)
    one, two = results(tmp_path / "knn-1"), results(tmp_path / "knn-2")
    assert (one["top1"], one["top5"]) == (two["top1"], two["top5"])

    out = tmp_path / "finetune-2"
    launch(finetune_args(out, shaded_folder, "--optim.epochs", "1"), 2)
    assert results(out)["val_size"] == 8 and progress_of(out / "last.pth").step == 2


def test_the_linear_probe_matches_a_logistic_regression_on_separable_features():
    """On Gaussian classes a linear model separates well but not perfectly, the probe (BatchNorm,
    LARS, cosine, the sweep) lands where scikit-learn's logistic regression does, and mostly on
    the same predictions: a probe that trained on shuffled labels, read the wrong split or
    mis-scored would be far off."""
    from sklearn.linear_model import LogisticRegression

    from droppos.evaluation.features import FrozenFeatures
    from droppos.evaluation.linprobe import LinearProbe, ProbeSection, train_probes

    generator = torch.Generator().manual_seed(0)
    classes, dim = 5, 16
    centres = 0.5 * torch.randn(classes, dim, generator=generator)
    scale = 1 + 4 * torch.rand(dim, generator=generator)  # unequal feature scales

    def draw(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(count) % classes
        points = centres[labels] + torch.randn(count, dim, generator=generator)
        return points * scale + 3, labels

    (train_x, train_y), (val_x, val_y) = draw(2000), draw(1000)
    reference = LogisticRegression(max_iter=2000).fit(train_x.numpy(), train_y.numpy())
    expected = 100 * float(
        (torch.from_numpy(reference.predict(val_x.numpy())) == val_y).float().mean()
    )
    assert 70 < expected < 99  # neither trivial nor hopeless

    features = FrozenFeatures(train_x, train_y, val_x, val_y, classes, None, 0.0)  # type: ignore[arg-type]
    section = ProbeSection(epochs=30, warmup_epochs=3)
    probes = train_probes(features, section)
    best = max(probes, key=lambda r: r["top1"])
    assert abs(best["top1"] - expected) < 2.0, (best["top1"], expected)
    assert len(probes) == len(section.base_lrs)
    assert isinstance(LinearProbe(dim, classes)[0], torch.nn.BatchNorm1d)


def test_the_dino_feature_concatenates_the_last_blocks_cls_and_mean_tokens():
    """`--model.feature cls+avg`: per block, [CLS] and the mean patch token through the final
    norm; its last block's halves are exactly the `cls` and `avg` features."""
    from droppos.evaluation.features import LastBlocksFeatures
    from droppos.interop.backbone import random_backbone
    from droppos.models.encoder import EncoderConfig

    shape = EncoderConfig(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=3, num_heads=2)
    vit = build_vit(random_backbone(shape), num_classes=0, global_pool="token").eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        features = LastBlocksFeatures(vit, 2)(images)
        tokens = vit.forward_features(images)  # the last block through the final norm
    dim = 32
    assert features.shape == (2, 2 * 2 * dim)
    torch.testing.assert_close(features[:, 2 * dim : 3 * dim], tokens[:, 0])
    torch.testing.assert_close(features[:, 3 * dim :], tokens[:, 1:].mean(1))
    assert not torch.allclose(features[:, :dim], tokens[:, 0])  # the block before differs
    assert LastBlocksFeatures(vit, 10).blocks == 3  # at most the depth


def test_a_held_out_val_split_and_a_class_balanced_label_subset():
    """`--data.val_from_train 500 --data.train_images 100`: validation held out of train (the
    source's val split unread), 100 training images, 10 of each class, the same for every run
    with the same subset seed and disjoint from the held-out ones."""
    from collections import Counter

    from droppos.evaluation.datasets import EvalDataSection, labelled_splits

    data = EvalDataSection(source="demo", val_from_train=500, train_images=100)
    splits = labelled_splits(data)
    assert (len(splits.train), len(splits.val), splits.num_classes) == (100, 500, 10)
    assert set(Counter(splits.train.all_labels()).values()) == {10}
    assert set(Counter(splits.val.all_labels()).values()) == {50}
    train, val = set(splits.train.indices), set(splits.val.indices)  # into the full train split
    chosen = [splits.train.source.indices[i] for i in splits.train.indices]
    assert not set(chosen) & val and len(train) == 100
    again = labelled_splits(data)
    assert again.train.indices == splits.train.indices and again.val.indices == splits.val.indices
    other = labelled_splits(EvalDataSection(source="demo", train_images=100, subset_seed=1))
    assert other.train.indices != splits.train.indices
    assert splits.train.origin != splits.val.origin  # never taken for the same images
    image, label = splits.train[0]
    assert label == splits.train.all_labels()[0] and image.size == (28, 28)


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (("--data.train_images", "5000"), "--data.train_images 5000: the training split has"),
        (("--data.val_from_train", "4000"), "leaves no training image"),
    ],
)
def test_label_subsets_that_cannot_be_drawn_are_one_line(options, said, tmp_path, capsys):
    args = ["knn", "--model.checkpoint", "random", "--run.output_dir", str(tmp_path), *options]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1, err


def test_a_class_too_small_for_its_share_is_named():
    from droppos.data.sources import balanced_pick

    labels = [0] * 50 + [1] * 5
    assert len(balanced_pick(labels, 10, 0, "--data.train_images")) == 10
    with pytest.raises(ValueError, match="needs 6 images of class 1, which has 5"):
        balanced_pick(labels, 12, 0, "--data.train_images")


def test_knn_on_a_few_labels_with_validation_held_out(tmp_path):
    args = ["knn", "--model.checkpoint", "random", "--data.train_images", "200",
            "--data.val_from_train", "100", "--run.output_dir", str(tmp_path),
            "--run.progress", "false"]  # fmt: skip
    assert main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["train_size"], results["val_size"]) == (200, 100)
    assert results["precision"] in ("fp32", "bf16") and results["threads"] >= 1


def test_a_small_labelled_set_is_told_of_the_few_labels_preset(tmp_path):
    """Under 1,000 training images the large-set recipe gets a note naming the preset; the
    preset turns its regularisers off and is not told again."""
    from droppos.evaluation.finetune import finetuning_loop

    common = ("--model.checkpoint", "random", "--data.train_images", "300",
              "--run.progress", "false")  # fmt: skip
    notes = {}
    for name, extra in (("default", ()), ("preset", ("--config", "finetune_few_labels"))):
        config = parse("finetune", *extra, *common, "--run.output_dir", str(tmp_path / name))
        loop = finetuning_loop(config)
        notes[name] = [n for n in loop.notes if "finetune_few_labels" in n]
        loop.close()
    assert len(notes["default"]) == 1 and "300 training images" in notes["default"][0]
    assert notes["preset"] == []
    preset = parse("finetune", "--config", "finetune_few_labels")
    assert preset.augment.auto_augment is None and preset.augment.reprob == 0
    assert preset.model.drop_path_rate == 0 and preset.optim.lr == 5e-4
    assert preset.data.source == "demo"  # only the recipe: the data and weights stay the user's


@pytest.mark.parametrize("images, epochs", [(400, 18), (600, 13), (6000, 12)])
def test_the_few_labels_schedule_trains_at_least_its_steps_at_any_set_size(
    tmp_path, images, epochs
):
    """The preset's 12 epochs at batch 16 are at least 450 optimiser steps: a smaller set gets
    more epochs (warmup alike) and is told so; a large one keeps its 12."""
    from droppos.engine.loop import epochs_for_min_steps

    preset = parse("finetune", "--config", "finetune_few_labels").optim
    optim, notes = epochs_for_min_steps(preset, images // preset.batch_size)
    assert optim.epochs == epochs and optim.epochs * (images // 16) >= 450
    assert optim.warmup_epochs == pytest.approx(1.2 * epochs / 12)
    assert bool(notes) == (epochs != 12)


def test_min_steps_raises_the_epochs_of_a_real_run(tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", *TINY_ENCODER, "--model.checkpoint", "random", "--data.train_images",
            "64", "--optim.batch_size", "32", "--optim.epochs", "1", "--optim.min_steps", "5",
            "--run.output_dir", str(out), "--run.tensorboard", "false", *QUIET]  # fmt: skip
    assert main(args) == 0
    assert results(out)["epochs"] == 3  # 2 steps an epoch: 3 epochs reach 5 steps
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl", "epoch")] == [1, 2, 3]

"""The input pipeline: tar shards, the draft and tensor decode paths, and what they change."""

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from droppos.cli.main import main
from droppos.data import AugmentedDataset, build_loader, build_source
from droppos.data.shards import ShardDataset, shard_paths
from droppos.engine.loop import TrainLoop
from droppos.interop.schema import load_object
from tests.helpers import progress_of


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """26 JPEG and PNG images in two class folders, with train/ and val/ splits."""
    root = tmp_path_factory.mktemp("folder")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 24), ("val", 2)):
        for i in range(count):
            folder = root / split / ("cat" if i % 2 else "dog")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (torch.rand(20, 20, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i:02d}.{'jpg' if i % 3 else 'png'}")
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory, class_folder):
    out = tmp_path_factory.mktemp("shards")
    assert main(["write-shards", "--data.source", str(class_folder), "--run.output_dir", str(out),
                 "--data.shard_size", "10"]) == 0  # fmt: skip
    return out


def test_shards_hold_the_folders_files_unchanged_in_order(class_folder, shards):
    assert [p.name for p in shard_paths(shards, "train")] == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar",
    ]  # fmt: skip
    folder, sharded = build_source(str(class_folder)), build_source(str(shards))
    with tarfile.open(shards / "train-000000.tar") as tar:
        names = tar.getnames()
        first = tar.extractfile(names[0]).read()
    assert names[:2] == ["000000000.jpg", "000000000.cls"]  # WebDataset's key.ext convention
    assert first == Path(folder.samples[0][0]).read_bytes()  # the file itself, not re-encoded
    assert isinstance(sharded, ShardDataset) and len(sharded) == len(folder) == 24
    assert (sharded.num_classes, sharded.classes) == (2, ["cat", "dog"])
    for i in range(len(folder)):
        (a, label_a), (b, label_b) = folder[i], sharded[i]
        assert label_a == label_b and np.array_equal(np.asarray(a), np.asarray(b))
    assert len(build_source(str(shards), "val")) == 2


def test_loader_workers_read_shards_with_their_own_handles(shards):
    from droppos.data import AugmentedDataset, eval_transform

    dataset = AugmentedDataset(build_source(str(shards)), eval_transform(16, 3))
    single = [b[0] for b in build_loader(dataset, 4, shuffle=False, num_workers=0)]
    workers = [b[0] for b in build_loader(dataset, 4, shuffle=False, num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(single, workers))


def tiny_args(output_dir, source, *extra):
    return [
        "pretrain", "--model.encoder.img_size", "16", "--model.encoder.patch_size", "4",
        "--model.encoder.in_chans", "3", "--model.encoder.embed_dim", "32",
        "--model.encoder.depth", "1", "--model.encoder.num_heads", "2",
        "--model.decoder_embed_dim", "32", "--model.decoder_num_heads", "2",
        "--data.source", str(source), "--data.num_workers", "0", "--optim.batch_size", "4",
        "--optim.epochs", "1", "--run.output_dir", str(output_dir), "--run.progress", "false",
        "--run.precision", "fp32", "--run.tensorboard", "false", "--run.pictures_every", "0",
        *extra,
    ]  # fmt: skip


def test_pretraining_on_shards_resumes_mid_epoch_and_equals_the_folder_run(
    tmp_path, class_folder, shards, monkeypatch
):
    on_folder = tmp_path / "folder"
    assert main(tiny_args(on_folder, class_folder)) == 0

    on_shards = tmp_path / "shards"
    original, saves = TrainLoop.save, []

    def save_then_crash(loop, *args, **kwargs):
        original(loop, *args, **kwargs)
        saves.append(loop.progress.step)
        if len(saves) == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(TrainLoop, "save", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            main(tiny_args(on_shards, shards, "--run.save_every_steps", "2"))
    assert progress_of(on_shards / "last.pth").batch == 4
    assert main(tiny_args(on_shards, shards, "--run.save_every_steps", "2")) == 0

    folder = load_object(on_folder / "last.pth")["model"]
    sharded = load_object(on_shards / "last.pth")["model"]
    for name, value in folder.items():
        assert torch.equal(value, sharded[name]), name


def test_the_demo_set_writes_to_shards_with_both_splits(tmp_path):
    assert (
        main(["write-shards", "--run.output_dir", str(tmp_path), "--data.shard_size", "4000"]) == 0
    )
    assert [p.name for p in sorted(tmp_path.glob("*.tar"))] == [
        "train-000000.tar", "val-000000.tar",
    ]  # fmt: skip
    val = build_source(str(tmp_path), "val")
    demo = build_source("demo", "val")
    image, label = val[7]
    assert label == demo[7][1] and np.array_equal(np.asarray(image), np.asarray(demo[7][0]))


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    values = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, values, side="right") / len(a)
    cdf_b = np.searchsorted(b, values, side="right") / len(b)
    return np.abs(cdf_a - cdf_b).max()


def test_every_paths_crop_draw_follows_random_resized_crops_law():
    """droppos's one crop draw (every decode path calls it) against torchvision v2's
    RandomResizedCrop, drawn independently: the same law of scale and aspect ratio, boxes
    inside the image, and a fair flip coin."""
    from torchvision.transforms import v2

    from droppos.data.decode import draw_crop_and_flip

    tensor = torch.zeros(3, 375, 500, dtype=torch.uint8)
    sampler = v2.RandomResizedCrop(224, scale=(0.2, 1.0))
    torch.manual_seed(0)
    reference = [tuple(sampler.make_params([tensor]).values())[:4] for _ in range(4000)]
    torch.manual_seed(1)
    draws = [draw_crop_and_flip(375, 500, (0.2, 1.0)) for _ in range(4000)]
    ours = [(d.top, d.left, d.height, d.width) for d in draws]
    assert all(top >= 0 and left >= 0 and top + h <= 375 and left + w <= 500
               for top, left, h, w in ours)  # fmt: skip
    area = 500 * 375

    def scales_and_ratios(sample):
        params = np.array(sample, dtype=np.float64)
        return params[:, 2] * params[:, 3] / area, np.log(params[:, 3] / params[:, 2])

    (ref_scale, ref_ratio), (our_scale, our_ratio) = map(scales_and_ratios, (reference, ours))
    critical = 1.95 * np.sqrt(2 / 4000)  # KS at alpha = 0.001
    assert ks_statistic(ref_scale, our_scale) < critical
    assert ks_statistic(ref_ratio, our_ratio) < critical
    assert our_scale.min() >= 0.19 and our_scale.max() <= 1.0 + 1e-9  # sides are rounded
    flips = np.mean([d.flip for d in draws])
    assert abs(flips - 0.5) < 4 * np.sqrt(0.25 / 4000)


def test_pretraining_reads_the_tensor_path_with_bad_images_and_16_bit_files(tmp_path, capfd):
    folder = tmp_path / "images"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(8):
        pixels = (torch.rand(20, 20, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.jpg")
    ramp = np.linspace(0, 65535, 400).reshape(20, 20).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "8-deep.png")
    (folder / "9-broken.jpg").write_bytes(b"not a jpeg")
    from droppos.data.decode import BadImageError, decode_tensor

    grey = decode_tensor((folder / "8-deep.png").read_bytes(), "deep")
    assert grey.dtype == torch.uint8 and grey.shape == (1, 20, 20) and int(grey.max()) == 255
    with pytest.raises(BadImageError, match="broken"):
        decode_tensor((folder / "9-broken.jpg").read_bytes(), "9-broken.jpg")

    out = tmp_path / "run"
    args = tiny_args(out, folder, "--data.decode", "tensor", "--data.max_bad_fraction", "0.2")
    args[args.index("--optim.batch_size") + 1] = "5"
    assert main(args) == 0
    assert "9-broken.jpg" in capfd.readouterr().err
    saved = load_object(out / "last.pth")["model"]
    assert all(v.isfinite().all() for v in saved.values() if v.is_floating_point())


def jpeg(path, width, height, seed=0):
    """A photo-like JPEG: smooth colour fields plus noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    noisy = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path, quality=90)


def augmented(folder, decode, size=64, seed=0):
    from droppos.data import AugmentedDataset
    from droppos.data.transforms import pretrain_transform

    dataset = build_source(str(folder), "train", decode=decode)
    return AugmentedDataset(dataset, pretrain_transform(size, decode=decode), seed=seed)


def test_draft_decoding_equals_the_pil_path_when_no_crop_can_shrink(tmp_path):
    for i in range(6):  # 100 x 80: no crop has both sides of 2 x 64
        jpeg(tmp_path / f"{i}.jpg", 100, 80, seed=i)
    pil, draft = augmented(tmp_path, "pil"), augmented(tmp_path, "draft")
    for i in range(len(pil)):
        assert torch.equal(pil[i][0], draft[i][0])


@pytest.mark.parametrize("decode", ["pil", "draft"])
def test_pretraining_batches_cross_the_loader_as_uint8_and_normalise_to_the_same_floats(
    tmp_path, class_folder, decode
):
    from droppos.cli.main import parser_for, to_config
    from droppos.data import set_epoch
    from droppos.data.transforms import pretrain_transform
    from droppos.methods.pretrain import pretraining_loop

    args = tiny_args(tmp_path, class_folder, "--data.decode", decode)
    parser = parser_for(args)
    loop = pretraining_loop(to_config(parser, parser.parse_args(args), "pretrain"))
    try:
        set_epoch(loop.loader, 0)
        assert next(iter(loop.loader))[0].dtype == torch.uint8  # a quarter of the bytes
        dataset = loop.loader.dataset
        on_device = loop.method.to_device(default_collate([dataset[i] for i in range(4)]))
    finally:
        loop.close()
    crop_scale = tuple(loop.config["data"]["crop_scale"])
    transform = pretrain_transform(16, crop_scale=crop_scale, decode=decode)  # normalised
    normalised = AugmentedDataset(dataset.source, transform, seed=dataset.seed, torch_rng_only=True)
    expected = torch.stack([normalised[i][0] for i in range(4)])
    assert torch.equal(on_device.images, expected)  # the same arithmetic, so the same floats


def test_draft_decoding_shrinks_large_jpegs_and_stays_close(tmp_path):
    from droppos.data.decode import LazyImage

    for i in range(6):
        jpeg(tmp_path / f"{i}.jpg", 1200, 900, seed=i)
    lazy = LazyImage(tmp_path / "0.jpg", "0.jpg")
    assert lazy.size == (1200, 900) and lazy.decode(4).size == (300, 225)  # 1/4 scale
    pil, draft = augmented(tmp_path, "pil"), augmented(tmp_path, "draft")
    levels = [float((pil[i][0] - draft[i][0]).abs().mean()) * 255 * 0.226 for i in range(6)]
    assert np.mean(levels) < 1.0  # a fraction of one level of 255 on average (0.66 measured)
    assert max(levels) > 0  # the shortcut was taken


def test_an_image_that_fails_inside_the_draft_crop_is_still_skipped(tmp_path, capfd):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(9):
        jpeg(folder / f"{i}.jpg", 40, 40, seed=i)
    whole = (folder / "4.jpg").read_bytes()
    (folder / "4.jpg").write_bytes(whole[: len(whole) // 2])  # the header reads, the data ends
    args = tiny_args(tmp_path / "run", folder, "--data.decode", "draft")
    args += ["--data.max_bad_fraction", "0.2"]
    args[args.index("--optim.batch_size") + 1] = "3"
    assert main(args) == 0
    assert "4.jpg" in capfd.readouterr().err


def assert_same_crops_as_the_pil_path(folder, decode, crop):
    """`crop(image)` -> uint8 [3, 64, 64] for each image of `folder` read with `decode`, against
    the Pillow path under the same random numbers: only bicubic rounding may differ."""
    from droppos.data.pipeline import seeded_cpu_rngs
    from droppos.data.transforms import pretrain_transform

    ours = build_source(str(folder), "train", decode=decode)
    plain = build_source(str(folder), "train")
    unnormalised = pretrain_transform(64, mean=(0, 0, 0), std=(1, 1, 1))
    for i in range(len(plain)):
        with seeded_cpu_rngs(100 + i):
            cropped = crop(ours[i][0])
        with seeded_cpu_rngs(100 + i):
            reference = unnormalised(plain[i][0]) * 255
        assert cropped.dtype == torch.uint8
        # same crop, same flip: only bicubic rounding and the JPEG decoders (Pillow's libjpeg,
        # torchvision's libjpeg-turbo: IDCT and chroma upsampling) differ, by under half a level
        assert (cropped.float() - reference).abs().mean() < 0.5


def test_the_device_path_draws_the_pil_paths_crops_and_decodes_them_alike(tmp_path):
    from droppos.data.device_decode import ChooseCrop, decode_batch

    for i in range(4):
        jpeg(tmp_path / f"{i}.jpg", 300, 200, seed=i)
    choose = ChooseCrop((0.2, 1.0))
    assert_same_crops_as_the_pil_path(
        tmp_path,
        "device",
        lambda image: decode_batch([choose(image)], (64, 64), 3, torch.device("cpu"))[0],
    )


@pytest.mark.cuda
def test_gpu_decoding_matches_cpu_decoding(tmp_path):
    from droppos.data.device_decode import ChooseCrop, decode_batch

    for i in range(4):
        jpeg(tmp_path / f"{i}.jpg", 300, 200, seed=i)
    lazy = build_source(str(tmp_path), "train", decode="device")
    torch.manual_seed(0)
    items = [ChooseCrop((0.2, 1.0))(lazy[i][0]) for i in range(len(lazy))]
    on_gpu = decode_batch(items, (64, 64), 3, torch.device("cuda")).cpu().float()
    on_cpu = decode_batch(items, (64, 64), 3, torch.device("cpu")).float()
    assert (on_gpu - on_cpu).abs().mean() < 2.0  # nvJPEG and libjpeg-turbo round differently


def test_pretraining_decodes_on_the_device(tmp_path, class_folder, capsys):
    out = tmp_path / "run"
    args = tiny_args(out, class_folder, "--data.decode", "device", "--data.num_workers", "2")
    assert main(args) == 0
    assert progress_of(out / "last.pth").step == 6
    assert main(tiny_args(tmp_path / "demo", "demo", "--data.decode", "device")) == 2
    assert "holds none" in capsys.readouterr().err


def test_the_tensor_path_takes_the_pil_paths_crops_for_the_same_seed(tmp_path):
    from droppos.data.transforms import pretrain_transform

    for i in range(6):
        jpeg(tmp_path / f"{i}.jpg", 300, 200, seed=i)
    assert_same_crops_as_the_pil_path(tmp_path, "tensor", pretrain_transform(64, decode="tensor"))


def edge_case_folder(folder: Path) -> Path:
    """Photos as ImageNet holds them: plain, CMYK, greyscale and progressive JPEGs, a PNG
    named .JPEG, a palette PNG, and one truncated JPEG, among plain ones."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        jpeg(folder / f"{i}.jpg", 120, 90, seed=i)
    photo = Image.open(folder / "0.jpg").convert("RGB")
    photo.convert("CMYK").save(folder / "6-cmyk.jpg", quality=90)
    photo.convert("L").save(folder / "7-grey.jpg", quality=90)
    photo.save(folder / "8-progressive.jpg", quality=90, progressive=True)
    photo.save(folder / "9-png-named.JPEG", format="PNG")
    photo.convert("P").save(folder / "a-palette.png")
    whole = (folder / "1.jpg").read_bytes()
    (folder / "b-truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return folder


def test_the_device_path_decodes_every_readable_kind_as_the_pil_path_does(tmp_path):
    from droppos.data.device_decode import ChooseCrop, decode_batch

    folder = edge_case_folder(tmp_path / "photos")
    (folder / "b-truncated.jpg").unlink()
    choose = ChooseCrop((0.2, 1.0))
    assert_same_crops_as_the_pil_path(
        folder,
        "device",
        lambda image: decode_batch([choose(image)], (64, 64), 3, torch.device("cpu"))[0],
    )


def test_the_tensor_path_decodes_cmyk_and_palette_files_as_colours(tmp_path):
    from droppos.data.transforms import pretrain_transform

    folder = edge_case_folder(tmp_path / "photos")
    (folder / "b-truncated.jpg").unlink()
    assert_same_crops_as_the_pil_path(folder, "tensor", pretrain_transform(64, decode="tensor"))


def test_an_unreadable_file_on_the_device_path_is_replaced_and_counted_as_on_the_pil_path(
    tmp_path, capfd
):
    from droppos.cli.main import parser_for, to_config
    from droppos.data import set_epoch
    from droppos.methods.pretrain import pretraining_loop

    folder = edge_case_folder(tmp_path / "photos")
    batches, counts = {}, {}
    for decode in ("pil", "device"):
        args = tiny_args(tmp_path / decode, folder, "--data.decode", decode)
        args[args.index("--optim.batch_size") + 1] = "3"
        args[args.index("--model.encoder.img_size") + 1] = "32"
        parser = parser_for(args)
        loop = pretraining_loop(to_config(parser, parser.parse_args(args), "pretrain"))
        try:
            set_epoch(loop.loader, 0)
            batches[decode] = [loop.method.to_device(b).images for b in loop.loader]
            counts[decode] = loop.loader.dataset.replaced
        finally:
            loop.close()
    assert counts == {"pil": 1, "device": 1}  # the truncated file, once, on either path
    assert "b-truncated.jpg" in capfd.readouterr().err
    for pil, device in zip(batches["pil"], batches["device"], strict=True):
        assert (pil - device).abs().mean() < 0.02  # the same neighbour, the same crops


def test_workers_prepare_as_many_batches_ahead_as_asked(tmp_path, class_folder, capsys):
    from droppos.cli.main import main, parser_for, to_config
    from droppos.methods.pretrain import pretraining_loop

    args = tiny_args(tmp_path / "run", class_folder, "--data.prefetch_factor", "4")
    args[args.index("--data.num_workers") + 1] = "1"
    parser = parser_for(args)
    loop = pretraining_loop(to_config(parser, parser.parse_args(args), "pretrain"))
    try:
        assert loop.loader.prefetch_factor == 4
    finally:
        loop.close()
    args[args.index("--data.prefetch_factor") + 1] = "0"
    assert main(args) == 2
    assert "--data.prefetch_factor must be >= 1" in capsys.readouterr().err

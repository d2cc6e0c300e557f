"""The data layer: datasets, transforms, seeded augmentation, resumable sampling."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from droppos.data import (
    AugmentedDataset,
    DemoDataset,
    FashionMNISTDataset,
    FileListDataset,
    ImageFolderDataset,
    ResumableSampler,
    build_loader,
    build_source,
    default_mean_std,
    eval_transform,
    pretrain_transform,
    read_idx,
    set_epoch,
)


def _save(path: Path, mode: str = "RGB", size: tuple[int, int] = (20, 16), value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, size, color).save(path)


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    for cls, n in (("cat", 2), ("dog", 3)):
        for i in range(n):
            _save(tmp_path / "imgs" / cls / f"{i}.png", value=10 * i)
    _save(tmp_path / "imgs" / "dog" / "nested" / "x.JPG")  # found recursively, any case
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("not an image")
    _save(tmp_path / "imgs" / ".hidden" / "skip.png")  # hidden folders are no class
    return tmp_path / "imgs"


# ---------------------------------------------------------------- datasets


def test_class_folder_dataset(class_folder: Path) -> None:
    ds = ImageFolderDataset(class_folder)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert len(ds) == 6
    assert sorted(label for _, label in ds.samples) == [0, 0, 1, 1, 1, 1]
    img, label = ds[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and label == 0


def test_flat_folder_dataset_is_unlabelled_and_keeps_grey(tmp_path: Path) -> None:
    for i in range(3):
        _save(tmp_path / f"{i}.png", mode="L" if i else "RGBA")
    (tmp_path / "readme.md").write_text("x")
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 3 and ds.num_classes == 0 and ds.classes is None
    assert [ds[i][0].mode for i in range(3)] == ["RGB", "L", "L"]
    assert {label for _, label in ds.samples} == {-1}


def test_empty_folder_is_a_value_error(tmp_path: Path) -> None:
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path)


def test_file_list_dataset(tmp_path: Path) -> None:
    _save(tmp_path / "train" / "n01" / "a b.png", value=1)  # a space in the name survives
    _save(tmp_path / "train" / "n02" / "c.png", value=2)
    (tmp_path / "train.txt").write_text("# comment\nn01/a b.png 0\n\nn02/c.png 4\n")
    ds = FileListDataset(tmp_path / "train", tmp_path / "train.txt")
    assert len(ds) == 2 and ds.num_classes == 5
    assert [label for _, label in ds.samples] == [0, 4]
    assert ds[1][0].getpixel((0, 0))[0] == 2

    (tmp_path / "unlabelled.txt").write_text("train/n01/a b.png\ntrain/n02/c.png\n")
    ds = FileListDataset(tmp_path, tmp_path / "unlabelled.txt")
    assert ds.num_classes == 0 and ds[0][1] == -1

    (tmp_path / "mixed.txt").write_text("n01/a b.png 0\nn02/c.png\n")
    with pytest.raises(ValueError, match=r"mixed.txt:2: mixes labelled and unlabelled"):
        FileListDataset(tmp_path / "train", tmp_path / "mixed.txt")
    with pytest.raises(ValueError, match="does not exist"):
        FileListDataset(tmp_path / "elsewhere", tmp_path / "train.txt")


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_reader(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", 6), ("t10k", 4)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
        if prefix == "train":
            train_images = images
    np.testing.assert_array_equal(
        read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}"), train_images
    )
    train = FashionMNISTDataset(tmp_path, "train")
    val = build_source(f"fashion-mnist:{tmp_path}", "val")
    assert len(train) == 6 and len(val) == 4 and train.num_classes == 10
    img, label = train[3]
    assert img.mode == "L" and img.size == (28, 28) and label == 3
    np.testing.assert_array_equal(np.asarray(img), train_images[3])


def test_idx_reader_rejects_truncated_file(tmp_path: Path) -> None:
    _write_idx(tmp_path / "x", np.zeros((3, 2, 2), np.uint8), gz=False)
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "x")


def test_embedded_demo_dataset() -> None:
    train, val = DemoDataset("train"), build_source("demo", "val")
    assert (len(train), len(val)) == (4000, 1000)
    assert train.num_classes == val.num_classes == 10 and train.classes[0] == "T-shirt/top"
    assert np.bincount(train.labels).tolist() == [400] * 10
    assert np.bincount(val.labels).tolist() == [100] * 10
    img, label = train[0]
    assert img.mode == "L" and img.size == (28, 28) and 0 <= label < 10


# ---------------------------------------------------------------- build_source


def test_build_source_layouts(tmp_path: Path, class_folder: Path) -> None:
    assert len(build_source(str(class_folder))) == 6  # a plain class folder, any split
    split_root = tmp_path / "split"
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            _save(split_root / split / "a" / f"{i}.png")
    assert len(build_source(str(split_root), "train")) == 3
    assert len(build_source(str(split_root), "val")) == 2

    # The original ImageNet layout: DATA/train.txt relative to DATA/train.
    _save(tmp_path / "inet" / "train" / "n1" / "x.png")
    (tmp_path / "inet" / "train.txt").write_text("n1/x.png 7\n")
    ds = build_source(str(tmp_path / "inet"))
    assert isinstance(ds, FileListDataset) and ds.num_classes == 8
    assert len(build_source(str(tmp_path / "inet" / "train.txt"))) == 1


@pytest.mark.parametrize(
    ("source", "split", "message"),
    [
        ("{tmp}/nowhere", "train", "does not exist: expected 'demo'"),
        ("{tmp}/file.png", "train", "not a .txt file list"),
        ("{tmp}/split", "val", "has no 'val/' folder or 'val.txt' list"),
        ("fashion-mnist:{tmp}/nowhere", "train", "Fashion-MNIST directory"),
        ("demo", "holdout", "unknown split 'holdout'"),
        ("", "train", "empty data source"),
    ],
)
def test_build_source_errors_are_one_line(
    tmp_path: Path, source: str, split: str, message: str
) -> None:
    _save(tmp_path / "file.png")
    _save(tmp_path / "split" / "train" / "a" / "0.png")
    with pytest.raises(ValueError, match=message) as err:
        build_source(source.format(tmp=tmp_path), split)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_pretrain_transform_shapes_and_normalisation(in_chans: int, mode: str) -> None:
    torch.manual_seed(0)
    img = Image.new(mode, (40, 50), 200 if mode == "L" else (200, 200, 200))
    x = pretrain_transform(32, in_chans)(img)
    assert x.shape == (in_chans, 32, 32) and x.dtype == torch.float32
    mean, std = default_mean_std(in_chans)
    expected = (200 / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(x, expected[:, None, None].expand_as(x), atol=1e-2, rtol=0)
    assert pretrain_transform((24, 16), in_chans)(img).shape == (in_chans, 24, 16)


def test_eval_transform_is_deterministic_resize_and_crop() -> None:
    img = Image.new("RGB", (300, 250), (255, 0, 0))
    t = eval_transform(224, 3)
    x = t(img)
    assert x.shape == (3, 224, 224) and torch.equal(x, t(img))
    assert eval_transform((28, 20), 1, mean=(0.0,), std=(1.0,))(img).shape == (1, 28, 20)
    with pytest.raises(ValueError, match="mean and std need 1 value"):
        eval_transform(28, 1, mean=(0.5, 0.5, 0.5), std=(0.5,))


def test_augmented_dataset_is_a_function_of_seed_epoch_index() -> None:
    base = DemoDataset("val")
    ds = AugmentedDataset(base, pretrain_transform(16, 1), seed=3)
    ds.set_epoch(5)
    a = ds[7][0]
    torch.manual_seed(123)  # the global RNG does not matter...
    before = torch.get_rng_state()
    b = ds[7][0]
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), before)  # ...and is left untouched
    ds.set_epoch(6)
    assert not torch.equal(ds[7][0], a)
    other = AugmentedDataset(base, pretrain_transform(16, 1), seed=4)
    other.set_epoch(5)
    assert not torch.equal(other[7][0], a)
    assert ds[7][1] == base[7][1] and ds.num_classes == 10


def test_epoch_reaches_persistent_workers() -> None:
    ds = AugmentedDataset(DemoDataset("val"), pretrain_transform(8, 1), seed=0)
    loader = build_loader(ds, 4, shuffle=False, num_workers=1)
    reference = {}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        reference[epoch] = torch.stack([ds[i][0] for i in range(4)])
    for epoch in (0, 1, 0):
        set_epoch(loader, epoch)
        images, _ = next(iter(loader))
        assert torch.equal(images, reference[epoch])


# ---------------------------------------------------------------- sampler / loader


def test_two_replicas_partition_the_epoch() -> None:
    data = list(range(10))
    samplers = [ResumableSampler(data, num_replicas=2, rank=r, seed=1) for r in (0, 1)]
    for s in samplers:
        s.set_epoch(3)
    shards = [list(s) for s in samplers]
    assert len(shards[0]) == len(shards[1]) == 5
    assert sorted(shards[0] + shards[1]) == data
    samplers[0].set_epoch(4)
    assert list(samplers[0]) != shards[0]  # reshuffled per epoch


def test_resuming_skips_exactly_the_consumed_batches() -> None:
    data = list(range(23))
    for rank in (0, 1):
        sampler = ResumableSampler(data, num_replicas=2, rank=rank, seed=0, batch_size=4)
        sampler.set_epoch(2)
        full = list(sampler)
        sampler.set_epoch(2, start_batch=2)
        assert list(sampler) == full[8:] and len(sampler) == len(full) - 8
        sampler.set_epoch(3)  # the skip applies to the resumed epoch only
        assert len(list(sampler)) == len(full)


def test_loader_resume_yields_the_tail_batches() -> None:
    data = torch.arange(30)
    loader = build_loader(data, 4, shuffle=True, seed=7, drop_last=True)
    set_epoch(loader, 1)
    full = list(loader)
    assert len(full) == 7 and loader.pin_memory is False
    set_epoch(loader, 1, start_batch=3)
    assert len(loader) == 4
    resumed = list(loader)
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[3:]))

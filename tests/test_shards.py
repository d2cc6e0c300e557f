"""Tar shards: written from any source, read by random access, trained on like the folder."""

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from droppos.cli.main import main
from droppos.data import build_dataset, build_loader
from droppos.data.shards import ShardDataset, shard_paths
from droppos.engine.checkpoint import load_training_checkpoint
from droppos.engine.loop import TrainLoop


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
    assert main(["write-shards", "--source", str(class_folder), "--output", str(out),
                 "--shard_size", "10"]) == 0  # fmt: skip
    return out


def test_shards_hold_the_folders_files_unchanged_in_order(class_folder, shards):
    assert [p.name for p in shard_paths(shards, "train")] == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar",
    ]  # fmt: skip
    folder, sharded = build_dataset(str(class_folder)), build_dataset(str(shards))
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
    assert len(build_dataset(str(shards), "val")) == 2


def test_loader_workers_read_shards_with_their_own_handles(shards):
    from droppos.data import AugmentedDataset, eval_transform

    dataset = AugmentedDataset(build_dataset(str(shards)), eval_transform(16, 3))
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
        saves.append(loop.position.step)
        if len(saves) == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(TrainLoop, "save", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            main(tiny_args(on_shards, shards, "--run.save_every_steps", "2"))
    assert load_training_checkpoint(on_shards / "last.pth")["position"]["batch"] == 4
    assert main(tiny_args(on_shards, shards, "--run.save_every_steps", "2")) == 0

    folder = load_training_checkpoint(on_folder / "last.pth")["model"]
    sharded = load_training_checkpoint(on_shards / "last.pth")["model"]
    for name, value in folder.items():
        assert torch.equal(value, sharded[name]), name


def test_the_demo_set_writes_to_shards_with_both_splits(tmp_path):
    assert main(["write-shards", "--output", str(tmp_path), "--shard_size", "4000"]) == 0
    assert [p.name for p in sorted(tmp_path.glob("*.tar"))] == [
        "train-000000.tar", "val-000000.tar",
    ]  # fmt: skip
    val = build_dataset(str(tmp_path), "val")
    demo = build_dataset("demo", "val")
    image, label = val[7]
    assert label == demo[7][1] and np.array_equal(np.asarray(image), np.asarray(demo[7][0]))

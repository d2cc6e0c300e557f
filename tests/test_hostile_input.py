"""Inputs an attacker or a careless user could hand droppos: each is refused or handled in one
line, never run, never trusted past its word, never miscounted."""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from droppos.cli.main import main
from droppos.data.catalog import build_source
from droppos.data.decode import BadImageError, read_image
from droppos.data.pipeline import AugmentedDataset
from droppos.data.shards import index_shard, write_shard
from droppos.engine.guards import remove_temporary_files
from droppos.interop.schema import load_object, save_atomic
from droppos.models import EncoderConfig
from droppos.outputs import PARTIAL_SUFFIX
from droppos.visual.jigsaw import picture_batch

POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


@pytest.mark.parametrize("decode", ["pil", "tensor", "draft", "device"])
def test_a_jpg_that_holds_postscript_is_unreadable_and_starts_no_program(
    tmp_path, monkeypatch, decode
):
    marker = tmp_path / "ghostscript-ran"
    fake = tmp_path / "bin" / "gs"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    image = tmp_path / "photo.jpg"
    image.write_bytes(POSTSCRIPT)
    with pytest.raises(BadImageError, match=r"photo\.jpg"):
        decoded = read_image(image, image, None, decode)
        getattr(decoded, "load", lambda: None)()
    assert not marker.exists()


class _SourceWithBadRun:
    """403 'images' (their index), of which 10, 11 and 12 (a corrupted copy sorts together)
    cannot be read."""

    bad = frozenset({10, 11, 12})

    def __len__(self) -> int:
        return 403

    def __getitem__(self, index: int):
        if index in self.bad:
            raise BadImageError(f"img{index}.jpg", "truncated")
        return index, 0


def test_adjacent_bad_files_are_counted_once_each_not_once_per_index_that_meets_them(capfd):
    dataset = AugmentedDataset(_SourceWithBadRun(), lambda image: image, on_bad_image="skip")
    dataset.set_epoch(0)
    served = [dataset[i][0] for i in range(len(dataset))]
    assert dataset.replaced == 3  # 0.74 % of 403: under the 1 % rule, as it really is
    assert served[10:13] == [13, 13, 13]  # each takes the next readable neighbour
    warnings = capfd.readouterr().err
    assert all(warnings.count(f"img{i}.jpg") == 1 for i in _SourceWithBadRun.bad)


def test_cleanup_after_a_killed_save_removes_droppos_partial_files_only(tmp_path):
    users = [tmp_path / ".model.pth.bak", tmp_path / ".best.pth.orig", tmp_path / ".a.pth.tmp"]
    for path in users:
        path.write_bytes(b"the user's")
    partial = tmp_path / f".last.pth.k2j4x9{PARTIAL_SUFFIX}"
    partial.write_bytes(b"half a save")
    assert remove_temporary_files(tmp_path) == [partial]
    assert all(path.read_bytes() == b"the user's" for path in users)


def test_checkpoints_are_written_with_the_mode_the_umask_gives(tmp_path):
    previous = os.umask(0o022)
    try:
        path = save_atomic({"x": torch.zeros(1)}, tmp_path / "last.pth")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not list(tmp_path.glob(f"*{PARTIAL_SUFFIX}"))


def _images(folder, count=2):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")


def test_a_validation_split_missing_a_class_keeps_the_training_splits_labels(tmp_path):
    for name in "abc":
        _images(tmp_path / "train" / name)
    for name in "ac":
        _images(tmp_path / "val" / name)
    train, val = build_source(str(tmp_path), "train"), build_source(str(tmp_path), "val")
    assert val.classes == train.classes == ["a", "b", "c"]
    by_class = {Path(path).parent.name: label for path, label in val.samples}
    assert by_class == {"a": 0, "c": 2}  # c is class 2 in train, not 1


def test_a_validation_class_the_training_split_lacks_is_refused_in_one_line(tmp_path):
    for name in "ab":
        _images(tmp_path / "train" / name)
    for name in "ad":
        _images(tmp_path / "val" / name)
    with pytest.raises(ValueError, match="lacks: d") as refused:
        build_source(str(tmp_path), "val")
    assert "\n" not in str(refused.value)


def test_a_stray_tar_beside_split_folders_is_not_a_shard_source(tmp_path):
    for split in ("train", "val"):
        for name in "ab":
            _images(tmp_path / split / name)
    with tarfile.open(tmp_path / "backup-old.tar", "w") as tar:
        tar.add(tmp_path / "train" / "a" / "0.png", arcname="x.png")
    before = sorted(p.name for p in tmp_path.iterdir())
    source = build_source(str(tmp_path), "train")
    assert len(source) == 4 and source.classes == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written there


def test_shards_beside_image_folders_are_ambiguous_and_refused(tmp_path):
    _images(tmp_path / "train" / "a")
    with tarfile.open(tmp_path / "train-000000.tar", "w") as tar:
        tar.add(tmp_path / "train" / "a" / "0.png", arcname="x.png")
    with pytest.raises(ValueError, match="both tar shards and image folders"):
        build_source(str(tmp_path), "train")


def test_a_link_back_up_neither_multiplies_the_samples_nor_hangs_the_listing(tmp_path):
    for name in "ab":
        _images(tmp_path / name, count=8)
    (tmp_path / "a" / "up").symlink_to("..")
    (tmp_path / "b" / "loop").symlink_to(tmp_path / "b")
    (tmp_path / "b" / "sideways").symlink_to(tmp_path / "a")
    source = build_source(str(tmp_path))
    assert len(source) == 16
    assert len({os.path.realpath(path) for path, _ in source.samples}) == 16


def test_a_small_file_claiming_a_huge_tensor_is_refused_before_anything_allocates(tmp_path):
    path = tmp_path / "bomb.pth"
    claim = torch.zeros(1).expand(1 << 40)  # a terabyte-element tensor stored as one float
    torch.save({"model": {"pos_embed": claim}}, path)
    assert path.stat().st_size < 4096
    with pytest.raises(ValueError, match=r"model\.pos_embed claims 1099511627776 elements"):
        load_object(path)


@pytest.mark.parametrize(
    ("field", "value"), [("depth", 10_000), ("img_size", 700_000), ("embed_dim", 1 << 20)]
)
def test_encoder_shapes_beyond_any_vit_are_refused_before_the_model_is_built(field, value):
    shape = {"img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12}
    with pytest.raises(ValueError, match="beyond any ViT"):
        EncoderConfig(**{**shape, field: value})


@pytest.mark.parametrize("decode", ["pil", "tensor", "draft", "device"])
def test_a_fifo_named_like_an_image_is_unreadable_not_a_hang(tmp_path, decode):
    fifo = tmp_path / "stuck.png"
    os.mkfifo(fifo)
    with pytest.raises(BadImageError, match="not a regular file"):
        read_image(fifo, fifo, None, decode)


def _shard(path, labels):
    write_shard(path, [(f"{i:06d}", PNG_BYTES, "png", label) for i, label in enumerate(labels)])


def _png_bytes() -> bytes:
    stream = io.BytesIO()
    Image.new("RGB", (8, 8)).save(stream, format="PNG")
    return stream.getvalue()


PNG_BYTES = _png_bytes()


@pytest.mark.parametrize(
    "content", [b"", b"\x1f\x8b\x08\x00garbage-gzip", b"not a tar at all" * 64]
)
def test_an_empty_gzip_or_garbage_shard_is_refused_in_one_line(tmp_path, content):
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(content)
    with pytest.raises(ValueError, match=r"train-000000\.tar") as refused:
        index_shard(shard)
    assert "\n" not in str(refused.value)


def test_a_shard_cut_at_a_member_boundary_is_refused_not_indexed_in_part(tmp_path):
    whole = tmp_path / "whole.tar"
    _shard(whole, [0, 1, 2, 3])
    with tarfile.open(whole) as tar:
        third = [m for m in tar if m.name.endswith(".png")][2].offset
    cut = tmp_path / "train-000000.tar"
    cut.write_bytes(whole.read_bytes()[:third])
    with pytest.raises(ValueError, match="truncated"):
        index_shard(cut)


def test_a_relabelled_shard_copied_with_its_times_is_indexed_again(tmp_path):
    shard = tmp_path / "train-000000.tar"
    _shard(shard, [0, 1])
    assert [e["label"] for e in index_shard(shard)] == [0, 1]
    times = (shard.stat().st_atime_ns, shard.stat().st_mtime_ns)
    replacement = tmp_path / "new.tar"
    _shard(replacement, [5, 6])  # relabelled, the same size, then `cp -p` over the old one
    assert replacement.stat().st_size == shard.stat().st_size
    shard.write_bytes(replacement.read_bytes())
    os.utime(shard, ns=times)
    assert [e["label"] for e in index_shard(shard)] == [5, 6]


def test_a_label_beyond_any_class_set_is_refused_before_an_evaluation_allocates(tmp_path):
    _shard(tmp_path / "train-000000.tar", [0, 100_000_000])
    with pytest.raises(ValueError, match="label 100000000 declares 100,000,001 classes"):
        build_source(str(tmp_path), "train")


def test_a_label_that_is_no_integer_names_its_file(tmp_path):
    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("a.png", PNG_BYTES), ("a.cls", b"cat")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"a\.cls does not hold an integer class label"):
        index_shard(shard)


def test_write_shards_never_mixes_with_older_shards_nor_writes_over_its_source(tmp_path, capsys):
    for name in "ab":
        _images(tmp_path / "images" / name, count=3)
    images = tmp_path / "images"
    before = {p: p.read_bytes() for p in images.rglob("*.png")}
    out = tmp_path / "shards"
    assert main(["write-shards", "--data.source", str(images), "--run.output_dir", str(out)]) == 0
    capsys.readouterr()
    assert main(["write-shards", "--data.source", str(images), "--run.output_dir", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    for target in (images, images / "a"):
        assert (
            main(["write-shards", "--data.source", str(images), "--run.output_dir", str(target)])
            == 2
        )
        assert "overlaps" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in images.rglob("*.png")} == before


@pytest.mark.parametrize("command", ["pretrain", "knn"])
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, command):
    taken = tmp_path / "results"
    taken.write_text("someone's file")
    assert main([command, "--run.output_dir", str(taken)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a file, not a folder" in err and len(err.splitlines()) == 1
    assert taken.read_text() == "someone's file"


@pytest.mark.parametrize(("option", "value"), [("mean", "[1e400]"), ("std", "[0.0]")])
def test_a_normalisation_that_is_not_a_finite_scale_is_refused_at_once(capsys, option, value):
    assert main(["pretrain", f"--data.{option}", value]) == 2
    assert f"--data.{option}" in capsys.readouterr().err


def test_a_class_list_that_is_not_utf8_is_named_in_one_line(tmp_path):
    _shard(tmp_path / "train-000000.tar", [0, 1])
    (tmp_path / "classes.txt").write_bytes(b"cat\n\xff\xfedog\n")
    with pytest.raises(ValueError, match=r"classes\.txt is not UTF-8"):
        build_source(str(tmp_path), "train")


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)


@pytest.mark.parametrize(
    ("content", "said"), [(BILLION_LAUGHS, "uses YAML aliases"), ("\n  \n", "is empty")]
)
def test_a_config_file_that_is_an_alias_bomb_or_empty_is_refused_in_one_line(
    tmp_path, capsys, content, said
):
    config = tmp_path / "config.yaml"
    config.write_text(content)
    assert main(["pretrain", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1


def test_export_never_replaces_an_earlier_export_without_a_word(tmp_path, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"an earlier export")
    assert (
        main(["export", "--model.checkpoint", "missing.pth", "--run.output_dir", str(folder)]) == 2
    )
    assert "already holds an export" in capsys.readouterr().err
    assert (folder / "model.safetensors").read_bytes() == b"an earlier export"


def test_a_folder_of_someone_elses_files_is_refused_unless_the_user_says_to_use_it(
    tmp_path, capsys, image_folder
):
    theirs = tmp_path / "results"
    theirs.mkdir()
    (theirs / "config.yaml").write_text("their: settings\n")
    (theirs / "summary.json").write_text('{"their": "numbers"}\n')
    args = ["pretrain", "--optim.epochs", "1", "--data.source", str(image_folder)]
    args += ["--optim.batch_size", "8", "--run.output_dir", str(theirs)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "holds files but no droppos run" in err and len(err.splitlines()) == 1
    assert (theirs / "config.yaml").read_text() == "their: settings\n"
    assert main([*args[:-2], "--run.output_dir", str(theirs), "--run.reuse_folder", "true",
                 "--model.encoder.depth", "1", "--data.num_workers", "0"]) == 0  # fmt: skip
    assert (theirs / "last.pth").is_file()


def test_reading_shards_writes_nothing_into_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DROPPOS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "train-000000.tar", "w") as tar:  # shards from another tool
        for name, content in (("a.png", PNG_BYTES), ("a.cls", b"0"), ("b.png", PNG_BYTES),
                              ("b.cls", b"1")):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    before = sorted(p.name for p in data.iterdir())
    assert len(build_source(str(data), "train")) == 2
    assert sorted(p.name for p in data.iterdir()) == before
    assert list((tmp_path / "cache").rglob("*.idx.json"))  # indexed once, kept in the cache


class _RunsACommand:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_a_pickle_that_would_run_a_command_is_named_not_met_with_torchs_advice(tmp_path):
    path = tmp_path / "last.pth"
    torch.save({"model": _RunsACommand()}, path)
    with pytest.raises(ValueError) as refused:
        load_object(path)
    said = str(refused.value)
    assert "posix.system" in said and "never does" in said
    assert "weights_only" not in said and "\n" not in said


@pytest.mark.parametrize("content", ["[1, 2]", '{"pid": 1e300, "host": "here"}', "\x00\xff"])
def test_a_lock_file_holding_nonsense_gets_one_line_not_a_traceback(tmp_path, capsys, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".droppos.lock").write_text(content)
    code = main(["pretrain", "--optim.epochs", "1", "--model.encoder.depth", "1",
                 "--data.num_workers", "0", "--run.output_dir", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code == 0 or (code != 0 and len(err.strip().splitlines()) == 1)


def test_the_epochs_pictures_pass_over_an_unreadable_pick(tmp_path):
    folder = tmp_path / "images"
    _images(folder, count=8)
    (folder / "4.png").write_bytes(b"not a png")  # picks are 0, 2, 4, 6 of 8
    images = picture_batch(str(folder), 8, 3, 4, (0.5,) * 3, (0.5,) * 3)
    assert images.shape == (4, 3, 8, 8)


@pytest.mark.parametrize("decode", ["draft", "device"])
def test_a_pixel_limit_above_pillows_own_holds_on_the_draft_and_device_paths(tmp_path, decode):
    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    path = tmp_path / "wide.png"  # 20000 x 20000: past twice Pillow's default bomb limit
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    lazy = read_image(path, path, 500_000_000, decode)  # the user's limit: 500 M pixels
    assert lazy.size == (20000, 20000)
    with pytest.raises(BadImageError, match=r"more than --data\.max_image_pixels"):
        read_image(path, path, 100_000_000, decode)


def test_a_source_too_small_for_one_step_says_how_many_images_it_found(tmp_path, capsys):
    folder = tmp_path / "few"
    _images(folder / "a", count=3)
    args = ["pretrain", "--data.source", str(folder), "--optim.batch_size", "8",
            "--data.num_workers", "0", "--run.output_dir", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "holds 3 image(s)" in err and "needs 8 images" in err and len(err.splitlines()) == 1

"""What a shard, its index or a file list says about itself is checked against what is on disk:
labels the samples bear out, one line naming the file and member, an index no one else could
have written, outputs that follow the umask and never land inside their source."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from droppos.cli.main import main
from droppos.data.catalog import build_source
from droppos.data.shards import INDEX_SUFFIX, cache_folder, write_shard
from droppos.data.sources import ArrayDataset, check_labels
from tests.helpers import write_split_images


def _png() -> bytes:
    stream = io.BytesIO()
    Image.new("RGB", (8, 8)).save(stream, format="PNG")
    return stream.getvalue()


PNG = _png()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test indexes into a cache of its own, under the usual umask."""
    monkeypatch.setenv("DROPPOS_CACHE", str(tmp_path / "cache"))
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A shard as another tool would write it (no index beside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _labelled(path: Path, labels: list[int]) -> Path:
    members = []
    for i, label in enumerate(labels):
        members += [(f"{i:06d}.png", PNG), (f"{i:06d}.cls", str(label).encode())]
    return _tar(path, members)


def _one_line_naming(error: pytest.ExceptionInfo, *names: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert all(name in message for name in names), message


# -- labels the samples bear out (a head is allocated per class) -------------------------------


def test_a_label_the_samples_do_not_bear_out_is_refused_in_a_shard(tmp_path):
    """999999 among 4 samples would make a linear probe allocate a million-row head."""
    shard = _labelled(tmp_path / "data" / "train-000000.tar", [0, 1, 2, 999_999])
    with pytest.raises(ValueError, match="label 999999 declares 1,000,000 classes") as refused:
        build_source(str(shard.parent), "train")
    _one_line_naming(refused, "train-000000.tar:000003")


def test_a_label_the_samples_do_not_bear_out_is_refused_in_a_file_list(tmp_path):
    for name in "abcd":
        (tmp_path / f"{name}.png").write_bytes(PNG)
    listing = tmp_path / "train.txt"
    listing.write_text("a.png 0\nb.png 1\nc.png 999999\nd.png 2\n")
    with pytest.raises(ValueError, match="label 999999 declares 1,000,000 classes") as refused:
        build_source(str(listing), "train")
    _one_line_naming(refused, "train.txt", "c.png")


def test_a_label_past_any_integer_type_is_named_not_a_traceback(tmp_path):
    huge = "9" * 64
    _tar(tmp_path / "data" / "train-000000.tar", [("a.png", PNG), ("a.cls", huge.encode())])
    with pytest.raises(ValueError, match=f"label {huge} is not a class index") as refused:
        build_source(str(tmp_path / "data"), "train")
    _one_line_naming(refused, "train-000000.tar:a")
    (tmp_path / "a.png").write_bytes(PNG)
    (tmp_path / "train.txt").write_text(f"a.png {huge}\n")
    with pytest.raises(ValueError, match=f"label {huge} is not a class index") as refused:
        build_source(str(tmp_path / "train.txt"), "train")
    _one_line_naming(refused, "train.txt (a.png)")


@pytest.mark.parametrize(
    "labels",
    [
        [7, 512, 999],  # a few validation images of ImageNet-1k
        [3, 21_842],  # two images of ImageNet-21k
        list(range(0, 300_000, 16)),  # a large label space, one in 16 of its classes present
        list(range(1_500_000)),  # more classes than any common set, each one present
    ],
)
def test_labels_of_real_label_spaces_are_accepted(labels):
    check_labels(labels, str)


def test_named_classes_bound_the_labels_whatever_the_samples_hold(tmp_path):
    """classes.txt names the label space: a small split of it passes, a label past it does not."""
    data = tmp_path / "data"
    _labelled(data / "train-000000.tar", [4, 99_999])
    (data / "classes.txt").write_text("".join(f"class {i}\n" for i in range(100_000)))
    assert build_source(str(data), "train").num_classes == 100_000
    (data / "classes.txt").write_text("".join(f"class {i}\n" for i in range(10)))
    with pytest.raises(ValueError, match="only 10 classes are named") as refused:
        build_source(str(data), "train")
    _one_line_naming(refused, "train-000000.tar:000001")


def test_an_in_memory_label_past_its_named_classes_is_refused():
    """A damaged Fashion-MNIST label file would index past a 10-row head."""
    images, labels = np.zeros((3, 4, 4), np.uint8), np.array([0, 9, 200])
    with pytest.raises(ValueError, match="label 200") as refused:
        ArrayDataset(images, labels, [str(i) for i in range(10)], "fashion-mnist:/x:train")
    _one_line_naming(refused, "fashion-mnist:/x:train")


# -- every bad label named by shard and member --------------------------------------------------


@pytest.mark.parametrize("text", [b"-5", b"1_0", "\u0661".encode(), "\u00b2".encode(), b"1" * 65])
def test_a_label_that_is_not_ascii_digits_names_the_shard_and_member(tmp_path, text):
    """int() takes "1_0" as 10 and Unicode digits; a label is ASCII digits alone."""
    shard = _tar(tmp_path / "train-000000.tar", [("a.png", PNG), ("a.cls", text)])
    with pytest.raises(ValueError, match="does not hold an integer class label") as refused:
        build_source(str(tmp_path), "train")
    _one_line_naming(refused, str(shard), "a.cls")


def test_a_sample_without_a_label_among_labelled_ones_is_named(tmp_path):
    shard = _tar(tmp_path / "train-000000.tar", [("a.png", PNG), ("a.cls", b"0"), ("b.png", PNG)])
    with pytest.raises(ValueError, match="label every sample or none") as refused:
        build_source(str(tmp_path), "train")
    _one_line_naming(refused, str(shard), "b.png")


def test_an_unlabelled_shard_among_labelled_ones_is_named(tmp_path):
    _labelled(tmp_path / "train-000000.tar", [0, 1])
    _tar(tmp_path / "train-000001.tar", [("c.png", PNG)])
    with pytest.raises(ValueError, match="label every sample or none") as refused:
        build_source(str(tmp_path), "train")
    _one_line_naming(refused, "train-000001.tar:c", "train-000000.tar:000000")


def test_a_label_that_labels_no_image_is_named(tmp_path):
    """A sample whose image droppos cannot read (`.avif`) would otherwise vanish silently."""
    members = [("a.png", PNG), ("a.cls", b"0"), ("b.avif", b"..."), ("b.cls", b"1")]
    shard = _tar(tmp_path / "train-000000.tar", members)
    with pytest.raises(ValueError, match="labels no image") as refused:
        build_source(str(tmp_path), "train")
    _one_line_naming(refused, str(shard), "b.cls")


@pytest.mark.parametrize("second", ["a.jpg", "a.png", "a.cls"])
def test_a_sample_key_used_twice_in_a_shard_is_refused_naming_both(tmp_path, second):
    """A second `a.*` member would hide the first (the index keeps one per key)."""
    members = [("a.png", PNG), ("a.cls", b"0"), (second, PNG if second != "a.cls" else b"1")]
    shard = _tar(tmp_path / "train-000000.tar", members)
    first = "a.cls (byte 1024)" if second == "a.cls" else "a.png (byte 0)"
    with pytest.raises(ValueError, match="are both sample 'a'") as refused:
        build_source(str(tmp_path), "train")
    _one_line_naming(refused, str(shard), f"{first} and {second} (byte 2048)")


def test_the_same_key_in_two_shards_loses_neither_sample(tmp_path):
    """Keys numbered per shard are common in shards from other tools, and each shard's samples
    are read by position: both are kept."""
    _labelled(tmp_path / "train-000000.tar", [0, 1])
    _labelled(tmp_path / "train-000001.tar", [2, 3])
    assert build_source(str(tmp_path), "train").all_labels() == [0, 1, 2, 3]


@pytest.mark.parametrize("label", ["\u0663", "\u00b2"])
def test_a_file_list_label_is_ascii_digits_alone(tmp_path, label):
    """ "3" in Arabic-Indic digits was read as 3, "²" ended in a message naming no file."""
    for name in "ab":
        (tmp_path / f"{name}.png").write_bytes(PNG)
    listing = tmp_path / "train.txt"
    listing.write_text(f"a.png 0\nb.png {label}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="mixes labelled and unlabelled") as refused:
        build_source(str(listing), "train")
    _one_line_naming(refused, f"{listing}:2")


@pytest.mark.parametrize("line", ["../secret.png 0", "/etc/secret.png 0", "a/../../s.png 0"])
def test_a_file_list_reads_under_its_image_root_alone(tmp_path, line):
    """write-shards copies listed files byte for byte: a list could otherwise ship any file."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(PNG)
    listing = tmp_path / "images" / "train.txt"
    listing.write_text(f"a.png 0\n{line}\n")
    with pytest.raises(ValueError, match="leaves the image root") as refused:
        build_source(str(listing), "train")
    _one_line_naming(refused, f"{listing}:2")


def test_a_file_list_that_is_not_utf8_names_its_line(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    listing = tmp_path / "train.txt"
    listing.write_bytes(b"a.png 0\n\xff.png 1\n")
    with pytest.raises(ValueError, match="not UTF-8") as refused:
        build_source(str(listing), "train")
    _one_line_naming(refused, f"{listing}:2")


def test_pretraining_on_a_badly_labelled_shard_stops_naming_it(tmp_path, capsys):
    _labelled(tmp_path / "data" / "train-000000.tar", [0, 1])
    _tar(tmp_path / "data" / "train-000001.tar", [("c.png", PNG), ("c.cls", b"-5")])
    output = tmp_path / "run"
    assert main(["pretrain", "--data.source", str(tmp_path / "data"),
                 "--run.output_dir", str(output)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "train-000001.tar: c.cls does not hold" in err and len(err.splitlines()) == 1


def test_a_fifo_named_like_a_shard_is_refused_not_a_hang(tmp_path):
    os.mkfifo(tmp_path / "train-000000.tar")
    with pytest.raises(ValueError, match="is not a regular file") as refused:
        build_source(str(tmp_path), "train")
    _one_line_naming(refused, "train-000000.tar")


# -- the index: bound to the shard's content, trusted only from its owner -----------------------


def _cached_index(shard: Path) -> Path:
    [index] = (cache_folder() / "shard-index").glob(f"*{INDEX_SUFFIX}")
    return index


def _flip_labels(index: Path, count: int) -> None:
    """Rewrite the index's labels, leaving the shard's size and times as they were."""
    content = json.loads(index.read_text())
    for entry in content["entries"]:
        entry["label"] = count - 1 - entry["label"]
    mode = index.stat().st_mode
    index.write_text(json.dumps(content))
    index.chmod(mode)


@pytest.mark.parametrize("count", [4, 40])
def test_relabelling_a_cached_index_does_not_relabel_the_data(tmp_path, count):
    shard = _labelled(tmp_path / "data" / "train-000000.tar", list(range(count)))
    assert build_source(str(shard.parent), "train").all_labels() == list(range(count))
    _flip_labels(_cached_index(shard), count)
    assert build_source(str(shard.parent), "train").all_labels() == list(range(count))


def test_relabelling_the_index_write_shards_left_does_not_relabel_the_data(tmp_path):
    shard = tmp_path / "train-000000.tar"
    write_shard(shard, [(f"{i:06d}", PNG, "png", i) for i in range(4)])
    _flip_labels(shard.with_name(shard.name + INDEX_SUFFIX), 4)
    assert build_source(str(tmp_path), "train").all_labels() == [0, 1, 2, 3]


@pytest.mark.parametrize("form", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_an_index_of_long_or_non_ascii_names_is_believed_not_rebuilt_at_every_read(tmp_path, form):
    """The spot checks read a member back from its first header (long-name and pax headers
    included), so every tar dialect's index is reused."""
    key = "folder/" * 20 if form == tarfile.USTAR_FORMAT else "é" * 120
    shard = tmp_path / "data" / "train-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w", format=form) as tar:
        for name, data in ((f"{key}.png", PNG), (f"{key}.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    build_source(str(shard.parent), "train")
    made = _cached_index(shard).stat().st_ino
    assert build_source(str(shard.parent), "train").all_labels() == [0]
    assert _cached_index(shard).stat().st_ino == made


def _others_can_write(index: Path) -> None:
    index.chmod(0o666)


def _owned_by_another_user(index: Path) -> None:
    os.chown(index, 65534, 65534)


def _a_link(index: Path) -> None:
    real = index.with_name("elsewhere.json")
    index.rename(real)
    index.symlink_to(real)


def _larger_than_the_shard(index: Path) -> None:
    index.write_text(index.read_text() + " " * 100_000)  # still valid JSON


@pytest.mark.parametrize(
    "change",
    [
        _others_can_write,
        pytest.param(
            _owned_by_another_user,
            marks=pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a file away"),
        ),
        _a_link,
        _larger_than_the_shard,
    ],
)
def test_a_cache_file_someone_else_could_have_written_is_ignored_and_replaced(tmp_path, change):
    shard = _labelled(tmp_path / "data" / "train-000000.tar", [0, 1])
    build_source(str(shard.parent), "train")
    index = _cached_index(shard)
    change(index)
    assert build_source(str(shard.parent), "train").all_labels() == [0, 1]
    status = index.lstat()
    assert (status.st_mode & 0o777, status.st_uid) == (0o644, os.getuid())  # made afresh
    assert status.st_size < shard.stat().st_size


def test_a_link_planted_in_the_cache_folder_is_never_written_through(tmp_path):
    """Someone who can write a shared cache folder could point droppos's own sub-folder
    elsewhere."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cache_folder().mkdir()
    (cache_folder() / "shard-index").symlink_to(elsewhere)
    shard = _labelled(tmp_path / "data" / "train-000000.tar", [0, 1])
    assert build_source(str(shard.parent), "train").all_labels() == [0, 1]
    assert not any(elsewhere.iterdir())


# -- outputs: the umask's mode, never inside the source -----------------------------------------


@pytest.mark.parametrize(
    ("umask", "beside", "cached"), [(0o022, 0o644, 0o644), (0o002, 0o664, 0o644)]
)
def test_indexes_follow_the_umask_and_the_cache_is_writable_by_its_owner_alone(
    tmp_path, umask, beside, cached
):
    """write-shards' index is an output like the shards; a cache file others could write would
    be ignored, so it is never made group- or world-writable."""
    os.umask(umask)
    shard = tmp_path / "out" / "train-000000.tar"
    shard.parent.mkdir()
    write_shard(shard, [("000000", PNG, "png", 0)])
    assert shard.with_name(shard.name + INDEX_SUFFIX).stat().st_mode & 0o777 == beside
    other = _labelled(tmp_path / "data" / "train-000000.tar", [0, 1])
    build_source(str(other.parent), "train")
    assert _cached_index(other).stat().st_mode & 0o777 == cached


def test_write_shards_into_a_new_folder_inside_its_source_is_refused(tmp_path, capsys):
    """`SRC/train/shards` does not exist yet: once written, SRC would have a class `shards`."""
    source = write_split_images(tmp_path / "src", train=4, val=2)
    link = tmp_path / "link"
    link.symlink_to(source / "train" / "new")  # a link into the source, not yet there either
    for output in (source / "train" / "shards", link, link / "deeper"):
        args = ["write-shards", "--data.source", str(source), "--run.output_dir", str(output)]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "overlaps --data.source" in err and len(err.splitlines()) == 1
    assert not (source / "train" / "shards").exists() and not (source / "train" / "new").exists()
    assert build_source(str(source), "train").classes == ["a", "b"]


def test_write_shards_never_writes_through_a_dangling_link(tmp_path, capsys):
    source = write_split_images(tmp_path / "src", train=4, val=2)
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "elsewhere")
    args = ["write-shards", "--data.source", str(source), "--run.output_dir", str(link)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot make --run.output_dir {link}" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "elsewhere").exists()

"""What a shard, its index or a file list says about itself is checked against what is on disk:
labels the samples bear out, one line naming the file and member, an index no one else could
have written, outputs that follow the umask and never land inside their source."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from droppos.data.catalog import build_source
from droppos.data.shards import INDEX_SUFFIX, cache_folder, write_shard


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


def _cached_index(shard: Path) -> Path:
    [index] = (cache_folder() / "shard-index").glob(f"*{INDEX_SUFFIX}")
    return index


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

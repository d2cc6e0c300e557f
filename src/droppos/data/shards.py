"""Tar shards: a data set as a few large files instead of millions of small ones.

The files follow the WebDataset convention (`train-000000.tar`, ...; each sample is members
`KEY.jpg` or `.png` and `KEY.cls` holding the label), so tools that stream WebDataset read them
too. droppos reads them by random access instead of streaming: each shard's member offsets are
listed once (cached beside it as `SHARD.tar.idx.json`), and `ShardDataset` is a map-style source.
The sampler, the per-rank sharding and the exact mid-epoch resume are then the same as for an
image folder: a run on shards sees exactly the batches a run on the folder they came from sees.
That needs a file system that can seek (local disks, NFS, Lustre, GPFS); a store that can only
stream objects is not supported.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import stat
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torchvision.datasets.folder import IMG_EXTENSIONS

from droppos._version import PACKAGE
from droppos.data.decode import (
    DEFAULT_MAX_IMAGE_PIXELS,
    BadImageError,
    DecodedImage,
    describe_decode_error,
    open_raster,
    read_image,
)
from droppos.data.sources import ImageSource, Share, alone, check_labels
from droppos.outputs import write_text

INDEX_SUFFIX = ".idx.json"
CLASSES_FILE = "classes.txt"
IMAGE_SUFFIXES = tuple(e.lstrip(".") for e in IMG_EXTENSIONS)


def shard_paths(folder: str | Path, split: str) -> list[Path]:
    """`folder/{split}-*.tar` in name order; a folder of tars without split names serves both."""
    folder = Path(folder)
    found = sorted(folder.glob(f"{split}-*.tar"))
    if not found and split == "val":
        found = sorted(folder.glob("test-*.tar"))
    if not found and not any(folder.glob("train-*.tar")):
        found = sorted(folder.glob("*.tar"))
    return found


def cache_folder() -> Path:
    """Where a reader keeps the shard indexes it makes: `$DROPPOS_CACHE`, else
    `$XDG_CACHE_HOME/droppos`, else `~/.cache/droppos`. Never the data folder: reading data
    writes nothing into it."""
    if os.environ.get("DROPPOS_CACHE"):
        return Path(os.environ["DROPPOS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / PACKAGE


def index_shard(path: Path, beside: bool = False) -> list[dict[str, Any]]:
    """[{key, offset, size, label, header, label_header}] of one shard (`header`: where the
    image member's tar header starts; `label_header`: the `.cls` member's, or -1), read from a
    saved index the shard bears out (`_saved_entries`: the one `write-shards` left beside it,
    else this user's cache), else by walking the tar headers once (data is skipped, not read)
    and caching that in `cache_folder()` (or beside the shard, for `write-shards`' own output:
    `beside`). A file that is not a whole tar (empty, gzip, garbage, truncated, even at a
    member's boundary) is refused in one line."""
    status = path.stat()
    if not stat.S_ISREG(status.st_mode):  # a FIFO named like a shard would hang the reader
        raise ValueError(f"{path} is not a regular file (a FIFO, a device or a socket)")
    # "This very file": its size, modification time and inode change time, in nanoseconds. A
    # copy keeps the first two when asked (`cp -p`, rsync -t), never the third.
    made_from = [status.st_size, status.st_mtime_ns, status.st_ctime_ns]
    next_to = path.with_name(path.name + INDEX_SUFFIX)
    # One cache file per user and shard: users sharing a cache folder never read each other's.
    digest = hashlib.sha1(f"{os.getuid()}:{path.resolve()}".encode()).hexdigest()[:20]
    cached = cache_folder() / "shard-index" / f"{digest}{INDEX_SUFFIX}"
    for saved, in_cache in ((next_to, False), (cached, True)):
        entries = _saved_entries(saved, path, made_from, in_cache)
        if entries is not None:
            return entries
    entries = _walk(path, status.st_size)
    content = {"shard": made_from, "entries": entries}
    target = next_to if beside else cached
    with contextlib.suppress(OSError):  # no writable cache: index again next time
        target.parent.mkdir(parents=True, exist_ok=True)
        if beside or not target.parent.is_symlink():  # droppos made `shard-index`: no link
            # write-shards' index is an output like the shards; the cache is this user's
            # alone, and one that others could write would be ignored
            write_text(target, json.dumps(content), 0o666 if beside else 0o644)
    return entries


def _saved_entries(
    index: Path, shard: Path, made_from: list[int], in_cache: bool
) -> list[dict[str, Any]] | None:
    """A saved index's entries, or None (index the shard again) unless it is a regular file no
    larger than the shard (an entry is shorter than the tar headers it stands for), made from
    this very shard, with sane entries that spot checks against the tar bear out. A cache file
    counts only if it is no link, this user owns it and no one else can write it: anyone who
    can write a shared cache folder could otherwise relabel every shard."""
    try:
        with open(os.open(index, os.O_RDONLY | (os.O_NOFOLLOW if in_cache else 0)), "rb") as file:
            status = os.fstat(file.fileno())
            if not stat.S_ISREG(status.st_mode) or status.st_size > made_from[0]:
                return None
            if in_cache and (status.st_uid != os.getuid() or status.st_mode & 0o022):
                return None
            saved = json.loads(file.read())
        entries = saved["entries"]
        if saved["shard"] == made_from and all(_sane(e, made_from[0]) for e in entries):
            return entries if _borne_out(shard, entries) else None
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return None  # unreadable or malformed: not believed, the shard is indexed again
    return None


SPOT_CHECKS = 8


def _borne_out(shard: Path, entries: list[dict[str, Any]]) -> bool:
    """Whether the tar bears out SPOT_CHECKS entries drawn at random (every entry of a small
    shard): each one's image header (name, data offset, size) and label member (name, digits)
    are read again. That is 8 x (2 header reads + 1 label read) per shard, against a walk's 2
    header reads and 1 label read per sample: an index edited by hand, or another shard's, is
    caught; a relabelled share p of a large shard escapes with probability (1 - p)^8."""
    picked = random.SystemRandom().sample(entries, min(SPOT_CHECKS, len(entries)))
    try:
        with tarfile.open(shard, "r:") as tar:
            for entry in picked:
                image = _member_at(tar, entry["header"])
                key, _, suffix = image.name.rpartition(".")
                is_image = image.isfile() and suffix.lower() in IMAGE_SUFFIXES
                found = (key, is_image, image.offset_data, image.size)
                if found != (entry["key"], True, entry["offset"], entry["size"]):
                    return False
                if entry["label_header"] >= 0:
                    label = _member_at(tar, entry["label_header"])
                    if label.name != f"{key}.cls" or _label(tar, label, shard) != entry["label"]:
                        return False
    except (tarfile.TarError, OSError, EOFError, ValueError):
        return False
    return True


def _member_at(tar: tarfile.TarFile, header: int) -> tarfile.TarInfo:
    """The member whose header starts at byte `header` (long-name and pax headers included)."""
    tar.fileobj.seek(header)  # type: ignore[union-attr]
    return tarfile.TarInfo.fromtarfile(tar)


def _walk(path: Path, shard_size: int) -> list[dict[str, Any]]:
    """Index a shard by its tar headers (data is skipped; only the labels are read). Refused in
    one line naming the member: a key used twice (one member would hide the other), a label
    that is not ASCII digits, a sample without a label among labelled ones, a label without an
    image."""
    found: dict[str, dict[str, tarfile.TarInfo]] = {"image": {}, "label": {}}
    labels: dict[str, int] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, suffix = member.name.rpartition(".")
                if suffix.lower() in IMAGE_SUFFIXES:
                    kind = "image"
                elif suffix == "cls":
                    kind = "label"
                else:
                    continue  # a member droppos does not read (.json, .txt)
                seen = found[kind].setdefault(key, member)
                if seen is not member:
                    raise ValueError(
                        f"{path}: {_placed(seen)} and {_placed(member)} are both sample {key!r} "
                        "(one would hide the other): give each sample a key of its own"
                    )
                if kind == "label":
                    labels[key] = _label(tar, member, path)
            end = tar.offset
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable tar shard ({error})") from None
    images, labelled = found["image"], found["label"]
    if shard_size < end + 2 * tarfile.BLOCKSIZE:  # no end-of-archive blocks: cut short
        raise ValueError(
            f"{path} is truncated (it ends after {len(images)} images, without the end of "
            "the archive): copy it again"
        )
    for key, member in images.items():
        if labelled and key not in labelled:
            raise ValueError(
                f"{path}: {member.name} has no label ({key}.cls) while other samples have "
                "one: label every sample or none"
            )
    for key, member in labelled.items():
        if key not in images:
            raise ValueError(
                f"{path}: {member.name} labels no image (no {key}.jpg, .png or other image "
                "droppos reads)"
            )
    return [
        {
            "key": key,
            "offset": member.offset_data,
            "size": member.size,
            "label": labels.get(key, -1),
            "header": member.offset,
            "label_header": labelled[key].offset if key in labelled else -1,
        }
        for key, member in images.items()
    ]


def _placed(member: tarfile.TarInfo) -> str:
    return f"{member.name} (byte {member.offset})"


LABEL_BYTES = 64  # a class label's digits, and room for white space around them


def _label(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> int:
    """The class index a `.cls` member holds: ASCII digits alone (int() would also take "1_0"
    as 10, and other scripts' digits), white space around them allowed."""
    text = tar.extractfile(member).read(LABEL_BYTES + 1)  # type: ignore[union-attr]
    if len(text) > LABEL_BYTES or not text.strip().isdigit():  # bytes: ASCII digits only
        shown = text[:16].decode("utf-8", "replace")
        raise ValueError(
            f"{path}: {member.name} does not hold an integer class label (ASCII digits 0-9; "
            f"it holds {shown!r}{'...' if len(text) > 16 else ''})"
        )
    return int(text)


def read_class_names(path: Path) -> list[str]:
    """classes.txt: one class name a line, UTF-8 (else one line naming the file)."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {error.start}): write one class name a line"
        ) from None


def _sane(entry: Any, shard_size: int) -> bool:
    fields = ("offset", "size", "label", "header", "label_header")
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("key"), str)
        and all(type(entry.get(k)) is int for k in fields)
        and 0 <= entry["header"] <= entry["offset"] - tarfile.BLOCKSIZE
        and entry["size"] >= 0
        and entry["offset"] + entry["size"] <= shard_size
        and entry["label"] >= -1
        and -1 <= entry["label_header"] < shard_size
        and (entry["label"] >= 0) == (entry["label_header"] >= 0)
    )


class ShardDataset(ImageSource):
    """The samples of WebDataset-style tar shards, in shard then member order, by random access.

    File handles are opened lazily per process (loader workers each get their own).
    """

    def __init__(
        self,
        shards: Sequence[str | Path],
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        decode: str = "pil",
        share: Share = alone,
    ) -> None:
        if not shards:
            raise ValueError("no tar shards found")
        self.shards = [Path(s) for s in shards]
        self.max_pixels = max_pixels
        self.decode = decode
        self.origin = " ".join(str(s.resolve()) for s in self.shards)
        # (shard number, offset, size, label, key) of every sample
        self.members: list[tuple[int, int, int, int, str]] = []
        indexes = share(lambda: [index_shard(path) for path in self.shards])
        for number, index in enumerate(indexes):
            for entry in index:
                self.members.append(
                    (number, entry["offset"], entry["size"], entry["label"], entry["key"])
                )
        if not self.members:
            raise ValueError(f"no images in the shards {self.shards[0]} ...")
        labels = [member[3] for member in self.members]
        labelled = min(labels) >= 0
        names = self.shards[0].parent / CLASSES_FILE
        self.classes = read_class_names(names) if labelled and names.is_file() else None
        check_labels(labels, self._name, self.classes)
        self.num_classes = max(labels) + 1 if labelled else 0
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.members)

    def _name(self, index: int) -> str:
        number, *_, key = self.members[index]
        return f"{self.shards[number]}:{key}"

    def all_labels(self) -> list[int]:
        return [member[3] for member in self.members]

    def _handle(self, number: int) -> Any:
        if self._pid != os.getpid():  # a forked worker: never share the parent's file offsets
            self._handles, self._pid = {}, os.getpid()
        if number not in self._handles:
            self._handles[number] = self.shards[number].open("rb")
        return self._handles[number]

    def _read(self, index: int) -> tuple[bytes, str, int]:
        number, offset, size, label, _ = self.members[index]
        handle = self._handle(number)
        handle.seek(offset)
        return handle.read(size), self._name(index), label

    def __getitem__(self, index: int) -> tuple[DecodedImage, int]:
        data, name, label = self._read(index)
        return read_image(data, name, self.max_pixels, self.decode), label

    def encoded(self, index: int) -> tuple[bytes, str, int]:
        """The member's bytes as they are, named by the format its header shows."""
        data, name, label = self._read(index)
        try:
            with open_raster(io.BytesIO(data)) as header:
                kind = header.format or ""
        except Exception as error:
            raise BadImageError(name, describe_decode_error(error)) from None
        return data, {"JPEG": "jpg", "TIFF": "tif"}.get(kind, kind.lower()), label

    def close(self) -> None:
        """Close this process's shard files (they reopen on the next read)."""
        if self._pid == os.getpid():
            for handle in self._handles.values():
                handle.close()
        self._handles = {}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files do not cross process boundaries
        return state


def write_shard(path: Path, samples: Iterable[tuple[str, bytes, str, int]]) -> None:
    """One tar of (key, file bytes, suffix, label) samples, then its index beside it."""
    with tarfile.open(path, "w") as tar:
        for key, data, suffix, label in samples:
            _add(tar, f"{key}.{suffix}", data)
            _add(tar, f"{key}.cls", str(label).encode())
    index_shard(path, beside=True)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # the same input writes the same bytes
    tar.addfile(info, io.BytesIO(data))

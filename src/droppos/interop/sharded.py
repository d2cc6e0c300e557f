"""The sharded half of an FSDP run's checkpoint: model and optimiser tensors in one folder.

Written with `torch.distributed.checkpoint` (DCP), every rank writing its own shards, and read
back either sharded (each rank its part, to resume under FSDP) or whole in one process (to
resume under one process or DDP, to evaluate, to export). Only tensors go into the folder; the
rest of the checkpoint (what was trained, where the run is, the optimiser's parameter groups)
is in the small `last.pth` beside it (`interop/schema.py`).

DCP's own reader would unpickle its `.metadata` file with plain `pickle` (and non-tensor items
without torch's weights-only restriction), open whatever file paths the metadata names and
allocate whatever shapes it declares; a checkpoint folder is data, so here the metadata is read
by an unpickler that knows
only DCP's own metadata classes and is checked before anything else is read (`read_metadata`):
tensors only, in plain files inside the folder, each declared size held by bytes on disk. Every
failure, DCP's own included, is one ValueError naming the folder.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    _EmptyStateDictLoadPlanner,
)
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

METADATA_FILE = ".metadata"
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP metadata and nothing else: any other class or function is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and (
            name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"it asks to run code while loading ({module}.{name}), which droppos never does"
        )


def read_metadata(folder: Path) -> Metadata:
    """`folder`'s `.metadata`, unpickled without running code and checked (`_fault`) before any
    tensor file is opened or any tensor allocated. ValueError, one line, naming the file."""
    path = folder / METADATA_FILE
    if path.is_symlink() or not path.is_file():
        raise ValueError(f"cannot read {path}: it is missing or a link")
    try:
        with path.open("rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        fault = _fault(metadata, folder) if isinstance(metadata, Metadata) else "not DCP metadata"
    except Exception as error:  # a refused class, a truncated or foreign file, a wrong type
        raise ValueError(f"cannot read {path}: {_why(error)}") from None
    if fault:
        raise ValueError(f"cannot read {path}: {fault} (a crafted or damaged checkpoint)")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def _fault(metadata: Metadata, folder: Path) -> str | None:
    """What in `metadata` droppos does not read, or None. Read are: tensors only, each chunk in
    a byte range of a plain file inside `folder`, ranges within their files and apart, every
    tensor's declared bytes held by its chunks' ranges (so all that a whole read allocates is
    on disk), and names nested in mappings only (for an integer, DCP builds a list that long)."""
    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        return "not DCP metadata"
    on_disk: dict[str, int] = {}
    ranges = []
    for info in storage.values():
        name = getattr(info, "relative_path", None)
        if not is_plain_name(name):
            return f"names the tensor file {name!r}; only plain file names in its folder are read"
        if name not in on_disk:
            file = folder / name
            if file.is_symlink() or not file.is_file():
                return f"names the tensor file {name}, which is missing or a link"
            on_disk[name] = file.stat().st_size
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if _numel((offset, length)) is None or offset + length > on_disk[name]:
            return f"declares bytes {offset}+{length} of {name}, which holds {on_disk[name]}"
        if getattr(info, "transform_descriptors", None):
            return f"asks for stream transforms ({info.transform_descriptors}) droppos never writes"
        ranges.append((name, offset, offset + length))
    ranges.sort()
    for (name, _, end), (other, start, _) in itertools.pairwise(ranges):
        if name == other and start < end:
            return f"declares overlapping byte ranges of {name}"
    for fqn, entry in entries.items():
        if not isinstance(entry, TensorStorageMetadata):
            return f"holds a non-tensor item ({fqn!r}); droppos writes only tensors there"
        dtype = getattr(entry.properties, "dtype", None)
        numel = _numel(entry.size)
        if not isinstance(dtype, torch.dtype) or numel is None:
            return f"declares {fqn!r} with no tensor shape or type"
        stored = 0
        for offsets in {tuple(getattr(c, "offsets", ())) for c in entry.chunks}:
            info = storage.get(MetadataIndex(str(fqn), offsets))
            stored += info.length if info is not None else 0
        if numel * dtype.itemsize > stored:
            return (
                f"declares {fqn!r} of shape {list(entry.size)} ({numel * dtype.itemsize} bytes) "
                f"but its files hold {stored} bytes of it"
            )
    paths = metadata.planner_data or {}
    if not isinstance(paths, dict) or not all(
        isinstance(p, tuple) and all(isinstance(k, str) for k in p) for p in paths.values()
    ):
        return "nests its tensors' names in lists (droppos writes only mappings)"
    return None


def is_plain_name(name: Any) -> bool:
    """A file or folder name that stays in its folder: no separator, not `.` or `..`."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def _numel(shape: Any) -> int | None:
    """The number of elements of a shape of non-negative integers (not bools), else None."""
    if isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape):
        return math.prod(shape)
    return None


def _why(error: BaseException) -> str:
    """A failure while reading the folder, in words: DCP reads each tensor with a weights-only
    `torch.load`, whose refusals all start alike whether a file asks to run code or is damaged."""
    text = str(error).strip()
    if isinstance(error, EOFError):
        return "it is truncated (an interrupted copy?)"
    if "Weights only load failed" in text or "PytorchStreamReader" in text:
        blocked = re.search(r"GLOBAL ([\w.]+)", text)
        if blocked:
            return f"a tensor file asks to run code ({blocked.group(1)}), which droppos never does"
        return "a tensor file is damaged (it does not load as a PyTorch file)"
    return text.splitlines()[0][:200] if text else type(error).__name__


class SafeReader(FileSystemReader):
    """A DCP folder reader that hands DCP the metadata `read_metadata` read and checked."""

    def __init__(self, folder: Path) -> None:
        super().__init__(str(folder))
        self.metadata = read_metadata(folder)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


@contextlib.contextmanager
def _read_in_one_line(folder: Path) -> Iterator[None]:
    """DCP hands a rank's failure back as a CheckpointException, a BaseException whose text is
    every rank's traceback: here it is the first rank's error, in one line naming the folder."""
    try:
        yield
    except (Exception, CheckpointException) as error:
        failures = list(getattr(error, "failures", {}).values())
        cause = failures[0][0] if failures else error
        raise ValueError(f"cannot read {folder}: {_why(cause)}") from None


def _refuse_bytes(planner: Any, read_item: Any, value: Any) -> None:
    raise ValueError(
        f"the sharded checkpoint holds a non-tensor item ({read_item.dest_index.fqn}); droppos "
        "writes only tensors there and never unpickles other objects"
    )


class _TensorsOnly(DefaultLoadPlanner):
    load_bytes = _refuse_bytes


class _WholeTensorsOnly(_EmptyStateDictLoadPlanner):
    load_bytes = _refuse_bytes


def is_sharded_folder(path: Path) -> bool:
    return path.is_dir() and (path / METADATA_FILE).is_file()


def temporary_name(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.tmp")


def save(state: dict[str, Any], folder: Path) -> Path:
    """Every rank's shards of `state` (tensors and DTensors only) into the new `folder`,
    atomically: they are written to a temporary sibling that the main rank renames once all
    ranks are done (DCP returns only after its metadata is written). Collective under a
    process group."""
    temporary = temporary_name(folder)
    dcp.save(state, checkpoint_id=str(temporary))
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.replace(temporary, folder)
    return folder


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def load_into(state: dict[str, Any], folder: Path) -> None:
    """Fill `state` (sharded or whole tensors, as the caller's model and optimiser hold them)
    from `folder`: under FSDP each rank reads only its own part. Collective under a group."""
    reader = SafeReader(folder)
    with _read_in_one_line(folder):
        dcp.load(state, storage_reader=reader, planner=_TensorsOnly())


def read_whole(folder: Path) -> dict[str, Any]:
    """Everything in `folder` as whole tensors on the CPU, in this process alone."""
    state: dict[str, Any] = {}
    reader = SafeReader(folder)
    # what torch's own dcp_to_torch_save does (the public `dcp.load` fills a copy of `state`)
    with _read_in_one_line(folder):
        _load_state_dict(state, storage_reader=reader, planner=_WholeTensorsOnly(), no_dist=True)
    return state

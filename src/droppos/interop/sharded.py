"""The sharded half of an FSDP run's checkpoint: model and optimiser tensors in one folder.

Written with `torch.distributed.checkpoint` (DCP), every rank writing its own shards, and read
back either sharded (each rank its part, to resume under FSDP) or whole in one process (to
resume under one process or DDP, to evaluate, to export). Only tensors go into the folder; the
rest of the checkpoint (what was trained, where the run is, the optimiser's parameter groups)
is in the small `last.pth` beside it (`interop/schema.py`).

DCP's own reader unpickles its `.metadata` file with plain `pickle` and non-tensor items with
`weights_only=False`; a checkpoint folder is data, so here the metadata is read by an
unpickler that knows only DCP's own metadata classes, and a non-tensor item is refused.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    _EmptyStateDictLoadPlanner,
)
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
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
        raise pickle.UnpicklingError(f"asks to run code while loading ({module}.{name})")


class SafeReader(FileSystemReader):
    """A DCP folder reader whose metadata cannot run code."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / METADATA_FILE
        with path.open("rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path} is not checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


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
    dcp.load(state, storage_reader=SafeReader(str(folder)), planner=_TensorsOnly())


def read_whole(folder: Path) -> dict[str, Any]:
    """Everything in `folder` as whole tensors on the CPU, in this process alone."""
    state: dict[str, Any] = {}
    # what torch's own dcp_to_torch_save does (the public `dcp.load` fills a copy of `state`)
    _load_state_dict(
        state, storage_reader=SafeReader(str(folder)), planner=_WholeTensorsOnly(), no_dist=True
    )
    return state

"""droppos's own files, typed: the one place that knows their layout, reads and writes them.

- `TrainingCheckpoint` (`last.pth`, `checkpoint-EPOCH.pth`): a run's whole state, headed by
  what was trained: a `PretrainedModel` (a registered method and its configuration) or a
  `Classifier` (a fine-tuned ViT).
- `ClassifierWeights` (`best.pth`): a fine-tuned classifier's weights and score.
- `ExportSidecar` (`config.json` beside an exported `model.safetensors`): timm's config plus
  where the weights came from.

A file is read weights-only (`load_object`: tensors, numbers, strings and containers; a file that
asks to run code is refused, saying which code) and written atomically (`save_atomic`). The
foreign layouts (the authors' files, MAE's, timm's, MMSegmentation's) are adapters elsewhere in
`interop/`; they come here for the file reading.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import time
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from droppos._version import PACKAGE, __version__
from droppos.interop import sharded
from droppos.models.encoder import EncoderConfig
from droppos.models.sizes import encoder_shape
from droppos.outputs import write_atomic, write_text

KIND_KEY = PACKAGE  # {package name: "pretrain", "finetune" or "segment"} marks our checkpoints
PRETRAIN, FINETUNE, SEGMENT = "pretrain", "finetune", "segment"


# -- reading and writing files -----------------------------------------------------------------


def save_atomic(state: Mapping[str, Any], path: str | Path) -> Path:
    """`torch.save` of `state`, written whole or not at all (`droppos/outputs.py`)."""
    return write_atomic(path, lambda stream: torch.save(dict(state), stream))


def load_object(path: str | Path, whole: bool = True) -> Mapping[str, Any]:
    """The whole object in a `.pth`/`.pt` (weights-only unpickling) or `.safetensors` file.

    The original code saves its `argparse.Namespace` under `args`; it is the one non-tensor class
    allowed, so full original checkpoints load without trusting arbitrary pickles. A sharded
    run's `last.pth` comes back as one file would (`whole`): its tensors read from the shards
    folder it names, as whole tensors, so every reader takes an FSDP run like any other.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"cannot read {path} as a checkpoint: the file is empty")
    kind = file_kind(path)
    if kind is None:
        raise ValueError(
            f"cannot read {path} as a checkpoint: it is not a PyTorch or safetensors file"
        )
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with torch.serialization.safe_globals([argparse.Namespace]):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot read {path} as a checkpoint: {why_unreadable(error)}") from None
    if not isinstance(content, Mapping):
        raise ValueError(
            f"cannot read {path} as a checkpoint: it holds a {type(content).__name__}, "
            "not a dictionary of weights"
        )
    check_tensors(content, path)
    if whole and "shards" in content:
        return with_shards(content, path)
    return content


def check_tensors(content: Any, path: Path, where: str = "") -> None:
    """Every tensor in a loaded file stores the elements it claims. A saved tensor can claim
    a shape its storage does not hold (stride 0: a 2 KB file that "holds" terabytes): any
    whole-tensor operation on it (the NaN check, a copy into a model) would allocate the claim.
    Refused, naming the entry."""
    if isinstance(content, torch.Tensor):
        if content.numel() == 0:
            return
        reach = 1 + sum(
            (size - 1) * stride for size, stride in zip(content.shape, content.stride())
        )
        stored = content.untyped_storage().nbytes() // max(1, content.element_size())
        if (
            any(stride == 0 and size > 1 for size, stride in zip(content.shape, content.stride()))
            or (content.storage_offset() + reach > stored)
            or content.numel() > stored
        ):
            raise ValueError(
                f"cannot read {path} as a checkpoint: {where or 'a tensor'} claims "
                f"{content.numel()} elements but stores {stored} (a crafted or damaged file)"
            )
    elif isinstance(content, Mapping):
        for key, value in content.items():
            check_tensors(value, path, f"{where}.{key}" if where else str(key))
    elif isinstance(content, list | tuple):
        for i, value in enumerate(content):
            check_tensors(value, path, f"{where}[{i}]")


def with_shards(content: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """A sharded checkpoint with its tensors read whole from the folder it names."""
    tensors = sharded.read_whole(shards_beside(path, content["shards"]))
    whole = {k: v for k, v in content.items() if k != "shards"}
    whole["model"] = tensors.get("model", {})
    whole["optimizer"] = {
        **dict(content.get("optimizer") or {}),
        "state": tensors.get("optimizer_state", {}),
    }
    return whole


def shards_beside(path: Path, name: Any) -> Path:
    """The folder of tensors that the sharded checkpoint `path` names: a plain folder beside it
    (not `..`, a path elsewhere or a link), or ValueError."""
    folder = path.parent / name if sharded.is_plain_name(name) else None
    if folder is None or folder.is_symlink() or not sharded.is_sharded_folder(folder):
        raise ValueError(
            f"{path} names its tensors' folder {name!r}, which is not a folder of tensors "
            "beside it (only a plain folder name, no link, is read)"
        )
    return folder


def file_kind(path: Path) -> str | None:
    """`torch` (a zip archive or a legacy pickle), `safetensors`, or None, from the first bytes."""
    with path.open("rb") as stream:
        head = stream.read(9)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":  # an 8-byte header length, then JSON
        return "safetensors"
    return None


def why_unreadable(error: BaseException) -> str:
    """A torch.load / safetensors failure in words a user can act on."""
    text = str(error).strip()
    if (
        "Unsupported global" in text
        or "WeightsUnpickler" in text
        or "unsupported GLOBAL" in text
        or "Weights only load failed" in text
    ):
        blocked = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({blocked.group(1)})" if blocked else ""
        return (
            f"it asks to run code while loading{what}, which droppos never does; "
            "save plain tensors (a state dict) or safetensors instead"
        )
    if isinstance(error, EOFError) or "Ran out of input" in text or "truncated" in text.lower():
        return "the file is truncated (an interrupted copy or save?)"
    if "invalid load key" in text or "magic number" in text or "zip archive" in text:
        return "it is not a PyTorch or safetensors file"
    if "HeaderTooLarge" in text or "safetensors" in type(error).__module__:
        return "it is not a valid safetensors file"
    first = text.splitlines()[0] if text else type(error).__name__
    return first[:200]


# -- configurations as plain dicts and back ---------------------------------------------------


def to_plain(config: Any) -> dict[str, Any]:
    """A configuration dataclass as the plain dict a checkpoint records."""
    return asdict(config)


def from_plain(cls: type, values: Mapping[str, Any], where: str = "") -> Any:
    """The dataclass `cls` from its `to_plain` form, nested configurations included; a key the
    class does not know (a file from a newer droppos) is refused, naming it."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(
            f"{where or cls.__name__}: unknown setting(s) {', '.join(unknown)} (written by a "
            "newer droppos?)"
        )
    hints = typing.get_type_hints(cls)
    return cls(**{k: _from_plain_value(hints[k], v, f"{where}.{k}") for k, v in values.items()})


def _from_plain_value(annotation: Any, value: Any, where: str) -> Any:
    if value is None:
        return None
    candidates = [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        candidates = list(typing.get_args(annotation))
    for candidate in candidates:
        if dataclasses.is_dataclass(candidate) and isinstance(value, Mapping):
            return from_plain(candidate, value, where.lstrip("."))
    if typing.get_origin(annotation) is tuple and isinstance(value, list):
        return tuple(value)
    return value


# -- what a checkpoint of ours says about itself ------------------------------------------------


@dataclass
class PretrainedModel:
    """A pre-training run's model: the method that trained it and its configuration."""

    method: str
    model_config: dict[str, Any]

    @property
    def encoder(self) -> EncoderConfig:
        return from_plain(EncoderConfig, self.model_config["encoder"], "model.encoder")

    @property
    def label(self) -> str:
        return f"{PACKAGE} pre-training checkpoint ({self.method})"

    def to_dict(self) -> dict[str, Any]:
        return {KIND_KEY: PRETRAIN, "model_config": self.model_config}

    @classmethod
    def from_dict(cls, content: Mapping[str, Any]) -> PretrainedModel:
        model_config = dict(content["model_config"])
        return cls(method=str(model_config.get("name")), model_config=model_config)


@dataclass
class Classifier:
    """A fine-tuned classifier: its encoder's shape, its head, and the data it was tuned on."""

    encoder: EncoderConfig
    global_pool: str
    num_classes: int
    classes: list[str] | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    source_checkpoint: str

    @property
    def label(self) -> str:
        return f"{PACKAGE} fine-tuned classifier"

    def to_dict(self) -> dict[str, Any]:
        return headed_by_encoder(self, FINETUNE)

    @classmethod
    def from_dict(cls, content: Mapping[str, Any]) -> Classifier:
        return from_headed(cls, content)


@dataclass
class Segmenter:
    """A backbone fine-tuned with a linear segmentation head (`droppos segment --model.freeze
    false`): its encoder's shape, the classes of its head and the view it was tuned on. Its
    weights are the timm ViT's under `vit.` and the head's under `head.`."""

    encoder: EncoderConfig
    num_classes: int
    classes: list[str] | None
    feature_blocks: int
    img_size: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    source_checkpoint: str

    @property
    def label(self) -> str:
        return f"{PACKAGE} segmentation model"

    def to_dict(self) -> dict[str, Any]:
        return headed_by_encoder(self, SEGMENT)

    @classmethod
    def from_dict(cls, content: Mapping[str, Any]) -> Segmenter:
        return from_headed(cls, content)


def headed_by_encoder(header: Any, kind: str) -> dict[str, Any]:
    """A header dataclass with an `encoder` field (a classifier, a segmenter) as the plain
    entries our files start with."""
    values = asdict(header)
    values["encoder"] = asdict(header.encoder)
    return {KIND_KEY: kind, **values}


def from_headed(cls: type, content: Mapping[str, Any]) -> Any:
    """`headed_by_encoder`'s inverse (fields a file lacks are None)."""
    values = {f.name: content.get(f.name) for f in dataclasses.fields(cls)}
    values["encoder"] = from_plain(EncoderConfig, content["encoder"], "encoder")
    return cls(**values)


Header = PretrainedModel | Classifier | Segmenter


def header_of(content: Mapping[str, Any]) -> Header | None:
    """What one of our files says it holds; None for anything else (foreign files)."""
    kind = content.get(KIND_KEY)
    if kind == PRETRAIN and isinstance(content.get("model_config"), Mapping):
        return PretrainedModel.from_dict(content)
    if kind == FINETUNE and isinstance(content.get("encoder"), Mapping):
        return Classifier.from_dict(content)
    if kind == SEGMENT and isinstance(content.get("encoder"), Mapping):
        return Segmenter.from_dict(content)
    return None


@dataclass
class Progress:
    """Where a run is: the next epoch, the next per-rank batch within it, optimiser steps taken.
    Resuming neither skips nor repeats an epoch (the original code saved `epoch + 1` and added
    one again on load)."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


PROGRESS_KEY = "progress"
OLD_PROGRESS_KEY = "position"  # what older files call it (a patch's place, everywhere else)


def progress_of(content: Mapping[str, Any]) -> Progress | None:
    """Where the run that wrote a training checkpoint stood (None for any other file), read
    under today's key or the older one."""
    values = content.get(PROGRESS_KEY, content.get(OLD_PROGRESS_KEY))
    if not isinstance(values, Mapping):
        return None
    known = {f.name: values.get(f.name, f.default) for f in dataclasses.fields(Progress)}
    if not all(isinstance(v, int) for v in known.values()):
        return None
    return Progress(**known)


@dataclass
class TrainingCheckpoint:
    """A run's whole state (`last.pth`): what is trained, weights, optimiser, where it is, how its
    global batch is split (`geometry`) and the command's whole configuration (`config`)."""

    header: Header
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    progress: Progress
    geometry: dict[str, int]
    config: dict[str, Any]
    method_state: dict[str, Any] = field(default_factory=dict)
    shards: str | None = None
    """A sharded run's (FSDP) model and optimiser tensors are in this sibling folder
    (`interop/sharded.py`); `model` is then empty and `optimizer` holds its param_groups."""
    location: Path | None = field(default=None, repr=False, compare=False)
    """Where the checkpoint was read from (its shards folder is beside it)."""

    def to_dict(self) -> dict[str, Any]:
        state = {"shards": self.shards} if self.shards else {"model": self.model}
        return {
            **self.header.to_dict(),
            **state,
            "optimizer": self.optimizer,
            "scaler": self.scaler,
            PROGRESS_KEY: asdict(self.progress),
            "geometry": self.geometry,
            "config": self.config,
            "method_state": self.method_state,
        }

    @classmethod
    def from_dict(cls, content: Mapping[str, Any], where: str) -> TrainingCheckpoint:
        header = header_of(content)
        progress = progress_of(content)
        has_weights = "model" in content or "shards" in content
        if header is None or progress is None or not has_weights:
            raise ValueError(
                f"cannot resume from {where}: not a {PACKAGE} training checkpoint (pick another "
                "--run.output_dir)"
            )
        return cls(
            header=header,
            model=dict(content.get("model") or {}),
            optimizer=dict(content.get("optimizer") or {}),
            scaler=dict(content.get("scaler") or {}),
            progress=progress,
            geometry=dict(content.get("geometry") or {}),
            config=dict(content.get("config") or {}),
            method_state=dict(content.get("method_state") or {}),
            shards=content.get("shards"),
        )

    @classmethod
    def read(cls, path: str | Path, whole: bool = True) -> TrainingCheckpoint:
        """A training checkpoint of ours from `path` (weights-only); ValueError in words.
        `whole=False` leaves a sharded run's tensors in their folder (`shards_folder`), for a
        sharded resume to read each rank's part."""
        try:
            content = load_object(path, whole=whole)
            if not whole and "shards" in content:  # checked here, before any rank reads a part
                sharded.read_metadata(shards_beside(Path(path), content["shards"]))
        except ValueError as error:  # a refused, truncated or foreign file, said in words
            raise ValueError(f"--run.resume: {error}") from None
        checkpoint = cls.from_dict(content, str(path))
        checkpoint.location = Path(path)
        return checkpoint

    @property
    def shards_folder(self) -> Path | None:
        if self.shards is None or self.location is None:
            return None
        return shards_beside(self.location, self.shards)


@dataclass
class ClassifierWeights:
    """`best.pth`: the weights of a fine-tuning run's best epoch (what export, kNN and the probes
    read), its moving average if kept, and the score that made it best."""

    header: Classifier
    model: dict[str, torch.Tensor]
    model_ema: dict[str, torch.Tensor] | None
    epoch: int
    top1: float

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.header.to_dict(),
            "model": self.model,
            "model_ema": self.model_ema,
            "epoch": self.epoch,
            "top1": self.top1,
        }


def legacy_pretraining(content: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a droppos 0.1 pre-training checkpoint (its `model_name` beside its `config`) says of
    its model, in the terms `interop/backbone.py` reads (kind, heads, image size, mean, std);
    None for any other file. Its tensors carry the rest of the shape."""
    config = content.get("config")
    if not isinstance(config, Mapping) or "model_name" not in content:
        return None
    section = config.get("model", {})
    name = str(content["model_name"])
    shape = (encoder_shape(name[name.find("vit_") :]) if "vit_" in name else None) or {}
    data = config.get("data", {})
    return {
        "kind": f"{PACKAGE} pre-training checkpoint ({name})",
        "num_heads": section.get("num_heads") or shape.get("num_heads"),
        "img_size": section.get("img_size"),
        "mean": data.get("mean"),
        "std": data.get("std"),
    }


def normalisation_of(content: Mapping[str, Any]) -> tuple[Any, Any]:
    """The mean and std one of our checkpoints records (None where it does not)."""
    header = header_of(content)
    if isinstance(header, Classifier):
        return header.mean, header.std
    data = (content.get("config") or {}).get("data") or {}
    return data.get("mean"), data.get("std")


# -- the export's config.json -------------------------------------------------------------------

SIDECAR = "config.json"


@dataclass
class ExportSidecar:
    """timm's Hugging Face-style `config.json` (what `timm.create_model("local-dir:...")` reads)
    for an exported ViT, with the provenance of its weights under the package's name."""

    architecture: str
    model_args: dict[str, Any]
    num_classes: int
    num_features: int
    global_pool: str
    input_size: list[int]
    mean: list[float]
    std: list[float]
    provenance: dict[str, Any]
    label_names: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "num_features": self.num_features,
            "global_pool": self.global_pool,
            "model_args": self.model_args,
            "pretrained_cfg": {
                "tag": PACKAGE,
                "custom_load": False,
                "input_size": self.input_size,
                "fixed_input_size": True,
                "interpolation": "bicubic",
                "crop_pct": 0.875,
                "crop_mode": "center",
                "mean": self.mean,
                "std": self.std,
                "num_classes": self.num_classes,
                "first_conv": "patch_embed.proj",
                "classifier": "head",
            },
            PACKAGE: self.provenance,
        }
        if self.label_names:
            config["label_names"] = list(self.label_names)
        return config

    def write(self, folder: str | Path) -> Path:
        return write_text(Path(folder) / SIDECAR, json.dumps(self.to_dict(), indent=2) + "\n")

    @staticmethod
    def beside(weights: Path) -> dict[str, Any] | None:
        """What the `config.json` beside an exported `model.safetensors` says of its shape,
        normalisation and classes (None when there is none)."""
        sidecar = weights.with_name(SIDECAR)
        if weights.suffix != ".safetensors" or not sidecar.is_file():
            return None
        try:
            exported = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"{sidecar} is not readable JSON ({error})") from None
        args = exported.get("model_args", {}) if isinstance(exported, dict) else None
        cfg = exported.get("pretrained_cfg", {}) if isinstance(exported, dict) else None
        if not isinstance(args, dict) or not isinstance(cfg, dict):
            raise ValueError(f"{sidecar} is not the config.json of a droppos export")
        return {
            "num_heads": args.get("num_heads"),
            "img_size": args.get("img_size"),
            "mean": cfg.get("mean"),
            "std": cfg.get("std"),
            "classes": exported.get("label_names"),
        }


def provenance(path: Path, kind: str, **versions: str) -> dict[str, Any]:
    """Where exported weights came from, exactly, and what made the files."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return {
        "source_checkpoint": str(path.resolve()),
        "source_sha256": digest.hexdigest(),
        "source_kind": kind,
        f"{PACKAGE}_version": __version__,
        **{f"{name}_version": value for name, value in versions.items()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

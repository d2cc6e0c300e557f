"""`droppos export`: a checkpoint for the frameworks people transfer with, no conversion script.

One export writes, into one folder:

- `model.safetensors` + `config.json`: a timm `VisionTransformer` state dict and timm's own
  Hugging Face-style config (architecture, `model_args`, `pretrained_cfg` with the input size
  and normalisation), plus a provenance block (`interop/schema.py:ExportSidecar`). Loads with
  `timm.create_model("local-dir:FOLDER", pretrained=True)` or, naming the file,
  `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...), **model_args)`
  (no missing keys but the classifier head).
- `mae_format.pth`: `{"model": state dict}` with timm/MAE names, the file MAE releases: what
  Detectron2's ViTDet (`train.init_checkpoint`) and MAE/BEiT-style code load.
- `mmseg_mae.pth`: the same weights under MMSegmentation's `MAE` backbone names (what its
  `beit2mmseg.py` converter would write), for `model.pretrained` in its MAE configs.
- `hf/`: the encoder (or a `[CLS]` classifier) as a Hugging Face ViT folder.

Before anything is written, each file's keys are checked against the ones its client's model
holds (`check_layouts`): a file that would load only in part fails the export in one line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file

from droppos.data.transforms import default_mean_std
from droppos.interop.backbone import (
    Backbone,
    build_vit,
    describe_mismatch,
    key_differences,
    load_backbone,
)
from droppos.interop.formats import (
    hf_vit_config,
    hf_vit_keys,
    hf_vit_state,
    mae_keys,
    mae_state,
    mmseg_mae_keys,
    mmseg_state,
)
from droppos.interop.schema import SIDECAR, ExportSidecar, provenance, save_atomic
from droppos.models.encoder import EncoderConfig, pair
from droppos.models.sizes import ENCODER_SIZES
from droppos.outputs import replaced, write_text
from droppos.sections import DEFAULT_CHECKPOINT, CheckpointSection, OutputSection, Sections

WEIGHTS, MAE_FORMAT, MMSEG_FORMAT = "model.safetensors", "mae_format.pth", "mmseg_mae.pth"
HF_FOLDER = "hf"  # the Hugging Face folder: its own config.json and model.safetensors
DEFAULT_VIT = "vit_base_patch16_224"


@dataclass
class ExportModelSection(CheckpointSection):
    """The checkpoint exported, and what its file may not say."""

    checkpoint: str = DEFAULT_CHECKPOINT
    """A droppos pre-training or fine-tuning checkpoint, an original DropPos/MAE checkpoint, or
    an exported model.safetensors."""
    timm_name: str | None = None
    """timm architecture recorded in config.json; null = vit_{size}_patch{p}_224 by width."""
    num_heads: int | None = None
    """Attention heads, for files that do not say (non-standard widths)."""

    def validate(self) -> None:
        if self.checkpoint == "random":
            raise ValueError("export needs a checkpoint file, not `random`")


@dataclass
class ExportConfig(Sections):
    """Export a checkpoint's encoder (or fine-tuned classifier) for timm, Detectron2, MMSeg and
    Hugging Face."""

    model: ExportModelSection = field(default_factory=ExportModelSection)
    run: OutputSection = field(
        default_factory=lambda: OutputSection(output_dir="runs/export")
    )  # fmt: skip


@dataclass
class ExportedFiles:
    folder: Path
    weights: Path
    config: Path
    mae_format: Path
    mmseg_format: Path
    timm_name: str
    model_args: dict[str, Any]
    num_classes: int = 0
    hf_classifier: bool = False


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    timm_name: str | None = None,
    num_heads: int | None = None,
) -> ExportedFiles:
    """Write the export of `checkpoint` into `output` (created if needed).

    A pre-training checkpoint exports its encoder (no head); a fine-tuned one its classifier
    (average pool, `fc_norm`, `head`). ValueError/FileNotFoundError for a user mistake.
    """
    ExportConfig(
        ExportModelSection(str(checkpoint), timm_name, num_heads), OutputSection(str(output))
    ).validate()
    held = [
        name
        for name in (WEIGHTS, SIDECAR, MAE_FORMAT, MMSEG_FORMAT, HF_FOLDER)
        if os.path.lexists(Path(output) / name)  # a dangling link is held too
    ]
    if held:
        raise ValueError(
            f"--run.output_dir {output} already holds an export ({', '.join(held)}): choose "
            "another folder, or remove those files first"
        )
    backbone = load_backbone(checkpoint, num_heads)
    name = timm_name or timm_architecture(backbone.encoder)
    if not (name.startswith("vit_") and timm.is_model(name)):
        raise ValueError(
            f"--model.timm_name {name!r} is not a timm VisionTransformer (try {DEFAULT_VIT})"
        )
    model = build_vit(
        backbone,
        num_classes=backbone.num_classes,
        global_pool=backbone.global_pool,
        fc_norm=backbone.has_fc_norm,
    )
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    args = model_args(backbone)
    hf_classifier = is_hf_classifier(backbone)
    mae, mmseg = mae_state(state), mmseg_state(state)
    hf = hf_vit_state(state, hf_classifier)
    check_layouts(name, args, state, mae, mmseg, hf, hf_classifier)  # before anything is written
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    files = ExportedFiles(
        folder=folder,
        weights=folder / WEIGHTS,
        config=folder / SIDECAR,
        mae_format=folder / MAE_FORMAT,
        mmseg_format=folder / MMSEG_FORMAT,
        timm_name=name,
        model_args=args,
        num_classes=backbone.num_classes,
        hf_classifier=hf_classifier,
    )
    save_safetensors(state, files.weights)
    source = provenance(
        Path(checkpoint), backbone.kind, timm=timm.__version__, torch=torch.__version__
    )
    sidecar(backbone, name, source).write(folder)
    save_atomic(mae, files.mae_format)
    save_atomic(mmseg, files.mmseg_format)
    write_hf_folder(folder / HF_FOLDER, hf, args, backbone if hf_classifier else None)
    return files


def is_hf_classifier(backbone: Backbone) -> bool:
    """Whether the Hugging Face folder holds the classifier: a fine-tuned one pooling `[CLS]`
    (`--model.global_pool token`) is a `ViTForImageClassification`, whose head reads the same
    token through the same final norm; anything else is a `ViTModel` of the encoder
    (droppos's default head pools the mean patch token through `fc_norm`, which transformers'
    ViT classifier cannot express)."""
    classifier = backbone.num_classes > 0 and backbone.global_pool == "token"
    return classifier and not backbone.has_fc_norm


def write_hf_folder(
    folder: Path, hf: dict[str, torch.Tensor], args: dict[str, Any], classifier: Backbone | None
) -> None:
    """A folder `transformers` loads offline (it is not needed to write it): `hf_vit_state`'s
    tensors and the config of a ViTModel, or of a ViTForImageClassification over the classes
    of `classifier`."""
    labels = None
    if classifier is not None:
        labels = classifier.classes or [f"class_{i}" for i in range(classifier.num_classes)]
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(hf, folder / WEIGHTS)
    write_text(folder / SIDECAR, json.dumps(hf_vit_config(args, labels), indent=2) + "\n")


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file written as every droppos output is (`droppos/outputs.py`)."""
    with replaced(path) as temporary:
        save_file(state, str(temporary), metadata={"format": "pt"})


def check_layouts(
    name: str,
    args: dict[str, Any],
    state: dict[str, torch.Tensor],
    mae: dict[str, Any],
    mmseg: dict[str, torch.Tensor],
    hf: dict[str, torch.Tensor],
    hf_classifier: bool,
) -> None:
    """Every file's tensors against the ones its client's model holds: ValueError, one line,
    for a missing or unexpected key (or, for timm, a shape).

    timm's is the real model (`timm.create_model(name, **args)`, built on the meta device: no
    memory, nothing computed); the others are written from the clients' definitions
    (`formats.py`), as none of them is a dependency of droppos; tests load each file into the
    real client.
    """
    plain = f"choose a --model.timm_name of the same design, a plain ViT such as {DEFAULT_VIT}"
    try:
        with torch.device("meta"):
            own = timm.create_model(name, pretrained=False, **args).state_dict()
    except (TypeError, ValueError, AssertionError, RuntimeError) as error:  # timm's own refusals
        said = str(error).strip().splitlines()[:1] or [type(error).__name__]
        raise ValueError(f"timm cannot build {name} of this shape ({said[0]}): {plain}") from None
    check_keys(WEIGHTS, f"timm's {name}", own, state, plain)
    ours = "droppos writes a layout its client does not hold: please report this"
    check_keys(MAE_FORMAT, "MAE's ViT", mae_keys(args), mae["model"], ours)
    check_keys(MMSEG_FORMAT, "MMSegmentation's MAE backbone", mmseg_mae_keys(args), mmseg, ours)
    hf_class = "ViTForImageClassification" if hf_classifier else "ViTModel"
    check_keys(f"{HF_FOLDER}/{WEIGHTS}", hf_class, hf_vit_keys(args, hf_classifier), hf, ours)


def check_keys(
    file: str,
    client: str,
    expected: dict[str, torch.Tensor] | set[str],
    written: dict[str, torch.Tensor],
    remedy: str,
) -> None:
    missing, unexpected, mismatched = key_differences(expected, written)
    if missing or unexpected or mismatched:
        lead = f"{file} would not load fully into {client} ({remedy})"
        raise ValueError(describe_mismatch(missing, unexpected, mismatched, lead))


def timm_architecture(encoder: EncoderConfig) -> str:
    """The registered timm ViT closest to this shape (`model_args` carry the exact shape)."""
    size = min(ENCODER_SIZES, key=lambda s: abs(ENCODER_SIZES[s]["embed_dim"] - encoder.embed_dim))
    height, width = pair(encoder.img_size)
    exact = f"vit_{size}_patch{encoder.patch_size}_{height}"
    if height == width and timm.is_model(exact):
        return exact
    return "vit_huge_patch14_224" if size == "huge" else f"vit_{size}_patch16_224"


def model_args(backbone: Backbone) -> dict[str, Any]:
    """Keyword arguments that make any timm `vit_*` entry point this exact model."""
    enc = backbone.encoder
    return {
        "img_size": list(pair(enc.img_size)),
        "patch_size": enc.patch_size,
        "in_chans": enc.in_chans,
        "embed_dim": enc.embed_dim,
        "depth": enc.depth,
        "num_heads": enc.num_heads,
        "mlp_ratio": enc.mlp_ratio,
        "global_pool": backbone.global_pool,
        "fc_norm": backbone.has_fc_norm,
        "num_classes": backbone.num_classes,
    }


def sidecar(backbone: Backbone, name: str, source: dict[str, Any]) -> ExportSidecar:
    """The config.json of an export of `backbone` as timm architecture `name`."""
    enc = backbone.encoder
    default_mean, default_std = default_mean_std(enc.in_chans)
    classes = backbone.classes
    return ExportSidecar(
        architecture=name,
        model_args=model_args(backbone),
        num_classes=backbone.num_classes,
        num_features=enc.embed_dim,
        global_pool=backbone.global_pool,
        input_size=[enc.in_chans, *pair(enc.img_size)],
        mean=list(backbone.mean or default_mean),
        std=list(backbone.std or default_std),
        provenance=source,
        label_names=list(classes) if classes and len(classes) == backbone.num_classes else None,
    )


def run(config: ExportConfig) -> str:
    """The command: export, and say what was written and how to load it."""
    config.validate()
    model = config.model
    files = export_checkpoint(
        model.checkpoint, config.run.output_dir, model.timm_name, model.num_heads
    )
    hf_class = "ViTForImageClassification" if files.hf_classifier else "ViTModel"
    hf_note = ""
    if files.num_classes and not files.hf_classifier:
        hf_note = (
            f"\nnote: {HF_FOLDER}/ holds the encoder only: this classifier pools the mean patch "
            "token, which transformers' ViT classifier cannot (fine-tune with --model.global_pool "
            "token for a ViTForImageClassification)"
        )
    return (
        f"exported {model.checkpoint} to {files.folder}: {files.weights.name} + "
        f"{files.config.name} (timm {files.timm_name}), {files.mae_format.name} (Detectron2 "
        f"ViTDet / MAE), {files.mmseg_format.name} (MMSegmentation MAE), {HF_FOLDER}/ "
        f"(Hugging Face {hf_class})\n"
        f'load: timm.create_model("local-dir:{files.folder}", pretrained=True, num_classes=...)'
        f' or transformers.{hf_class}.from_pretrained("{files.folder / HF_FOLDER}")' + hf_note
    )

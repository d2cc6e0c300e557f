"""`mmseg_mae.pth` loaded by MMSegmentation itself (the `mmseg` extra): its `MAE` backbone, built
as its MAE UperNet configs build it, initialised through its own `init_weights`, gives the same
last-block patch tokens as droppos's timm ViT."""

import importlib
import sys
import types

import pytest
import torch

from droppos import create_model
from droppos.cli.main import main
from droppos.interop.backbone import build_vit, load_backbone
from droppos.interop.formats import MMSEG_MAE_OWN, mmseg_mae_keys

pytest.importorskip("mmseg")


def mmseg_mae_class() -> type:
    """MMSegmentation's `MAE` backbone class.

    `mmcv-lite` ships no compiled ops, and the `MAE` backbone uses none; but importing
    `mmseg.models` imports every model, and some name `mmcv.ops` at import time. Where the real
    `mmcv.ops` cannot load, a stand-in module whose every op refuses to run lets the import
    through (a refusing op would fail loudly if the backbone ever touched one).
    """
    try:
        importlib.import_module("mmcv.ops")
    except ImportError:
        sys.modules["mmcv.ops"] = stand_in_ops()
    return importlib.import_module("mmseg.models.backbones").MAE


def stand_in_ops() -> types.ModuleType:
    ops = types.ModuleType("mmcv.ops")

    def op(name: str) -> type:
        if name.startswith("_"):
            raise AttributeError(name)

        def refuse(*args, **kwargs):
            raise RuntimeError(f"mmcv.ops.{name} needs mmcv's compiled ops (not in mmcv-lite)")

        return type(name, (), {"__init__": refuse, "__call__": refuse})

    ops.__getattr__ = op  # module-level __getattr__ (PEP 562): any op name resolves
    return ops


def test_mmsegmentation_loads_the_export_completely_and_computes_the_same_tokens(tmp_path):
    # A ViT-S-wide encoder (384, 6 heads), two blocks, 64x64 input; every bias and norm drawn
    # away from its init: a zero bias that MMSegmentation dropped would look the same.
    source = create_model("droppos_vit_small_patch16", img_size=64, depth=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, value in source.named_parameters():
            if name.endswith("bias") or ".norm" in name or name == "cls_token":
                value.copy_(torch.randn(value.shape, generator=generator))
    checkpoint = tmp_path / "checkpoint-799.pth"
    torch.save({"model": source.state_dict()}, checkpoint)
    args = ["export", "--model.checkpoint", str(checkpoint), "--run.output_dir", str(tmp_path)]
    assert main(args) == 0
    exported = torch.load(tmp_path / "mmseg_mae.pth", weights_only=True)

    # As configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py builds it (its base,
    # _base_/models/upernet_mae.py, sets the LayerNorm eps), at this shape.
    backbone = mmseg_mae_class()(
        img_size=(64, 64),
        patch_size=16,
        embed_dims=384,
        num_layers=2,
        num_heads=6,
        mlp_ratio=4,
        init_values=1.0,
        norm_cfg=dict(type="LN", eps=1e-6),
        out_indices=[1],
        init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "mmseg_mae.pth")),
    )
    loads = []  # MMSegmentation loads non-strictly and discards the report: keep it here
    load_state_dict = backbone.load_state_dict
    backbone.load_state_dict = lambda state, strict=True: loads.append(
        load_state_dict(state, strict)
    )
    backbone.init_weights()
    (report,) = loads
    assert report.unexpected_keys == []  # every exported tensor is consumed ...
    own = {f"layers.{i}.{name}" for i in range(2) for name in MMSEG_MAE_OWN}
    assert set(report.missing_keys) == own  # ... and only what it sets itself is not there
    theirs = backbone.state_dict()
    # what export checks mmseg_mae.pth against is what this backbone holds
    assert set(theirs) == mmseg_mae_keys({"depth": 2}) | own
    for name, value in exported.items():
        assert torch.equal(theirs[name], value), name

    images = torch.randn(2, 3, 64, 64, generator=generator)
    reference = build_vit(load_backbone(checkpoint)).eval()
    backbone.eval()  # (its `train` returns None, so not chained)
    with torch.no_grad():
        (tokens,) = backbone(images)  # the last block's patch tokens, (N, D, h, w)
        (expected,) = reference.forward_intermediates(
            images, indices=1, norm=False, intermediates_only=True
        )
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-5)

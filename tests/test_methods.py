"""A pre-training method is its module and one registration: a toy method, defined here and
registered for these tests only, pre-trains, resumes exactly, exports and is probed through the
command line with no line of droppos naming it."""

from __future__ import annotations

import inspect
import json
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from droppos.cli.main import main
from droppos.engine.loop import TrainLoop
from droppos.interop.schema import load_object
from droppos.methods import (
    PretrainingMethod,
    create_model,
    method_names,
    pretrained_model,
    register_method,
    unregister_method,
)
from droppos.methods.base import PretrainBatch, StepResult
from droppos.models.encoder import EncoderConfig, ViTEncoder
from droppos.objective.losses import patchify
from droppos.objective.masking import gather_tokens, random_patch_mask
from tests.helpers import progress_of


@dataclass
class PatchMeanConfig:
    """Predict the mean brightness of each visible patch (a pretext of no use but testing)."""

    name: Literal["patch-mean"] = "patch-mean"
    """The pre-training method."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The ViT being pre-trained."""
    keep_ratio: float = 0.5
    """Fraction of the patches the encoder sees."""


class PatchMeanModel(ViTEncoder):
    def __init__(self, config: PatchMeanConfig) -> None:
        super().__init__(config.encoder)
        self.config = config
        self.head = nn.Linear(config.encoder.embed_dim, 1)

    def forward(self, images: torch.Tensor, patch_noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """-> (summed squared error, number of patches scored)."""
        keep = max(1, int(self.num_patches * self.config.keep_ratio))
        mask = random_patch_mask(patch_noise, keep)
        tokens = gather_tokens(self.embed_patches(images) + self.pos_embed[:, 1:], mask.ids_keep)
        predicted = self.head(self.run_blocks(tokens)[:, 1:])[..., 0]
        means = patchify(images, self.encoder_config.patch_size).mean(dim=-1)
        target = torch.gather(means, 1, mask.ids_keep)
        count = torch.full((), float(target.numel()), device=images.device)
        return (predicted.float() - target).square().sum(), count


class PatchMean(PretrainingMethod):
    """All a method declares: its name, configuration, model, demo, noise, and its step."""

    name = "patch-mean"
    Config = PatchMeanConfig
    Model = PatchMeanModel

    @classmethod
    def demo_config(cls) -> PatchMeanConfig:
        return PatchMeanConfig(encoder=EncoderConfig(28, 7, 1, 32, 1, 2))

    @classmethod
    def noise_lengths(cls, config: PatchMeanConfig) -> tuple[int, ...]:
        return (config.encoder.num_patches,)

    def ahead(
        self, engine_model: nn.Module, batch: PretrainBatch
    ) -> tuple[None, dict[str, torch.Tensor]]:
        cfg = self.config.model
        keep = max(1, int(cfg.encoder.num_patches * cfg.keep_ratio))
        count = float(len(batch.images) * keep)
        return None, {"patches": torch.tensor(count, device=self.device)}

    def forward(self, engine_model: nn.Module, batch: PretrainBatch, cache: None) -> StepResult:
        error, count = engine_model(batch.images, *batch.noise)
        return StepResult(
            normalisers={"patches": count},
            share=lambda total: error / total["patches"],
            metrics={"patch_mse": (error.detach(), count)},
        )


@pytest.fixture
def toy_method():
    register_method(PatchMean)
    try:
        yield PatchMean
    finally:
        unregister_method(PatchMean.name)
    assert PatchMean.name not in method_names()


def toy_args(output_dir, source, *extra):
    return [
        "pretrain", "--model.name", "patch-mean", "--model.keep_ratio", "0.75",
        "--model.encoder.img_size", "16", "--model.encoder.patch_size", "4",
        "--model.encoder.in_chans", "3", "--model.encoder.embed_dim", "32",
        "--model.encoder.depth", "1", "--model.encoder.num_heads", "2",
        "--data.source", str(source), "--data.num_workers", "0",
        "--optim.batch_size", "4", "--optim.epochs", "2", "--optim.warmup_epochs", "1",
        "--run.output_dir", str(output_dir), "--run.progress", "false",
        "--run.precision", "fp32", "--run.tensorboard", "false", *extra,
    ]  # fmt: skip


def test_a_registered_method_pretrains_resumes_exports_and_is_probed(
    tmp_path, image_folder, toy_method, monkeypatch, capsys
):
    straight = tmp_path / "straight"
    assert main(toy_args(straight, image_folder)) == 0
    assert "pre-training patch-mean" in capsys.readouterr().out
    saved = load_object(straight / "last.pth")
    assert saved["model_config"]["name"] == "patch-mean"
    assert saved["model_config"]["keep_ratio"] == 0.75  # its own option reached the model
    epochs = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1, 2]
    assert all(r["patch_mse"] > 0 for r in epochs if r["kind"] == "epoch")

    # resume: crash right after the first epoch's checkpoint, run again, same weights exactly
    interrupted = tmp_path / "interrupted"
    original = TrainLoop.save

    def save_then_crash(loop, *args, **kwargs):
        original(loop, *args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(TrainLoop, "save", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            main(toy_args(interrupted, image_folder))
    assert progress_of(interrupted / "last.pth").epoch == 1
    assert main(toy_args(interrupted, image_folder)) == 0
    resumed = load_object(interrupted / "last.pth")["model"]
    for name, value in saved["model"].items():
        assert torch.equal(value, resumed[name]), name

    # the checkpoint rebuilds its whole model (the toy head included) through the registry
    header, model = pretrained_model(straight / "last.pth")
    assert header.method == "patch-mean" and isinstance(model, PatchMeanModel)
    assert torch.equal(model.head.weight, saved["model"]["head.weight"])

    # export: a timm ViT with the encoder's weights, the toy head left behind
    exported = tmp_path / "export"
    args = [
        "export",
        "--model.checkpoint",
        str(straight / "last.pth"),
        "--run.output_dir",
        str(exported),
    ]
    assert main(args) == 0
    config = json.loads((exported / "config.json").read_text())
    vit = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    weights = load_file(str(exported / "model.safetensors"))
    vit.load_state_dict(weights)
    assert not any(k.startswith("head.") and v.numel() for k, v in weights.items())
    torch.testing.assert_close(weights["blocks.0.attn.qkv.weight"], model.blocks[0].attn.qkv.weight)

    # the position probe reads it like any backbone
    probe = tmp_path / "probe"
    args = ["probe-position", "--model.checkpoint", str(straight / "last.pth")]
    args += ["--data.source", str(image_folder), "--probe.epochs", "2", "--probe.seeds", "1"]
    args += ["--run.output_dir", str(probe), "--data.num_workers", "0", "--run.progress", "false"]
    assert main(args) == 0
    results = json.loads((probe / "results.json").read_text())
    assert results["checkpoint_kind"] == "droppos pre-training checkpoint (patch-mean)"
    assert 0 <= results["top1"] <= 100 and results["val_patches"] == 8 * 12


def test_the_base_a_method_subclasses_declares_and_conducts_nothing():
    """Moving batches, decoding, monitors, pictures and the console line are the run's
    (`methods/pretrain.py:PretrainStep`), not something a method author inherits."""
    declared = {*vars(PretrainingMethod), *PretrainingMethod.__annotations__}
    members = {name for name in declared if not name.startswith("_")}
    assert members == {
        "name", "Config", "Model", "position_accuracy_of", "demo_config", "build_model",
        "noise_lengths", "config_from_options", "config_from_plain", "model_from_checkpoint",
        "jigsaw", "draws_jigsaw", "start_epoch", "ahead", "forward", "epoch_metrics", "describe",
    }  # fmt: skip
    assert "torch.cuda" not in inspect.getsource(sys.modules[PretrainingMethod.__module__])


def test_accumulation_runs_the_toy_methods_no_grad_pass(tmp_path, image_folder, toy_method):
    out = tmp_path / "accumulated"
    assert main(toy_args(out, image_folder, "--optim.accum_steps", "2", "--optim.epochs", "1")) == 0
    assert progress_of(out / "last.pth").step == 3  # 24 images, 2 x 4 a step


def test_create_model_builds_a_registered_method_by_name(toy_method):
    model = create_model("patch-mean_vit_tiny_patch16", img_size=32, depth=1, keep_ratio=0.25)
    assert isinstance(model, PatchMeanModel) and model.config.keep_ratio == 0.25
    with pytest.raises(ValueError, match="does not take option"):
        create_model("patch-mean_vit_tiny_patch16", position_drop_ratio=0.5)


def test_an_unknown_method_is_one_line_naming_the_known_ones(capsys):
    assert main(["pretrain", "--model.name", "patch-mean"]) == 2
    err = capsys.readouterr().err.strip()
    assert "droppos, mae" in err and len(err.splitlines()) == 1


def test_a_method_whose_config_does_not_name_it_is_refused():
    class Misnamed(PatchMean):
        name = "other"

    with pytest.raises(TypeError, match="name"):
        register_method(Misnamed)

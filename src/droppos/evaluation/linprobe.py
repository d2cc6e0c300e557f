"""Linear probing (the MAE protocol) on cached frozen features.

The probe is BatchNorm without affine parameters followed by a Linear layer: the normalisation
puts every backbone's features on one scale, so one learning-rate range fits all. Trained with
LARS (or SGD), warmup then half-cosine, no weight decay. Because the features are extracted
once, every learning rate of the sweep trains side by side on the same mini-batches: the cost
of a sweep is one feature pass plus a few tiny matrix products.

Departure from MAE, stated: the cached features come from the evaluation view (centre crop),
so the probes train without MAE's RandomResizedCrop/flip augmentation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.optim import Lars
from torch import nn
from tqdm import tqdm

from droppos.engine.optim import lr_at_step
from droppos.evaluation.datasets import EvaluationConfig
from droppos.evaluation.features import (
    FeatureBackboneSection,
    FrozenFeatures,
    evaluate_frozen_features,
)
from droppos.evaluation.metrics import as_percent, topk_correct
from droppos.sections import RunSection


@dataclass
class ProbeSection:
    """The linear probe (MAE protocol): BatchNorm without affine + Linear, LARS, cosine."""

    optimizer: Literal["lars", "sgd"] = "lars"
    """LARS (the MAE linear probe) or plain SGD with momentum."""
    base_lrs: list[float] = field(default_factory=lambda: [3.0, 10.0, 30.0, 100.0])
    """Every base lr is trained side by side on the same cached features (lr = base_lr x batch
    / 256); the best is reported, together with all of them."""
    epochs: int = 90
    """Passes over the cached training features."""
    warmup_epochs: float = 10.0
    """Epochs of linear lr warmup before the cosine."""
    batch_size: int = 256
    """Features per probe step."""
    weight_decay: float = 0.0
    """Weight decay of the probe."""
    momentum: float = 0.9
    """Momentum of LARS/SGD."""

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("--probe.epochs and --probe.batch_size must be >= 1")
        if not self.base_lrs or min(self.base_lrs) <= 0:
            raise ValueError(f"--probe.base_lrs needs positive learning rates, got {self.base_lrs}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                f"--probe.warmup_epochs must be in [0, epochs], got {self.warmup_epochs}"
            )


@dataclass
class LinprobeConfig(EvaluationConfig):
    """Linear probe on frozen features."""

    model: FeatureBackboneSection = field(default_factory=FeatureBackboneSection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    run: RunSection = field(default_factory=lambda: RunSection(output_dir="runs/linprobe"))


class LinearProbe(nn.Sequential):
    """features [N, D] -> logits [N, C] through BatchNorm1d(affine=False) and Linear."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        trunc_normal_(self[1].weight, std=0.01)  # MAE's probe init
        nn.init.zeros_(self[1].bias)


def probe_optimizer(
    probes: list[LinearProbe], lrs: list[float], section: ProbeSection
) -> torch.optim.Optimizer:
    """One optimizer, two groups per probe (each with its own peak lr in `peak_lr`).

    LARS adapts only the weight matrix; biases take plain momentum SGD without decay (as
    MAE's LARS excludes 1-D parameters).
    """
    groups: list[dict[str, Any]] = []
    for probe, lr in zip(probes, lrs):
        linear = probe[1]
        weight_group = {"params": [linear.weight], "weight_decay": section.weight_decay}
        bias_group = {"params": [linear.bias], "weight_decay": 0.0}
        if section.optimizer == "lars":
            weight_group["always_adapt"], bias_group["always_adapt"] = True, False
        for group in (weight_group, bias_group):
            groups.append({**group, "lr": lr, "peak_lr": lr})
    if section.optimizer == "lars":
        return Lars(groups, lr=lrs[0], momentum=section.momentum, trust_coeff=0.001)
    return torch.optim.SGD(groups, lr=lrs[0], momentum=section.momentum)


def train_probes(
    features: FrozenFeatures, section: ProbeSection, seed: int = 0, progress: bool = False
) -> list[dict[str, float]]:
    """Train one probe per base lr on the cached train features; score them on val."""
    train_x, train_y = features.train_features, features.train_labels
    device, count = train_x.device, len(train_y)
    lrs = [base * section.batch_size / 256 for base in section.base_lrs]
    generator = torch.Generator().manual_seed(seed)
    probes = []
    for _ in lrs:  # all from the same init: a probe's result does not depend on the others
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            probes.append(LinearProbe(train_x.shape[1], features.num_classes).to(device))
    optimizer = probe_optimizer(probes, lrs, section)
    batch = min(section.batch_size, count)
    steps_per_epoch = count // batch  # drop the ragged last batch: BatchNorm needs company
    total = section.epochs * steps_per_epoch
    warmup = round(section.warmup_epochs * steps_per_epoch)
    step = 0
    for _ in tqdm(range(section.epochs), desc="linear probes", disable=not progress, leave=False):
        for probe in probes:
            probe.train()
        order = torch.randperm(count, generator=generator).to(device)
        for i in range(steps_per_epoch):
            index = order[i * batch : (i + 1) * batch]
            x, y = train_x[index], train_y[index]
            for group in optimizer.param_groups:
                group["lr"] = lr_at_step(step, total, warmup, group["peak_lr"])
            # Probes are independent, so the summed loss gives each one its own gradient.
            loss = sum(F.cross_entropy(probe(x), y) for probe in probes)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    results = []
    with torch.inference_mode():
        for probe, base_lr, lr in zip(probes, section.base_lrs, lrs):
            probe.eval()
            scores = probe(features.val_features)
            accuracy = as_percent(topk_correct(scores, features.val_labels), len(scores))
            results.append({"base_lr": base_lr, "lr": lr, **accuracy})
    return results


def score_features(
    config: LinprobeConfig, features: FrozenFeatures, progress: bool = False
) -> dict[str, Any]:
    """The sweep on features already extracted: what `results.json` records.

    The best learning rate is picked on the val split, as MAE's sweeps do; all are reported.
    """
    started = time.perf_counter()
    probes = train_probes(features, config.probe, config.run.seed, progress)
    best = max(probes, key=lambda r: (r["top1"], r["top5"]))
    return {
        "top1": best["top1"],
        "top5": best["top5"],
        "best_base_lr": best["base_lr"],
        "probes": probes,
        "feature": config.model.feature,
        "optimizer": config.probe.optimizer,
        "epochs": config.probe.epochs,
        **features.summary(),
        "probe_seconds": round(time.perf_counter() - started, 2),
    }


def run(config: LinprobeConfig) -> str | None:
    """`droppos linprobe`: extract both splits' features once, sweep, write results.json."""
    done = evaluate_frozen_features(config, "linprobe", partial(score_features, config))
    if done is None:
        return None
    features, results, path = done
    sweep = ", ".join(f"{r['base_lr']:g}: {r['top1']:.2f}" for r in results["probes"])
    return (
        f"linear probe on {config.model.feature} features of {features.backbone.source}: "
        f"top-1 {results['top1']:.2f}, top-5 {results['top5']:.2f} at base lr "
        f"{results['best_base_lr']:g} (sweep {sweep}); {path}"
    )

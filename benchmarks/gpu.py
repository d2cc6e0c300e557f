"""GPU speed in one command that fits a lent GPU session: what one GPU does with droppos, and
how far from its peak.

Rows run cheapest and most decisive first, each under a budget of work (`--budget-s`, default
420 s): a row that would start past it is skipped and recorded as skipped. `--parts` picks the
parts. The JSON is rewritten after every row and on any exit (SIGTERM included), so a run that
is killed still returns what it measured.

facts     versions, the GPU by its exact name and its datasheet bf16 peak, the attention kernel
          the profiler sees, the dense bf16 matmul peak measured here.
steps     training steps of the real loop (`TrainLoop.accumulate` + `optimizer_step`: global
          normalisers, autocast, clipping, fused AdamW) at ViT-B/16 224, bf16, inputs already on
          the GPU. First DropPos compiled at micro-batch 256, DropPos and a supervised timm ViT-B
          eager at 256; last (expensive: a compile each) DropPos at 512, the preset's 64 x 8,
          the attentive variants, MAE and timm compiled. Each row: img/s, ms/step, FLOPs per
          step (FlopCounterMode on one eager step, attentive pass included), MFU against the
          measured and the datasheet peak, peak memory of the compiled step.
sync      20 steps of the real loop on loader batches (tensor and device decode, with and
          without accumulation) under `torch.cuda.set_sync_debug_mode("error")`, and the
          milliseconds per batch the host spends in `to_device` (blocked in nvJPEG's own
          synchronisation on the device path, which the debug mode does not see).
loader    the loader's img/s on every decode path, with 8 and with all CPU cores, on synthetic
          500 x 375 JPEGs made by a process pool (and the edge-case files: CMYK, greyscale,
          progressive, PNG named .JPEG, truncated), read through a file list that cycles
          through them (4,096 entries: 16 batches of 256).
end_to_end  the whole pre-training run (`pretrain`, as `droppos pretrain --config vit_base_in1k`
          runs it) for a bounded number of steps in one epoch over those files, monitors,
          pictures and TensorBoard off, in a child process with a timeout; its img/s from
          `metrics.jsonl` against the in-memory step rate.

Between rows: `torch._dynamo.reset()` and an emptied CUDA cache, so every compiled row times its
own static-shape graph. No command-line machinery (jsonargparse) is imported: configurations are
built from the presets' YAML directly. `--smoke` runs every part on the CPU with a tiny model
(what CI runs).

    python benchmarks/gpu.py --json benchmarks/results/gpu_h100.json
    python benchmarks/gpu.py --smoke --budget-s 60
"""

from __future__ import annotations

import argparse
import atexit
import copy
import gc
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision
import yaml
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import droppos
from droppos.data import set_epoch
from droppos.engine.loop import OnDevice
from droppos.engine.precision import autocast
from droppos.interop.schema import from_plain
from droppos.methods import method_named
from droppos.methods.pretrain import (
    PretrainConfig,
    PretrainDataSection,
    PretrainRunSection,
    pretrain,
    pretraining_loop,
)
from droppos.sections import OptimSection

# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), TFLOP/s, matched
# against the card's exact name in this order (the first entry the name contains): the PCIe
# and NVL H100s are slower than the SXM one, whose name says neither.
DATASHEET_BF16 = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0),
                  ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0),
                  ("L4", 121.0), ("A10G", 70.0), ("RTX 4090", 165.0))  # fmt: skip
DECODE_PATHS = ("pil", "draft", "tensor", "device")
PARTS = ("facts", "steps", "sync", "loader", "end_to_end")
# --smoke's model: every code path, none of the arithmetic.
TINY_ENCODER = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
TINY = {
    "droppos": {"encoder": TINY_ENCODER, "decoder_depth": 1, "decoder_embed_dim": 64},
    "mae": {"encoder": TINY_ENCODER, "decoder": {"depth": 1, "embed_dim": 64}},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh(device: torch.device) -> None:
    """Between rows: forget compiled graphs (the next row compiles its own static shapes) and
    give the cached memory back (the next row's peak is its own)."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def datasheet_peak(name: str) -> tuple[str, float] | tuple[None, None]:
    return next(((k, v) for k, v in DATASHEET_BF16 if k in name), (None, None))


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeats / best


def sdpa_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """The attention kernel the profiler records for a ViT-B-shaped SDPA call."""
    q = torch.randn(8, 12, 197, 64, device=device, dtype=dtype)
    with torch.profiler.profile() as prof:
        F.scaled_dot_product_attention(q, q, q)
    names = [e.key for e in prof.key_averages() if "attention" in e.key.lower()]
    return ", ".join(sorted(set(names))) or "none recorded"


def facts(device: torch.device, dtype: torch.dtype, smoke: bool) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    entry, sheet = datasheet_peak(name or "")
    peak = matmul_peak(device, dtype, 512 if smoke else 8192, 2 if smoke else 20)
    return {
        "droppos": droppos.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "device": name or "cpu",
        "cpu_cores": os.cpu_count(),
        "sdpa_kernel": sdpa_kernel(device, dtype),
        "measured_peak_tflops": peak / 1e12,
        "datasheet_entry": entry,
        "datasheet_peak_tflops": sheet,
    }


# -- configurations, without the command line ------------------------------------------------


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def preset(name: str, changes: dict[str, Any]) -> PretrainConfig:
    """A built-in preset (`droppos pretrain --config NAME`) with `changes` merged in, as the
    typed configuration the command would build, with no command-line library."""
    text = (resources.files("droppos.configs") / f"{name}.yaml").read_text()
    plain = merge(yaml.safe_load(text), changes)
    model = method_named(plain["model"]["name"]).config_from_plain(plain["model"])
    return PretrainConfig(
        model=model,
        data=from_plain(PretrainDataSection, plain.get("data", {}), "data"),
        optim=from_plain(OptimSection, plain.get("optim", {}), "optim"),
        run=from_plain(PretrainRunSection, plain.get("run", {}), "run"),
    )


def config_for(
    args: argparse.Namespace, device: torch.device, work: Path, method: str, changes: dict
) -> PretrainConfig:
    """The ImageNet preset of `method` (tiny under --smoke), quiet, on this device, writing
    into a fresh folder under `work`."""
    base = {
        "run": {"device": device.type, "progress": False, "tensorboard": False,
                "output_dir": str(work / f"run-{time.monotonic_ns()}"), "precision": "bf16",
                "monitor_every": -1, "pictures_every": 0},
        "data": {"max_bad_fraction": 0.5},
        "model": TINY[method] if args.smoke else {},
    }  # fmt: skip
    name = "vit_base_in1k" if method == "droppos" else "mae_vit_base_in1k"
    return preset(name, merge(base, changes))


# -- steps -------------------------------------------------------------------------------------


def synthetic_batch(loop: Any, batch: int) -> OnDevice:
    """One loader batch of random images (already on the device) with the method's noise."""
    step = loop.method  # the run's conductor (methods/pretrain.py:PretrainStep)
    encoder = step.config.model.encoder
    size = encoder.img_size if isinstance(encoder.img_size, int) else encoder.img_size[0]
    images = torch.randint(0, 256, (batch, encoder.in_chans, size, size), dtype=torch.uint8)
    lengths = step.method.noise_lengths(step.config.model)
    raw = (images, torch.zeros(batch), *(torch.rand(batch, n) for n in lengths))
    return OnDevice(step.to_device(raw), raw)


def measured(step: Callable[[], None], device, images: int, steps: int, warmup: int) -> dict:
    """img/s and ms/step of `step` after `warmup` calls, and the peak memory of those steps."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"images_per_second": images / seconds, "ms_per_step": seconds * 1000,
            "peak_memory_mib": peak}  # fmt: skip


def time_steps(loop: Any, batch: int, accum: int, steps: int, warmup: int) -> dict[str, Any]:
    """img/s, ms and peak memory of the loop's training step (compiled if the run compiles) on
    synthetic batches, and the FLOPs of one eager step, op by op (FlopCounterMode)."""
    set_epoch(loop.loader, 0)
    loop.method.start_epoch(0, 0)
    group = [synthetic_batch(loop, batch) for _ in range(accum)]

    def step() -> None:
        loop.optimizer_step(loop.accumulate(list(group))[0])

    found = measured(step, loop.env.device, batch * accum, steps, warmup)
    engine, loop.engine_model = loop.engine_model, loop.method.model
    try:
        with FlopCounterMode(display=False) as counter:
            step()
    finally:
        loop.engine_model = engine
    return {**found, "gflop_per_step": counter.get_total_flops() / 1e9}


def droppos_steps(args, device, work, method: str, changes: dict, batch: int, accum: int,
                  compiled: bool) -> dict[str, Any]:  # fmt: skip
    changes = merge(changes, {"run": {"compile": compiled}, "data": {"source": "demo",
                    "num_workers": 0, "mean": [0.5] * 3, "std": [0.5] * 3},
                    "model": {"encoder": {"in_chans": 3}},
                    "optim": {"batch_size": batch, "accum_steps": accum}})  # fmt: skip
    loop = pretraining_loop(config_for(args, device, work, method, changes))
    try:
        return time_steps(loop, batch, accum, *((2, 1) if args.smoke else (20, 5)))
    finally:
        loop.close()


def supervised_steps(args, device, batch: int, compiled: bool) -> dict[str, Any]:
    """A supervised timm ViT-B step of the same batch, bf16 autocast, fused AdamW."""
    kwargs = TINY_ENCODER if args.smoke else {}
    model = timm.create_model("vit_base_patch16_224", num_classes=1000, **kwargs).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    engine = [torch.compile(model) if compiled else model]
    size = 32 if args.smoke else 224
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with autocast(device, "bf16"):
            loss = F.cross_entropy(engine[0](images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps, warmup = (2, 1) if args.smoke else (20, 5)
    found = measured(step, device, batch, steps, warmup)
    engine[0] = model  # FLOPs of one eager step, op by op
    with FlopCounterMode(display=False) as counter:
        step()
    return {**found, "gflop_per_step": counter.get_total_flops() / 1e9}


def step_plan(args: argparse.Namespace) -> tuple[list, list]:
    """(cheap, expensive) rows: (name, method, changes, batch, accum, compiled)."""
    small, target, large = (2, 8, 16) if args.smoke else (64, 256, 512)
    compiled = not args.smoke  # inductor on the CPU would time the C++ compiler
    cheap = [
        ("DropPos", "droppos", {}, target, 1, compiled),
        ("DropPos", "droppos", {}, target, 1, False),
        ("timm ViT-B, supervised", "timm", {}, target, 1, False),
    ]
    expensive = [
        ("DropPos", "droppos", {}, large, 1, compiled),
        ("DropPos, preset 64 x 8", "droppos", {}, small, 2 if args.smoke else 8, compiled),
        ("MAE", "mae", {}, target, 1, compiled),
        ("MAE", "mae", {}, target, 1, False),
        ("timm ViT-B, supervised", "timm", {}, target, 1, compiled),
        ("DropPos, attentive visible", "droppos", {"model": {"attentive_source": "visible"}},
         target, 1, compiled),
        ("DropPos, attentive off", "droppos", {"model": {"attentive": False}}, target, 1,
         compiled),
    ]  # fmt: skip
    if args.smoke:  # nothing compiles on the CPU: each eager row once
        expensive = [row for i, row in enumerate(expensive) if row not in cheap + expensive[:i]]
        cheap = [row for i, row in enumerate(cheap) if row not in cheap[:i]]
    return cheap, expensive


def step_row(args, device, work, name, method, changes, batch, accum, compiled) -> dict:
    if method == "timm":
        found = supervised_steps(args, device, batch, compiled)
    else:
        found = droppos_steps(args, device, work, method, changes, batch, accum, compiled)
    print(f"  {name:<28} batch {batch:>4} x {accum} compile {compiled!s:<5} "
          f"{found['images_per_second']:8.1f} img/s", flush=True)  # fmt: skip
    return {"row": name, "batch": batch, "accum": accum, "compile": compiled, **found}


# -- host syncs ------------------------------------------------------------------------------


def no_sync_steps(args, device, work, listing: Path, decode: str, accum: int) -> dict[str, Any]:
    """20 steps of the real loop on the JPEGs (loader batches, pinned, sent to the device
    by the method, the next one during the step) with CUDA's sync debug mode set to raise on
    any host sync; and the host's milliseconds per batch in `to_device` (on the device path:
    blocked in decoding, whose own stream synchronisation the debug mode does not see). On the
    CPU (`--smoke`) the same steps run without the check."""
    workers = 0 if args.smoke else min(8, os.cpu_count() or 1)
    compiled = decode == "tensor" and accum == 1 and not args.smoke
    changes = {"data": {"source": str(listing), "decode": decode, "num_workers": workers},
               "optim": {"batch_size": 2 if args.smoke else 64, "accum_steps": accum},
               "run": {"compile": compiled}}  # fmt: skip
    loop = pretraining_loop(config_for(args, device, work, "droppos", changes))
    host = {"seconds": 0.0, "batches": 0}
    try:
        set_epoch(loop.loader, 0)
        loop.method.start_epoch(0, 0)
        groups = loop.optimizer_steps()
        group = next(groups)
        loop.optimizer_step(loop.accumulate(group)[0])  # warm: the first step may allocate
        steps = 2 if args.smoke else 20
        group = next(groups)
        to_device = loop.method.to_device

        def timed(batch: Any) -> Any:
            start = time.perf_counter()
            try:
                return to_device(batch)
            finally:
                host["seconds"] += time.perf_counter() - start
                host["batches"] += 1

        loop.method.to_device = timed
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        done = 0
        try:
            for _ in range(steps):
                following = next(groups, None)
                loop.train_step(group, following)
                loop.poll(full=False)
                done += 1
                if following is None:
                    break
                group = following
            result = f"{done} steps, no host sync" if device.type == "cuda" \
                else f"{done} steps (no CUDA: not checked)"  # fmt: skip
        except RuntimeError as error:
            result = f"host sync: {str(error).splitlines()[0]}"
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
            loop.method.to_device = to_device
    finally:
        loop.close()
    per_batch = 1000 * host["seconds"] / host["batches"] if host["batches"] else None
    print(f"  sync check {decode}, accum {accum}: {result}", flush=True)
    return {"row": f"{decode}, accum {accum}", "result": result,
            "host_ms_in_to_device_per_batch": per_batch}  # fmt: skip


# -- loader, end to end ------------------------------------------------------------------------


def write_jpeg_chunk(folder: str, indices: list[int], size: tuple[int, int]) -> None:
    width, height = size
    base = np.random.default_rng(0).integers(0, 256, (height // 16 + 1, width // 16 + 1, 3),
                                             dtype=np.uint8)  # fmt: skip
    smooth = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC))
    for i in indices:
        rng = np.random.default_rng(i)
        folder_i = Path(folder) / f"class{i % 10}"
        folder_i.mkdir(parents=True, exist_ok=True)
        noisy = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(np.roll(noisy, i, axis=1)).save(folder_i / f"{i:05d}.jpg", quality=90)


def write_jpegs(folder: Path, count: int, size: tuple[int, int]) -> None:
    """Photo-like JPEGs in 10 class folders, written by a process pool, plus the edge cases the
    device path must survive."""
    processes = max(1, min(16, os.cpu_count() or 1))
    chunks = [list(range(count))[k::processes] for k in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(write_jpeg_chunk, [str(folder)] * processes, chunks, [size] * processes))
    photo = Image.open(folder / "class0" / "00000.jpg")
    edge = folder / "class0"
    photo.convert("CMYK").save(edge / "edge-cmyk.jpg", quality=90)
    photo.convert("L").save(edge / "edge-grey.jpg", quality=90)
    photo.save(edge / "edge-progressive.jpg", quality=90, progressive=True)
    photo.save(edge / "edge-png.JPEG", format="PNG")
    whole = (edge / "00000.jpg").read_bytes()
    (edge / "edge-truncated.jpg").write_bytes(whole[: len(whole) // 2])


def file_list(folder: Path, count: int) -> Path:
    """A file list (`path` per line) of `count` entries that cycles through the folder's images,
    edge cases included: as many batches as a row needs from a folder that is quick to write."""
    files = sorted(p.relative_to(folder) for p in folder.rglob("*.*") if p.suffix != ".txt")
    listing = folder / f"list-{count}.txt"
    listing.write_text("".join(f"{files[i % len(files)]}\n" for i in range(count)))
    return listing


def loader_row(args, device, work, listing: Path, decode: str, workers: int) -> dict[str, Any]:
    changes = {"data": {"source": str(listing), "decode": decode, "num_workers": workers},
               "optim": {"batch_size": args.loader_batch, "accum_steps": 1}}  # fmt: skip
    loop = pretraining_loop(config_for(args, device, work, "droppos", changes))
    try:
        set_epoch(loop.loader, 0)
        iterator = iter(loop.loader)
        next(iterator)  # forking the workers is not throughput
        start, images = time.perf_counter(), 0
        for raw in iterator:  # to the device too: the device path decodes there
            images += len(loop.method.to_device(raw).images)
        sync(device)
        rate = images / (time.perf_counter() - start)
    finally:
        loop.close()
    print(f"  loader {decode:<7} {workers:>3} workers {rate:8.1f} img/s", flush=True)
    return {"decode": decode, "workers": workers, "images_per_second": rate}


def end_to_end(args, device, work, folder: Path, decode: str, timeout: float) -> dict[str, Any]:
    """The whole run (`pretrain`) for `--end-to-end-steps` optimiser steps, in one epoch over a
    file list that repeats the folder's images (one checkpoint, at its end), in a child process
    killed after `timeout` seconds. The rate is the median of 4-step windows of
    `metrics.jsonl`, the first (compiling) one left out."""
    listing = file_list(folder, (args.end_to_end_steps + 1) * args.batch)
    out = work / "end-to-end"
    changes = {"data": {"source": str(listing), "decode": decode,
                        "num_workers": 1 if args.smoke else os.cpu_count()},
               "optim": {"epochs": 1, "warmup_epochs": 1, "batch_size": args.batch,
                         "accum_steps": 1},
               "run": {"output_dir": str(out), "log_every": 4, "save_every_steps": 0,
                       "keep_every_epochs": 0, "compile": not args.smoke,
                       "precision": "auto"}}  # fmt: skip
    spec = work / "end-to-end.json"
    spec.write_text(json.dumps({"smoke": args.smoke, "device": device.type, "changes": changes}))
    found: dict[str, Any] = {"decode": decode, "timeout_s": round(timeout)}
    try:
        done = subprocess.run([sys.executable, __file__, "--end-to-end-child", str(spec)],
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
        if done.returncode != 0:
            found["error"] = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    except subprocess.TimeoutExpired:
        found["error"] = f"killed after {timeout:.0f} s"
    metrics = out / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] \
        if metrics.exists() else []  # fmt: skip
    rates = [r["images_per_second"] for r in records if r.get("kind") == "step"][1:]
    found["steps"] = max((r.get("step", 0) for r in records if r.get("kind") == "step"), default=0)
    found["images_per_second"] = float(np.median(rates)) if rates else None
    return found


def end_to_end_child(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    args = argparse.Namespace(smoke=spec["smoke"])
    device, work = torch.device(spec["device"]), spec_path.parent
    pretrain(config_for(args, device, work, "droppos", spec["changes"]))


# -- the run -----------------------------------------------------------------------------------


class Report:
    """What was measured so far, rewritten to `--json` after every row and on any exit."""

    def __init__(self, path: Path | None, budget: float) -> None:
        self.path, self.budget, self.start = path, budget, time.monotonic()
        self.data: dict[str, Any] = {"budget_s": budget, "complete": False, "seconds": {},
                                     "steps": [], "sync_debug": [], "loader": [],
                                     "skipped": []}  # fmt: skip

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def row(self, part: str, label: str, measure: Callable[[], Any]) -> Any:
        """Measure one row unless the budget is spent (then record it as skipped); an error is
        recorded as the row's result, and the next row runs."""
        if self.elapsed() > self.budget:
            self.data["skipped"].append({"part": part, "row": label, "why": "budget",
                                         "at_s": round(self.elapsed(), 1)})  # fmt: skip
            self.save()
            return None
        start = time.perf_counter()
        try:
            found = measure()
        except Exception as error:  # a failed row is a finding; the next rows still run
            found = {"row": label, "error": f"{type(error).__name__}: {error}"[:500]}
            print(f"  {label}: {found['error']}", flush=True)
        self.data["seconds"][f"{part}: {label}"] = round(time.perf_counter() - start, 1)
        if isinstance(self.data.get(part), list):
            self.data[part].append(found)
        else:
            self.data[part] = found
        self.save()
        return found

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        if self.data.get("facts", {}).get("measured_peak_tflops"):
            add_ratios(self.data)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(partial, self.path)  # a kill mid-write leaves the previous whole file


def run(args: argparse.Namespace, report: Report, device: torch.device, work: Path) -> None:
    parts = set(args.parts)

    def rows(part: str, plan: list) -> None:
        if part in parts:
            for label, measure in plan:
                fresh(device)
                report.row("sync_debug" if part == "sync" else part, label, measure)

    if "facts" in parts:
        found = report.row("facts", "facts", lambda: facts(device, torch.bfloat16, args.smoke))
        print(json.dumps(found, indent=2), flush=True)
    cheap, expensive = step_plan(args)

    def step_rows(plan: list) -> list:
        return [(f"{r[0]}, {r[3]} x {r[4]}, compile {r[5]}",
                 lambda r=r: step_row(args, device, work, *r)) for r in plan]  # fmt: skip

    rows("steps", step_rows(cheap))
    folder = work / "jpegs"
    if parts & {"sync", "loader", "end_to_end"}:
        start = time.perf_counter()
        write_jpegs(folder, args.images, (64, 48) if args.smoke else (500, 375))
        report.data["seconds"]["jpegs"] = round(time.perf_counter() - start, 1)
        listing = file_list(folder, args.loader_images)
    rows("sync", [(f"{d}, accum {a}", lambda d=d, a=a: no_sync_steps(args, device, work, listing,
                   d, a)) for d, a in (("tensor", 1), ("device", 1), ("tensor", 2),
                                       ("device", 2))])  # fmt: skip
    cores = os.cpu_count() or 1
    counts = [0, 1] if args.smoke else sorted({min(8, cores), cores})
    rows("loader", [(f"{d}, {w} workers", lambda d=d, w=w: loader_row(args, device, work,
                     listing, d, w)) for w in counts for d in DECODE_PATHS])  # fmt: skip
    rows("steps", step_rows(expensive))
    if "end_to_end" in parts:
        loaded = [r for r in report.data["loader"] if r.get("images_per_second")]
        best = max(loaded, key=lambda r: r["images_per_second"])["decode"] if loaded else "tensor"
        timeout = min(args.end_to_end_timeout, max(60.0, report.budget - report.elapsed() + 60))
        fresh(device)
        e2e = report.row("end_to_end", "end to end",
                         lambda: end_to_end(args, device, work, folder, best, timeout))  # fmt: skip
        reference = next((r for r in report.data["steps"] if r.get("row") == "DropPos"
                          and r["batch"] == args.batch and r["compile"] == (not args.smoke)),
                         None)  # fmt: skip
        if e2e and reference and e2e.get("images_per_second"):
            e2e["fraction_of_step_rate"] = e2e["images_per_second"] / reference["images_per_second"]
    report.data["complete"] = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every part on the CPU, tiny")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, of {', '.join(PARTS)}")  # fmt: skip
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="seconds of work: a row that would start later is skipped",
    )
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256, help="end-to-end micro-batch")
    parser.add_argument("--loader-batch", type=int, default=256)
    parser.add_argument(
        "--loader-images",
        type=int,
        default=4096,
        help="entries of the loaders' file list (cycling through --images)",
    )
    parser.add_argument("--end-to-end-steps", type=int, default=48)
    parser.add_argument("--end-to-end-timeout", type=float, default=150.0)
    parser.add_argument("--end-to-end-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.end_to_end_child is not None:
        return end_to_end_child(args.end_to_end_child)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)} (choose from {', '.join(PARTS)})")
    if args.smoke:
        args.images, args.loader_images, args.batch, args.loader_batch = 24, 24, 4, 4
        args.end_to_end_steps = 8
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    work = Path(tempfile.mkdtemp(prefix="droppos-gpu-"))
    report = Report(args.json, args.budget_s)
    atexit.register(report.save)

    def stop(signum: int, frame: Any) -> None:
        report.data["stopped_by"] = signal.Signals(signum).name
        raise SystemExit(128 + signum)  # unwinds: `finally` below, then atexit saves

    signal.signal(signal.SIGTERM, stop)
    try:
        run(args, report, device, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        report.save()
    print()
    print(table(report.data))


def add_ratios(report: dict[str, Any]) -> None:
    """MFU against both peaks, and each row's step time over the supervised step's."""
    peak = report["facts"]["measured_peak_tflops"] * 1e12
    sheet = report["facts"]["datasheet_peak_tflops"]
    timed = [r for r in report["steps"] if "ms_per_step" in r]
    supervised = {r["compile"]: r for r in timed if r["row"].startswith("timm")}
    for row in timed:
        achieved = row["gflop_per_step"] * 1e9 / (row["ms_per_step"] / 1000)
        row["mfu_measured_peak"] = achieved / peak
        row["mfu_datasheet_peak"] = achieved / (sheet * 1e12) if sheet else None
        same = supervised.get(row["compile"])
        if same is not None and row["batch"] == same["batch"] and row["accum"] == 1:
            row["ms_vs_supervised"] = row["ms_per_step"] / same["ms_per_step"]


def table(report: dict[str, Any]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    lines = [
        "| row | batch | compile | img/s | ms/step | GFLOP/step | MFU (measured peak) "
        "| MFU (datasheet) | vs supervised | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["steps"]:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error']} |")
            continue
        lines.append(
            f"| {r['row']} | {r['batch']} x {r['accum']} | {r['compile']} "
            f"| {r['images_per_second']:.1f} | {r['ms_per_step']:.1f} | {r['gflop_per_step']:.3g} "
            f"| {fmt(r.get('mfu_measured_peak'), '.1%')} "
            f"| {fmt(r.get('mfu_datasheet_peak'), '.1%')} "
            f"| {fmt(r.get('ms_vs_supervised'), '.2f')} | {fmt(r['peak_memory_mib'], '.0f')} |"
        )
    lines += ["", "| decode | workers | loader img/s |", "|---|---|---|"]
    lines += [f"| {r['decode']} | {r['workers']} | {r['images_per_second']:.1f} |"
              for r in report["loader"] if "error" not in r]  # fmt: skip
    e2e = report.get("end_to_end")
    if e2e:
        lines += [
            "",
            f"end to end ({e2e.get('decode')}, {e2e.get('steps')} steps): "
            f"{fmt(e2e.get('images_per_second'), '.1f')} img/s, "
            f"{fmt(e2e.get('fraction_of_step_rate'), '.0%')} of the in-memory step rate"
            + (f" ({e2e['error']})" if e2e.get("error") else ""),
        ]
    lines.append("")
    lines += [f"host syncs ({r['row']}): {r.get('result', r.get('error'))}, host "
              f"{fmt(r.get('host_ms_in_to_device_per_batch'), '.1f')} ms/batch in to_device"
              for r in report["sync_debug"]]  # fmt: skip
    lines += [f"skipped ({s['part']}: {s['row']}): {s['why']}" for s in report["skipped"]]
    seconds = ", ".join(f"{k} {v}" for k, v in report["seconds"].items())
    lines += ["", f"seconds per row: {seconds}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

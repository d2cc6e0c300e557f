"""GPU speed, measured in one run: what one GPU does with droppos, and how far from its peak.

(a) Facts: versions, the GPU, the attention kernel the profiler sees, the dense bf16 matmul peak
    measured here.
(b) Training steps of the real loop (`TrainLoop.accumulate` + `optimizer_step`: global
    normalisers, autocast, clipping, fused AdamW) at ViT-B/16 224, bf16, inputs already on the
    GPU: DropPos compiled at micro-batch 64 / 256 / 512 and the preset's 64 x 8 accumulation;
    DropPos with the `visible` attentive source and without attentive weights; MAE and a
    supervised timm ViT-B at 256; DropPos, MAE and timm eager at 256 (what compiling buys).
    Each row: img/s, ms/step, FLOPs per step (FlopCounterMode on one eager step, attentive pass
    included), MFU against the measured and the datasheet peak, peak memory.
(b') Host syncs: 20 steps of the real loop on loader batches (tensor and device decode, with
    and without accumulation) under `torch.cuda.set_sync_debug_mode("error")`.
(c) The loader's img/s on every decode path, with 8 and with all CPU cores, on synthetic
    500 x 375 JPEGs (and the edge-case files: CMYK, greyscale, progressive, PNG named .JPEG,
    truncated).
(d) End to end: `droppos pretrain --config vit_base_in1k` for a few hundred steps on that folder
    with the fastest decode path; its img/s from `metrics.jsonl` against (b)'s rate.

Prints a table and writes JSON. `--smoke` runs every part on the CPU with a tiny model in
seconds (what CI runs).

    python benchmarks/gpu.py --json benchmarks/results/gpu_h100.json
    python benchmarks/gpu.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import droppos
from droppos.cli.main import parser_for, resolve_presets, to_config
from droppos.data import set_epoch
from droppos.engine.loop import OnDevice
from droppos.engine.precision import autocast
from droppos.methods.pretrain import pretraining_loop

# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), TFLOP/s.
DATASHEET_BF16 = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                  "A10G": 70.0, "RTX 4090": 165.0}  # fmt: skip
DECODE_PATHS = ("pil", "draft", "tensor", "device")
# --smoke's encoder: every code path, none of the arithmetic.
TINY = ["--model.encoder.img_size", "32", "--model.encoder.patch_size", "8",
        "--model.encoder.depth", "2", "--model.encoder.embed_dim", "64",
        "--model.encoder.num_heads", "2"]  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def datasheet_peak(name: str) -> float | None:
    return next((v for k, v in DATASHEET_BF16.items() if k in name), None)


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
        "datasheet_peak_tflops": datasheet_peak(name or ""),
    }


# -- (b) steps -------------------------------------------------------------------------------


def loop_for(argv: list[str], work: Path) -> Any:
    argv = resolve_presets([*argv, "--run.output_dir", str(work / f"run-{time.monotonic_ns()}")])
    parser = parser_for(argv)
    return pretraining_loop(to_config(parser, parser.parse_args(argv), "pretrain"))


def synthetic_batch(loop: Any, batch: int) -> OnDevice:
    """One loader batch of random images (already on the device) with the method's noise."""
    step = loop.method  # the run's conductor (methods/pretrain.py:PretrainStep)
    encoder = step.config.model.encoder
    size = encoder.img_size if isinstance(encoder.img_size, int) else encoder.img_size[0]
    images = torch.randint(0, 256, (batch, encoder.in_chans, size, size), dtype=torch.uint8)
    lengths = step.method.noise_lengths(step.config.model)
    raw = (images, torch.zeros(batch), *(torch.rand(batch, n) for n in lengths))
    return OnDevice(step.to_device(raw), raw)


def time_steps(loop: Any, batch: int, accum: int, steps: int, warmup: int) -> dict[str, float]:
    device = loop.env.device
    set_epoch(loop.loader, 0)
    loop.method.start_epoch(0, 0)
    group = [synthetic_batch(loop, batch) for _ in range(accum)]
    for _ in range(warmup):
        loop.optimizer_step(loop.accumulate(list(group))[0])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loop.optimizer_step(loop.accumulate(list(group))[0])
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    engine, loop.engine_model = loop.engine_model, loop.method.model  # eager, op by op
    try:
        with FlopCounterMode(display=False) as counter:
            loop.optimizer_step(loop.accumulate(list(group))[0])
    finally:
        loop.engine_model = engine
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "images_per_second": batch * accum / seconds,
        "ms_per_step": seconds * 1000,
        "gflop_per_step": counter.get_total_flops() / 1e9,
        "peak_memory_mib": peak,
    }


def supervised_steps(device, batch, steps, warmup, compile_model, smoke) -> dict[str, float]:
    """A supervised timm ViT-B step of the same batch, bf16 autocast, fused AdamW."""
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
    kwargs = kwargs if smoke else {}
    model = timm.create_model("vit_base_patch16_224", num_classes=1000, **kwargs).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    engine = torch.compile(model) if compile_model else model
    size = 32 if smoke else 224
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with autocast(device, "bf16"):
            loss = F.cross_entropy(engine(images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    engine = model  # FLOPs of one eager step, op by op
    with FlopCounterMode(display=False) as counter:
        step()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "images_per_second": batch / seconds,
        "ms_per_step": seconds * 1000,
        "gflop_per_step": counter.get_total_flops() / 1e9,
        "peak_memory_mib": peak,
    }


def step_rows(args: argparse.Namespace, device: torch.device, work: Path) -> list[dict]:
    model = [*TINY, "--model.decoder_depth", "1", "--model.decoder_embed_dim", "64"] \
        if args.smoke else ["--config", "vit_base_in1k"]  # fmt: skip
    common = ["--data.source", "demo", "--data.num_workers", "0", "--run.progress", "false",
              "--run.precision", "bf16", "--run.device", device.type, "--run.tensorboard",
              "false", "--data.mean", "[0.5, 0.5, 0.5]", "--data.std", "[0.5, 0.5, 0.5]",
              "--model.encoder.in_chans", "3"]  # fmt: skip
    batches = [4, 8] if args.smoke else [64, 256, 512]
    steps, warmup = (2, 1) if args.smoke else (20, 5)
    # Every row compiled (what the presets run); eager only where it says what compiling buys,
    # at the target batch: compiling a ViT-B takes about a minute a shape.
    compiled = not args.smoke
    plan: list[tuple[str, list[str], int, int, bool]] = [
        *(("DropPos", [], batch, 1, compiled) for batch in batches),
        ("DropPos, preset 64 x 8", [], batches[0], 2 if args.smoke else 8, compiled),
        ("DropPos, attentive visible", ["--model.attentive_source", "visible"], batches[1], 1,
         compiled),
        ("DropPos, attentive off", ["--model.attentive", "false"], batches[1], 1, compiled),
        ("MAE", [], batches[1], 1, compiled),
    ]  # fmt: skip
    if compiled:
        plan += [("DropPos", [], batches[1], 1, False), ("MAE", [], batches[1], 1, False)]
    rows = []
    for name, extra, batch, accum, compiled in plan:
        argv = ["pretrain", *model, *common, *extra, "--run.compile", str(compiled)]
        if name == "MAE":
            mae = [*TINY, "--model.name", "mae", "--model.decoder.depth", "1",
                   "--model.decoder.embed_dim", "64"] if args.smoke \
                else ["--config", "mae_vit_base_in1k"]  # fmt: skip
            argv = ["pretrain", *mae, *common, "--run.compile", str(compiled)]
        loop = loop_for(argv, work)
        try:
            found = time_steps(loop, batch, accum, steps, warmup)
        finally:
            loop.close()
        rows.append({"row": name, "batch": batch, "accum": accum, "compile": compiled, **found})
        print(f"  {name:<28} batch {batch:>4} x {accum} compile {compiled!s:<5} "
              f"{found['images_per_second']:8.1f} img/s", flush=True)  # fmt: skip
    for compiled in sorted({row[4] for row in plan}):
        found = supervised_steps(device, batches[1], steps, warmup, compiled, args.smoke)
        rows.append({"row": "timm ViT-B, supervised", "batch": batches[1], "accum": 1,
                     "compile": compiled, **found})  # fmt: skip
    return rows


def no_sync_steps(args: argparse.Namespace, device: torch.device, folder: Path, work: Path):
    """20 steps of the real loop on the JPEG folder (loader batches, pinned, sent to the device
    by the method, the next one during the step) with CUDA's sync debug mode set to raise on
    any host sync, per decode path and with accumulation. On the CPU (`--smoke`) the same
    steps run without the check."""
    found = {}
    workers = "0" if args.smoke else str(min(8, os.cpu_count() or 1))
    for decode, accum in (("tensor", 1), ("tensor", 2), ("device", 1), ("device", 2)):
        compiled = decode == "tensor" and accum == 1 and not args.smoke
        argv = ["pretrain", "--config", "vit_base_in1k", "--data.source", str(folder),
                "--data.decode", decode, "--data.num_workers", workers,
                "--optim.batch_size", "2" if args.smoke else "64", "--optim.accum_steps",
                str(accum), "--run.precision", "bf16", "--run.device", device.type,
                "--data.max_bad_fraction", "0.5",
                "--run.compile", str(compiled)]  # fmt: skip
        if args.smoke:
            argv += TINY
        loop = loop_for(argv, work)
        name = f"{decode}, accum {accum}"
        try:
            set_epoch(loop.loader, 0)
            loop.method.start_epoch(0, 0)
            groups = loop.optimizer_steps()
            group = next(groups)
            loop.optimizer_step(loop.accumulate(group)[0])  # warm: the first step may allocate
            steps = 2 if args.smoke else 20
            group = next(groups)
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(steps):
                    following = next(groups, None)
                    loop.train_step(group, following)
                    loop.poll(full=False)
                    if following is None:
                        break
                    group = following
                found[name] = f"{steps} steps, no host sync" if device.type == "cuda" \
                    else f"{steps} steps (no CUDA: not checked)"  # fmt: skip
            except RuntimeError as error:
                found[name] = f"host sync: {str(error).splitlines()[0]}"
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        finally:
            loop.close()
        print(f"  sync check {name}: {found[name]}", flush=True)
    return found


# -- (c) loader, (d) end to end ----------------------------------------------------------------


def write_jpegs(folder: Path, count: int, size: tuple[int, int]) -> None:
    """Photo-like JPEGs in 10 class folders, plus the edge cases the device path must survive."""
    rng = np.random.default_rng(0)
    width, height = size
    base = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC))
    for i in range(count):
        folder_i = folder / f"class{i % 10}"
        folder_i.mkdir(parents=True, exist_ok=True)
        noisy = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(np.roll(noisy, i, axis=1)).save(folder_i / f"{i:05d}.jpg", quality=90)
    photo = Image.open(folder / "class0" / "00000.jpg")
    edge = folder / "class0"
    photo.convert("CMYK").save(edge / "edge-cmyk.jpg", quality=90)
    photo.convert("L").save(edge / "edge-grey.jpg", quality=90)
    photo.save(edge / "edge-progressive.jpg", quality=90, progressive=True)
    photo.save(edge / "edge-png.JPEG", format="PNG")
    whole = (edge / "00000.jpg").read_bytes()
    (edge / "edge-truncated.jpg").write_bytes(whole[: len(whole) // 2])


def loader_rows(args: argparse.Namespace, device: torch.device, folder: Path, work: Path):
    cores = os.cpu_count() or 1
    counts = sorted({min(8, cores), cores}) if not args.smoke else [0, 1]
    rows = []
    for decode in DECODE_PATHS:
        for workers in counts:
            argv = ["pretrain", "--config", "vit_base_in1k", "--data.source", str(folder),
                    "--data.decode", decode, "--data.num_workers", str(workers),
                    "--run.device", device.type, "--optim.batch_size", str(args.loader_batch),
                    "--optim.accum_steps", "1", "--data.max_bad_fraction", "0.5"]  # fmt: skip
            if args.smoke:
                argv += TINY
            loop = loop_for(argv, work)
            try:
                set_epoch(loop.loader, 0)
                iterator = iter(loop.loader)
                next(iterator)  # forking the workers is not throughput
                start, images = time.perf_counter(), 0
                for raw in iterator:  # to the device too: the device path decodes there
                    prepared = loop.method.to_device(raw)
                    images += len(prepared.images)
                sync(device)
                rate = images / (time.perf_counter() - start)
            finally:
                loop.close()
            rows.append({"decode": decode, "workers": workers, "images_per_second": rate})
            print(f"  loader {decode:<7} {workers:>3} workers {rate:8.1f} img/s", flush=True)
    return rows


def end_to_end(args: argparse.Namespace, device: torch.device, folder: Path, decode: str,
               work: Path) -> dict[str, Any]:  # fmt: skip
    """`droppos pretrain --config vit_base_in1k` for a few hundred steps on the JPEG folder.

    The rate is the median of 4-step windows from `metrics.jsonl`: the windows that take in an
    epoch's end (its checkpoint) are a quarter of them, as they are not of an ImageNet epoch."""
    out = work / "end-to-end"
    epochs = 2 if args.smoke else -(-args.end_to_end_steps // (args.images // args.batch))
    argv = [sys.executable, "-m", "droppos.cli.main", "pretrain", "--config", "vit_base_in1k",
            "--data.source", str(folder), "--data.decode", decode, "--run.output_dir", str(out),
            "--run.device", device.type, "--optim.epochs", str(epochs), "--optim.warmup_epochs",
            "1", "--optim.batch_size", str(args.batch), "--optim.accum_steps", "1",
            "--run.log_every", "4", "--data.max_bad_fraction", "0.5", "--run.save_every_steps",
            "0", "--run.keep_every_epochs", "0", "--run.progress", "false",
            "--data.num_workers", str(os.cpu_count() if not args.smoke else 1),
            "--run.compile", str(not args.smoke).lower()]  # fmt: skip
    if args.smoke:
        argv += TINY
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"end-to-end pre-training failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_second"] for r in records if r["kind"] == "step"][1:]  # warm only
    if not rates:
        raise SystemExit("end-to-end pre-training logged no step after the first window")
    return {
        "decode": decode,
        "steps": len(rates) * 4 + 4,
        "images_per_second": float(np.median(rates)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every part on the CPU, tiny")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256, help="end-to-end micro-batch")
    parser.add_argument("--loader-batch", type=int, default=256)
    parser.add_argument("--end-to-end-steps", type=int, default=300)
    args = parser.parse_args()
    if args.smoke:
        args.images, args.batch, args.loader_batch = 24, 4, 4
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    work = Path(tempfile.mkdtemp(prefix="droppos-gpu-"))
    report: dict[str, Any] = {"seconds": {}}

    def part(name: str, run: Any) -> Any:
        start = time.perf_counter()
        report[name] = run()
        report["seconds"][name] = round(time.perf_counter() - start, 1)
        return report[name]

    try:
        print(json.dumps(part("facts", lambda: facts(device, torch.bfloat16, args.smoke)),
                         indent=2), flush=True)  # fmt: skip
        part("steps", lambda: step_rows(args, device, work))
        add_ratios(report)
        folder = work / "jpegs"
        write_jpegs(folder, args.images, (500, 375) if not args.smoke else (64, 48))
        part("sync_debug", lambda: no_sync_steps(args, device, folder, work))
        part("loader", lambda: loader_rows(args, device, folder, work))
        best = max(report["loader"], key=lambda r: r["images_per_second"])["decode"]
        e2e = part("end_to_end", lambda: end_to_end(args, device, folder, best, work))
        reference = next(
            (r for r in report["steps"] if r["row"] == "DropPos" and r["batch"] == args.batch
             and r["compile"] == (not args.smoke)), None,
        )  # fmt: skip
        if reference and e2e["images_per_second"]:
            e2e["fraction_of_step_rate"] = e2e["images_per_second"] / reference["images_per_second"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def add_ratios(report: dict[str, Any]) -> None:
    """MFU against both peaks, and each row's step time over the supervised step's."""
    peak = report["facts"]["measured_peak_tflops"] * 1e12
    sheet = report["facts"]["datasheet_peak_tflops"]
    supervised = {r["compile"]: r for r in report["steps"] if r["row"].startswith("timm")}
    for row in report["steps"]:
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
        lines.append(
            f"| {r['row']} | {r['batch']} x {r['accum']} | {r['compile']} "
            f"| {r['images_per_second']:.1f} | {r['ms_per_step']:.1f} | {r['gflop_per_step']:.3g} "
            f"| {fmt(r.get('mfu_measured_peak'), '.1%')} "
            f"| {fmt(r.get('mfu_datasheet_peak'), '.1%')} "
            f"| {fmt(r.get('ms_vs_supervised'), '.2f')} | {fmt(r['peak_memory_mib'], '.0f')} |"
        )
    lines += ["", "| decode | workers | loader img/s |", "|---|---|---|"]
    lines += [f"| {r['decode']} | {r['workers']} | {r['images_per_second']:.1f} |"
              for r in report["loader"]]  # fmt: skip
    e2e = report["end_to_end"]
    lines += [
        "",
        f"end to end ({e2e['decode']}, {e2e['steps']} steps): "
        f"{fmt(e2e['images_per_second'], '.1f')} img/s, "
        f"{fmt(e2e.get('fraction_of_step_rate'), '.0%')} of the in-memory step rate",
        "",
    ]
    lines += [f"host syncs ({name}): {found}" for name, found in report["sync_debug"].items()]
    seconds = ", ".join(f"{k} {v}" for k, v in report["seconds"].items())
    lines += ["", f"seconds per part: {seconds}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

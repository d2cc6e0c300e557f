"""Pre-training step throughput: DropPos vs a supervised timm ViT step of the same size.

Prints a table and writes JSON. For each (precision, batch) it reports images/s, ms/step split
into the attentive pass / the forward reusing it (encoder, decoder and loss) / backward and
optimizer, each through the model's own forward, peak memory (CUDA
allocator, or the process's peak RSS on CPU: every measurement runs in a fresh subprocess so
peaks do not leak between rows), achieved FLOP/s, and that as a fraction of the dense-matmul peak
measured in the same run and dtype.

    python benchmarks/throughput.py --model droppos_vit_base_patch16 --batches 16 \
        --precisions fp32 --json benchmarks/results/cpu_vit_b16.json
    python benchmarks/throughput.py --batches 8 16 32 --memory-only   # memory growth with batch
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.flop_counter import FlopCounterMode

from droppos.engine.optim import build_adamw
from droppos.engine.precision import autocast, resolve_precision
from droppos.methods import create_model, method_named
from droppos.models.sizes import encoder_shape


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Dense matmul FLOP/s in `dtype`: the machine's practical ceiling for these models."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):
        a @ b
    repeats = 20 if device.type == "cuda" else 3
    best = min(timed(device, lambda: [a @ b for _ in range(repeats)])[1] for _ in range(3))
    return 2 * size**3 * repeats / best  # the best of three: a busy neighbour only slows


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def live_tensor_peaks(model, optimizer, forward_backward, device: torch.device) -> dict[str, float]:
    """Peak MiB of live tensors, forward+backward and optimizer apart (CPU: torch's `MemTracker`;
    CUDA: the caching allocator's own count of allocated bytes).

    Counts what the step keeps alive (parameters, gradients, optimizer state, activations,
    temporaries) and nothing the allocator merely caches, so it shows how memory scales with
    batch where process RSS cannot. Gradients are allocated (zeros) before the pass, so the
    batch-independent part stays constant through it and the peak is that constant plus what
    grows with batch; a trainer that frees gradients between steps peaks no higher. (With
    gradients appearing mid-backward instead, the peak moves between forward and backward as
    the batch grows: a maximum of lines, convex in batch without any term in batch^2.) The
    optimizer step's peak is batch-independent by nature.
    """
    for param in model.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)
    peaks = {}
    for phase, work in (
        ("forward_backward", forward_backward),
        ("optimizer", lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True))),
    ):
        if device.type == "cuda":  # the caching allocator counts live bytes itself
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            work()
            peak_bytes = torch.cuda.max_memory_allocated(device)
        else:
            tracker = MemTracker()
            tracker.track_external(model, optimizer)
            with tracker:
                work()
            peak = tracker.get_tracker_snapshot("peak")
            peak_bytes = sum(stats["Total"] for stats in peak.values())
        peaks[f"live_peak_{phase}_mib"] = peak_bytes / 2**20
    return peaks


def forward_phases(model, optimizer, images, noise, precision, device) -> dict[str, float]:
    """One optimizer step of a DropPos model, timed phase by phase through its own forward:
    the attentive weights (`output="loss_weights"`), the forward that reuses them (encoder,
    decoder, loss), and backward with the optimizer step."""
    times = {}
    masks = {"patch_noise": noise[0], "position_noise": noise[1]}
    with autocast(device, precision):
        weights, times["attentive_ms"] = timed(
            device, lambda: model(images, **masks, output="loss_weights")
        )
        output, times["forward_ms"] = timed(
            device, lambda: model(images, **masks, token_weights=weights)
        )

    def backward_and_step():
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    _, times["backward_optimizer_ms"] = timed(device, backward_and_step)
    return {k: v * 1000 for k, v in times.items()}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One row: runs in its own process (see `main`)."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device)
    method_name, _, encoder_name = args.model.rpartition("_vit_")
    shape = encoder_shape(f"vit_{encoder_name}")
    size = encoder_name.split("_")[0]
    in_chans, img = 3, args.img_size
    if args.yardstick:
        import timm

        model = timm.create_model(
            f"vit_{size}_patch{shape['patch_size']}_224", img_size=img, num_classes=1000
        )
    else:
        attentive = {"attentive": args.attentive != "off"}
        if args.attentive != "off":
            attentive["attentive_source"] = args.attentive
        model = create_model(args.model, img_size=img, **attentive)
    model.to(device).train()
    optimizer = build_adamw(model, 1e-4, 0.05)
    images = torch.randn(args.batch, in_chans, img, img, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    if not args.yardstick:  # the method's own mask geometry
        lengths = method_named(method_name).noise_lengths(model.config)
        noise = tuple(torch.rand(args.batch, n, device=device) for n in lengths)
    step_model = torch.compile(model) if args.compile else model

    def forward_backward():
        with autocast(device, precision):
            if args.yardstick:
                loss = F.cross_entropy(step_model(images), labels)
            else:
                loss = step_model(images, patch_noise=noise[0], position_noise=noise[1]).loss
        loss.backward()

    def full_step():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(max(args.warmup, 1)):  # at least one: the optimizer state must exist
        full_step()
    row: dict[str, Any] = {
        "model": "timm supervised" if args.yardstick else args.model,
        "attentive": None if args.yardstick else args.attentive,
        "precision": precision,
        "compile": args.compile,
        "batch": args.batch,
        "img_size": img,
    }
    if not args.compile:
        row.update(live_tensor_peaks(model, optimizer, forward_backward, device))
    if args.memory_only:
        return row
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_times = []
    for _ in range(args.steps):
        _, seconds = timed(device, full_step)
        step_times.append(seconds)
    step_seconds = sorted(step_times)[len(step_times) // 2]  # median: robust to a noisy neighbour
    row["step_ms"] = step_seconds * 1000
    row["images_per_second"] = args.batch / step_seconds
    row["peak_memory_mib"] = peak_memory_bytes(device) / 2**20
    if not args.yardstick and not args.compile and args.attentive == "full_image":  # DropPos
        phases = [forward_phases(model, optimizer, images, noise, precision, device)]
        row.update({k: v for k, v in phases[0].items()})
    with FlopCounterMode(display=False) as counter:
        full_step()
    row["gflop_per_step"] = counter.get_total_flops() / 1e9
    row["achieved_tflops"] = counter.get_total_flops() / step_seconds / 1e12
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    peak = matmul_peak(device, dtype, 4096 if device.type == "cuda" else 2048)
    row["matmul_peak_tflops"] = peak / 1e12
    row["fraction_of_peak"] = row["achieved_tflops"] / row["matmul_peak_tflops"]
    return row


def run_child(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child"]
    options = {**vars(args), **overrides}
    for key in (
        "model",
        "img_size",
        "batch",
        "precision",
        "device",
        "steps",
        "warmup",
        "attentive",
    ):
        argv += [f"--{key.replace('_', '-')}", str(options[key])]
    for flag in ("compile", "yardstick", "memory_only"):
        if options[flag]:
            argv.append(f"--{flag.replace('_', '-')}")
    done = subprocess.run(argv, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


COLUMNS = [
    ("model", "model", "{}"),
    ("attentive", "attentive src", "{}"),
    ("precision", "prec", "{}"),
    ("compile", "compile", "{}"),
    ("batch", "batch", "{}"),
    ("images_per_second", "img/s", "{:.1f}"),
    ("step_ms", "step ms", "{:.0f}"),
    ("attentive_ms", "attentive", "{:.0f}"),
    ("forward_ms", "enc+dec+loss", "{:.0f}"),
    ("backward_optimizer_ms", "bwd+opt", "{:.0f}"),
    ("peak_memory_mib", "peak MiB", "{:.0f}"),
    ("live_peak_forward_backward_mib", "live fwd+bwd MiB", "{:.0f}"),
    ("live_peak_optimizer_mib", "live opt MiB", "{:.0f}"),
    ("achieved_tflops", "TFLOP/s", "{:.3f}"),
    ("fraction_of_peak", "of peak", "{:.0%}"),
    ("ratio_to_supervised", "vs sup.", "{:.2f}"),
    ("ratio_to_fp32_supervised", "vs fp32 sup.", "{:.2f}"),
]


def table(rows: list[dict[str, Any]]) -> str:
    header = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [fmt.format(row[key]) if key in row else "" for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_scaling(rows: list[dict[str, Any]]) -> str:
    """Fit the forward+backward live peak as a + b * batch and test for a batch^2 term.

    Per model: the least-squares slope (MiB per image), the intercept (weights, gradients and
    other batch-independent state), and the quadratic coefficient of a second fit, shown as the
    MiB it would add at the largest batch: near zero means no term grows with batch squared.
    """
    key = "live_peak_forward_backward_mib"
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if key in row:
            groups.setdefault((row["model"], row["attentive"], row["precision"]), []).append(row)
    lines = [
        "| model | attentive src | prec | batches | MiB per image | intercept MiB "
        "| max linear-fit residual | batch^2 term at largest batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (model, attentive, precision), found in groups.items():
        if len(found) < 3:
            continue
        batch = torch.tensor([float(r["batch"]) for r in found], dtype=torch.float64)
        peak = torch.tensor([r[key] for r in found], dtype=torch.float64)
        linear = torch.stack([torch.ones_like(batch), batch], dim=1)
        coef = torch.linalg.lstsq(linear, peak[:, None]).solution[:, 0]
        residual = (peak - linear @ coef).abs().max()
        quad = torch.linalg.lstsq(
            torch.cat([linear, batch[:, None] ** 2], dim=1), peak[:, None]
        ).solution[:, 0]
        batches = " ".join(str(r["batch"]) for r in found)
        lines.append(
            f"| {model} | {attentive} | {precision} | {batches} | {coef[1]:.2f} | {coef[0]:.0f} "
            f"| {residual:.2f} MiB | {quad[2] * batch.max() ** 2:+.2f} MiB |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="droppos_vit_base_patch16")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[16])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "auto"])
    parser.add_argument("--compile-modes", nargs="+", type=int, default=[0], help="0 and/or 1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory-only", action="store_true", help="skip phases, FLOPs, peak")
    parser.add_argument("--no-yardstick", action="store_true")
    parser.add_argument(
        "--attentive-modes",
        nargs="+",
        choices=["full_image", "visible", "off"],
        default=["full_image"],
        help="attentive weights: the paper's full-image pass, the faster `visible` deviation, off",
    )
    parser.add_argument("--attentive", default="full_image", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    # one measurement, in a child process
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--yardstick", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return
    rows = []
    fp32_supervised: dict[int, float] = {}
    for batch in args.batches:
        for precision in args.precisions:
            resolved = resolve_precision(precision, torch.device(args.device))
            supervised = None
            if not args.no_yardstick:
                supervised = run_child(
                    args, batch=batch, precision=resolved, compile=False, yardstick=True
                )
                rows.append(supervised)
                if resolved == "fp32" and not args.memory_only:
                    fp32_supervised[batch] = supervised["step_ms"]
                print(table([supervised]).splitlines()[-1], flush=True)
            modes = [(c, a) for c in args.compile_modes for a in args.attentive_modes]
            for compiled, attentive in modes:
                row = run_child(
                    args,
                    batch=batch,
                    precision=resolved,
                    compile=bool(compiled),
                    attentive=attentive,
                )
                if supervised is not None and not args.memory_only:
                    row["ratio_to_supervised"] = row["step_ms"] / supervised["step_ms"]
                if batch in fp32_supervised:
                    row["ratio_to_fp32_supervised"] = row["step_ms"] / fp32_supervised[batch]
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    scaling = memory_scaling(rows)
    if scaling:
        print()
        print(scaling)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"device": device_name(args.device), "torch": torch.__version__, "rows": rows}
        args.json.write_text(json.dumps(record, indent=2))


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()}-core CPU ({torch.backends.cpu.get_cpu_capability()})"


if __name__ == "__main__":
    main()

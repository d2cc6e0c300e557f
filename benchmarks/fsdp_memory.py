"""Peak memory per process of pre-training, one process against FSDP (and DDP) under torchrun.

Each configuration is a real `droppos pretrain` run (the `vit_large_in1k` preset by default) on a
folder of synthetic JPEGs written here, one epoch of a few optimiser steps, CPU and gloo (a GPU
with `--device cuda`). Every process reports its own peak resident memory (the OS's count, which
includes the checkpoint save at the epoch's end); the table gives the largest over the ranks.
Prints a table and writes JSON.

    python benchmarks/fsdp_memory.py --json benchmarks/results/cpu_vit_l16_fsdp_memory.json
    python benchmarks/fsdp_memory.py --smoke   # a tiny model, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROWS = [  # (name, processes, strategy, activation checkpointing)
    ("one process", 1, "auto", False),
    ("DDP, 2 ranks", 2, "ddp", False),
    ("FSDP, 2 ranks", 2, "fsdp", False),
    ("FSDP, 2 ranks, activation checkpointing", 2, "fsdp", True),
]
SMOKE_MODEL = [
    "--model.encoder.img_size", "32", "--model.encoder.patch_size", "8",
    "--model.encoder.embed_dim", "64", "--model.encoder.depth", "2",
    "--model.encoder.num_heads", "2", "--model.decoder_embed_dim", "32",
    "--model.decoder_num_heads", "2",
]  # fmt: skip


def child(argv: list[str], report: str) -> None:
    """One rank: the command, then this process's peak resident memory."""
    from droppos.cli.main import main

    started = time.perf_counter()
    status = main(argv)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rank = int(os.environ.get("RANK", "0"))
    record = {
        "status": status,
        "peak_mib": peak_kib / 1024,
        "seconds": time.perf_counter() - started,
    }
    Path(report.format(rank=rank)).write_text(json.dumps(record))


def write_images(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)


def measure(args: argparse.Namespace, work: Path) -> list[dict]:
    images = work / "images"
    write_images(images, args.images, 64 if args.smoke else 256)
    model = SMOKE_MODEL if args.smoke else ["--config", args.preset]
    rows = []
    for name, processes, strategy, checkpointing in ROWS:
        out = work / name.replace(" ", "-").replace(",", "")
        argv = [
            "pretrain", *model, "--data.source", str(images), "--data.num_workers", "0",
            "--optim.batch_size", str(args.batch), "--optim.accum_steps", "1",
            "--optim.epochs", "1", "--optim.warmup_epochs", "0", "--run.output_dir", str(out),
            "--run.strategy", strategy, "--run.activation_checkpointing", str(checkpointing),
            "--run.precision", args.precision, "--run.device", args.device,
            "--run.compile", "false", "--run.pictures_every", "0", "--run.tensorboard", "false",
            "--run.progress", "false", "--run.save_every_steps", "0",
        ]  # fmt: skip
        report = str(work / f"{out.name}-{{rank}}.json")
        script = [__file__, "--child", report, "--", *argv]
        if processes == 1:
            command = [sys.executable, *script]
        else:
            command = [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(processes), *script,
            ]  # fmt: skip
        environment = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // processes))}
        done = subprocess.run(command, capture_output=True, text=True, env=environment)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        ranks = [json.loads(Path(report.format(rank=r)).read_text()) for r in range(processes)]
        rows.append(
            {
                "configuration": name,
                "processes": processes,
                "batch_per_process": args.batch,
                "peak_mib_per_process": max(r["peak_mib"] for r in ranks),
                "seconds": max(r["seconds"] for r in ranks),
            }
        )
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| configuration | processes | batch per process | peak MiB per process | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['configuration']} | {r['processes']} | {r['batch_per_process']} | "
            f"{r['peak_mib_per_process']:.0f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[4:], sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vit_large_in1k")
    parser.add_argument("--batch", type=int, default=8, help="images per process per step")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--smoke", action="store_true", help="a tiny model (seconds)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.images, args.batch = 16, 4
    with tempfile.TemporaryDirectory() as work:
        rows = measure(args, Path(work))
    print()
    print(table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"preset": "smoke" if args.smoke else args.preset, "rows": rows}
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""The CPU demo, timed whole: `droppos pretrain` (no options) of this checkout against a revision.

Each run is a fresh process, timed from its start to its exit (start-up, imports and the
monitors included), this checkout and the baseline in turn (A B A B ...), so that a machine whose
speed drifts moves both alike; the ratio is taken pair by pair and its median reported. The
baseline runs from a `git worktree` of `--baseline`, with the same interpreter and packages.
`--busy` keeps one other process spinning on a core throughout (a shared machine). `--steps`
instead times one training step of each pretext on the demo (batch 64, one process, the step
timer of `benchmarks/gpu.py`): the "Choosing a pretext" table of docs/guide/pretraining.md.

    python benchmarks/cpu_demo.py --json benchmarks/results/cpu_demo.json
    python benchmarks/cpu_demo.py --busy --pairs 2 --json benchmarks/results/cpu_demo_busy.json \
        -- --optim.epochs 1
    python benchmarks/cpu_demo.py --steps --json benchmarks/results/cpu_demo_steps.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ENTRY = "import sys; from droppos.cli.main import main; sys.exit(main())"


def timed_run(source: Path, extra: list[str], work: Path) -> dict[str, Any]:
    """One `droppos pretrain` from the package under `source`: wall and CPU seconds, accuracy."""
    out = work / f"run-{time.monotonic_ns()}"
    command = [
        sys.executable,
        "-c",
        ENTRY,
        "pretrain",
        "--run.output_dir",
        str(out),
        "--run.progress",
        "false",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(source)}
    errors = work / f"{out.name}.err"
    with errors.open("wb") as stderr:
        start = time.perf_counter()
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own CPU time
        wall = time.perf_counter() - start
    child.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if code != 0:
        raise SystemExit(f"{source}: exit {code}: {errors.read_text()[-500:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "position_accuracy": summary["position_accuracy"],
        "precision": summary.get("precision", "not recorded"),
        "threads": summary.get("threads", "not recorded"),
    }


PRETEXTS = {
    "droppos": [],
    "mp3": ["--model.name", "mp3"],
    "mae": ["--model.name", "mae"],
    "droppos + pixel branch": ["--model.pixel_branch.depth", "2"],
}


def loop_for(argv: list[str], work: Path) -> Any:
    """The training loop `droppos pretrain ARGV` would run, writing under `work`."""
    from droppos.cli.main import parser_for, resolve_presets, to_config
    from droppos.methods.pretrain import pretraining_loop

    argv = resolve_presets([*argv, "--run.output_dir", str(work / f"run-{time.monotonic_ns()}")])
    parser = parser_for(argv)
    return pretraining_loop(to_config(parser, parser.parse_args(argv), "pretrain"))


def pretext_steps(work: Path) -> dict[str, dict[str, Any]]:
    """ms and GFLOP of one demo step of each pretext, all in this process, one after another."""
    import torch
    from gpu import time_steps

    rows = {}
    for name, options in PRETEXTS.items():
        loop = loop_for(["pretrain", *options], work)
        try:
            rows[name] = time_steps(loop, batch=64, accum=1, steps=30, warmup=5)
        finally:
            loop.close()
        rows[name].update(precision=loop.precision, threads=torch.get_num_threads())
        print(
            f"| {name} | {rows[name]['ms_per_step']:.0f} ms | "
            f"{rows[name]['gflop_per_step']:.1f} GFLOP | {loop.precision} |",
            flush=True,
        )
    return rows


def spin() -> subprocess.Popen:
    """Another program keeping one core busy (what `yes > /dev/null` does)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def write_json(path: Path | None, report: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="b0aebe1", help="git revision to compare with")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--busy", action="store_true", help="one spinning process beside")
    parser.add_argument("--steps", action="store_true", help="time one step of each pretext")
    parser.add_argument("--json", type=Path)
    parser.add_argument("extra", nargs="*", help="options for both runs (after --)")
    args = parser.parse_args()
    from droppos.engine.precision import cpu_has_native_bf16

    machine = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "native_bf16": cpu_has_native_bf16(),
        "python": platform.python_version(),
    }
    if args.steps:
        print("| pretext | step | FLOPs | precision |\n|---|---|---|---|")
        with tempfile.TemporaryDirectory(prefix="cpu-demo-") as folder:
            steps = {"machine": machine, "steps": pretext_steps(Path(folder))}
        write_json(args.json, steps)
        return
    with tempfile.TemporaryDirectory(prefix="cpu-demo-") as folder:
        work, tree = Path(folder), Path(folder) / "baseline"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.baseline],
            check=True,
            capture_output=True,
        )
        busy = spin() if args.busy else None
        runs: dict[str, list[dict[str, Any]]] = {"this checkout": [], "baseline": []}
        try:
            for pair in range(args.pairs):
                for name, source in (("this checkout", ROOT / "src"), ("baseline", tree / "src")):
                    runs[name].append(timed_run(source, args.extra, work))
                    print(f"pair {pair + 1}: {name} {runs[name][-1]['wall_seconds']} s", flush=True)
        finally:
            if busy is not None:
                busy.kill()
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                check=False,
                capture_output=True,
            )
    ratios = [a["wall_seconds"] / b["wall_seconds"] for a, b in zip(*runs.values(), strict=True)]
    report = {
        "machine": machine,
        "baseline": args.baseline,
        "busy": args.busy,
        "options": args.extra,
        "runs": runs,
        "wall_ratio_median": round(statistics.median(ratios), 3),
    }
    print(
        f"\n{machine['cpu']}, {machine['cores']} cores, native bf16: {machine['native_bf16']}; "
        f"busy: {args.busy}; options: {args.extra}"
    )
    print("| run | wall s (median, min-max) | CPU s | position accuracy | precision, threads |")
    print("|---|---|---|---|---|")
    for name, rows in runs.items():
        walls = [r["wall_seconds"] for r in rows]
        cpu = statistics.median(r["cpu_seconds"] for r in rows)
        print(
            f"| {name} | {statistics.median(walls):.1f} ({min(walls):.1f}-{max(walls):.1f}) | "
            f"{cpu:.1f} | {rows[-1]['position_accuracy']:.3f} | "
            f"{rows[-1]['precision']}, {rows[-1]['threads']} |"
        )
    ratio = report["wall_ratio_median"]
    print(f"this checkout / baseline, median of {len(ratios)} pairs: {ratio} ({1 / ratio:.2f}x)")
    write_json(args.json, report)


if __name__ == "__main__":
    main()

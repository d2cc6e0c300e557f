"""Small-scale study of the attentive pass: what the paper's full-image pass buys, and what the
cheaper departures cost, on the embedded demo set.

For each variant: `droppos pretrain` with the demo defaults plus the variant's options, then
`droppos knn` and `droppos linprobe` on the checkpoint. Prints a table (pre-training wall time,
final position accuracy, kNN and linear-probe top-1) and writes JSON. Runs one after another:
never two trainings at once on a small machine.

    python benchmarks/attentive_variants.py --output-dir runs/attentive-study \
        --json benchmarks/results/cpu_demo_attentive_variants.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from study import droppos  # one way to run a droppos command, shared by the benchmarks

VARIANTS: dict[str, list[str]] = {
    "full_image (paper, default)": [],
    "visible (deviation)": ["--model.attentive_source", "visible"],
    "off (paper's ablation)": ["--model.attentive", "false"],
}


def run_variant(name: str, options: list[str], root: Path, extra: list[str]) -> dict[str, Any]:
    folder = root / name.split()[0]
    droppos("pretrain", "--run.output_dir", str(folder / "pretrain"), *options, *extra)
    checkpoint = str(folder / "pretrain" / "last.pth")
    for command in ("knn", "linprobe"):
        droppos(
            command, "--model.checkpoint", checkpoint, "--run.output_dir", str(folder / command)
        )
    summary = json.loads((folder / "pretrain" / "summary.json").read_text())
    knn = json.loads((folder / "knn" / "results.json").read_text())
    probe = json.loads((folder / "linprobe" / "results.json").read_text())
    return {
        "variant": name,
        "options": options,
        "pretrain_seconds": summary["wall_seconds"],
        "position_accuracy": summary["position_accuracy"],
        "knn_top1": knn["top1"],
        "linprobe_top1": probe["top1"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| attentive pass | pre-training s | position acc. (dropped) | kNN top-1 "
        "| linear probe top-1 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['pretrain_seconds']:.0f} | {r['position_accuracy']:.3f} "
            f"| {r['knn_top1']:.1f} | {r['linprobe_top1']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/attentive-study"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("pretrain_options", nargs="*", help="passed to every pretrain, after --")
    args = parser.parse_args(argv)
    rows = []
    for name in args.variants:
        rows.append(run_variant(name, VARIANTS[name], args.output_dir, args.pretrain_options))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()

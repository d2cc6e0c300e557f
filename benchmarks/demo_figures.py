"""Every figure the documentation quotes for the built-in demo, from one command, into one JSON.

    python benchmarks/demo_figures.py --output-dir runs/demo-figures \
        --json benchmarks/results/demo_figures.json

Runs what the documentation's demo sections say a user runs, with their defaults, each in its
own process as a user would: DropPos and MP3 pre-training, kNN and linear probe (mean token and
`[CLS]`) of the pre-trained and the freshly initialised encoder, 10-epoch fine-tuning of both,
the position probe of the four encoders at 0.75 and 0 dropped, order sensitivity of both
classifiers, and the raw-pixel floor (the same kNN and linear-probe code on the standardised
pixels). Every command's own results.json / summary.json is kept whole, with its wall time; the
machine (CPU, bf16 or not, threads) is recorded beside them. Resumable: a finished step's JSON
is not recomputed.
`tests/test_docs.py` checks the pages' demo figures (tests/demo_figure_quotes.txt) against the
committed JSON. About 20 minutes on a 2-core CPU with native bf16.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from droppos._version import __version__
from droppos.data.catalog import build_source
from droppos.engine.precision import resolve_precision
from droppos.evaluation.backbone import BackboneSection, backbone_from
from droppos.evaluation.datasets import EvalDataSection, eval_view
from droppos.evaluation.features import FrozenFeatures
from droppos.evaluation.knn import knn_accuracy
from droppos.evaluation.linprobe import ProbeSection, train_probes

ENTRY = "import sys; from droppos.cli.main import main; sys.exit(main())"  # keeps the exit code
QUIET = ["--run.progress", "false"]


def droppos(*args: str) -> float:
    """One droppos command in its own process; its wall time (s). Stops on a failure."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", ENTRY, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: droppos {' '.join(args)}\n{done.stderr[-3000:]}")
    return round(time.perf_counter() - started, 1)


class Steps:
    """Each step's record under output_dir/steps/NAME.json: computed once, then read."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "steps").mkdir(parents=True, exist_ok=True)

    def run(self, name: str, args: list[str], result_file: str = "results.json") -> dict[str, Any]:
        record = self.root / "steps" / f"{name}.json"
        if record.exists():
            return json.loads(record.read_text())
        folder = self.root / name
        seconds = droppos(*args, "--run.output_dir", str(folder), *QUIET)
        found = json.loads((folder / result_file).read_text())
        found["command_seconds"] = seconds
        metrics = folder / "metrics.jsonl"
        if metrics.is_file():  # a training run: its per-epoch records (monitors, val top-1)
            lines = [json.loads(line) for line in metrics.read_text().splitlines()]
            found["epochs"] = [r for r in lines if r.get("kind") == "epoch"]
        record.write_text(json.dumps(found, indent=1))
        print(f"{name}: {seconds:.0f} s", flush=True)
        return found

    def computed(self, name: str, compute: Any) -> dict[str, Any]:
        record = self.root / "steps" / f"{name}.json"
        if record.exists():
            return json.loads(record.read_text())
        started = time.perf_counter()
        found = compute()
        found["command_seconds"] = round(time.perf_counter() - started, 1)
        record.write_text(json.dumps(found, indent=1))
        print(f"{name}: {found['command_seconds']:.0f} s", flush=True)
        return found


def raw_pixels() -> dict[str, Any]:
    """kNN and linear probe (droppos's own, the linprobe defaults) on the standardised pixels
    of the demo split: the floor any feature must beat."""
    backbone = backbone_from(BackboneSection(checkpoint="random"))  # only for the pixel view
    data = EvalDataSection(source="demo", num_workers=0)
    splits = {}
    for split in ("train", "val"):
        dataset = eval_view(build_source("demo", split), data, backbone)
        images, labels = zip(*(dataset[i] for i in range(len(dataset))))
        splits[split] = (torch.stack(images).flatten(1), torch.as_tensor(labels))
    (train_x, train_y), (val_x, val_y) = splits["train"], splits["val"]
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    knn = knn_accuracy(train_x, train_y, val_x, val_y, 10)
    features = FrozenFeatures(train_x, train_y, val_x, val_y, 10, backbone, 0.0)
    probes = train_probes(features, ProbeSection())
    best = max(probes, key=lambda r: (r["top1"], r["top5"]))
    return {"knn_top1": knn["top1"], "linprobe_top1": best["top1"], "probes": probes}


def machine() -> dict[str, Any]:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((x.split(":", 1)[1].strip() for x in flags.splitlines() if "model name" in x), "")
    return {
        "cpu": model or platform.processor(),
        "cores": torch.get_num_threads(),
        "native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "default_precision": resolve_precision("auto", torch.device("cpu")),
        "torch": torch.__version__,
        "droppos": __version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo-figures"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/demo_figures.json"))
    args = parser.parse_args(argv)
    steps, root = Steps(args.output_dir), args.output_dir
    demo, mp3 = root / "pretrain" / "last.pth", root / "pretrain-mp3" / "last.pth"
    found: dict[str, Any] = {"machine": machine()}
    found["pretrain"] = steps.run("pretrain", ["pretrain"], "summary.json")
    found["pretrain_mp3"] = steps.run("pretrain-mp3", ["pretrain", "--model.name", "mp3"],
                                      "summary.json")  # fmt: skip
    for init in ("pretrained", "random"):
        backbone = ["--model.checkpoint", str(demo), "--model.random_init",
                    str(init == "random").lower()]  # fmt: skip
        for feature in ("avg", "cls"):
            for command in ("knn", "linprobe"):
                name = f"{command}-{init}-{feature}"
                found[name] = steps.run(name, [command, *backbone, "--model.feature", feature])
        found[f"finetune-{init}"] = steps.run(f"finetune-{init}", ["finetune", *backbone])
    for command in ("knn", "linprobe"):
        found[f"{command}-mp3"] = steps.run(f"{command}-mp3",
                                            [command, "--model.checkpoint", str(mp3)])  # fmt: skip
    encoders = {
        "pretrained": ["--model.checkpoint", str(demo)],
        "random": ["--model.checkpoint", str(demo), "--model.random_init", "true"],
        "finetuned": ["--model.checkpoint", str(root / "finetune-pretrained" / "best.pth")],
        "finetuned-random": ["--model.checkpoint", str(root / "finetune-random" / "best.pth")],
        "mp3": ["--model.checkpoint", str(mp3)],
    }
    for name, backbone in encoders.items():
        for ratio in ("0.75", "0"):
            if name == "mp3" and ratio == "0":
                continue
            step = f"probe-position-{name}-{ratio}"
            found[step] = steps.run(step, ["probe-position", *backbone, "--probe.drop_ratio",
                                           ratio])  # fmt: skip
    for name in ("finetuned", "finetuned-random"):
        found[f"order-sensitivity-{name}"] = steps.run(
            f"order-sensitivity-{name}", ["order-sensitivity", *encoders[name]]
        )
    found["raw_pixels"] = steps.computed("raw-pixels", raw_pixels)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(found, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

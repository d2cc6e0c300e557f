"""The throughput benchmark runs end to end on a tiny model (its figures live in RESULTS.md)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "throughput.py"


def test_benchmark_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable, str(SCRIPT), "--model", "droppos_vit_tiny_patch16", "--img-size", "32",
        "--batches", "2", "--precisions", "fp32", "--steps", "1", "--warmup", "1",
        "--attentive-modes", "full_image", "visible", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| timm supervised |" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["timm supervised"] + ["droppos_vit_tiny_patch16"] * 2
    paper, visible = rows[1], rows[2]
    assert paper["ratio_to_supervised"] > 0 and visible["ratio_to_supervised"] > 0
    phases = ("attentive_ms", "encoder_ms", "decoder_loss_ms", "backward_optimizer_ms")
    assert all(paper[p] > 0 for p in phases)
    assert 0 < paper["fraction_of_peak"] < 1.5

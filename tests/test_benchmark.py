"""The throughput benchmark runs end to end on a tiny model (its figures live in RESULTS.md)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "throughput.py"


@pytest.mark.slow  # a benchmark smoke test: minutes on 2 cores
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
    phases = ("attentive_ms", "forward_ms", "backward_optimizer_ms")
    assert all(paper[p] > 0 for p in phases)
    assert 0 < paper["fraction_of_peak"] < 1.5


@pytest.mark.slow  # a benchmark smoke test: minutes on 2 cores
def test_live_memory_of_a_step_grows_linearly_with_batch(tmp_path):
    """No term of the step grows with batch squared: equal batch steps add equal live bytes."""
    out = tmp_path / "memory.json"
    command = [
        sys.executable, str(SCRIPT), "--model", "droppos_vit_tiny_patch16", "--img-size", "32",
        "--batches", "4", "8", "16", "--precisions", "fp32", "--memory-only", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MiB per image" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows].count("timm supervised") == 3  # the yardstick, measured too
    rows = [r for r in rows if r["model"] == "droppos_vit_tiny_patch16"]
    peaks = [r["live_peak_forward_backward_mib"] for r in rows]
    per_image = [(peaks[1] - peaks[0]) / 4, (peaks[2] - peaks[1]) / 8]
    assert per_image[0] > 0
    assert abs(per_image[1] - per_image[0]) < 0.02 * per_image[0]
    optimizer = [r["live_peak_optimizer_mib"] for r in rows]
    assert max(optimizer) - min(optimizer) < 0.01 * optimizer[0]  # batch-independent


@pytest.mark.slow  # a benchmark smoke test: minutes on 2 cores
def test_data_benchmark_measures_decode_augment_and_loader_apart(tmp_path):
    out = tmp_path / "data.json"
    script = SCRIPT.with_name("data_throughput.py")
    command = [
        sys.executable, str(script), "--images", "12", "--batch", "4", "--workers", "0", "1",
        "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {(r["stage"], r["path"], r["workers"]) for r in result["rows"]}
    for path in ("pil", "draft", "tensor"):
        assert ("decode + augment + mask noise", path, 0) in rows
        assert {("loader, batch 4", path, 0), ("loader, batch 4", path, 1)} <= rows
    assert ("choose crop + mask noise (workers' share)", "device", 0) in rows
    assert all(r["images_per_second"] > 0 for r in result["rows"])
    assert result["pixel_difference"]["draft_vs_pil"] == 0  # 500 x 375: no reduction possible
    assert result["pixel_difference"]["decode"] == 0  # both decoders are libjpeg-turbo


@pytest.mark.slow  # a benchmark smoke test: a minute on 2 cores
def test_the_fsdp_memory_benchmark_measures_every_configuration(tmp_path):
    out = tmp_path / "memory.json"
    script = SCRIPT.with_name("fsdp_memory.py")
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["processes"] for r in rows] == [1, 2, 2, 2]
    assert all(r["peak_mib_per_process"] > 100 for r in rows)


GPU_SCRIPT = SCRIPT.with_name("gpu.py")


def without_jsonargparse(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python processes (the script's child too) cannot import
    jsonargparse, as on the lent GPU machine."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['jsonargparse'] = None\n")
    path = [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


@pytest.mark.slow  # a benchmark's smoke run
def test_the_gpu_script_runs_every_part_in_smoke_mode(tmp_path):
    """CI runs `benchmarks/gpu.py --smoke` (the whole script on the CPU, tiny): what the lent
    GPU will run is the code that ran here, without jsonargparse, which that machine lacks."""
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(GPU_SCRIPT), "--smoke", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=without_jsonargparse(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] and not report["skipped"]
    assert report["facts"]["measured_peak_tflops"] > 0
    rows = {(r["row"], r["batch"], r["accum"]) for r in report["steps"]}
    assert ("DropPos", 8, 1) in rows and ("timm ViT-B, supervised", 8, 1) in rows
    assert {"MAE", "DropPos, attentive visible", "DropPos, attentive off"} <= {r[0] for r in rows}
    assert all(r["gflop_per_step"] > 0 and r["images_per_second"] > 0 for r in report["steps"])
    assert {r["decode"] for r in report["loader"]} == {"pil", "draft", "tensor", "device"}
    assert len(report["sync_debug"]) == 4
    assert all(r["host_ms_in_to_device_per_batch"] > 0 for r in report["sync_debug"])
    assert all(r["result"].startswith("2 steps") for r in report["sync_debug"])
    assert report["end_to_end"]["images_per_second"] > 0, report["end_to_end"]
    assert "| DropPos | 8 x 1 |" in done.stdout and "end to end" in done.stdout


def test_the_gpu_script_keeps_what_it_measured_when_killed(tmp_path):
    """A lent GPU session ends by killing the command: the JSON, rewritten after every row and
    on SIGTERM, still holds the rows measured so far. The cheap rows come first: the DropPos
    step at the target batch is the first step row."""
    out = tmp_path / "gpu.json"
    command = [sys.executable, str(GPU_SCRIPT), "--smoke", "--budget-s", "60", "--json", str(out)]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=without_jsonargparse(tmp_path),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if out.exists() and json.loads(out.read_text())["steps"]:
                break
            time.sleep(0.2)
        assert process.poll() is None, process.stderr.read()[-3000:]
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    report = json.loads(out.read_text())
    assert report["stopped_by"] == "SIGTERM" and not report["complete"]
    assert report["facts"]["measured_peak_tflops"] > 0
    first = report["steps"][0]
    assert (first["row"], first["batch"], first["compile"]) == ("DropPos", 8, False)
    assert first["images_per_second"] > 0
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.slow  # 15 s; the kill test keeps the default run's check of the JSON
def test_the_gpu_script_records_the_rows_its_budget_leaves_out(tmp_path):
    """A row that would start past `--budget-s` is skipped and says so in the JSON; `--parts`
    chooses the rows."""
    out = tmp_path / "gpu.json"
    command = [sys.executable, str(GPU_SCRIPT), "--smoke", "--budget-s", "0", "--parts",
               "facts,steps", "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] and not report["steps"] and "facts" not in report
    skipped = [(s["part"], s["row"]) for s in report["skipped"]]
    assert skipped[:2] == [("facts", "facts"), ("steps", "DropPos, 8 x 1, compile False")]
    assert {part for part, _ in skipped} == {"facts", "steps"}
    wrong = subprocess.run([*command[:2], "--parts", "steps,gpu"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "--parts: unknown gpu" in wrong.stderr


@pytest.mark.slow  # a child pre-training process, killed
def test_the_gpu_script_stops_an_end_to_end_run_at_its_timeout(tmp_path):
    out = tmp_path / "gpu.json"
    command = [sys.executable, str(GPU_SCRIPT), "--smoke", "--parts", "end_to_end",
               "--end-to-end-timeout", "1", "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    e2e = json.loads(out.read_text())["end_to_end"]
    assert e2e["error"] == "killed after 1 s" and e2e["images_per_second"] is None
    assert "(killed after 1 s)" in done.stdout


def test_the_gpu_script_names_the_datasheet_peak_of_the_exact_card():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", GPU_SCRIPT)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    assert gpu.datasheet_peak("NVIDIA H100 80GB HBM3") == ("H100", 989.0)
    assert gpu.datasheet_peak("NVIDIA H100 PCIe") == ("H100 PCIe", 756.0)
    assert gpu.datasheet_peak("NVIDIA H200") == ("H200", 989.0)
    assert gpu.datasheet_peak("NVIDIA L4") == ("L4", 121.0)
    assert gpu.datasheet_peak("NVIDIA L40S") == ("L40S", 362.0)
    assert gpu.datasheet_peak("Tesla T4") == (None, None)


@pytest.mark.slow  # a benchmark smoke test: half a minute on 2 cores
def test_the_cpu_demo_benchmark_times_both_revisions_in_turn(tmp_path):
    out = tmp_path / "demo.json"
    script = Path(__file__).parents[1] / "benchmarks" / "cpu_demo.py"
    command = [sys.executable, str(script), "--baseline", "HEAD", "--pairs", "1", "--json",
               str(out), "--", "--optim.epochs", "1", "--run.monitor_every", "0"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| this checkout |" in done.stdout and "| baseline |" in done.stdout
    report = json.loads(out.read_text())
    assert [len(runs) for runs in report["runs"].values()] == [1, 1]
    assert all(r["wall_seconds"] > 0 and r["cpu_seconds"] > 0 for r in report["runs"]["baseline"])
    assert report["wall_ratio_median"] > 0

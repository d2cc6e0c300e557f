"""scripts/gpu_check.sh: every part runs whatever another did, and the exit status says whether
all passed (CI runs the whole smoke check from scripts/test.sh)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "gpu_check.sh"
PARTS = ["versions", "cuda_tests", "ddp_accum2", "fsdp_bf16", "benchmark"]


def check(out, *args, **env):
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env={**os.environ, "OUT": str(out), **env},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_a_failing_part_stops_no_other_and_fails_the_check(tmp_path):
    done = check(tmp_path, "--smoke", PYTHON="false")  # every Python command fails at once
    assert done.returncode == 1, done.stdout[-2000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["passed"] is False and summary["mode"] == "smoke"
    parts = [p for p in summary["parts"] if p["name"] != "install"]  # only with gpu-wheels/
    assert [p["name"] for p in parts] == PARTS
    assert {p["status"] for p in parts} == {"failed"}
    assert "=== benchmark: failed" in (tmp_path / "gpu_check.log").read_text()


def test_only_runs_the_parts_it_names(tmp_path):
    check(tmp_path, "--smoke", PYTHON="false", ONLY="benchmark fsdp_bf16")
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert [p["name"] for p in parts if p["name"] != "install"] == ["fsdp_bf16", "benchmark"]


def test_an_unknown_option_is_refused(tmp_path):
    done = check(tmp_path, "--bogus")
    assert done.returncode == 2 and "usage: scripts/gpu_check.sh" in done.stderr


@pytest.mark.slow  # about 110 s on 2 shared cores
def test_the_smoke_check_passes_and_writes_at_most_eight_files(tmp_path):
    done = check(tmp_path, "--smoke")
    assert done.returncode == 0, done.stdout[-3000:]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["passed"] is True
    assert json.loads((tmp_path / "gpu.json").read_text())
    assert len(list(tmp_path.iterdir())) <= 8

"""The DropPos vs MAE study: its smoke version runs end to end, resumes, and its dense proxy
measures what it claims (the figures themselves live in benchmarks/STUDY.md)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "study.py"


def load_study():
    spec = importlib.util.spec_from_file_location("study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_foreground_fraction_counts_bright_pixels_per_patch():
    study = load_study()
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, :2, :2] = 1.0  # top-left patch all foreground
    image[0, 0, 2, 2] = 1.0  # one pixel of the bottom-right patch
    image[0, 0, 0, 2] = 0.1  # below the level: background
    normalised = (image - 0.5) / 0.25
    fractions = study.foreground_fraction(normalised, mean=0.5, std=0.25, patch=2)
    assert fractions.tolist() == [[1.0, 0.0, 0.0, 0.25]]


def test_dense_proxy_scores_informative_features_above_noise():
    study = load_study()
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(4000, generator=generator)
    noise = torch.randn(4000, 8, generator=generator)
    informative = torch.cat([target[:, None], noise[:, 1:]], 1)
    good = study.dense_proxy(informative[:3000], target[:3000], informative[3000:], target[3000:])
    bad = study.dense_proxy(noise[:3000], target[:3000], noise[3000:], target[3000:])
    assert good["dense_mae"] < 0.5 and good["dense_miou"] > 99
    assert bad["dense_mae"] > 20 and bad["dense_miou"] < 60


@pytest.mark.slow  # a benchmark smoke test: two minutes on 2 cores
def test_smoke_study_writes_table_json_and_plots_then_resumes(tmp_path):
    """One pre-trained row and the raw-pixel floor, a few steps on the demo set, with its
    label-efficiency fine-tuning; a second run skips every finished step and reports the same
    numbers."""
    command = [
        sys.executable, str(SCRIPT), "--smoke", "--output-dir", str(tmp_path / "runs"),
        "--report-dir", str(tmp_path / "report"), "--seeds", "1",
        "--rows", "raw pixels", "DropPos (paper defaults)",
    ]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    report = tmp_path / "report"
    rows = json.loads((report / "study.json").read_text())
    assert [r["row"] for r in rows] == ["raw pixels", "DropPos (paper defaults)"]
    pixels, droppos = rows
    for key in ("knn_cls", "linprobe_avg", "linprobe_cls+avg", "position_probe", "dense_mae"):
        assert 0 <= droppos[key] <= 100, key
    # every choice on the validation hold-out, every run kept
    assert droppos["linprobe_feature"] in ("cls", "avg", "cls+avg")
    seed0 = droppos["per_seed"][0]
    assert set(seed0["linprobe_avg_sweep_val"]) == {"3.0", "10.0", "30.0", "100.0"}
    assert seed0["linprobe_avg_base_lr"] == float(max(seed0["linprobe_avg_sweep_val"].items(),
                                                      key=lambda kv: kv[1])[0])  # fmt: skip
    labels = droppos["labels"]
    assert labels["recipe"] in labels["grid"] and len(labels["grid"]) == 2
    few, every = labels["budgets"]["1 %"], labels["budgets"]["100 %"]
    assert [run["train_size"] for run in few["seeds"]] == [40, 40]
    assert {run["val_size"] for run in few["seeds"] + every["seeds"]} == {500}
    assert every["images"] == 3500  # 4,000 less the 500 held out
    assert few["seeds"][0] == labels["grid"][labels["recipe"]]  # the pick is reported, not rerun
    for key in ("finetune 1 %", "finetune 100 %"):
        assert 0 <= droppos[key] <= 100, key
    # far above chance (10 %) whatever a few pre-training steps learnt: the raw pixels need no
    # training (about 80 % on the demo set), and any encoder's frozen features (random ones
    # score 63 with a kNN) are far from a vote over shuffled or misread labels; the smoke's
    # 2-epoch probe is still at twice chance (22 measured)
    assert pixels["knn_cls"] > 60 and pixels["linprobe_cls"] > 60
    assert droppos["knn_avg"] > 30 and droppos["linprobe_avg"] > 20
    assert droppos["position_probe"] > 100 / 16  # above chance: positions are in the features
    assert droppos["position_accuracy"] > 0 and droppos["pretrain_seconds"] > 0
    assert "| DropPos (paper defaults) | 1 |" in (report / "table.md").read_text()
    for picture in ("position_accuracy.png", "downstream.png", "label_efficiency.png"):
        assert (report / picture).read_bytes()[:4] == b"\x89PNG"

    checkpoint = tmp_path / "runs" / "droppos-paper-defaults" / "seed0" / "pretrain" / "last.pth"
    stamp = checkpoint.stat().st_mtime_ns
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert checkpoint.stat().st_mtime_ns == stamp  # nothing re-trained
    assert json.loads((report / "study.json").read_text()) == rows


def test_a_refused_droppos_command_stops_the_study_with_its_message():
    study = load_study()
    try:
        study.droppos("pretrain", "--optim.epochs", "abc")
    except SystemExit as stopped:
        assert "--optim.epochs: expected int" in str(stopped)
    else:
        raise AssertionError("a refused command must stop the study")


DENSE_SCRIPT = SCRIPT.with_name("dense_study.py")


@pytest.mark.slow  # a benchmark smoke test: several minutes on 2 cores
def test_smoke_dense_study_writes_its_table_with_seeds_then_resumes(tmp_path):
    command = [sys.executable, str(DENSE_SCRIPT), "--smoke", "--output-dir",
               str(tmp_path / "runs"), "--report-dir", str(tmp_path / "report"),
               "--rows", "raw pixels", "random init"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    found = json.loads((tmp_path / "report" / "dense_study.json").read_text())
    assert set(found) == {"raw pixels", "random init"}
    random = found["random init"]
    assert len(random["probe_test"]) == len(random["knn_test"]) == 3
    assert len(random["finetune_test"]) == 3 and "finetune_test" not in found["raw pixels"]
    assert random["probe_choice"]["blocks"] in (1, 4)
    table = (tmp_path / "report" / "dense_table.md").read_text()
    assert "| random init |" in table and "±" in table
    again = subprocess.run(command, check=True, capture_output=True, text=True)
    assert again.stdout.count("| random init |") >= 1  # every step was cached: no retraining
    assert json.loads((tmp_path / "report" / "dense_study.json").read_text()) == found


def test_a_failing_apt_get_is_one_line_with_apts_own_error(tmp_path, monkeypatch):
    """--install-data used to swallow apt's error and end in a CalledProcessError traceback."""
    study = load_study()
    fake = tmp_path / "bin" / "apt-get"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'E: Could not open lock file' >&2\nexit 100\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    monkeypatch.setattr(study, "FASHION_MNIST_FILE", tmp_path / "absent.gz")
    monkeypatch.setattr(study.os, "geteuid", lambda: 0)
    with pytest.raises(SystemExit) as stop:
        study.ensure_fashion_mnist(install=True)
    message = str(stop.value)
    assert "apt-get update` failed (exit 100): E: Could not open lock file" in message
    assert "\n" not in message

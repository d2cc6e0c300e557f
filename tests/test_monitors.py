"""Monitors measure the features while pre-training runs, and never change the training."""

from __future__ import annotations

import json

import pytest
import torch

from droppos.cli.main import main
from droppos.engine.loop import TrainLoop
from droppos.interop.schema import load_object
from tests.helpers import write_split_images


def tiny(output_dir, source, *extra):
    return [
        "pretrain", "--model.encoder.img_size", "16", "--model.encoder.patch_size", "4",
        "--model.encoder.in_chans", "3", "--model.encoder.embed_dim", "32",
        "--model.encoder.depth", "1", "--model.encoder.num_heads", "2",
        "--model.decoder_embed_dim", "32", "--model.decoder_num_heads", "2",
        "--data.source", str(source), "--data.num_workers", "0", "--optim.batch_size", "4",
        "--optim.epochs", "2", "--optim.warmup_epochs", "1", "--run.output_dir", str(output_dir),
        "--run.progress", "false", "--run.precision", "fp32", "--run.tensorboard", "false",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def monitored(tmp_path_factory, image_folder):
    out = tmp_path_factory.mktemp("monitored")
    assert main(tiny(out, image_folder, "--run.monitor_every", "1")) == 0
    return out


def test_monitors_are_logged_every_epoch_asked_and_in_the_summary(monitored, capsys):
    records = [json.loads(line) for line in (monitored / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 2
    for record in epochs:
        assert 0 <= record["monitor_knn_top1"] <= 100
        assert 0 <= record["monitor_position_top1"] <= 100
    summary = json.loads((monitored / "summary.json").read_text())
    assert summary["monitor_knn_top1"] == epochs[-1]["monitor_knn_top1"]


def test_a_run_with_monitors_trains_the_same_weights_as_one_without(
    tmp_path, image_folder, monitored
):
    plain = tmp_path / "plain"
    assert main(tiny(plain, image_folder, "--run.monitor_every", "-1")) == 0
    records = (plain / "metrics.jsonl").read_text()
    assert "monitor_" not in records
    with_monitors = load_object(monitored / "last.pth")["model"]
    without = load_object(plain / "last.pth")["model"]
    assert all(torch.equal(value, without[name]) for name, value in with_monitors.items())


def test_a_monitored_run_resumes_exactly(tmp_path, image_folder, monitored, monkeypatch):
    original = TrainLoop.save

    def save_then_crash(loop, *args, **kwargs):
        original(loop, *args, **kwargs)
        raise KeyboardInterrupt

    interrupted = tmp_path / "interrupted"
    args = tiny(interrupted, image_folder, "--run.monitor_every", "1")
    with monkeypatch.context() as patch:
        patch.setattr(TrainLoop, "save", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            main(args)
    assert main(args) == 0
    straight = load_object(monitored / "last.pth")["model"]
    resumed = load_object(interrupted / "last.pth")["model"]
    assert all(torch.equal(value, resumed[name]) for name, value in straight.items())
    last = lambda out: json.loads((out / "summary.json").read_text())["monitor_knn_top1"]  # noqa: E731
    assert last(interrupted) == last(monitored)


def test_an_unlabelled_source_trains_without_monitors_and_says_so(tmp_path, capsys):
    flat = tmp_path / "flat"
    write_split_images(tmp_path / "split")
    flat.mkdir()
    for i, image in enumerate(sorted((tmp_path / "split" / "train").rglob("*.png"))):
        image.rename(flat / f"{i}.png")
    out = tmp_path / "run"
    assert main(tiny(out, flat, "--run.monitor_every", "1")) == 0
    assert "no monitors" in capsys.readouterr().out
    assert "monitor_" not in (out / "metrics.jsonl").read_text()

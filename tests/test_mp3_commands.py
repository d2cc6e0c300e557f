"""An MP3 checkpoint goes through every command that reads a pre-trained ViT, with no line of
droppos outside `methods/mp3.py` knowing it is MP3, and resumes exactly."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from droppos.cli.main import main
from droppos.engine.loop import TrainLoop
from droppos.interop.schema import load_object
from droppos.methods import pretrained_model

QUIET = ["--data.num_workers", "0", "--run.progress", "false"]


def mp3_args(output_dir, source, *extra):
    return [
        "pretrain", "--model.name", "mp3", "--model.patch_mask_ratio", "0.5",
        "--model.encoder.img_size", "16", "--model.encoder.patch_size", "4",
        "--model.encoder.in_chans", "3", "--model.encoder.embed_dim", "32",
        "--model.encoder.depth", "1", "--model.encoder.num_heads", "2",
        "--data.source", str(source), "--optim.batch_size", "4", "--optim.epochs", "2",
        "--optim.warmup_epochs", "1", "--run.output_dir", str(output_dir),
        "--run.precision", "fp32", "--run.tensorboard", "false", *QUIET, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def mp3_run(tmp_path_factory, image_folder):
    out = tmp_path_factory.mktemp("mp3")
    assert main(mp3_args(out, image_folder)) == 0
    return out


def test_mp3_pretrains_and_logs_positions_over_every_patch(mp3_run):
    records = [json.loads(line) for line in (mp3_run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(0 <= r["position_accuracy"] <= 1 for r in epochs)
    assert all("outside_context_accuracy" in r for r in epochs)
    header, model = pretrained_model(mp3_run / "last.pth")
    assert header.method == "mp3" and not model.pos_embed.any()


def test_an_interrupted_mp3_run_resumes_to_the_same_weights(
    tmp_path, image_folder, mp3_run, monkeypatch
):
    original = TrainLoop.save

    def save_then_crash(loop, *args, **kwargs):
        original(loop, *args, **kwargs)
        raise KeyboardInterrupt

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(TrainLoop, "save", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            main(mp3_args(interrupted, image_folder))
    assert main(mp3_args(interrupted, image_folder)) == 0
    straight = load_object(mp3_run / "last.pth")["model"]
    resumed = load_object(interrupted / "last.pth")["model"]
    assert all(torch.equal(value, resumed[name]) for name, value in straight.items())


def test_an_mp3_checkpoint_goes_through_every_reader(tmp_path, image_folder, mp3_run):
    checkpoint = str(mp3_run / "last.pth")
    data = ["--data.source", str(image_folder), *QUIET]
    commands = {
        "finetune": ["--optim.epochs", "1", "--optim.batch_size", "4"],
        "knn": [],
        "linprobe": ["--probe.epochs", "2", "--probe.warmup_epochs", "0"],
        "probe-position": ["--probe.epochs", "2", "--probe.seeds", "1"],
    }
    for command, extra in commands.items():
        out = tmp_path / command
        args = [command, "--model.checkpoint", checkpoint, *data, "--run.output_dir", str(out)]
        assert main([*args, *extra]) == 0, command
        assert json.loads((out / "results.json").read_text())["top1"] >= 0, command
    pictures = tmp_path / "pictures"
    assert main(["visualize", "--model.checkpoint", checkpoint, "--data.source", str(image_folder),
                 "--run.output_dir", str(pictures)]) == 0  # fmt: skip
    assert len(list(pictures.glob("*.png"))) == 4
    exported = tmp_path / "export"
    assert (
        main(["export", "--model.checkpoint", checkpoint, "--run.output_dir", str(exported)]) == 0
    )
    config = json.loads((exported / "config.json").read_text())
    vit = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    vit.load_state_dict(load_file(str(exported / "model.safetensors")))
    _, model = pretrained_model(checkpoint)
    images = torch.randn(2, 3, 16, 16)
    ours = model.eval().run_blocks(model.embed_patches(images))  # no positions: zeros
    torch.testing.assert_close(vit.eval().forward_features(images), ours, atol=1e-5, rtol=1e-5)

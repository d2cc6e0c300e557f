"""Faults a long run meets: bad images, divergence, preemption, shared folders, full disks,
command-line mistakes. Each ends in one line and the right exit status, never in lost work."""

import errno
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from droppos.cli.main import main
from droppos.data.decode import BadImageError, load_image
from droppos.engine.logging import read_metrics
from droppos.interop import schema as checkpoint_module
from droppos.interop.schema import Progress, load_object
from droppos.methods.droppos import DropPos as DropPosMethod
from droppos.methods.pretrain import PretrainStep
from tests.helpers import progress_of

BAD = {3: "truncated.jpg", 7: "empty.png", 11: "text.png", 15: "huge.png"}


def png_header_only(path, width, height):
    """A PNG whose header claims width x height but holds no pixels: opening it is cheap,
    decoding it would not be."""

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def folder_with_bad_images(tmp_path_factory):
    """20 images in one flat folder, sorted by name; four of them (never neighbours) are bad."""
    root = tmp_path_factory.mktemp("bad-images")
    generator = torch.Generator().manual_seed(0)
    for i in range(20):
        pixels = (torch.rand(20, 20, 3, generator=generator) * 255).to(torch.uint8).numpy()
        if i not in BAD:
            Image.fromarray(pixels).save(root / f"{i:02d}-good.png")
            continue
        path = root / f"{i:02d}-{BAD[i]}"
        if BAD[i] == "truncated.jpg":
            Image.fromarray(pixels).save(path)
            path.write_bytes(path.read_bytes()[:200])
        elif BAD[i] == "empty.png":
            path.write_bytes(b"")
        elif BAD[i] == "text.png":
            path.write_text("this is not an image\n")
        else:
            png_header_only(path, 20000, 20000)
    return root


def tiny_args(output_dir, source, *extra):
    return [
        "pretrain",
        "--model.encoder.img_size", "16", "--model.encoder.patch_size", "4",
        "--model.encoder.in_chans", "3", "--model.encoder.embed_dim", "32",
        "--model.encoder.depth", "1", "--model.encoder.num_heads", "2",
        "--model.decoder_embed_dim", "32", "--model.decoder_num_heads", "2",
        "--data.source", str(source), "--data.num_workers", "0",
        "--optim.batch_size", "4", "--optim.epochs", "2", "--optim.warmup_epochs", "1",
        "--run.output_dir", str(output_dir), "--run.log_every", "1",
        "--run.progress", "false", "--run.precision", "fp32", "--run.tensorboard", "false",
        *extra,
    ]  # fmt: skip


def strict_json_lines(path):
    def refuse(value):
        raise ValueError(f"non-finite {value} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# -- unreadable images -------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_a_folder_with_bad_images_trains_through_and_counts_them(
    tmp_path, folder_with_bad_images, capfd, workers
):
    out = tmp_path / "run"
    extra = ("--data.max_bad_fraction", "0.25", "--data.num_workers", str(workers))
    assert main(tiny_args(out, folder_with_bad_images, *extra)) == 0
    captured = capfd.readouterr()  # the workers' warnings too
    for name in BAD.values():  # each named once in a warning
        assert captured.err.count(name) >= 1, name
    epochs = read_metrics(out / "metrics.jsonl", "epoch")
    assert [e["bad_images"] for e in epochs] == [4, 4]  # every bad file, every epoch
    assert "4 unreadable images skipped" in captured.out
    steps = read_metrics(out / "metrics.jsonl", "step")
    assert len(steps) == 10  # 20 images / batch 4 x 2 epochs: batches kept their size


def test_too_many_bad_images_stop_the_run(tmp_path, folder_with_bad_images, capsys):
    args = tiny_args(tmp_path / "run", folder_with_bad_images)  # default limit: 1%
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unreadable images this epoch" in err and "--data.max_bad_fraction" in err


def test_on_bad_image_fail_stops_at_the_first_naming_it(tmp_path, folder_with_bad_images, capsys):
    args = tiny_args(tmp_path / "run", folder_with_bad_images, "--data.on_bad_image", "fail")
    args += ["--data.num_workers", "1"]  # the error crosses a worker process
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "unreadable image" in err and any(name in err for name in BAD.values())


def test_16_bit_images_keep_their_range(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    grey = np.asarray(load_image(tmp_path / "deep.png"))
    assert grey.dtype == np.uint8 and grey.min() == 0 and grey.max() == 255
    assert abs(grey.mean() - 127.5) < 2  # a ramp, not saturated to white


def test_image_size_limits_are_checked_before_decoding(tmp_path):
    png_header_only(tmp_path / "huge.png", 20000, 20000)
    with pytest.raises(BadImageError, match="20000 x 20000 pixels"):
        load_image(tmp_path / "huge.png")
    Image.new("L", (40, 40)).save(tmp_path / "small.png")
    with pytest.raises(BadImageError, match=r"--data\.max_image_pixels"):
        load_image(tmp_path / "small.png", max_pixels=1000)


# -- divergence --------------------------------------------------------------------------------


def poison_step(monkeypatch, at_step):
    """Make the loss of one optimiser step NaN (its gradients follow)."""
    original, calls = DropPosMethod.forward, []

    def forward(self, engine_model, batch, cache):
        result = original(self, engine_model, batch, cache)
        calls.append(1)
        if len(calls) == at_step:
            share = result.share
            result.share = lambda total: share(total) * float("nan")
        return result

    monkeypatch.setattr(DropPosMethod, "forward", forward)


def test_a_non_finite_step_stops_before_anything_is_saved(
    tmp_path, folder_with_bad_images, monkeypatch, capsys
):
    out = tmp_path / "run"
    poison_step(monkeypatch, at_step=4)
    args = tiny_args(out, folder_with_bad_images, "--data.max_bad_fraction", "1")
    assert main([*args, "--run.save_every_steps", "1", "--run.log_every", "100"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "NaN or infinite at step 4" in err and "step 3" in err  # the last good checkpoint
    saved = load_object(out / "last.pth")
    assert progress_of(out / "last.pth").step == 3
    assert all(v.isfinite().all() for v in saved["model"].values() if v.is_floating_point())
    strict_json_lines(out / "metrics.jsonl")


def test_a_non_finite_step_after_resume_from_elsewhere_names_the_checkpoint_that_exists(
    tmp_path, folder_with_bad_images, monkeypatch, capsys
):
    first, second = tmp_path / "first", tmp_path / "second"
    args = tiny_args(first, folder_with_bad_images, "--data.max_bad_fraction", "1")
    assert main([*args, "--optim.epochs", "1"]) == 0
    poison_step(monkeypatch, at_step=1)
    resumed = tiny_args(second, folder_with_bad_images, "--data.max_bad_fraction", "1")
    assert main([*resumed, "--run.resume", str(first / "last.pth")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(first / "last.pth") in err and str(second / "last.pth") not in err


def test_skip_mode_skips_and_counts_non_finite_steps(
    tmp_path, folder_with_bad_images, monkeypatch, capsys
):
    out = tmp_path / "run"
    poison_step(monkeypatch, at_step=2)
    extra = ("--data.max_bad_fraction", "1", "--run.on_nonfinite", "skip")
    assert main(tiny_args(out, folder_with_bad_images, *extra)) == 0
    epochs = read_metrics(out / "metrics.jsonl", "epoch")
    assert epochs[0]["skipped_steps"] == 1 and "skipped_steps" not in epochs[1]
    weights = load_object(out / "last.pth")["model"]
    assert all(v.isfinite().all() for v in weights.values() if v.is_floating_point())
    for record in strict_json_lines(out / "metrics.jsonl"):
        assert record.get("loss") is None or np.isfinite(record["loss"])

    def refuse(value):
        raise ValueError(f"non-finite {value} in summary.json")

    summary = json.loads((out / "summary.json").read_text(), parse_constant=refuse)
    assert np.isfinite(summary["loss"]) and "skipped_steps" not in summary  # the last epoch's


@pytest.mark.parametrize("command", ["export", "knn", "linprobe", "finetune"])
def test_every_reader_of_weights_refuses_nan_weights(command, tmp_path, capsys):
    from tests.helpers import tiny_droppos

    state = tiny_droppos(embed_dim=64, num_heads=4).state_dict()
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    path = tmp_path / "diverged.pth"
    torch.save({"model": state}, path)
    out = tmp_path / "out"
    assert main([command, "--model.checkpoint", str(path), "--run.output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "NaN or infinite weights" in err and len(err.splitlines()) == 1, err
    assert not [*out.rglob("*.json"), *out.rglob("*.pth")]  # no result, no checkpoint


# -- preemption --------------------------------------------------------------------------------


def test_sigterm_mid_epoch_saves_that_step_and_resumes_exactly(
    tmp_path, folder_with_bad_images, monkeypatch, capsys
):
    extra = ("--data.max_bad_fraction", "1")
    straight = tmp_path / "straight"
    assert main(tiny_args(straight, folder_with_bad_images, *extra)) == 0

    stopped = tmp_path / "stopped"
    original = PretrainStep.after_step

    def after_step(self, step):
        original(self, step)
        if step == 3:  # mid-epoch 1 (5 steps per epoch)
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(PretrainStep, "after_step", after_step)
        assert main(tiny_args(stopped, folder_with_bad_images, *extra)) == 0
    assert "stopped by SIGTERM at epoch 1, step 3" in capsys.readouterr().out
    assert progress_of(stopped / "last.pth") == Progress(epoch=0, batch=3, step=3)
    assert main(tiny_args(stopped, folder_with_bad_images, *extra)) == 0
    final = load_object(stopped / "last.pth")["model"]
    for name, value in load_object(straight / "last.pth")["model"].items():
        assert torch.equal(value, final[name]), name


def started_command(args, out, records: int, poll: float = 0.2) -> subprocess.Popen:
    """`droppos ARGS` in its own process, once `out/metrics.jsonl` holds `records` lines."""
    process = subprocess.Popen(
        [sys.executable, "-m", "droppos.cli.main", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    metrics = out / "metrics.jsonl"
    while not metrics.is_file() or len(read_metrics(metrics)) < records:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(poll)
    return process


def test_a_real_sigterm_to_the_command_exits_0_with_a_checkpoint(tmp_path, folder_with_bad_images):
    out = tmp_path / "run"
    args = tiny_args(out, folder_with_bad_images, "--data.max_bad_fraction", "1")
    args[args.index("--optim.epochs") + 1] = "1000"
    process = started_command(args, out, records=3)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "stopped by SIGTERM" in stdout and "Traceback" not in stderr
    assert progress_of(out / "last.pth").step >= 3
    assert not (out / ".droppos.lock").exists()


def stop_at_step(patch, step_to_stop: int, *names: str) -> None:
    """Send each signal of `names` to this process after optimiser step `step_to_stop`."""
    original = PretrainStep.after_step

    def after_step(self, step):
        original(self, step)
        if step == step_to_stop:
            for name in names:
                os.kill(os.getpid(), getattr(signal, name))

    patch.setattr(PretrainStep, "after_step", after_step)


def test_sigusr1_stops_like_sigterm_at_the_next_step(tmp_path, folder_with_bad_images, capsys):
    out = tmp_path / "run"
    args = tiny_args(out, folder_with_bad_images, "--data.max_bad_fraction", "1")
    with pytest.MonkeyPatch.context() as patch:
        stop_at_step(patch, 2, "SIGUSR1")
        assert main(args) == 0
    assert "stopped by SIGUSR1 at epoch 1, step 2" in capsys.readouterr().out
    assert progress_of(out / "last.pth").step == 2


def test_a_second_ctrl_c_interrupts_at_once_without_the_save(tmp_path, folder_with_bad_images):
    out = tmp_path / "run"
    args = tiny_args(out, folder_with_bad_images, "--data.max_bad_fraction", "1")
    with pytest.MonkeyPatch.context() as patch:
        stop_at_step(patch, 2, "SIGINT", "SIGINT")
        with pytest.raises(KeyboardInterrupt):
            main(args)
    assert not (out / "last.pth").exists()  # the first Ctrl-C's save never happened
    assert not (out / ".droppos.lock").exists()
    assert main(args) == 0  # and the folder is not left locked or half-written


def test_the_executable_says_a_second_ctrl_c_in_one_line(tmp_path):
    out = tmp_path / "run"
    # the demo at a large batch: steps of about half a second, so that the second Ctrl-C comes
    # before the step boundary where the first one's save would happen
    args = ["pretrain", "--optim.epochs", "1000", "--optim.batch_size", "256",
            "--data.num_workers", "0", "--run.output_dir", str(out), "--run.log_every", "1",
            "--run.progress", "false", "--run.tensorboard", "false",
            "--run.monitor_every", "-1"]  # fmt: skip
    process = started_command(args, out, records=1, poll=0.05)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)  # two signals at once would be handled as one
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert "second Ctrl-C" in stderr
    assert not (out / "last.pth").exists()


@pytest.mark.parametrize(("every", "kept"), [(1, [1, 2]), (2, [2])])
def test_keep_every_epochs_keeps_those_epochs_checkpoints(tmp_path, folder_with_bad_images,
                                                          every, kept):  # fmt: skip
    out = tmp_path / "run"
    extra = ("--data.max_bad_fraction", "1", "--run.keep_every_epochs", str(every))
    assert main(tiny_args(out, folder_with_bad_images, *extra)) == 0
    names = sorted(p.name for p in out.glob("checkpoint-*.pth"))
    assert names == [f"checkpoint-{epoch:04d}.pth" for epoch in kept]
    for epoch in kept:
        assert progress_of(out / f"checkpoint-{epoch:04d}.pth").epoch == epoch
    last, kept_last = load_object(out / "last.pth"), load_object(out / names[-1])
    for name, value in last["model"].items():
        assert torch.equal(value, kept_last["model"][name]), name


def test_temporary_files_of_killed_saves_are_cleaned(tmp_path, folder_with_bad_images):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".last.pth.k2j4x9.droppos-partial").write_bytes(b"half a checkpoint")
    assert main(tiny_args(out, folder_with_bad_images, "--data.max_bad_fraction", "1")) == 0
    assert not list(out.glob(".*.droppos-partial"))


def test_disk_full_keeps_the_previous_checkpoint_and_says_so(
    tmp_path, folder_with_bad_images, monkeypatch, capsys
):
    out = tmp_path / "run"
    args = tiny_args(out, folder_with_bad_images, "--data.max_bad_fraction", "1")
    original, saves = checkpoint_module.torch.save, []

    def save(state, stream):
        saves.append(1)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(state, stream)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    assert main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "warning:" not in line]
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert progress_of(out / "last.pth").epoch == 1
    assert not list(out.glob(".*.pth.*"))


# -- shared output folders ---------------------------------------------------------------------


def write_lock(folder, pid):
    folder.mkdir(parents=True, exist_ok=True)
    owner = {"host": socket.gethostname(), "pid": pid, "started": "earlier"}
    (folder / ".droppos.lock").write_text(json.dumps(owner))


def test_a_second_run_on_a_locked_folder_is_refused(tmp_path, folder_with_bad_images, capsys):
    out = tmp_path / "run"
    write_lock(out, os.getppid())  # a live process
    assert main(tiny_args(out, folder_with_bad_images)) == 2
    err = capsys.readouterr().err.strip()
    assert "another run" in err and f"pid {os.getppid()}" in err and len(err.splitlines()) == 1
    assert not (out / "metrics.jsonl").exists()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, folder_with_bad_images, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    write_lock(out, dead.pid)
    assert main(tiny_args(out, folder_with_bad_images, "--data.max_bad_fraction", "1")) == 0
    assert "stale lock" in capsys.readouterr().err
    assert not (out / ".droppos.lock").exists()  # released at the end


# -- command line ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--optim.e", "3"), "unknown option --optim.e; did you mean --optim.epochs?"),
        (("--optim.epochz", "3"), "did you mean --optim.epochs?"),
        (("--optm.epochs", "3"), "did you mean --optim.epochs?"),
        (("--data.epochs", "3"), "did you mean --optim.epochs?"),
        (
            ("--model.name", "mae", "--model.smoothing_sigma", "1"),
            "it is an option of --model.name droppos",  # its decoder, named first,
        ),
        (("--optim.epochs", "abc"), "--optim.epochs: expected int, got 'abc'"),
        (("--run.precision", "fp8"), "expected one of 'auto', 'fp32', 'bf16', 'fp16'"),
        (("--config", "vit_huge_in1k"), "presets: finetune_few_labels, finetune_vit_base_in1k"),
        (("--config", "finetune_vit_base_in1k"), "is a preset of `droppos finetune`"),
        (("--data.crop_scale", "[2, 1]"), "--data.crop_scale must satisfy"),
        (("--model.encoder.img_size", "0"), "must be positive"),
        (("--model.patch_mask_ratio", "0.99"), "leaves no visible patch"),
        (("--data.max_bad_fraction", "2"), "--data.max_bad_fraction must be in [0, 1]"),
        (("--optim.lr", "-1"), "--optim.lr must be > 0"),
    ],
)
def test_each_bad_option_gives_one_line_and_exit_2(tmp_path, capsys, extra, message):
    assert main(tiny_args(tmp_path / "run", tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1 and "usage:" not in err


def test_a_yaml_syntax_error_names_the_line(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("optim:\n  epochs: [1\n")
    assert main(["pretrain", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not parse at line 2" in err and len(err.splitlines()) == 1

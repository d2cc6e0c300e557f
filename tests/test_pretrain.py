"""Pre-training through the command line: one epoch, exact resume, DDP, configs, user errors."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from PIL import Image

from droppos.cli.main import build_parser, main, resolve_presets, to_config
from droppos.engine import pretrain as pretrain_module
from droppos.engine.checkpoint import load_checkpoint
from droppos.engine.distributed import shutdown_distributed
from droppos.engine.logging import read_metrics


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """24 small RGB images in two class folders."""
    root = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for i in range(24):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        pixels = (torch.rand(20, 20, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def tiny_args(output_dir, source, *extra):
    return [
        "pretrain",
        "--model.img_size", "16",
        "--model.patch_size", "4",
        "--model.in_chans", "3",
        "--model.embed_dim", "32",
        "--model.depth", "1",
        "--model.num_heads", "2",
        "--model.decoder_embed_dim", "32",
        "--model.decoder_num_heads", "2",
        "--data.source", str(source),
        "--data.num_workers", "0",
        "--optim.batch_size", "4",
        "--optim.epochs", "2",
        "--optim.warmup_epochs", "1",
        "--optim.base_lr", "0.01",
        "--run.output_dir", str(output_dir),
        "--run.log_every", "2",
        "--run.progress", "false",
        "--run.precision", "fp32",
        *extra,
    ]  # fmt: skip


def test_one_tiny_pretraining_through_the_cli(tmp_path, image_folder):
    out = tmp_path / "run"
    assert main(tiny_args(out, image_folder, "--optim.epochs", "1")) == 0
    for name in ("config.yaml", "metrics.jsonl", "last.pth", "summary.json", "tensorboard"):
        assert (out / name).exists(), name
    steps = read_metrics(out / "metrics.jsonl", "step")
    epochs = read_metrics(out / "metrics.jsonl", "epoch")
    assert len(steps) == 3 and len(epochs) == 1  # 6 batches, logged every 2
    for key in ("loss", "position_accuracy", "lr", "images_per_second"):
        assert key in steps[0]
    assert epochs[0]["chance_position_accuracy"] == pytest.approx(1 / 16)
    checkpoint = load_checkpoint(out / "last.pth")
    assert (checkpoint["epoch"], checkpoint["batch"], checkpoint["step"]) == (1, 0, 6)


def final_weights(output_dir):
    return load_checkpoint(output_dir / "last.pth")["model"]


def crash_after_saves(monkeypatch, count):
    """Make the run die right after its `count`-th checkpoint write, as a crash would."""
    saves = []
    original = pretrain_module.save

    def save_then_crash(trainer, keep=False):
        original(trainer, keep)
        saves.append(trainer.step)
        if len(saves) == count:
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_module, "save", save_then_crash)


@pytest.mark.parametrize(
    "extra, crash_at",
    [((), 1), (("--run.save_every_steps", "2"), 2)],
    ids=["after-epoch-1", "mid-epoch"],
)
def test_an_interrupted_run_resumes_to_the_same_weights(
    tmp_path, image_folder, monkeypatch, extra, crash_at
):
    main(tiny_args(tmp_path / "straight", image_folder, *extra))

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        crash_after_saves(patch, crash_at)
        with pytest.raises(KeyboardInterrupt):
            main(tiny_args(interrupted, image_folder, *extra))
    stopped = load_checkpoint(interrupted / "last.pth")
    assert stopped["epoch"] < 2
    assert main(tiny_args(interrupted, image_folder, *extra)) == 0  # resumes automatically

    straight, resumed = final_weights(tmp_path / "straight"), final_weights(interrupted)
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    epochs = [r["step"] for r in read_metrics(interrupted / "metrics.jsonl", "epoch")]
    assert epochs == [0, 1]  # each epoch logged once: none skipped, none repeated


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path, image_folder):
    # No clipping in effect (a huge threshold still measures the norm, which gets logged).
    common = ("--optim.epochs", "1", "--model.attentive", "false", "--optim.clip_grad", "1e9")
    big_run, accum_run = tmp_path / "big", tmp_path / "accum"
    main(
        tiny_args(big_run, image_folder, *common, "--optim.batch_size", "8", "--run.log_every", "1")
    )
    accum_args = ("--optim.batch_size", "4", "--optim.accum_steps", "2", "--run.log_every", "1")
    main(tiny_args(accum_run, image_folder, *common, *accum_args))
    big_norms = [r["grad_norm"] for r in read_metrics(big_run / "metrics.jsonl", "step")]
    accum_norms = [r["grad_norm"] for r in read_metrics(accum_run / "metrics.jsonl", "step")]
    assert len(big_norms) == len(accum_norms) == 3  # same number of optimizer steps
    assert accum_norms == pytest.approx(big_norms, rel=1e-4)  # same gradient, not 2x or 1/2x
    big, accum = final_weights(big_run), final_weights(accum_run)
    for name, value in big.items():  # Adam amplifies rounding only where gradients are ~0
        torch.testing.assert_close(value, accum[name], rtol=1e-3, atol=1e-4)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_step_gradients(rank, world_size, port, args, result_path):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    parser = build_parser()
    trainer = pretrain_module.setup(to_config(parser, parser.parse_args(args), "pretrain"))
    pretrain_module.set_epoch(trainer.loader, 0)
    images, _, patch_noise, position_noise = next(iter(trainer.loader))
    output = trainer.engine_model(
        images, sigma=1.0, patch_noise=patch_noise, position_noise=position_noise
    )
    output.loss.backward()
    if rank == 0:
        named = trainer.model.named_parameters()
        grads = {n: p.grad.clone() for n, p in named if p.grad is not None}
        torch.save(grads, result_path)
    shutdown_distributed()


def test_two_gloo_ranks_give_the_gradients_of_one_process_on_the_global_batch(
    tmp_path, image_folder
):
    # Without attentive weights every rank's loss has the same normaliser, so the DDP average
    # of per-rank gradients is exactly the single-process gradient of the global batch.
    common = ("--model.attentive", "false")
    two = tmp_path / "two.pt"
    args = tiny_args(tmp_path / "ddp", image_folder, *common, "--optim.batch_size", "4")
    mp.spawn(_first_step_gradients, args=(2, _free_port(), args, two), nprocs=2, join=True)
    one = tmp_path / "one.pt"
    args = tiny_args(tmp_path / "single", image_folder, *common, "--optim.batch_size", "8")
    _first_step_gradients(0, 1, _free_port(), args, one)
    ddp_grads, single_grads = torch.load(two), torch.load(one)
    assert ddp_grads.keys() == single_grads.keys()
    for name, grad in single_grads.items():
        torch.testing.assert_close(ddp_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_torchrun_two_processes_complete(tmp_path, image_folder):
    out = tmp_path / "torchrun"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "droppos.cli.main", *tiny_args(out, image_folder, "--optim.epochs", "1"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    epochs = read_metrics(out / "metrics.jsonl", "epoch")
    assert len(epochs) == 1  # rank 0 alone writes
    assert load_checkpoint(out / "last.pth")["step"] == 3  # 24 images / (2 ranks x 4)


def test_the_written_config_round_trips(tmp_path, image_folder):
    out = tmp_path / "run"
    args = tiny_args(out, image_folder, "--optim.epochs", "1", "--model.mask_token_kind", "zeros")
    main(args)
    parser = build_parser()
    original = to_config(parser, parser.parse_args(args), "pretrain")
    reloaded = to_config(
        parser, parser.parse_args(["pretrain", "--config", str(out / "config.yaml")]), "pretrain"
    )
    assert reloaded == original
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["mask_token_kind"] == "zeros"


@pytest.mark.parametrize("preset", ["vit_base_in1k", "vit_large_in1k", "tiny_cpu"])
def test_presets_load_by_name(preset):
    parser = build_parser()
    args = parser.parse_args(resolve_presets(["pretrain", "--config", preset]))
    config = to_config(parser, args, "pretrain")
    config.validate()
    if preset.startswith("vit_"):
        assert config.optim.batch_size * config.optim.accum_steps * 8 == 4096
        assert config.optim.base_lr == 1.5e-4
        assert config.model.decoder_depth == 2 and config.model.decoder_embed_dim == 512
        assert config.model.patch_mask_ratio == config.model.position_drop_ratio == 0.75
        assert config.data.crop_scale == (0.2, 1.0)


def test_the_tiny_preset_is_the_default():
    parser = build_parser()
    default = to_config(parser, parser.parse_args(["pretrain"]), "pretrain")
    preset = to_config(
        parser, parser.parse_args(resolve_presets(["pretrain", "--config", "tiny_cpu"])), "pretrain"
    )
    assert default == preset


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--data.source", "/no/such/folder"), "data source"),
        (("--optim.epochs", "0"), "--optim.epochs"),
        (("--model.name", "droppos_vit_gigantic"), "unknown model"),
        (("--model.patch_size", "5"), "not a multiple of patch_size"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(tmp_path, image_folder, capsys, extra, message):
    assert main(tiny_args(tmp_path, image_folder, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_help_lists_every_option_with_its_default():
    done = subprocess.run(
        [sys.executable, "-m", "droppos.cli.main", "pretrain", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    for option in ("--optim.base_lr", "--model.position_drop_ratio", "--run.resume"):
        assert option in done.stdout
    assert "default: 0.75" in done.stdout

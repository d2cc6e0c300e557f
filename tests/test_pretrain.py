"""Pre-training through the command line: one epoch, exact resume, DDP, configs, user errors."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from PIL import Image

from droppos.cli.main import main, parser_for, resolve_presets, to_config
from droppos.data import set_epoch
from droppos.engine.distributed import shutdown_distributed
from droppos.engine.logging import read_metrics
from droppos.engine.loop import TrainLoop
from droppos.interop.schema import Progress, load_object
from droppos.methods import pretrain as pretrain_module
from tests.helpers import assert_trained_alike, progress_of


@pytest.fixture(scope="module")
def unsplit_folder(tmp_path_factory):
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
        "--model.encoder.img_size", "16",
        "--model.encoder.patch_size", "4",
        "--model.encoder.in_chans", "3",
        "--model.encoder.embed_dim", "32",
        "--model.encoder.depth", "1",
        "--model.encoder.num_heads", "2",
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


def test_one_tiny_pretraining_through_the_cli(tmp_path, unsplit_folder):
    out = tmp_path / "run"
    assert main(tiny_args(out, unsplit_folder, "--optim.epochs", "1")) == 0
    for name in ("config.yaml", "metrics.jsonl", "last.pth", "summary.json", "tensorboard"):
        assert (out / name).exists(), name
    steps = read_metrics(out / "metrics.jsonl", "step")
    epochs = read_metrics(out / "metrics.jsonl", "epoch")
    assert len(steps) == 3 and len(epochs) == 1  # 6 batches, logged every 2
    for key in ("loss", "position_accuracy", "lr", "images_per_second"):
        assert key in steps[0]
    assert epochs[0]["chance_position_accuracy"] == pytest.approx(1 / 16)
    checkpoint = load_object(out / "last.pth")
    assert checkpoint["progress"] == {"epoch": 1, "batch": 0, "step": 6}
    assert [r["step"] for r in steps] == [2, 4, 6]  # the global optimiser step
    assert (epochs[0]["step"], epochs[0]["epoch"]) == (6, 1)  # epochs count from 1
    assert not (out / "checkpoint-0001.pth").exists()  # keep_every_epochs 0: last.pth only


def test_a_checkpoint_of_the_older_layout_still_resumes_and_is_read(
    tmp_path, unsplit_folder, capsys
):
    """Older files keep the run's progress under "position"; every reader still takes them."""
    out = tmp_path / "run"
    assert main(tiny_args(out, unsplit_folder, "--optim.epochs", "1")) == 0
    state = dict(load_object(out / "last.pth"))
    state["position"] = state.pop("progress")
    torch.save(state, out / "last.pth")
    assert progress_of(out / "last.pth") == Progress(epoch=1, batch=0, step=6)
    capsys.readouterr()
    assert main(tiny_args(out, unsplit_folder, "--optim.epochs", "2")) == 0
    assert "resuming at epoch 2, step 6" in capsys.readouterr().out
    assert progress_of(out / "last.pth") == Progress(epoch=2, batch=0, step=12)


def final_weights(output_dir):
    return load_object(output_dir / "last.pth")["model"]


def crash_after_saves(monkeypatch, count):
    """Make the run die right after its `count`-th checkpoint write, as a crash would."""
    saves = []
    original = TrainLoop.save

    def save_then_crash(loop, *args, **kwargs):
        original(loop, *args, **kwargs)
        saves.append(loop.progress.step)
        if len(saves) == count:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainLoop, "save", save_then_crash)


@pytest.mark.parametrize(
    "extra, crash_at",
    [((), 1), (("--run.save_every_steps", "2"), 2)],
    ids=["after-epoch-1", "mid-epoch"],
)
def test_an_interrupted_run_resumes_to_the_same_weights(
    tmp_path, unsplit_folder, monkeypatch, extra, crash_at
):
    assert main(tiny_args(tmp_path / "straight", unsplit_folder, *extra)) == 0

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        crash_after_saves(patch, crash_at)
        with pytest.raises(KeyboardInterrupt):
            main(tiny_args(interrupted, unsplit_folder, *extra))
    assert progress_of(interrupted / "last.pth").epoch < 2
    assert main(tiny_args(interrupted, unsplit_folder, *extra)) == 0  # resumes automatically

    straight, resumed = final_weights(tmp_path / "straight"), final_weights(interrupted)
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    epochs = [r["epoch"] for r in read_metrics(interrupted / "metrics.jsonl", "epoch")]
    assert epochs == [1, 2]  # each epoch logged once: none skipped, none repeated


def _first_step_gradients(rank, world_size, port, args, result_path):
    """Run the loop's first optimiser step (forward and backward of every micro-batch) and
    save rank 0's gradients: with DDP these are already averaged over ranks. One rank is a
    plain process (no torchrun variables: nothing leaks into the other tests)."""
    if world_size > 1:  # a spawned process, as torchrun would start it
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        torch.set_num_threads(1)
    parser = parser_for(args)
    loop = pretrain_module.pretraining_loop(to_config(parser, parser.parse_args(args), "pretrain"))
    set_epoch(loop.loader, 0)
    loop.method.start_epoch(0, 0)
    loss, _, _ = loop.accumulate(next(loop.optimizer_steps()))
    if rank == 0:
        named = loop.method.model.named_parameters()
        grads = {n: p.grad.clone() for n, p in named if p.grad is not None}
        grads["__loss__"] = loss.detach().clone()
        torch.save(grads, result_path)
    shutdown_distributed()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_gradients(first, second):
    first, second = torch.load(first), torch.load(second)
    assert first.keys() == second.keys()
    for name, grad in first.items():
        if name != "__loss__":
            torch.testing.assert_close(second[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# Every feature stays on: attentive weights give each shard its own normaliser, so a per-shard
# mean would give other gradients; the pixel branch adds a second normalised term.
ALL_ON = ("--model.pixel_branch.depth", "1", "--model.pixel_branch.embed_dim", "16",
          "--model.pixel_branch.num_heads", "2", "--model.confidence_ignore", "true")  # fmt: skip


def test_gradient_accumulation_gives_the_gradient_of_one_big_batch(tmp_path, unsplit_folder):
    big, accum = tmp_path / "big.pt", tmp_path / "accum.pt"
    args = tiny_args(tmp_path / "b", unsplit_folder, *ALL_ON, "--optim.batch_size", "8")
    _first_step_gradients(0, 1, _free_port(), args, big)
    args = tiny_args(
        tmp_path / "a", unsplit_folder, *ALL_ON, "--optim.batch_size", "4",
        "--optim.accum_steps", "2",
    )  # fmt: skip
    _first_step_gradients(0, 1, _free_port(), args, accum)
    assert_same_gradients(big, accum)
    torch.testing.assert_close(torch.load(accum)["__loss__"], torch.load(big)["__loss__"])


@pytest.mark.slow  # test_distributed.py checks the same equivalence on the trained weights
def test_two_gloo_ranks_give_the_gradients_of_one_process_on_the_global_batch(
    tmp_path, unsplit_folder
):
    two, one = tmp_path / "two.pt", tmp_path / "one.pt"
    args = tiny_args(tmp_path / "ddp", unsplit_folder, *ALL_ON, "--optim.batch_size", "4")
    mp.spawn(_first_step_gradients, args=(2, _free_port(), args, two), nprocs=2, join=True)
    args = tiny_args(tmp_path / "single", unsplit_folder, *ALL_ON, "--optim.batch_size", "8")
    _first_step_gradients(0, 1, _free_port(), args, one)
    assert_same_gradients(one, two)


@pytest.mark.slow  # CI's `scripts/gpu_check.sh --smoke` launches DDP and FSDP through torchrun
@pytest.mark.parametrize("processes", [1, 2])
def test_torchrun_runs_complete_with_a_process_group_even_for_one_process(
    tmp_path, unsplit_folder, processes
):
    out = tmp_path / "torchrun"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(processes), "-m", "droppos.cli.main",
        *tiny_args(out, unsplit_folder, "--optim.epochs", "1"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    epochs = read_metrics(out / "metrics.jsonl", "epoch")
    assert len(epochs) == 1  # rank 0 alone writes
    assert progress_of(out / "last.pth").step == 6 // processes  # 24 / (n x 4)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["strategy"], summary["processes"]) == ("ddp", processes)


def parse(args):
    args = resolve_presets(args)
    parser = parser_for(args)
    return to_config(parser, parser.parse_args(args), "pretrain")


def test_the_written_config_round_trips(tmp_path, unsplit_folder):
    out = tmp_path / "run"
    args = tiny_args(out, unsplit_folder, "--optim.epochs", "1", "--model.mask_token_kind", "zeros")
    main(args)
    reloaded = parse(["pretrain", "--config", str(out / "config.yaml")])
    assert reloaded == parse(args)
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["mask_token_kind"] == "zeros"


@pytest.mark.parametrize(
    "preset", ["vit_base_in1k", "vit_large_in1k", "mae_vit_base_in1k", "tiny_cpu"]
)
def test_presets_load_by_name(preset):
    config = parse(["pretrain", "--config", preset])
    config.validate()
    if preset == "mae_vit_base_in1k":
        assert config.model.name == "mae" and config.model.decoder.depth == 8
        assert config.model.patch_mask_ratio == 0.75 and config.optim.warmup_epochs == 40
    if preset.startswith("vit_"):
        assert config.optim.batch_size * config.optim.accum_steps * 8 == 4096
        assert config.optim.base_lr == 1.5e-4
        assert config.model.decoder_depth == 2 and config.model.decoder_embed_dim == 512
        assert config.model.patch_mask_ratio == config.model.position_drop_ratio == 0.75
        assert config.data.crop_scale == (0.2, 1.0)
        assert config.model.encoder.embed_dim == (768 if "base" in preset else 1024)


def test_the_tiny_preset_is_the_default():
    assert parse(["pretrain"]) == parse(["pretrain", "--config", "tiny_cpu"])


def test_every_mae_option_reaches_the_model(tmp_path, unsplit_folder):
    out = tmp_path / "mae"
    options = ("--model.name", "mae", "--model.decoder.depth", "3",
               "--model.decoder.embed_dim", "24", "--model.decoder.num_heads", "4",
               "--model.patch_mask_ratio", "0.5", "--optim.epochs", "1")  # fmt: skip
    args = tiny_args(out, unsplit_folder, *options)
    for option in ("--model.decoder_embed_dim", "--model.decoder_num_heads"):  # DropPos only
        del args[args.index(option) : args.index(option) + 2]
    assert main(args) == 0
    weights = final_weights(out)
    assert {int(k.split(".")[1]) for k in weights if k.startswith("decoder_blocks.")} == {0, 1, 2}
    assert weights["decoder_embed.weight"].shape == (24, 32)
    assert "pixel_loss" in read_metrics(out / "metrics.jsonl", "epoch")[0]


def test_the_multi_task_branch_is_configured_from_the_command_line(tmp_path, unsplit_folder):
    out = tmp_path / "multi"
    assert main(tiny_args(out, unsplit_folder, *ALL_ON, "--optim.epochs", "1")) == 0
    weights = final_weights(out)
    assert "aux_decoder_blocks.0.attn.qkv.weight" in weights
    assert "aux_decoder_blocks.1.attn.qkv.weight" not in weights  # depth 1 as asked
    epoch = read_metrics(out / "metrics.jsonl", "epoch")[0]
    assert {"pixel_loss", "position_loss", "position_accuracy"} <= set(epoch)


def test_an_option_of_the_other_model_is_an_error_not_ignored(capsys):
    args = ["pretrain", "--model.name", "mae", "--model.position_drop_ratio", "0.5"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown option --model.position_drop_ratio" in err and len(err.splitlines()) == 1


def test_resume_refuses_another_batch_geometry(tmp_path, unsplit_folder, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(out, unsplit_folder, "--optim.epochs", "1")) == 0
    before = (out / "last.pth").read_bytes()
    capsys.readouterr()
    args = tiny_args(out, unsplit_folder, "--optim.epochs", "2", "--optim.batch_size", "3")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "batch_size 4 -> 3" in err and len(err.splitlines()) == 1
    assert (out / "last.pth").read_bytes() == before  # nothing touched


def test_resume_refuses_another_model(tmp_path, unsplit_folder, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(out, unsplit_folder, "--optim.epochs", "1")) == 0
    capsys.readouterr()
    args = tiny_args(out, unsplit_folder, "--optim.epochs", "2", "--model.encoder.depth", "2")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "model.encoder.depth: 1 -> 2" in err and len(err.splitlines()) == 1


def test_resume_refuses_another_seed(tmp_path, unsplit_folder, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(out, unsplit_folder, "--optim.epochs", "1")) == 0
    before = (out / "last.pth").read_bytes()
    capsys.readouterr()
    args = tiny_args(out, unsplit_folder, "--optim.epochs", "2", "--run.seed", "7")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--run.seed 0" in err and len(err.splitlines()) == 1
    assert (out / "last.pth").read_bytes() == before  # nothing touched


def test_resume_converts_the_same_global_batch_split_differently(
    tmp_path, unsplit_folder, monkeypatch
):
    straight = tmp_path / "straight"
    assert main(tiny_args(straight, unsplit_folder, "--optim.batch_size", "8")) == 0
    split = tmp_path / "split"
    accumulated = ("--optim.batch_size", "4", "--optim.accum_steps", "2",
                   "--run.save_every_steps", "1")  # fmt: skip
    with monkeypatch.context() as patch:
        crash_after_saves(patch, 2)  # mid-epoch 1, after step 2 of 3
        with pytest.raises(KeyboardInterrupt):
            main(tiny_args(split, unsplit_folder, *accumulated))
    assert progress_of(split / "last.pth").batch == 4
    assert main(tiny_args(split, unsplit_folder, "--optim.batch_size", "8")) == 0
    assert_trained_alike(final_weights(split), final_weights(straight))


def test_a_finished_run_says_so_and_leaves_its_outputs_alone(tmp_path, unsplit_folder, capsys):
    out = tmp_path / "run"
    args = tiny_args(out, unsplit_folder, "--optim.epochs", "1")
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(args) == 0
    assert "already finished" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--data.source", "/no/such/folder"), "data source"),
        (("--optim.epochs", "0"), "--optim.epochs"),
        (("--model.name", "droppos_vit_gigantic"), "not a pre-training model"),
        (("--model.encoder.patch_size", "5"), "not a multiple of patch_size"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(tmp_path, unsplit_folder, capsys, extra, message):
    assert main(tiny_args(tmp_path, unsplit_folder, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_help_describes_every_option_once():
    done = subprocess.run(
        [sys.executable, "-m", "droppos.cli.main", "pretrain", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    for option in ("--optim.base_lr", "--model.position_drop_ratio", "--run.resume",
                   "--model.encoder.depth", "--model.pixel_branch"):  # fmt: skip
        assert done.stdout.count(f"  {option} ") == 1, option
    assert "default: 0.75" in done.stdout
    blocks, current = [], None  # each option's help: its first line and continuation lines
    for line in done.stdout.split("options:", 1)[1].splitlines():
        if line.startswith("  --"):
            current = [line.strip()]
            blocks.append(current)
        elif current is not None and line.startswith(" " * 10):
            current.append(line.strip())
        else:
            current = None
    typed = [" ".join(b) for b in blocks if "(type:" in " ".join(b)]
    assert len(typed) > 40
    for text in typed:  # a description before the type, for every typed option
        words = text.split("(type:")[0].split()[1:]  # after the option's name
        words = [w for w in words if not (w.isupper() or w.startswith(("{", "[")))]
        assert len(words) >= 2, text


def test_a_planted_payload_in_last_pth_is_refused_and_never_runs(tmp_path, unsplit_folder, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(out, unsplit_folder, "--optim.epochs", "1")) == 0
    marker = tmp_path / "payload-ran"
    state = load_object(out / "last.pth")
    state["progress"]["epoch"] = 0
    state["hook"] = Payload(str(marker))
    torch.save(state, out / "last.pth")
    capsys.readouterr()
    assert main(tiny_args(out, unsplit_folder, "--optim.epochs", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert "asks to run code while loading" in err and len(err.splitlines()) == 1, err
    assert not marker.exists()


class Payload:
    """Unpickling this object would create a file: what an attacker's `__reduce__` does."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.slow  # a whole pre-training for the log format
def test_a_log_written_to_a_file_has_plain_lines_only(tmp_path, unsplit_folder):
    out = tmp_path / "run"
    args = [a for a in tiny_args(out, unsplit_folder) if a not in ("--run.progress", "false")]
    done = subprocess.run(
        [sys.executable, "-m", "droppos.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )  # progress bars are on by default, but the output is not a terminal
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stdout + done.stderr
    assert len(done.stdout.splitlines()) == 4  # start, two epochs, done
    assert len(done.stdout) + len(done.stderr) < 5000


def test_finetuning_into_the_pretraining_folder_never_replaces_its_checkpoint(
    tmp_path, unsplit_folder, capsys
):
    """The refusal's advice once was `--run.resume null`, which then overwrote pre/last.pth."""
    pre = tmp_path / "pre"
    assert main(tiny_args(pre, unsplit_folder, "--optim.epochs", "1")) == 0
    before = (pre / "last.pth").read_bytes()
    for extra in ([], ["--run.resume", "null"]):
        capsys.readouterr()
        args = ["finetune", "--model.checkpoint", str(pre / "last.pth"), "--data.source",
                str(unsplit_folder), "--run.output_dir", str(pre), "--optim.epochs", "1",
                *extra]  # fmt: skip
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--run.resume null" not in err
        assert (pre / "last.pth").read_bytes() == before


def test_starting_afresh_over_a_run_is_refused_and_keeps_its_files(
    tmp_path, unsplit_folder, capsys
):
    out = tmp_path / "run"
    assert main(tiny_args(out, unsplit_folder, "--optim.epochs", "1")) == 0
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(tiny_args(out, unsplit_folder, "--optim.epochs", "1", "--run.resume", "null")) == 2
    assert "holds a run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files


HAS_COMPILER = any(shutil.which(c) for c in ("g++", "clang++", "c++"))


@pytest.mark.slow  # inductor builds C++ kernels: about 100 s on 2 idle cores
@pytest.mark.skipif(not HAS_COMPILER, reason="inductor on the CPU builds C++: no compiler here")
def test_compile_true_goes_through_inductor_and_trains_like_eager(
    tmp_path, unsplit_folder, monkeypatch
):
    """The real torch.compile (Dynamo + inductor, C++ kernels built here), not a stub: the run
    finishes, inductor built code, and the weights match the eager run's to float rounding."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert main(tiny_args(eager, unsplit_folder, "--optim.epochs", "1")) == 0
    torch._dynamo.reset()
    args = tiny_args(compiled, unsplit_folder, "--optim.epochs", "1", "--run.compile", "true")
    assert main(args) == 0
    torch._dynamo.reset()
    assert any((tmp_path / "inductor").rglob("*.so"))  # kernels were compiled and loaded
    reference = final_weights(eager)
    steps = {"eager": eager, "compiled": compiled}
    losses = {k: [r["loss"] for r in read_metrics(v / "metrics.jsonl") if r["kind"] == "step"]
              for k, v in steps.items()}  # fmt: skip
    assert len(losses["compiled"]) == 3
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-5, atol=0)
    assert_trained_alike(final_weights(compiled), reference)


def test_compile_on_a_cpu_without_a_compiler_is_one_line(
    tmp_path, unsplit_folder, monkeypatch, capsys
):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    args = tiny_args(tmp_path / "run", unsplit_folder, "--run.compile", "true")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a C++ compiler" in err and len(err.splitlines()) == 1

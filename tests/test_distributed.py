"""Runs over several processes, tested on two gloo ranks on the CPU: DDP and FSDP give the
weights of one process on the same global batch, resume exactly and across strategies, agree
on stop signals within a step, list a folder once, and every collective droppos makes puts its
tensors where the process group reduces them (the rule NCCL enforces, simulated)."""

from __future__ import annotations

import ast
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from droppos.cli.main import main
from droppos.engine import collectives
from droppos.engine.guards import RunLock
from droppos.interop.schema import load_object
from tests.helpers import progress_of

SRC = Path(__file__).parents[1] / "src" / "droppos"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "reduce", "gather", "scatter", "barrier",
    "all_to_all", "send", "recv", "all_gather_object", "broadcast_object_list",
}  # fmt: skip


def test_no_module_but_collectives_calls_a_collective():
    """So every tensor that reaches a process group has been placed by `place`."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path == SRC / "engine" / "collectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
                owner = ast.unparse(node.value)
                if owner in ("dist", "torch.distributed"):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno} {owner}.{node.attr}")
    assert not found, found


def test_an_nccl_group_reduces_on_the_gpu_and_gloo_on_the_cpu(monkeypatch):
    monkeypatch.setattr(collectives, "group_active", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *_: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda *_: "gloo")
    assert collectives.collective_device() == torch.device("cpu")


def test_without_a_group_the_helpers_are_the_identity():
    assert not collectives.group_active()
    found = collectives.sum_over_ranks({"a": torch.tensor([1.0, 2.0]), "n": 3.0})
    assert found["a"].tolist() == [1.0, 2.0] and float(found["n"]) == 3.0
    assert collectives.from_rank0({"x": [1, 2]}) == {"x": [1, 2]}
    assert collectives.computed_by_rank0(lambda: 7) == 7


# -- two ranks ---------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    ports = []
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def pretrain_args(output_dir, source, batch, *extra):
    return [
        "pretrain",
        "--model.encoder.img_size", "16", "--model.encoder.patch_size", "4",
        "--model.encoder.in_chans", "3", "--model.encoder.embed_dim", "32",
        "--model.encoder.depth", "2", "--model.encoder.num_heads", "2",
        "--model.decoder_embed_dim", "32", "--model.decoder_num_heads", "2",
        # every feature on: attentive weights, the MAE branch, confidence-ignore
        "--model.pixel_branch.depth", "1", "--model.pixel_branch.embed_dim", "16",
        "--model.pixel_branch.num_heads", "2", "--model.confidence_ignore", "true",
        "--data.source", str(source), "--data.num_workers", "0",
        "--optim.batch_size", str(batch), "--optim.epochs", "2", "--optim.warmup_epochs", "1",
        "--optim.base_lr", "0.01", "--run.output_dir", str(output_dir), "--run.log_every", "2",
        "--run.progress", "false", "--run.precision", "fp32", "--run.tensorboard", "false",
        "--run.pictures_every", "2", *extra,
    ]  # fmt: skip


def simulate_nccl(violations: list[str]) -> None:
    """Wrap torch.distributed's collectives so that a tensor droppos hands one must have been
    placed on the group's device by `collectives.place` (NCCL refuses any other; gloo would
    not tell, so the test does)."""
    placed: dict[int, torch.Tensor] = {}
    original_place = collectives.place

    def place(tensor):
        result = original_place(tensor)
        placed[id(result)] = result
        return result

    collectives.place = place
    for name in ("all_reduce", "all_gather", "broadcast"):
        original = getattr(dist, name)

        def checked(*args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("droppos"):
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                tensors += [t for a in args if isinstance(a, list) for t in a]
                for tensor in tensors:
                    if id(tensor) not in placed:
                        where = traceback.extract_stack(limit=3)[0]
                        violations.append(f"{_name} from {where.filename}:{where.lineno}")
            return _original(*args, **kwargs)

        setattr(dist, name, checked)


OLD_SUM_OVER_RANKS = """
import torch
import torch.distributed as dist

def sum_over_ranks(values):
    names = list(values)
    tensors = [torch.as_tensor(values[n]) for n in names]
    flat = torch.cat([t.double().reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return flat

bad = 0
sum_over_ranks({"n": torch.tensor(bad)})
"""


def _worker(rank, world, ports, phases, report):
    """One rank, as torchrun would start it, through every phase: (name, argv, crash after the
    first save, step at which rank 1 receives a stop signal)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    torch.set_num_threads(1)
    violations: list[str] = []
    simulate_nccl(violations)
    from droppos.data import sources
    from droppos.engine.loop import TrainLoop

    listings: list[str] = []
    list_folder = sources.list_folder
    sources.list_folder = lambda root, *rest: listings.append(str(root)) or list_folder(root, *rest)
    save, poll = TrainLoop.save, TrainLoop.poll

    def save_then_crash(loop, *args, **kwargs):
        save(loop, *args, **kwargs)
        raise KeyboardInterrupt

    def poll_with_a_signal(loop, full):
        if loop.progress.step == loop.signal_at:
            loop.signals.received = "SIGTERM"
        return poll(loop, full)

    outcome: dict[str, object] = {}
    for port, (name, args, crash, signal_at) in zip(ports, phases):
        os.environ["MASTER_PORT"] = str(port)
        if crash:
            TrainLoop.save = save_then_crash
        if signal_at and rank == 1:  # a stop asked for on one rank only
            TrainLoop.signal_at = signal_at
            TrainLoop.poll = poll_with_a_signal
        try:
            outcome[name] = main(args)
        except KeyboardInterrupt:
            outcome[name] = "crashed"
        finally:
            TrainLoop.save, TrainLoop.poll = save, poll
    outcome["violations"] = list(violations)
    outcome["listings"] = listings
    # Control: the epoch-end count of droppos 0.2 (engine/loop.py), which stopped every NCCL run
    # at its first epoch end, through that version's sum_over_ranks: the rule must catch it.
    os.environ["MASTER_PORT"] = str(ports[-1])
    dist.init_process_group("gloo")
    violations.clear()
    exec(compile(OLD_SUM_OVER_RANKS, "engine/distributed.py", "exec"), {"__name__": "droppos.old"})
    dist.destroy_process_group()
    outcome["old_code_violations"] = list(violations)
    Path(report.format(rank=rank)).write_text(json.dumps(outcome))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_object(folder / "last.pth")["model"]


def assert_close_weights(one, other, exact=False):
    """Equal, or equal to fp32 round-off. The key third of a qkv bias is the exception: its
    gradient is exactly zero (it adds the same to every logit of a query), so what AdamW sees
    there is round-off divided by round-off, and it drifts apart; it is compared loosely."""
    assert one.keys() == other.keys()
    for name, value in one.items():
        if exact:
            assert torch.equal(value, other[name]), name
            continue
        got = other[name]
        if name.endswith("qkv.bias"):
            q, k, v = value.chunk(3)
            got_q, got_k, got_v = got.chunk(3)
            torch.testing.assert_close(got_k, k, rtol=0, atol=1e-3, msg=name)
            value, got = torch.cat([q, v]), torch.cat([got_q, got_v])
        torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, image_folder):
    """The runs of two gloo ranks, each a torchrun-like process, at per-rank batch 4."""
    out = tmp_path_factory.mktemp("runs")
    train = image_folder / "train"

    def run(name, strategy, crash=False, signal_at=0, resume_dir=None, extra=()):
        folder = resume_dir or out / name
        args = pretrain_args(folder, train, 4, "--run.strategy", strategy, *extra)
        return name, args, crash, signal_at

    phases = [
        run("fsdp", "fsdp"),
        run("ddp", "ddp"),
        run("fsdp-crashed", "fsdp", crash=True, resume_dir=out / "fsdp-resumed"),
        run("fsdp-resumed", "fsdp"),
        run("ddp-crashed", "ddp", crash=True, resume_dir=out / "ddp-then-fsdp"),
        run("ddp-then-fsdp", "fsdp"),
        run("fsdp-crashed-2", "fsdp", crash=True, resume_dir=out / "fsdp-then-ddp"),
        run("fsdp-then-ddp", "ddp"),
        run("signal", "ddp", signal_at=1, extra=("--run.log_every", "100")),
    ]
    knn = ["knn", "--model.checkpoint", str(out / "fsdp" / "last.pth"), "--data.source",
           str(image_folder), "--data.num_workers", "0", "--run.progress", "false",
           "--run.output_dir", str(out / "knn-fsdp")]  # fmt: skip
    phases.append(("knn", knn, False, 0))
    report = str(out / "report-{rank}.json")
    ports = free_ports(len(phases) + 1)
    mp.spawn(_worker, args=(2, ports, phases, report), nprocs=2, join=True)
    single = out / "single"
    assert main(pretrain_args(single, train, 8, "--run.strategy", "auto")) == 0
    reports = [json.loads(Path(report.format(rank=r)).read_text()) for r in range(2)]
    return out, reports


def test_ddp_and_fsdp_give_the_weights_of_one_process_on_the_same_global_batch(two_rank_runs):
    out, reports = two_rank_runs
    for report in reports:
        assert report["fsdp"] == 0 and report["ddp"] == 0
    single = weights(out / "single")
    assert_close_weights(single, weights(out / "ddp"))
    assert_close_weights(single, weights(out / "fsdp"))  # its shards, read whole
    saved = load_object(out / "fsdp" / "last.pth", whole=False)
    assert "model" not in saved and (out / "fsdp" / saved["shards"] / ".metadata").is_file()
    assert len(list((out / "fsdp").glob("shards-*"))) == 1  # the folder last.pth names


def test_a_resume_under_fsdp_is_exact(two_rank_runs):
    out, reports = two_rank_runs
    assert [r["fsdp-crashed"] for r in reports] == ["crashed", "crashed"]
    assert_close_weights(weights(out / "fsdp"), weights(out / "fsdp-resumed"), exact=True)


def test_a_run_moves_between_ddp_and_fsdp(two_rank_runs):
    out, reports = two_rank_runs
    assert all(r["ddp-then-fsdp"] == 0 and r["fsdp-then-ddp"] == 0 for r in reports)
    assert_close_weights(weights(out / "ddp"), weights(out / "ddp-then-fsdp"))
    assert_close_weights(weights(out / "fsdp"), weights(out / "fsdp-then-ddp"))
    assert "model" in load_object(out / "fsdp-then-ddp" / "last.pth", whole=False)


def test_a_stop_signal_on_one_rank_stops_every_rank_within_one_step(two_rank_runs):
    out, reports = two_rank_runs
    assert [r["signal"] for r in reports] == [0, 0]  # asked for: resumable, exit 0
    assert progress_of(out / "signal" / "last.pth").step == 2


def test_every_collective_puts_its_tensors_where_the_group_reduces(two_rank_runs):
    _, reports = two_rank_runs
    for report in reports:
        assert report["violations"] == []
        assert report["old_code_violations"]  # the rule catches the fault it stands for


def test_an_image_folder_is_listed_by_rank_0_alone(two_rank_runs):
    _, reports = two_rank_runs
    assert reports[0]["listings"] and reports[1]["listings"] == []


def test_an_fsdp_checkpoint_goes_through_knn_and_export(two_rank_runs, tmp_path):
    out, reports = two_rank_runs
    assert [r["knn"] for r in reports] == [0, 0]
    assert json.loads((out / "knn-fsdp" / "results.json").read_text())["top1"] >= 0
    assert main(["export", "--model.checkpoint", str(out / "fsdp" / "last.pth"), "--run.output_dir",
                 str(tmp_path)]) == 0  # fmt: skip
    config = json.loads((tmp_path / "config.json").read_text())
    vit = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    vit.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    torch.testing.assert_close(
        vit.blocks[1].mlp.fc1.weight, weights(out / "fsdp")["blocks.1.mlp.fc1.weight"]
    )


def test_activation_checkpointing_changes_no_gradient(image_folder, tmp_path):
    from droppos.cli.main import parser_for, to_config
    from droppos.data import set_epoch
    from droppos.methods.pretrain import pretraining_loop

    grads = []
    for i, checkpointing in enumerate(("false", "true")):
        args = pretrain_args(tmp_path / str(i), image_folder / "train", 8,
                             "--run.activation_checkpointing", checkpointing)  # fmt: skip
        parser = parser_for(args)
        loop = pretraining_loop(to_config(parser, parser.parse_args(args), "pretrain"))
        try:
            set_epoch(loop.loader, 0)
            loop.method.start_epoch(0, 0)
            loop.accumulate(next(loop.optimizer_steps()))
            model = loop.method.model
            assert model.grad_checkpointing == (checkpointing == "true")
            grads.append(
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            )
        finally:
            loop.close()
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=1e-7, msg=name)


# -- one bf16 step of two micro-batches on two ranks --------------------------------------------


def _count_reductions(rounds: list[bool], bucket):
    """A DDP communication hook: DDP's own all-reduce, noting each bucket (the last one of a
    backward's round is flagged)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    rounds.append(bucket.is_last())
    return allreduce_hook(None, bucket)


def _record_forwards(model, calls: list[dict]):
    """What reaches the bare model's forward (after the strategy's own hooks) and the masks it
    drew from it."""

    def before(module, args, kwargs):
        seen = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        calls.append({"output": kwargs.get("output", "step"), "images": args[0].clone(), **seen})

    def after(module, args, kwargs, result):
        if isinstance(result, torch.Tensor):  # `ahead`'s loss weights
            calls[-1]["result"] = result.clone()
            return
        calls[-1].update(
            ids_keep=result.ids_keep.clone(),
            position_dropped=result.position_dropped.clone(),
            position_normaliser=result.position_normaliser.detach().clone(),
        )

    return [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]


def _step_worker(rank, world, port, runs, report):
    """One rank: two optimiser steps through the loop under each strategy of `runs`, then the
    epoch's pictures; writes what the model's forward saw and DDP's gradient all-reduces."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from droppos.cli.main import parser_for, to_config
    from droppos.data import set_epoch
    from droppos.methods.pretrain import pretraining_loop

    found: dict[str, dict] = {}
    for name, args in runs:
        parser = parser_for(args)
        loop = pretraining_loop(to_config(parser, parser.parse_args(args), "pretrain"))
        calls: list[dict] = []
        rounds: list[bool] = []
        if name == "ddp":
            loop.engine_model.register_comm_hook(rounds, _count_reductions)
        hooks = _record_forwards(loop.method.model, calls)
        try:
            set_epoch(loop.loader, 0)
            loop.method.start_epoch(0, 0)
            reductions = []
            for _, group in zip(range(2), loop.optimizer_steps()):
                loop.optimizer_step(loop.accumulate(group)[0])
                reductions.append(sum(rounds))
                rounds.clear()
            for hook in hooks:
                hook.remove()
            pictures = loop.method.end_epoch(loop.strategy, 0, {}).get("images", {})
            loop.strategy.settle(loop.method.model)
        finally:
            loop.close()
        found[name] = {"calls": calls, "reductions": reductions, "pictures": len(pictures)}
    torch.save(found, report.format(rank=rank))


@pytest.fixture(scope="module")
def bf16_steps(tmp_path_factory, image_folder):
    """Per rank, under DDP and FSDP: two bf16 optimiser steps of two micro-batches of 2 images
    (so `ahead` runs), every forward's inputs and masks recorded."""
    out = tmp_path_factory.mktemp("bf16")
    options = ("--run.precision", "bf16", "--optim.accum_steps", "2",
               "--run.pictures_every", "1", "--run.monitor_every", "-1")  # fmt: skip
    train = image_folder / "train"
    runs = [
        (name, pretrain_args(out / name, train, 2, "--run.strategy", name, *options))
        for name in ("ddp", "fsdp")
    ]
    report = str(out / "report-{rank}.pt")
    mp.spawn(_step_worker, args=(2, free_ports(1)[0], runs, report), nprocs=2, join=True)
    return [torch.load(report.format(rank=r), weights_only=True) for r in range(2)]


def test_fsdp_in_bf16_feeds_the_model_the_masks_and_targets_of_ddp(bf16_steps):
    """FSDP's mixed precision casts whatever reaches a module's forward to bf16 unless told not
    to; the root's inputs are data, not activations: mask noise (a tie at the cut changes the
    mask), soft targets, the loss weights (the loss normaliser) and the pixel targets."""
    kinds = (["loss_weights"] * 2 + ["step"] * 2) * 2
    for found in bf16_steps:
        ddp, fsdp = found["ddp"]["calls"], found["fsdp"]["calls"]
        assert [c["output"] for c in ddp] == [c["output"] for c in fsdp] == kinds
        for one, other in zip(ddp, fsdp):
            for name in ("images", "patch_noise", "position_noise", "target_map"):
                if name in one:
                    assert other[name].dtype == torch.float32, name
                    assert torch.equal(other[name], one[name]), name
            for name in ("ids_keep", "position_dropped"):
                if name in one:
                    assert torch.equal(other[name], one[name]), name
        computed = [c["result"] for c in fsdp if c["output"] == "loss_weights"]
        steps = [c for c in fsdp if c["output"] == "step"]
        for weights, step in zip(computed, steps):  # reach the step as `ahead` computed them
            assert torch.equal(step["token_weights"], weights)
            assert torch.equal(step["position_normaliser"], weights.float().sum())
        assert found["fsdp"]["pictures"] == found["ddp"]["pictures"]  # drawn in bf16 too
    assert bf16_steps[0]["fsdp"]["pictures"] > 0


def test_ddp_all_reduces_the_gradients_once_per_optimiser_step_with_accumulation(bf16_steps):
    """`ahead` calls the wrapped model before the step's backwards: with autograd on, that
    forward arms DDP's reducer, and the first `no_sync` micro-batch all-reduces anyway."""
    for found in bf16_steps:
        assert found["ddp"]["reductions"] == [1, 1]


def test_ddp_and_fsdp_need_torchrun_and_say_so(tmp_path, image_folder, capsys):
    for strategy in ("ddp", "fsdp"):
        args = pretrain_args(tmp_path, image_folder / "train", 4, "--run.strategy", strategy)
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "runs under torchrun" in err and len(err.splitlines()) == 1


# -- cluster habits: the folder lock, shard indexes -------------------------------------------


def lock_of(folder: Path, **owner) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    content = {"host": "node-17", "pid": 4242, "started": "earlier", "heartbeat": time.time()}
    path = folder / ".droppos.lock"
    path.write_text(json.dumps({**content, **owner}))
    return path


def test_a_lock_another_host_keeps_alive_is_respected(tmp_path):
    lock_of(tmp_path)
    with pytest.raises(ValueError, match="host node-17, pid 4242"):
        RunLock(tmp_path, run_id="torchelastic_run_id:other").acquire()


def test_a_lock_whose_heartbeat_stopped_is_taken_over(tmp_path, capsys):
    lock_of(tmp_path, heartbeat=time.time() - 2 * RunLock.STALE_AFTER)
    lock = RunLock(tmp_path).acquire()
    assert "no heartbeat" in capsys.readouterr().err
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock.path.exists()


def test_a_restart_of_the_same_job_on_other_hosts_takes_its_lock_over(tmp_path, capsys):
    lock_of(tmp_path, run_id="torchelastic_run_id:droppos-b16")  # rank 0 died on node-17
    lock = RunLock(tmp_path, run_id="torchelastic_run_id:droppos-b16").acquire()
    assert "a restart of this job" in capsys.readouterr().err
    lock.release()


def test_the_lock_keeps_beating(tmp_path, monkeypatch):
    monkeypatch.setattr(RunLock, "HEARTBEAT", 0.05)
    lock = RunLock(tmp_path).acquire()
    first = json.loads(lock.path.read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads(lock.path.read_text())["heartbeat"] > first
    lock.release()


def _race_for_the_lock(folder: str, barrier, wins) -> None:
    barrier.wait()
    try:
        RunLock(folder).acquire()  # never released: the process ends holding it
        wins.put(os.getpid())
    except ValueError:
        pass


def test_two_runs_starting_at_the_same_instant_cannot_both_take_the_lock(tmp_path):
    context = mp.get_context("fork")
    for trial in range(20):
        barrier, wins = context.Barrier(2), context.Queue()
        racers = [
            context.Process(
                target=_race_for_the_lock, args=(str(tmp_path / str(trial)), barrier, wins)
            )
            for _ in range(2)
        ]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(timeout=30)
        winners = []
        while not wins.empty():
            winners.append(wins.get())
        assert len(winners) == 1, trial


def test_a_half_written_shard_index_is_rebuilt_not_trusted(tmp_path):
    from droppos.data.shards import INDEX_SUFFIX, index_shard, write_shard

    shard = tmp_path / "train-000000.tar"
    write_shard(shard, [("000000001", b"\x89PNG fake", "png", 3)])
    cache = shard.with_name(shard.name + INDEX_SUFFIX)
    complete = json.loads(cache.read_text())["entries"]
    cache.write_text(cache.read_text()[:10])  # what a reader could see mid-write before
    os.utime(cache, (time.time() + 5, time.time() + 5))
    assert index_shard(shard) == complete
    assert not list(tmp_path.glob(f".{cache.name}*"))  # the rewrite left no temporary behind

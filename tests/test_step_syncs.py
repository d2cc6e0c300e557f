"""A whole training step never waits for the device: data to the device, forward, backward and
the optimiser, on every decode path and method, with and without accumulation.

On a GPU the host waits when it reads a value back from a tensor (`.item()`, `bool(t)`,
`.tolist()`) and when it builds a tensor from Python numbers on the device (a copy queued behind
everything before it). On the CPU neither waits, so the test catches the operations themselves:
`aten._local_scalar_dense` (every read of one value), `aten.lift_fresh` (every tensor made from
Python data) and the reads that bypass the dispatcher (`tolist`, `numpy`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from droppos.cli.main import parser_for, to_config
from droppos.data import set_epoch
from droppos.methods.pretrain import pretraining_loop

SYNCS = {"aten._local_scalar_dense.default", "aten.lift_fresh.default"}


class HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in SYNCS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for i in range(24):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(
            folder / f"{i}.jpg", quality=90
        )
    return root


PIXEL_BRANCH = ["--model.pixel_branch.depth", "1", "--model.pixel_branch.embed_dim", "16"]
MAE = ["--model.name", "mae", "--model.decoder.depth", "1", "--model.decoder.embed_dim", "16"]
MODELS = {
    "droppos": [],
    "droppos+pixel": [*PIXEL_BRANCH, "--model.pixel_branch.num_heads", "2"],
    "mae": [*MAE, "--model.decoder.num_heads", "2"],
}
CASES = [(path, model, 1) for path in ("pil", "draft", "tensor", "device") for model in MODELS]
CASES += [(path, "droppos+pixel", 2) for path in ("pil", "device")]


@pytest.mark.parametrize(("decode", "model", "accum"), CASES)
def test_a_training_step_never_reads_the_device(tmp_path, jpegs, monkeypatch, decode, model, accum):
    args = [
        "pretrain", *MODELS[model],
        "--model.encoder.img_size", "16", "--model.encoder.patch_size", "4",
        "--model.encoder.in_chans", "3", "--model.encoder.embed_dim", "32",
        "--model.encoder.depth", "1", "--model.encoder.num_heads", "2",
        "--data.source", str(jpegs), "--data.decode", decode, "--data.num_workers", "0",
        "--optim.batch_size", "4", "--optim.accum_steps", str(accum),
        "--run.output_dir", str(tmp_path), "--run.progress", "false", "--run.precision", "fp32",
        "--run.tensorboard", "false",
    ]  # fmt: skip
    if model != "mae":
        args += ["--model.decoder_embed_dim", "32", "--model.decoder_num_heads", "2"]
    parser = parser_for(args)
    loop = pretraining_loop(to_config(parser, parser.parse_args(args), "pretrain"))
    try:
        set_epoch(loop.loader, 0)
        loop.method.start_epoch(0, 0)
        steps = loop.optimizer_steps()
        loop.optimizer_step(loop.accumulate(next(steps))[0])  # warm: caches, optimiser state
        group, following = next(steps), next(steps)

        def host_read(*_, **__):
            raise AssertionError("a value read back from a tensor in the training step")

        with HostReads() as reads, monkeypatch.context() as patch:
            for name in ("tolist", "numpy"):
                patch.setattr(torch.Tensor, name, host_read)
            loss, *_ = loop.train_step(group, following)
        assert reads.seen == []
        assert loop.upcoming is not None  # the next step's first batch went out during this one
        assert torch.isfinite(loss)
    finally:
        loop.close()

"""Explicit attention is the fused kernel's arithmetic, and a run picks the one that is faster
for its device and precision (the explicit one only when training on a CPU in bf16)."""

from __future__ import annotations

import pytest
import torch

from droppos.cli.main import parser_for, to_config
from droppos.evaluation.finetune import finetuning_loop
from droppos.methods.pretrain import pretraining_loop
from droppos.models.attention import fused_attention_pays, use_fused_attention
from droppos.models.encoder import transformer_blocks


def forward_and_grads(block, x, **where):
    x = x.clone().requires_grad_(True)
    out = block(x, **where)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("where", ["all rows", "some rows", "some context"])
def test_explicit_attention_computes_what_the_fused_kernel_computes(where):
    torch.manual_seed(0)
    block = transformer_blocks(32, 1, 4, 4.0)[0]
    x = torch.randn(3, 9, 32)
    ids = torch.tensor([[0, 2, 5], [0, 1, 8], [0, 7, 3]])
    kwargs = {"all rows": {}, "some rows": {"rows": ids}, "some context": {"context": ids}}[where]
    assert use_fused_attention(block, True) == 1
    fused = forward_and_grads(block, x, **kwargs)
    use_fused_attention(block, False)
    explicit = forward_and_grads(block, x, **kwargs)
    torch.testing.assert_close(explicit[0], fused[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(explicit[1], fused[1], rtol=1e-4, atol=1e-5)
    for a, b in zip(explicit[2], fused[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_only_cpu_training_in_bf16_computes_attention_explicitly():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not fused_attention_pays(cpu, "bf16")
    assert fused_attention_pays(cpu, "fp32")
    assert fused_attention_pays(cuda, "bf16") and fused_attention_pays(cuda, "fp16")


RUNS = {
    "droppos": ["pretrain"],
    "mae": ["pretrain", "--model.name", "mae"],
    "mp3": ["pretrain", "--model.name", "mp3"],
    "finetune": ["finetune", "--model.checkpoint", "random", "--data.train_images", "200"],
}


@pytest.mark.parametrize(("precision", "fused"), [("bf16", False), ("fp32", True)])
@pytest.mark.parametrize("run", list(RUNS))
def test_a_training_run_sets_every_attention_of_its_model(tmp_path, precision, fused, run):
    args = [
        *RUNS[run], "--optim.epochs", "1", "--run.output_dir", str(tmp_path),
        "--run.precision", precision, "--run.progress", "false", "--data.num_workers", "0",
    ]  # fmt: skip
    parser = parser_for(args)
    config = to_config(parser, parser.parse_args(args), args[0])
    loop = pretraining_loop(config) if args[0] == "pretrain" else finetuning_loop(config)
    try:
        kernels = {m.fused_attn for m in loop.method.model.modules() if hasattr(m, "fused_attn")}
    finally:
        loop.close()
    assert kernels == {fused}

"""MP3 on a tiny model: no positions in, attention restricted to the context, every patch's
position classified."""

import math

import pytest
import torch
import torch.nn.functional as F

from droppos import create_model
from droppos.objective.smoothing import smoothing_map

L = 16  # 32x32 images, 8x8 patches: a 4x4 grid


def tiny_mp3(**overrides):
    shape = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    return create_model("mp3_vit_tiny_patch16", **{**shape, **overrides}).eval()


def noise(n, seed=0):
    return torch.rand(n, L, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_a_context_fixed_by_the_noise(images):
    model = tiny_mp3()  # patch_mask_ratio 0.75: 4 of 16 patches form the context
    out = model(images, patch_noise=noise(3))
    assert out.position_logits.shape == (3, L, L)
    assert out.context.sum(dim=1).tolist() == [4.0, 4.0, 4.0]
    lowest = noise(3).argsort(dim=1)[:, :4]  # lower noise = in the context
    assert torch.equal(out.context.nonzero()[:, 1].view(3, 4).sort().values, lowest.sort().values)
    again = model(images, patch_noise=noise(3))
    assert torch.equal(out.position_logits, again.position_logits)


def test_the_input_carries_no_position(images):
    model = tiny_mp3()
    assert not model.pos_embed.any()
    out = model(images, patch_noise=noise(3))
    # Moving the whole grid of patches (content and context together) only moves the outputs.
    order = torch.randperm(L, generator=torch.Generator().manual_seed(1))
    patches = images.unfold(2, 8, 8).unfold(3, 8, 8)  # [N, C, 4, 4, 8, 8]
    flat = patches.reshape(3, 3, L, 8, 8)[:, :, order].reshape(3, 3, 4, 4, 8, 8)
    moved = flat.permute(0, 1, 2, 4, 3, 5).reshape(3, 3, 32, 32)
    moved_out = model(moved, patch_noise=noise(3)[:, order])
    assert torch.allclose(moved_out.position_logits, out.position_logits[:, order], atol=1e-5)


def test_a_patch_outside_the_context_changes_no_other_patchs_output(images):
    model = tiny_mp3()
    patch_noise = noise(3)
    out = model(images, patch_noise=patch_noise)
    outside = int(out.context[0].argmin())  # a patch that only queries
    row, col = divmod(outside, 4)
    changed = images.clone()
    changed[0, :, row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] = 5.0
    new = model(changed, patch_noise=patch_noise)
    others = [j for j in range(L) if j != outside]
    assert torch.allclose(new.position_logits[0, others], out.position_logits[0, others])
    assert not torch.allclose(new.position_logits[0, outside], out.position_logits[0, outside])
    inside = int(out.context[0].argmax())  # a context patch is attended to by every patch
    row, col = divmod(inside, 4)
    changed[0, :, row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] = 5.0
    assert not torch.allclose(model(changed, patch_noise=patch_noise).position_logits[0, others],
                              new.position_logits[0, others])  # fmt: skip


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_loss_equals_a_hand_computation_over_every_patch(images, sigma):
    model = tiny_mp3()
    targets = smoothing_map((4, 4), sigma)
    out = model(images, target_map=targets, patch_noise=noise(3))
    log_probs = F.log_softmax(out.position_logits.detach().double(), dim=-1)
    by_hand = -sum(
        float((targets[j].double() * log_probs[i, j]).sum()) for i in range(3) for j in range(L)
    ) / (3 * L)
    assert math.isclose(float(out.position_loss), by_hand, rel_tol=1e-5)


def test_with_every_patch_in_the_context_it_is_a_plain_vit_without_positions(images):
    model = tiny_mp3(patch_mask_ratio=0.0)
    out = model(images, patch_noise=noise(3))
    plain = model.run_blocks(model.embed_patches(images))  # every token attended to
    assert torch.allclose(out.position_logits, model.position_head(plain[:, 1:]), atol=1e-5)


def test_forward_and_backward_never_read_values_on_the_host(images, monkeypatch):
    model = tiny_mp3().train()

    def host_sync(*args, **kwargs):
        raise AssertionError("host synchronisation in the hot path")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    out = model(images, patch_noise=noise(3))
    out.loss.backward()
    monkeypatch.undo()
    assert out.loss.item() > 0

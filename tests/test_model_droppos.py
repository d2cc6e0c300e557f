"""The objective end to end on a tiny model: the loss, its gradients, and what cannot leak."""

import math

import pytest
import torch
import torch.nn.functional as F

from droppos import create_model
from droppos.objective.losses import confident_tokens
from droppos.objective.smoothing import smoothing_map
from tests.helpers import tiny_droppos

L, V, K = 64, 16, 4


def fixed_noise(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, L, generator=generator), torch.rand(n, V, generator=generator)


def test_fixed_noise_gives_identical_losses(images):
    model = tiny_droppos()
    patch_noise, position_noise = fixed_noise(len(images))
    first = model(images, patch_noise=patch_noise, position_noise=position_noise)
    second = model(images, patch_noise=patch_noise, position_noise=position_noise)
    assert torch.equal(first.loss, second.loss)
    assert torch.equal(first.position_logits, second.position_logits)
    other = model(images, patch_noise=fixed_noise(len(images), seed=1)[0])
    assert not torch.equal(first.loss, other.loss)


def test_noise_of_the_wrong_shape_is_refused(images):
    model = tiny_droppos()
    with pytest.raises(ValueError, match="patch_noise"):
        model(images, patch_noise=torch.rand(len(images), L + 1))
    with pytest.raises(ValueError, match="position_noise"):
        model(images, position_noise=torch.rand(len(images), V - 1))


def test_gradient_at_position_kept_tokens_is_exactly_zero(images):
    model = tiny_droppos()
    out = model(images)
    out.position_logits.retain_grad()
    out.loss.backward()
    grad = out.position_logits.grad
    kept = ~out.position_dropped
    assert torch.count_nonzero(grad[kept]) == 0
    assert torch.count_nonzero(grad[out.position_dropped]) > 0


def test_permuting_visible_tokens_permutes_the_outputs(images):
    """Order carries no position: present the same visible patches, with the same positions
    dropped, in another order, and the logits come out permuted the same way."""
    model = tiny_droppos().eval()
    patch_noise, position_noise = fixed_noise(len(images))
    base = model(images, patch_noise=patch_noise, position_noise=position_noise)
    perm = torch.randperm(V)
    ranks_kept = torch.argsort(patch_noise, 1)[:, :V]  # visible patches in noise order
    new_patch_noise = patch_noise.clone()
    # give the visible patches the same noise values, permuted: same set, new order
    new_patch_noise.scatter_(1, ranks_kept[:, perm], torch.gather(patch_noise, 1, ranks_kept))
    new_position_noise = position_noise[:, perm]
    permuted = model(images, patch_noise=new_patch_noise, position_noise=new_position_noise)
    assert torch.equal(permuted.ids_keep, base.ids_keep[:, perm])
    assert torch.equal(permuted.position_dropped, base.position_dropped[:, perm])
    torch.testing.assert_close(permuted.position_logits, base.position_logits[:, perm])
    torch.testing.assert_close(permuted.loss, base.loss)


def test_loss_equals_a_direct_token_by_token_computation(images):
    sigma, tau = 0.8, 0.1
    model = tiny_droppos(attentive_tau=tau)
    patch_noise, position_noise = fixed_noise(len(images))
    target_map = smoothing_map((8, 8), sigma)
    out = model(images, target_map, patch_noise=patch_noise, position_noise=position_noise)

    n, h, w = len(images), 8, 8
    ids_keep = torch.argsort(patch_noise, 1)[:, :V]
    dropped = torch.zeros(n, V, dtype=torch.bool)
    for i in range(n):
        dropped[i, torch.argsort(position_noise[i])[K:]] = True

    # encoder input written token by token
    with torch.no_grad():
        patches = model.patch_embed(images)
        rows = []
        for i in range(n):
            row = []
            for j in range(V):
                position = int(ids_keep[i, j])
                embedding = (
                    model.mask_pos_token[0, 0]
                    if dropped[i, j]
                    else model.pos_embed[0, 1 + position]
                )
                row.append(patches[i, position] + embedding)
            rows.append(torch.stack(row))
        latent = model.run_blocks(torch.stack(rows))
        logits = model.forward_decoder(latent)
    torch.testing.assert_close(out.position_logits, logits)

    # attentive weights from the full, unmasked image
    with torch.no_grad():
        features = model.forward_features(images)
    total, weight_sum, correct, plain_correct = 0.0, 0.0, 0.0, 0.0
    for i in range(n):
        full = torch.stack(
            [F.cosine_similarity(features[i, 0], features[i, 1 + j], dim=0) / tau for j in range(L)]
        ).softmax(0)
        visible_weights = full[ids_keep[i]] / full[ids_keep[i]].sum()
        for j in range(V):
            if not dropped[i, j]:
                continue
            true = int(ids_keep[i, j])
            target = torch.tensor(
                [
                    math.exp(-((true // w - c // w) ** 2 + (true % w - c % w) ** 2) / sigma**2)
                    for c in range(h * w)
                ]
            )
            target = target / target.sum()
            ce = -(target * F.log_softmax(logits[i, j], 0)).sum()
            m = visible_weights[j]
            total += float(m * ce)
            weight_sum += float(m)
            hit = float(logits[i, j].argmax() == true)
            correct += float(m) * hit
            plain_correct += hit
    assert out.position_loss.item() == pytest.approx(total / weight_sum, rel=1e-5)
    assert out.loss.item() == pytest.approx(total / weight_sum, rel=1e-5)
    assert out.weighted_position_accuracy.item() == pytest.approx(correct / weight_sum, abs=1e-6)
    assert out.position_accuracy.item() == pytest.approx(plain_correct / (n * (V - K)), abs=1e-6)


def test_without_attentive_weights_every_dropped_token_counts_the_same(images):
    model = tiny_droppos(attentive=False)
    out = model(images, smoothing_map((8, 8), 0.0))
    assert torch.equal(out.token_weights, out.position_dropped.float())
    expected = F.cross_entropy(
        out.position_logits[out.position_dropped], out.ids_keep[out.position_dropped]
    )
    torch.testing.assert_close(out.loss, expected)


def test_pos_weight_scales_the_loss_outside_multi_task(images):
    patch_noise, position_noise = fixed_noise(len(images))
    torch.manual_seed(0)
    plain = tiny_droppos()(images, patch_noise=patch_noise, position_noise=position_noise)
    torch.manual_seed(0)
    scaled = tiny_droppos(pos_weight=0.5)(
        images, patch_noise=patch_noise, position_noise=position_noise
    )
    torch.testing.assert_close(scaled.loss, 0.5 * plain.loss)


def test_confidence_ignore_skips_tokens_already_above_the_target(images):
    model = tiny_droppos(confidence_ignore=True, attentive=False)
    with torch.no_grad():  # uniform predictions: probability 1/L everywhere
        model.decoder_pred.weight.zero_()
        model.decoder_pred.bias.zero_()
    out = model(images, smoothing_map((8, 8), 1.0))
    # 1/L is below the smoothing map's diagonal, so nothing is skipped
    assert torch.equal(out.token_weights, out.position_dropped.float())
    logits = torch.full((1, 2, L), -20.0)
    logits[0, 0, 5] = 20.0  # token 0 sure of its (true) position 5
    confident = confident_tokens(logits, torch.tensor([[5, 6]]), smoothing_map((8, 8), 1.0))
    assert confident.tolist() == [[True, False]]


@pytest.mark.parametrize("kind", ["learnable", "zeros", "wrong_pos"])
def test_every_mask_token_kind_trains(images, kind):
    model = tiny_droppos(mask_token_kind=kind)
    out = model(images)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.mask_pos_token.requires_grad == (kind == "learnable")
    if kind == "zeros":
        assert torch.count_nonzero(model.mask_pos_token) == 0


@pytest.mark.parametrize("kind", ["learnable", "zeros", "wrong_pos"])
def test_dropping_every_position_leaves_no_true_position_in_the_encoder(images, kind):
    model = tiny_droppos(position_drop_ratio=1.0, mask_token_kind=kind)
    patch_noise, position_noise = fixed_noise(images.shape[0])
    _, drop = model.masks(images, patch_noise, position_noise)
    assert drop.dropped.all()
    out = model(images)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.position_dropped.all()


def test_mae_branch_loss_is_normalised_pixel_mse_on_masked_patches(images):
    model = tiny_droppos(pixel_branch=True)
    patch_noise, position_noise = fixed_noise(len(images))
    out = model(images, patch_noise=patch_noise, position_noise=position_noise)
    p = 4
    patches = images.unfold(2, p, p).unfold(3, p, p)  # n, c, gh, gw, p, p
    patches = patches.permute(0, 2, 3, 4, 5, 1).reshape(len(images), L, p * p * 3)
    target = (patches - patches.mean(-1, keepdim=True)) / (
        patches.var(-1, keepdim=True) + 1e-6
    ).sqrt()
    masked = torch.ones(len(images), L, dtype=torch.bool)
    masked.scatter_(1, torch.argsort(patch_noise, 1)[:, :V], False)
    errors = ((out.pixel_pred - target) ** 2).mean(-1)
    torch.testing.assert_close(out.pixel_loss, errors[masked].mean())
    torch.testing.assert_close(out.loss, out.position_loss + out.pixel_loss)


def test_plain_mae_baseline_under_the_same_family(images):
    model = create_model(
        "mae_vit_tiny_patch16", img_size=32, patch_size=4, depth=2, num_heads=4, embed_dim=64
    )
    out = model(images)
    out.loss.backward()
    assert out.pixel_pred.shape == (3, L, 48)
    assert out.masked.sum(1).tolist() == [L - V] * 3


def test_rectangular_grid_and_greyscale():
    model = tiny_droppos(img_size=(32, 48), in_chans=1)
    out = model(torch.randn(2, 1, 32, 48))
    assert out.position_logits.shape == (2, int(96 * 0.25), 96)


@pytest.mark.slow  # bf16 is emulated on CPUs without it (30 s); the GPU check runs it
def test_bf16_autocast_runs_and_keeps_the_loss_in_fp32(images):
    model = tiny_droppos(pixel_branch=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_zeros_kind_adds_zeros_whatever_the_parameter_holds(images):
    # An original checkpoint trained with `zeros` carries a normally initialised, unused token.
    patch_noise, position_noise = fixed_noise(len(images))
    model = tiny_droppos(mask_token_kind="zeros")
    clean = model(images, patch_noise=patch_noise, position_noise=position_noise).loss
    with torch.no_grad():
        model.mask_pos_token.normal_(std=0.02)
    loaded = model(images, patch_noise=patch_noise, position_noise=position_noise).loss
    assert torch.equal(clean, loaded)


@pytest.mark.parametrize("pixel_branch", [False, True])
def test_shard_shares_with_global_normalisers_add_up_to_the_full_batch_loss(pixel_branch):
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model = tiny_droppos(pixel_branch=pixel_branch, confidence_ignore=True)
    patch_noise, position_noise = fixed_noise(len(images))
    full = model(images, patch_noise=patch_noise, position_noise=position_noise)
    shards = [
        model(images[s], patch_noise=patch_noise[s], position_noise=position_noise[s])
        for s in (slice(0, 2), slice(2, 6))
    ]
    # attentive weights make the shards' normalisers differ: a per-shard mean would be wrong
    assert not torch.isclose(shards[0].position_normaliser / 2, shards[1].position_normaliser / 4)
    position = sum(s.position_normaliser for s in shards)
    pixel = sum(s.masked_patches.sum() for s in shards) if pixel_branch else None
    shares = sum(s.global_loss(position, pixel) for s in shards)
    torch.testing.assert_close(shares, full.loss)
    per_shard_mean = sum(s.loss for s in shards) / 2
    assert not torch.isclose(per_shard_mean, full.loss)


def test_precomputed_loss_weights_give_the_same_forward(images):
    model = tiny_droppos(attentive_source="visible")
    patch_noise, position_noise = fixed_noise(len(images))
    inline = model(images, patch_noise=patch_noise, position_noise=position_noise)
    weights = model.loss_weights(images, patch_noise, position_noise)
    ahead = model(
        images, patch_noise=patch_noise, position_noise=position_noise, token_weights=weights
    )
    torch.testing.assert_close(ahead.loss, inline.loss)
    torch.testing.assert_close(weights, inline.token_weights)

"""Attentive reconstruction weights."""

import torch
import torch.nn.functional as F

from droppos.objective.attentive import attentive_weights
from droppos.objective.masking import random_patch_mask
from tests.helpers import tiny_droppos


def test_weights_sum_to_one_over_the_visible_patches():
    features = torch.randn(4, 1 + 16, 8)
    ids_keep = random_patch_mask(torch.rand(4, 16), 5).ids_keep
    weights = attentive_weights(features, ids_keep, tau=0.1)
    assert weights.shape == (4, 5)
    torch.testing.assert_close(weights.sum(1), torch.ones(4))
    assert (weights > 0).all()


def test_weights_are_the_full_softmax_gathered_and_renormalised():
    features = torch.randn(2, 1 + 9, 6)
    ids_keep = torch.tensor([[0, 4, 8], [2, 3, 7]])
    cos = F.cosine_similarity(features[:, :1], features[:, 1:], dim=-1)
    full = torch.softmax(cos / 0.1, dim=1)
    gathered = torch.gather(full, 1, ids_keep)
    expected = gathered / gathered.sum(1, keepdim=True)
    torch.testing.assert_close(attentive_weights(features, ids_keep, 0.1), expected)


def test_patches_like_cls_weigh_more():
    cls = torch.tensor([1.0, 0.0])
    features = torch.stack([cls, cls, torch.tensor([0.0, 1.0])])[None]  # patch 0 ~ cls
    weights = attentive_weights(features, torch.tensor([[0, 1]]), tau=0.1)
    assert weights[0, 0] > 0.99


def test_visible_source_reuses_the_masked_pass_and_skips_the_full_image():
    model = tiny_droppos(attentive_source="visible")
    calls = []
    model.forward_features_at = lambda *args: calls.append(args)  # must not be called
    images = torch.randn(2, 3, 32, 32)
    out = model(images)
    assert calls == []
    per_image = out.token_weights.sum(1)
    assert (per_image > 0).all() and (per_image < 1).all()  # dropped share of a unit total


def test_full_image_pass_computes_only_cls_and_visible_rows_exactly():
    """The attentive weights read only [CLS] and the visible patches: the pass that skips the
    other rows' queries in the last block gives the same features as the whole pass, gathered."""
    model = tiny_droppos()
    images = torch.randn(3, 3, 32, 32)
    ids_keep = random_patch_mask(torch.rand(3, model.num_patches), 5).ids_keep
    with torch.no_grad():
        full = model.forward_features(images)
        rows = torch.cat([torch.zeros(3, 1, dtype=torch.long), ids_keep + 1], dim=1)
        expected = torch.gather(full, 1, rows[..., None].expand(-1, -1, full.shape[-1]))
        torch.testing.assert_close(model.forward_features_at(images, ids_keep), expected)


def test_the_weights_are_computed_in_fp32_under_bf16_autocast():
    features = torch.randn(4, 17, 32, generator=torch.Generator().manual_seed(0))
    ids_keep = torch.argsort(torch.rand(4, 16), dim=1)[:, :8]
    reference = attentive_weights(features, ids_keep, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = attentive_weights(features, ids_keep, 0.1)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, reference)

"""which patches are seen, which lose their position, what replaces it."""

import torch

from droppos.objective.masking import (
    fill_with_wrong_positions,
    num_position_kept,
    num_visible,
    random_patch_mask,
    random_position_drop,
)
from tests.helpers import tiny_droppos


def test_vit_b16_counts_match_the_paper():
    visible = num_visible(196, 0.75)
    assert visible == 49
    assert num_position_kept(visible, 0.75) == 12


def test_lowest_noise_is_kept():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    mask = random_patch_mask(noise, 2)
    assert mask.ids_keep.tolist() == [[1, 3]]
    assert mask.masked.tolist() == [[True, False, True, False]]
    drop = random_position_drop(torch.tensor([[0.2, 0.7]]), 1)
    assert drop.dropped.tolist() == [[False, True]]


def test_model_token_counts(images):
    model = tiny_droppos()
    out = model(images)
    n, visible = images.shape[0], 16
    assert out.ids_keep.shape == (n, visible)
    assert out.position_logits.shape == (n, visible, 64)
    assert (out.position_dropped.sum(1) == visible - 4).all()  # V - K dropped per image
    assert (out.position_dropped.logical_not().sum(1) == 4).all()  # K kept
    for row in out.ids_keep:  # V distinct positions per image
        assert row.unique().numel() == visible


def test_wrong_positions_never_give_a_token_its_own_embedding():
    generator = torch.Generator().manual_seed(1)
    for dropped_count in (2, 3, 7, 15):
        n, visible, dim = 5, 16, 8
        positions = torch.randn(n, visible, dim, generator=generator)
        drop = random_position_drop(
            torch.rand(n, visible, generator=generator), visible - dropped_count
        )
        filled = fill_with_wrong_positions(positions, drop)
        changed = (filled != positions).any(-1)
        assert torch.equal(changed, drop.dropped)  # every dropped token, and only those
        # each dropped token carries the true embedding of another dropped token of its image
        for i in range(n):
            own = positions[i][drop.dropped[i]]
            given = filled[i][drop.dropped[i]]
            assert torch.equal(given.sort(0).values, own.sort(0).values)


def test_wrong_positions_differ_between_images_of_a_batch():
    # Every image drops the same tokens (the original code's defect only shows then: one
    # permutation shared by the whole batch); only the order of their noise differs.
    n, visible, kept = 8, 16, 4
    generator = torch.Generator().manual_seed(0)
    noise = torch.empty(n, visible)
    noise[:, :kept] = torch.linspace(0.0, 0.1, kept)  # tokens 0-3 keep their position
    for i in range(n):
        noise[i, kept:] = 0.5 + 0.5 * torch.rand(visible - kept, generator=generator)
    drop = random_position_drop(noise, kept)
    assert (drop.dropped == drop.dropped[0]).all()  # identical drop sets in every image
    positions = torch.arange(visible).float()[None, :, None].expand(n, visible, 1)
    filled = fill_with_wrong_positions(positions, drop)[..., 0]
    mappings = {tuple(row.tolist()) for row in filled}
    assert len(mappings) == n  # a permutation of its own for every image
    for row in filled:  # each a derangement of the dropped tokens
        assert (row[kept:] != torch.arange(kept, visible)).all()
        assert sorted(row[kept:].tolist()) == list(range(kept, visible))

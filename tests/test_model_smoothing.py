"""Gaussian position smoothing, its schedule, and a compiled forward that it never recompiles."""

import pytest
import torch

from droppos.objective.smoothing import PositionTargets, sigma_at_epoch, smoothing_map
from tests.helpers import tiny_droppos


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (14, 14)])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_rows_sum_to_one_and_peak_on_the_true_cell(grid, sigma):
    weights = smoothing_map(grid, sigma)
    torch.testing.assert_close(weights.sum(1), torch.ones(grid[0] * grid[1]))
    assert torch.equal(weights.argmax(1), torch.arange(grid[0] * grid[1]))


def test_sigma_zero_is_one_hot():
    assert torch.equal(smoothing_map((3, 4), 0.0), torch.eye(12))


def test_weights_follow_squared_grid_distance():
    h, w, sigma = 3, 5, 1.5
    weights = smoothing_map((h, w), sigma)
    i, j = 7, 14  # cells (1, 2) and (2, 4): squared distance 1 + 4
    raw = torch.tensor([((i // w - k // w) ** 2 + (i % w - k % w) ** 2) for k in range(h * w)])
    row = torch.exp(-raw.float() / sigma**2)
    torch.testing.assert_close(weights[i], row / row.sum())
    assert weights[i, j] == pytest.approx(float(row[j] / row.sum()))


def test_linear_decay_per_epoch():
    assert sigma_at_epoch(0, 100) == 1.0
    assert sigma_at_epoch(50, 100) == pytest.approx(0.5)
    assert sigma_at_epoch(100, 100) == 0.0
    assert sigma_at_epoch(10, 20, initial_sigma=2.0) == pytest.approx(1.0)


def test_targets_follow_the_schedule_and_are_cached_per_sigma():
    targets = PositionTargets((4, 4), initial_sigma=1.0, decay=True, total_epochs=4)
    first = targets.at_epoch(0)
    assert targets.at_epoch(0) is first  # built once per sigma
    torch.testing.assert_close(first, smoothing_map((4, 4), 1.0))
    torch.testing.assert_close(targets.at_epoch(2), smoothing_map((4, 4), 0.5))
    constant = PositionTargets((4, 4), initial_sigma=0.7, decay=False, total_epochs=4)
    assert constant.sigma(3) == 0.7


def test_a_compiled_model_does_not_recompile_when_sigma_changes(images):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = tiny_droppos()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    targets = PositionTargets(model.encoder_config.grid_size, 1.0, decay=True, total_epochs=12)
    noise = torch.rand(len(images), model.num_patches), torch.rand(len(images), 16)
    for epoch in range(12):  # 12 different sigmas, more than Dynamo's recompile limit of 8
        target_map = targets.at_epoch(epoch)
        output = compiled(images, target_map, *noise)
        if epoch == 0:
            frames = counter.frame_count
        # each epoch's map reaches the loss: the compiled forward equals the eager one
        torch.testing.assert_close(output.loss, model(images, target_map, *noise).loss)
    assert counter.frame_count == frames  # compiled once, never again

"""SPEC §1.7: Gaussian position smoothing and its schedule."""

import pytest
import torch

from droppos.objective.smoothing import SmoothingMaps, sigma_at_epoch, smoothing_map


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


def test_maps_are_cached_per_sigma():
    maps = SmoothingMaps((4, 4))
    first = maps(1.0, torch.device("cpu"))
    assert maps(1.0, torch.device("cpu")) is first
    assert maps(0.5, torch.device("cpu")) is not first

"""Position smoothing: Gaussian soft targets over the patch grid (SPEC §1.7).

Rows are normalised (the original normalised columns, SPEC §4). The L x L map is built with one
vectorised expression and cached per (grid, sigma, device); each step only gathers its rows.
"""

from __future__ import annotations

import torch


def smoothing_map(
    grid_size: tuple[int, int], sigma: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """[L, L] with row i = exp(-d2(i, j) / sigma^2) / sum_j(...); sigma 0 gives the identity."""
    if sigma < 0:
        raise ValueError(f"smoothing sigma must be >= 0, got {sigma}")
    h, w = grid_size
    num_positions = h * w
    if sigma == 0:
        return torch.eye(num_positions, device=device)
    index = torch.arange(num_positions, device=device)
    cells = torch.stack([index // w, index % w], dim=1).float()
    squared_distance = torch.cdist(cells, cells).square()
    weights = torch.exp(-squared_distance / sigma**2)
    return weights / weights.sum(dim=1, keepdim=True)


class SmoothingMaps:
    """Cache of smoothing maps; sigma changes once an epoch, so the cache stays tiny."""

    def __init__(self, grid_size: tuple[int, int], max_entries: int = 4) -> None:
        self.grid_size = grid_size
        self.max_entries = max_entries
        self._maps: dict[tuple[float, str], torch.Tensor] = {}

    def __call__(self, sigma: float, device: torch.device) -> torch.Tensor:
        key = (round(float(sigma), 12), str(device))
        found = self._maps.get(key)
        if found is None:
            if len(self._maps) >= self.max_entries:
                self._maps.pop(next(iter(self._maps)))
            found = self._maps[key] = smoothing_map(self.grid_size, key[0], device)
        return found


def sigma_at_epoch(epoch: float, total_epochs: int, initial_sigma: float = 1.0) -> float:
    """Linear decay `sigma_e = (1 - e / E) * sigma_0` (SPEC §1.7); never below zero."""
    if total_epochs <= 0:
        return initial_sigma
    return max(0.0, (1.0 - epoch / total_epochs) * initial_sigma)

"""Position smoothing: Gaussian soft targets over the patch grid (docs/method.md).

Rows are normalised (the original code normalised columns). The L x L map is built with one
vectorised expression and cached per (sigma, device) by `PositionTargets`, outside the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class PositionTargets:
    """The soft-target maps of a run: the sigma schedule and a small cache of [L, L] maps.

    Lives outside the model so that a compiled forward only ever sees a tensor argument: the
    map changes once an epoch, and Python state inside the graph would make `torch.compile`
    recompile for every new sigma (and fall back to eager after a few).
    """

    grid_size: tuple[int, int]
    initial_sigma: float = 1.0
    decay: bool = True
    total_epochs: int = 1
    max_entries: int = 4
    _maps: dict[tuple[float, str], torch.Tensor] = field(default_factory=dict, repr=False)

    def sigma(self, epoch: float) -> float:
        """This epoch's sigma: decayed linearly to 0 over the run, or constant."""
        if not self.decay:
            return self.initial_sigma
        return sigma_at_epoch(epoch, self.total_epochs, self.initial_sigma)

    def map_for_sigma(self, sigma: float, device: torch.device | str = "cpu") -> torch.Tensor:
        """[L, L] soft targets for `sigma` on `device`, built once and cached."""
        key = (round(float(sigma), 12), str(device))
        found = self._maps.get(key)
        if found is None:
            if len(self._maps) >= self.max_entries:
                self._maps.pop(next(iter(self._maps)))
            found = self._maps[key] = smoothing_map(self.grid_size, key[0], device)
        return found

    def at_epoch(self, epoch: float, device: torch.device | str = "cpu") -> torch.Tensor:
        """[L, L] soft targets of `epoch` (what the engine passes into the model's forward)."""
        return self.map_for_sigma(self.sigma(epoch), device)


def sigma_at_epoch(epoch: float, total_epochs: int, initial_sigma: float = 1.0) -> float:
    """Linear decay `sigma_e = (1 - e / E) * sigma_0` (docs/method.md); never below zero."""
    if total_epochs <= 0:
        return initial_sigma
    return max(0.0, (1.0 - epoch / total_epochs) * initial_sigma)

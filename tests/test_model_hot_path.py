"""no host synchronisation and no oversized temporaries in forward + loss."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import tiny_droppos

L, V = 64, 16


@pytest.mark.parametrize("kind", ["learnable", "wrong_pos"])
def test_forward_and_backward_never_read_values_on_the_host(images, monkeypatch, kind):
    model = tiny_droppos(mask_token_kind=kind, pixel_branch=True, confidence_ignore=True)
    model(images)  # warm the smoothing-map cache, as every step after the first finds it

    def host_sync(*args, **kwargs):
        raise AssertionError("host synchronisation in the hot path")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    out = model(images)
    out.loss.backward()
    monkeypatch.undo()
    assert out.loss.item() > 0


class LargestTensors(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, tuple | list) else (result,):
            if isinstance(value, torch.Tensor):
                self.shapes.append(tuple(value.shape))
        return result


def test_no_batch_by_position_by_position_or_repeated_mask_tokens(images):
    n, dim = len(images), 40  # a width distinct from L, so shapes are unambiguous
    model = tiny_droppos(mask_token_kind="learnable", embed_dim=dim)
    model(images)
    with LargestTensors() as seen:
        model(images).loss.backward()
    for shape in seen.shapes:
        assert not (len(shape) >= 3 and shape[-2:] == (L, L)), shape  # no N x L x L
        assert not (n * V in shape and dim in shape), shape  # no N x (N*V) x D
    assert max(torch.Size(s).numel() for s in seen.shapes) < n * L * L * 4

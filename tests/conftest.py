"""Shared fixtures and helpers for the torchcame test suite."""

from __future__ import annotations

import io

import pytest
import torch

#: Parameter shapes the parity tests run through: 0-d .. 4-d, a non-square matrix, a
#: batch of matrices, zero-size tensors (rows, columns, vectors).
SHAPES = [(), (7,), (5, 3), (3, 8), (2, 4, 6), (2, 3, 4, 5), (1, 1), (0, 4), (4, 0), (0,)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_params(shapes, dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        for s in shapes
    ]


def clone_params(params) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def random_grads(params, step: int, seed: int = 1, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    return [
        (scale * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(p.dtype)
        for p in params
    ]


def save_load(obj):
    """``obj`` after a ``torch.save``/``torch.load(weights_only=True)`` round trip."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)

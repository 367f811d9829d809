"""The math CAME shares between its second-moment and its confidence statistics.

Both statistics of a matrix-shaped tensor are stored factored, as a row vector and a column
vector over its last two dimensions (leading dimensions are batch dimensions). Every
implementation (reference, multi-tensor, fused, distributed) calls these helpers; none
re-derives them.

For a statistic ``S`` of shape ``(..., n, m)`` the factored estimate is

.. math::

    \\hat S = \\frac{R}{\\operatorname{mean}(R)} \\otimes C, \\qquad
    R = \\operatorname{EMA}(\\operatorname{mean}_{-1} S), \\quad
    C = \\operatorname{EMA}(\\operatorname{mean}_{-2} S)

which is Adafactor's ``R C^T / 1^T R`` written with means (Shazeer & Stern, 2018, eq. 4;
Luo et al., 2023, Algorithm 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "is_factored",
    "row_shape",
    "col_shape",
    "ema_",
    "approx_rsqrt",
    "rms",
    "ema_foreach_",
    "approx_rsqrt_into",
    "factor_rsqrt",
]


def is_factored(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` keeps factored (row/column) statistics.

    The reference rule: every tensor with two or more dimensions is factored over its last
    two dimensions; scalars and vectors keep a full second moment and no confidence statistic.
    """
    return len(shape) >= 2


def row_shape(shape: torch.Size | tuple[int, ...]) -> torch.Size:
    """Shape of the row statistic ``(..., n)`` of a factored tensor of shape ``(..., n, m)``."""
    return torch.Size(shape[:-1])


def col_shape(shape: torch.Size | tuple[int, ...]) -> torch.Size:
    """Shape of the column statistic ``(..., m)`` of a factored tensor of shape ``(..., n, m)``."""
    return torch.Size(tuple(shape[:-2]) + tuple(shape[-1:]))


def ema_(average: Tensor, value: Tensor, beta: float) -> Tensor:
    """In place ``average = beta * average + (1 - beta) * value``."""
    return average.mul_(beta).add_(value, alpha=1.0 - beta)


def approx_rsqrt(row: Tensor, col: Tensor) -> Tensor:
    """``1 / sqrt(S_hat)`` for the factored estimate ``S_hat = (row / mean(row)) ⊗ col``.

    Args:
        row: the row statistic, shape ``(..., n)``.
        col: the column statistic, shape ``(..., m)``.

    Returns:
        A new tensor of shape ``(..., n, m)``.
    """
    row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    col_factor = col.unsqueeze(-2).rsqrt()
    return torch.mul(row_factor, col_factor)


def rms(tensor: Tensor) -> Tensor:
    """Root mean square over the whole tensor, ``||x||_2 / sqrt(numel)`` (0-d tensor)."""
    return tensor.norm(2) / math.sqrt(tensor.numel())


def ema_foreach_(averages: list[Tensor], values: list[Tensor], beta: float) -> None:
    """:func:`ema_` for lists of tensors, as two ``torch._foreach`` calls."""
    torch._foreach_mul_(averages, beta)
    torch._foreach_add_(averages, values, alpha=1.0 - beta)


def approx_rsqrt_into(row: Tensor, col: Tensor, out: Tensor) -> Tensor:
    """:func:`approx_rsqrt` written into ``out`` (shape ``(..., n, m)``), no full-size temporary."""
    row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    col_factor = col.unsqueeze(-2).rsqrt()
    return torch.mul(row_factor, col_factor, out=out)


def factor_rsqrt(row: Tensor, col: Tensor) -> tuple[Tensor, Tensor]:
    """The two factors of :func:`approx_rsqrt`: ``rsqrt(row / mean(row))`` and ``rsqrt(col)``.

    ``approx_rsqrt(row, col) == row_factor[..., :, None] * col_factor[..., None, :]``; fused
    kernels take the factors and form the product per element instead of storing it.
    """
    row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_()
    return row_factor, col.rsqrt()

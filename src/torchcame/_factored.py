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
    "FACTOR_POLICIES",
    "factored_dims",
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


#: ``factor_dims`` policies: the reference's last two dims, or the two largest dims.
FACTOR_POLICIES = ("last_two", "largest")


def factored_dims(
    shape: torch.Size | tuple[int, ...], policy: str = "last_two", min_dim: int = 1
) -> tuple[int, int] | None:
    """The two dims ``(row_dim, col_dim)`` a tensor of ``shape`` is factored over, or None.

    ``"last_two"`` (the reference): the last two dims of any tensor with ``ndim >= 2``.
    ``"largest"``: the two largest dims (the later one on ties), kept in their order, and only
    if both are at least ``min_dim``; otherwise the tensor keeps a full second moment. A 1x1
    conv weight ``(o, i, 1, 1)`` is then factored over ``(o, i)`` (state ``o + i`` per
    statistic) instead of over ``(1, 1)`` (state ``2 * o * i``, more than Adam's).
    """
    ndim = len(shape)
    if ndim < 2:
        return None
    if policy == "last_two":
        return (ndim - 2, ndim - 1)
    if policy != "largest":
        raise ValueError(f"Invalid factor_dims: {policy!r}; expected one of {FACTOR_POLICIES}")
    by_size = sorted(range(ndim), key=lambda d: (shape[d], d), reverse=True)
    first, second = sorted(by_size[:2])
    if min(shape[first], shape[second]) < min_dim:
        return None
    return (first, second)


def factored_layout(shape: torch.Size | tuple[int, ...], dims: tuple[int, int]) -> torch.Size:
    """``shape`` with the factored ``dims`` moved last (the layout the statistics refer to)."""
    rest = [s for d, s in enumerate(shape) if d not in dims]
    return torch.Size(rest + [shape[dims[0]], shape[dims[1]]])


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

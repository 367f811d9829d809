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

from .lowbit import stochastic_round_
from .options import FACTOR_POLICIES

__all__ = [
    "FACTOR_POLICIES",
    "compute_dtype",
    "factored_dims",
    "factored_layout",
    "is_factored",
    "row_shape",
    "col_shape",
    "ema_",
    "ema_foreach_",
    "factor_rsqrt",
    "approx_rsqrt",
    "rms",
    "clip_divisor",
    "clip_",
    "clip_foreach_",
    "bias_correction_scales",
    "weight_decay_",
    "apply_updates_",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype CAME's math and statistics use for a parameter of ``param_dtype``.

    float16/bfloat16 parameters are computed and stored in float32 (as the spec and the
    reference do); float32 and float64 parameters in their own dtype.
    """
    return torch.float32 if param_dtype in _LOW_PRECISION else param_dtype


def is_factored(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` keeps factored (row/column) statistics.

    The reference rule: every tensor with two or more dimensions is factored over its last
    two dimensions; scalars and vectors keep a full second moment and no confidence statistic.
    """
    return len(shape) >= 2


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


def ema_(average: Tensor, value: Tensor, beta: float | Tensor) -> Tensor:
    """In place ``average = beta * average + (1 - beta) * value`` (steps 2, 5 and 7).

    ``beta`` may be a 0-d tensor (a compiled step takes the scheduled β1 as an input).
    """
    if isinstance(beta, Tensor):
        return average.mul_(beta).add_(value * (1 - beta))
    return average.mul_(beta).add_(value, alpha=1.0 - beta)


def ema_foreach_(averages: list[Tensor], values: list[Tensor], beta: float) -> None:
    """:func:`ema_` for lists of tensors, as two ``torch._foreach`` calls."""
    torch._foreach_mul_(averages, beta)
    torch._foreach_add_(averages, values, alpha=1.0 - beta)


def factor_rsqrt(row: Tensor, col: Tensor, row_mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The two factors of ``1 / sqrt(S_hat)``, ``S_hat = (row / mean(row)) ⊗ col``.

    Returns ``rsqrt(row / mean(row))`` (shape ``(..., n)``) and ``rsqrt(col)`` (``(..., m)``);
    ``1 / sqrt(S_hat) == row_factor[..., :, None] * col_factor[..., None, :]``. ``row_mean``
    (shape ``(...)``) replaces ``mean(row)`` when the row spans several ranks' shards.
    """
    if row_mean is None:
        row_mean = row.mean(dim=-1, keepdim=True)
    else:
        row_mean = row_mean.unsqueeze(-1)
    return (row / row_mean).rsqrt_(), col.rsqrt()


def approx_rsqrt(
    row: Tensor, col: Tensor, *, row_mean: Tensor | None = None, out: Tensor | None = None
) -> Tensor:
    """``1 / sqrt(S_hat)`` for the factored estimate ``S_hat = (row / mean(row)) ⊗ col``.

    Args:
        row: the row statistic, shape ``(..., n)``.
        col: the column statistic, shape ``(..., m)``.
        row_mean: ``mean(row)`` over its last dim, if it must come from elsewhere.
        out: written in place if given (no full-size temporary).

    Returns:
        A tensor of shape ``(..., n, m)``.
    """
    row_factor, col_factor = factor_rsqrt(row, col, row_mean)
    return torch.mul(row_factor.unsqueeze(-1), col_factor.unsqueeze(-2), out=out)


def rms(tensor: Tensor) -> Tensor:
    """Root mean square over the whole tensor, ``||x||_2 / sqrt(numel)`` (0-d tensor)."""
    return tensor.norm(2) / math.sqrt(tensor.numel())


def clip_divisor(update_rms: Tensor, threshold: float) -> Tensor:
    """Step 4's divisor ``max(1, RMS(u) / d)`` given ``RMS(u)`` (a tensor: no host sync)."""
    return (update_rms / threshold).clamp_(min=1.0)


def clip_(update: Tensor, update_rms: Tensor, threshold: float) -> Tensor:
    """Step 4 in place: ``u /= max(1, RMS(u) / d)`` given ``RMS(u)`` (no host sync)."""
    return update.div_(clip_divisor(update_rms, threshold))


def clip_foreach_(updates: list[Tensor], threshold: float) -> None:
    """:func:`clip_` of each tensor of a list by its own RMS, as ``torch._foreach`` calls."""
    norms = torch._foreach_norm(updates, 2)
    # RMS, then / d: two divisions as in the reference (one by sqrt(n) * d rounds differently)
    torch._foreach_div_(norms, [math.sqrt(u.numel()) for u in updates])
    torch._foreach_div_(norms, threshold)
    torch._foreach_clamp_min_(norms, 1.0)
    torch._foreach_div_(updates, norms)


def bias_correction_scales(
    step: float, betas: tuple[float, float, float], factored: bool
) -> tuple[float, float]:
    """The opt-in bias correction at step ``t``: factors of ``u`` and of the update ``Δ``.

    ``v_hat / (1 - β2ᵗ)`` scales ``u`` by ``sqrt(1 - β2ᵗ)`` (before the clip); ``m / (1 - β1ᵗ)``
    and, for factored tensors, ``S_hat / (1 - β3ᵗ)`` scale ``Δ`` by
    ``sqrt(1 - β3ᵗ) / (1 - β1ᵗ)``.
    """
    beta1, beta2, beta3 = betas
    update_scale = math.sqrt(1.0 - beta2**step)
    delta_scale = 1.0 / (1.0 - beta1**step)
    if factored:
        delta_scale *= math.sqrt(1.0 - beta3**step)
    return update_scale, delta_scale


def weight_decay_(params: list[Tensor], lr: float | Tensor, weight_decay: float) -> None:
    """Step 9 in place: ``p -= lr * weight_decay * p`` with the reference's rounding.

    A float lr: ``p += (-weight_decay * lr) * p``, the product of two Python floats rounded
    once (the authors' ``add_(p, alpha=...)``). A tensor lr: ``p += -weight_decay * (p * lr)``
    with lr cast to p's dtype (``addcmul_``). The C++ and Triton kernels follow this rule.
    """
    if weight_decay == 0:
        return
    if isinstance(lr, Tensor):
        for param in params:
            param.addcmul_(param, lr.to(device=param.device, dtype=param.dtype),
                           value=-weight_decay)
    else:
        # the foreach op also under torch.compile: Dynamo guards its ``alpha`` (a changing
        # float lr recompiles), where ``Tensor.add_(alpha=)`` would keep the first lr seen
        torch._foreach_add_(params, params, alpha=-weight_decay * lr)


def apply_updates_(
    params: list[Tensor],
    updates: list[Tensor],
    lr: float | Tensor,
    weight_decay: float,
    stochastic_rounding: bool = False,
) -> None:
    """Steps 9-10: weight decay, then ``p -= lr * Δ``; ``updates`` (the Δ) are consumed.

    bf16/fp16 parameters with float32 updates subtract in float32 and round once to the
    parameter's dtype: to nearest, or with ``stochastic_rounding`` stochastically (the
    decay and the step are then both done in float32 before that one rounding).
    """
    targets = params
    if stochastic_rounding:
        params = [p.to(u.dtype) if p.dtype != u.dtype else p for p, u in zip(params, updates)]
    weight_decay_(params, lr, weight_decay)
    if isinstance(lr, Tensor):
        torch._foreach_mul_(updates, lr.to(device=updates[0].device, dtype=updates[0].dtype))
    else:
        torch._foreach_mul_(updates, lr)
    if all(p.dtype == u.dtype for p, u in zip(params, updates)):
        torch._foreach_sub_(params, updates)
    else:  # bf16/fp16 params, float32 updates: subtract in float32, round once
        for param, update in zip(params, updates):
            param.sub_(update)
    for target, param in zip(targets, params):
        if param is not target:
            stochastic_round_(target, param)

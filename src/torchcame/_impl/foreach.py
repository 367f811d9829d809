"""The multi-tensor CAME step: ``torch._foreach_*`` ops over groups of tensors.

Tensors are grouped by device, parameter dtype and factored/not (:func:`group_tensors`).
Within a group every elementwise operation of the rule is one ``_foreach`` call over the
whole group; only the row/column means (whose output shapes differ per tensor) and the
outer products ``row_factor ⊗ col_factor`` are per-tensor calls. The operation order is the
reference's, so float64 results agree with it to rounding, float32 to a few ulps.

Extra memory during a step: one float buffer per tensor of the chunk being stepped (the
normalized update, reused in place for the instability and the final step), plus gradient
copies for bf16/fp16 parameters (upcast) or ``maximize`` (negated). Each group is stepped in
chunks of at most :data:`CHUNK_ELEMENTS` elements (or one tensor, if larger), so the peak is
``max(CHUNK_ELEMENTS, largest tensor)`` elements rather than the whole model -- and the
allocator reuses the chunk's memory instead of faulting in fresh pages for every tensor.
Results do not depend on the chunking (every statistic is per tensor).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

from .._factored import approx_rsqrt_into, ema_foreach_, is_factored
from .common import StepArgs, compute_dtype

__all__ = ["step_multi_tensor", "group_tensors", "CHUNK_ELEMENTS"]

#: Elements of temporaries per chunk of tensors (16 MiB of float32).
CHUNK_ELEMENTS = 1 << 22


def group_tensors(
    params: list[Tensor], grads: list[Tensor], states: list[dict]
) -> dict[tuple[torch.device, torch.dtype, bool], list[int]]:
    """Indices of the non-empty tensors, keyed by ``(device, param dtype, factored)``."""
    groups: dict[tuple[torch.device, torch.dtype, bool], list[int]] = defaultdict(list)
    for i, param in enumerate(params):
        if param.numel() == 0:
            continue
        groups[(param.device, param.dtype, is_factored(param.shape))].append(i)
    return groups


def step_multi_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict],
    args: StepArgs,
) -> None:
    """Apply one CAME step to every ``(param, grad, state)``, in place, group by group."""
    torch._foreach_add_([state["step"] for state in states], 1.0)
    for (_, dtype, factored), index in group_tensors(params, grads, states).items():
        for chunk in _chunks(index, params):
            chunk_params = [params[i] for i in chunk]
            chunk_grads = [_compute_grad(grads[i], dtype, args.maximize) for i in chunk]
            chunk_states = [states[i] for i in chunk]
            if factored:
                _step_factored(chunk_params, chunk_grads, chunk_states, args)
            else:
                _step_full(chunk_params, chunk_grads, chunk_states, args)


def _chunks(index: list[int], params: list[Tensor]) -> list[list[int]]:
    """Split ``index`` into runs of at most :data:`CHUNK_ELEMENTS` elements (>= 1 tensor)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i in index:
        n = params[i].numel()
        if current and size + n > CHUNK_ELEMENTS:
            chunks.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        chunks.append(current)
    return chunks


def _compute_grad(grad: Tensor, param_dtype: torch.dtype, maximize: bool) -> Tensor:
    """The gradient in the compute dtype, negated for ``maximize`` (a copy only if needed)."""
    dtype = compute_dtype(param_dtype)
    if grad.dtype != dtype:
        grad = grad.to(dtype)
        return grad.neg_() if maximize else grad
    return grad.neg() if maximize else grad


def _step_factored(
    params: list[Tensor], grads: list[Tensor], states: list[dict], args: StepArgs
) -> None:
    beta1, beta2, beta3 = args.betas
    eps1, eps2 = args.eps
    exp_avgs = [s["exp_avg"] for s in states]

    # 1-3. G = g^2 + eps1; r, c = EMA of its row/col means; u = g / sqrt(v_hat)
    updates = torch._foreach_mul(grads, grads)
    torch._foreach_add_(updates, eps1)
    rows = [s["exp_avg_sq_row"] for s in states]
    cols = [s["exp_avg_sq_col"] for s in states]
    ema_foreach_(rows, [u.mean(dim=-1) for u in updates], beta2)
    ema_foreach_(cols, [u.mean(dim=-2) for u in updates], beta2)
    for update, row, col in zip(updates, rows, cols, strict=True):
        approx_rsqrt_into(row, col, out=update)
    torch._foreach_mul_(updates, grads)

    # 4-5. clip by RMS, momentum
    _clip_by_rms_(updates, args.clip_threshold)
    ema_foreach_(exp_avgs, updates, beta1)

    # 6-8. U = (u_hat - m)^2 + eps2; R, C = EMA of its row/col means; delta = m / sqrt(S_hat)
    torch._foreach_sub_(updates, exp_avgs)
    torch._foreach_mul_(updates, updates)
    torch._foreach_add_(updates, eps2)
    res_rows = [s["exp_avg_res_row"] for s in states]
    res_cols = [s["exp_avg_res_col"] for s in states]
    ema_foreach_(res_rows, [u.mean(dim=-1) for u in updates], beta3)
    ema_foreach_(res_cols, [u.mean(dim=-2) for u in updates], beta3)
    for update, row, col in zip(updates, res_rows, res_cols, strict=True):
        approx_rsqrt_into(row, col, out=update)
    torch._foreach_mul_(updates, exp_avgs)

    # 9-10. weight decay and the step
    _apply_updates_(params, updates, args.lr, args.weight_decay)


def _step_full(
    params: list[Tensor], grads: list[Tensor], states: list[dict], args: StepArgs
) -> None:
    beta1, beta2, _ = args.betas
    eps1, _ = args.eps
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]

    # 1-3. v = EMA(g^2 + eps1); u = g / sqrt(v)
    updates = torch._foreach_mul(grads, grads)
    torch._foreach_add_(updates, eps1)
    ema_foreach_(exp_avg_sqs, updates, beta2)
    torch._foreach_copy_(updates, exp_avg_sqs)
    torch._foreach_rsqrt_(updates)
    torch._foreach_mul_(updates, grads)

    # 4-5. clip by RMS, momentum; vectors take delta = m
    _clip_by_rms_(updates, args.clip_threshold)
    ema_foreach_(exp_avgs, updates, beta1)
    torch._foreach_copy_(updates, exp_avgs)

    _apply_updates_(params, updates, args.lr, args.weight_decay)


def _clip_by_rms_(updates: list[Tensor], clip_threshold: float) -> None:
    """``u /= max(1, RMS(u) / d)`` for each tensor (no host sync)."""
    norms = torch._foreach_norm(updates, 2)
    # RMS, then / d: two divisions as in the reference (one by sqrt(n) * d rounds differently)
    torch._foreach_div_(norms, [math.sqrt(u.numel()) for u in updates])
    torch._foreach_div_(norms, clip_threshold)
    torch._foreach_clamp_min_(norms, 1.0)
    torch._foreach_div_(updates, norms)


def _apply_updates_(
    params: list[Tensor], updates: list[Tensor], lr: float | Tensor, weight_decay: float
) -> None:
    """``p -= lr * weight_decay * p; p -= lr * update`` (``updates`` are consumed)."""
    if weight_decay != 0:
        if isinstance(lr, Tensor):  # as the reference: p += -wd * (p * lr), lr in p's dtype
            for param in params:
                param.addcmul_(param, lr.to(device=param.device, dtype=param.dtype),
                               value=-weight_decay)
        else:
            torch._foreach_add_(params, params, alpha=-weight_decay * lr)
    if isinstance(lr, Tensor):
        torch._foreach_mul_(updates, lr.to(device=updates[0].device, dtype=updates[0].dtype))
    else:
        torch._foreach_mul_(updates, lr)
    if params[0].dtype == updates[0].dtype:
        torch._foreach_sub_(params, updates)
    else:  # bf16/fp16 params, float32 updates: subtract in float32, round once
        for param, update in zip(params, updates, strict=True):
            param.sub_(update)

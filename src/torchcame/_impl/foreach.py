"""The multi-tensor CAME step: ``torch._foreach_*`` ops over groups of tensors.

Tensors are grouped by device, parameter dtype and factored/not (:func:`group_tensors`).
Within a group every elementwise operation of the rule is one ``_foreach`` call over the
whole group; only the row/column means (whose output shapes differ per tensor) and the
outer products ``row_factor ⊗ col_factor`` are per-tensor calls. The operation order is the
reference's, so float32 results equal it bit for bit (the default path's promise); every
option is implemented here too (low-bit momentum, stochastic rounding, bias correction,
``factor_dims="largest"``).

Extra memory during a step: one float buffer per tensor of the chunk being stepped (the
normalized update, reused in place for the instability and the final step), plus gradient
copies for bf16/fp16 parameters (upcast) or ``maximize`` (negated). Each group is stepped in
chunks of at most :data:`CHUNK_ELEMENTS` elements (or one tensor, if larger), so the peak is
``max(CHUNK_ELEMENTS, largest tensor)`` elements rather than the whole model. Results do not
depend on the chunking (every statistic is per tensor).

Low-bit momentum and stochastic rounding (:func:`step_on_float_copies`) step chunks of at
most :data:`LOWBIT_CHUNK_ELEMENTS` elements on float32 copies of the momentum (and of
bf16/fp16 weights for stochastic rounding), then store them back.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor

from .._factored import (
    apply_updates_,
    approx_rsqrt,
    bias_correction_scales,
    clip_foreach_,
    ema_foreach_,
)
from ..lowbit import load_momentum, stochastic_round_, store_momentum_
from ..options import StepArgs
from ..state import StateLayout

__all__ = ["step_multi_tensor", "step_on_float_copies", "group_tensors", "CHUNK_ELEMENTS"]

#: Elements of temporaries per chunk of tensors (16 MiB of float32).
CHUNK_ELEMENTS = 1 << 22

#: Elements per chunk when stepping on float32 copies of low-bit momentum / bf16 weights:
#: bounds the extra memory of a low-memory step to about 3 * 4 * 2^18 bytes (or the
#: largest tensor), with few chunks.
LOWBIT_CHUNK_ELEMENTS = 1 << 18

StepFn = Callable[[list[Tensor], list[Tensor], list[dict], StepArgs, list[StateLayout]], None]


def group_tensors(
    params: list[Tensor], layouts: list[StateLayout]
) -> dict[tuple[torch.device, torch.dtype, bool], list[int]]:
    """Indices of the non-empty tensors, keyed by ``(device, param dtype, factored)``."""
    groups: dict[tuple[torch.device, torch.dtype, bool], list[int]] = defaultdict(list)
    for i, (param, layout) in enumerate(zip(params, layouts)):
        if param.numel() == 0:
            continue
        groups[(param.device, param.dtype, layout.factored)].append(i)
    return groups


def step_multi_tensor(params: list[Tensor], grads: list[Tensor], states: list[dict],
                      args: StepArgs, layouts: list[StateLayout]) -> None:
    """Apply one CAME step to every ``(param, grad, state)``, in place, group by group.

    ``state["step"]`` has already been counted for this step by the caller.
    """
    if args.stochastic_rounding or any(layout.low_bit for layout in layouts):
        step_on_float_copies(_step_float, params, grads, states, args, layouts)
    else:
        _step_float(params, grads, states, args, layouts)


def _step_float(params, grads, states, args: StepArgs, layouts) -> None:
    """The multi-tensor step of tensors whose momentum is in the compute dtype."""
    for (_, _, factored), index in group_tensors(params, layouts).items():
        for chunk in _chunks(index, params, CHUNK_ELEMENTS):
            views = [_moved_views(params[i], grads[i], states[i], layouts[i], args)
                     for i in chunk]
            chunk_params = [v[0] for v in views]
            chunk_grads = [v[1] for v in views]
            exp_avgs = [v[2] for v in views]
            chunk_states = [states[i] for i in chunk]
            moved = [layouts[i].moved(params[i].dim()) for i in chunk]
            if factored:
                _step_factored(chunk_params, chunk_grads, exp_avgs, chunk_states, moved, args)
            else:
                _step_full(chunk_params, chunk_grads, exp_avgs, chunk_states, args)


def _moved_views(param: Tensor, grad: Tensor, state: dict, layout: StateLayout,
                 args: StepArgs) -> tuple[Tensor, Tensor, Tensor]:
    """``param``, the compute-dtype gradient and ``m``, with the factored dims moved last
    when they are not the last two (views: in-place updates reach the tensors)."""
    grad = _compute_grad(grad, layout.compute_dtype, args.maximize)
    exp_avg = state["exp_avg"]
    if layout.moved(param.dim()):
        dims = layout.factored_dims
        return (param.movedim(dims, (-2, -1)), grad.movedim(dims, (-2, -1)),
                exp_avg.movedim(dims, (-2, -1)))
    return param, grad, exp_avg


def _chunks(index: list[int], params: list[Tensor], limit: int) -> list[list[int]]:
    """Split ``index`` into runs of at most ``limit`` elements (each at least one tensor)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i in index:
        n = params[i].numel()
        if current and size + n > limit:
            chunks.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        chunks.append(current)
    return chunks


def _compute_grad(grad: Tensor, dtype: torch.dtype, maximize: bool) -> Tensor:
    """The gradient in the compute dtype, negated for ``maximize`` (a copy only if needed)."""
    if grad.dtype != dtype:
        grad = grad.to(dtype)
        return grad.neg_() if maximize else grad
    return grad.neg() if maximize else grad


def _bias_correct(updates: list[Tensor], states: list[dict], args: StepArgs, factored: bool,
                  which: int) -> None:
    """Multiply each update by its bias-correction factor (0: of u, 1: of the step Δ)."""
    scales = [bias_correction_scales(float(s["step"]), args.betas, factored)[which]
              for s in states]
    torch._foreach_mul_(updates, scales)


def _clip_and_momentum_(updates: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                        states: list[dict], args: StepArgs, factored: bool) -> None:
    """``updates`` hold ``1 / sqrt(v_hat)``: u = that * g (bias-corrected if asked), clipped by
    its RMS (step 4), then the momentum m = EMA(u_hat) (step 5)."""
    torch._foreach_mul_(updates, grads)
    if args.bias_correction:
        _bias_correct(updates, states, args, factored, 0)
    clip_foreach_(updates, args.clip_threshold)
    ema_foreach_(exp_avgs, updates, args.betas[0])


def _step_factored(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                   states: list[dict], moved: list[bool], args: StepArgs) -> None:
    _, beta2, beta3 = args.betas
    eps1, eps2 = args.eps

    # 1-3. G = g^2 + eps1; r, c = EMA of its row/col means; u = g / sqrt(v_hat)
    updates = list(torch._foreach_mul(grads, grads))
    torch._foreach_add_(updates, eps1)
    rows = [s["exp_avg_sq_row"] for s in states]
    cols = [s["exp_avg_sq_col"] for s in states]
    ema_foreach_(rows, [u.mean(dim=-1) for u in updates], beta2)
    ema_foreach_(cols, [u.mean(dim=-2) for u in updates], beta2)
    for i, (row, col) in enumerate(zip(rows, cols)):
        # a moved tensor's G is strided; u is a fresh contiguous tensor, as in the reference
        updates[i] = approx_rsqrt(row, col, out=None if moved[i] else updates[i])
    _clip_and_momentum_(updates, grads, exp_avgs, states, args, True)  # steps 3-5

    # 6-8. U = (u_hat - m)^2 + eps2; R, C = EMA of its row/col means; delta = m / sqrt(S_hat)
    torch._foreach_sub_(updates, exp_avgs)
    torch._foreach_mul_(updates, updates)
    torch._foreach_add_(updates, eps2)
    res_rows = [s["exp_avg_res_row"] for s in states]
    res_cols = [s["exp_avg_res_col"] for s in states]
    ema_foreach_(res_rows, [u.mean(dim=-1) for u in updates], beta3)
    ema_foreach_(res_cols, [u.mean(dim=-2) for u in updates], beta3)
    for update, row, col in zip(updates, res_rows, res_cols):
        approx_rsqrt(row, col, out=update)
    torch._foreach_mul_(updates, exp_avgs)
    if args.bias_correction:
        _bias_correct(updates, states, args, True, 1)

    # 9-10. weight decay and the step
    apply_updates_(params, updates, args.lr, args.weight_decay)


def _step_full(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
               states: list[dict], args: StepArgs) -> None:
    beta2 = args.betas[1]
    eps1 = args.eps[0]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]

    # 1-3. v = EMA(g^2 + eps1); u = g / sqrt(v)
    updates = list(torch._foreach_mul(grads, grads))
    torch._foreach_add_(updates, eps1)
    ema_foreach_(exp_avg_sqs, updates, beta2)
    torch._foreach_copy_(updates, exp_avg_sqs)
    torch._foreach_rsqrt_(updates)
    _clip_and_momentum_(updates, grads, exp_avgs, states, args, False)  # steps 3-5
    torch._foreach_copy_(updates, exp_avgs)  # vectors take delta = m
    if args.bias_correction:
        _bias_correct(updates, states, args, False, 1)

    apply_updates_(params, updates, args.lr, args.weight_decay)


def step_on_float_copies(step_fn: StepFn, params: list[Tensor], grads: list[Tensor],
                         states: list[dict], args: StepArgs, layouts: list[StateLayout]) -> None:
    """Run ``step_fn`` (a float-momentum path) on float32 copies of low-bit momentum, and of
    bf16/fp16 weights for stochastic rounding, a chunk of at most
    :data:`LOWBIT_CHUNK_ELEMENTS` elements (or one tensor) at a time; then store them back:
    int8/bf16 re-encoding, stochastic rounding of the weights.

    Same arithmetic as the reference path's low-memory handling, in the same order per tensor.
    """
    plain_args = dataclasses.replace(args, stochastic_rounding=False)
    for chunk in _chunks(list(range(len(params))), params, LOWBIT_CHUNK_ELEMENTS):
        chunk_params, chunk_grads, chunk_states, chunk_layouts = [], [], [], []
        momenta, rounded = [], []
        for i in chunk:
            param, grad, state, layout = params[i], grads[i], states[i], layouts[i]
            dtype = layout.compute_dtype
            momentum = load_momentum(state, layout.momentum, layout.block_size, dtype)
            momenta.append(momentum)
            chunk_states.append({**state, "exp_avg": momentum})  # "step" is shared
            chunk_layouts.append(dataclasses.replace(layout, momentum="float32"))
            if args.stochastic_rounding and param.dtype != dtype:
                rounded.append((param, len(chunk_params)))
                param, grad = param.to(dtype), grad.to(dtype)
            chunk_params.append(param)
            chunk_grads.append(grad)
        step_fn(chunk_params, chunk_grads, chunk_states, plain_args, chunk_layouts)
        for i, momentum in zip(chunk, momenta):
            store_momentum_(states[i], momentum, layouts[i].momentum, layouts[i].block_size)
        for param, index in rounded:
            stochastic_round_(param, chunk_params[index])

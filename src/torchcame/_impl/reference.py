"""The reference (single-tensor) CAME step: the spec's rule, one parameter at a time.

With default options it follows the authors' operation order exactly, so that in float32 it
reproduces their package bit for bit; the fast paths are tested against it. It is also the
one path that implements every opt-in extension (low-bit momentum, stochastic rounding, bias
correction, the ``"largest"`` factoring policy).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._factored import approx_rsqrt, ema_, factored_dims, rms
from ..lowbit import load_momentum, stochastic_round_, store_momentum_
from .common import StepArgs, compute_dtype


def step_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict],
    args: StepArgs,
) -> None:
    """Apply one CAME step to each ``(param, grad, state)`` triple, in place."""
    beta1, beta2, beta3 = args.betas
    eps1, eps2 = args.eps
    for param, grad, state in zip(params, grads, states):
        state["step"] += 1
        if param.numel() == 0:
            continue  # nothing to update; the reference would divide by zero here
        dtype = compute_dtype(param.dtype)
        if grad.dtype != dtype:
            grad = grad.to(dtype)
        if args.maximize:
            grad = -grad
        dims = factored_dims(param.shape, args.factor_dims, args.factor_min_dim)
        moved = dims is not None and dims != (param.dim() - 2, param.dim() - 1)
        if moved:  # statistics refer to the layout with the factored dims last
            grad = grad.movedim(dims, (-2, -1))

        # 1-3. second moment (factored for matrices) and the normalized update u
        update = grad.square().add_(eps1)  # G = g^2 + eps1
        if dims is not None:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            ema_(row, update.mean(dim=-1), beta2)
            ema_(col, update.mean(dim=-2), beta2)
            update = approx_rsqrt(row, col).mul_(grad)  # u = g / sqrt(v_hat)
        else:
            exp_avg_sq = state["exp_avg_sq"]
            ema_(exp_avg_sq, update, beta2)
            update = exp_avg_sq.rsqrt().mul_(grad)
        if args.bias_correction:  # v_hat / (1 - beta2^t)  =>  u * sqrt(1 - beta2^t)
            update.mul_(math.sqrt(1.0 - beta2 ** float(state["step"])))

        # 4. clip by RMS: u_hat = u / max(1, RMS(u) / d)
        update.div_((rms(update) / args.clip_threshold).clamp_(min=1.0))

        # 5. momentum (a float copy when it is stored in bf16 or int8)
        exp_avg = load_momentum(state, dtype, args.block_size)
        momentum = exp_avg.movedim(dims, (-2, -1)) if moved else exp_avg
        ema_(momentum, update, beta1)

        # 6-8. confidence: instability U = (u_hat - m)^2 + eps2, factored, scales the step
        if dims is not None:
            instability = update.sub_(momentum).square_().add_(eps2)
            res_row, res_col = state["exp_avg_res_row"], state["exp_avg_res_col"]
            ema_(res_row, instability.mean(dim=-1), beta3)
            ema_(res_col, instability.mean(dim=-2), beta3)
            update = approx_rsqrt(res_row, res_col).mul_(momentum)  # delta = m / sqrt(S_hat)
        else:
            update = momentum.clone()  # vectors: delta = m
        store_momentum_(state, exp_avg, args.block_size)
        if args.bias_correction:  # m / (1 - beta1^t) and S_hat / (1 - beta3^t)
            step = float(state["step"])
            scale = 1.0 / (1.0 - beta1**step)
            if dims is not None:
                scale *= math.sqrt(1.0 - beta3**step)
            update.mul_(scale)
        if moved:
            update = update.movedim((-2, -1), dims)

        # 9-10. decoupled weight decay, then the step
        apply_update_(param, update, args.lr, args.weight_decay, args.stochastic_rounding)


def apply_update_(
    param: Tensor,
    update: Tensor,
    lr: float | Tensor,
    weight_decay: float,
    stochastic_rounding: bool = False,
) -> None:
    """``param -= lr * weight_decay * param; param -= lr * update`` (``update`` is consumed).

    With ``stochastic_rounding`` and a bf16/fp16 ``param`` both are done in float32 and the
    result is rounded to the parameter's dtype once, stochastically.
    """
    target = param
    if stochastic_rounding and param.dtype != update.dtype:
        param = param.to(update.dtype)
    if weight_decay != 0:
        if isinstance(lr, Tensor):
            param.addcmul_(param, lr.to(param.dtype), value=-weight_decay)
        elif torch.compiler.is_compiling():
            # torch 2.13's Dynamo does not guard a float passed as ``alpha=``: a compiled step
            # would keep decaying with the first lr it saw. Same math, no ``alpha``.
            param.sub_(param * (weight_decay * lr))
        else:
            param.add_(param, alpha=-weight_decay * lr)  # the authors' op, bit for bit
    param.sub_(update.mul_(lr))
    if param is not target:
        stochastic_round_(target, param)

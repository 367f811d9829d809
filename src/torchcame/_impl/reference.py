"""The reference (single-tensor) CAME step: the spec's rule, one parameter at a time.

With default options it follows the authors' operation order exactly, so that in float32 it
reproduces their package bit for bit; the other paths are tested against it. It implements
every option. Every piece of arithmetic comes from :mod:`torchcame._factored`.
"""

from __future__ import annotations

from torch import Tensor

from .._factored import (
    apply_updates_,
    approx_rsqrt,
    bias_correction_scales,
    clip_,
    ema_,
    rms,
)
from ..lowbit import load_momentum, store_momentum_
from ..options import StepArgs
from ..state import StateLayout

__all__ = ["step_single_tensor"]


def step_single_tensor(params: list[Tensor], grads: list[Tensor], states: list[dict],
                       args: StepArgs, layouts: list[StateLayout]) -> None:
    """Apply one CAME step to each ``(param, grad, state)``, in place.

    ``state["step"]`` has already been counted for this step by the caller.
    """
    beta1, beta2, beta3 = args.betas
    eps1, eps2 = args.eps
    for param, grad, state, layout in zip(params, grads, states, layouts):
        if param.numel() == 0:
            continue  # nothing to update; the reference would divide by zero here
        dtype = layout.compute_dtype
        if grad.dtype != dtype:
            grad = grad.to(dtype)
        if args.maximize:
            grad = -grad
        dims = layout.factored_dims
        moved = layout.moved(param.dim())
        if moved:  # statistics refer to the layout with the factored dims last
            grad = grad.movedim(dims, (-2, -1))
        if args.bias_correction:
            update_scale, delta_scale = bias_correction_scales(
                float(state["step"]), args.betas, dims is not None)

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
        if args.bias_correction:
            update.mul_(update_scale)

        # 4. clip by RMS: u_hat = u / max(1, RMS(u) / d)
        clip_(update, rms(update), args.clip_threshold)

        # 5. momentum (a float copy when it is stored in bf16 or int8)
        exp_avg = load_momentum(state, layout.momentum, layout.block_size, dtype)
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
        store_momentum_(state, exp_avg, layout.momentum, layout.block_size)
        if args.bias_correction:
            update.mul_(delta_scale)
        if moved:
            update = update.movedim((-2, -1), dims)

        # 9-10. decoupled weight decay, then the step
        apply_updates_([param], [update], args.lr, args.weight_decay, args.stochastic_rounding)

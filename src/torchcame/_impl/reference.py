"""The reference (single-tensor) CAME step: the spec's rule, one parameter at a time.

It follows the authors' operation order exactly, so that in float32 it reproduces their
package bit for bit; the fast paths are tested against it.
"""

from __future__ import annotations

from torch import Tensor

from .._factored import approx_rsqrt, ema_, rms
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
    lr = args.lr
    for param, grad, state in zip(params, grads, states):
        state["step"] += 1
        if param.numel() == 0:
            continue  # nothing to update; the reference would divide by zero here
        if grad.dtype != compute_dtype(param.dtype):
            grad = grad.to(compute_dtype(param.dtype))
        if args.maximize:
            grad = -grad

        # 1-3. second moment (factored for matrices) and the normalized update u
        update = grad.square().add_(eps1)  # G = g^2 + eps1
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            ema_(row, update.mean(dim=-1), beta2)
            ema_(col, update.mean(dim=-2), beta2)
            update = approx_rsqrt(row, col).mul_(grad)  # u = g / sqrt(v_hat)
        else:
            exp_avg_sq = state["exp_avg_sq"]
            ema_(exp_avg_sq, update, beta2)
            update = exp_avg_sq.rsqrt().mul_(grad)

        # 4. clip by RMS: u_hat = u / max(1, RMS(u) / d)
        update.div_((rms(update) / args.clip_threshold).clamp_(min=1.0))

        # 5. momentum
        exp_avg = state["exp_avg"]
        ema_(exp_avg, update, beta1)

        # 6-8. confidence: instability U = (u_hat - m)^2 + eps2, factored, scales the step
        if "exp_avg_res_row" in state:
            instability = update.sub_(exp_avg).square_().add_(eps2)
            res_row, res_col = state["exp_avg_res_row"], state["exp_avg_res_col"]
            ema_(res_row, instability.mean(dim=-1), beta3)
            ema_(res_col, instability.mean(dim=-2), beta3)
            update = approx_rsqrt(res_row, res_col).mul_(exp_avg)  # delta = m / sqrt(S_hat)
        else:
            update = exp_avg.clone()  # vectors: delta = m

        # 9-10. decoupled weight decay, then the step
        apply_update_(param, update, lr, args.weight_decay)


def apply_update_(param: Tensor, update: Tensor, lr: float | Tensor, weight_decay: float) -> None:
    """``param -= lr * weight_decay * param; param -= lr * update`` (``update`` is consumed)."""
    if weight_decay != 0:
        if isinstance(lr, Tensor):
            param.addcmul_(param, lr.to(param.dtype), value=-weight_decay)
        else:
            param.add_(param, alpha=-weight_decay * lr)
    param.sub_(update.mul_(lr))

"""The fused CAME step through ``torch.compile`` (Triton on CUDA, C++ on CPU), per tensor.

One compiled graph per (shape, dtype, device, constant hyperparameters) with
``dynamic=False``; ``lr`` and ``beta1`` (what schedulers change) are tensor inputs, so a
scheduler does not recompile. The arithmetic is :mod:`torchcame._factored`'s, written with
out-of-place ops for the compiler to fuse. Used on CUDA by ``fused=True`` when the Triton
kernels cannot run, and tested on CPU.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import Tensor

from .._factored import apply_updates_, approx_rsqrt, clip_, ema_, rms
from .._warnings import warn_once
from ..options import StepArgs
from ..state import StateLayout

__all__ = ["step_compiled"]

_FACTORED_KEYS = ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row",
                  "exp_avg_res_col")
_FULL_KEYS = ("exp_avg", "exp_avg_sq")


def _factored_step_math(param: Tensor, grad: Tensor, exp_avg: Tensor, row: Tensor, col: Tensor,
                        res_row: Tensor, res_col: Tensor, lr: Tensor, beta1: Tensor,
                        beta2: float, beta3: float, eps1: float, eps2: float, clip: float,
                        weight_decay: float, maximize: bool) -> None:
    """One factored tensor's step (the reference's math), for ``torch.compile`` to fuse."""
    g = grad.to(exp_avg.dtype)
    if maximize:
        g = -g
    sq = g * g + eps1
    ema_(row, sq.mean(dim=-1), beta2)
    ema_(col, sq.mean(dim=-2), beta2)
    u = approx_rsqrt(row, col) * g
    clip_(u, rms(u), clip)
    ema_(exp_avg, u, beta1.to(exp_avg.dtype))
    instability = (u - exp_avg).square() + eps2
    ema_(res_row, instability.mean(dim=-1), beta3)
    ema_(res_col, instability.mean(dim=-2), beta3)
    apply_updates_([param], [approx_rsqrt(res_row, res_col) * exp_avg], lr, weight_decay)


def _full_step_math(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                    lr: Tensor, beta1: Tensor, beta2: float, beta3: float, eps1: float,
                    eps2: float, clip: float, weight_decay: float, maximize: bool) -> None:
    """One vector/scalar tensor's step (the reference's math), for ``torch.compile``."""
    g = grad.to(exp_avg.dtype)
    if maximize:
        g = -g
    ema_(exp_avg_sq, g * g + eps1, beta2)
    u = exp_avg_sq.rsqrt() * g
    clip_(u, rms(u), clip)
    ema_(exp_avg, u, beta1.to(exp_avg.dtype))
    apply_updates_([param], [exp_avg.clone()], lr, weight_decay)


_compiled: dict[tuple, Callable] = {}


def _compiled_for(key: tuple, fn: Callable) -> Callable:
    """A ``torch.compile``d copy of ``fn`` owning its own code object, one per ``key``.

    Dynamo keeps its cache per code object with a small recompile limit; a fresh code object
    per (shape, dtype, hyperparameters) key compiles each group exactly once.
    """
    compiled = _compiled.get(key)
    if compiled is None:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{len(_compiled)}")
        fresh = types.FunctionType(code, fn.__globals__, code.co_name)
        compiled = torch.compile(fresh, dynamic=False, fullgraph=True)
        _compiled[key] = compiled
    return compiled


def step_compiled(params: list[Tensor], grads: list[Tensor], states: list[dict],
                  args: StepArgs, layouts: list[StateLayout]) -> list[int]:
    """The fused step through ``torch.compile`` (Triton on CUDA, C++ on CPU), per tensor.

    ``state["step"]`` has already been counted by the caller. Float momentum, the last two
    dims factored, no bias correction (the dispatcher sends other tensors elsewhere).
    Returns the indices of the tensors it could not step because compiling failed (e.g. no
    compiler on Windows); a warning says so once. Nothing of those tensors was changed.
    """
    beta1, beta2, beta3 = args.betas
    eps1, eps2 = args.eps
    # lr and beta1 (what schedulers change) are tensors; the rest are compile-time constants
    consts = (float(beta2), float(beta3), float(eps1), float(eps2),
              float(args.clip_threshold), float(args.weight_decay), bool(args.maximize))
    lr_cache: dict[torch.device, tuple[Tensor, Tensor]] = {}
    failed: list[int] = []
    for i, (param, grad, state, layout) in enumerate(zip(params, grads, states, layouts)):
        if param.numel() == 0:
            continue
        scheduled = lr_cache.get(param.device)
        if scheduled is None:
            scheduled = (torch.as_tensor(args.lr, dtype=torch.float64).to(param.device),
                         torch.tensor(float(beta1), dtype=torch.float64).to(param.device))
            lr_cache[param.device] = scheduled
        grad = grad.to(layout.compute_dtype) if grad.dtype != param.dtype else grad
        key = (tuple(param.shape), param.dtype, param.device, consts)
        if layout.factored:
            fn = _compiled_for(("factored", *key), _factored_step_math)
            tensors = (param, grad, *(state[k] for k in _FACTORED_KEYS), *scheduled)
        else:
            fn = _compiled_for(("full", *key), _full_step_math)
            tensors = (param, grad, *(state[k] for k in _FULL_KEYS), *scheduled)
        try:
            fn(*tensors, *consts)
        except Exception as exc:  # torch.compile unavailable: compiling fails before any write
            warn_once(f"torchcame: torch.compile failed for the fused step ({exc!r:.200}); "
                       "falling back to the multi-tensor (foreach) path")
            failed.append(i)
    return failed

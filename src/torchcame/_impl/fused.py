"""The fused CAME step: the whole rule in a few passes over memory, no full-size temporaries.

Two backends, chosen per device:

* **CPU**: the native C++ kernel (:func:`.cpu_kernel.step_cpu_kernel`; source in
  ``_impl/csrc``), compiled just in time on first use (about a minute once, then cached per
  user) and parallel over rows. It reads the gradient three times, the momentum twice, writes
  it once, and reads/writes the parameter once; u, U and S_hat are never stored.
* **other devices (CUDA)**: ``torch.compile`` (Triton) of a per-tensor step function, one
  compiled graph per (shape, dtype, hyperparameters) with ``dynamic=False``; ``lr`` is passed
  as a tensor so a scheduler does not recompile. Not exercised by the CPU test suite except
  through :func:`step_compiled` on CPU, which is tested (slow marker) for parity.

When the kernel cannot be built (no compiler) or ``torch.compile`` fails, a warning is
issued once and the multi-tensor path runs instead, with the same results. Non-contiguous
tensors, and gradients whose dtype differs from the parameter's, are stepped by the
multi-tensor path.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .._factored import factor_rsqrt, factored_dims, is_factored
from ..state import StateLayout
from .common import StepArgs, compute_dtype
from .cpu_kernel import step_cpu_kernel
from .foreach import step_multi_tensor

__all__ = ["step_fused", "step_fused_lowmem", "step_compiled"]

_FACTORED_KEYS = ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row",
                  "exp_avg_res_col")
_FULL_KEYS = ("exp_avg", "exp_avg_sq")
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _layouts_from_states(params: list[Tensor], states: list[dict],
                         args: StepArgs) -> list[StateLayout]:
    """Each parameter's state layout, read off its state.

    Transitional: until the state module hands every implementation its layouts (issue #11,
    item 2), the fused path's two entry points below derive them here for
    :func:`.cpu_kernel.step_cpu_kernel`, which itself never inspects dtypes.
    """
    momentum = {torch.int8: "int8", torch.bfloat16: "bfloat16"}
    return [StateLayout(momentum=momentum.get(state["exp_avg"].dtype, "float32"),
                        block_size=int(args.block_size),
                        factored_dims=factored_dims(param.shape, args.factor_dims,
                                                    args.factor_min_dim),
                        compute_dtype=compute_dtype(param.dtype))
            for param, state in zip(params, states, strict=True)]


def step_fused(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict],
    args: StepArgs,
) -> None:
    """Apply one CAME step to every ``(param, grad, state)``, in place, with fused kernels."""
    torch._foreach_add_([state["step"] for state in states], 1.0)
    cpu: list[int] = []
    other: list[int] = []
    fallback: list[int] = []
    for i, param in enumerate(params):
        if param.device.type == "cpu":
            cpu.append(i)  # the kernel's driver checks what it can take
            continue
        if param.numel() == 0:
            continue
        keys = _FACTORED_KEYS if is_factored(param.shape) else _FULL_KEYS
        tensors = [param, *(states[i][k] for k in keys)]
        if (param.dtype not in _KERNEL_DTYPES or grads[i].dtype != param.dtype
                or not all(t.is_contiguous() for t in tensors)):
            fallback.append(i)
        else:
            other.append(i)
    if cpu:
        cpu_params, cpu_states = [params[i] for i in cpu], [states[i] for i in cpu]
        untouched = step_cpu_kernel(cpu_params, [grads[i] for i in cpu], cpu_states, args,
                                    _layouts_from_states(cpu_params, cpu_states, args))
        fallback += [cpu[i] for i in untouched]
    if other:
        failed = step_compiled([params[i] for i in other], [grads[i] for i in other],
                               [states[i] for i in other], args, count_step=False)
        fallback += [other[i] for i in failed]
    if fallback:
        _step_unstepped_foreach([params[i] for i in fallback], [grads[i] for i in fallback],
                                [states[i] for i in fallback], args)


def _step_unstepped_foreach(params, grads, states, args) -> None:
    """The foreach step without counting ``step`` again (already counted here)."""
    for state in states:
        state["step"] -= 1
    step_multi_tensor(params, grads, states, args)


def step_fused_lowmem(params: list[Tensor], grads: list[Tensor], states: list[dict],
                      args: StepArgs) -> list[int]:
    """The native CPU kernel with low-bit momentum and stochastic rounding handled inside it.

    Steps (and counts ``step`` of) the tensors :func:`.cpu_kernel.step_cpu_kernel` can take
    and returns the indices of the others, untouched (their ``step`` not counted).
    """
    cpu = [i for i, param in enumerate(params) if param.device.type == "cpu"]
    rest = [i for i, param in enumerate(params) if param.device.type != "cpu"]
    if cpu:
        cpu_params, cpu_states = [params[i] for i in cpu], [states[i] for i in cpu]
        torch._foreach_add_([state["step"] for state in cpu_states], 1.0)
        untouched = step_cpu_kernel(cpu_params, [grads[i] for i in cpu], cpu_states, args,
                                    _layouts_from_states(cpu_params, cpu_states, args))
        for i in untouched:
            cpu_states[i]["step"] -= 1  # counted above; the caller steps it elsewhere
        rest = sorted(rest + [cpu[i] for i in untouched])
    return rest


# ----------------------------------------------------------------------------- torch.compile


def _factored_step_math(param: Tensor, grad: Tensor, exp_avg: Tensor, row: Tensor, col: Tensor,
                        res_row: Tensor, res_col: Tensor, lr: Tensor, beta1: Tensor,
                        beta2: float, beta3: float, eps1: float, eps2: float, clip: float,
                        weight_decay: float, maximize: bool) -> None:
    """One factored tensor's step in plain ops, for ``torch.compile`` to fuse."""
    g = grad.to(exp_avg.dtype)
    if maximize:
        g = -g
    sq = g * g + eps1
    row.mul_(beta2).add_(sq.mean(dim=-1), alpha=1 - beta2)
    col.mul_(beta2).add_(sq.mean(dim=-2), alpha=1 - beta2)
    row_factor, col_factor = factor_rsqrt(row, col)
    u = (row_factor.unsqueeze(-1) * col_factor.unsqueeze(-2)) * g
    rms = u.norm(2) / (u.numel() ** 0.5)
    u = u / (rms / clip).clamp(min=1.0)
    beta1 = beta1.to(exp_avg.dtype)  # a tensor: a scheduler cycling beta1 does not recompile
    exp_avg.mul_(beta1).add_(u * (1 - beta1))
    instability = (u - exp_avg).square() + eps2
    res_row.mul_(beta3).add_(instability.mean(dim=-1), alpha=1 - beta3)
    res_col.mul_(beta3).add_(instability.mean(dim=-2), alpha=1 - beta3)
    res_row_factor, res_col_factor = factor_rsqrt(res_row, res_col)
    delta = (res_row_factor.unsqueeze(-1) * res_col_factor.unsqueeze(-2)) * exp_avg
    _apply(param, delta, lr, weight_decay)


def _full_step_math(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                    lr: Tensor, beta1: Tensor, beta2: float, beta3: float, eps1: float,
                    eps2: float, clip: float, weight_decay: float, maximize: bool) -> None:
    """One vector/scalar tensor's step in plain ops, for ``torch.compile`` to fuse."""
    g = grad.to(exp_avg.dtype)
    if maximize:
        g = -g
    exp_avg_sq.mul_(beta2).add_(g * g + eps1, alpha=1 - beta2)
    u = exp_avg_sq.rsqrt() * g
    rms = u.norm(2) / (u.numel() ** 0.5)
    u = u / (rms / clip).clamp(min=1.0)
    beta1 = beta1.to(exp_avg.dtype)
    exp_avg.mul_(beta1).add_(u * (1 - beta1))
    _apply(param, exp_avg, lr, weight_decay)


def _apply(param: Tensor, delta: Tensor, lr: Tensor, weight_decay: float) -> None:
    p = param.to(delta.dtype)
    if weight_decay != 0:
        p = (p - p * (lr.to(delta.dtype) * weight_decay)).to(param.dtype).to(delta.dtype)
    param.copy_(p - delta * lr.to(delta.dtype))


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
                  args: StepArgs, count_step: bool = True) -> list[int]:
    """The fused step through ``torch.compile`` (Triton on CUDA, C++ on CPU), per tensor.

    Returns the indices of the tensors it could not step because compiling failed (e.g. no
    compiler on Windows); a warning says so once. Nothing of those tensors was changed.
    """
    if count_step:
        torch._foreach_add_([state["step"] for state in states], 1.0)
    beta1, beta2, beta3 = args.betas
    eps1, eps2 = args.eps
    # lr and beta1 (what schedulers change) are tensors; the rest are compile-time constants
    consts = (float(beta2), float(beta3), float(eps1), float(eps2),
              float(args.clip_threshold), float(args.weight_decay), bool(args.maximize))
    lr_cache: dict[torch.device, tuple[Tensor, Tensor]] = {}
    failed: list[int] = []
    for i, (param, grad, state) in enumerate(zip(params, grads, states, strict=True)):
        if param.numel() == 0:
            continue
        scheduled = lr_cache.get(param.device)
        if scheduled is None:
            scheduled = (torch.as_tensor(args.lr, dtype=torch.float64).to(param.device),
                         torch.tensor(float(beta1), dtype=torch.float64).to(param.device))
            lr_cache[param.device] = scheduled
        grad = grad.to(compute_dtype(param.dtype)) if grad.dtype != param.dtype else grad
        key = (tuple(param.shape), param.dtype, param.device, consts)
        if is_factored(param.shape):
            fn = _compiled_for(("factored", *key), _factored_step_math)
            tensors = (param, grad, *(state[k] for k in _FACTORED_KEYS), *scheduled)
        else:
            fn = _compiled_for(("full", *key), _full_step_math)
            tensors = (param, grad, *(state[k] for k in _FULL_KEYS), *scheduled)
        try:
            fn(*tensors, *consts)
        except Exception as exc:  # torch.compile unavailable: compiling fails before any write
            _warn_once(f"torchcame: torch.compile failed for the fused step ({exc!r:.200}); "
                       "falling back to the multi-tensor (foreach) path")
            failed.append(i)
    return failed


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)

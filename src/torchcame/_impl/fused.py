"""The fused CAME step: the whole rule in a few passes over memory, no full-size temporaries.

Two backends, chosen per device:

* **CPU**: a native C++ kernel (:mod:`._impl.fused_kernel`), compiled just in time with
  ``torch.utils.cpp_extension.load_inline`` on first use (~35 s once, then cached per user)
  and parallel over rows. It reads the gradient three times, the momentum twice, writes
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

from .._factored import factor_rsqrt, is_factored
from .common import StepArgs, compute_dtype
from .foreach import step_multi_tensor

__all__ = ["step_fused", "step_fused_lowmem", "step_compiled", "kernel_available",
           "kernel_workspace_bytes"]

_FACTORED_KEYS = ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row",
                  "exp_avg_res_col")
_FULL_KEYS = ("exp_avg", "exp_avg_sq")
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def kernel_available() -> bool:
    """Whether the native CPU kernel is (or can be) built; builds it on first call."""
    from .fused_kernel import load_kernel

    return load_kernel() is not None


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
        if param.numel() == 0:
            continue
        keys = _FACTORED_KEYS if is_factored(param.shape) else _FULL_KEYS
        tensors = [param, *(states[i][k] for k in keys)]
        if (param.dtype not in _KERNEL_DTYPES or grads[i].dtype != param.dtype
                or not all(t.is_contiguous() for t in tensors)):
            # e.g. float32 grads of bf16 params: the kernel reads grads in the param's dtype,
            # and rounding them to bf16 would change the result; the foreach path upcasts.
            fallback.append(i)
        elif param.device.type == "cpu":
            cpu.append(i)
        else:
            other.append(i)
    if cpu:
        from .fused_kernel import load_kernel

        kernel = load_kernel()
        if kernel is None:
            fallback += cpu
        else:
            _step_kernel(kernel, [params[i] for i in cpu], [grads[i] for i in cpu],
                         [states[i] for i in cpu], args)
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


def _kernel_grad(grad: Tensor, param: Tensor) -> Tensor:
    return grad.contiguous()  # same dtype as param (checked in step_fused)


def _lr_tensor(lr: float | Tensor) -> Tensor:
    """lr for the kernel, as a CPU tensor (a no-op for a CPU tensor lr: no sync, no copy)."""
    if isinstance(lr, Tensor):
        return lr.detach().to("cpu")
    return torch.tensor(lr, dtype=torch.float64)


def _step_kernel(kernel, params: list[Tensor], grads: list[Tensor], states: list[dict],
                 args: StepArgs) -> None:
    lr = _lr_tensor(args.lr)
    # a tensor lr changes how the reference rounds weight decay (lr cast to the param dtype)
    hyper = (isinstance(args.lr, Tensor), float(args.weight_decay), list(args.betas),
             list(args.eps), float(args.clip_threshold), bool(args.maximize))
    factored = [i for i, p in enumerate(params) if is_factored(p.shape)]
    full = [i for i, p in enumerate(params) if not is_factored(p.shape)]
    if factored:
        kernel.factored_step(
            [params[i] for i in factored],
            [_kernel_grad(grads[i], params[i]) for i in factored],
            *([states[i][k] for i in factored] for k in _FACTORED_KEYS),
            lr, *hyper,
        )
    if full:
        kernel.full_step(
            [params[i] for i in full],
            [_kernel_grad(grads[i], params[i]) for i in full],
            *([states[i][k] for i in full] for k in _FULL_KEYS),
            lr, *hyper,
        )


_LOWMEM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def step_fused_lowmem(params: list[Tensor], grads: list[Tensor], states: list[dict],
                      args: StepArgs) -> list[int]:
    """The native CPU kernel with low-bit momentum and stochastic rounding handled inside it.

    bf16/int8 momentum is decoded and re-encoded a row or a block at a time and bf16/fp16
    weights are rounded stochastically as they are written, so the step allocates no
    full-size float32 copy of anything (extra memory O(rows + cols) plus a block per thread).
    Same arithmetic as the other paths' low-memory handling; stochastic rounding draws its
    random bits from a counter-based generator seeded from torch's default generator (one
    draw per call), so results are reproducible under ``torch.manual_seed`` but are not the
    same random draws as the reference path's ``torch.rand``.

    Steps the tensors it can (CPU, float32/bf16/fp16, gradient of the parameter's dtype,
    contiguous) and returns the indices of the others, untouched (their ``step`` not counted).
    """
    eligible, rest = [], []
    for i, param in enumerate(params):
        state = states[i]
        keys = _FACTORED_KEYS if is_factored(param.shape) else _FULL_KEYS
        tensors = [param, grads[i], *(state[k] for k in keys)]
        if (param.device.type == "cpu" and param.dtype in _LOWMEM_DTYPES
                and grads[i].dtype == param.dtype
                and all(t.is_contiguous() for t in tensors)):
            eligible.append(i)
        else:
            rest.append(i)
    if not eligible:
        return rest
    from .fused_kernel import load_kernel

    kernel = load_kernel()
    if kernel is None or not hasattr(kernel, "factored_step_lowmem"):
        return list(range(len(params)))
    torch._foreach_add_([states[i]["step"] for i in eligible], 1.0)  # empty tensors too
    eligible = [i for i in eligible if params[i].numel() > 0]
    lr = _lr_tensor(args.lr)
    hyper = (isinstance(args.lr, Tensor), float(args.weight_decay), list(args.betas),
             list(args.eps), float(args.clip_threshold), bool(args.maximize))
    seed = 0
    if args.stochastic_rounding:  # one draw from torch's default generator per call
        seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
    low = (int(args.block_size), bool(args.stochastic_rounding), seed)
    empty = torch.empty(0)

    def absmax(state: dict) -> Tensor:
        return state.get("exp_avg_absmax", empty)

    factored = [i for i in eligible if is_factored(params[i].shape)]
    full = [i for i in eligible if not is_factored(params[i].shape)]
    if factored:
        kernel.factored_step_lowmem(
            [params[i] for i in factored], [grads[i] for i in factored],
            [states[i]["exp_avg"] for i in factored], [absmax(states[i]) for i in factored],
            *([states[i][k] for i in factored] for k in _FACTORED_KEYS[1:]),
            lr, *hyper, *low,
        )
    if full:
        kernel.full_step_lowmem(
            [params[i] for i in full], [grads[i] for i in full],
            [states[i]["exp_avg"] for i in full], [absmax(states[i]) for i in full],
            [states[i]["exp_avg_sq"] for i in full],
            lr, *hyper, *low,
        )
    return rest


def kernel_workspace_bytes(shape: tuple[int, ...] | torch.Size, threads: int | None = None,
                           unit: int | None = None) -> int:
    """An upper bound of the heap memory the CPU kernel allocates to step one tensor.

    The kernel's scratch memory is plain C++ vectors (not tensors), which tensor-level memory
    trackers do not see; memory benchmarks add this bound. ``unit`` is the low-memory
    variant's storage unit (elements per int8 block, or 4096 for bf16/float32 momentum;
    ``None`` for the float32 kernel). Factored ``(B, n, m)``: row and column sums in double
    (``B n + (threads + 1) B m``), four float factor vectors (``2 (B n + B m)``), per-thread
    row buffers (``2 m`` floats); every tensor: per-thread sums of squares and two buffers
    of one storage unit per thread (momentum and new weights).
    """
    threads = torch.get_num_threads() if threads is None else threads
    numel = 1
    for d in shape:
        numel *= int(d)
    per_thread = 8 * 8 + 2 * 4 * min(unit or 0, numel)  # m and new-weight buffers
    if len(shape) >= 2 and int(shape[-1]) > 0 and int(shape[-2]) > 0:
        m, n = int(shape[-1]), int(shape[-2])
        B = numel // (n * m)
        doubles = B * n + (threads + 1) * B * m
        floats = 2 * (B * n + B * m) + threads * 2 * m
        return 8 * doubles + 4 * floats + threads * per_thread
    return threads * per_thread


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

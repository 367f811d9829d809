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

import torch
from torch import Tensor

from ..options import StepArgs
from ..state import StateLayout
from .compiled import step_compiled
from .foreach import step_multi_tensor

__all__ = ["step_fused", "step_fused_lowmem", "kernel_available",
           "kernel_workspace_bytes"]

_FACTORED_KEYS = ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row",
                  "exp_avg_res_col")
_FULL_KEYS = ("exp_avg", "exp_avg_sq")
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def kernel_available() -> bool:
    """Whether the native CPU kernel is (or can be) built; builds it on first call."""
    from .fused_kernel import load_kernel

    return load_kernel() is not None


def step_fused(params: list[Tensor], grads: list[Tensor], states: list[dict],
               args: StepArgs, layouts: list[StateLayout]) -> None:
    """Apply one CAME step to every ``(param, grad, state)``, in place, with fused kernels.

    ``state["step"]`` has already been counted for this step by the caller.
    """
    cpu: list[int] = []
    other: list[int] = []
    fallback: list[int] = []
    for i, param in enumerate(params):
        if param.numel() == 0:
            continue
        keys = _FACTORED_KEYS if layouts[i].factored else _FULL_KEYS
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
                         [states[i] for i in cpu], args, [layouts[i] for i in cpu])
    if other:
        failed = step_compiled([params[i] for i in other], [grads[i] for i in other],
                               [states[i] for i in other], args,
                               [layouts[i] for i in other])
        fallback += [other[i] for i in failed]
    if fallback:
        step_multi_tensor([params[i] for i in fallback], [grads[i] for i in fallback],
                          [states[i] for i in fallback], args, [layouts[i] for i in fallback])


def _kernel_grad(grad: Tensor, param: Tensor) -> Tensor:
    return grad.contiguous()  # same dtype as param (checked in step_fused)


def _lr_tensor(lr: float | Tensor) -> Tensor:
    """lr for the kernel, as a CPU tensor (a no-op for a CPU tensor lr: no sync, no copy)."""
    if isinstance(lr, Tensor):
        return lr.detach().to("cpu")
    return torch.tensor(lr, dtype=torch.float64)


def _step_kernel(kernel, params: list[Tensor], grads: list[Tensor], states: list[dict],
                 args: StepArgs, layouts: list[StateLayout]) -> None:
    lr = _lr_tensor(args.lr)
    # a tensor lr changes how the reference rounds weight decay (lr cast to the param dtype)
    hyper = (isinstance(args.lr, Tensor), float(args.weight_decay), list(args.betas),
             list(args.eps), float(args.clip_threshold), bool(args.maximize))
    factored = [i for i, layout in enumerate(layouts) if layout.factored]
    full = [i for i, layout in enumerate(layouts) if not layout.factored]
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
                      args: StepArgs, layouts: list[StateLayout]) -> list[int]:
    """The native CPU kernel with low-bit momentum and stochastic rounding handled inside it.

    bf16/int8 momentum is decoded and re-encoded a row or a block at a time and bf16/fp16
    weights are rounded stochastically as they are written, so the step allocates no
    full-size float32 copy of anything (extra memory O(rows + cols) plus a block per thread).
    Same arithmetic as the other paths' low-memory handling; stochastic rounding draws its
    random bits from a counter-based generator seeded from torch's default generator (one
    draw per call), so results are reproducible under ``torch.manual_seed`` but are not the
    same random draws as the reference path's ``torch.rand``.

    Steps the tensors it can (CPU, float32/bf16/fp16, gradient of the parameter's dtype,
    contiguous) and returns the indices of the others, untouched. ``state["step"]`` has
    already been counted by the caller.
    """
    eligible, rest = [], []
    for i, param in enumerate(params):
        state = states[i]
        keys = _FACTORED_KEYS if layouts[i].factored else _FULL_KEYS
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
    eligible = [i for i in eligible if params[i].numel() > 0]
    lr = _lr_tensor(args.lr)
    hyper = (isinstance(args.lr, Tensor), float(args.weight_decay), list(args.betas),
             list(args.eps), float(args.clip_threshold), bool(args.maximize))
    seed = 0
    if args.stochastic_rounding:  # one draw from torch's default generator per call
        seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
    low = (int(layouts[eligible[0]].block_size) if eligible else 256,
           bool(args.stochastic_rounding), seed)
    empty = torch.empty(0)

    def absmax(state: dict) -> Tensor:
        return state.get("exp_avg_absmax", empty)

    factored = [i for i in eligible if layouts[i].factored]
    full = [i for i in eligible if not layouts[i].factored]
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

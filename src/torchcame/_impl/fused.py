"""The fused CAME step: the whole rule in a few passes over memory, no full-size temporaries.

Backends, chosen per device (Triton on CUDA is dispatched before this module, by
:mod:`torchcame.functional`):

* **CPU**: the native C++ kernel (:func:`.cpu_kernel.step_cpu_kernel`; source in
  ``_impl/csrc``), compiled just in time on first use (about a minute once, then cached per
  user) and parallel over rows. It reads the gradient three times, the momentum twice, writes
  it once, and reads/writes the parameter once; u, U and S_hat are never stored. It runs every
  option (low-bit momentum and stochastic rounding in place, bias correction, factored dims
  other than the last two when they can be viewed last without a copy).
* **other devices (CUDA without Triton)**: ``torch.compile`` of the per-tensor math
  (:mod:`.compiled`), float momentum, the last two dims factored, no bias correction.

Whatever a backend leaves (no compiler, a non-contiguous tensor, an option it lacks) runs on
the multi-tensor path with the same results to float32 rounding; leaving an *option* is
warned once, naming it. The caller has counted ``state["step"]`` already.
"""

from __future__ import annotations

from torch import Tensor

from .._warnings import warn_once
from ..options import StepArgs
from ..state import StateLayout
from .compiled import step_compiled
from .cpu_kernel import kernel_available, kernel_workspace_bytes, step_cpu_kernel
from .foreach import step_multi_tensor

__all__ = ["step_fused", "step_fused_lowmem", "kernel_available", "kernel_workspace_bytes"]


def _subset(index: list[int], *lists: list) -> tuple[list, ...]:
    return tuple([items[i] for i in index] for items in lists)


def _cpu_kernel(params, grads, states, args, layouts, index: list[int]) -> list[int]:
    """Step ``index`` (CPU tensors) with the kernel; the indices it left, warned if an
    option (moved factored dims) is why."""
    untouched = step_cpu_kernel(*_subset(index, params, grads, states), args,
                                [layouts[i] for i in index])
    left = [index[i] for i in untouched]
    if any(layouts[i].moved(params[i].dim()) for i in left):
        warn_once("torchcame: the fused CPU kernel needs the factored dims (factor_dims="
                  "'largest') to be viewable as the last two without a copy; such tensors run "
                  "on the multi-tensor (foreach) path")
    return left


def step_fused(params: list[Tensor], grads: list[Tensor], states: list[dict],
               args: StepArgs, layouts: list[StateLayout]) -> None:
    """Apply one CAME step to every ``(param, grad, state)``, in place, with fused kernels.

    ``state["step"]`` has already been counted for this step by the caller.
    """
    cpu = [i for i, p in enumerate(params) if p.device.type == "cpu"]
    other = [i for i, p in enumerate(params) if p.device.type != "cpu" and p.numel() > 0]
    fallback = _cpu_kernel(params, grads, states, args, layouts, cpu) if cpu else []
    if other:
        unsupported = [i for i in other if layouts[i].moved(params[i].dim())
                       or args.bias_correction or layouts[i].low_bit]
        if unsupported:
            warn_once("torchcame: the torch.compile fused step does not implement "
                      "bias_correction, low-bit momentum or factor_dims='largest' on moved "
                      "dims; those tensors run on the multi-tensor (foreach) path")
        compiled = [i for i in other if i not in set(unsupported)]
        failed = step_compiled(*_subset(compiled, params, grads, states), args,
                               [layouts[i] for i in compiled]) if compiled else []
        fallback += unsupported + [compiled[i] for i in failed]
    if fallback:
        step_multi_tensor(*_subset(fallback, params, grads, states), args,
                          [layouts[i] for i in fallback])


def step_fused_lowmem(params: list[Tensor], grads: list[Tensor], states: list[dict],
                      args: StepArgs, layouts: list[StateLayout]) -> list[int]:
    """The native CPU kernel with low-bit momentum and stochastic rounding handled inside it.

    Steps the CPU tensors :func:`.cpu_kernel.step_cpu_kernel` can take and returns the
    indices of the others, untouched (the caller steps them on float32 copies). The caller
    has counted ``state["step"]`` already.
    """
    cpu = [i for i, p in enumerate(params) if p.device.type == "cpu"]
    rest = [i for i, p in enumerate(params) if p.device.type != "cpu"]
    if cpu:
        rest = sorted(rest + _cpu_kernel(params, grads, states, args, layouts, cpu))
    return rest

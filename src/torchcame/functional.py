"""Functional CAME: ``came(params, grads, states, **options)`` and ``init_state(param)``.

:class:`torchcame.CAME` calls :func:`step_group` once per param group with validated options
and resolved layouts; a user who manages parameters and state without an ``Optimizer`` calls
:func:`came`, which validates first. ``foreach``/``fused`` choose the implementation the way
``torch.optim`` does (:func:`resolve_impl`). The step count of every state is advanced here,
once, before any implementation runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import distributed
from ._impl.foreach import step_multi_tensor, step_on_float_copies
from ._impl.reference import step_single_tensor
from ._warnings import warn_once
from .options import DEFAULTS, StepArgs, step_args, unknown_options, validate_options
from .state import StateLayout, layout_of
from .state import init_state as _init_local_state

__all__ = ["came", "init_state", "step_group", "resolve_impl", "FUSED_BACKEND_ENV"]

#: Environment variable choosing the fused backend for testing: ``"triton"`` runs the
#: Triton kernels also on CPU tensors (with ``TRITON_INTERPRET=1``).
FUSED_BACKEND_ENV = distributed.FUSED_BACKEND_ENV


def _checked(options: dict[str, Any], allowed: Sequence[str] | None = None) -> dict[str, Any]:
    bad = unknown_options(options)
    if allowed is not None:
        bad += [k for k in options if k not in allowed and k not in bad]
    if bad:
        raise TypeError(f"unexpected CAME option(s) {bad}; see torchcame.options.OPTIONS")
    return validate_options(options)


def init_state(param: Tensor, **layout_options: Any) -> dict[str, Tensor]:
    """A fresh (all-zero) CAME state for ``param``.

    Keyword options are the layout options of :class:`torchcame.CAME` (``momentum_dtype``,
    ``quantization_block_size``, ``min_quantized_numel``, ``factor_dims``,
    ``factor_min_dim``); the layout is :func:`torchcame.state.resolve_layout`'s and the
    tensors are described in :mod:`torchcame.state`. For a DTensor parameter (FSDP2) every
    statistic is a DTensor laid out for its sharding
    (:func:`torchcame.distributed.init_state_dtensor`).
    """
    from .options import LAYOUT_OPTIONS

    options = _checked(layout_options, LAYOUT_OPTIONS)
    layout = layout_of(param, options)
    if distributed.is_dtensor(param):
        return distributed.init_state_dtensor(param, layout)
    return _init_local_state(param, layout)


def resolve_impl(params: Sequence[Tensor], foreach: bool | None, fused: bool | None) -> str:
    """Pick ``"fused"``, ``"foreach"`` or ``"reference"`` from the flags and the inputs.

    Explicit flags win: ``fused=True`` -> fused, ``foreach=True`` -> foreach, ``foreach=False``
    -> the per-tensor reference. With both unset (``None``), or ``fused=False`` alone, the
    fastest path that reproduces the reference (and so the authors' ``came-pytorch``) bit for
    bit is chosen: ``"foreach"`` on CPU and CUDA, ``"reference"`` for other devices.

    The fused path is faster still but opt-in: its float32 results differ from the reference
    in the last bits (summation order), and its first use builds a kernel.
    """
    if foreach and fused:
        raise ValueError("foreach=True and fused=True are exclusive; set at most one of them")
    if fused:
        return "fused"
    if foreach:
        return "foreach"
    if foreach is False:
        return "reference"
    if {p.device.type for p in params} <= {"cpu", "cuda"}:
        return "foreach"
    return "reference"


def came(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict],
    **options: Any,
) -> None:
    """One CAME step for each ``(param, grad, state)``, in place (no autograd).

    Args:
        params: parameters to update.
        grads: their gradients (dense, real), same shapes.
        states: per-parameter state dicts from :func:`init_state` (updated in place), built
            with the same layout options as given here.
        **options: any option of :class:`torchcame.CAME` (:data:`torchcame.options.OPTIONS`),
            validated here; missing ones take their defaults.
    """
    options = _checked(dict(options))
    if not (len(params) == len(grads) == len(states)):
        raise ValueError(
            f"params, grads and states must have the same length, got {len(params)}, "
            f"{len(grads)} and {len(states)}"
        )
    layouts = [layout_of(p, options) for p in params]
    step_group(list(params), list(grads), list(states), step_args(options), layouts,
               foreach=options.get("foreach", DEFAULTS["foreach"]),
               fused=options.get("fused", DEFAULTS["fused"]))


def step_group(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict],
    args: StepArgs,
    layouts: list[StateLayout],
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """One step of validated inputs: counts the steps, then runs one implementation.

    Every state's ``step`` is advanced here, once, before the implementation runs (the
    DTensor and flat-partition path counts each when its deferred work runs).
    """
    if not params:
        return
    with torch.no_grad():
        impl = resolve_impl(params, foreach, fused)
        flat = any(distributed.is_flat_layout(layout) for layout in layouts)
        if flat or any(distributed.is_dtensor(p) for p in params):  # counts when its work runs
            fused_ = impl == "fused"
            if fused_ and (flat or not all(distributed.kernel_device(_local_device(p))
                                           for p in params)):
                warn_once("torchcame: fused=True on DTensor (FSDP2/TP) parameters outside CUDA "
                          "with Triton, or on ZeRO flat partitions: those local shards are "
                          "stepped with the reference math (the sharded path's fused kernels "
                          "are the Triton ones)")
            distributed.step_dtensor(params, grads, states, args, layouts, fused=fused_)
            return
        torch._foreach_add_([state["step"] for state in states], 1.0)
        if impl == "reference":
            step_single_tensor(params, grads, states, args, layouts)
        elif impl == "foreach":
            step_multi_tensor(params, grads, states, args, layouts)
        else:
            _step_fused(params, grads, states, args, layouts)


def _local_device(param: Tensor) -> torch.device:
    return param.to_local().device if distributed.is_dtensor(param) else param.device


def _subset(index: list[int], *lists: list) -> tuple[list, ...]:
    return tuple([items[i] for i in index] for items in lists)


def _step_fused(params: list[Tensor], grads: list[Tensor], states: list[dict], args: StepArgs,
                layouts: list[StateLayout]) -> None:
    """The fused implementations: Triton kernels on CUDA (when triton imports), the C++
    kernel on CPU, ``torch.compile`` on CUDA without triton (:mod:`._impl.fused`); what a
    backend cannot run goes to the multi-tensor path, with a one-time warning naming the
    option."""
    from ._impl import fused

    devices = {p.device for p in params}
    if any(distributed.kernel_device(d) or d.type == "cuda" for d in devices):
        from ._impl import triton_kernels

        on_triton = [i for i, p in enumerate(params) if distributed.kernel_device(p.device)]
        if on_triton:
            triton_kernels.step_triton(*_subset(on_triton, params, grads, states), args,
                                       [layouts[i] for i in on_triton])
            rest = sorted(set(range(len(params))) - set(on_triton))
            params, grads, states, layouts = _subset(rest, params, grads, states, layouts)
            if not params:
                return
        if any(p.device.type == "cuda" for p in params):
            warn_once("torchcame: fused=True on CUDA without Triton "
                      f"({triton_kernels.unavailable_reason()}); the torch.compile path runs")
    if args.stochastic_rounding or any(layout.low_bit for layout in layouts):
        # the CPU kernel decodes/encodes in place (no float32 copies); the rest on copies
        rest = fused.step_fused_lowmem(params, grads, states, args, layouts)
        if rest:
            step_on_float_copies(fused.step_fused, *_subset(rest, params, grads, states), args,
                                 [layouts[i] for i in rest])
        return
    fused.step_fused(params, grads, states, args, layouts)

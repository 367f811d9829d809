"""Functional CAME: ``came(params, grads, states, ...)`` and ``init_state(param)``.

:class:`torchcame.CAME` calls :func:`came` once per param group; so can a user who manages
parameters and state without an ``Optimizer``. ``foreach``/``fused`` choose the implementation
the same way ``torch.optim`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._factored import col_shape, factored_dims, factored_layout, row_shape
from ._impl.common import StepArgs, compute_dtype
from ._impl.reference import step_single_tensor
from .lowbit import n_blocks, normalize_momentum_dtype

__all__ = ["came", "init_state", "STATE_KEYS"]

#: Names of the per-parameter state, as in the authors' package (so its checkpoints load).
STATE_KEYS = (
    "step",
    "exp_avg",
    "exp_avg_sq_row",
    "exp_avg_sq_col",
    "exp_avg_res_row",
    "exp_avg_res_col",
    "exp_avg_sq",
    "exp_avg_absmax",  # int8 momentum only (not in the authors' package)
)


def init_state(
    param: Tensor,
    *,
    momentum_dtype: torch.dtype | str = torch.float32,
    block_size: int = 256,
    min_quantized_numel: int = 4096,
    factor_dims: str = "last_two",
    factor_min_dim: int = 1,
) -> dict[str, Tensor]:
    """A fresh (all-zero) CAME state for ``param``.

    Matrices (``ndim >= 2``) get ``exp_avg`` (m) and the factored statistics ``exp_avg_sq_row``/
    ``exp_avg_sq_col`` (r, c) and ``exp_avg_res_row``/``exp_avg_res_col`` (R, C); vectors and
    scalars get ``exp_avg`` and a full ``exp_avg_sq`` (v). ``step`` is a float32 0-d CPU tensor.
    Statistics are float32 for float16/bfloat16 parameters, else the parameter's dtype.
    For a DTensor parameter (FSDP2) every statistic is a DTensor laid out for its sharding
    (see :func:`torchcame.distributed.init_state_dtensor`).

    ``momentum_dtype`` (``torch.float32``, ``torch.bfloat16`` or ``"int8"``) sets how ``m`` is
    stored; int8 momentum is ``exp_avg`` (int8 codes) plus ``exp_avg_absmax`` (one float32
    scale per ``block_size`` elements of the flattened tensor), and applies to tensors of at
    least two dims and ``min_quantized_numel`` elements (vectors and smaller tensors keep the
    compute dtype). ``factor_dims``/``factor_min_dim`` choose the factored dims
    (:func:`torchcame._factored.factored_dims`).
    """
    mode = normalize_momentum_dtype(momentum_dtype)
    if _has_dtensor([param]):
        if factor_dims != "last_two":
            raise NotImplementedError(
                "factor_dims other than 'last_two' is not supported for DTensor (FSDP2) "
                "parameters yet"
            )
        from .distributed import init_state_dtensor

        return init_state_dtensor(param, momentum_dtype=mode, block_size=block_size,
                                  quantized=is_quantized(param, mode, min_quantized_numel))
    dtype = compute_dtype(param.dtype)
    shape = param.shape

    def zeros(s: Sequence[int], dtype: torch.dtype = dtype) -> Tensor:
        return torch.zeros(s, dtype=dtype, device=param.device)

    state: dict[str, Tensor] = {"step": torch.tensor(0.0, dtype=torch.float32)}
    if is_quantized(param, mode, min_quantized_numel):
        state["exp_avg"] = zeros(shape, torch.int8)
        state["exp_avg_absmax"] = zeros((n_blocks(param.numel(), block_size),), torch.float32)
    elif mode == "bfloat16":
        state["exp_avg"] = zeros(shape, torch.bfloat16)
    else:
        state["exp_avg"] = zeros(shape)
    dims = factored_dims(shape, factor_dims, factor_min_dim)
    if dims is not None:
        layout = factored_layout(shape, dims)
        state["exp_avg_sq_row"] = zeros(row_shape(layout))
        state["exp_avg_sq_col"] = zeros(col_shape(layout))
        state["exp_avg_res_row"] = zeros(row_shape(layout))
        state["exp_avg_res_col"] = zeros(col_shape(layout))
    else:
        state["exp_avg_sq"] = zeros(shape)
    return state


def is_quantized(param: Tensor, momentum_dtype: str, min_quantized_numel: int) -> bool:
    """Whether ``param``'s momentum is stored in int8: ``momentum_dtype="int8"``, at least two
    dims (vectors stay in the compute dtype) and at least ``min_quantized_numel`` elements."""
    return (momentum_dtype == "int8" and param.dim() >= 2
            and param.numel() >= min_quantized_numel)


def _resolve_impl(params: Sequence[Tensor], foreach: bool | None, fused: bool | None) -> str:
    """Pick ``"fused"``, ``"foreach"`` or ``"reference"`` from the flags and the inputs.

    Explicit flags win: ``fused=True`` -> fused, ``foreach=True`` -> foreach, ``foreach=False``
    -> the per-tensor reference. With both unset (``None``), or ``fused=False`` alone, the
    fastest path that reproduces the reference (and so the authors' ``came-pytorch``) bit for
    bit is chosen: ``"foreach"`` on CPU and CUDA (measured 1.4-4x faster than the reference
    on GPT-2 shapes on CPU, docs/performance.md). ``"reference"`` for other devices.

    The fused path is faster still (the CPU kernel: 4-20x faster than the reference on the
    same shapes) but it is opt-in: its float32 results differ from the reference in the last
    bits (summation order), so the drop-in promise "same numbers as came-pytorch" holds only
    for the default, and its first use builds a C++ kernel (about a minute once, cached) or,
    on CUDA, compiles one graph per shape with ``torch.compile``.
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
    *,
    lr: float | Tensor = 2e-4,
    betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
    eps: tuple[float, float] = (1e-30, 1e-16),
    clip_threshold: float = 1.0,
    weight_decay: float = 0.0,
    maximize: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
    block_size: int = 256,
    stochastic_rounding: bool = False,
    bias_correction: bool = False,
    factor_dims: str = "last_two",
    factor_min_dim: int = 1,
) -> None:
    """One CAME step for each ``(param, grad, state)``, in place (no autograd).

    Args:
        params: parameters to update.
        grads: their gradients (dense, real), same shapes.
        states: per-parameter state dicts from :func:`init_state` (updated in place).
        lr, betas, eps, clip_threshold, weight_decay, maximize: as in :class:`torchcame.CAME`.
        foreach, fused: implementation choice; ``None`` picks the fastest one that supports
            the inputs.
        block_size, stochastic_rounding, bias_correction, factor_dims, factor_min_dim: the
            opt-in extensions of :class:`torchcame.CAME` (``factor_dims``/``factor_min_dim``
            and the momentum storage must match how ``states`` were built by
            :func:`init_state`). bf16/int8 momentum and stochastic rounding work on every
            path: the fused CPU kernel decodes and re-encodes them in place (no float32
            copies); the other paths step chunks of tensors on a float32 copy of their
            momentum, and of their weights for stochastic rounding. ``bias_correction`` and
            ``factor_dims="largest"`` run on the reference path whatever ``foreach``/``fused``
            say.

    Hyperparameters are not validated here; :class:`torchcame.CAME` validates them.
    """
    if not (len(params) == len(grads) == len(states)):
        raise ValueError(
            f"params, grads and states must have the same length, got {len(params)}, "
            f"{len(grads)} and {len(states)}"
        )
    if not params:
        return
    args = StepArgs(
        lr=lr,
        betas=tuple(betas),
        eps=tuple(eps),
        clip_threshold=clip_threshold,
        weight_decay=weight_decay,
        maximize=maximize,
        block_size=block_size,
        stochastic_rounding=stochastic_rounding,
        bias_correction=bias_correction,
        factor_dims=factor_dims,
        factor_min_dim=factor_min_dim,
    )
    impl = _resolve_impl(params, foreach, fused)
    params, grads, states = list(params), list(grads), list(states)
    if impl != "reference" and (args.bias_correction or args.factor_dims != "last_two"):
        impl = "reference"
    with torch.no_grad():
        if _has_dtensor(params):
            from .distributed import step_dtensor

            step_dtensor(params, grads, states, args, impl)
        elif impl == "reference":
            step_single_tensor(params, grads, states, args)
        elif args.stochastic_rounding or _has_lowbit_momentum(states):
            if impl == "fused":  # the CPU kernel decodes/encodes in place: no float32 copies
                from ._impl.fused import step_fused_lowmem

                rest = step_fused_lowmem(params, grads, states, args)
                params = [params[i] for i in rest]
                grads = [grads[i] for i in rest]
                states = [states[i] for i in rest]
            if params:
                _step_fast_chunked(_fast_step(impl), params, grads, states, args)
        else:
            _fast_step(impl)(params, grads, states, args)


def _fast_step(impl: str):
    """The step function of the ``"foreach"`` or ``"fused"`` implementation."""
    if impl == "foreach":
        from ._impl.foreach import step_multi_tensor

        return step_multi_tensor
    from ._impl.fused import step_fused

    return step_fused


#: Elements per chunk when a fast path steps on float32 copies: bounds the extra memory of a
#: low-memory step to about 3 * 4 * 2^18 bytes (or the largest tensor), with few chunks.
_CHUNK_NUMEL = 1 << 18


def _step_fast_chunked(step_fn, params, grads, states, args: StepArgs) -> None:
    """Run a fast path on float32 copies of low-bit momentum (and of bf16/fp16 weights for
    stochastic rounding), a chunk of at most ``_CHUNK_NUMEL`` elements (or one tensor) at a
    time, then store them back: int8/bf16 re-encoding, stochastic rounding of the weights.

    Same arithmetic as the reference path's low-memory handling, in the same order per tensor.
    """
    from dataclasses import replace

    from .lowbit import load_momentum, stochastic_round_, store_momentum_

    plain_args = replace(args, stochastic_rounding=False)
    start = 0
    while start < len(params):
        end, numel = start, 0
        while end < len(params) and (end == start or numel + params[end].numel() <= _CHUNK_NUMEL):
            numel += params[end].numel()
            end += 1
        chunk_params, chunk_grads, chunk_states = [], [], []
        momenta, rounded = [], []
        for param, grad, state in zip(params[start:end], grads[start:end], states[start:end]):
            dtype = compute_dtype(param.dtype)
            momentum = load_momentum(state, dtype, args.block_size)
            momenta.append(momentum)
            chunk_states.append({**state, "exp_avg": momentum})  # "step" is shared
            if args.stochastic_rounding and param.dtype != dtype:
                rounded.append((param, len(chunk_params)))
                param, grad = param.to(dtype), grad.to(dtype)
            chunk_params.append(param)
            chunk_grads.append(grad)
        step_fn(chunk_params, chunk_grads, chunk_states, plain_args)
        for state, momentum in zip(states[start:end], momenta):
            store_momentum_(state, momentum, args.block_size)
        for param, index in rounded:
            stochastic_round_(param, chunk_params[index])
        start = end


def _has_lowbit_momentum(states: Sequence[dict]) -> bool:
    """Whether any state stores its momentum below the compute dtype (bf16 or int8)."""
    return any(
        "exp_avg_absmax" in s or s["exp_avg"].dtype == torch.bfloat16 for s in states
    )


def _has_dtensor(tensors: Sequence[Tensor]) -> bool:
    """Whether any tensor is a ``torch.distributed.tensor.DTensor`` (FSDP2, TP)."""
    return any(type(t).__name__ == "DTensor" for t in tensors)

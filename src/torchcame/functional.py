"""Functional CAME: ``came(params, grads, states, ...)`` and ``init_state(param)``.

:class:`torchcame.CAME` calls :func:`came` once per param group; so can a user who manages
parameters and state without an ``Optimizer``. ``foreach``/``fused`` choose the implementation
the same way ``torch.optim`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._factored import col_shape, is_factored, row_shape
from ._impl.common import StepArgs, compute_dtype
from ._impl.reference import step_single_tensor

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
)


def init_state(param: Tensor) -> dict[str, Tensor]:
    """A fresh (all-zero) CAME state for ``param``.

    Matrices (``ndim >= 2``) get ``exp_avg`` (m) and the factored statistics ``exp_avg_sq_row``/
    ``exp_avg_sq_col`` (r, c) and ``exp_avg_res_row``/``exp_avg_res_col`` (R, C); vectors and
    scalars get ``exp_avg`` and a full ``exp_avg_sq`` (v). ``step`` is a float32 0-d CPU tensor.
    Statistics are float32 for float16/bfloat16 parameters, else the parameter's dtype.
    For a DTensor parameter (FSDP2) every statistic is a DTensor laid out for its sharding
    (see :func:`torchcame.distributed.init_state_dtensor`).
    """
    if _has_dtensor([param]):
        from .distributed import init_state_dtensor

        return init_state_dtensor(param)
    dtype = compute_dtype(param.dtype)
    shape = param.shape

    def zeros(s: Sequence[int]) -> Tensor:
        return torch.zeros(s, dtype=dtype, device=param.device)

    state: dict[str, Tensor] = {"step": torch.tensor(0.0, dtype=torch.float32)}
    state["exp_avg"] = zeros(shape)
    if is_factored(shape):
        state["exp_avg_sq_row"] = zeros(row_shape(shape))
        state["exp_avg_sq_col"] = zeros(col_shape(shape))
        state["exp_avg_res_row"] = zeros(row_shape(shape))
        state["exp_avg_res_col"] = zeros(col_shape(shape))
    else:
        state["exp_avg_sq"] = zeros(shape)
    return state


def _resolve_impl(params: Sequence[Tensor], foreach: bool | None, fused: bool | None) -> str:
    """Pick ``"fused"``, ``"foreach"`` or ``"reference"`` from the flags and the inputs."""
    if foreach and fused:
        raise ValueError("foreach=True and fused=True are exclusive; set at most one of them")
    if fused:
        return "fused"
    if foreach:
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
) -> None:
    """One CAME step for each ``(param, grad, state)``, in place (no autograd).

    Args:
        params: parameters to update.
        grads: their gradients (dense, real), same shapes.
        states: per-parameter state dicts from :func:`init_state` (updated in place).
        lr, betas, eps, clip_threshold, weight_decay, maximize: as in :class:`torchcame.CAME`.
        foreach, fused: implementation choice; ``None`` picks the fastest one that supports
            the inputs.

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
    )
    impl = _resolve_impl(params, foreach, fused)
    params, grads, states = list(params), list(grads), list(states)
    with torch.no_grad():
        if _has_dtensor(params):
            from .distributed import step_dtensor

            step_dtensor(params, grads, states, args, impl)
        elif impl == "reference":
            step_single_tensor(params, grads, states, args)
        elif impl == "foreach":
            from ._impl.foreach import step_multi_tensor

            step_multi_tensor(params, grads, states, args)
        else:
            from ._impl.fused import step_fused

            step_fused(params, grads, states, args)


def _has_dtensor(tensors: Sequence[Tensor]) -> bool:
    """Whether any tensor is a ``torch.distributed.tensor.DTensor`` (FSDP2, TP)."""
    return any(type(t).__name__ == "DTensor" for t in tensors)

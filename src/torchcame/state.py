"""CAME's per-parameter state: the resolved layout, creation, and state-dict checks.

Every fact about how a parameter's state is stored lives here. The layout options of a param
group (:data:`torchcame.options.LAYOUT_OPTIONS`) are resolved once per parameter into a
:class:`StateLayout` (momentum format and block size, factored dims, compute dtype); the
implementations receive it and never re-derive it from tensor dtypes or shapes.

State tensors (names as in the authors' package, so its checkpoints load):

==================  ====================================  ===============================
key                 shape                                 present
==================  ====================================  ===============================
``step``            0-d float32 (CPU)                     always
``exp_avg``         the parameter's                       always (m; int8 codes or bf16
                                                          under those momentum formats)
``exp_avg_absmax``  ``(ceil(numel / block),)`` float32    ``momentum == "int8"``
``exp_avg_sq_row``  ``(..., n)``                          factored (r)
``exp_avg_sq_col``  ``(..., m)``                          factored (c)
``exp_avg_res_row`` ``(..., n)``                          factored (R)
``exp_avg_res_col`` ``(..., m)``                          factored (C)
``exp_avg_sq``      the parameter's                       not factored (v)
==================  ====================================  ===============================

``(..., n, m)`` is the parameter's shape with the factored dims moved last. This module knows
nothing of DTensors: :mod:`torchcame.distributed` lays the same state out over a mesh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._factored import col_shape, compute_dtype, factored_dims, factored_layout, row_shape
from .lowbit import dequantize_blockwise, n_blocks, quantize_blockwise
from .options import DEFAULTS, LAYOUT_OPTIONS

__all__ = [
    "StateLayout",
    "MOMENTUM_FORMATS",
    "STATE_KEYS",
    "STATISTIC_KEYS",
    "resolve_layout",
    "init_state",
    "layout_of",
    "state_shapes",
    "state_dtype",
    "convert_state",
    "check_entry",
    "check_layout_unchanged",
]

#: How the momentum ``m`` is stored between steps. ``"float32"`` means the compute dtype
#: (float32, or float64 for float64 parameters); ``"bfloat16"`` rounds to nearest bf16;
#: ``"int8"`` is block-wise absmax 8-bit (``exp_avg`` codes + ``exp_avg_absmax`` scales).
MOMENTUM_FORMATS = ("float32", "bfloat16", "int8")

#: Every state key, as in the authors' package (plus ``exp_avg_absmax`` for int8 momentum).
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row",
              "exp_avg_res_col", "exp_avg_sq", "exp_avg_absmax")

#: Statistics that are means of squares: finite and >= 0 in any valid state.
STATISTIC_KEYS = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col",
                  "exp_avg_sq", "exp_avg_absmax")

_DROPPED_KEYS = ("RMS",)  # stored (unused) by the authors' package


@dataclass(frozen=True)
class StateLayout:
    """How one parameter's state is laid out; fixed when the state is created.

    Attributes:
        momentum: one of :data:`MOMENTUM_FORMATS`.
        block_size: elements per int8 block (meaningful for ``momentum == "int8"`` only).
        factored_dims: the two dims the second moment and the instability are factored over
            (``(ndim - 2, ndim - 1)`` for the reference rule), or ``None`` for a full second
            moment and no confidence statistic (vectors, scalars).
        compute_dtype: the dtype of the step's math and of every statistic.
        shard: for a DTensor parameter, its placement as
            :class:`torchcame.distributed.ShardLayout` (the box of the global tensor this
            rank holds, the mesh dims that shard each dim); ``None`` for a plain tensor.
    """

    momentum: str
    block_size: int
    factored_dims: tuple[int, int] | None
    compute_dtype: torch.dtype
    shard: Any = None

    @property
    def factored(self) -> bool:
        """Whether the tensor keeps factored (row/column) statistics."""
        return self.factored_dims is not None

    @property
    def quantized(self) -> bool:
        """Whether the momentum is stored as int8 codes and block scales."""
        return self.momentum == "int8"

    @property
    def low_bit(self) -> bool:
        """Whether the momentum is stored below the compute dtype (bf16 or int8)."""
        return self.momentum != "float32"

    def moved(self, ndim: int) -> bool:
        """Whether the factored dims are not the last two (statistics refer to a movedim)."""
        return self.factored_dims is not None and self.factored_dims != (ndim - 2, ndim - 1)

    @property
    def momentum_dtype(self) -> torch.dtype:
        """The dtype of the stored ``exp_avg``."""
        return {"int8": torch.int8, "bfloat16": torch.bfloat16}.get(
            self.momentum, self.compute_dtype)


def resolve_layout(
    param: Tensor,
    *,
    momentum_dtype: str = DEFAULTS["momentum_dtype"],
    quantization_block_size: int = DEFAULTS["quantization_block_size"],
    min_quantized_numel: int = DEFAULTS["min_quantized_numel"],
    factor_dims: str = DEFAULTS["factor_dims"],
    factor_min_dim: int = DEFAULTS["factor_min_dim"],
) -> StateLayout:
    """The layout of ``param``'s state under the given (validated) layout options.

    int8 momentum applies to tensors of at least two dims and ``min_quantized_numel``
    elements; vectors and smaller tensors keep the compute dtype. Factoring follows
    :func:`torchcame._factored.factored_dims`. For a DTensor the global shape decides.
    """
    shape = tuple(param.shape)
    momentum = momentum_dtype
    if momentum == "int8" and (len(shape) < 2 or param.numel() < min_quantized_numel):
        momentum = "float32"
    return StateLayout(
        momentum=momentum,
        block_size=quantization_block_size,
        factored_dims=factored_dims(shape, factor_dims, factor_min_dim),
        compute_dtype=compute_dtype(param.dtype),
    )


def layout_of(param: Tensor, options: Mapping[str, Any]) -> StateLayout:
    """:func:`resolve_layout` with the layout options taken from ``options`` (a param group)."""
    return resolve_layout(param, **{k: options.get(k, DEFAULTS[k]) for k in LAYOUT_OPTIONS})


def state_shapes(shape: tuple[int, ...] | torch.Size, layout: StateLayout) -> dict[str, tuple]:
    """The shape of every state tensor (but ``step``) of a parameter of ``shape``."""
    shape = tuple(shape)
    shapes: dict[str, tuple] = {"exp_avg": shape}
    if layout.quantized:
        shapes["exp_avg_absmax"] = (n_blocks(math.prod(shape), layout.block_size),)
    if layout.factored_dims is not None:
        moved = factored_layout(shape, layout.factored_dims)
        shapes["exp_avg_sq_row"] = tuple(row_shape(moved))
        shapes["exp_avg_sq_col"] = tuple(col_shape(moved))
        shapes["exp_avg_res_row"] = tuple(row_shape(moved))
        shapes["exp_avg_res_col"] = tuple(col_shape(moved))
    else:
        shapes["exp_avg_sq"] = shape
    return shapes


def state_dtype(key: str, layout: StateLayout) -> torch.dtype:
    """The dtype of state tensor ``key`` under ``layout``."""
    if key == "exp_avg":
        return layout.momentum_dtype
    if key == "exp_avg_absmax":
        return torch.float32
    return layout.compute_dtype


def init_state(param: Tensor, layout: StateLayout) -> dict[str, Tensor]:
    """A fresh (all-zero) state for a plain tensor ``param`` with ``layout``.

    ``step`` is a float32 0-d CPU tensor; every other tensor lives on ``param``'s device.
    """
    state: dict[str, Tensor] = {"step": torch.tensor(0.0, dtype=torch.float32)}
    for key, shape in state_shapes(param.shape, layout).items():
        state[key] = torch.zeros(shape, dtype=state_dtype(key, layout), device=param.device)
    return state


def check_layout_unchanged(param: Tensor, state: Mapping[str, Any], layout: StateLayout,
                           group_index: int, changed: str = "") -> None:
    """Raise if ``state`` (existing) was not built with ``layout`` (the group's options now).

    Layout options are fixed at state creation; changing them in ``param_groups`` afterwards
    is refused here, before any state changes.
    """
    want = state_shapes(param.shape, layout)
    have = {k: tuple(v.shape) for k, v in state.items() if k != "step"}
    dtype_ok = state["exp_avg"].dtype == state_dtype("exp_avg", layout)
    if have != want or not dtype_ok:
        raise ValueError(
            f"param group {group_index}: the state of a parameter of shape "
            f"{tuple(param.shape)} was created with other layout options than the group's "
            f"current ones ({changed or ', '.join(LAYOUT_OPTIONS)}); these are fixed once a "
            "parameter has state. To change them, build a new CAME with the new options and "
            "load this one's state_dict() into it (the momentum is converted)"
        )


# ------------------------------------------------------------------------------ state dicts


def _check_step(value: Any, where: str) -> Tensor:
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{where}: 'step' must be one real number, got a tensor of shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        number = float(value.reshape(()).item())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ValueError(f"{where}: 'step' must be a number, got {value!r}")
    if not math.isfinite(number) or number < 0 or number != int(number):
        raise ValueError(f"{where}: 'step' must be a whole number >= 0, got {number!r}")
    return torch.tensor(number, dtype=torch.float32)


def _check_tensor(key: str, value: Any, shape: tuple, where: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{where}: state {key!r} is not a tensor: {value!r}")
    if value.is_complex():
        raise ValueError(f"{where}: state {key!r} is complex ({value.dtype}); CAME's state is "
                         "real")
    if key == "exp_avg_absmax":  # sharded int8 scales are laid out (rows, blocks per row)
        shape_ok = value.numel() == math.prod(shape)
    else:
        shape_ok = tuple(value.shape) == tuple(shape)
    if not shape_ok:
        raise ValueError(f"{where}: state {key!r} has shape {tuple(value.shape)}, expected "
                         f"{tuple(shape)}")
    local = value.to_local() if hasattr(value, "to_local") else value
    if key == "exp_avg" and local.dtype == torch.int8:
        return value
    if not local.is_floating_point():
        raise ValueError(f"{where}: state {key!r} has dtype {local.dtype}, expected a floating "
                         "dtype")
    if local.numel():
        if not bool(torch.isfinite(local).all()):
            raise ValueError(f"{where}: state {key!r} holds non-finite values (inf/nan: a "
                             "corrupt or diverged checkpoint)")
        if key in STATISTIC_KEYS and bool((local < 0).any()):
            raise ValueError(f"{where}: state {key!r} holds negative values (it is a mean of "
                             "squares)")
    return value


def convert_state(
    param: Tensor,
    entry: Any,
    saved_layout: StateLayout,
    layout: StateLayout,
    where: str,
) -> dict[str, Any]:
    """Check one parameter's saved state and convert it to ``layout``.

    ``saved_layout`` is how the checkpoint stored it (resolved from the saved group's
    options), ``layout`` how this optimizer stores it. Keys, shapes (against ``param``'s
    global shape), dtypes, finiteness and signs are checked; the momentum is re-encoded
    between float32, bf16 and int8 (int8 with the same block size is kept bit for bit).
    Values keep their type (DTensors stay DTensors, for :mod:`torchcame.distributed` to lay
    out); plain tensors are not yet moved to the parameter's device or dtype.

    Raises:
        ValueError: naming the parameter (``where``) and what is wrong.
    """
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: state must be a dict, got {type(entry).__name__}")
    entry = {k: v for k, v in entry.items() if k not in _DROPPED_KEYS}
    if not entry:
        return {}
    out = check_entry(entry, state_shapes(param.shape, saved_layout), saved_layout,
                      f"{where} (shape {tuple(param.shape)})")
    if saved_layout.factored_dims != layout.factored_dims:
        raise ValueError(
            f"{where}: the checkpoint factors this parameter over dims "
            f"{saved_layout.factored_dims}, this optimizer over {layout.factored_dims} "
            "(factor_dims / factor_min_dim differ); factored statistics cannot be converted"
        )
    return _convert_momentum(out, saved_layout, layout)


def check_entry(entry: Mapping[str, Any], shapes: Mapping[str, tuple], layout: StateLayout,
                where: str) -> dict[str, Any]:
    """Check one parameter's saved state against the ``shapes`` of its tensors (all but
    ``step``) under ``layout``: the keys, a whole ``step`` >= 0, each tensor's shape, dtype,
    finiteness and sign, int8 codes where ``layout`` quantizes. Returns the checked entry
    (``step`` as a float32 0-d tensor, tensors as given).

    Raises:
        ValueError: naming the parameter (``where``) and what is wrong.
    """
    missing = ({"step", *shapes}) - set(entry)
    unknown = set(entry) - {"step", *shapes}
    if missing or unknown:
        raise ValueError(f"{where}: the state does not match CAME's: missing "
                         f"{sorted(missing)}, unexpected {sorted(unknown)}")
    out: dict[str, Any] = {"step": _check_step(entry["step"], where)}
    for key, shape in shapes.items():
        out[key] = _check_tensor(key, entry[key], shape, where)
    if layout.quantized and _local(out["exp_avg"]).dtype != torch.int8:
        raise ValueError(f"{where}: int8 momentum expected ('exp_avg' codes), got dtype "
                         f"{_local(out['exp_avg']).dtype}")
    return out


def _local(value: Tensor) -> Tensor:
    return value.to_local() if hasattr(value, "to_local") else value


def _convert_momentum(entry: dict[str, Any], saved: StateLayout,
                      layout: StateLayout) -> dict[str, Any]:
    """Re-encode the momentum from ``saved``'s format into ``layout``'s."""
    if not saved.quantized and not layout.quantized:
        return entry  # a cast, done when the tensors are placed
    if hasattr(entry["exp_avg"], "to_local"):
        if saved.quantized and layout.quantized and saved.block_size == layout.block_size:
            return entry  # the same encoding, sharded: kept as is
        raise ValueError("converting a sharded (DTensor) momentum between int8 and another "
                         "format is not supported; load it with the format it was saved in")
    if saved.quantized:
        absmax = entry.pop("exp_avg_absmax")
        if layout.quantized and saved.block_size == layout.block_size:
            entry["exp_avg_absmax"] = absmax.float().reshape(-1)  # kept bit for bit
            return entry
        momentum = dequantize_blockwise(entry["exp_avg"], absmax.float(), saved.block_size)
    else:
        momentum = entry["exp_avg"].float()
    if layout.quantized:
        entry["exp_avg"], entry["exp_avg_absmax"] = quantize_blockwise(momentum, layout.block_size)
    else:
        entry["exp_avg"] = momentum
    return entry

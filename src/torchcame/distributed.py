"""CAME on DTensor parameters (FSDP2, HSDP, FSDP2 over tensor parallel): exact at any layout.

FSDP2 and tensor parallelism hand the optimizer DTensor parameters and gradients. CAME's
factored statistics are not elementwise: the row and column means of ``G``, the mean of the
row statistic ``r`` and ``RMS(u)`` (and the same for the instability ``U``) span the whole
tensor. Factoring each shard on its own, as the one other distributed CAME does, changes the
update with the world size. This module computes the update of a single process holding the
full tensors: everything local is done on ``to_local()`` shards, and the few cross-shard sums
of all parameters (of all param groups, when called from ``CAME.step``) are packed into one
flat buffer per (phase, mesh dimension).

One abstraction describes every layout (:class:`ShardLayout`): the box of the global tensor
this rank holds, and for each tensor dim the mesh dims that shard it. A sum over rows is
reduced over the mesh dims sharding the rows (R), a sum over columns over those sharding the
columns (C), the RMS over every sharding mesh dim (R, C and batch dims B). Three phases
(:class:`_ParamStep`):

=======  ===================================================  ================================
phase    sums (reduced over)                                   then exact on every rank
=======  ===================================================  ================================
1        row sums of G (C), column sums of G (R),               r, c, mean(r), u
         sum of the old r (R), sum of G (R, C)
2        sum u² (R, C, B; a vector: its sharding dims)          RMS(u), û, m, U
3        row sums of U (C), column sums of U (R),               R, C, mean(R), Ŝ, the update
         sum of the old R (R), sum of U (R, C)
=======  ===================================================  ================================

``mean(r)`` comes from ``sum r_new = β2 · sum r_old + (1 − β2) · sum G / m`` (and likewise
``mean(R)``), so it needs no phase of its own. A step costs at most 3 all-reduces per mesh
dimension in use (3 on FSDP2's 1-D mesh, 6 on a 2-D mesh), whatever the number of
parameters and param groups; each carries O(rows + cols) floats per parameter.

Supported layouts: ``Shard(d)``, ``_StridedShard(d)`` (FSDP2 over tensor parallel) and
``Replicate()`` on each mesh dimension, in any combination whose local shard is one box of the
global tensor (what FSDP2, HSDP and FSDP2 + TP produce); uneven and empty shards work.
``Partial`` parameters raise :class:`UnsupportedShardingError`. int8 momentum needs whole
quantization blocks on every rank (only dim 0 sharded; see :func:`_check_quantizable`).

The same step runs DeepSpeed ZeRO's flat partitions (:mod:`torchcame.flat_partition`): a
piece ``[a, b)`` of a parameter's row-major flattening has a
:class:`~torchcame.flat_partition.FlatShardLayout`, which answers the geometry questions of
:class:`ShardLayout` (partial sums, the factored rsqrt, where ``sum u²`` goes) for a slice
with partial rows; its sums travel in slot buffers every rank lays out alike from the
partition map (:func:`_reduce_flat`), plus a MAX for the int8 scales of blocks cut between
ranks. Whole pieces run the reference step on views.

**Fused (Triton) local shards.** With ``fused=True`` on CUDA (with triton; on CPU under the
testing switch ``TORCHCAME_FUSED_BACKEND=triton``), DTensor local shards are stepped by the
Triton kernels of :mod:`torchcame._impl.triton_kernels` through the same three phases
(:class:`_KernelGroup`): the kernels make the passes over the shards (pass 1 of ``G``, pass 2
of ``u²``, pass 3 of the momentum and ``U``, the update), grouped into a few launches for
all tensors; between them the raw row and column sums and ``sum u²`` are read from their
workspace, reduced with the same all-reduces, and the EMAs, factors and clip divisor are
computed here on O(rows + cols) vectors and written back for the next pass. Flat partitions,
moved factored dims and float64 keep the reference math.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._factored import (
    apply_updates_,
    approx_rsqrt,
    bias_correction_scales,
    clip_,
    clip_divisor,
    compute_dtype,
    ema_,
    factor_rsqrt,
)
from ._impl.reference import step_single_tensor
from .flat_partition import (
    REDUCTION_KINDS,
    FlatPartition,
    FlatPartitionLayout,
    FlatSlots,
    flat_state_matches,
    init_flat_state,
    load_flat_state,
)
from .lowbit import load_momentum, store_momentum_
from .options import StepArgs
from .state import StateLayout, layout_of, state_dtype, state_shapes
from .state import init_state as init_local_state

__all__ = [
    "UnsupportedShardingError",
    "is_dtensor",
    "check_layout",
    "shard_layout",
    "ShardLayout",
    "load_state_dtensor",
    "init_state_dtensor",
    "state_placements",
    "step_dtensor",
    "batched_collectives",
    "to_param_layout",
    "called_from_dcp_state_init",
    "check_not_flat_partitions",
    "all_finite",
    "is_flat_layout",
    "flat_layout",
    "init_state_flat",
    "flat_state_unchanged",
    "load_state_flat",
    "FlatPartition",
]

_HINT = (
    "CAME supports DTensor parameters placed Shard(d) or Replicate() on each mesh dimension, "
    "and _StridedShard(d) completed by Shard(d) on later mesh dimensions, so that each rank "
    "holds one box of the global tensor: what torch.distributed.fsdp.fully_shard produces on a "
    "1-D mesh, HSDP, and fully_shard over tensor parallel on a 2-D mesh. Flat 1-D partitions "
    "such as DeepSpeed ZeRO's would silently turn every matrix into a vector (no factoring)."
)


class UnsupportedShardingError(NotImplementedError):
    """A parameter's DTensor layout (or a flat partition) that CAME cannot step exactly."""


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2, TP)."""
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


_is_dtensor = is_dtensor


def _layout(param: Tensor, layout: StateLayout | None = None) -> ShardLayout:
    """``param``'s :class:`ShardLayout`: the one resolved with its state layout, if any."""
    if layout is not None and layout.shard is not None:
        return layout.shard
    return shard_layout(param)


_DTENSOR_CLS: list[type | None] = []  # filled on first use (not functools.cache: Dynamo warns)


def _dtensor_cls() -> type | None:
    """The DTensor class, imported once (``is_dtensor`` runs for every tensor of every step)."""
    if not _DTENSOR_CLS:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - torch without distributed
            DTensor = None
        _DTENSOR_CLS.append(DTensor)
    return _DTENSOR_CLS[0]


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


# ------------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class ShardLayout:
    """Where a DTensor parameter's local shard sits in the global tensor, and which mesh
    dimensions reduce its statistics.

    The one abstraction of sharded layouts: a 1-D mesh (FSDP2), HSDP, FSDP2 over tensor
    parallel on a 2-D mesh (``_StridedShard``), or any mix of ``Shard``/``Replicate`` across
    mesh dimensions. It answers which global rows, columns (and batch elements) this rank
    holds — the box ``offset`` .. ``offset + local_shape`` — and over which mesh dimensions
    the partial sums of the step are reduced: those that shard the tensor dim the sum runs
    over. Replicated mesh dimensions reduce nothing (every rank there holds the same values).

    Attributes:
        mesh: the parameter's device mesh.
        shape: the global shape.
        local_shape: the shape of this rank's shard.
        offset: the global index of the shard's first element, per dim.
        dim_mesh_dims: for each tensor dim, the mesh dims that shard it (in mesh order).
    """

    mesh: Any
    shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    offset: tuple[int, ...]
    dim_mesh_dims: tuple[tuple[int, ...], ...]

    def sharding(self, dims: Sequence[int]) -> tuple[int, ...]:
        """The mesh dims that shard any of the tensor ``dims`` (negative dims allowed)."""
        k = len(self.shape)
        out: set[int] = set()
        for d in dims:
            out.update(self.dim_mesh_dims[d % k])
        return tuple(sorted(out))

    @property
    def sharded(self) -> tuple[int, ...]:
        """Every mesh dim that shards the tensor."""
        return self.sharding(range(len(self.shape)))

    def group(self, mesh_dim: int) -> Any:
        """The process group of one mesh dimension."""
        return self.mesh.get_group(mesh_dim)

    # The geometry of the three-phase step (:class:`_ParamStep`); the flat partitions'
    # :class:`torchcame.flat_partition.FlatShardLayout` answers the same questions.

    @property
    def numel(self) -> int:
        """Elements of the global tensor (the RMS runs over all of them)."""
        return math.prod(self.shape)

    @property
    def rms_reduction(self) -> tuple[int, ...]:
        """Where ``sum u²`` is reduced: every mesh dim sharding the tensor."""
        return self.sharded

    def factored_partials(self, value: Tensor, old_rows: Tensor) -> list[tuple[Tensor, Any]]:
        """Row sums, column sums, ``sum old_rows`` and ``sum value`` of the local box, each
        with the mesh dims that must reduce it (phases 1 and 3)."""
        return self.partials_from_sums(value.sum(dim=-1), value.sum(dim=-2), old_rows)

    def partials_from_sums(self, row_sum: Tensor, col_sum: Tensor,
                           old_rows: Tensor) -> list[tuple[Tensor, Any]]:
        """:meth:`factored_partials` from the local box's row and column sums (the Triton
        kernels' passes produce these)."""
        rows, cols = self.sharding([-2]), self.sharding([-1])
        both = tuple(sorted(set(rows) | set(cols)))
        return [(row_sum, cols), (col_sum, rows), (old_rows.sum(dim=-1), rows),
                (row_sum.sum(dim=-1), both)]

    def scaled(self, row: Tensor, col: Tensor, row_mean: Tensor, value: Tensor) -> Tensor:
        """``value / sqrt(S_hat)`` on the local box, ``S_hat = (row / row_mean) ⊗ col``."""
        return approx_rsqrt(row, col, row_mean=row_mean).mul_(value)

    def block_offset(self, block_size: int) -> int:
        """Where the local shard starts in its first int8 block: 0, since a DTensor shard
        holds whole blocks (:func:`check_layout`)."""
        return 0

    def absmax_partials(self, momentum: Tensor, block_size: int) -> list[tuple[Tensor, Any]]:
        """Cross-rank int8 scales: none (whole blocks on every rank)."""
        return []


def shard_layout(param: Tensor) -> ShardLayout:
    """The :class:`ShardLayout` of a DTensor ``param``; raises
    :class:`UnsupportedShardingError` for placements CAME cannot step exactly."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(param.placements)
    k = param.dim()
    dims: list[list[int]] = [[] for _ in range(k)]
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement).__name__ == "_StridedShard":
            later = [p for p in placements[mesh_dim + 1:]
                     if isinstance(p, Shard) and p.dim % k == placement.dim % k]
            covered = math.prod(param.device_mesh.size(mesh_dim + 1 + i)
                                for i, p in enumerate(placements[mesh_dim + 1:]) if p in later)
            if covered != placement.split_factor:
                raise UnsupportedShardingError(
                    f"cannot step a parameter of shape {tuple(param.shape)} with placements "
                    f"{placements}: {placement} is not completed by Shard({placement.dim}) "
                    f"on later mesh dimensions of total size {placement.split_factor}, so "
                    f"this rank's rows are not one box of the tensor. {_HINT}"
                )
            dims[placement.dim % k].append(mesh_dim)
            continue
        if isinstance(placement, Shard):
            dims[placement.dim % k].append(mesh_dim)
            continue
        raise UnsupportedShardingError(
            f"cannot step a parameter of shape {tuple(param.shape)} with placements "
            f"{placements}: {type(placement).__name__} is not supported (a Partial parameter "
            f"has no values of its own until reduced). {_HINT}"
        )
    local_shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, placements)
    actual = tuple(param.to_local().shape)
    if tuple(local_shape) != actual:
        raise UnsupportedShardingError(
            f"cannot step a parameter of shape {tuple(param.shape)} with placements "
            f"{placements}: its local shard {actual} is not one box of the global tensor "
            f"(expected {tuple(local_shape)}). {_HINT}"
        )
    return ShardLayout(param.device_mesh, tuple(param.shape), tuple(local_shape),
                       tuple(offset), tuple(tuple(d) for d in dims))


def check_param(param: Tensor) -> None:
    """Raise a clear error for a DTensor parameter CAME cannot step exactly."""
    if _is_dtensor(param):
        _layout(param)


_DEEPSPEED_HINT = (
    "Build the engine with torchcame.integrations.deepspeed.initialize(...) (the same "
    "arguments as deepspeed.initialize, optimizer=CAME(...)): it reads the partition map from "
    "DeepSpeed's ZeRO optimizer and hands it to CAME, which then steps every matrix exactly "
    "as one process would (factored, with confidence)."
)


#: Modules of the DeepSpeed optimizers that hand their client flat partitions (ZeRO 1-3, and
#: the bf16 optimizer of ZeRO-1).
_DEEPSPEED_PARTITIONING = ("deepspeed.runtime.zero", "deepspeed.runtime.bf16_optimizer")


def check_not_flat_partitions(param_groups: Sequence[dict],
                              attached: Collection[Tensor] = ()) -> None:
    """Raise for DeepSpeed ZeRO partitions that have no partition map attached, on which CAME
    would silently factor nothing. Call it from ``step`` (it looks at the callers).

    DeepSpeed's ZeRO wrappers replace each param group's parameters by one flat 1-D partition
    (stages 1-3); ZeRO-3 model parameters and partitions carry ``ds_id``. The tensors say
    nothing else, so the rule is, among the parameters not in ``attached`` (the flat
    partitions whose map :meth:`torchcame.CAME.attach_flat_partitions` received): a
    parameter has ``ds_id``, or every parameter is 1-D and the step is called from
    DeepSpeed's ZeRO (or bf16) optimizer. (Merely having DeepSpeed imported, as some libraries
    do, says nothing: a model whose every parameter is a vector is then stepped as usual.)
    """
    attached_ids = {id(t) for t in attached}
    params = [p for group in param_groups for p in group["params"]
              if id(p) not in attached_ids]
    if any(hasattr(p, "ds_id") for p in params):
        raise UnsupportedShardingError(
            "got DeepSpeed ZeRO-3 partitioned parameters (they carry ds_id) without their "
            "partition map; CAME factors each matrix's second moment and needs its shape. "
            f"{_DEEPSPEED_HINT}"
        )
    if params and all(p.dim() == 1 for p in params) and any(
            module.startswith(_DEEPSPEED_PARTITIONING) for _, module in _callers(24)):
        raise UnsupportedShardingError(
            f"every parameter is 1-D ({len(params)} of them) and DeepSpeed's ZeRO optimizer "
            "calls step: these are ZeRO flat partitions, on which CAME would keep a full second "
            f"moment for everything (no factoring, no confidence). {_DEEPSPEED_HINT} Without "
            "DeepSpeed, FSDP2 (fully_shard) works as is."
        )


def is_flat_layout(layout: StateLayout | None) -> bool:
    """Whether ``layout`` is a flat partition's (:mod:`torchcame.flat_partition`)."""
    return layout is not None and isinstance(layout.shard, FlatPartitionLayout)


def flat_layout(param: Tensor, partition: FlatPartition, options: Any) -> StateLayout:
    """The state layout of a flat partition tensor ``param`` under a param group's layout
    ``options``: ``shard`` holds each piece's layout and the reduction plan. Raises
    ``NotImplementedError`` for a divided parameter the flat step cannot run."""
    return dataclasses.replace(layout_of(param, options), shard=partition.resolve(param, options))


def init_state_flat(layout: StateLayout) -> dict[str, Any]:
    """A zero state for a flat partition: ``{"pieces": [...]}`` (no communication)."""
    return init_flat_state(layout.shard)


def flat_state_unchanged(state: Any, layout: StateLayout) -> bool:
    """Whether an existing flat-partition state was built with ``layout``."""
    return flat_state_matches(state, layout.shard)


def load_state_flat(entry: Any, saved: StateLayout, layout: StateLayout,
                    where: str) -> dict[str, Any]:
    """Check and place a flat partition's saved state (:func:`load_flat_state`)."""
    return load_flat_state(entry, saved.shard, layout.shard, where)


def state_placements(param: Tensor, layout: StateLayout) -> dict[str, tuple]:
    """Placements of each state tensor of a DTensor parameter, by state key.

    ``exp_avg`` (and ``exp_avg_sq`` of a vector, and int8 scales) are laid out like the
    parameter. For a factored parameter of shape ``(..., n, m)``, each mesh dimension keeps
    its placement on the dims a statistic has: the row statistics ``(..., n)`` drop the
    column dim (a mesh dim sharding it is replicated there), the column statistics
    ``(..., m)`` drop the row dim (a mesh dim sharding rows is replicated there; one sharding
    columns shards their last dim).
    """
    from torch.distributed.tensor import Replicate

    base = tuple(param.placements)
    out = {"exp_avg": base, "exp_avg_absmax": base}  # int8 scales: (dim 0, blocks per slice)
    if not layout.factored:
        out["exp_avg_sq"] = base
        return out
    k = param.dim()

    def dropping(dropped: int) -> tuple:
        placements = []
        for placement in base:
            if isinstance(placement, Replicate):
                placements.append(placement)
                continue
            d = placement.dim % k
            if d == dropped:
                placements.append(Replicate())
            else:
                placements.append(_with_dim(placement, d - (d > dropped)))
        return tuple(placements)

    row, col = dropping(k - 1), dropping(k - 2)
    out.update(exp_avg_sq_row=row, exp_avg_sq_col=col, exp_avg_res_row=row,
               exp_avg_res_col=col)
    return out


def _with_dim(placement: Any, dim: int) -> Any:
    """``placement`` (a ``Shard`` or ``_StridedShard``) on tensor dim ``dim`` instead."""
    if type(placement).__name__ == "_StridedShard":
        return type(placement)(dim, split_factor=placement.split_factor)
    return type(placement)(dim)


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(tuple(shape)):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def _wrap(local: Tensor, mesh: Any, placements: tuple, shape: torch.Size) -> Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape,
                              stride=_contiguous_stride(shape))


def init_state_dtensor(param: Tensor, layout: StateLayout) -> dict[str, Tensor]:
    """A zero CAME state for a DTensor parameter, each statistic a DTensor laid out for DCP.

    Local shards have exactly the shapes the distributed step works on, so the state saves
    with ``torch.distributed.checkpoint`` on N ranks and loads on M. ``step`` stays a plain
    float32 0-d CPU tensor (the same on every rank). No communication. ``layout`` is the
    global tensor's (:func:`torchcame.state.resolve_layout`).

    m (``exp_avg``) is laid out like the parameter, in float32, bf16 or int8 codes. int8
    needs every rank to hold whole blocks of the flattened tensor, so that its quantization is
    the single process's: the parameter must be sharded on dim 0 (or replicated) and the size
    of a dim-0 slice a multiple of the block size. Its scales ``exp_avg_absmax`` are then a
    ``(size(0), slice // block)`` DTensor sharded like the parameter (the single process's
    1-D scales, viewed 2-D).
    """
    check_param(param)
    check_layout(param, layout)
    local = param.to_local()
    local_state = init_local_state(local, layout)
    global_shapes = {k: torch.Size(v) for k, v in state_shapes(param.shape, layout).items()}
    placements = state_placements(param, layout)
    out: dict[str, Tensor] = {"step": local_state.pop("step")}
    if layout.quantized:
        per_slice = math.prod(param.shape[1:]) // layout.block_size
        global_shapes["exp_avg_absmax"] = torch.Size((param.shape[0], per_slice))
        local_state["exp_avg_absmax"] = local_state["exp_avg_absmax"].view(
            local.shape[0], math.prod(local.shape[1:]) // layout.block_size)
    for key, value in local_state.items():
        out[key] = _wrap(value, param.device_mesh, placements[key], global_shapes[key])
    return out


def check_layout(param: Tensor, layout: StateLayout) -> None:
    """Raise for a layout the DTensor step of ``param`` cannot run (call before any state
    exists: ``CAME`` checks every parameter before creating any state)."""
    if layout.moved(param.dim()):
        raise NotImplementedError(
            "factor_dims other than 'last_two' is not supported for DTensor (FSDP2) "
            f"parameters yet (a parameter of shape {tuple(param.shape)} would be factored "
            f"over dims {layout.factored_dims})"
        )
    if layout.quantized:
        _check_quantizable(param, layout.block_size, _layout(param, layout))


def _check_quantizable(param: Tensor, block_size: int, sharding: ShardLayout) -> None:
    """int8 momentum of a DTensor: whole quantization blocks on every rank, or an error.

    Blocks run over the flattened global tensor; the scales are laid out as
    ``(size(0), slice // block)``, sharded like the parameter. A rank holds whole blocks when
    a dim-0 slice is a multiple of the block size and either only dim 0 is sharded (by any
    number of mesh dims: its rows are one contiguous run), or the parameter is a matrix whose
    columns are split by ``Shard(1)`` into chunks that are all multiples of the block size
    (rowwise tensor parallel), checked for every rank's chunk.
    """
    slice_numel = math.prod(param.shape[1:]) if param.dim() else 0
    problem = ""
    if slice_numel % block_size:
        problem = (f"the dim-0 slice size ({slice_numel}) is not a multiple of "
                   f"quantization_block_size ({block_size})")
    elif sharding.sharding(range(2, param.dim())):
        problem = "a dim other than 0 and a matrix's columns is sharded"
    elif sharding.sharding([1]) and param.dim() == 2:
        lengths = {param.shape[1]}
        for mesh_dim in sharding.dim_mesh_dims[1]:
            placement = param.placements[mesh_dim]
            if type(placement).__name__ == "_StridedShard":
                problem = "the columns are split by a strided shard"
                break
            k, chunks = param.device_mesh.size(mesh_dim), set()
            for length in lengths:  # torch.chunk: ceil(length / k), the last one shorter
                size = -(-length // k) if length else 0
                chunks.update({size, max(0, length - (k - 1) * size)})
            if any(c % block_size for c in chunks):
                problem = (f"column chunks of {sorted(chunks)} elements are not all multiples "
                           f"of quantization_block_size ({block_size})")
                break
            lengths = chunks
    if problem:
        raise NotImplementedError(
            f"momentum_dtype='int8' on a DTensor parameter of shape {tuple(param.shape)} "
            f"placed {tuple(param.placements)}: {problem}, so a rank would not hold whole "
            "blocks. int8 needs whole blocks on every rank: dim 0 sharded (fully_shard's "
            "default, also over tensor parallel's Shard(0)) with slices a multiple of the "
            "block size, or a matrix's columns in chunks of whole blocks. Use a block size "
            "that divides them, a larger min_quantized_numel to keep this tensor in float32, "
            "or momentum_dtype=torch.bfloat16"
        )


def _meta_like(param: Tensor) -> Tensor:
    return torch.empty(param.shape, dtype=param.dtype, device="meta")


def to_param_layout(param: Tensor, key: str, value: Tensor, layout: StateLayout,
                    dtype: torch.dtype | None = None) -> Tensor:
    """Convert a loaded state tensor of a DTensor ``param`` to the layout CAME steps on.

    ``value`` may be a DTensor (e.g. from DCP, possibly with other placements on the same mesh)
    or a plain tensor of the full (global) shape, e.g. from a single-process checkpoint; then
    each rank keeps its own chunk (no communication). It is cast to ``dtype`` (default: the
    compute dtype of ``param``; bf16 for a bf16 momentum).
    """
    dtype = compute_dtype(param.dtype) if dtype is None else dtype
    placements = state_placements(param, layout)[key]
    mesh = param.device_mesh
    device = param.to_local().device
    if _is_dtensor(value):
        if value.device_mesh != mesh:
            raise UnsupportedShardingError(
                f"state {key!r} lives on mesh {value.device_mesh}, the parameter on {mesh}; "
                "load it with torch.distributed.checkpoint.state_dict.set_optimizer_state_dict"
            )
        if tuple(value.placements) != placements:
            value = value.redistribute(mesh, placements)
        local = value.to_local().to(device=device, dtype=dtype)
        return _wrap(local.clone() if local is value.to_local() else local, mesh, placements,
                     value.shape)
    if key == "exp_avg_absmax" and value.dim() == 1 and param.dim() and param.shape[0]:
        value = value.view(param.shape[0], -1)  # single-process scales, per dim-0 slice
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(value.shape, mesh, placements)
    local = value
    for dim, (start, length) in enumerate(zip(offset, local_shape)):
        local = local.narrow(dim, start, length)
    local = local.to(device=device, dtype=dtype).contiguous().clone()
    return _wrap(local, mesh, placements, value.shape)


def load_state_dtensor(param: Tensor, entry: dict[str, Any],
                       layout: StateLayout) -> dict[str, Tensor]:
    """Lay out a checked, converted state (global plain tensors or DTensors) like ``param``.

    A plain tensor of the global shape (a single-process checkpoint) is cut to this rank's
    shard without communication; a DTensor is redistributed to the step's placements.
    """
    check_layout(param, layout)  # before any change
    out: dict[str, Tensor] = {"step": entry["step"]}
    for key, value in entry.items():
        if key != "step":
            out[key] = to_param_layout(param, key, value, layout, dtype=state_dtype(key, layout))
    return out


#: (function name, module prefix) of the engines' zero-gradient state initializations.
_STATE_INIT_CALLERS = (
    ("_init_optim_state", "torch.distributed.checkpoint"),
    ("init_optim_state", "torchtitan.components.optimizer"),
)


def called_from_dcp_state_init() -> bool:
    """Whether the current ``step`` was called to initialize state with zero gradients.

    ``torch.distributed.checkpoint.state_dict`` (``_init_optim_state``) and torchtitan
    (``init_optim_state``) build the lazy state of a fresh optimizer by stepping it once with
    zero gradients and lr = 0. For CAME that step is not a no-op (it counts a step, moves
    ``r``/``c`` toward eps and ``R``/``C`` toward eps2), so :class:`torchcame.CAME`
    recognizes the call and only allocates its zero state instead.
    """
    return any(function == name and module.startswith(prefix)
               for function, module in _callers(12) for name, prefix in _STATE_INIT_CALLERS)


def _callers(depth: int) -> list[tuple[str, str]]:
    """(function name, module name) of up to ``depth`` frames, from the caller of the
    function calling this one outwards."""
    frame = sys._getframe(2)
    out: list[tuple[str, str]] = []
    while frame is not None and len(out) < depth:
        out.append((frame.f_code.co_name, str(frame.f_globals.get("__name__", ""))))
        frame = frame.f_back
    return out


# -------------------------------------------------------------------------------------- step


@dataclass
class _ParamStep:
    """One sharded parameter's step on its local shard, split at the three reductions.

    For a factored parameter of global shape ``(..., n, m)``, with R the mesh dims sharding
    its rows (dim -2), C those sharding its columns (dim -1) and B those sharding batch dims:

    1. row sums of G over C, column sums of G over R, and for mean(r):
       ``sum r_old`` over R (r is replicated across C) and ``sum G`` over R and C, since
       ``sum r_new = b2 sum r_old + (1 - b2) sum G / m``; then r, c, mean(r) and u are exact;
    2. ``sum u^2`` over R, C and B: the RMS clip; then u_hat, m and U are exact;
    3. row sums of U over C, column sums over R, ``sum R_old`` and ``sum U`` as in 1;
       then R, C, mean(R), S_hat and the update.

    A vector sharded on V needs only ``sum u^2`` over V (phase 2).
    """

    param: Tensor  # local
    grad: Tensor  # local, compute dtype, sign applied
    state: dict[str, Tensor]  # local views
    shard: Any  # ShardLayout, or a flat partition's FlatShardLayout (the same methods)
    args: StepArgs
    layout: StateLayout  # the state layout (global tensor)
    partials: list[tuple[Tensor, tuple[int, ...]]] = field(default_factory=list)
    update: Tensor | None = None
    # a float32 working copy of a bf16/int8 momentum, from phase 2 until it is stored back
    momentum: Tensor | None = None
    # int8 scales reduced across ranks (blocks a flat partition's boundary cuts), or None
    absmax: Tensor | None = None
    # stepped by the Triton kernels (fused=True): :class:`_KernelGroup` runs its phases
    kernel: bool = False

    @property
    def factored(self) -> bool:
        return self.layout.factored

    def _momentum(self) -> Tensor:
        if self.momentum is not None:
            return self.momentum
        layout = self.layout
        if layout.low_bit:  # bf16/int8 storage: this step's float32 copy
            self.momentum = load_momentum(self.state, layout.momentum, layout.block_size,
                                          layout.compute_dtype,
                                          self.shard.block_offset(layout.block_size))
            return self.momentum
        return self.state["exp_avg"]

    def _row_mean(self, old_sum: Tensor, total: Tensor, beta: float) -> Tensor:
        """mean over the global rows of the updated row statistic, from phase-1/3 sums."""
        n, m = self.shard.shape[-2], self.shard.shape[-1]
        return (old_sum * beta + total * ((1.0 - beta) / m)) / n

    def _factored_statistics(self, row_key: str, col_key: str, beta: float) -> Tensor:
        """The EMAs of a factored statistic's row and column parts from the reduced sums of
        phase 1 or 3; returns the mean of the new row statistic over the global rows."""
        n, m = self.shard.shape[-2], self.shard.shape[-1]
        (row_sum, _), (col_sum, _), (old_sum, _), (total, _) = self.partials[-4:]
        row_mean = self._row_mean(old_sum, total, beta)  # from the old statistic's sum
        ema_(self.state[row_key], row_sum.div_(m), beta)
        ema_(self.state[col_key], col_sum.div_(n), beta)
        return row_mean

    def phase1(self) -> None:
        """Second-moment sums (factored tensors)."""
        if not self.factored:
            return
        big_g = self.grad.square().add_(self.args.eps[0])
        self.partials = self.shard.factored_partials(big_g, self.state["exp_avg_sq_row"])

    def phase2(self) -> None:
        """r, c, mean(r) and u; the sum of u^2 over every sharded dim."""
        args, st, g = self.args, self.state, self.grad
        beta2 = args.betas[1]
        if self.factored:
            row_mean = self._factored_statistics("exp_avg_sq_row", "exp_avg_sq_col", beta2)
            update = self.shard.scaled(st["exp_avg_sq_row"], st["exp_avg_sq_col"], row_mean, g)
        else:
            exp_avg_sq = st["exp_avg_sq"]
            ema_(exp_avg_sq, g.square().add_(args.eps[0]), beta2)
            update = exp_avg_sq.rsqrt().mul_(g)
        if args.bias_correction:  # v_hat / (1 - beta2^t)  =>  u * sqrt(1 - beta2^t)
            update.mul_(bias_correction_scales(float(st["step"]), args.betas, self.factored)[0])
        self.update = update
        self.partials = [(update.square().sum().reshape(1), self.shard.rms_reduction)]

    def phase3(self) -> None:
        """Clip, momentum, instability; its sums (factored tensors)."""
        args, st = self.args, self.state
        ((sum_sq, _),) = self.partials
        update = self.update
        # 4. u_hat = u / max(1, RMS(u) / d), RMS over the whole (global) tensor
        clip_(update, sum_sq.reshape(()).sqrt() / math.sqrt(self.shard.numel),
              args.clip_threshold)
        exp_avg = self._momentum()
        ema_(exp_avg, update, args.betas[0])  # 5. momentum
        self.partials = []
        if self.layout.quantized:  # the scales of int8 blocks cut between ranks (flat)
            self.partials = self.shard.absmax_partials(exp_avg, self.layout.block_size)
            self.absmax = self.partials[0][0] if self.partials else None
        if not self.factored:
            self.update = exp_avg.clone()
            return
        instability = update.sub_(exp_avg).square_().add_(args.eps[1])  # 6. U
        self.partials += self.shard.factored_partials(instability, st["exp_avg_res_row"])

    def finish(self) -> None:
        """R, C, mean(R), S_hat and the parameter update."""
        args, st = self.args, self.state
        beta3 = args.betas[2]
        if self.factored:
            res_mean = self._factored_statistics("exp_avg_res_row", "exp_avg_res_col", beta3)
            self.update = self.shard.scaled(st["exp_avg_res_row"], st["exp_avg_res_col"],
                                            res_mean, self._momentum())
        if args.bias_correction:  # m / (1 - beta1^t) and S_hat / (1 - beta3^t)
            self.update.mul_(bias_correction_scales(float(st["step"]), args.betas,
                                                    self.factored)[1])
        apply_updates_([self.param], [self.update], args.lr, args.weight_decay,
                       args.stochastic_rounding)
        if self.momentum is not None:  # round the float32 m of this step into its storage
            layout = self.layout
            store_momentum_(st, self.momentum, layout.momentum, layout.block_size,
                            self.shard.block_offset(layout.block_size), self.absmax)
            self.momentum = None
        self.update = None
        self.absmax = None
        self.partials = []


def _all_reduce_partials(steps: list[_ParamStep], plans: Sequence[_FlatPlan] = (),
                         kinds: Sequence[str] = ()) -> int:
    """Reduce every step's ``partials`` in place; returns the number of all-reduces.

    DTensor partials name mesh dims: one all-reduce (SUM) per (mesh dim, dtype, device) in
    use, all parameters packed into one flat buffer; mesh dims are taken in order, so a
    partial named for several of them is summed over each in turn (the sum over their
    product). Flat-partition partials name :class:`FlatSlots` in the ``plans``' buffers of
    ``kinds`` (:func:`_reduce_flat`), which every rank reduces whether or not it holds any.
    """
    buckets: dict[tuple, list[Tensor]] = {}
    order: list[tuple] = []
    flat_partials: list[tuple[Tensor, FlatSlots]] = []
    for s in steps:
        for tensor, spec in s.partials:
            if isinstance(spec, FlatSlots):
                flat_partials.append((tensor, spec))
                continue
            for mesh_dim in spec:
                group = s.shard.group(mesh_dim)
                key = (mesh_dim, id(group), tensor.dtype, tensor.device)
                if key not in buckets:
                    buckets[key] = []
                    order.append((key, group))
                buckets[key].append(tensor)
    count = 0
    for key, group in sorted(order, key=lambda item: item[0][0]):
        tensors = buckets[key]
        flat = _all_reduce(torch.cat([t.reshape(-1) for t in tensors]), group)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        count += 1
    return count + _reduce_flat(flat_partials, plans, kinds)


def _reduce_flat(partials: list[tuple[Tensor, FlatSlots]], plans: Sequence[_FlatPlan],
                 kinds: Sequence[str]) -> int:
    """Reduce flat-partition partials through their plans' slot buffers, in place.

    For each kind, one buffer per (process group, dtype, device) holds every plan's segment
    (plans in the order given, the same on every rank); each rank writes the slots it holds
    values for (zeros elsewhere), one all-reduce (SUM, or MAX for int8 scales) combines them,
    and each partial reads its slots back. A buffer is reduced when its size is nonzero, on
    every rank, even one that holds no piece of a divided parameter.
    """
    count = 0
    for kind in kinds:
        buckets: dict[tuple, dict[int, int]] = {}  # key -> {id(plan layout): offset}
        groups: dict[tuple, tuple[Any, int]] = {}
        for plan in plans:
            size = plan.layout.sizes[kind]
            if not size:
                continue
            key = (id(plan.layout.group), plan.layout.dtype, plan.layout.device)
            offsets = buckets.setdefault(key, {})
            if id(plan.layout) in offsets:
                continue
            total = groups.get(key, (plan.layout.group, 0))[1]
            offsets[id(plan.layout)] = total
            groups[key] = (plan.layout.group, total + size)
        for key, offsets in buckets.items():
            group, total = groups[key]
            buffer = torch.zeros(total, dtype=key[1], device=key[2])
            mine = [(t, slots, offsets[id(slots.plan)] + slots.buffer_index)
                    for t, slots in partials if slots.kind == kind
                    and id(slots.plan) in offsets and slots.local_index.numel()]
            for t, slots, index in mine:
                buffer.index_copy_(0, index, t.reshape(-1).index_select(0, slots.local_index))
            op = dist.ReduceOp.MAX if REDUCTION_KINDS[kind] == "max" else None
            buffer = _all_reduce(buffer, group, op)
            for t, slots, index in mine:
                t.view(-1).index_copy_(0, slots.local_index, buffer.index_select(0, index))
            count += 1
    return count


def _all_reduce(flat: Tensor, group: Any, op: Any = None) -> Tensor:
    """All-reduce ``flat`` (SUM by default) over ``group``; returns it on its own device."""
    device = flat.device
    if device.type == "cpu" and "nccl" in str(dist.get_backend(group)):
        # FSDP2 CPU offload keeps shards (and so the partial sums) on the CPU; NCCL needs
        # them on the GPU. Buffers are tiny (O(rows + cols) per parameter).
        flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return flat.to(device)


def all_finite(tensors: Sequence[Tensor], groups_of_plain: Sequence[Any] = ()) -> bool:
    """Whether every element of every (D)Tensor is finite, the same answer on every rank.

    For ``skip_nonfinite`` under FSDP2 and ZeRO: each rank sees only its shards, so the local
    answers are combined with one MAX all-reduce per process group of the sharded tensors
    and of ``groups_of_plain`` (the groups of flat partitions among ``tensors``).
    """
    groups: dict[Any, None] = dict.fromkeys(groups_of_plain)
    local = []
    for t in tensors:
        if _is_dtensor(t):
            sharding = _layout(t)
            for mesh_dim in sharding.sharded:
                groups[sharding.group(mesh_dim)] = None
            t = t.to_local()
        local.append(t)
    device = local[0].device if local else torch.device("cpu")
    flags = [torch.isfinite(t).all().to(device) for t in local if t.numel() > 0]
    bad = torch.zeros(1, device=device)
    if flags:
        bad = (~torch.stack(flags).all()).float().reshape(1)
    for group in groups:
        bad = _all_reduce(bad, group, dist.ReduceOp.MAX)
    return not bool(bad.item())


def step_dtensor(params: list[Tensor], grads: list[Tensor], states: list[dict],
                 args: StepArgs, layouts: list[StateLayout], fused: bool = False) -> None:
    """One CAME step for a param group holding DTensor or flat-partition (and possibly plain)
    parameters.

    The result equals a single process stepping the full tensors (up to float rounding of the
    split sums). Up to three all-reduces per process group (one per phase; a fourth, MAX, for
    int8 blocks a flat partition cuts), each carrying all parameters' partial sums. Inside
    :func:`batched_collectives` (which ``CAME.step`` uses) the work is deferred and all param
    groups share them. Every rank of the group must call this with the same parameters (as
    FSDP2 and DeepSpeed guarantee). The local math is the reference's. Each state's
    ``step`` is counted when its work runs (deferred work that is dropped counts nothing).

    With ``fused=True``, local shards (and whole tensors) on devices the Triton kernels run on
    (:func:`kernel_device`) are stepped by them, through the same three reductions
    (:class:`_KernelGroup`); flat partitions keep the reference math.
    """
    work = _prepare(params, grads, states, args, layouts, fused)
    pending = _PENDING.get()
    if pending is not None:
        pending.extend(work)
    else:
        _execute(work)


_PENDING: ContextVar[list | None] = ContextVar("torchcame_pending_dtensor_steps", default=None)


@contextmanager
def batched_collectives() -> Iterator[None]:
    """Defer :func:`step_dtensor` work until the block exits, then run it all at once.

    ``CAME.step`` wraps its loop over param groups in this, so the cross-shard sums of every
    group travel in the same two all-reduces. If the block raises, the deferred work is dropped
    (no parameter or state has changed). Nested uses join the outermost one.
    """
    if _PENDING.get() is not None:
        yield
        return
    pending: list = []
    token = _PENDING.set(pending)
    try:
        yield
    finally:
        _PENDING.reset(token)
    _execute(pending)


@dataclass
class _LocalStep:
    """A tensor every rank holds whole (plain, or replicated): the reference step, or the
    Triton kernels' (``kernel``)."""

    param: Tensor
    grad: Tensor
    state: dict[str, Tensor]
    args: StepArgs
    layout: StateLayout
    kernel: bool = False

    def __call__(self) -> None:
        self.state["step"] += 1
        if self.kernel:
            from ._impl.triton_kernels import step_triton

            step_triton([self.param], [self.grad], [self.state], self.args, [self.layout])
            return
        step_single_tensor([self.param], [self.grad], [self.state], self.args, [self.layout])


#: Environment variable choosing the fused backend for testing: ``"triton"`` sends CPU tensors
#: to the Triton kernels (under Triton's interpreter).
FUSED_BACKEND_ENV = "TORCHCAME_FUSED_BACKEND"


def kernel_device(device: torch.device) -> bool:
    """Whether ``fused=True`` steps sharded tensors on ``device`` with the Triton kernels:
    CUDA with triton importable, or CPU under the testing switch
    ``TORCHCAME_FUSED_BACKEND=triton`` (Triton's interpreter). Imports triton only then."""
    import os

    if device.type != "cuda" and os.environ.get(FUSED_BACKEND_ENV) != "triton":
        return False
    from ._impl.triton_kernels import use_triton

    return use_triton(device)


def _kernel_eligible(param: Tensor, layout: StateLayout) -> bool:
    """Whether a local shard goes to the kernels' phases: not empty (an empty shard still
    takes part in the reductions, with zero sums, through the reference phases) and factored
    over its last two dims. Dtypes and memory layouts the kernels do not handle are sent back
    to the reference phases by :meth:`_KernelGroup.build`, with a warning."""
    return param.numel() > 0 and not layout.moved(param.dim())


def _prepare(
    params: list[Tensor], grads: list[Tensor], states: list[dict], args: StepArgs,
    layouts: list[StateLayout], fused: bool = False,
) -> list:
    """Validate a group and turn it into work items; changes no parameter and no state."""
    work: list = []
    devices: dict[torch.device, bool] = {}

    def on_kernels(t: Tensor) -> bool:
        if not fused:
            return False
        if t.device not in devices:
            devices[t.device] = kernel_device(t.device)
        return devices[t.device]

    for param, grad, state, layout in zip(params, grads, states, layouts):
        if is_flat_layout(layout):
            work += _flat_work(param, grad, state, args, layout)
            continue
        if not _is_dtensor(param):
            if _is_dtensor(grad):
                raise TypeError("a plain parameter got a DTensor gradient")
            work.append(_LocalStep(param, grad, state, args, layout, on_kernels(param)))
            continue
        check_layout(param, layout)
        sharding = _layout(param, layout)
        if not _is_dtensor(grad):
            raise TypeError(
                f"DTensor parameter of shape {tuple(param.shape)} got a plain-tensor gradient "
                f"of shape {tuple(grad.shape)}"
            )
        if grad.device_mesh != param.device_mesh or tuple(grad.placements) != tuple(
            param.placements
        ):
            grad = grad.redistribute(param.device_mesh, param.placements)
        local_state = {k: _local(v) for k, v in state.items()}
        local_param, local_grad = param.to_local(), grad.to_local()
        if "exp_avg" not in local_state or local_state["exp_avg"].shape != local_param.shape:
            raise ValueError(
                f"state of a DTensor parameter of shape {tuple(param.shape)} does not match its "
                f"local shard {tuple(local_param.shape)}; build it with torchcame.init_state or "
                "load it with CAME.load_state_dict / set_optimizer_state_dict"
            )
        kernel = on_kernels(local_param)
        if not sharding.sharded:  # every rank holds the whole tensor: the reference step
            work.append(_LocalStep(local_param, local_grad, local_state, args, layout, kernel))
            continue
        kernel = kernel and _kernel_eligible(local_param, layout)
        work.append(_ParamStep(param=local_param, grad=local_grad, state=local_state,
                               shard=sharding, args=args, layout=layout, kernel=kernel))
    return work


@dataclass
class _FlatPlan:
    """A flat partition's reduction plan, in the work list so that every rank reduces its
    buffers even when it holds no piece of a divided parameter."""

    layout: FlatPartitionLayout


def _flat_work(param: Tensor, grad: Tensor, state: dict, args: StepArgs,
               layout: StateLayout) -> list:
    """Work items of a flat partition (:mod:`torchcame.flat_partition`): its plan, then one
    item per local piece on views of the flat parameter, gradient and the piece's state: the
    reference step for a whole parameter, the three-phase step for a divided one."""
    flat: FlatPartitionLayout = layout.shard
    if grad.shape != param.shape or param.dim() != 1:
        raise ValueError(f"{flat.describe()}: got a parameter of shape {tuple(param.shape)} "
                         f"and a gradient of shape {tuple(grad.shape)}")
    pieces = state.get("pieces")
    if not isinstance(pieces, list) or len(pieces) != len(flat.pieces):
        raise ValueError(f"{flat.describe()}: its state has no list of {len(flat.pieces)} "
                         "piece states; build it with CAME (init_state) or load_state_dict")
    work: list = [_FlatPlan(flat)]
    for piece, piece_layout, piece_state in zip(flat.partition.pieces, flat.pieces, pieces):
        shard = piece_layout.shard
        local_param = param.narrow(0, piece.offset, piece.numel)
        local_grad = grad.narrow(0, piece.offset, piece.numel)
        if shard.whole:
            work.append(_LocalStep(local_param.view(shard.shape), local_grad.view(shard.shape),
                                   piece_state, args, piece_layout))
        else:
            work.append(_ParamStep(param=local_param, grad=local_grad, state=piece_state,
                                   shard=shard, args=args, layout=piece_layout))
    return work


#: The reductions after each phase: DTensor partials are reduced after every phase; flat
#: partitions' buffers of these kinds.
_PHASE_KINDS = (("factored",), ("rms",), ("factored", "absmax"))


def _execute(work: list) -> None:
    """Run work items: local ones at once, sharded ones in phases of batched sums."""
    steps: list[_ParamStep] = []
    plans: list[_FlatPlan] = []
    for item in work:
        if isinstance(item, _LocalStep):
            item()
            continue
        if isinstance(item, _FlatPlan):
            plans.append(item)
            continue
        item.state["step"] += 1
        if math.prod(item.shard.shape) == 0:
            continue
        if not item.kernel:  # the kernels read the gradient's dtype and apply the sign
            _reference_grad(item)
        steps.append(item)
    if not steps and not plans:
        return
    groups = _KernelGroup.build([s for s in steps if s.kernel])  # may turn some down
    plain = [s for s in steps if not s.kernel]
    phases = (_ParamStep.phase1, _ParamStep.phase2, _ParamStep.phase3)
    for index, (phase, kinds) in enumerate(zip(phases, _PHASE_KINDS)):
        for s in plain:
            phase(s)
        for group in groups:
            group.phase(index)
        _all_reduce_partials(steps, plans, kinds)
    for s in plain:
        s.finish()
    for group in groups:
        group.finish()


def _reference_grad(item: _ParamStep) -> None:
    """The gradient the reference phases read: in the compute dtype, negated for
    ``maximize``."""
    dtype = item.layout.compute_dtype
    if item.grad.dtype != dtype:
        item.grad = item.grad.to(dtype)
    if item.args.maximize:
        item.grad = -item.grad


class _KernelGroup:
    """Sharded steps of one Triton launch group (:class:`TritonGroup`), in the three phases
    of :class:`_ParamStep`: the kernels make the passes over the local shards, and the
    O(rows + cols) work between them runs here, on the reduced sums, with the reference's
    math (``_factored_statistics``, :func:`factor_rsqrt`, the RMS clip)."""

    def __init__(self, group: Any, steps: list[_ParamStep]) -> None:
        self.group, self.steps = group, steps

    @classmethod
    def build(cls, steps: list[_ParamStep]) -> list[_KernelGroup]:
        """The launch groups of ``steps`` (per param group's hyperparameters and kernel
        key); tensors the kernels turn down take the reference phases instead."""
        if not steps:
            return []
        from ._impl.triton_kernels import TritonGroup, plan_groups

        out = []
        by_args: dict[int, list[_ParamStep]] = {}
        for s in steps:
            by_args.setdefault(id(s.args), []).append(s)
        for members in by_args.values():
            args = members[0].args
            groups, fallback, seed = plan_groups(
                [s.param for s in members], [s.grad for s in members],
                [s.state for s in members], args, [s.layout for s in members])
            for i in fallback:  # the reference phases
                members[i].kernel = False
                _reference_grad(members[i])
            for key, idx in groups.items():
                chosen = [members[i] for i in idx]
                out.append(cls(TritonGroup(key, [s.param for s in chosen],
                                           [s.grad for s in chosen], [s.state for s in chosen],
                                           [s.layout for s in chosen], idx, args, seed),
                               chosen))
        return out

    def phase(self, index: int) -> None:
        """Phase ``index`` (0, 1, 2) of :class:`_ParamStep`, leaving each step's partials."""
        group, steps = self.group, self.steps
        if index == 0:  # row/column sums of G
            if group.factored:
                group.pass1()
                self._factored_partials("exp_avg_sq_row", "exp_avg_sq_col")
            return
        if index == 1:  # r, c and their factors; sum u^2
            if group.factored:
                for j, s in enumerate(steps):
                    self._factors(j, s, 0)
                group.pass2()
            else:
                group.vector()
            for j, s in enumerate(steps):
                s.partials = [(group.sq_sum(j), s.shard.rms_reduction)]
            return
        # the clip divisor; momentum and the row/column sums of U
        for j, s in enumerate(steps):
            ((sum_sq, _),) = s.partials
            rms = sum_sq.reshape(()).sqrt() / math.sqrt(s.shard.numel)
            group.set_denom(j, clip_divisor(rms, s.args.clip_threshold))
            s.partials = []
        if group.factored:
            group.pass3()
            self._factored_partials("exp_avg_res_row", "exp_avg_res_col")

    def finish(self) -> None:
        """R, C and their factors; the update (parameters and stored momentum)."""
        if self.group.factored:
            for j, s in enumerate(self.steps):
                self._factors(j, s, 1)
        self.group.update()
        for s in self.steps:
            s.partials = []

    def _factored_partials(self, row_key: str, col_key: str) -> None:
        for j, s in enumerate(self.steps):
            row_sum, col_sum = self.group.factored_sums(j)
            old_rows = s.state[row_key]
            s.partials = s.shard.partials_from_sums(
                row_sum.view(old_rows.shape), col_sum.view(s.state[col_key].shape), old_rows)

    def _factors(self, j: int, s: _ParamStep, res: int) -> None:
        keys = ("exp_avg_res_row", "exp_avg_res_col") if res else ("exp_avg_sq_row",
                                                                    "exp_avg_sq_col")
        beta = s.args.betas[2 if res else 1]
        row_mean = s._factored_statistics(*keys, beta)
        row_factor, col_factor = factor_rsqrt(s.state[keys[0]], s.state[keys[1]], row_mean)
        self.group.set_factors(j, res, row_factor, col_factor)

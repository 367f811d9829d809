"""CAME on DTensor parameters (FSDP2 ``fully_shard``, HSDP): exact at any world size.

FSDP2 hands the optimizer parameters and gradients as DTensors sharded on dim 0. CAME's
factored statistics are not elementwise: the column mean of ``G``, the mean of the row
statistic ``r`` and ``RMS(u)`` (and the same for the instability ``U``) span the whole tensor.
Factoring each shard on its own, as the one other distributed CAME does, changes the update
with the world size. This module computes the update of a single process holding the full
tensors: everything local is done on ``to_local()`` shards, and the few cross-shard sums of all
parameters (of all param groups, when called from ``CAME.step``) are packed into one flat
buffer per phase, so a step costs **two all-reduces**, whatever the number of parameters.

Which sums a parameter of shape ``(..., n, m)`` needs depends on the dimension it is sharded on
(``k = ndim``); everything else is exact on the local shard:

=====================  ============================  ==========================================
sharded dim            phase 1 (sums of partials)    phase 2
=====================  ============================  ==========================================
``k-2`` (rows, FSDP2   ``sum_rows G`` (m),           ``sum_rows U`` (m), ``sum R`` (1)
on a matrix)           ``sum r`` (1), ``sum_rows
                       g²/r`` (m)
``k-1`` (columns)      ``sum_cols G`` (n),           ``sum_cols U`` (n)
                       ``sum_cols g²/c`` (n)
``< k-2`` (a batch     ``sum u²`` (1)                nothing
dim of a 3-D/4-D
tensor)
vector, ``Shard(0)``   ``sum u²`` (1)                nothing
``Replicate()``        nothing                       nothing
=====================  ============================  ==========================================

The dependency chain is r, c -> v̂ (needs mean(r)) -> u -> RMS(u) -> û -> m -> U -> R, C -> Ŝ
(needs mean(R)). Two phases suffice because ``RMS(u)`` does not need ``u`` itself:
``sum u² = sum_b mean(r)_b · sum_j (sum_i g²_ij / r_i) / c_j`` for a row-sharded tensor (the
inner sum is a column vector that travels with phase 1) and symmetrically for a column-sharded
one. After phase 1 every rank knows c (or r), mean(r) and RMS(u); after phase 2, C (or R) and
mean(R).

Supported layouts: DTensors whose placements are ``Replicate()`` on every mesh dimension but at
most one, which is a plain ``Shard(d)`` (FSDP2 on a 1-D mesh, HSDP on a 2-D mesh, a DTensor
sharded on any dim). Uneven and empty shards work. ``_StridedShard``, ``Partial`` parameters,
and several sharded mesh dimensions (FSDP + TP) raise :class:`UnsupportedShardingError`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
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
    compute_dtype,
    ema_,
)
from ._impl.reference import step_single_tensor
from .lowbit import load_momentum, store_momentum_
from .options import StepArgs
from .state import StateLayout, state_dtype, state_shapes
from .state import init_state as init_local_state

__all__ = [
    "UnsupportedShardingError",
    "is_dtensor",
    "check_layout",
    "load_state_dtensor",
    "init_state_dtensor",
    "state_placements",
    "step_dtensor",
    "batched_collectives",
    "to_param_layout",
    "called_from_dcp_state_init",
    "check_not_flat_partitions",
    "all_finite",
]

_HINT = (
    "CAME supports DTensor parameters placed Shard(d) on one mesh dimension and Replicate() "
    "on the others (what torch.distributed.fsdp.fully_shard produces on a 1-D mesh, or HSDP on "
    "a 2-D mesh). Shard the model with FSDP2 (fully_shard) instead; flat 1-D partitions such "
    "as DeepSpeed ZeRO's would silently turn every matrix into a vector (no factoring)."
)


class UnsupportedShardingError(NotImplementedError):
    """A parameter's DTensor layout (or a flat partition) that CAME cannot step exactly."""


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2, TP)."""
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


_is_dtensor = is_dtensor


def _dtensor_cls() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


# ------------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class _Layout:
    """Where a DTensor parameter is sharded: ``mesh_dim`` of its mesh holds ``tensor_dim``."""

    mesh_dim: int | None  # None: replicated everywhere
    tensor_dim: int | None


def _layout(param: Tensor) -> _Layout:
    """The sharding of ``param``; raises :class:`UnsupportedShardingError` for other layouts."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(param.placements)
    sharded = []
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is Shard:  # not _StridedShard (a subclass in some versions)
            sharded.append((mesh_dim, placement.dim))
            continue
        raise UnsupportedShardingError(
            f"cannot step a parameter of shape {tuple(param.shape)} with placements "
            f"{placements}: {type(placement).__name__} is not supported. {_HINT}"
        )
    if len(sharded) > 1:
        raise UnsupportedShardingError(
            f"cannot step a parameter of shape {tuple(param.shape)} with placements "
            f"{placements}: it is sharded on {len(sharded)} mesh dimensions (e.g. FSDP + "
            f"tensor parallel). {_HINT}"
        )
    if not sharded:
        return _Layout(None, None)
    mesh_dim, dim = sharded[0]
    if dim < 0:
        dim += param.dim()
    return _Layout(mesh_dim, dim)


def check_param(param: Tensor) -> None:
    """Raise a clear error for a DTensor parameter CAME cannot step exactly."""
    if _is_dtensor(param):
        _layout(param)


def check_not_flat_partitions(param_groups: Sequence[dict]) -> None:
    """Raise for DeepSpeed ZeRO partitions, on which CAME would silently factor nothing.

    DeepSpeed's ZeRO wrappers replace each param group's parameters by one flat 1-D partition
    (stages 1-3); ZeRO-3 model parameters carry ``ds_id``. The tensors say nothing else, so
    the rule is: DeepSpeed is imported and every parameter the optimizer holds is 1-D, or a
    parameter has ``ds_id``. (A real model whose every parameter is a vector is not factored
    anyway.)
    """
    params = [p for group in param_groups for p in group["params"]]
    if any(hasattr(p, "ds_id") for p in params):
        raise UnsupportedShardingError(
            "got DeepSpeed ZeRO-3 partitioned parameters (they carry ds_id); CAME factors each "
            f"matrix's second moment and needs its shape. {_HINT}"
        )
    if "deepspeed" in sys.modules and params and all(p.dim() == 1 for p in params):
        raise UnsupportedShardingError(
            f"every parameter is 1-D ({len(params)} of them) and DeepSpeed is loaded: these look "
            "like ZeRO flat partitions, on which CAME would keep a full second moment for "
            f"everything (no factoring, no confidence). {_HINT}"
        )


def state_placements(param: Tensor, layout: StateLayout) -> dict[str, tuple]:
    """Placements of each state tensor of a DTensor parameter, by state key.

    ``exp_avg`` (and ``exp_avg_sq`` of a vector) is laid out like the parameter. For a factored
    parameter of shape ``(..., n, m)`` sharded on dim ``d``: the row statistics ``(..., n)`` are
    sharded on ``d`` unless ``d`` is the column dim (then replicated); the column statistics
    ``(..., m)`` are sharded on ``d`` for a batch dim, replicated for the row dim and sharded
    on their last dim for the column dim.
    """
    from torch.distributed.tensor import Replicate, Shard

    sharding = _layout(param)
    base = tuple(param.placements)
    k = param.dim()

    def with_(placement: Any) -> tuple:
        if sharding.mesh_dim is None:
            return base
        out = list(base)
        out[sharding.mesh_dim] = placement
        return tuple(out)

    out = {"exp_avg": base, "exp_avg_absmax": base}  # int8 scales: (dim 0, blocks per slice)
    if not layout.factored:
        out["exp_avg_sq"] = base
        return out
    d = sharding.tensor_dim
    if d is None:
        row = col = base
    elif d < k - 2:
        row = col = with_(Shard(d))
    elif d == k - 2:
        row, col = with_(Shard(d)), with_(Replicate())
    else:
        row, col = with_(Replicate()), with_(Shard(k - 2))
    out.update(exp_avg_sq_row=row, exp_avg_sq_col=col, exp_avg_res_row=row,
               exp_avg_res_col=col)
    return out


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
        per_slice = param[0].numel() // layout.block_size if param.shape[0] else 0
        global_shapes["exp_avg_absmax"] = torch.Size((param.shape[0], per_slice))
        local_state["exp_avg_absmax"] = local_state["exp_avg_absmax"].view(
            local.shape[0], per_slice)
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
        _check_quantizable(param, layout.block_size)


def _check_quantizable(param: Tensor, block_size: int) -> None:
    """int8 momentum of a DTensor: whole quantization blocks on every rank, or an error."""
    layout = _layout(param)
    slice_numel = param[0].numel() if param.dim() and param.shape[0] else 0
    if layout.tensor_dim not in (None, 0) or slice_numel % block_size:
        raise NotImplementedError(
            f"momentum_dtype='int8' on a DTensor parameter of shape {tuple(param.shape)} "
            f"placed {tuple(param.placements)}: int8 under FSDP2 needs Shard(0) (fully_shard's "
            f"default) and dim-0 slices whose size ({slice_numel}) is a multiple of "
            f"quantization_block_size ({block_size}), so that each rank holds whole blocks. "
            "Use a block size that divides it, a larger min_quantized_numel to keep this "
            "tensor in float32, or momentum_dtype=torch.bfloat16"
        )


def _meta_like(param: Tensor) -> Tensor:
    return torch.empty(param.shape, dtype=param.dtype, device="meta")


def _local_range(size: int, num_chunks: int, index: int) -> tuple[int, int]:
    """Offset and length of chunk ``index`` of ``size`` items split as ``torch.chunk`` does."""
    chunk = -(-size // num_chunks) if size else 0
    start = min(index * chunk, size)
    return start, max(0, min(size, start + chunk) - start)


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
    local = value
    for mesh_dim, placement in enumerate(placements):
        if placement.is_shard():
            start, length = _local_range(value.shape[placement.dim], mesh.size(mesh_dim),
                                         mesh.get_local_rank(mesh_dim))
            local = local.narrow(placement.dim, start, length)
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


def called_from_dcp_state_init() -> bool:
    """Whether the current ``step`` was called by DCP's ``_init_optim_state``.

    ``torch.distributed.checkpoint.state_dict`` builds the lazy state of a fresh optimizer by
    stepping it once with zero gradients and lr = 0. For CAME that step is not a no-op (it
    counts a step, moves ``r``/``c`` toward eps and ``R``/``C`` toward eps2), so
    :class:`torchcame.CAME` recognizes the call and only allocates its zero state instead.
    """
    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return False
        if frame.f_code.co_name == "_init_optim_state" and str(
            frame.f_globals.get("__name__", "")
        ).startswith("torch.distributed.checkpoint"):
            return True
        frame = frame.f_back
    return False


# -------------------------------------------------------------------------------------- step


@dataclass
class _ParamStep:
    """One parameter's step on its local shard, split at the two reductions."""

    param: Tensor  # local
    grad: Tensor  # local, compute dtype, sign applied
    state: dict[str, Tensor]  # local views
    role: str  # "rows" | "cols" | "batch" | "vector"
    group: Any  # process group of the sharded mesh dim
    numel: int  # global
    n: int  # global rows (factored)
    m: int  # global cols (factored)
    args: StepArgs | None = None  # the hyperparameters of the param's group
    layout: StateLayout | None = None  # the state layout (global tensor)
    partials: list[Tensor] = field(default_factory=list)
    update: Tensor | None = None
    # a float32 working copy of a bf16 momentum, from phase 2 until it is stored back
    momentum: Tensor | None = None

    def _momentum(self) -> Tensor:
        if self.momentum is not None:
            return self.momentum
        layout = self.layout
        if layout.low_bit:  # bf16/int8 storage: this step's float32 copy
            self.momentum = load_momentum(self.state, layout.momentum, layout.block_size,
                                          layout.compute_dtype)
            return self.momentum
        return self.state["exp_avg"]

    # phase 1: second moment; partial sums for c (or r), mean(r) and sum(u²)
    def phase1(self, args: StepArgs) -> None:
        beta2 = args.betas[1]
        g, st = self.grad, self.state
        sq = g.square()
        big_g = sq + args.eps[0]
        if self.role == "vector":
            ema_(st["exp_avg_sq"], big_g, beta2)
            self.update = st["exp_avg_sq"].rsqrt().mul_(g)
            self.partials = [self.update.square().sum().reshape(1)]
        elif self.role == "batch":
            ema_(st["exp_avg_sq_row"], big_g.mean(dim=-1), beta2)
            ema_(st["exp_avg_sq_col"], big_g.mean(dim=-2), beta2)
            self.update = approx_rsqrt(st["exp_avg_sq_row"], st["exp_avg_sq_col"]).mul_(g)
            self.partials = [self.update.square().sum().reshape(1)]
        elif self.role == "rows":
            row = st["exp_avg_sq_row"]
            ema_(row, big_g.mean(dim=-1), beta2)  # exact: whole rows are local
            self.partials = [
                big_g.sum(dim=-2),  # column sums of G
                row.sum(dim=-1),  # for mean(r)
                sq.div_(row.unsqueeze(-1)).sum(dim=-2),  # sum_i g²/r_i, for sum(u²)
            ]
        else:  # cols
            col = st["exp_avg_sq_col"]
            ema_(col, big_g.mean(dim=-2), beta2)  # exact: whole columns are local
            self.partials = [
                big_g.sum(dim=-1),  # row sums of G
                sq.div_(col.unsqueeze(-2)).sum(dim=-1),  # sum_j g²/c_j, for sum(u²)
            ]

    # phase 2: finish u, clip, momentum, instability; partial sums for C (or R) and mean(R)
    def phase2(self, args: StepArgs) -> None:
        beta1, beta2, beta3 = args.betas
        g, st = self.grad, self.state
        if self.role in ("vector", "batch"):
            (sum_sq,) = self.partials
        elif self.role == "rows":
            col_sum, row_sum, ratio = self.partials
            col = st["exp_avg_sq_col"]
            ema_(col, col_sum.div_(self.n), beta2)
            row_mean = row_sum.div_(self.n)
            sum_sq = (ratio.div_(col).sum(dim=-1) * row_mean).sum()
            self.update = approx_rsqrt(st["exp_avg_sq_row"], col, row_mean=row_mean).mul_(g)
        else:  # cols
            row_sum, ratio = self.partials
            row = st["exp_avg_sq_row"]
            ema_(row, row_sum.div_(self.m), beta2)
            row_mean = row.mean(dim=-1)
            sum_sq = (ratio.div_(row).sum(dim=-1) * row_mean).sum()
            self.update = approx_rsqrt(row, st["exp_avg_sq_col"]).mul_(g)
        update = self.update
        if args.bias_correction:  # v_hat / (1 - beta2^t)  =>  u * sqrt(1 - beta2^t)
            update_scale = bias_correction_scales(float(st["step"]), args.betas,
                                                  self.role != "vector")[0]
            update.mul_(update_scale)
            sum_sq = sum_sq * update_scale**2
        # 4. u_hat = u / max(1, RMS(u) / d), RMS over the whole (global) tensor
        clip_(update, sum_sq.reshape(()).sqrt() / math.sqrt(self.numel), args.clip_threshold)
        # 5. momentum
        exp_avg = self._momentum()
        ema_(exp_avg, update, beta1)
        self.partials = []
        if self.role == "vector":
            self.update = exp_avg.clone()
            return
        # 6. instability U = (u_hat - m)^2 + eps2
        instability = update.sub_(exp_avg).square_().add_(args.eps[1])
        res_row, res_col = st["exp_avg_res_row"], st["exp_avg_res_col"]
        if self.role == "batch":
            ema_(res_row, instability.mean(dim=-1), beta3)
            ema_(res_col, instability.mean(dim=-2), beta3)
            self.update = approx_rsqrt(res_row, res_col).mul_(exp_avg)
        elif self.role == "rows":
            ema_(res_row, instability.mean(dim=-1), beta3)
            self.partials = [instability.sum(dim=-2), res_row.sum(dim=-1)]
        else:  # cols
            ema_(res_col, instability.mean(dim=-2), beta3)
            self.partials = [instability.sum(dim=-1)]

    # after phase 2: Ŝ and the parameter update
    def finish(self, args: StepArgs) -> None:
        beta3 = args.betas[2]
        st = self.state
        if self.role == "rows":
            col_sum, row_sum = self.partials
            ema_(st["exp_avg_res_col"], col_sum.div_(self.n), beta3)
            self.update = approx_rsqrt(
                st["exp_avg_res_row"], st["exp_avg_res_col"], row_mean=row_sum.div_(self.n)
            ).mul_(self._momentum())
        elif self.role == "cols":
            (row_sum,) = self.partials
            ema_(st["exp_avg_res_row"], row_sum.div_(self.m), beta3)
            self.update = approx_rsqrt(st["exp_avg_res_row"], st["exp_avg_res_col"]).mul_(
                self._momentum()
            )
        if args.bias_correction:  # m / (1 - beta1^t) and S_hat / (1 - beta3^t)
            self.update.mul_(bias_correction_scales(float(st["step"]), args.betas,
                                                    self.role != "vector")[1])
        apply_updates_([self.param], [self.update], args.lr, args.weight_decay,
                       args.stochastic_rounding)
        if self.momentum is not None:  # round the float32 m of this step into its storage
            store_momentum_(st, self.momentum, self.layout.momentum, self.layout.block_size)
            self.momentum = None
        self.update = None
        self.partials = []


def _all_reduce_partials(steps: list[_ParamStep]) -> int:
    """Sum every step's ``partials`` over its process group, in place: one all-reduce per
    (process group, dtype, device), all parameters packed into one flat buffer.

    Returns the number of all-reduces issued.
    """
    buckets: dict[tuple, list[Tensor]] = {}
    for s in steps:
        for t in s.partials:
            buckets.setdefault((s.group, t.dtype, t.device), []).append(t)
    for (group, _, _), tensors in buckets.items():
        flat = _all_reduce(torch.cat([t.reshape(-1) for t in tensors]), group)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    return len(buckets)


def _all_reduce(flat: Tensor, group: Any, op: Any = None) -> Tensor:
    """All-reduce ``flat`` (SUM by default) over ``group``; returns it on its own device."""
    device = flat.device
    if device.type == "cpu" and "nccl" in str(dist.get_backend(group)):
        # FSDP2 CPU offload keeps shards (and so the partial sums) on the CPU; NCCL needs
        # them on the GPU. Buffers are tiny (O(rows + cols) per parameter).
        flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return flat.to(device)


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of every (D)Tensor is finite, the same answer on every rank.

    For ``skip_nonfinite`` under FSDP2: each rank sees only its shards, so the local answers
    are combined with one MAX all-reduce per process group of the sharded tensors.
    """
    groups: dict[Any, None] = {}
    local = []
    for t in tensors:
        if _is_dtensor(t):
            layout = _layout(t)
            if layout.mesh_dim is not None:
                groups[t.device_mesh.get_group(layout.mesh_dim)] = None
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


def _role(layout: _Layout, ndim: int) -> str:
    if layout.tensor_dim is None:
        return "replicate"
    if ndim < 2:
        return "vector"
    if layout.tensor_dim < ndim - 2:
        return "batch"
    return "rows" if layout.tensor_dim == ndim - 2 else "cols"


def step_dtensor(params: list[Tensor], grads: list[Tensor], states: list[dict],
                 args: StepArgs, layouts: list[StateLayout]) -> None:
    """One CAME step for a param group holding DTensor (and possibly plain) parameters.

    The result equals a single process stepping the full tensors (up to float rounding of the
    split sums). Two all-reduces per process group, each carrying all parameters' partial sums.
    Inside :func:`batched_collectives` (which ``CAME.step`` uses) the work is deferred and all
    param groups share the two all-reduces. Every rank of the group must call this with the
    same parameters (as FSDP2 guarantees). The local math is the reference's. Each state's
    ``step`` is counted when its work runs (deferred work that is dropped counts nothing).
    """
    work = _prepare(params, grads, states, args, layouts)
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
    """A tensor every rank holds whole (plain, or replicated): the reference step."""

    param: Tensor
    grad: Tensor
    state: dict[str, Tensor]
    args: StepArgs
    layout: StateLayout

    def __call__(self) -> None:
        self.state["step"] += 1
        step_single_tensor([self.param], [self.grad], [self.state], self.args, [self.layout])


def _prepare(
    params: list[Tensor], grads: list[Tensor], states: list[dict], args: StepArgs,
    layouts: list[StateLayout],
) -> list:
    """Validate a group and turn it into work items; changes no parameter and no state."""
    work: list = []
    for param, grad, state, layout in zip(params, grads, states, layouts):
        if not _is_dtensor(param):
            if _is_dtensor(grad):
                raise TypeError("a plain parameter got a DTensor gradient")
            work.append(_LocalStep(param, grad, state, args, layout))
            continue
        check_param(param)
        check_layout(param, layout)
        sharding = _layout(param)
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
        role = _role(sharding, param.dim())
        if role == "replicate":  # every rank holds the whole tensor: the reference step
            work.append(_LocalStep(local_param, local_grad, local_state, args, layout))
            continue
        shape = param.shape
        work.append(
            _ParamStep(
                param=local_param,
                grad=local_grad,
                state=local_state,
                role=role,
                group=param.device_mesh.get_group(sharding.mesh_dim),
                numel=param.numel(),
                n=shape[-2] if param.dim() >= 2 else 1,
                m=shape[-1] if param.dim() >= 1 else 1,
                args=args,
                layout=layout,
            )
        )
    return work


def _execute(work: list) -> None:
    """Run work items: local ones at once, sharded ones in two phases of batched sums."""
    steps: list[_ParamStep] = []
    for item in work:
        if isinstance(item, _LocalStep):
            item()
            continue
        item.state["step"] += 1
        if item.numel == 0:
            continue
        dtype = item.layout.compute_dtype
        if item.grad.dtype != dtype:
            item.grad = item.grad.to(dtype)
        if item.args.maximize:
            item.grad = -item.grad
        steps.append(item)
    if not steps:
        return
    for s in steps:
        s.phase1(s.args)
    _all_reduce_partials(steps)
    for s in steps:
        s.phase2(s.args)
    _all_reduce_partials(steps)
    for s in steps:
        s.finish(s.args)

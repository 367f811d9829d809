"""Flat partitions (DeepSpeed ZeRO 1/2/3): the layout "this rank holds elements [a, b) of the
row-major flattening of a parameter of global shape S", for the exact distributed step.

DeepSpeed's ZeRO optimizers hand the client optimizer one flat 1-D fp32 tensor per param
group (stages 1 and 2: the rank's contiguous share of all the group's parameters, flattened
and concatenated; stage 3: each parameter's own ``ceil(numel / world)`` piece, concatenated).
A piece of a matrix may begin and end in the middle of a row. A :class:`FlatPartition`
describes one such tensor: every parameter of its group with the positions where ranks
divide it (the same list on every rank), and the pieces this rank holds. CAME then steps
each piece exactly as one process holding the full tensor would:

* a piece that is a whole parameter runs the reference step on views of the flat tensor
  (bit for bit the single process's);
* a piece of a parameter divided between ranks runs the three-phase step of
  :mod:`torchcame.distributed`, with :class:`FlatShardLayout` as its layout: the local
  elements are zero-padded to whole rows (a box of at most ``numel + 2 m`` elements), so row
  sums, column sums (per batch element of a >2-D tensor) and the factored rsqrt are the box
  operations of the DTensor path.

Which sums cross ranks is known to every rank from the partition map alone. A row cut by a
partition boundary is shared (its row sums are summed over ranks), so is a batch element
(matrix) cut by one (its column sums, the sum of its old row statistic and of ``G``), and
every divided parameter's ``sum u²``. Each gets a slot in one flat buffer per kind
(:class:`FlatPartitionLayout`): ``"factored"`` (phases 1 and 3), ``"rms"`` (phase 2), and
``"absmax"`` (int8 momentum: the scale of a quantization block cut by a boundary, reduced
with MAX so that both ranks quantize it with the single process's scale). A rank writes the
slots it has values for, zeros elsewhere, and one all-reduce per kind and step combines them,
whatever the number of parameters. A row's old statistic counts on the rank holding the
row's first element only.

State of a flat partition: ``{"pieces": [state of piece 0, ...]}``, one CAME state per local
piece with the usual keys. A whole piece has the parameter's shapes; a divided one holds
``exp_avg`` (and ``exp_avg_sq`` of a vector) for its ``b - a`` elements, ``exp_avg_absmax``
for the blocks it touches, the row statistics of its rows (``(rows,)``, a cut row on both
ranks, equal) and the column statistics of the matrices it touches (``(matrices, m)``). Each
piece also records ``"piece": (parameter index, a, b)`` so a checkpoint can only load into
the same partitioning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from ._factored import approx_rsqrt
from .lowbit import block_absmax
from .options import DEFAULTS, LAYOUT_OPTIONS
from .state import StateLayout, check_entry, resolve_layout, state_dtype, state_shapes

__all__ = [
    "FlatParam",
    "FlatPiece",
    "FlatPartition",
    "FlatPartitionLayout",
    "FlatShardLayout",
    "FlatSlots",
    "REDUCTION_KINDS",
    "init_flat_state",
    "flat_state_matches",
    "load_flat_state",
]

#: The kinds of cross-rank reductions of the flat step, and their all-reduce op.
REDUCTION_KINDS = {"factored": "sum", "rms": "sum", "absmax": "max"}


@dataclass(frozen=True)
class FlatParam:
    """One parameter of a flat partition's group, as every rank sees it.

    Attributes:
        shape: its (global) shape.
        cuts: the positions ``0 < c < numel`` of its row-major flattening where one rank's
            elements end and the next rank's begin, sorted.
        name: for error messages.
    """

    shape: tuple[int, ...]
    cuts: tuple[int, ...] = ()
    name: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class FlatPiece:
    """The elements ``[start, stop)`` of parameter ``index`` this rank holds, at ``offset``
    in the flat tensor."""

    index: int
    start: int
    stop: int
    offset: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True, eq=False)
class FlatPartition:
    """The partition map of one flat 1-D tensor: which parameter elements it holds.

    Attributes:
        numel: the flat tensor's length (padding included).
        params: every parameter of its group, in order, with the positions where ranks divide
            it; the same on every rank of ``group``.
        pieces: the pieces this rank holds, at most one per parameter, inside ``[0, numel)``.
        group: the process group over which the parameters are divided (None: the default).

    Raises:
        ValueError: for pieces that overlap, fall outside the tensor or their parameter, or a
            piece boundary inside a parameter that is not one of its cuts.
    """

    numel: int
    params: tuple[FlatParam, ...]
    pieces: tuple[FlatPiece, ...]
    group: Any = None

    def __post_init__(self) -> None:
        seen: set[int] = set()
        spans = []
        for piece in self.pieces:
            if not 0 <= piece.index < len(self.params) or piece.index in seen:
                raise ValueError(f"flat partition: piece {piece} names no parameter, or one "
                                 "already held")
            seen.add(piece.index)
            param = self.params[piece.index]
            if not 0 <= piece.start < piece.stop <= param.numel:
                raise ValueError(f"flat partition: piece {piece} is empty or outside its "
                                 f"parameter of shape {param.shape}")
            bounds = {0, param.numel, *param.cuts}
            if piece.start not in bounds or piece.stop not in bounds:
                raise ValueError(f"flat partition: piece {piece} of a parameter of shape "
                                 f"{param.shape} does not begin and end at its cuts "
                                 f"{param.cuts}")
            if not 0 <= piece.offset <= self.numel - piece.numel:
                raise ValueError(f"flat partition: piece {piece} lies outside the flat tensor "
                                 f"of {self.numel} elements")
            spans.append((piece.offset, piece.offset + piece.numel))
        spans.sort()
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            raise ValueError("flat partition: pieces overlap in the flat tensor")

    @classmethod
    def contiguous(cls, shapes: Sequence[Sequence[int]], offsets: Sequence[int],
                   partition_size: int, rank: int, world: int, group: Any = None,
                   names: Sequence[str] = ()) -> FlatPartition:
        """ZeRO stages 1 and 2: parameters of ``shapes`` lie at ``offsets`` of one flat
        buffer of ``world * partition_size`` elements, of which rank ``r`` holds
        ``[r * partition_size, (r + 1) * partition_size)``."""
        low = rank * partition_size
        params, pieces = [], []
        for j, (shape, offset) in enumerate(zip(shapes, offsets)):
            numel = math.prod(shape)
            cuts = tuple(k * partition_size - offset for k in range(1, world)
                         if 0 < k * partition_size - offset < numel)
            params.append(FlatParam(tuple(shape), cuts, names[j] if names else ""))
            start, stop = max(offset, low), min(offset + numel, low + partition_size)
            if start < stop:
                pieces.append(FlatPiece(j, start - offset, stop - offset, start - low))
        return cls(partition_size, tuple(params), tuple(pieces), group)

    @classmethod
    def per_parameter(cls, shapes: Sequence[Sequence[int]], rank: int, world: int,
                      group: Any = None, names: Sequence[str] = ()) -> FlatPartition:
        """ZeRO stage 3: each parameter is split into ``world`` pieces of
        ``ceil(numel / world)`` elements (the last ones shorter or empty); the flat tensor
        holds rank ``rank``'s piece of each, each padded to that length, in order."""
        params, pieces, offset = [], [], 0
        for j, shape in enumerate(shapes):
            numel = math.prod(shape)
            size = -(-numel // world)
            cuts = tuple(k * size for k in range(1, world) if k * size < numel)
            params.append(FlatParam(tuple(shape), cuts, names[j] if names else ""))
            start, stop = rank * size, min((rank + 1) * size, numel)
            if start < stop:
                pieces.append(FlatPiece(j, start, stop, offset))
            offset += size
        return cls(offset, tuple(params), tuple(pieces), group)

    def resolve(self, param: Tensor, options: Mapping[str, Any]) -> FlatPartitionLayout:
        """The state layout of every piece under a param group's layout ``options``, and the
        reduction plan. Raises ``NotImplementedError`` for a divided parameter whose layout
        the flat step cannot run (before any state exists)."""
        return FlatPartitionLayout(self, param, options)


def _meta(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


@dataclass(frozen=True, eq=False)
class FlatSlots:
    """Where a partial sum's entries go in the reduction buffer of their ``kind``.

    ``local_index`` indexes the partial tensor (flattened), ``buffer_index`` the plan's
    segment of the buffer; every rank holding part of a slot writes its own value there.
    """

    plan: FlatPartitionLayout
    kind: str
    local_index: Tensor
    buffer_index: Tensor


class FlatPartitionLayout:
    """A flat tensor's pieces with their resolved state layouts, and the reduction plan.

    The plan gives every divided parameter (in group order, so the same on every rank) its
    slots: per kind a contiguous segment of :attr:`sizes` ``[kind]`` entries. Factored:
    ``[row sums of the shared rows | column sums of the shared matrices (m each) |
    sums of their old row statistic | sums of their G (or U)]``; rms: one ``sum u²``; absmax:
    one scale per shared block.

    Attributes:
        partition: the :class:`FlatPartition`.
        pieces: one :class:`~torchcame.state.StateLayout` per local piece, its ``shard`` the
            piece's :class:`FlatShardLayout`.
        sizes: the buffer size of each reduction kind.
        group: the process group of the reductions.
        dtype, device: of the flat tensor (the compute dtype of every piece).
    """

    def __init__(self, partition: FlatPartition, param: Tensor,
                 options: Mapping[str, Any]) -> None:
        self.partition = partition
        self.group = partition.group
        self.dtype, self.device = param.dtype, param.device
        chosen = {k: options.get(k, DEFAULTS[k]) for k in LAYOUT_OPTIONS}
        layouts = [resolve_layout(_meta(p.shape, param.dtype), **chosen)
                   for p in partition.params]
        self.sizes = {kind: 0 for kind in REDUCTION_KINDS}
        segments: list[dict[str, int]] = []
        for p, layout in zip(partition.params, layouts):
            seg: dict[str, int] = {}
            if p.cuts:
                _check_divisible(p, layout)
                seg["rms"] = self.sizes["rms"]
                self.sizes["rms"] += 1
                if layout.factored:
                    seg["factored"] = self.sizes["factored"]
                    rows, mats = _shared(p)
                    self.sizes["factored"] += len(rows) + len(mats) * (p.shape[-1] + 2)
                if layout.quantized:
                    seg["absmax"] = self.sizes["absmax"]
                    self.sizes["absmax"] += len(_shared_blocks(p, layout.block_size))
            segments.append(seg)
        pieces = []
        for piece in partition.pieces:
            layout = layouts[piece.index]
            shard = FlatShardLayout(self, partition.params[piece.index], piece, layout,
                                    segments[piece.index])
            pieces.append(StateLayout(layout.momentum, layout.block_size, layout.factored_dims,
                                      layout.compute_dtype, shard))
        self.pieces: tuple[StateLayout, ...] = tuple(pieces)

    def describe(self) -> str:
        return (f"a flat partition of {self.partition.numel} elements holding "
                f"{len(self.pieces)} piece(s) of {len(self.partition.params)} parameter(s)")


def _shared(p: FlatParam) -> tuple[list[int], list[int]]:
    """The rows (of the ``(numel / m, m)`` view) and the matrices (batch elements) of a
    factored parameter that ranks divide: those a cut falls strictly inside."""
    m = p.shape[-1]
    matrix = p.shape[-2] * m
    rows = sorted({c // m for c in p.cuts if c % m})
    mats = sorted({c // matrix for c in p.cuts if c % matrix})
    return rows, mats


def _shared_blocks(p: FlatParam, block_size: int) -> list[int]:
    return sorted({c // block_size for c in p.cuts if c % block_size})


def _check_divisible(p: FlatParam, layout: StateLayout) -> None:
    if layout.moved(len(p.shape)):
        raise NotImplementedError(
            f"factor_dims={'largest'!r} on a parameter{_named(p)} of shape {p.shape} that a "
            f"ZeRO partition divides between ranks (at elements {p.cuts}) is not supported: its "
            "factored dims are not the last two, so a rank's slice of its row-major "
            "flattening is not a run of rows. Use factor_dims='last_two' for it"
        )


def _named(p: FlatParam) -> str:
    return f" {p.name!r}" if p.name else ""


class FlatShardLayout:
    """One piece: elements ``[start, stop)`` of the row-major flattening of a parameter of
    global ``shape``, and the slots of its cross-rank sums.

    The geometry the three-phase step needs (:mod:`torchcame.distributed`): for a factored
    parameter ``(..., n, m)`` viewed as ``numel / m`` rows, the piece covers rows
    ``row0 .. row1`` (the first and last possibly partial) of matrices ``mat0 .. mat1``.
    """

    def __init__(self, plan: FlatPartitionLayout, param: FlatParam, piece: FlatPiece,
                 layout: StateLayout, segments: dict[str, int]) -> None:
        self.plan = plan
        self.param = param
        self.shape = param.shape
        self.start, self.stop = piece.start, piece.stop
        self.whole = piece.start == 0 and piece.stop == param.numel
        self.layout = layout
        self.segments = segments
        self.group = plan.group
        if layout.factored and not self.whole:
            m, n = self.shape[-1], self.shape[-2]
            self.row0, self.row1 = self.start // m, -(-self.stop // m)
            self.front = self.start - self.row0 * m  # elements of the first row held before
            self.mat0, self.mat1 = self.row0 // n, (self.row1 - 1) // n + 1

    # ------------------------------------------------------------------------- description

    @property
    def numel(self) -> int:
        """Elements of the whole parameter (the RMS runs over all of them)."""
        return self.param.numel

    @property
    def local_numel(self) -> int:
        return self.stop - self.start

    def block_offset(self, block_size: int) -> int:
        """Where the piece's first element sits in its first quantization block."""
        return self.start % block_size

    def state_shapes(self) -> dict[str, tuple]:
        """The shape of each state tensor of this piece (but ``step``)."""
        layout = self.layout
        if self.whole:
            return state_shapes(self.shape, layout)
        shapes: dict[str, tuple] = {"exp_avg": (self.local_numel,)}
        if layout.quantized:
            bs = layout.block_size
            shapes["exp_avg_absmax"] = (-(-self.stop // bs) - self.start // bs,)
        if layout.factored:
            rows = (self.row1 - self.row0,)
            cols = (self.mat1 - self.mat0, self.shape[-1])
            shapes.update(exp_avg_sq_row=rows, exp_avg_sq_col=cols, exp_avg_res_row=rows,
                          exp_avg_res_col=cols)
        else:
            shapes["exp_avg_sq"] = (self.local_numel,)
        return shapes

    # ---------------------------------------------------------------------------- geometry

    @cached_property
    def _batch_of_row(self) -> Tensor:
        """The matrix (local index) of each local row."""
        n = self.shape[-2]
        rows = torch.arange(self.row0, self.row1, device=self.plan.device)
        return rows // n - self.mat0

    def _box(self, value: Tensor) -> Tensor:
        """The local elements zero-padded to whole rows, ``(rows, m)``."""
        m = self.shape[-1]
        box = value.new_zeros((self.row1 - self.row0) * m)
        box[self.front : self.front + value.numel()] = value.reshape(-1)
        return box.view(-1, m)

    def _per_matrix(self, rows: Tensor, first: int = 0) -> Tensor:
        """Sum ``rows`` (leading dim: the local rows from local row ``first`` on) per local
        matrix."""
        count = self.mat1 - self.mat0
        if count == 1:
            return rows.sum(dim=0, keepdim=True)
        out = rows.new_zeros((count, *rows.shape[1:]))
        return out.index_add_(0, self._batch_of_row[first:], rows)

    def factored_partials(self, value: Tensor, old_rows: Tensor) -> list[tuple[Tensor, Any]]:
        """Phase 1/3 partial sums of a factored statistic's input ``value`` (G or U, on the
        local elements) and the old row statistic, each with its :class:`FlatSlots`: the
        row sums of the local rows, the column sums, the sum of ``old_rows`` over the rows
        this rank owns (those whose first element it holds) and the sum of ``value``, per
        local matrix."""
        box = self._box(value)
        row_sums = box.sum(dim=-1)
        first_owned = 1 if self.front else 0  # the row's first element is on another rank
        partials = [row_sums, self._per_matrix(box),
                    self._per_matrix(old_rows[first_owned:], first_owned),
                    self._per_matrix(row_sums)]
        return list(zip(partials, self._factored_slots))

    def scaled(self, row: Tensor, col: Tensor, row_mean: Tensor, value: Tensor) -> Tensor:
        """``value / sqrt(S_hat)`` on the local elements, ``S_hat = (row / row_mean) ⊗ col``
        with the local rows ``row`` ``(rows,)``, the local matrices' columns ``col``
        ``(matrices, m)`` and their row means ``row_mean`` ``(matrices,)``."""
        if col.shape[0] == 1:
            col_rows, mean_rows = col, row_mean.expand(row.shape[0])
        else:
            col_rows, mean_rows = col[self._batch_of_row], row_mean[self._batch_of_row]
        box = approx_rsqrt(row.unsqueeze(-1), col_rows, row_mean=mean_rows)
        return box.reshape(-1)[self.front : self.front + value.numel()].mul_(value)

    @property
    def rms_reduction(self) -> FlatSlots:
        """The slot of this parameter's ``sum u²``."""
        return self._slots("rms", [0], [self.segments["rms"]])

    def absmax_partials(self, momentum: Tensor, block_size: int) -> list[tuple[Tensor, Any]]:
        """The scales of the local blocks of ``momentum``, with the slots of those cut by a
        boundary (their scale is the MAX over the ranks holding parts of them)."""
        scales = block_absmax(momentum, block_size, self.block_offset(block_size))
        first = self.start // block_size
        shared = _shared_blocks(self.param, block_size)
        local, buffer = [], []
        for k, block in enumerate(shared):
            if first <= block < first + scales.numel():
                local.append(block - first)
                buffer.append(self.segments["absmax"] + k)
        return [(scales, self._slots("absmax", local, buffer))]

    # ------------------------------------------------------------------------------- slots

    def _slots(self, kind: str, local: Sequence[int], buffer: Sequence[int]) -> FlatSlots:
        device = self.plan.device
        return FlatSlots(self.plan, kind, torch.tensor(local, dtype=torch.long, device=device),
                         torch.tensor(buffer, dtype=torch.long, device=device))

    @cached_property
    def _factored_slots(self) -> list[FlatSlots]:
        """Slots of the four factored partials (row sums, column sums, old-row sums, sums)."""
        m = self.shape[-1]
        rows, mats = _shared(self.param)
        base = self.segments["factored"]
        col_base = base + len(rows)
        old_base = col_base + len(mats) * m
        sum_base = old_base + len(mats)
        row_local, row_buffer = [], []
        for k, r in enumerate(rows):
            if self.row0 <= r < self.row1:
                row_local.append(r - self.row0)
                row_buffer.append(base + k)
        col_local, col_buffer, mat_local, old_buffer, sum_buffer = [], [], [], [], []
        for k, t in enumerate(mats):
            if self.mat0 <= t < self.mat1:
                i = t - self.mat0
                col_local += range(i * m, (i + 1) * m)
                col_buffer += range(col_base + k * m, col_base + (k + 1) * m)
                mat_local.append(i)
                old_buffer.append(old_base + k)
                sum_buffer.append(sum_base + k)
        return [self._slots("factored", row_local, row_buffer),
                self._slots("factored", col_local, col_buffer),
                self._slots("factored", mat_local, old_buffer),
                self._slots("factored", mat_local, sum_buffer)]


# ---------------------------------------------------------------------------------- state


def _piece_tag(piece: FlatPiece) -> tuple[int, int, int]:
    return (piece.index, piece.start, piece.stop)


def init_flat_state(layout: FlatPartitionLayout) -> dict[str, Any]:
    """A zero CAME state for a flat partition: one state per local piece."""
    pieces = []
    for piece, piece_layout in zip(layout.partition.pieces, layout.pieces):
        state: dict[str, Any] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                 "piece": _piece_tag(piece)}
        for key, shape in piece_layout.shard.state_shapes().items():
            state[key] = torch.zeros(shape, dtype=state_dtype(key, piece_layout),
                                     device=layout.device)
        pieces.append(state)
    return {"pieces": pieces}


def flat_state_matches(state: Mapping[str, Any], layout: FlatPartitionLayout) -> bool:
    """Whether an existing flat-partition state has the shapes and momentum dtype of
    ``layout`` (layout options are fixed once a parameter has state)."""
    pieces = state.get("pieces")
    if not isinstance(pieces, list) or len(pieces) != len(layout.pieces):
        return False
    for piece_state, piece_layout in zip(pieces, layout.pieces):
        have = {k: tuple(v.shape) for k, v in piece_state.items()
                if k not in ("step", "piece")}
        if have != piece_layout.shard.state_shapes():
            return False
        if piece_state["exp_avg"].dtype != state_dtype("exp_avg", piece_layout):
            return False
    return True


def load_flat_state(entry: Any, saved: FlatPartitionLayout, layout: FlatPartitionLayout,
                    where: str) -> dict[str, Any]:
    """Check a saved flat-partition state and place it (same dtypes: bit for bit).

    ``saved`` is the layout under the checkpoint's group options, ``layout`` this optimizer's.
    The partitioning (each piece's parameter and elements) and the state layout must be the
    ones the state was saved with.

    Raises:
        ValueError: naming what differs, before anything is loaded.
    """
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: state must be a dict, got {type(entry).__name__}")
    if not entry:
        return {}
    pieces = entry.get("pieces")
    if set(entry) != {"pieces"} or not isinstance(pieces, (list, tuple)):
        raise ValueError(f"{where}: {layout.describe()} expects a state "
                         "{'pieces': [...]} (one CAME state per piece), got keys "
                         f"{sorted(entry)}")
    want = [_piece_tag(p) for p in layout.partition.pieces]
    have = [tuple(p.get("piece", ())) if isinstance(p, Mapping) else None for p in pieces]
    if have != want:
        raise ValueError(
            f"{where}: the checkpoint was saved with another ZeRO partitioning (pieces "
            f"(parameter, first, end) {have}, this rank holds {want}): a different world size "
            "or parameter grouping. CAME's flat-partition state loads only into the "
            "partitioning it was saved with"
        )
    out = []
    for i, (piece_state, old, new) in enumerate(zip(pieces, saved.pieces, layout.pieces)):
        label = f"{where} piece {i}"
        if (old.momentum, old.block_size, old.factored_dims) != (
                new.momentum, new.block_size, new.factored_dims):
            raise ValueError(
                f"{label}: saved with momentum {old.momentum!r} (block {old.block_size}), "
                f"factored dims {old.factored_dims}; this optimizer uses {new.momentum!r} "
                f"(block {new.block_size}), {new.factored_dims}. A flat partition's state "
                "loads only with the layout options it was saved with"
            )
        body = {k: v for k, v in piece_state.items() if k != "piece"}
        checked = check_entry(body, old.shard.state_shapes(), old, label)
        placed: dict[str, Any] = {"step": checked.pop("step"), "piece": want[i]}
        for key, value in checked.items():
            placed[key] = value.to(device=layout.device, dtype=state_dtype(key, new))
        out.append(placed)
    return {"pieces": out}

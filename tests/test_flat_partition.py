"""CAME on flat partitions (the layout of DeepSpeed ZeRO) equals one process, without DeepSpeed.

Real gloo process groups on CPU (2 and 3 ranks). Each rank builds the flat tensors ZeRO would
hand it from the full parameters -- ZeRO-1/2's contiguous split of each group's flattened,
concatenated parameters and ZeRO-3's per-parameter split -- attaches the partition map
(``CAME.attach_flat_partitions``) and steps with its slice of the full gradients. The shapes
are chosen so that the partition boundaries cut rows in the middle, cut a batch of matrices
inside one matrix, fall on row starts, leave a parameter wholly on one rank, and (at 3 ranks)
cut one parameter twice. The tests rebuild every parameter and state tensor from the ranks'
pieces (a row or matrix statistic held by two ranks must be bitwise equal on both) and compare
them with a single process stepping the full tensors: float32 within 1e-5 (norm-wise relative)
after 8 steps; bf16 and int8 momentum tightly after one step (a stored momentum may be one
rounding apart) and loosely after 8. The number of all-reduces per step is counted.

The DeepSpeed engine itself is tested in ``tests/test_deepspeed.py``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from cases import param_tol
from driver import exit_rank, launch_ranks, make_params, random_grads, rank_parser

pytestmark = pytest.mark.distributed

RTOL = param_tol(torch.float32, "distributed").rtol
STEPS = 8
EARLY = 1
TIMEOUT = 180
#: Matrices and batched matrices (group 0) and vectors (group 1).
MATRICES = [(41, 7), (3, 5, 7), (2, 3, 4, 5), (13, 1), (1, 9), (6, 33)]
VECTORS = [(41,), (7,), (1,), (29,)]
HYPER = dict(lr=1e-2, weight_decay=0.1, foreach=False)
BLOCK = 8  # int8 blocks; partition boundaries cut many of them
MOMENTA = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": "int8"}
LAYOUTS = ("contiguous", "per_parameter")


def groups_of(matrices: list[torch.Tensor], vectors: list[torch.Tensor], momentum,
              **extra) -> list[dict]:
    """Two param groups: matrices (decayed) and vectors (not), int8 blocks of BLOCK."""
    int8 = {"quantization_block_size": BLOCK, "min_quantized_numel": 0}
    return [{"params": matrices, "momentum_dtype": momentum, **int8, **extra},
            {"params": vectors, "weight_decay": 0.0, "momentum_dtype": momentum,
             **int8, **extra}]


def full_params() -> list[torch.Tensor]:
    return make_params(MATRICES + VECTORS, seed=3)


# ---------------------------------------------------------------------------- the worker


def partitions(layout: str, rank: int, world: int):
    """One FlatPartition per group, as ZeRO would build them."""
    from torchcame.flat_partition import FlatPartition

    out = []
    for shapes in (MATRICES, VECTORS):
        if layout == "per_parameter":
            out.append(FlatPartition.per_parameter(shapes, rank, world))
            continue
        offsets = [sum(math.prod(s) for s in shapes[:i]) for i in range(len(shapes))]
        total = sum(math.prod(s) for s in shapes)
        align = 2 * world  # DeepSpeed pads each group to a multiple of 2 * world
        size = -(-total // align) * align // world
        out.append(FlatPartition.contiguous(shapes, offsets, size, rank, world))
    return out


def scatter(partition, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The flat tensor of ``partition`` holding its pieces of ``tensors``."""
    flat = torch.zeros(partition.numel)
    for piece in partition.pieces:
        flat[piece.offset : piece.offset + piece.numel] = (
            tensors[piece.index].detach().reshape(-1)[piece.start : piece.stop])
    return flat


class CountAllReduce:
    """Counts ``torch.distributed.all_reduce`` calls while active."""

    def __enter__(self):
        import torch.distributed as dist

        self.count, self._orig = 0, dist.all_reduce

        def counting(*args, **kwargs):
            self.count += 1
            return self._orig(*args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        dist.all_reduce = self._orig


def snapshot(optim, flats, parts) -> list[dict]:
    """Per group: each local piece's (parameter index, start, stop), values and state."""
    out = []
    for flat, part in zip(flats, parts):
        state = optim.state[flat]["pieces"] if optim.state.get(flat) else []
        pieces = []
        for i, piece in enumerate(part.pieces):
            entry = {"piece": (piece.index, piece.start, piece.stop),
                     "param": flat[piece.offset : piece.offset + piece.numel].clone()}
            if state:
                entry["state"] = {k: v.clone() if isinstance(v, torch.Tensor) else v
                                  for k, v in state[i].items()}
            pieces.append(entry)
        out.append(pieces)
    return out


def run_flat(layout: str, momentum, rank: int, world: int, steps: int = STEPS,
             **extra) -> dict:
    from torchcame import CAME

    params = full_params()
    parts = partitions(layout, rank, world)
    flats = [scatter(part, params[:len(MATRICES)] if g == 0 else params[len(MATRICES):])
             for g, part in enumerate(parts)]
    optim = CAME(groups_of([flats[0]], [flats[1]], momentum, **extra), **HYPER)
    optim.attach_flat_partitions(dict(zip(flats, parts)))
    counts, early = [], None
    for t in range(steps):
        grads = random_grads(params, t)
        for g, (flat, part) in enumerate(zip(flats, parts)):
            flat.grad = scatter(part, grads[:len(MATRICES)] if g == 0 else grads[len(MATRICES):])
        with CountAllReduce() as counter:
            optim.step()
        counts.append(counter.count)
        if t + 1 == EARLY:
            early = snapshot(optim, flats, parts)
    return {"final": snapshot(optim, flats, parts), "early": early, "counts": counts}


def _skip_nonfinite(rank: int, world: int) -> dict:
    """An inf in rank 0's gradient only: every rank skips the step."""
    from torchcame import CAME

    params = full_params()[: len(MATRICES)]
    (part,) = partitions("contiguous", rank, world)[:1]
    flat = scatter(part, params)
    before = flat.clone()
    optim = CAME([{"params": [flat], "skip_nonfinite": True}], **HYPER)
    optim.attach_flat_partitions({flat: part})
    flat.grad = scatter(part, random_grads(params, 0))
    if rank == 0:
        flat.grad[0] = math.inf
    optim.step()
    return {"skipped": optim.param_groups[0]["skipped_steps"],
            "unchanged": torch.equal(flat, before)}


def worker(rank: int, world: int, port: int, out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for layout in LAYOUTS:
            for name, momentum in MOMENTA.items():
                results[(layout, name)] = run_flat(layout, momentum, rank, world)
        results["bias_correction"] = run_flat("per_parameter", torch.float32, rank, world,
                                              bias_correction=True, maximize=True)
        results["skip"] = _skip_nonfinite(rank, world)
        torch.save(results, out / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------- helpers


def reference(momentum, steps: int, **extra) -> tuple[list[torch.Tensor], list[dict]]:
    """One process stepping the full tensors."""
    from torchcame import CAME

    params = full_params()
    optim = CAME(groups_of(params[:len(MATRICES)], params[len(MATRICES):], momentum, **extra),
                 **HYPER)
    for t in range(steps):
        for p, g in zip(params, random_grads(params, t)):
            p.grad = g
        optim.step()
    return [p.detach() for p in params], [optim.state[p] for p in params]


def _rows(shape, start, stop):
    """Rows ``row0 .. row1`` and matrices ``mat0 .. mat1`` of elements [start, stop)."""
    m, n = shape[-1], shape[-2]
    row0, row1 = start // m, -(-stop // m)
    return row0, row1, row0 // n, (row1 - 1) // n + 1


def _place(target: dict, key: str, full: torch.Tensor, index, value: torch.Tensor) -> None:
    """Write ``value`` into ``target[key]`` (a copy of ``full``'s shape, NaN where unset) at
    ``index``; entries written by two ranks must be bitwise equal."""
    if key not in target:
        target[key] = torch.full_like(full, math.nan, dtype=torch.float32)
    view = target[key]
    old = view[index]
    both = ~old.isnan()
    assert torch.equal(old[both], value.float()[both]), f"{key}: ranks disagree"
    view[index] = value.float()


def rank_pieces(results: list[list[dict]]) -> list[tuple]:
    """``(parameter index, start, stop, values, state)`` of every piece of every rank."""
    groups = [list(range(len(MATRICES))), list(range(len(MATRICES), len(MATRICES + VECTORS)))]
    return [(groups[g][entry["piece"][0]], *entry["piece"][1:], entry["param"], entry["state"])
            for rank in results for g, pieces in enumerate(rank) for entry in pieces]


def rebuild(pieces: list[tuple], ref_params: dict, ref_states: dict, block: int = BLOCK):
    """Full parameters and state (float32, int8 momentum dequantized) from ``pieces``
    (``(key, start, stop, values, state)`` of every rank), and the reference's
    (``ref_params`` / ``ref_states`` by the same keys), as ``{"key.name": tensor}`` dicts.
    Every element must be held by some rank; a statistic two ranks hold must be bitwise
    equal on both."""
    from torchcame.lowbit import dequantize_blockwise

    if isinstance(ref_params, list):
        ref_params, ref_states = dict(enumerate(ref_params)), dict(enumerate(ref_states))
    got, ref = {}, {}
    for key, start, stop, values, st in pieces:
        param, state = ref_params[key], ref_states[key]
        flat = slice(start, stop)
        _place(got, f"{key}.param", param.reshape(-1), flat, values)
        whole = start == 0 and stop == param.numel()
        for name, value in st.items():
            if name in ("step", "piece", "exp_avg_absmax"):
                continue
            if name == "exp_avg" and value.dtype == torch.int8:
                offset = 0 if whole else start % block
                value = dequantize_blockwise(value, st["exp_avg_absmax"], block, offset)
            if whole or name in ("exp_avg", "exp_avg_sq"):
                _place(got, f"{key}.{name}", state[name].reshape(-1),
                       flat if not whole else slice(None), value.reshape(-1))
                continue
            row0, row1, mat0, mat1 = _rows(param.shape, start, stop)
            if name.endswith("_row"):
                _place(got, f"{key}.{name}", state[name].reshape(-1), slice(row0, row1), value)
            else:
                _place(got, f"{key}.{name}", state[name].reshape(-1, param.shape[-1]),
                       slice(mat0, mat1), value)
    for key, param in ref_params.items():
        state = ref_states[key]
        ref[f"{key}.param"] = param.reshape(-1).float()
        for name, value in state.items():
            if name in ("step", "exp_avg_absmax"):
                continue
            if name == "exp_avg" and value.dtype == torch.int8:
                value = dequantize_blockwise(value, state["exp_avg_absmax"], block)
            ref[f"{key}.{name}"] = (value.reshape(-1, param.shape[-1]) if name.endswith("_col")
                                    and param.dim() >= 2 else value.reshape(-1)).float()
    for name, value in got.items():
        assert not value.isnan().any(), f"{name}: not every element is held by some rank"
        got[name] = value.reshape(ref[name].shape)
    assert got.keys() == ref.keys()
    return got, ref


def assert_close_rel(got: dict, ref: dict, rtol: float = RTOL, skip=()) -> None:
    errors = {k: float((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp(min=1e-30))
              for k in ref if not any(k.endswith(s) for s in skip)}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"{worst}: relative error {errors[worst]:.2e} > {rtol:.0e}"


# ---------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, list[dict]]:
    out = {}
    for world in (2, 3):
        root = tmp_path_factory.mktemp(f"flat{world}")
        launch_ranks(__file__, world, ["--out", str(root)], TIMEOUT)
        out[world] = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return out


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_equals_single_process(runs, world, layout):
    ranks = [r[(layout, "float32")]["final"] for r in runs[world]]
    got, ref = rebuild(rank_pieces(ranks), *reference(torch.float32, STEPS))
    assert_close_rel(got, ref)
    # one all-reduce per phase for all parameters of both groups (every layout here divides
    # a factored parameter, so each phase has something to sum)
    assert all(r[(layout, "float32")]["counts"] == [3] * STEPS for r in runs[world])


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("momentum", ["bfloat16", "int8"])
def test_low_bit_momentum_equals_single_process(runs, world, layout, momentum):
    """bf16 / int8 momentum: the same roundings as one process (int8: the same blocks, a
    block cut by a boundary quantized with its global scale after a MAX all-reduce). After
    one step everything but the stored momentum within 1e-5 and the momentum within one
    rounding; after 8 steps within 1e-2 (CAME amplifies a flipped rounding)."""
    ranks = [r[(layout, momentum)]["early"] for r in runs[world]]
    got, ref = rebuild(rank_pieces(ranks), *reference(MOMENTA[momentum], EARLY))
    assert_close_rel(got, ref, skip=(".exp_avg",))
    for key in (k for k in ref if k.endswith(".exp_avg")):
        scale = ref[key].abs().max()
        limit = 2**-8 * ref[key].abs() if momentum == "bfloat16" else scale / 127
        assert ((got[key] - ref[key]).abs() <= limit + 1e-30).all(), key
    ranks = [r[(layout, momentum)]["final"] for r in runs[world]]
    got, ref = rebuild(rank_pieces(ranks), *reference(MOMENTA[momentum], STEPS))
    assert_close_rel({k: v for k, v in got.items() if k.endswith(".param")},
                     {k: v for k, v in ref.items() if k.endswith(".param")}, rtol=1e-2)
    counts = runs[world][0][(layout, momentum)]["counts"]
    # int8 adds one MAX all-reduce for the scales of blocks a boundary cuts
    assert counts == [4 if momentum == "int8" else 3] * STEPS


@pytest.mark.parametrize("world", [2, 3])
def test_int8_codes_are_stored_per_piece(runs, world):
    for rank in runs[world]:
        for pieces in rank[("contiguous", "int8")]["final"][:1]:
            for entry in pieces:
                assert entry["state"]["exp_avg"].dtype == torch.int8
        for entry in rank[("contiguous", "int8")]["final"][1]:  # vectors keep float32
            assert entry["state"]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("world", [2, 3])
def test_bias_correction_and_maximize(runs, world):
    ranks = [r["bias_correction"]["final"] for r in runs[world]]
    ref = reference(torch.float32, STEPS, bias_correction=True, maximize=True)
    got, ref = rebuild(rank_pieces(ranks), *ref)
    assert_close_rel(got, ref)


@pytest.mark.parametrize("world", [2, 3])
def test_skip_nonfinite_agrees_across_ranks(runs, world):
    assert [r["skip"] for r in runs[world]] == [{"skipped": 1, "unchanged": True}] * world


def test_partitions_cut_rows_and_matrices():
    """The layouts exercise what the tests claim: mid-row cuts, a cut inside one matrix of a
    batch, a cut on a row start, a parameter held whole, a parameter cut twice."""
    seen = set()
    for world in (2, 3):
        for layout in LAYOUTS:
            for part in partitions(layout, 0, world):
                for p in part.params:
                    for c in p.cuts:
                        if len(p.shape) >= 2:
                            m, matrix = p.shape[-1], p.shape[-2] * p.shape[-1]
                            seen.add("mid-row" if c % m else "row-start")
                            if len(p.shape) > 2 and c % matrix:
                                seen.add("inside-a-batched-matrix")
                    if len(p.cuts) > 1:
                        seen.add("cut-twice")
                    if not p.cuts and p.numel > 1:
                        seen.add("whole")
    assert seen == {"mid-row", "row-start", "inside-a-batched-matrix", "cut-twice", "whole"}


def test_lowbit_slices_quantize_like_the_whole():
    """A slice's blocks, with the whole tensor's scales, give the whole tensor's codes."""
    from torchcame.lowbit import block_absmax, dequantize_blockwise, quantize_blockwise

    x = torch.randn(203)
    codes, absmax = quantize_blockwise(x, BLOCK)
    start, stop = 21, 150
    first, last = start // BLOCK, -(-stop // BLOCK)
    local = block_absmax(x[start:stop], BLOCK, start % BLOCK)
    assert local.numel() == last - first
    assert torch.equal(local[1:-1], absmax[first + 1 : last - 1])  # whole blocks
    part, _ = quantize_blockwise(x[start:stop], BLOCK, start % BLOCK, absmax[first:last])
    assert torch.equal(part, codes[start:stop])
    back = dequantize_blockwise(part, absmax[first:last], BLOCK, start % BLOCK)
    assert torch.equal(back, dequantize_blockwise(codes, absmax, BLOCK)[start:stop])


# ----------------------------------------------- single-process checks (no process group)


def _fresh(layout: str = "contiguous", rank: int = 0, world: int = 2, **options):
    """A CAME over rank ``rank``'s matrices flat partition, state allocated (no collective)."""
    from torchcame import CAME

    (part,) = partitions(layout, rank, world)[:1]
    flat = scatter(part, full_params()[: len(MATRICES)]).requires_grad_()
    optim = CAME([{"params": [flat], **options}], **HYPER)
    optim.attach_flat_partitions({flat: part})
    return optim, flat, part


def test_state_layout_per_piece():
    """Whole pieces keep the parameter's state shapes; a divided one its local rows, its
    matrices' columns and the momentum of its own elements."""
    optim, flat, part = _fresh()
    optim.init_state()
    pieces = optim.state[flat]["pieces"]
    assert [p["piece"] for p in pieces] == [(q.index, q.start, q.stop) for q in part.pieces]
    for piece, state in zip(part.pieces, pieces):
        shape = MATRICES[piece.index]
        assert state["exp_avg"].numel() == piece.numel and float(state["step"]) == 0
        if piece.start == 0 and piece.stop == math.prod(shape):
            assert state["exp_avg"].shape == shape
            assert state["exp_avg_sq_col"].shape == (*shape[:-2], shape[-1])
            continue
        row0, row1, mat0, mat1 = _rows(shape, piece.start, piece.stop)
        assert state["exp_avg_sq_row"].shape == (row1 - row0,)
        assert state["exp_avg_sq_col"].shape == (mat1 - mat0, shape[-1])


def test_checkpoint_loads_only_into_its_partitioning():
    from driver import assert_raises_untouched

    optim, flat, _ = _fresh()
    optim.init_state()
    saved = optim.state_dict()
    again, flat2, _ = _fresh()
    again.load_state_dict(saved)
    for a, b in zip(again.state[flat2]["pieces"], optim.state[flat]["pieces"]):
        assert a.keys() == b.keys() and all(
            torch.equal(a[k], b[k]) if isinstance(b[k], torch.Tensor) else a[k] == b[k]
            for k in b)
    other, flat3, _ = _fresh("contiguous", rank=0, world=3)
    other_saved = other.state_dict()
    other.init_state()
    saved_other = other.state_dict()
    target, flat4, _ = _fresh()
    assert_raises_untouched(target, [flat4], lambda: target.load_state_dict(saved_other),
                            ValueError, "another ZeRO partitioning")
    assert other_saved["state"] == {}
    int8, flat5, _ = _fresh(momentum_dtype="int8", quantization_block_size=BLOCK,
                            min_quantized_numel=0)
    assert_raises_untouched(int8, [flat5], lambda: int8.load_state_dict(saved), ValueError,
                            "momentum 'float32'")


def test_layout_options_fixed_once_state_exists():
    optim, flat, _ = _fresh()
    optim.init_state()
    optim.param_groups[0]["momentum_dtype"] = "bfloat16"
    flat.grad = torch.zeros_like(flat)
    with pytest.raises(ValueError, match="momentum_dtype changed from 'float32' to 'bfloat16'"):
        optim.step()


def test_divided_parameter_refuses_moved_factor_dims():
    """factor_dims='largest' factors a (9, 2, 5) tensor over dims (0, 2): a rank's slice of
    its row-major flattening is then no run of rows, so dividing it is refused (no state)."""
    from torchcame import CAME
    from torchcame.flat_partition import FlatPartition

    part = FlatPartition.contiguous([(9, 2, 5)], [0], 45, 0, 2)
    flat = torch.zeros(45, requires_grad=True)
    optim = CAME([flat], lr=1e-3, factor_dims="largest")
    optim.attach_flat_partitions({flat: part})
    flat.grad = torch.zeros_like(flat)
    with pytest.raises(NotImplementedError, match="factor_dims='last_two'"):
        optim.step()
    assert not optim.state


def test_attach_and_partition_errors():
    from torchcame import CAME
    from torchcame.flat_partition import FlatParam, FlatPartition, FlatPiece

    (part,) = partitions("contiguous", 0, 2)[:1]
    flat = torch.zeros(part.numel)
    optim = CAME([flat], lr=1e-3)
    with pytest.raises(ValueError, match="partition map of"):
        optim.attach_flat_partitions({torch.zeros(part.numel + 1): part})
    with pytest.raises(TypeError, match="FlatPartition"):
        optim.attach_flat_partitions({flat: object()})
    with pytest.raises(TypeError, match="1-D"):
        optim.attach_flat_partitions({torch.zeros(2, 2): part})
    with pytest.raises(ValueError, match="overlap"):
        FlatPartition(4, (FlatParam((2,)), FlatParam((2,))),
                      (FlatPiece(0, 0, 2, 0), FlatPiece(1, 0, 2, 1)))
    with pytest.raises(ValueError, match="cuts"):
        FlatPartition(4, (FlatParam((4,)),), (FlatPiece(0, 1, 4, 0),))
    flat.grad = torch.ones_like(flat)
    optim.step()  # a lone 1-D tensor without DeepSpeed is a vector parameter
    with pytest.raises(ValueError, match="already has CAME state"):
        optim.attach_flat_partitions({flat: part})


if __name__ == "__main__":
    a = rank_parser().parse_args()
    worker(a.rank, a.world_size, a.port, a.out)
    exit_rank()

"""CAME on 2-D meshes (issue #14): FSDP2 over tensor parallel and any Shard/_StridedShard/
Replicate mix steps as one process holding the full tensors; DCP reshards bit for bit.

4 gloo ranks on CPU (one OS process each, OMP_NUM_THREADS=1) on a 2x2 mesh ("dp", "tp"):

* ``layouts``: parameters placed by hand on every kind of layout (rows and columns sharded
  by different mesh dims, both mesh dims on one dim, FSDP-over-TP ``_StridedShard``, a
  batch dim and columns, sequence-parallel style ``Replicate``/``Shard`` vectors, uneven and
  empty shards), stepped 12 times with float32, bf16 and (dim 0 only) int8 momentum;
* ``fsdp_tp``: a real model parallelized with ``parallelize_module`` (Colwise/Rowwise) on
  "tp" and ``fully_shard`` on "dp" (its weights are ``_StridedShard``), trained 12 steps;
* DCP: the 2x2 optimizer state saved with ``torch.distributed.checkpoint`` and loaded on a
  4x1 mesh (in the workers) and on 1 process (here), bit for bit.

* ``--mode triton``: the float32 and int8 layouts and the FSDP2-over-TP model again with
  ``fused=True``, the Triton kernels (under their interpreter) stepping the local shards.

Tolerance (float32): every tensor within ``max|a - b| <= 1e-5 * max|b|`` of the single
process after 12 steps (cross-rank sums change the summation order). bf16/int8 momentum: as
in the 1-D tests (test_distributed.py), loose after 12 steps.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
from driver import exit_rank, launch_ranks, rank_parser

pytestmark = pytest.mark.distributed

RTOL = 1e-5
LOWBIT_RTOL = 1e-2  # bf16/int8 momentum: as the 1-D tests (one rounding of m, compounded)
STEPS = 12
TIMEOUT = 300
HYPER = dict(lr=1e-2, weight_decay=0.1, foreach=False)
#: the ``triton`` launch: fused=True, the Triton kernels (under their interpreter) on the shards
TRITON_HYPER = dict(lr=1e-2, weight_decay=0.1, fused=True)
TRITON_ENV = {"TRITON_INTERPRET": "1", "TORCHCAME_FUSED_BACKEND": "triton"}
INT8_OPTIONS = {"momentum_dtype": "int8", "min_quantized_numel": 64,
                "quantization_block_size": 32}


def _specs():
    """(name, global shape, placements on the (dp, tp) mesh) of the hand-placed layouts."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return [
        ("rows_dp_cols_tp", (8, 6), (Shard(0), Shard(1))),
        ("cols_dp_rows_tp", (6, 10), (Shard(1), Shard(0))),
        ("fsdp_over_colwise", (8, 6), (_StridedShard(0, split_factor=2), Shard(0))),
        ("fsdp_over_rowwise", (6, 8), (Shard(0), Shard(1))),
        ("rows_by_both_uneven", (7, 5), (Shard(0), Shard(0))),
        ("batch_dp_cols_tp", (3, 4, 6), (Shard(0), Shard(2))),
        ("replicate_cols_tp", (4, 6), (Replicate(), Shard(1))),
        ("empty_shard", (2, 3), (Shard(0), Shard(1))),
        ("vector_sp", (10,), (Shard(0), Replicate())),
        ("vector_both", (9,), (Shard(0), Shard(0))),
        ("replicated", (5,), (Replicate(), Replicate())),
    ]


def _int8_specs():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return [
        ("int8_fsdp_over_colwise", (8, 64), (_StridedShard(0, split_factor=2), Shard(0))),
        ("int8_rows_dp", (4, 32), (Shard(0), Replicate())),
        ("int8_rows_dp_cols_tp", (8, 64), (Shard(0), Shard(1))),  # rowwise TP: 32-col chunks
    ]


def _full_params(specs, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape, _ in specs}


def _full_grads(specs, step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return {name: torch.randn(shape, generator=gen) for name, shape, _ in specs}


def _place(full: torch.Tensor, mesh, placements) -> torch.Tensor:
    """The DTensor of ``full`` with ``placements``: this rank's box, no communication."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, mesh, placements)
    local = full
    for dim, (start, length) in enumerate(zip(offset, shape)):
        local = local.narrow(dim, start, length)
    return DTensor.from_local(local.contiguous().clone(), mesh, placements, run_check=False,
                              shape=full.shape, stride=full.contiguous().stride())


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor().clone() if hasattr(t, "full_tensor") else t.detach().clone()


def single_run(specs, steps: int = STEPS, **options) -> dict[str, torch.Tensor]:
    """The single-process reference: CAME on the full tensors."""
    from torchcame import CAME

    params = {k: v.clone().requires_grad_() for k, v in _full_params(specs).items()}
    opt = CAME(list(params.values()), **HYPER, **options)
    for step in range(steps):
        for name, g in _full_grads(specs, step).items():
            params[name].grad = g
        opt.step()
    out = {f"{n}": p.detach().clone() for n, p in params.items()}
    for n, p in params.items():
        for k, v in opt.state[p].items():
            out[f"{n}.{k}"] = v.clone()
    return out


def _sharded_run(specs, mesh, steps: int = STEPS, **options):
    from torchcame import CAME

    params = {name: _place(full, mesh, placements).requires_grad_()
              for (name, _, placements), full in zip(specs, _full_params(specs).values())}
    opt = CAME(list(params.values()), **HYPER, **options)
    for step in range(steps):
        for (name, _, placements), g in zip(specs, _full_grads(specs, step).values()):
            params[name].grad = _place(g, mesh, placements)
        opt.step()
    return params, opt


def _gathered(params, opt) -> dict[str, torch.Tensor]:
    out = {n: _full(p.detach()) for n, p in params.items()}
    for n, p in params.items():
        for k, v in opt.state[p].items():
            out[f"{n}.{k}"] = _full(v)
    return out


# ------------------------------------------------------------------------------ workers


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4),
                               torch.nn.LayerNorm(4))


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + step)
    return torch.randn(4, 6, generator=gen), torch.randn(4, 4, generator=gen)


def single_model_run(steps: int = STEPS) -> dict[str, torch.Tensor]:
    from torchcame import CAME

    model = _model()
    opt = CAME(model.parameters(), **HYPER)
    for step in range(steps):
        x, y = _data(step)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def triton_worker(rank: int, world: int, port: int, out: Path) -> None:
    """``fused=True`` on the 2x2 mesh: the hand-placed layouts (float32 and int8 momentum) and
    the FSDP2-over-TP model, stepped by the Triton kernels on the local shards."""
    from torchcame._impl import triton_kernels

    global HYPER
    HYPER = TRITON_HYPER
    with _on_2x2_mesh(rank, world, port) as mesh:
        results = {}
        for label, specs, options in (("float32", _specs(), {}),
                                      ("int8", _int8_specs(), INT8_OPTIONS)):
            params, opt = _sharded_run(specs, mesh, **options)
            results[label] = _gathered(params, opt)
        results["fsdp_tp"] = _fsdp_tp_run(mesh)
        results["launches"] = dict(triton_kernels.LAUNCHES)
        if rank == 0:
            torch.save(results, out / "results_triton.pt")


@contextlib.contextmanager
def _on_2x2_mesh(rank: int, world: int, port: int):
    """This rank in a gloo group of ``world`` (one thread), yielding the ("dp", "tp") mesh;
    a barrier after the block, then the group is destroyed."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _fsdp_tp_run(mesh) -> dict[str, torch.Tensor]:
    """A real model: tensor parallel on "tp", FSDP2 on "dp" (weights become _StridedShard)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    from torchcame import CAME

    model = _model()
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    opt = CAME(model.parameters(), **HYPER)
    for step in range(STEPS):
        x, y = _data(step)  # every rank the same batch: the mean over dp is the batch's
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return {n: _full(p.detach()) for n, p in model.named_parameters()}


def worker(rank: int, world: int, port: int, out: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    from torchcame import CAME

    with _on_2x2_mesh(rank, world, port) as mesh:
        results = {}
        for label, specs, options in (
            ("float32", _specs(), {}),
            ("bfloat16", _specs(), {"momentum_dtype": torch.bfloat16}),
            ("int8", _int8_specs(), INT8_OPTIONS),
        ):
            params, opt = _sharded_run(specs, mesh, **options)
            results[label] = _gathered(params, opt)
            if label == "float32":  # DCP: save on 2x2, load on 4x1 here and on 1 process
                dcp.save(opt.state_dict(), checkpoint_id=str(out / "ckpt"))
                mesh41 = init_device_mesh("cpu", (4, 1), mesh_dim_names=("a", "b"))
                placed = {name: _place(torch.zeros(shape), mesh41, (Shard(0), Replicate()))
                          .requires_grad_() for name, shape, _ in specs}
                opt41 = CAME(list(placed.values()), **HYPER)
                opt41.init_state()
                target = opt41.state_dict()
                dcp.load(target, checkpoint_id=str(out / "ckpt"))
                opt41.load_state_dict(target)
                results["loaded_4x1"] = _gathered(placed, opt41)

        # int8 whose blocks would span ranks: a clear error before any state exists
        from torchcame.distributed import UnsupportedShardingError  # noqa: F401

        bad = _place(torch.randn(8, 48), mesh, (Shard(0), Shard(1))).requires_grad_()
        bad_opt = CAME([bad], momentum_dtype="int8", min_quantized_numel=64,
                       quantization_block_size=16)  # 48 columns: chunks of 24, cut blocks
        bad.grad = _place(torch.randn(8, 48), mesh, (Shard(0), Shard(1)))
        try:
            bad_opt.step()
            results["int8_cut_error"] = "no error"
        except NotImplementedError as exc:
            results["int8_cut_error"] = str(exc) + f" | state created: {bool(bad_opt.state)}"

        results["fsdp_tp"] = _fsdp_tp_run(mesh)
        model = _model()  # the placements fully_shard over parallelize_module gives
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        fully_shard(model, mesh=mesh["dp"])
        results["fsdp_tp_placements"] = {n: str(p.placements) for n, p in
                                         model.named_parameters()}
        if rank == 0:
            torch.save(results, out / "results.pt")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mesh2d")
    launch_ranks(__file__, 4, ["--out", str(out)], TIMEOUT)
    return out


@pytest.fixture(scope="module")
def triton_run(tmp_path_factory) -> dict:
    """4 ranks with ``fused=True`` and the Triton testing switch (interpreter, CPU shards)."""
    pytest.importorskip("triton", reason="triton is not installed (it is in the [dev] extra)")
    out = tmp_path_factory.mktemp("mesh2d_triton")
    launch_ranks(__file__, 4, ["--out", str(out), "--mode", "triton"], TIMEOUT, env=TRITON_ENV)
    return torch.load(out / "results_triton.pt", weights_only=False)


def test_triton_kernels_step_every_2d_layout_as_one_process(triton_run):
    launches = triton_run["launches"]
    assert launches.get("pass1", 0) >= STEPS and launches.get("vector", 0) >= STEPS, launches
    _assert_close(triton_run["float32"], single_run(_specs()), RTOL)


def test_triton_kernels_int8_on_2d_layouts(triton_run):
    got, want = triton_run["int8"], single_run(_int8_specs(), **INT8_OPTIONS)
    _assert_close({k: v for k, v in got.items() if not k.endswith("absmax")},
                  {k: v for k, v in want.items() if not k.endswith("absmax")}, LOWBIT_RTOL)


def test_triton_kernels_fsdp2_over_tensor_parallel_model(triton_run):
    _assert_close(triton_run["fsdp_tp"], single_model_run(), RTOL)


def _results(run: Path) -> dict:
    return torch.load(run / "results.pt", weights_only=False)


def _assert_close(got: dict, want: dict, rtol: float) -> None:
    assert sorted(got) == sorted(want)
    for key, expected in want.items():
        actual = got[key]
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, key
        if expected.dtype == torch.int8:
            assert (actual.int() - expected.int()).abs().max() <= 127 * rtol * 4 + 1, key
            continue
        scale = expected.float().abs().max().clamp(min=1e-30)
        err = (actual.float() - expected.float()).abs().max() / scale
        assert err <= rtol, f"{key}: relative error {float(err):.2e} > {rtol}"


@pytest.mark.parametrize("label, options, rtol", [
    ("float32", {}, RTOL),
    ("bfloat16", {"momentum_dtype": torch.bfloat16}, LOWBIT_RTOL),
])
def test_every_2d_layout_steps_as_one_process(run, label, options, rtol):
    _assert_close(_results(run)[label], single_run(_specs(), **options), rtol)


def test_int8_on_2d_layouts_with_whole_blocks(run):
    got = _results(run)["int8"]
    want = single_run(_int8_specs(), **INT8_OPTIONS)
    _assert_close({k: v for k, v in got.items() if not k.endswith("absmax")},
                  {k: v for k, v in want.items() if not k.endswith("absmax")}, LOWBIT_RTOL)
    for key in want:  # the scales: the single process's, viewed per dim-0 slice
        if key.endswith("absmax"):
            torch.testing.assert_close(got[key].reshape(-1), want[key], rtol=LOWBIT_RTOL,
                                       atol=1e-6)


def test_int8_cutting_blocks_is_refused_before_any_state(run):
    message = _results(run)["int8_cut_error"]
    assert "column chunks of [24]" in message and "state created: False" in message, message


def test_fsdp2_over_tensor_parallel_model_trains_as_one_process(run):
    results = _results(run)
    placements = results["fsdp_tp_placements"]
    assert any("_StridedShard" in p for p in placements.values()), placements
    _assert_close(results["fsdp_tp"], single_model_run(), RTOL)


def test_dcp_2x2_to_4x1_and_to_one_process_bitwise(run, tmp_path):
    import torch.distributed.checkpoint as dcp

    results = _results(run)
    saved = results["float32"]
    loaded = {k: v for k, v in results["loaded_4x1"].items() if "." in k}  # state only
    assert len(loaded) == len([k for k in saved if "." in k])
    for key, value in loaded.items():
        assert torch.equal(value, saved[key]), key
    # one process, no process group: DCP loads the full tensors
    specs = _specs()
    template = {"state": {}, "param_groups": []}
    from torchcame import CAME

    params = [torch.zeros(shape, requires_grad=True) for _, shape, _ in specs]
    opt = CAME(params, **HYPER)
    opt.init_state()
    template = opt.state_dict()
    dcp.load(template, checkpoint_id=str(run / "ckpt"), no_dist=True)
    opt.load_state_dict(template)
    for (name, _, _), p in zip(specs, params):
        for key, value in opt.state[p].items():
            assert torch.equal(value, saved[f"{name}.{key}"]), f"{name}.{key}"


if __name__ == "__main__":
    parser = rank_parser()
    parser.add_argument("--mode", default="main")
    a = parser.parse_args()
    (triton_worker if a.mode == "triton" else worker)(a.rank, a.world_size, a.port, a.out)
    exit_rank()

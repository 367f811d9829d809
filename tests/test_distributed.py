"""CAME under FSDP2, DDP and ZeRO equals a single process holding the full tensors.

Real gloo process groups on CPU (2 and 3 ranks, one OS process per rank, OMP_NUM_THREADS=1,
TCP port picked by the OS). Each launch runs every scenario of its world size and saves full
(gathered) parameters and state from rank 0; the tests compare them with a single-process run
of the same model and data, computed here.

Tolerance: float32, every tensor within ``max|a - b| <= RTOL * max|b|`` (norm-wise relative,
RTOL: the table's ``(float32, "distributed")`` row, tests/cases.py) after 12 steps (15 for the
resumed runs). Cross-rank sums change the summation order, so results are not bitwise equal;
fully replicated parameters are.

Every scenario, and the single-process references, step through the suite's one training
loop (``driver.train``), fed by :func:`batch_grads` (a model's backward on a rank's share of
the global batch) or by :func:`placement_grads` (gradients assigned to DTensors).

A third launch (2 ranks, ``--mode triton``) repeats the FSDP2, placement, bias-correction and
int8 scenarios with ``fused=True`` under the Triton testing switch: the kernels step the local
shards (under Triton's interpreter) and must meet the same bound.

Run alone: ``pytest -m distributed tests/test_distributed.py``; a worker is this file run as a
script (``python tests/test_distributed.py --rank R --world-size W --port P --out DIR``).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cases import param_tol
from driver import assign, launch_ranks, rank_parser, train
from torch import nn

pytestmark = pytest.mark.distributed

RTOL = param_tol(torch.float32, "distributed").rtol
STEPS = 12
RESUME_STEPS = 3
EARLY_STEPS = 1  # bf16 momentum: compared tightly before rounding flips compound
GLOBAL_BATCH = 6  # divisible by 1, 2 and 3 ranks
HYPER = dict(lr=1e-2, weight_decay=0.1, foreach=False)  # the reference implementation
TIMEOUT = 240  # seconds per launch
#: the ``triton`` launch: fused=True, run by the Triton kernels under their interpreter
TRITON_HYPER = dict(lr=1e-2, weight_decay=0.1, fused=True)
TRITON_ENV = {"TRITON_INTERPRET": "1", "TORCHCAME_FUSED_BACKEND": "triton"}


# ------------------------------------------------------------------------- model and data


class Net(nn.Module):
    """Every layout the distributed step distinguishes, with uneven and empty FSDP2 shards.

    Under ``fully_shard`` (Shard(0)): ``fc1.weight`` (7, 12) is row-sharded and uneven on 2 and
    3 ranks, ``fc2.weight`` (2, 15) leaves rank 2 of 3 empty, ``batched`` (5, 7, 3) and ``conv``
    (3, 2, 2, 2) are sharded on a batch dim, biases and norms are sharded vectors.
    """

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 12)
        self.fc1 = nn.Linear(12, 7)
        self.batched = nn.Parameter(torch.randn(5, 7, 3) * 0.3)
        self.conv = nn.Conv2d(2, 3, 2)
        self.fc2 = nn.Linear(15 + 3, 2)
        self.norm = nn.LayerNorm(18)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)  # (B, T, 12)
        img = h[:, :8].reshape(-1, 2, 4, 12)[..., :4]  # (B', 2, 4, 4)
        conv = self.conv(img).mean(dim=(-1, -2))  # (B, 3)
        h = torch.tanh(self.fc1(h.mean(1)))
        h = torch.einsum("bi,kij->bkj", h, self.batched).flatten(1)
        return self.fc2(self.norm(torch.cat([h, conv], dim=1)))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, 11, (GLOBAL_BATCH, 8), generator=gen)
    target = torch.randn(GLOBAL_BATCH, 2, generator=gen)
    return idx, target


def loss_fn(model: nn.Module, idx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((model(idx) - target) ** 2).mean()


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups (decay for matrices, none for vectors), so a step has two groups."""
    named = list(model.named_parameters())
    return [
        {"params": [p for _, p in named if p.dim() >= 2]},
        {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]


def local_batch(step: int, rank: int, world: int):
    idx, target = batch(step)
    per = GLOBAL_BATCH // world
    return idx[rank * per : (rank + 1) * per], target[rank * per : (rank + 1) * per]


def full(t: torch.Tensor) -> torch.Tensor:
    # a copy: full_tensor() of a Replicate() DTensor may be its live local tensor
    return t.full_tensor().clone() if hasattr(t, "full_tensor") else t.detach().clone()


def snapshot(model: nn.Module, optim) -> dict:
    """Full parameters and full state keyed by parameter name (collective for DTensors)."""
    names = {p: n for n, p in model.named_parameters()}
    params = {n.removeprefix("module."): full(p.detach()) for p, n in names.items()}
    state = {}
    for p, n in names.items():
        for k, v in optim.state.get(p, {}).items():
            state[f"{n.removeprefix('module.')}.{k}"] = full(v)
    return {"params": params, "state": state}


# ----------------------------------------------------------------------- reference (single)


def train_single(steps: int, groups=None, **options):
    """One process, the whole global batch: ``(model, optimizer)`` after ``steps`` steps."""
    from torchcame import CAME

    model = make_net()
    optim = CAME((groups or param_groups)(model), **HYPER, **options)
    train(optim, steps, batch_grads(model))
    return model, optim


@functools.lru_cache(maxsize=4)
def reference_run(steps: int, bias_correction: bool = False, momentum_dtype=None,
                  groups=None) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same summation order on any machine
    try:
        extra = {} if momentum_dtype is None else {"momentum_dtype": momentum_dtype}
        model, optim = train_single(steps, groups, bias_correction=bias_correction, **extra)
        return snapshot(model, optim)
    finally:
        torch.set_num_threads(threads)


def max_rel_err(got: dict, ref: dict) -> dict[str, float]:
    assert set(got) == set(ref), (sorted(set(got) ^ set(ref)))
    out = {}
    for key, r in ref.items():
        g = got[key]
        assert g.shape == r.shape, (key, g.shape, r.shape)
        scale = r.abs().max().item() if r.numel() else 0.0
        err = (g.double() - r.double()).abs().max().item() if r.numel() else 0.0
        out[key] = err / scale if scale > 0 else err
    return out


def assert_close_rel(got: dict, ref: dict, rtol: float = RTOL) -> None:
    errors = max_rel_err(got, ref)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"{worst}: relative error {errors[worst]:.2e} > {rtol:.0e}"


# ---------------------------------------------------------------------------------- worker


def _fsdp_model(seed: int = 0, mesh=None, shard_dim: int = 0):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    def placement(param):  # FSDP2's shard_placement_fn; FSDP2 shards dims > 0 only evenly
        world = torch.distributed.get_world_size()
        even = param.dim() > shard_dim and param.shape[shard_dim] % world == 0
        return Shard(shard_dim if even else 0)

    kwargs = {"mesh": mesh} if shard_dim == 0 else {"mesh": mesh, "shard_placement_fn": placement}
    model = make_net(seed)
    fully_shard(model.fc1, **kwargs)
    fully_shard(model, **kwargs)
    return model


def batch_grads(model, rank: int = 0, world: int = 1):
    """``set_grads`` for ``driver.train``: backward of the loss on this rank's share of the
    step's global batch (the whole batch for one process)."""
    def set_grads(step: int) -> None:
        loss_fn(model, *local_batch(step, rank, world)).backward()
    return set_grads


def _train(model, optim, rank, world, steps, start=0):
    train(optim, steps, batch_grads(model, rank, world), start=start)


def _count_all_reduces(fn) -> tuple[int, int]:
    import torch.distributed as dist

    calls = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        fn()
    finally:
        dist.all_reduce = original
    return len(calls), sum(calls)


def _scenario_fsdp(rank, world, out: Path, save_ckpt: bool) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    from torchcame import CAME

    model = _fsdp_model()
    optim = CAME(param_groups(model), **HYPER)
    _train(model, optim, rank, world, STEPS - 1)
    # The last step counts the all-reduces optim.step() issues (FSDP2's all-gathers and
    # reduce-scatters happen in forward and backward).
    counted = []
    train(optim, 1, batch_grads(model, rank, world), start=STEPS - 1,
          step=lambda: counted.append(_count_all_reduces(optim.step)))
    (counts,) = counted
    snap = snapshot(model, optim)
    # a consolidated (full, rank 0) optimizer state dict, e.g. for a single-GPU export
    full_osd = get_optimizer_state_dict(
        model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if save_ckpt:
        dcp_save(model, optim, out / "ckpt")
    if rank == 0:
        snap["all_reduces"] = counts
        snap["full_osd_state"] = {
            f"{fqn}.{k}": v for fqn, entry in full_osd["state"].items() for k, v in entry.items()
        }
        torch.save(snap, out / f"fsdp_w{world}.pt")


def _scenario_resume(rank, world, out: Path, ckpt: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from torchcame import CAME

    model = _fsdp_model(seed=123)  # different init: everything must come from the checkpoint
    optim = CAME(param_groups(model), **{**HYPER, "lr": 0.5})
    osd = get_optimizer_state_dict(model, optim)  # DCP's zero-grad init step: must not move
    fresh = [
        (float(st["step"]), all(float(full(v).abs().max()) == 0 for k, v in st.items()
                                if k != "step" and v.numel()))
        for st in optim.state.values()
    ]
    sd = {"model": get_model_state_dict(model), "optim": osd}
    dcp.load(sd, checkpoint_id=str(ckpt))
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, optim, sd["optim"])
    _train(model, optim, rank, world, RESUME_STEPS, start=STEPS)
    snap = snapshot(model, optim)
    if rank == 0:
        snap["fresh_state"] = fresh
        snap["n_state"] = len(optim.state)
        torch.save(snap, out / f"resume_w{world}.pt")


def _scenario_skip_nonfinite(rank, world, out: Path) -> None:
    """skip_nonfinite under FSDP2: an inf on one rank's shard skips the group on all ranks."""
    from torchcame import CAME

    model = _fsdp_model()
    optim = CAME(param_groups(model), **HYPER, skip_nonfinite=True)
    before = {n: full(p.detach()) for n, p in model.named_parameters()}
    backward = batch_grads(model, rank, world)

    def grads_with_an_inf(step: int) -> None:
        backward(step)
        if rank == world - 1:
            model.fc1.weight.grad.to_local()[0, 0] = float("inf")

    train(optim, 1, grads_with_an_inf)  # matrices skipped everywhere, vectors stepped
    skipped = [g["skipped_steps"] for g in optim.param_groups]
    after = {n: full(p.detach()) for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"skipped": skipped, "unchanged": {
            n: (before[n].dim() >= 2, bool(torch.equal(before[n], after[n]))) for n in before}},
            out / f"skip_w{world}.pt")


def _scenario_bias_correction(rank, world, out: Path) -> None:
    """The opt-in bias correction under FSDP2."""
    from torchcame import CAME

    model = _fsdp_model()
    optim = CAME(param_groups(model), **HYPER, bias_correction=True)
    _train(model, optim, rank, world, STEPS)
    snap = snapshot(model, optim)
    if rank == 0:
        torch.save(snap, out / f"bias_correction_w{world}.pt")


def dcp_save(model, optim, path: Path) -> None:
    """Save model and optimizer with torch.distributed.checkpoint (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state_dict = {"model": get_model_state_dict(model),
                  "optim": get_optimizer_state_dict(model, optim)}
    dcp.save(state_dict, checkpoint_id=str(path))


def dcp_load(model, optim, path: Path) -> None:
    """Load a :func:`dcp_save` checkpoint into ``model`` and ``optim`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)}
    dcp.load(sd, checkpoint_id=str(path))
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, optim, sd["optim"])


def _scenario_bf16_momentum(rank, world, out: Path) -> None:
    """bf16 momentum under FSDP2, then a DCP save and a load into a fresh model/optimizer."""
    from torchcame import CAME

    model = _fsdp_model()
    optim = CAME(param_groups(model), **HYPER, momentum_dtype=torch.bfloat16)
    _train(model, optim, rank, world, EARLY_STEPS)
    early = snapshot(model, optim)
    _train(model, optim, rank, world, STEPS - EARLY_STEPS, start=EARLY_STEPS)
    snap = snapshot(model, optim)
    snap["early"] = early
    layouts = {type(st["exp_avg"]).__name__ + ":" + str(st["exp_avg"].dtype)
               for st in optim.state.values()}
    ckpt = out / "ckpt_bf16"
    dcp_save(model, optim, ckpt)
    model2 = _fsdp_model(seed=5)
    optim2 = CAME(param_groups(model2), **HYPER, momentum_dtype=torch.bfloat16)
    dcp_load(model2, optim2, ckpt)
    loaded = snapshot(model2, optim2)
    if rank == 0:
        snap["layouts"] = sorted(layouts)
        snap["reloaded_equal"] = all(torch.equal(loaded["state"][k], v)
                                     for k, v in snap["state"].items())
        snap["reloaded_dtypes"] = sorted({str(v.dtype) for k, v in loaded["state"].items()
                                          if k.endswith(".exp_avg")})
        torch.save(snap, out / f"bf16_momentum_w{world}.pt")


def int8_groups(model: nn.Module) -> list[dict]:
    """int8 momentum for every matrix (min_quantized_numel=0), with a block size that divides
    each one's dim-0 slice (12, 18 -> 6; 21 -> 7; 8 -> 4), as FSDP2 int8 requires; vectors
    keep float32 m."""
    named = dict(model.named_parameters())

    def pick(*names):
        return [p for n, p in named.items() if n.removeprefix("module.") in names]

    int8 = {"momentum_dtype": "int8", "min_quantized_numel": 0}
    return [
        {"params": pick("emb.weight", "fc1.weight", "fc2.weight"),
         "quantization_block_size": 6, **int8},
        {"params": pick("batched"), "quantization_block_size": 7, **int8},
        {"params": pick("conv.weight"), "quantization_block_size": 4, **int8},
        {"params": [p for p in named.values() if p.dim() < 2], "weight_decay": 0.0, **int8},
    ]


def reference_int8_run(steps: int) -> dict:
    return reference_run(steps, groups=int8_groups)


def _scenario_int8_momentum(rank, world, out: Path) -> None:
    """int8 momentum under FSDP2; DCP save (2 ranks) and load on 3 ranks; unaligned blocks."""
    from torchcame import CAME

    model = _fsdp_model()
    optim = CAME(int8_groups(model), **HYPER)
    _train(model, optim, rank, world, EARLY_STEPS)
    early = snapshot(model, optim)
    _train(model, optim, rank, world, STEPS - EARLY_STEPS, start=EARLY_STEPS)
    snap = snapshot(model, optim)
    snap["early"] = early
    snap["dtypes"] = sorted({str(st["exp_avg"].dtype) for st in optim.state.values()})
    saved = out.parent / "w2" / "ckpt_int8"
    if world == 2:
        dcp_save(model, optim, saved)
    elif saved.exists():  # resharded: 2 ranks -> this many
        model2 = _fsdp_model(seed=9)
        optim2 = CAME(int8_groups(model2), **HYPER)
        dcp_load(model2, optim2, saved)
        snap["loaded_from_w2"] = snapshot(model2, optim2)
    # a single-process int8 checkpoint (1-D scales) loads into FSDP2 int8 unchanged
    single, single_optim = train_single(EARLY_STEPS, int8_groups)
    model3 = _fsdp_model(seed=3)
    optim3 = CAME(int8_groups(model3), **HYPER)
    optim3.load_state_dict(single_optim.state_dict())
    loaded = snapshot(model3, optim3)["state"]
    single_state = snapshot(single, single_optim)["state"]
    snap["single_loaded_equal"] = sorted(
        k for k, v in single_state.items()
        if torch.equal(loaded[k].reshape(-1), v.reshape(-1)) and loaded[k].dtype == v.dtype)
    snap["single_keys"] = sorted(single_state)
    bad = _fsdp_model()
    groups = int8_groups(bad)
    groups[0]["quantization_block_size"] = 5  # 12 and 18 are not multiples of 5
    try:
        CAME(groups, **HYPER).init_state()
        snap["unaligned_error"] = None
    except NotImplementedError as err:
        snap["unaligned_error"] = str(err)
    try:  # loading a checkpoint into such a layout is refused the same way
        CAME(groups, **HYPER).load_state_dict(single_optim.state_dict())
        snap["unaligned_load_error"] = None
    except NotImplementedError as err:
        snap["unaligned_load_error"] = str(err)
    if rank == 0:
        torch.save(snap, out / f"int8_momentum_w{world}.pt")


def _scenario_fsdp_shard1(rank, world, out: Path) -> None:
    """FSDP2 with ``shard_placement_fn`` -> Shard(1): columns of matrices are sharded."""
    from torchcame import CAME

    model = _fsdp_model(shard_dim=1)
    optim = CAME(param_groups(model), **HYPER)
    _train(model, optim, rank, world, STEPS)
    snap = snapshot(model, optim)
    if rank == 0:
        snap["placements"] = str(model.fc1.weight.placements)
        torch.save(snap, out / f"fsdp_shard1_w{world}.pt")


def _scenario_hsdp(rank, world, out: Path) -> None:
    """HSDP: a 2-D mesh (replicate 1 x shard W), placements (Replicate(), Shard(0))."""
    from torch.distributed.tensor import init_device_mesh

    from torchcame import CAME

    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    model = _fsdp_model(mesh=mesh)
    optim = CAME(param_groups(model), **HYPER)
    _train(model, optim, rank, world, STEPS)
    snap = snapshot(model, optim)
    if rank == 0:
        snap["placements"] = str(model.fc1.weight.placements)
        torch.save(snap, out / f"hsdp_w{world}.pt")


def _scenario_from_single(rank, world, out: Path) -> None:
    """A single-process checkpoint (plain optimizer.state_dict()) loads into FSDP2's CAME."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from torchcame import CAME

    single, single_optim = train_single(STEPS)
    model = _fsdp_model(seed=123)
    optim = CAME(param_groups(model), **HYPER)
    set_model_state_dict(model, single.state_dict(),
                         options=StateDictOptions(full_state_dict=True))
    optim.load_state_dict(single_optim.state_dict())
    _train(model, optim, rank, world, RESUME_STEPS, start=STEPS)
    snap = snapshot(model, optim)
    if rank == 0:
        torch.save(snap, out / f"from_single_w{world}.pt")


def _scenario_placements(rank, world, out: Path) -> None:
    """Direct DTensors: Shard(0/1/2), Replicate on 2-D, 3-D and 1-D parameters."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    from torchcame import CAME

    mesh = init_device_mesh("cpu", (world,))
    cases = placement_cases()
    params = []
    for i, (shape, placement) in enumerate(cases.values()):
        full_p = placement_grad(shape, -1, i)  # the initial value
        placements = [Replicate()] if placement is None else [Shard(placement)]
        params.append(nn.Parameter(distribute_tensor(full_p, mesh, placements)))
    optim = CAME(params, **HYPER)
    train(optim, STEPS, placement_grads(
        params, lambda g, p: distribute_tensor(g, mesh, p.placements)))
    result = {name: full(p.detach()) for name, p in zip(cases, params)}
    for name, p in zip(cases, params):
        for k, v in optim.state[p].items():
            result[f"{name}.{k}"] = full(v)
    if rank == 0:
        torch.save(result, out / f"placements_w{world}.pt")


def _scenario_triton_fallback(rank, world, out: Path) -> None:
    """``fused=True`` with a float64 shard (which the kernels do not handle) beside a float32
    one in the same group: the float64 shard takes the reference phases, with a warning, and
    equals a ``foreach=False`` run bit for bit; the float32 one runs the kernels."""
    import warnings

    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from torchcame import CAME, _warnings

    mesh = init_device_mesh("cpu", (world,))
    result = {}
    for options in ({"fused": True}, {"foreach": False}):
        _warnings._warned.clear()
        params = [nn.Parameter(distribute_tensor(placement_grad((7, 5), -1, i).to(dtype), mesh,
                                                 [Shard(0)]))
                  for i, dtype in enumerate((torch.float64, torch.float32))]
        optim = CAME(params, lr=1e-2, weight_decay=0.1, maximize=True, **options)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(3):
                for i, p in enumerate(params):
                    p.grad = distribute_tensor(placement_grad((7, 5), step, i).to(p.dtype), mesh,
                                               [Shard(0)])
                optim.step()
        result[next(iter(options))] = {
            "params": [full(p.detach()) for p in params],
            "warnings": [str(w.message) for w in caught],
        }
    if rank == 0:
        torch.save(result, out / "fallback.pt")


def placement_cases() -> dict[str, tuple[tuple[int, ...], int | None]]:
    return {
        "rows": ((7, 5), 0),
        "cols": ((4, 7), 1),
        "rep": ((3, 4), None),
        "rows3d": ((2, 5, 4), 1),
        "cols3d": ((2, 4, 5), 2),
        "batch3d": ((5, 3, 2), 0),
        "vec": ((7,), 0),
        "tiny": ((1, 2), 1),  # empty column shards
    }


def placement_grad(shape, step: int, i: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10_000 * i + step + 1)
    return torch.randn(shape, generator=gen)


def placement_grads(params, place=lambda g, p: g):
    """``set_grads`` for ``driver.train``: each parameter's full :func:`placement_grad`,
    laid out by ``place(grad, param)`` (a DTensor like the parameter, or as it is)."""
    return assign(params, lambda step: [place(placement_grad(p.shape, step, i), p)
                                        for i, p in enumerate(params)])


def _scenario_errors(rank, world, out: Path) -> None:
    from torch.distributed.tensor import DTensor, Partial, Shard, init_device_mesh
    from torch.distributed.tensor.placement_types import _StridedShard

    from torchcame import CAME
    from torchcame.distributed import UnsupportedShardingError

    mesh = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    local = torch.randn(2, 3)
    cases = {
        "partial": DTensor.from_local(local, mesh, [Partial()]),
        # a strided shard not completed by a Shard of the same dim on a later mesh dim: the
        # local rows are not one box of the global tensor
        "strided": DTensor.from_local(local, mesh, [_StridedShard(0, split_factor=2)]),
        "strided_2d": DTensor.from_local(local, mesh2, [_StridedShard(0, split_factor=2),
                                                        Shard(1)]),
    }
    messages = {}
    for name, value in cases.items():
        p = nn.Parameter(value)
        p.grad = torch.zeros_like(p)
        try:  # refused when the optimizer is built: nothing exists yet
            CAME([p], lr=1e-3)
        except UnsupportedShardingError as err:
            messages[name] = str(err)
    # a bad second group: refused at construction too, before any state
    from torch.distributed.tensor import distribute_tensor

    good = nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
    bad = nn.Parameter(DTensor.from_local(local, mesh, [Partial()]))
    good.grad, bad.grad = torch.ones_like(good), torch.zeros_like(bad)
    try:
        CAME([{"params": [good]}, {"params": [bad]}], lr=1e-3)
    except UnsupportedShardingError:
        pass
    untouched = bool(full(good.detach()).eq(1).all()) and good.grad is not None
    # fused=True on CPU shards without the Triton switch: the reference math, with a warning
    import warnings

    from torchcame import _warnings

    _warnings._warned.clear()
    stepped = {}
    for fused in (True, False):
        p = nn.Parameter(distribute_tensor(torch.arange(12.0).reshape(4, 3), mesh, [Shard(0)]))
        p.grad = distribute_tensor(torch.linspace(-1, 1, 12).reshape(4, 3), mesh, [Shard(0)])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            CAME([p], lr=1e-2, fused=fused).step()
        stepped[fused] = (full(p.detach()), [str(w.message) for w in caught])
    if rank == 0:
        messages["_second_group_untouched"] = untouched
        messages["_fused_cpu"] = stepped
        torch.save(messages, out / f"errors_w{world}.pt")


def _scenario_count(rank, world, out: Path) -> None:
    """All-reduces of one CAME step for 3 and for 60 FSDP2-sharded parameters."""
    from torch.distributed.fsdp import fully_shard

    from torchcame import CAME

    counts = {}
    for layers in (1, 20):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(5, 5) for _ in range(layers)], nn.LayerNorm(5))
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        optim = CAME(model.parameters(), lr=1e-3)
        model(torch.randn(2, 5)).sum().backward()
        counts[len(list(model.parameters()))] = _count_all_reduces(optim.step)
    if rank == 0:
        torch.save(counts, out / f"count_w{world}.pt")


def _scenario_ddp(rank, world, out: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from torchcame import CAME

    model = DDP(make_net())
    optim = CAME(param_groups(model), **HYPER)
    _train(model, optim, rank, world, STEPS)
    snap = snapshot(model, optim)
    if rank == 0:
        torch.save(snap, out / f"ddp_w{world}.pt")


def _scenario_zero(rank, world, out: Path) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from torchcame import CAME

    model = DDP(make_net())
    groups = param_groups(model)
    optim = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=CAME, **HYPER)
    optim.add_param_group(groups[1])
    _train(model, optim, rank, world, STEPS)
    optim.consolidate_state_dict(to=0)
    params = {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()}
    if rank == 0:
        sd = optim.state_dict()
        ids = [p for g in groups for p in g["params"]]
        names = {id(p): n.removeprefix("module.") for n, p in model.named_parameters()}
        order = [names[id(p)] for p in ids]
        state = {}
        for idx, entry in sd["state"].items():
            for k, v in entry.items():
                state[f"{order[idx]}.{k}"] = v
        torch.save({"params": params, "state": state}, out / f"zero_w{world}.pt")


def worker(rank: int, world: int, port: int, out: Path, mode: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if mode == "main":
            _scenario_fsdp(rank, world, out, save_ckpt=world == 2)
            _scenario_placements(rank, world, out)
            _scenario_hsdp(rank, world, out)
            _scenario_fsdp_shard1(rank, world, out)
            _scenario_skip_nonfinite(rank, world, out)
            _scenario_bias_correction(rank, world, out)
            _scenario_bf16_momentum(rank, world, out)
            _scenario_int8_momentum(rank, world, out)
            _scenario_from_single(rank, world, out)
            _scenario_count(rank, world, out)
            _scenario_errors(rank, world, out)
            _scenario_ddp(rank, world, out)
            _scenario_zero(rank, world, out)
        if mode == "triton":  # fused=True: the Triton kernels on the local shards
            global HYPER
            HYPER = TRITON_HYPER
            from torchcame._impl import triton_kernels

            _scenario_fsdp(rank, world, out, save_ckpt=False)
            fsdp_launches = dict(triton_kernels.LAUNCHES)  # every parameter sharded
            _scenario_placements(rank, world, out)
            _scenario_fsdp_shard1(rank, world, out)
            _scenario_bias_correction(rank, world, out)
            _scenario_int8_momentum(rank, world, out)
            _scenario_triton_fallback(rank, world, out)
            if rank == 0:
                torch.save({"fsdp": fsdp_launches, "all": dict(triton_kernels.LAUNCHES)},
                           out / "launches.pt")
        if mode in ("resume", "main") and (out.parent / "w2" / "ckpt").exists() and world != 2:
            _scenario_resume(rank, world, out, out.parent / "w2" / "ckpt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------- launch


def launch(world: int, out: Path, mode: str = "main", env: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    launch_ranks(__file__, world, ["--out", str(out), "--mode", mode], TIMEOUT, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Launch 2 ranks (saves a DCP checkpoint), then 3 ranks, then 1 rank (resume only)."""
    root = tmp_path_factory.mktemp("dist")
    launch(2, root / "w2")
    launch(3, root / "w3")
    launch(1, root / "w1", mode="resume")
    return root


@pytest.fixture(scope="module")
def reference() -> dict:
    return reference_run(STEPS)


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


# ----------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_equals_single_process(runs, reference, world):
    got = _load(runs / f"w{world}" / f"fsdp_w{world}.pt")
    assert_close_rel(got["params"], reference["params"])
    assert_close_rel(got["state"], reference["state"])
    # get_optimizer_state_dict(full_state_dict=True) gathers the same full tensors
    assert set(got["full_osd_state"]) == set(got["state"])
    for key, value in got["full_osd_state"].items():
        assert torch.equal(value, got["state"][key]), key


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_shard1_equals_single_process(runs, reference, world):
    got = _load(runs / f"w{world}" / f"fsdp_shard1_w{world}.pt")
    assert got["placements"] == "(Shard(dim=1),)"
    assert_close_rel(got["params"], reference["params"])
    assert_close_rel(got["state"], reference["state"])


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_bias_correction_equals_single_process(runs, world):
    got = _load(runs / f"w{world}" / f"bias_correction_w{world}.pt")
    ref = reference_run(STEPS, bias_correction=True)
    assert_close_rel(got["params"], ref["params"])
    assert_close_rel(got["state"], ref["state"])


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_bf16_momentum_equals_single_process(runs, world):
    """bf16 momentum is elementwise storage, so FSDP2 computes the single process's step up
    to the float32 rounding of split sums. After one step that is checked tightly (a wrong
    rule -- e.g. updating with the rounded bf16 m instead of this step's float32 m -- is off
    by ~2^-9 of an update, > 1e-5 here); the stored m may be one bf16 rounding apart, since
    a split sum can move an m across a rounding boundary. CAME's instability term amplifies
    such flips, so the long run is checked loosely. DCP round-trips the bf16 state exactly."""
    got = _load(runs / f"w{world}" / f"bf16_momentum_w{world}.pt")
    early = reference_run(EARLY_STEPS, momentum_dtype=torch.bfloat16)
    assert_close_rel(got["early"]["params"], early["params"])
    momentum = [k for k in early["state"] if k.endswith(".exp_avg")]
    assert_close_rel({k: v for k, v in got["early"]["state"].items() if k not in momentum},
                     {k: v for k, v in early["state"].items() if k not in momentum})
    for key in momentum:  # equal, or one bf16 rounding apart
        got_m, ref_m = got["early"]["state"][key].float(), early["state"][key].float()
        assert ((got_m - ref_m).abs() <= 2**-8 * ref_m.abs() + 1e-30).all(), key
    assert got["layouts"] == ["DTensor:torch.bfloat16"]
    assert got["reloaded_equal"] and got["reloaded_dtypes"] == ["torch.bfloat16"]
    ref = reference_run(STEPS, momentum_dtype=torch.bfloat16)
    assert_close_rel(got["params"], ref["params"], rtol=1e-2)


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_int8_momentum_equals_single_process(runs, world):
    """int8 momentum under FSDP2 quantizes the same blocks as one process (each rank holds
    whole blocks): after a step, parameters and float32 statistics match tightly and codes
    may differ by one (a split sum moving a value across a rounding boundary); the long run
    loosely (CAME amplifies such flips). A DCP checkpoint of 2 ranks loads on 3 exactly."""
    got = _load(runs / f"w{world}" / f"int8_momentum_w{world}.pt")
    assert got["dtypes"] == ["torch.float32", "torch.int8"]  # vectors stay float32
    early = reference_int8_run(EARLY_STEPS)
    assert_close_rel(got["early"]["params"], early["params"])
    codes = [k for k in early["state"] if early["state"][k].dtype == torch.int8]
    assert len(codes) == 5
    floats = {k: v for k, v in early["state"].items() if k not in codes}
    assert_close_rel({k: v.reshape(-1) for k, v in got["early"]["state"].items() if k in floats},
                     {k: v.reshape(-1) for k, v in floats.items()})
    for key in codes:
        assert (got["early"]["state"][key].int() - early["state"][key].int()).abs().max() <= 1
    ref = reference_int8_run(STEPS)
    assert_close_rel(got["params"], ref["params"], rtol=1e-2)
    if world == 3:
        w2 = _load(runs / "w2" / "int8_momentum_w2.pt")
        loaded = got["loaded_from_w2"]
        for key, value in w2["state"].items():
            assert torch.equal(loaded["state"][key], value), key
        for key, value in w2["params"].items():
            assert torch.equal(loaded["params"][key], value), key
    assert "Shard(0)" in got["unaligned_error"] and "(12)" in got["unaligned_error"]
    assert "Shard(0)" in got["unaligned_load_error"]
    assert got["single_loaded_equal"] == got["single_keys"]


@pytest.mark.parametrize("world", [2, 3])
def test_skip_nonfinite_agrees_across_ranks(runs, world):
    got = _load(runs / f"w{world}" / f"skip_w{world}.pt")
    assert got["skipped"] == [1, 0]
    # the matrices' group was skipped (unchanged), the vectors' group stepped
    assert all(is_matrix == same for is_matrix, same in got["unchanged"].values()), got


@pytest.mark.parametrize("world", [2, 3])
def test_hsdp_equals_single_process(runs, reference, world):
    got = _load(runs / f"w{world}" / f"hsdp_w{world}.pt")
    assert got["placements"] == "(Replicate(), Shard(dim=0))"
    assert_close_rel(got["params"], reference["params"])
    assert_close_rel(got["state"], reference["state"])


@pytest.mark.parametrize("world", [2, 3])
def test_single_process_checkpoint_loads_into_fsdp2(runs, world):
    got = _load(runs / f"w{world}" / f"from_single_w{world}.pt")
    ref = reference_run(STEPS + RESUME_STEPS)
    assert_close_rel(got["params"], ref["params"])
    assert_close_rel(got["state"], ref["state"])


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_collectives_per_step(runs, world):
    calls, _ = _load(runs / f"w{world}" / f"fsdp_w{world}.pt")["all_reduces"]
    assert calls == 3  # three phases on a 1-D mesh, shared by both param groups
    counts = _load(runs / f"w{world}" / f"count_w{world}.pt")
    assert sorted(counts) == [4, 42]
    assert {calls for calls, _ in counts.values()} == {3}  # independent of the parameter count


@pytest.mark.parametrize("world", [2, 3])
def test_dtensor_placements_equal_single_process(runs, world):
    got = _load(runs / f"w{world}" / f"placements_w{world}.pt")
    _check_placements(got)


def _check_placements(got: dict, bitwise_replicated: bool = True) -> None:
    ref = {}
    from torchcame import CAME

    params = []
    for i, (shape, _) in enumerate(placement_cases().values()):
        params.append(nn.Parameter(placement_grad(shape, -1, i)))
    optim = CAME(params, **HYPER)
    train(optim, STEPS, placement_grads(params))
    for name, p in zip(placement_cases(), params):
        ref[name] = p.detach()
        for k, v in optim.state[p].items():
            ref[f"{name}.{k}"] = v
    assert_close_rel(got, ref)
    if bitwise_replicated:  # a replicated parameter takes the reference step on every rank
        assert torch.equal(got["rep"], ref["rep"])


# ------------------------------------------------- fused=True: Triton kernels on local shards


@pytest.fixture(scope="module")
def triton_runs(tmp_path_factory) -> Path:
    """2 ranks with ``fused=True`` and the Triton testing switch (the kernels under Triton's
    interpreter on CPU shards): FSDP2 Shard(0) and Shard(1), direct placements, bias
    correction and int8 momentum."""
    pytest.importorskip("triton", reason="triton is not installed (it is in the [dev] extra)")
    root = tmp_path_factory.mktemp("dist_triton")
    launch(2, root / "w2", mode="triton", env=TRITON_ENV)
    return root / "w2"


def test_triton_kernels_ran_on_the_local_shards(triton_runs):
    """Under FSDP2 (every parameter sharded) each step's passes over the matrices and the
    vectors ran as kernels, and no statistics launch ran: the sharded step reduces the sums
    across ranks between the passes instead. The other scenarios (direct placements, Shard(1),
    bias correction, int8) ran kernels too."""
    launches = _load(triton_runs / "launches.pt")
    fsdp, everything = launches["fsdp"], launches["all"]
    for name in ("pass1", "pass2", "pass3", "vector"):
        assert fsdp[name] >= STEPS and fsdp[name] % STEPS == 0, fsdp
    assert fsdp["update"] == fsdp["pass1"] + fsdp["vector"], fsdp
    assert "stat_ema" not in fsdp and "denom" not in fsdp, fsdp
    for name in ("pass1", "pass3", "vector", "update"):
        assert everything[name] >= fsdp[name] + 4 * STEPS, everything


def test_triton_fsdp2_equals_single_process(triton_runs, reference):
    got = _load(triton_runs / "fsdp_w2.pt")
    assert_close_rel(got["params"], reference["params"])
    assert_close_rel(got["state"], reference["state"])
    calls, _ = got["all_reduces"]
    assert calls == 3  # the same three reductions as the reference math's


def test_triton_fsdp2_shard1_equals_single_process(triton_runs, reference):
    got = _load(triton_runs / "fsdp_shard1_w2.pt")
    assert got["placements"] == "(Shard(dim=1),)"
    assert_close_rel(got["params"], reference["params"])
    assert_close_rel(got["state"], reference["state"])


def test_triton_placements_equal_single_process(triton_runs):
    _check_placements(_load(triton_runs / "placements_w2.pt"), bitwise_replicated=False)


def test_triton_bias_correction_equals_single_process(triton_runs):
    got = _load(triton_runs / "bias_correction_w2.pt")
    ref = reference_run(STEPS, bias_correction=True)
    assert_close_rel(got["params"], ref["params"])
    assert_close_rel(got["state"], ref["state"])


def test_triton_sharded_fallback_runs_the_reference_phases(triton_runs):
    got = _load(triton_runs / "fallback.pt")
    fused, reference = got["fused"], got["foreach"]
    assert torch.equal(fused["params"][0], reference["params"][0])  # float64: reference math
    assert fused["params"][0].dtype == torch.float64
    scale = reference["params"][1].abs().max()
    assert (fused["params"][1] - reference["params"][1]).abs().max() <= RTOL * scale
    assert any("does not handle torch.float64 parameters" in w for w in fused["warnings"])


def test_triton_int8_momentum_equals_single_process(triton_runs):
    """As the reference math's int8 test: tight after one step (codes at most one apart),
    loose after twelve."""
    got = _load(triton_runs / "int8_momentum_w2.pt")
    early = reference_int8_run(EARLY_STEPS)
    assert_close_rel(got["early"]["params"], early["params"])
    for key, value in early["state"].items():
        if value.dtype == torch.int8:
            assert (got["early"]["state"][key].int() - value.int()).abs().max() <= 1, key
        else:
            assert_close_rel({key: got["early"]["state"][key].reshape(-1)},
                             {key: value.reshape(-1)})
    assert_close_rel(got["params"], reference_int8_run(STEPS)["params"], rtol=1e-2)


@pytest.mark.parametrize("world", [2, 3])
def test_unsupported_layouts_raise(runs, world):
    messages = _load(runs / f"w{world}" / f"errors_w{world}.pt")
    assert messages.pop("_second_group_untouched") is True
    fused = messages.pop("_fused_cpu")  # {fused: (parameter after a step, warnings)}
    assert torch.equal(fused[True][0], fused[False][0])  # the reference math, bit for bit
    assert any("fused=True on DTensor" in w and "reference math" in w for w in fused[True][1])
    assert not any("fused" in w for w in fused[False][1])
    assert sorted(messages) == ["partial", "strided", "strided_2d"]
    for message in messages.values():
        assert "fully_shard" in message


def test_deepspeed_partitions_raise(monkeypatch):
    """ZeRO flat partitions without their map (all 1-D, stepped by DeepSpeed's ZeRO optimizer)
    and ZeRO-3 params (ds_id) raise, naming the helper; DeepSpeed merely imported does not
    (tests/test_deepspeed.py runs the real engine)."""
    import types

    from torchcame import CAME
    from torchcame.distributed import UnsupportedShardingError

    flat = nn.Parameter(torch.zeros(30))
    flat.grad = torch.ones(30)
    CAME([flat], lr=1e-3).step()  # without DeepSpeed a lone vector is a legitimate parameter
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    CAME([flat], lr=1e-3).step()  # imported (as some libraries do), but not stepping CAME
    zero = {"__name__": "deepspeed.runtime.zero.stage_1_and_2"}  # DeepSpeed's ZeRO-1/2 module
    exec("def _optimizer_step(optimizer):\n    optimizer.step()", zero)
    with pytest.raises(UnsupportedShardingError,
                       match="torchcame.integrations.deepspeed.initialize"):
        zero["_optimizer_step"](CAME([flat], lr=1e-3))
    matrix = nn.Parameter(torch.zeros(3, 4))
    matrix.grad = torch.ones(3, 4)
    matrix.ds_id = 7
    with pytest.raises(UnsupportedShardingError, match="ds_id.*deepspeed.initialize"):
        CAME([matrix], lr=1e-3).step()
    assert float(matrix.detach().abs().max()) == 0.0


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_equals_single_process(runs, reference, world):
    got = _load(runs / f"w{world}" / f"ddp_w{world}.pt")
    assert_close_rel(got["params"], reference["params"])
    assert_close_rel(got["state"], reference["state"])


@pytest.mark.parametrize("world", [2, 3])
def test_zero_redundancy_equals_single_process(runs, reference, world):
    got = _load(runs / f"w{world}" / f"zero_w{world}.pt")
    assert_close_rel(got["params"], reference["params"])
    assert_close_rel(got["state"], reference["state"])


@pytest.mark.parametrize("world", [1, 3])
def test_dcp_save_2_ranks_load_and_continue(runs, world):
    got = _load(runs / f"w{world}" / f"resume_w{world}.pt")
    # DCP's zero-gradient init step allocated zero state without counting a step
    assert got["fresh_state"] and all(step == 0.0 and zero for step, zero in got["fresh_state"])
    ref = reference_run(STEPS + RESUME_STEPS)
    assert_close_rel(got["params"], ref["params"])
    assert_close_rel(got["state"], ref["state"])


def test_gpt_fsdp_recipe_torchrun(tmp_path):
    """The GPT recipe under torchrun, 2 CPU procs (gloo, FSDP2), matches a lone process.

    Only 3 steps: CAME amplifies rounding differences over longer runs (docs/distributed.md).
    """
    pytest.importorskip("transformers")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    recipe = ["-m", "torchcame.recipes.gpt_fsdp", "--fsdp", "--steps", "3", "--n-layer", "1",
              "--max-bytes", "300000", "--log-every", "1"]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", *recipe, "--log-json", str(tmp_path / "two.json")]
    one = [sys.executable, *recipe, "--log-json", str(tmp_path / "one.json")]
    for cmd in (two, one):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    import json

    logs = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two")}
    assert logs["two"]["world_size"] == 2 and logs["two"]["backend"] == "gloo"
    assert logs["one"]["world_size"] == 1
    torch.testing.assert_close(torch.tensor(logs["two"]["losses"]),
                               torch.tensor(logs["one"]["losses"]), rtol=RTOL, atol=0.0)


if __name__ == "__main__":
    parser = rank_parser()
    parser.add_argument("--mode", default="main")
    a = parser.parse_args()
    worker(a.rank, a.world_size, a.port, a.out, a.mode)
    # Results are on disk. Leave without interpreter teardown: gloo (torch 2.13) sometimes
    # aborts a rank there after destroy_process_group ("terminate called without an active
    # exception"), as the torchrun recipe also found (torchcame.recipes.gpt_fsdp).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

"""CAME through DeepSpeed's own engine (ZeRO 1, 2 and 3) equals one process.

One launch of 2 CPU ranks (``DS_ACCELERATOR=cpu``, gloo, one OS process each) runs every
scenario through ``torchcame.integrations.deepspeed.initialize`` and DeepSpeed's
``engine.backward`` / ``engine.step`` / ``save_checkpoint`` / ``load_checkpoint``; each rank
saves its pieces of CAME's state and the full fp32 parameters
(``deepspeed.utils.safe_get_full_fp32_param``), and the tests compare them with plain PyTorch
CAME in this process (which never imports DeepSpeed).

The model's param groups are laid out so that DeepSpeed's partition boundaries cut rows in the
middle: ZeRO-1/2 split a 2-D weight (spanning both ranks) mid-row, a batch of matrices
``(3, 41, 6)`` inside its second matrix and mid-row, and a vector; ZeRO-3 splits every
parameter, several mid-row (``test_layout_cuts_rows``).

- fp32, stages 1, 2, 3: parameters and every state tensor within 1e-5 (norm-wise relative)
  of one process after 8 steps (different data per rank; the single process takes the global
  batch and clips the gradient norm to 1, as DeepSpeed does by default);
- bf16 (``"bf16": {"enabled": true}``; stage 1 with fp32 gradient accumulation, which runs
  DeepSpeed's ``BF16_Optimizer``): every rank
  takes the same batch, so the averaged bf16 gradients are the single process's exactly; the
  fp32 master weights are compared with one process keeping fp32 masters of a bf16 model;
- state bytes per rank <= 1.1 x (single process) / world + the single process's factored
  statistics (O(rows + cols));
- ``save_checkpoint`` at step 4 and ``load_checkpoint`` into a fresh engine: CAME's state
  bitwise equal after loading, and 4 more steps bitwise equal to the uninterrupted run
  (float32 and int8 momentum);
- plain ``deepspeed.initialize`` with CAME raises on the first step, naming the helper.

Skipped when DeepSpeed is not installed (``pip install 'torchcame[deepspeed]'``).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
from driver import exit_rank, launch_ranks, rank_parser
from test_flat_partition import CountAllReduce, assert_close_rel, rebuild
from torch import nn

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="DeepSpeed is not installed (pip install 'torchcame[deepspeed]')"),
]

WORLD = 2
STEPS = 8
SAVE_AT = 4
MICRO_BATCH = 3
HYPER = dict(lr=1e-2, weight_decay=0.1, foreach=False)
INT8 = dict(momentum_dtype="int8", quantization_block_size=8, min_quantized_numel=0)
CLIP = 1.0  # DeepSpeed's default gradient clipping (global norm); the reference clips alike
TIMEOUT = 420
STAGES = (1, 2, 3)


# ------------------------------------------------------------------------ model and data


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(7, 41)
        self.mix = nn.Parameter(torch.randn(3, 41, 6) * 0.2)  # a batch of matrices
        self.norm = nn.LayerNorm(18)
        self.fc2 = nn.Linear(18, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        h = torch.einsum("bi,kij->bkj", h, self.mix).flatten(1)
        return self.fc2(self.norm(h))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def param_groups(model: nn.Module, **options) -> list[dict]:
    """Three groups, so that each ZeRO-1/2 partition boundary cuts a different kind of tensor:
    the batched matrices alone, the two weights (fc1's spans both ranks), the vectors."""
    named = dict(model.named_parameters())
    return [{"params": [named["mix"]], **options},
            {"params": [named["fc1.weight"], named["fc2.weight"]], **options},
            {"params": [named[n] for n in ("fc1.bias", "norm.weight", "norm.bias", "fc2.bias")],
             "weight_decay": 0.0, **options}]


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (WORLD micro-batches)."""
    gen = torch.Generator().manual_seed(500 + step)
    return torch.randn(WORLD * MICRO_BATCH, 7, generator=gen), torch.randn(
        WORLD * MICRO_BATCH, 4, generator=gen)


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out.float() - target) ** 2).mean()


def ds_config(stage: int, bf16: bool = False) -> dict:
    config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1,
              "gradient_clipping": CLIP, "zero_optimization": {"stage": stage},
              "steps_per_print": 10**9}
    if bf16:
        config["bf16"] = {"enabled": True}
        if stage == 1:  # DeepSpeed's BF16_Optimizer (fp32 gradient accumulation)
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


# ------------------------------------------------------------------------------- worker


def _deepspeed():
    """DeepSpeed, with its shared-memory comm op (a ~2 minute C++ build) disabled."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # deepspeed.comm's package namespace has a `torch` attribute: fetch the module itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def _engine(stage: int, bf16: bool = False, **options):
    from torchcame import CAME
    from torchcame.integrations import deepspeed as came_deepspeed

    model = make_net()
    optimizer = CAME(param_groups(model, **options), **HYPER)
    engine, *_ = came_deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=ds_config(stage, bf16))
    return engine, optimizer


def _train(engine, optimizer, rank: int, start: int, stop: int,
           same_data: bool = False) -> list[int]:
    """Steps ``start .. stop - 1``; returns the all-reduces CAME itself issued in each."""
    calls: list[int] = []
    original = optimizer.step

    def counted_step(*args, **kwargs):  # DeepSpeed calls CAME.step once per param group
        with CountAllReduce() as counter:
            out = original(*args, **kwargs)
        calls.append(counter.count)
        return out

    optimizer.step = counted_step
    counts = []
    dtype = next(p for p in engine.module.parameters()).dtype
    try:
        for t in range(start, stop):
            x, y = batch(t)
            if not same_data:
                rows = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
                x, y = x[rows], y[rows]
            engine.backward(loss_fn(engine(x.to(dtype)), y))
            before = len(calls)
            engine.step()
            counts.append(sum(calls[before:]))
    finally:
        del optimizer.step
    return counts


def _snapshot(engine, optimizer) -> dict:
    """This rank's pieces of CAME's state, the full fp32 parameters, the state bytes."""
    from deepspeed.utils import safe_get_full_fp32_param

    from torchcame.integrations.deepspeed import partition_maps
    from torchcame.memory import optimizer_state_bytes

    pieces = []
    for flat, part in partition_maps(engine.optimizer, engine.module).items():
        states = optimizer.state.get(flat, {}).get("pieces", [])
        for piece, state in zip(part.pieces, states):
            pieces.append((part.params[piece.index].name, piece.start, piece.stop,
                           flat.detach()[piece.offset : piece.offset + piece.numel].clone(),
                           {k: v.clone() if isinstance(v, torch.Tensor) else v
                            for k, v in state.items()}))
    params = {}
    for n, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # None without ZeRO: the parameter itself
        params[n] = (p if full is None else full).detach().float().clone()
    return {"pieces": pieces, "params": params, "state_bytes": optimizer_state_bytes(optimizer)}


def _scenario_parity(rank: int, stage: int, bf16: bool = False) -> dict:
    engine, optimizer = _engine(stage, bf16)
    counts = _train(engine, optimizer, rank, 0, 1, same_data=bf16)
    early = _snapshot(engine, optimizer)
    counts += _train(engine, optimizer, rank, 1, STEPS, same_data=bf16)
    out = _snapshot(engine, optimizer)
    out.update(early=early, counts=counts, zero=type(engine.optimizer).__name__)
    return out


def _scenario_checkpoint(rank: int, stage: int, root: Path, **options) -> dict:
    """Save at SAVE_AT, continue to STEPS; a fresh engine loads and continues too."""
    ckpt = root / f"ckpt_{stage}_{'int8' if options else 'fp32'}"
    engine, optimizer = _engine(stage, **options)
    _train(engine, optimizer, rank, 0, SAVE_AT)
    saved = _snapshot(engine, optimizer)
    engine.save_checkpoint(str(ckpt), tag="step4")
    _train(engine, optimizer, rank, SAVE_AT, STEPS)
    straight = _snapshot(engine, optimizer)
    engine, optimizer = _engine(stage, **options)
    engine.load_checkpoint(str(ckpt), tag="step4")
    loaded = _snapshot(engine, optimizer)
    _train(engine, optimizer, rank, SAVE_AT, STEPS)
    resumed = _snapshot(engine, optimizer)
    return {"saved": saved, "loaded": loaded, "straight": straight, "resumed": resumed}


def _plain_engine():
    """CAME through plain ``deepspeed.initialize`` (ZeRO-2)."""
    from torchcame import CAME

    model = make_net()
    optimizer = CAME(param_groups(model), **HYPER)
    config = {**ds_config(2), "zero_allow_untested_optimizer": True}
    engine, *_ = _deepspeed().initialize(model=model, optimizer=optimizer, config=config)
    return engine, optimizer


def _scenario_plain_initialize(rank: int) -> dict:
    """Plain deepspeed.initialize with CAME: the first step raises, naming the helper; with
    ``attach(engine)`` before it, the steps are the helper's, bit for bit."""
    from torchcame.integrations.deepspeed import attach

    engine, optimizer = _plain_engine()
    x, y = batch(0)
    engine.backward(loss_fn(engine(x[:MICRO_BATCH]), y[:MICRO_BATCH]))
    error = ""
    try:
        engine.step()
    except NotImplementedError as exc:
        error = str(exc)
    engine, optimizer = _plain_engine()
    attach(engine)
    _train(engine, optimizer, rank, 0, 2)
    attached = _snapshot(engine, optimizer)
    engine, optimizer = _engine(2)
    _train(engine, optimizer, rank, 0, 2)
    return {"error": error, "attached": attached, "helper": _snapshot(engine, optimizer)}


def worker(rank: int, world: int, port: int, out: Path) -> None:
    import faulthandler

    faulthandler.dump_traceback_later(TIMEOUT - 60, exit=True)  # a hang shows where it is
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    deepspeed = _deepspeed()
    deepspeed.init_distributed(dist_backend="gloo")
    import torch.distributed as dist

    try:
        results = {"version": deepspeed.__version__}
        results[("fp32", 0)] = _scenario_parity(rank, 0)  # no ZeRO: CAME gets the parameters
        results[("bf16", 0)] = _scenario_parity(rank, 0, bf16=True)  # FP16_Optimizer, whole
        for stage in STAGES:
            results[("fp32", stage)] = _scenario_parity(rank, stage)
            results[("bf16", stage)] = _scenario_parity(rank, stage, bf16=True)
            results[("ckpt", stage)] = _scenario_checkpoint(rank, stage, out)
        results[("ckpt-int8", 2)] = _scenario_checkpoint(rank, 2, out, **INT8)
        results[("ckpt-int8", 3)] = _scenario_checkpoint(rank, 3, out, **INT8)
        results["plain"] = _scenario_plain_initialize(rank)
        torch.save(results, out / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


# -------------------------------------------------------------------------- references


def reference(steps: int, bf16: bool = False) -> tuple[dict, dict, object]:
    """One process: fp32 CAME on the global batch; with ``bf16``, a bf16 model whose fp32
    master copies (made from the bf16 weights) CAME steps, as DeepSpeed's mixed precision
    does, on the global batch (each rank gets all of it in the bf16 runs). One thread, as the
    ranks: bf16 reductions (LayerNorm's backward) round differently with more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference(steps, bf16)
    finally:
        torch.set_num_threads(threads)


def _reference(steps: int, bf16: bool) -> tuple[dict, dict, object]:
    from torchcame import CAME

    model = make_net()
    if not bf16:
        optimizer = CAME(param_groups(model), **HYPER)
        for t in range(steps):
            x, y = batch(t)
            loss_fn(model(x), y).backward()
            nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            optimizer.zero_grad()
        named = dict(model.named_parameters())
        return ({n: p.detach() for n, p in named.items()},
                {n: optimizer.state[p] for n, p in named.items()}, optimizer)
    model = model.to(torch.bfloat16)  # DeepSpeed's masters start from the bf16 weights
    masters = {n: p.detach().float().requires_grad_() for n, p in model.named_parameters()}
    optimizer = CAME(param_groups(_Holder(masters)), **HYPER)
    named = dict(model.named_parameters())
    for t in range(steps):
        x, y = batch(t)
        loss_fn(model(x.to(torch.bfloat16)), y).backward()
        for n, master in masters.items():
            master.grad = named[n].grad.float()
            named[n].grad = None
        nn.utils.clip_grad_norm_(list(masters.values()), CLIP)
        optimizer.step()
        with torch.no_grad():
            for n, master in masters.items():
                named[n].copy_(master)
    return ({n: p.detach() for n, p in masters.items()},
            {n: optimizer.state[p] for n, p in masters.items()}, optimizer)


class _Holder(nn.Module):
    """Parameters under the model's names, for :func:`param_groups`."""

    def __init__(self, tensors: dict) -> None:
        super().__init__()
        self._tensors = tensors

    def named_parameters(self, *args, **kwargs):
        return iter(self._tensors.items())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("deepspeed")
    launch_ranks(__file__, WORLD, ["--out", str(root)], TIMEOUT,
                 env={"DS_ACCELERATOR": "cpu"})
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _pieces(runs, key, part="final") -> list[tuple]:
    return [p for r in runs for p in (r[key] if part == "final" else r[key][part])["pieces"]]


# --------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("stage", STAGES)
def test_fp32_equals_single_process(runs, stage):
    ref_params, ref_states, _ = reference(STEPS)
    got, ref = rebuild(_pieces(runs, ("fp32", stage)), ref_params, ref_states)
    assert_close_rel(got, ref)
    for r in runs:  # the engine's own full fp32 parameters agree
        assert_close_rel(r[("fp32", stage)]["params"], ref_params)
    zero = {1: "DeepSpeedZeroOptimizer", 2: "DeepSpeedZeroOptimizer",
            3: "DeepSpeedZeroOptimizer_Stage3"}[stage]
    assert runs[0][("fp32", stage)]["zero"] == zero
    # at most 3 all-reduces per param group and step (phases with nothing to sum issue none)
    for r in runs:
        assert max(r[("fp32", stage)]["counts"]) <= 3 * 3


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_equals_single_process_with_fp32_masters(runs, stage):
    """bf16 mode: CAME steps DeepSpeed's fp32 master partitions. After one step the masters
    match one process tightly; later a master that lands next to a bf16 rounding boundary may
    round the other way in the bf16 model, so the 8-step run is compared at 1e-3."""
    zero = runs[0][("bf16", stage)]["zero"]
    assert zero == ("BF16_Optimizer" if stage == 1 else runs[0][("fp32", stage)]["zero"])
    ref_params, ref_states, _ = reference(1, bf16=True)
    got, ref = rebuild(_pieces(runs, ("bf16", stage), "early"), ref_params, ref_states)
    assert_close_rel(got, ref)
    ref_params, _, _ = reference(STEPS, bf16=True)
    for r in runs:
        assert_close_rel(r[("bf16", stage)]["params"], ref_params, rtol=1e-3)


@pytest.mark.parametrize("stage", STAGES)
def test_state_bytes_are_partitioned(runs, stage):
    """Per rank: at most 1.1 x the single process's state / world, plus the single process's
    factored statistics (O(rows + cols) per matrix)."""
    from torchcame.memory import optimizer_state_bytes

    _, ref_states, optimizer = reference(1)
    single = optimizer_state_bytes(optimizer)
    factored = sum(v.numel() * v.element_size() for s in ref_states.values()
                   for k, v in s.items() if k.startswith("exp_avg_") and k != "exp_avg_sq")
    momentum = sum(s["exp_avg"].numel() * s["exp_avg"].element_size() for s in ref_states.values())
    for r in runs:
        got = r[("fp32", stage)]
        assert 0 < got["state_bytes"] <= 1.1 * single / WORLD + factored
        # the O(numel) part alone: each rank keeps the momentum of its own elements only
        local = sum(s["exp_avg"].numel() * s["exp_avg"].element_size() for *_, s in got["pieces"])
        assert local <= 1.1 * momentum / WORLD


@pytest.mark.parametrize(("kind", "stage"), [("ckpt", s) for s in STAGES] + [
    ("ckpt-int8", 2), ("ckpt-int8", 3)])  # int8 at stage 1 runs stage 2's code
def test_checkpoint_round_trip_is_bitwise(runs, kind, stage):
    for r in runs:
        got = r[(kind, stage)]
        _assert_pieces_equal(got["loaded"]["pieces"], got["saved"]["pieces"])
        _assert_pieces_equal(got["resumed"]["pieces"], got["straight"]["pieces"])
        for name, value in got["straight"]["params"].items():
            assert torch.equal(got["resumed"]["params"][name], value), name
    if kind == "ckpt-int8":  # every matrix piece keeps int8 codes, vectors float32
        for r in runs:
            for name, _, _, _, state in r[(kind, stage)]["saved"]["pieces"]:
                matrix = name in ("mix", "fc1.weight", "fc2.weight")
                assert state["exp_avg"].dtype == (torch.int8 if matrix else torch.float32)


def _assert_pieces_equal(got: list, want: list) -> None:
    assert len(got) == len(want) and got
    for a, b in zip(got, want):
        assert a[:3] == b[:3]
        assert torch.equal(a[3], b[3]), a[:3]
        assert a[4].keys() == b[4].keys()
        for key, value in b[4].items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == a[4][key].dtype and torch.equal(a[4][key], value), key
            else:
                assert a[4][key] == value, key


def test_without_zero(runs):
    """Stage 0: DeepSpeed hands CAME the model's parameters (fp32) or per-parameter fp32
    copies (bf16, ``FP16_UnfusedOptimizer``): whole tensors, nothing to attach, and the plain
    step; the bf16 model's weights are the bf16 roundings of one process's masters."""
    ref_params, _, _ = reference(STEPS)
    for r in runs:
        got = r[("fp32", 0)]
        assert got["zero"] == "CAME" and not got["pieces"] and got["counts"] == [0] * STEPS
        assert_close_rel(got["params"], ref_params)
    ref_params, _, _ = reference(STEPS, bf16=True)
    for r in runs:
        got = r[("bf16", 0)]
        assert got["zero"] == "FP16_UnfusedOptimizer" and not got["pieces"]
        assert_close_rel(got["params"], {n: p.bfloat16().float() for n, p in ref_params.items()},
                         rtol=1e-2)


def test_plain_deepspeed_initialize_raises_naming_the_helper(runs):
    for r in runs:
        assert "torchcame.integrations.deepspeed.initialize" in r["plain"]["error"]


def test_attach_to_an_engine_built_elsewhere(runs):
    for r in runs:
        _assert_pieces_equal(r["plain"]["attached"]["pieces"], r["plain"]["helper"]["pieces"])


def test_layout_cuts_rows(runs):
    """What the parity tests claim to cover: DeepSpeed's boundaries cut rows mid-way in a 2-D
    weight spanning both ranks and in a batch of matrices (inside one matrix)."""
    shapes = {"mix": (3, 41, 6), "fc1.weight": (41, 7)}
    for stage in STAGES:
        cuts = {}
        for name, start, stop, _, _ in _pieces(runs, ("fp32", stage)):
            numel = math.prod(shapes.get(name, (1,)))
            if name in shapes and 0 < start:
                cuts.setdefault(name, set()).add(start)
            if name in shapes and stop < numel:
                cuts.setdefault(name, set()).add(stop)
        for name, shape in shapes.items():
            assert cuts.get(name), (stage, name)
            assert any(c % shape[-1] for c in cuts[name]), (stage, name)  # mid-row
        assert any(c % (41 * 6) for c in cuts["mix"])  # inside a matrix of the batch


def test_check_config_refuses_offload_and_elastic_checkpoints():
    from torchcame.distributed import UnsupportedShardingError
    from torchcame.integrations.deepspeed import check_config

    check_config(ds_config(2))
    for zero in ({"stage": 2, "offload_optimizer": {"device": "cpu"}},
                 {"stage": 3, "offload_optimizer": {"device": "nvme"}}):
        with pytest.raises(UnsupportedShardingError, match="offload_optimizer"):
            check_config({"zero_optimization": zero})
    with pytest.raises(UnsupportedShardingError, match="elastic_checkpoint"):
        check_config({"zero_optimization": {"stage": 1, "elastic_checkpoint": True}})


if __name__ == "__main__":
    a = rank_parser().parse_args()
    worker(a.rank, a.world_size, a.port, a.out)
    exit_rank()

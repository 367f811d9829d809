"""CAME inside torchtitan (issue #14): ``torchcame.integrations.torchtitan`` end to end.

The unit tests build :class:`CAMEOptimizersContainer` on a small module (one process). The
distributed tests train a tiny Llama 3 (torchtitan's ``debugmodel`` cut to 2 layers: dim 256,
vocab 2048, 2.8M parameters; seq_len 64, global batch 4, 6 steps, lr 1e-3 after a 1-step
warmup) with torchtitan's own ``Trainer``, on gloo process groups on CPU, one OS process per
rank, ``OMP_NUM_THREADS=1``:

- 1 rank (torchtitan wraps even one rank in FSDP2, on a 1-rank mesh), the reference;
- 2 ranks, FSDP2: the loss of every step within ``LOSS_RTOL`` (relative) of 1 rank, and the
  final parameters within ``PARAM_RTOL`` of 1 rank (``max|a - b| <= PARAM_RTOL * max|b|``
  per tensor). Float32 throughout (``mixed_precision_param="float32"``): the runs differ only
  in the order of the cross-rank sums (gradient reduce-scatter, CAME's all-reduces), and
  CAME amplifies such differences over steps (docs/distributed.md);
- 2 ranks resumed (a fresh ``Trainer``) from torchtitan's DCP checkpoint of step 3: steps 4-6,
  the final parameters and the optimizer state bitwise equal to the straight run;
- 2 ranks with ``momentum_dtype="int8"`` against 1 rank with it (``INT8_*`` tolerances);
- 4 ranks, FSDP2 + TP on a 2x2 mesh, against 1 rank (same tolerances).

The CPU shim lives here, never in the library: torchtitan 0.3 targets CUDA and a newer torch,
so the workers force its device to cpu (and stub its CUDA memory monitor), run FlexAttention
as dense masked SDPA (eager FlexAttention has no backward on CPU), make process-group
timeouts a no-op (torch 2.13 has no ``set_timeout``) and force FSDP SUM reductions (gloo has
no PREMUL_SUM). The tokenizer (torchtitan's wheel ships none) is a 256-token BPE trained here
with ``tokenizers``. All runs start from the same weights (the 1-rank run's, distributed to the
other layouts), since torchtitan's DTensor initialization is not layout-invariant on CPU.

Worker: ``python tests/test_torchtitan.py --rank R --world-size W --tp T --port P --out DIR
--mode MODE``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from driver import launch_ranks
from torch import nn

torchtitan = pytest.importorskip(
    "torchtitan", reason="torchtitan is not installed (pip install 'torchcame[torchtitan]')"
)

STEPS = 6
CKPT_STEP = 3  # the 2-rank run saves a checkpoint here; the resumed run starts from it
SEQ_LEN = 64
GLOBAL_BATCH = 4  # sequences per step, split over the data-parallel ranks
LR = 1e-3
LOSS_RTOL = 1e-5  # per-step loss, relative, float32 reduction-order changes
PARAM_RTOL = 1e-4  # final parameters, max|a - b| <= PARAM_RTOL * max|b| per tensor
INT8_LOSS_RTOL, INT8_PARAM_RTOL = 1e-3, 1e-2  # int8 momentum (test_distributed.py's 1e-2)
TIMEOUT = 300  # seconds per launch
ALL_REDUCES = {"fsdp": 3, "tp": 6}  # CAME's per step: 3 phases x the mesh dims that shard


# ------------------------------------------------------------------------- unit (1 process)


def _container(implementation: str = "for-loop", **kwargs):
    from torchtitan.components.optimizer import ParamGroupConfig

    from torchcame.integrations.torchtitan import CAMEOptimizersContainer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    config = CAMEOptimizersContainer.Config(
        implementation=implementation,
        param_groups=[
            ParamGroupConfig(pattern=r"^1\.", optimizer_name="CAME",
                             optimizer_kwargs={"lr": 1e-2, "weight_decay": 0.0}),
            ParamGroupConfig(pattern=r".*", optimizer_name="CAME",
                             optimizer_kwargs={"lr": 1e-2, "weight_decay": 0.1, **kwargs}),
        ],
    )
    return model, config.build(model_parts=[model])


def _train(model: nn.Module, container, steps: int) -> None:
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
        ((model(x) - y) ** 2).mean().backward()
        container.step()
        container.zero_grad()


def test_torchtitan_is_imported_only_on_request() -> None:
    """Nothing the package imports on its own imports the torchtitan module (static check)."""
    import ast

    import torchcame

    root = Path(torchcame.__file__).parent
    for path in root.rglob("*.py"):
        if path.name == "torchtitan.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [f"{node.module or ''}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            assert not any("torchtitan" in n for n in names), (path, names)


def test_factory_builds_came_from_optimizer_kwargs() -> None:
    from torchcame import CAME

    model, container = _container(betas=[0.8, 0.99, 0.999], eps=[1e-30, 1e-15],
                                  clip_threshold=2.0, momentum_dtype="bfloat16")
    (optim,) = container.optimizers
    assert isinstance(optim, CAME)
    norm, rest = optim.param_groups
    assert rest["betas"] == (0.8, 0.99, 0.999) and rest["eps"] == (1e-30, 1e-15)
    assert rest["clip_threshold"] == 2.0 and rest["momentum_dtype"] == "bfloat16"
    assert norm["weight_decay"] == 0.0 and rest["weight_decay"] == 0.1
    # the keys torchtitan injects into every group
    assert norm["param_names"] == ["1.weight", "1.bias"]
    assert rest["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert (rest["fused"], rest["foreach"]) == (False, False)  # "for-loop": the reference
    _train(model, container, 2)
    assert all(int(s["step"]) == 2 for s in optim.state.values())


@pytest.mark.parametrize("implementation,fused,foreach",
                         [("fused", True, False), ("foreach", False, True)])
def test_implementation_sets_came_flags(implementation, fused, foreach) -> None:
    _, container = _container(implementation)
    for group in container.optimizers[0].param_groups:
        assert (group["fused"], group["foreach"]) == (fused, foreach)


def test_other_optimizers_and_errors() -> None:
    from torchtitan.components.optimizer import ParamGroupConfig

    from torchcame.integrations.torchtitan import CAMEOptimizersContainer

    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    mixed = CAMEOptimizersContainer.Config(param_groups=[
        ParamGroupConfig(pattern=r"^1\.", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3}),
        ParamGroupConfig(pattern=r".*", optimizer_name="CAME", optimizer_kwargs={"lr": 1e-3}),
    ], implementation="for-loop").build(model_parts=[model])
    assert [type(o).__name__ for o in mixed.optimizers] == ["AdamW", "CAME"]
    with pytest.raises(NotImplementedError, match="Lion"):
        CAMEOptimizersContainer.Config(param_groups=[
            ParamGroupConfig(pattern=r".*", optimizer_name="Lion", optimizer_kwargs={"lr": 1})
        ]).build(model_parts=[model])
    with pytest.raises(ValueError, match="momentum_dtype"):
        CAMEOptimizersContainer.Config(param_groups=[
            ParamGroupConfig(pattern=r".*", optimizer_name="CAME", optimizer_kwargs={"lr": 1})
        ], implementation="fused_opt_states_bf16").build(model_parts=[model])
    with pytest.raises(ValueError, match="betas"):
        CAMEOptimizersContainer.Config(param_groups=[
            ParamGroupConfig(pattern=r".*", optimizer_name="CAME",
                             optimizer_kwargs={"lr": 1e-3, "betas": (0.9, 0.999)})
        ]).build(model_parts=[model])


def test_state_dict_of_fresh_optimizer_moves_nothing() -> None:
    """torchtitan's state_dict()/load_state_dict() initialize lazy state with a zero-gradient,
    lr=0 step; for CAME the container allocates the zero state instead: parameters, step and
    statistics stay as they were, and the trajectory equals one without the call."""
    model, container = _container(momentum_dtype="int8", min_quantized_numel=1,
                                  quantization_block_size=5)
    before = [p.detach().clone() for p in model.parameters()]
    flat = container.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    state = {k: v for k, v in flat.items() if k.startswith("state.")}
    assert len({k.rsplit(".", 1)[0] for k in state}) == 6  # every parameter has state
    for key, value in state.items():
        assert not value.any(), key  # step 0, zero statistics and momentum (codes and scales)
    _train(model, container, 3)

    ref_model, ref = _container(momentum_dtype="int8", min_quantized_numel=1,
                                quantization_block_size=5)
    _train(ref_model, ref, 3)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_state_dict_round_trip() -> None:
    """torchtitan's flat, FQN-keyed optimizer state dict loads into a fresh container (whose
    state it initializes exactly first) and training continues bitwise."""
    model, container = _container()
    _train(model, container, 2)
    flat = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
            for k, v in container.state_dict().items()}
    params = [p.detach().clone() for p in model.parameters()]

    resumed_model, resumed = _container()
    with torch.no_grad():
        for p, saved in zip(resumed_model.parameters(), params):
            p.copy_(saved)
    resumed.load_state_dict(flat)
    _train(model, container, 2)
    _train(resumed_model, resumed, 2)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        sa, sb = container.optimizers[0].state[a], resumed.optimizers[0].state[b]
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


# -------------------------------------------------------------------- the CPU shim (workers)


def _cpu_shim() -> None:
    """Make torchtitan 0.3 run on CPU with gloo and torch 2.13 (test-side only)."""
    import torch.nn.functional as F
    import torchtitan.tools.utils as tt_utils
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    tt_utils.device_type = "cpu"  # before the modules that import it by name
    tt_utils.device_module = torch.cpu

    import torchtitan.components.metrics as tt_metrics
    import torchtitan.distributed.fsdp as tt_fsdp
    import torchtitan.distributed.utils as tt_dist
    import torchtitan.models.common.attention as tt_attention
    from torch.distributed.fsdp import FSDPModule

    class CPUMemoryMonitor:
        device_name = "cpu"
        device_capacity_gib = 0.0

        def get_peak_stats(self):
            return tt_metrics.DeviceMemStats(0.0, 0.0, 0.0, 0.0, 0, 0)

        def reset_peak_stats(self) -> None:
            pass

    tt_metrics.build_device_memory_monitor = CPUMemoryMonitor
    tt_dist.set_pg_timeouts = lambda *args, **kwargs: None

    def dense_flex_attention(q, k, v, *, score_mod, block_mask, scale, enable_gqa, return_aux,
                             kernel_options):
        assert score_mod is None and not return_aux.lse
        mask = create_mask(block_mask.mask_mod, q.shape[0], 1, q.shape[-2], k.shape[-2],
                           device=q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                             enable_gqa=enable_gqa)
        return out, None

    tt_attention.FlexAttention.compiled_flex_attn = staticmethod(dense_flex_attention)
    tt_attention._compiled_create_block_mask = create_block_mask

    divide = tt_fsdp.disable_fsdp_gradient_division

    def sum_reductions(model: nn.Module) -> None:
        divide(model)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)

    tt_fsdp.disable_fsdp_gradient_division = sum_reductions


# ---------------------------------------------------------------------------- data, config

WORDS = ("the a an cat dog bird sat ran flew on under over mat log tree quickly slowly red "
         "green blue small big old new house river hill").split()


def corpus(lines: int = 400) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(lines):
        n = int(torch.randint(5, 14, (1,), generator=gen))
        out.append(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,),
                                                            generator=gen).tolist()) + ".")
    return out


def train_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(corpus(), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))


def _loader_cls():
    from torch.utils.data import IterableDataset
    from torchtitan.components.dataloader import ParallelAwareDataloader

    class Sequences(IterableDataset):
        """Step s uses sequences [s*G, (s+1)*G) of the tokenized corpus (G = global batch);
        data-parallel rank r of W takes its contiguous G/W of them."""

        def __init__(self, tokenizer, seq_len: int, rank: int, world: int, local: int):
            ids = [i for line in corpus() for i in tokenizer.encode(line)]
            n = len(ids) // (seq_len + 1)
            self.seqs = torch.tensor(ids[: n * (seq_len + 1)]).view(n, seq_len + 1)
            self.rank, self.world, self.local, self.seq_len = rank, world, local, seq_len

        def __iter__(self):
            step = 0
            while True:
                for j in range(self.local):
                    i = (step * self.local * self.world + self.rank * self.local + j)
                    seq = self.seqs[i % len(self.seqs)]
                    yield {"input": seq[:-1], "positions": torch.arange(self.seq_len)}, seq[1:]
                step += 1

    class TokensLoader(ParallelAwareDataloader):
        @dataclass(kw_only=True, slots=True)
        class Config(ParallelAwareDataloader.Config):
            pass

        def __init__(self, config, *, dp_world_size, dp_rank, tokenizer, seq_len,
                     local_batch_size, **kwargs):
            data = Sequences(tokenizer, seq_len, dp_rank, dp_world_size, local_batch_size)
            super().__init__(data, dp_rank=dp_rank, dp_world_size=dp_world_size,
                             batch_size=local_batch_size)

    return TokensLoader


def trainer_config(world: int, tp: int, out: Path, checkpoint: bool = False,
                   load_step: int = -1, **came_kwargs):
    """A tiny Llama 3 with CAME: torchtitan's debug config, 2 layers, float32, no AC."""
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.metrics import MetricsProcessor
    from torchtitan.components.optimizer import LRSchedulersContainer
    from torchtitan.components.validate import Validator
    from torchtitan.config import ParallelismConfig, TrainingConfig
    from torchtitan.models.llama3 import model_registry
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    from torchcame.integrations.torchtitan import default_came

    config = llama3_debugmodel()
    spec = model_registry("debugmodel")
    spec.model.layers = spec.model.layers[:2]
    config.model_spec = spec
    config.hf_assets_path = str(out.parent / "tokenizer")
    config.dump_folder = str(out)
    config.optimizer = default_came(lr=LR, weight_decay=0.1, implementation="for-loop",
                                    **came_kwargs)
    config.lr_scheduler = LRSchedulersContainer.Config(warmup_steps=1)
    config.training = TrainingConfig(local_batch_size=GLOBAL_BATCH // (world // tp),
                                     seq_len=SEQ_LEN, steps=STEPS,
                                     mixed_precision_param="float32",
                                     disable_cuda_graphs=True)
    config.parallelism = ParallelismConfig(tensor_parallel_degree=tp,
                                           spmd_backend="partial_dtensor")
    config.dataloader = _loader_cls().Config()
    config.checkpoint = CheckpointManager.Config(
        enable=checkpoint, folder="checkpoint", interval=CKPT_STEP,
        last_save_model_only=False, load_step=load_step,
    )
    config.validator = Validator.Config(enable=False)
    config.metrics = MetricsProcessor.Config(log_freq=1)
    config.activation_checkpoint = None
    config.debug.seed = 0
    return config


# --------------------------------------------------------------------------------- worker


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor().clone() if hasattr(t, "full_tensor") else t.detach().clone()


def _fresh_state_check(trainer) -> str:
    """torchtitan's state_dict() on the fresh optimizer: '' when nothing moved."""
    params = {n: full(p) for n, p in trainer.model_parts[0].named_parameters()}
    flat = trainer.optimizers.state_dict()
    moved = [n for n, p in trainer.model_parts[0].named_parameters()
             if not torch.equal(full(p), params[n])]
    nonzero = [k for k, v in flat.items()
               if k.startswith("state.") and bool(full(v).any())]
    grads = [n for n, p in trainer.model_parts[0].named_parameters() if p.grad is not None]
    return "; ".join(f"{what}: {names[:4]}" for what, names in
                     (("moved", moved), ("nonzero state", nonzero), ("grads", grads)) if names)


def _train_and_save(trainer, run: Path, rank: int, result: dict) -> None:
    """Train to the end; rank 0 saves the losses, full parameters and full CAME state."""
    import time

    import torch.distributed as dist

    model = trainer.model_parts[0]
    losses = {}
    log = trainer.metrics_processor.log

    def record(step, loss, *args, **kwargs):
        losses[step] = loss
        return log(step, loss, *args, **kwargs)

    trainer.metrics_processor.log = record
    all_reduces = []  # per optimizer step
    step = trainer.optimizers.step

    def counting_step(*args, **kwargs):
        calls = []
        original = dist.all_reduce

        def all_reduce(tensor, *a, **k):
            calls.append(tensor.numel())
            return original(tensor, *a, **k)

        dist.all_reduce = all_reduce
        try:
            return step(*args, **kwargs)
        finally:
            dist.all_reduce = original
            all_reduces.append(len(calls))

    trainer.optimizers.step = counting_step
    start = time.perf_counter()
    trainer.train()
    result["seconds"] = time.perf_counter() - start
    result["losses"] = losses
    result["all_reduces"] = all_reduces
    params = {n: full(p) for n, p in model.named_parameters()}
    state = {n: {k: full(v) for k, v in trainer.optimizers.optimizers[0].state[p].items()}
             for n, p in model.named_parameters()}
    trainer.close()
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        (run / "result.json").write_text(json.dumps(result))
        torch.save({"params": params, "state": state}, run / "final.pt")
    dist.barrier()


def worker(rank: int, world: int, tp: int, port: int, out: Path, mode: str) -> None:
    """``single``: 1 rank, saves the initial weights; ``fsdp``: 2 ranks, checkpoint at step 3,
    then a fresh trainer in the same processes resumes from it (``resume``); ``tp``: 2x2."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _cpu_shim()
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    dist.init_process_group("gloo", rank=rank, world_size=world)
    init = out / "init.pt"

    def start_from_init(trainer) -> None:  # the same initial weights in every layout
        weights = torch.load(init)
        with torch.no_grad():
            for n, p in trainer.model_parts[0].named_parameters():
                p.copy_(distribute_tensor(weights[n], p.device_mesh, p.placements))

    try:
        trainer = trainer_config(world, tp, out / mode, checkpoint=mode == "fsdp").build()
        model = trainer.model_parts[0]
        if mode == "single":
            torch.save({n: full(p) for n, p in model.named_parameters()}, init)
        start_from_init(trainer)
        result = {"placements": {n: str(getattr(p, "placements", None))
                                 for n, p in model.named_parameters()},
                  "fresh_state": _fresh_state_check(trainer)}
        _train_and_save(trainer, out / mode, rank, result)
        if mode == "fsdp":  # resume from torchtitan's checkpoint of step CKPT_STEP
            trainer = trainer_config(world, tp, out / mode, checkpoint=True,
                                     load_step=CKPT_STEP).build()
            _train_and_save(trainer, out / "resume", rank, {})
        if mode in ("single", "fsdp"):  # int8 momentum, as a TOML config would give it
            trainer = trainer_config(world, tp, out / f"{mode}_int8",
                                     momentum_dtype="int8").build()
            start_from_init(trainer)
            _train_and_save(trainer, out / f"{mode}_int8", rank, {})
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------- launch


def launch(world: int, tp: int, out: Path, mode: str) -> None:
    launch_ranks(__file__, world, ["--tp", str(tp), "--out", str(out), "--mode", mode],
                 TIMEOUT, env={"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """1 rank (the reference; saves the initial weights), then 2 ranks (save a checkpoint at
    step 3, then resume from it)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("torchtitan's models import triton, which is not installed")
    root = tmp_path_factory.mktemp("torchtitan")
    train_tokenizer(root / "tokenizer")
    launch(1, 1, root, "single")
    launch(2, 1, root, "fsdp")
    return root


def _result(root: Path, mode: str) -> tuple[dict, dict]:
    result = json.loads((root / mode / "result.json").read_text())
    return result, torch.load(root / mode / "final.pt")


def _assert_matches_single(root: Path, mode: str) -> None:
    ref, ref_final = _result(root, "single")
    got, got_final = _result(root, mode)
    assert ref["fresh_state"] == "" and got["fresh_state"] == "", (ref, got)
    assert sorted(got["losses"], key=int) == [str(s) for s in range(1, STEPS + 1)]
    # CAME's collectives: a constant number of all-reduces per optimizer step, one per phase
    # and mesh dim (FSDP2's own collectives are not all-reduces)
    assert got["all_reduces"] == [ALL_REDUCES[mode]] * STEPS
    for step, loss in ref["losses"].items():
        assert abs(got["losses"][step] - loss) <= LOSS_RTOL * abs(loss), (step, got, ref)
    for name, value in ref_final["params"].items():
        err = (got_final["params"][name] - value).abs().max()
        assert err <= PARAM_RTOL * value.abs().max(), (name, float(err))




@pytest.mark.distributed
@pytest.mark.slow
def test_torchtitan_fsdp2_2_ranks_equals_1_rank(runs) -> None:
    got, _ = _result(runs, "fsdp")
    assert set(got["placements"].values()) == {"(Shard(dim=0),)"}
    _assert_matches_single(runs, "fsdp")


@pytest.mark.distributed
@pytest.mark.slow
def test_torchtitan_checkpoint_resume_is_bitwise(runs) -> None:
    """torchtitan's DCP checkpoint of step 3 (CAME's state as DTensors, keyed by FQN),
    loaded by a fresh 2-rank trainer: steps 4-6 equal the straight run bitwise."""
    straight, straight_final = _result(runs, "fsdp")
    resumed, resumed_final = _result(runs, "resume")
    assert sorted(resumed["losses"], key=int) == [str(s) for s in range(CKPT_STEP + 1,
                                                                        STEPS + 1)]
    for step, loss in resumed["losses"].items():
        assert loss == straight["losses"][step], step
    for name, value in straight_final["params"].items():
        assert torch.equal(resumed_final["params"][name], value), name
    for name, entry in straight_final["state"].items():
        assert entry.keys() == resumed_final["state"][name].keys()
        for key, value in entry.items():
            assert torch.equal(resumed_final["state"][name][key], value), (name, key)
        assert int(entry["step"]) == STEPS


@pytest.mark.distributed
@pytest.mark.slow
def test_torchtitan_int8_momentum_2_ranks_equals_1_rank(runs) -> None:
    """``momentum_dtype="int8"`` in ``optimizer_kwargs`` (a string, as from a TOML config):
    every matrix keeps int8 codes (its FSDP2 row slices hold whole 256-element blocks), and
    the 2-rank run follows 1 rank within the long-run int8 tolerance of
    test_distributed.py (a split sum can move a code by one; CAME amplifies such flips)."""
    ref, ref_final = _result(runs, "single_int8")
    got, got_final = _result(runs, "fsdp_int8")
    assert got["all_reduces"] == [ALL_REDUCES["fsdp"]] * STEPS
    for name, value in ref_final["params"].items():
        dtype = torch.int8 if value.dim() == 2 else torch.float32
        assert ref_final["state"][name]["exp_avg"].dtype == dtype, name
        assert got_final["state"][name]["exp_avg"].dtype == dtype, name
        err = (got_final["params"][name] - value).abs().max()
        assert err <= INT8_PARAM_RTOL * value.abs().max(), (name, float(err))
    for step, loss in ref["losses"].items():
        assert abs(got["losses"][step] - loss) <= INT8_LOSS_RTOL * abs(loss), (step, got, ref)


@pytest.mark.distributed
@pytest.mark.slow
def test_torchtitan_fsdp2_tp_2x2_equals_1_rank(runs) -> None:
    """FSDP2 + tensor parallel on a 2x2 mesh (placements (_StridedShard(0), Shard(0)) and
    (Shard(0), Shard(1)), replicated norms), 4 ranks, against 1 rank."""
    launch(4, 2, runs, "tp")
    got, _ = _result(runs, "tp")
    assert any("_StridedShard" in p for p in got["placements"].values())
    _assert_matches_single(runs, "tp")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", required=True)
    args = parser.parse_args()
    worker(args.rank, args.world_size, args.tp, args.port, args.out, args.mode)


def test_bare_came_is_exact_under_torchtitans_state_init():
    """torchtitan's own zero-gradient ``init_optim_state`` on a bare CAME (no container)
    allocates zero state and counts no step."""
    utils = pytest.importorskip("torchtitan.components.optimizer.utils",
                                reason="torchtitan is not installed")
    from torchcame import CAME

    p = torch.nn.Parameter(torch.randn(4, 3))
    before = p.detach().clone()
    opt = CAME([p], lr=1e-2)
    utils.init_optim_state(opt)
    assert float(opt.state[p]["step"]) == 0.0
    assert torch.equal(opt.state[p]["exp_avg_sq_row"], torch.zeros(4))
    assert torch.equal(p.detach(), before)

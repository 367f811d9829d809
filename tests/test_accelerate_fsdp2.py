"""CAME under Accelerate's FSDP2 (``fsdp_version=2``) equals a single process (issue #14).

Two gloo ranks on CPU (one OS process each, ``OMP_NUM_THREADS=1``) run
``Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))`` and
``accelerator.prepare(model, CAME(...))`` on the model of ``tests/test_distributed.py`` (row-,
batch- and vector-sharded parameters, uneven shards), 12 steps, each rank on its half of the
global batch. Parameters and state must be within the tolerance of ``test_distributed.py``
(float32, ``max|a - b| <= 1e-5 * max|b|`` per tensor) of its single-process reference run.
``save_state`` after 6 steps and ``load_state`` then 6 more steps end bitwise where the
straight run does.

On CPU, accelerate 1.15 sets up FSDP only for GPU-like multi-process types; with
``DistributedType.MULTI_CPU`` it silently prepares DDP instead (the test checks that this
still happens, so the work-around below is known to be needed). Setting the state to FSDP
after constructing the ``Accelerator`` makes ``prepare`` apply ``fully_shard`` and swap the
optimizer's parameters for the DTensors.

Worker: ``python tests/test_accelerate_fsdp2.py --rank R --world-size W --port P --out DIR``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from driver import launch_ranks, rank_parser

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import (  # noqa: E402 - the shared model, data and reference run
    HYPER,
    STEPS,
    _count_all_reduces,
    assert_close_rel,
    local_batch,
    loss_fn,
    make_net,
    param_groups,
    reference_run,
    snapshot,
)

pytest.importorskip("accelerate", reason="accelerate is not installed")

TIMEOUT = 240  # seconds for the launch


def worker(rank: int, world: int, port: int, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    from torchcame import CAME

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    accelerator = Accelerator(fsdp_plugin=plugin, cpu=True)
    before = str(accelerator.distributed_type)
    # The work-around: on CPU accelerate chose MULTI_CPU (DDP) and ignored the plugin. Set
    # FSDP in the process-wide PartialState too: every later AcceleratorState() (prepare
    # builds one per optimizer) copies its distributed_type.
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin

    model = make_net()
    optim = CAME(param_groups(model), **HYPER)
    model, optim = accelerator.prepare(model, optim)
    result = {"distributed_type_before": before, "is_fsdp2": accelerator.is_fsdp2,
              "placements": {n: str(getattr(p, "placements", None))
                             for n, p in model.named_parameters()}}
    all_reduces = []
    for step in range(STEPS):
        if step == STEPS // 2:
            accelerator.save_state(str(out / "state"))
        idx, target = local_batch(step, rank, world)
        accelerator.backward(loss_fn(model, idx, target))
        count, _ = _count_all_reduces(optim.step)
        all_reduces.append(count)
        optim.zero_grad()
    result["all_reduces"] = all_reduces
    result["is_fsdp2_after_training"] = accelerator.is_fsdp2
    result.update(snapshot(model, optim.optimizer))
    # load_state of the middle checkpoint, then the second half again: the same end, bitwise
    accelerator.load_state(str(out / "state"))
    for step in range(STEPS // 2, STEPS):
        idx, target = local_batch(step, rank, world)
        accelerator.backward(loss_fn(model, idx, target))
        optim.step()
        optim.zero_grad()
    result["resumed"] = snapshot(model, optim.optimizer)
    if rank == 0:
        torch.save(result, out / "accelerate_fsdp2.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("accelerate_fsdp2")
    launch_ranks(__file__, 2, ["--out", str(out)], TIMEOUT, unset=("ACCELERATE_USE_FSDP",))
    return torch.load(out / "accelerate_fsdp2.pt", weights_only=False)


@pytest.mark.distributed
def test_accelerate_fsdp2_equals_single_process(run) -> None:
    # without the work-around accelerate would have prepared DDP on CPU
    assert run["distributed_type_before"] == "DistributedType.MULTI_CPU"
    assert run["is_fsdp2"] and run["is_fsdp2_after_training"]
    assert set(run["placements"].values()) == {"(Shard(dim=0),)"}
    assert run["all_reduces"] == [3] * STEPS  # CAME's, per step, as with plain FSDP2
    reference = reference_run(STEPS)
    assert_close_rel(run["params"], reference["params"])
    assert_close_rel(run["state"], reference["state"])


@pytest.mark.distributed
def test_accelerate_fsdp2_save_state_resumes_exactly(run) -> None:
    """``accelerator.save_state`` after 6 steps (CAME's sharded state through DCP), then
    ``load_state`` and the last 6 steps again: parameters and state bitwise equal."""
    for kind in ("params", "state"):
        assert run["resumed"][kind].keys() == run[kind].keys()
        for key, value in run[kind].items():
            assert torch.equal(run["resumed"][kind][key], value), key


if __name__ == "__main__":
    parser = rank_parser()
    args = parser.parse_args()
    worker(args.rank, args.world_size, args.port, args.out)

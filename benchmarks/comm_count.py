"""Count CAME's collectives and bytes per optimizer step under FSDP2, for GPT-2 124M shapes.

Command (2 CPU processes, gloo, real tensors; about a minute and ~3 GB of RAM)::

    python benchmarks/comm_count.py --world-size 2 \\
        --out benchmarks/results/distributed/comm_count.json

Each rank builds ``GPT2LMHeadModel(GPT2Config())`` (124M parameters, tied embeddings), applies
``fully_shard`` to every block and to the root, runs one forward/backward on a tiny batch and
then steps CAME with ``torch.distributed.all_reduce`` wrapped to count calls and bytes. It
does this for the usual two param groups (decay / no decay), for one group, and for a 1-block
model (to show the count does not depend on the number of parameters). FSDP2's own traffic
per step (all-gather of parameters in forward and backward, reduce-scatter of gradients) is
given for scale, computed from the sharded sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchcame.bench.timing import timed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _count(fn) -> tuple[int, int, float]:
    calls: list[int] = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        seconds = timed(fn)
    finally:
        dist.all_reduce = original
    return len(calls), sum(calls), seconds


def _expected_floats(model: torch.nn.Module) -> int:
    """Floats CAME all-reduces per step for Shard(0) parameters, from the shapes alone
    (the three phases of torchcame.distributed: for a row-sharded (n, m) matrix the column
    sums of G and of U (m each), sum r_old, sum G, sum u², sum R_old, sum U (1 each))."""
    total = 0
    for p in model.parameters():
        if p.dim() < 2 or p.dim() > 2:
            total += 1  # sum(u²) (vectors; 3-D/4-D sharded on a batch dim)
        else:
            total += 2 * p.shape[-1] + 5
    return total


def _run(n_layer: int, groups: str, world: int) -> dict:
    import transformers
    from torch.distributed.fsdp import fully_shard

    from torchcame import CAME

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=n_layer))
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    params = list(model.parameters())
    if groups == "two":
        param_groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
    else:
        param_groups = [{"params": params}]
    optim = CAME(param_groups, lr=2e-4)
    tokens = torch.randint(0, 50257, (1, 16))
    model(input_ids=tokens, labels=tokens).loss.backward()
    calls, nbytes, seconds = _count(optim.step)
    n_params = sum(p.numel() for p in params)
    sharded_bytes = sum(p.to_local().numel() * 4 for p in params) * world  # = padded-free numel
    return {
        "n_layer": n_layer,
        "param_groups": len(param_groups),
        "parameter_tensors": len(params),
        "parameters": n_params,
        "came_all_reduces_per_step": calls,
        "came_bytes_all_reduced_per_step": nbytes,
        "came_bytes_expected_from_shapes": 4 * _expected_floats(model),
        "came_step_seconds": round(seconds, 3),
        "fsdp_reduce_scatter_bytes_per_step": sharded_bytes,
        "fsdp_all_gather_bytes_per_step": 2 * sharded_bytes,
    }


def _worker(rank: int, world: int, port: int, out: str | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = [_run(12, "two", world), _run(12, "one", world), _run(1, "two", world)]
        if rank == 0:
            result = {"world_size": world, "backend": "gloo", "torch": torch.__version__,
                      "rows": rows}
            print(json.dumps(result, indent=1))
            if out:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                Path(out).write_text(json.dumps(result, indent=1) + "\n")
            print(_markdown(rows))
    finally:
        dist.destroy_process_group()


def _markdown(rows: list[dict]) -> str:
    lines = [
        "| GPT-2 blocks | param groups | tensors | CAME all-reduces/step | CAME bytes/step "
        "| FSDP2 reduce-scatter bytes/step | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["came_bytes_all_reduced_per_step"] / r["fsdp_reduce_scatter_bytes_per_step"]
        lines.append(
            f"| {r['n_layer']} | {r['param_groups']} | {r['parameter_tensors']} | "
            f"{r['came_all_reduces_per_step']} | {r['came_bytes_all_reduced_per_step']:,} | "
            f"{r['fsdp_reduce_scatter_bytes_per_step']:,} | {ratio:.2%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(args.world_size, _free_port(), args.out), nprocs=args.world_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())

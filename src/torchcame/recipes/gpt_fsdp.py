"""Distributed GPT-2 training with CAME under FSDP2 (or DDP): one code path, CPU and CUDA.

Commands (the same script on any device; gloo on CPU, nccl on CUDA)::

    torchrun --nproc-per-node 2 -m torchcame.recipes.gpt_fsdp --fsdp          # CPU: 2 procs
    torchrun --nproc-per-node 8 -m torchcame.recipes.gpt_fsdp --fsdp --device cuda \\
        --n-layer 12 --d-model 768 --n-head 12 --seq-len 1024 --batch-size 64 --bf16
    python -m torchcame.recipes.gpt_fsdp --fsdp                                 # 1 process

A tiny GPT-2 (``transformers.GPT2Config``, byte vocabulary, built from the config, never
downloaded) is trained on the byte corpus of :mod:`torchcame.recipes.data` (default: this
interpreter's standard library). Every rank draws the same global batch and keeps its slice,
so the losses of a run do not depend on the number of processes (CAME's distributed step is
exact): compare ``--nproc-per-node 1`` and ``2``. Rank 0 prints the loss and can write a JSON
log (``--log-json``). ``--checkpoint DIR`` saves a DCP checkpoint at the end, and
``--resume DIR --steps N`` continues one to step N at any world size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from .distributed import all_reduce_mean, cleanup, init_distributed, local_batch, shard_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard (default: DDP)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (all ranks)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 disables")
    p.add_argument("--bf16", action="store_true", help="FSDP2 bf16 compute (fp32 optimizer)")
    p.add_argument("--data", default=None, help="text file or folder (default: stdlib .py)")
    p.add_argument("--max-bytes", type=int, default=2_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--log-json", type=Path, default=None, help="write losses as JSON (rank 0)")
    p.add_argument("--checkpoint", type=Path, default=None, help="DCP checkpoint dir at the end")
    p.add_argument("--resume", type=Path, default=None,
                   help="DCP checkpoint to continue from (saved at any world size)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    return p


def model_from_args(args: argparse.Namespace):
    from .train import LMConfig, build_model

    cfg = LMConfig(task="gpt", n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head,
                   seq_len=args.seq_len)
    torch.manual_seed(args.seed)  # same init on every rank; fully_shard keeps each rank's part
    return build_model(cfg)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _resume(model: torch.nn.Module, optim: torch.optim.Optimizer, path: Path) -> int:
    """Load model and CAME state from a DCP checkpoint (any world size); the step reached."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optim.init_state()  # zero state to load into, without a CAME step
    model_sd, optim_sd = get_state_dict(model, optim)
    progress = {"step": torch.tensor(0)}
    dcp.load({"model": model_sd, "optim": optim_sd, "progress": progress},
             checkpoint_id=str(path))
    set_state_dict(model, optim, model_state_dict=model_sd, optim_state_dict=optim_sd)
    return int(progress["step"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    from torchcame import CAME

    from .data import BatchSampler, load_corpus

    ctx = init_distributed(args.device)
    try:
        model = model_from_args(args).to(ctx.device)
        model = shard_model(model, model.transformer.h, ctx, fsdp=args.fsdp,
                            param_dtype=torch.bfloat16 if args.bf16 else None)
        optim = CAME(_param_groups(model, args.weight_decay), lr=args.lr)
        start_step = _resume(model, optim, args.resume) if args.resume else 0

        def schedule(step: int) -> float:
            step += start_step
            if step < args.warmup:
                return (step + 1) / args.warmup
            progress = (step - args.warmup) / max(1, args.steps - args.warmup)
            return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(optim, schedule)
        corpus = load_corpus(args.data, max_bytes=args.max_bytes)
        sampler = BatchSampler(corpus.train, args.batch_size, args.seq_len + 1, seed=args.seed)
        for _ in range(start_step):  # the batches the checkpointed run already used
            next(sampler)
        if ctx.is_main:
            n_params = sum(p.numel() for p in model.parameters())
            print(f"world {ctx.world_size} backend {ctx.backend} device {ctx.device} "
                  f"{'FSDP2' if args.fsdp else 'DDP'}; {n_params / 1e6:.2f}M params; "
                  f"corpus {corpus.name}: {corpus.train.numel()} train bytes", flush=True)
        losses, start = [], time.perf_counter()
        for step in range(start_step, args.steps):
            tokens = local_batch(next(sampler), ctx).to(ctx.device)
            logits = model(input_ids=tokens[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
            )
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optim.step()
            optim.zero_grad(set_to_none=True)
            sched.step()
            global_loss = float(all_reduce_mean(loss))
            losses.append(global_loss)
            if ctx.is_main and (step % args.log_every == 0 or step == args.steps - 1):
                print(f"step {step:4d}  loss {global_loss:.6f}  "
                      f"{(time.perf_counter() - start) / (step + 1 - start_step):.3f} s/step",
                      flush=True)
        if args.checkpoint is not None:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(model, optim)
            dcp.save({"model": model_sd, "optim": optim_sd,
                      "progress": {"step": torch.tensor(args.steps)}},
                     checkpoint_id=str(args.checkpoint))
        if ctx.is_main and args.log_json is not None:
            args.log_json.parent.mkdir(parents=True, exist_ok=True)
            args.log_json.write_text(json.dumps({
                "world_size": ctx.world_size, "backend": ctx.backend, "device": str(ctx.device),
                "fsdp": args.fsdp, "args": {k: str(v) for k, v in vars(args).items()},
                "losses": losses, "seconds": time.perf_counter() - start,
            }, indent=1))
        if ctx.world_size > 1:
            # every rank done before any tears gloo down: without it a rank leaving first
            # sometimes aborts the other ("terminate called without an active exception")
            torch.distributed.barrier()
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # The run is finished and its outputs written. Leave without the interpreter's
        # teardown: with gloo (torch 2.13) it intermittently aborts a rank after the process
        # group is destroyed ("terminate called without an active exception").
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)

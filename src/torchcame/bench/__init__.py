"""``torchcame bench``: step time and memory of CAME's paths against its peers.

Run ``torchcame bench`` (GPT-2 124M, ViT-B/16 and one big matrix; a few minutes on a small
CPU) or ``torchcame bench --quick`` (a tiny set, seconds). See :mod:`.core` for what is
measured and how.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from .core import candidates, format_table, plot, run_bench, run_set, write_json
from .shapes import PARAM_SETS, param_shapes

__all__ = [
    "add_bench_arguments",
    "run_bench_cli",
    "run_bench",
    "run_set",
    "candidates",
    "format_table",
    "PARAM_SETS",
    "param_shapes",
]

DEFAULT_SETS = ["gpt2-124m", "vit-b16", "big-matrix"]


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``torchcame bench``."""
    parser.add_argument("--sets", default=",".join(DEFAULT_SETS),
                        help=f"comma-separated parameter sets, from {sorted(PARAM_SETS)} "
                        "(default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="the tiny set, 3 rounds, 1 warm-up step (for CI; seconds)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds, each stepping every optimizer once (default 7)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per optimizer after the first (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads before running (default: torch's)")
    parser.add_argument("--only", default=None,
                        help="comma-separated optimizer names to run (AdamW fused is always "
                        "included as the yardstick)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the torch.compile variant of the fused CAME step "
                        "(compiles once per shape; minutes on CPU)")
    parser.add_argument("--out", default="torchcame-report/bench.json",
                        help="JSON output path (default: %(default)s; the committed results "
                        "under benchmarks/results/bench/ name theirs explicitly)")
    parser.add_argument("--png", default=None, help="also write a bar chart to this path")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def run_bench_cli(args: argparse.Namespace) -> int:
    """Entry point of ``torchcame bench``."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("torchcame bench: --device cuda requested but CUDA is not available",
              file=sys.stderr)
        return 2
    sets = ["tiny"] if args.quick else [s for s in args.sets.split(",") if s]
    for name in sets:
        if name not in PARAM_SETS:
            print(f"torchcame bench: unknown set {name!r}; known: {sorted(PARAM_SETS)}",
                  file=sys.stderr)
            return 2
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    names = None
    if args.only:
        names = sorted({*args.only.split(","), "AdamW fused"})
    command = "torchcame bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if len(sys.argv) > 1 and sys.argv[1] == "bench" else None
    report = run_bench(sets, device=args.device, rounds=rounds, warmup=warmup,
                       with_compile=args.compile, names=names,
                       progress=not args.no_progress, command=command)
    print(format_table(report))
    if args.out:
        write_json(report, args.out)
        print(f"wrote {os.path.relpath(args.out)}")
    if args.png:
        plot(report, args.png)
        print(f"wrote {os.path.relpath(args.png)}")
    return 0

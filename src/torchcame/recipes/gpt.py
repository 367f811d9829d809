"""GPT-2 causal language modelling: CAME vs AdamW vs Adafactor (and LAMB) on bytes.

Run ``python -m torchcame.recipes.gpt --help``. Defaults: a 2-layer GPT-2 (d_model 128,
4 heads, context 128, ~0.45 M parameters, byte vocabulary) trained for 500 steps of
16 × 128 tokens on this interpreter's standard library, warmup 10% then cosine decay to 10%,
gradient clipping 1.0 for every optimizer, no weight decay. Writes a report folder.
"""

from __future__ import annotations

import argparse
import sys

from .report import default_out_dir
from .train import LMConfig, add_common_args, config_from_args, run_and_report, set_threads

DEFAULTS = LMConfig(task="gpt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m torchcame.recipes.gpt",
        description="Train a small GPT-2 on bytes with several optimizers and compare them.",
    )
    add_common_args(parser, DEFAULTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_threads(args.threads)
    cfg = config_from_args(args, "gpt")
    out = args.out or default_out_dir("gpt")
    run_and_report(
        cfg,
        title="GPT-2 (causal LM, bytes): optimizer comparison",
        out=out,
        progress=not args.no_progress,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

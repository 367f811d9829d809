"""BERT masked language modelling: CAME vs AdamW vs Adafactor (and LAMB) on bytes.

Run ``python -m torchcame.recipes.bert --help``. ``BertForMaskedLM`` built from a
``BertConfig`` (2 layers, d_model 128, 4 heads, context 128 = [CLS] + 126 bytes + [SEP]),
vocabulary of 256 bytes plus [PAD] [MASK] [CLS] [SEP]; 15% of the byte positions are chosen,
of which 80% become [MASK], 10% a random byte, 10% stay; the loss is over chosen positions.
Same schedule and options as the GPT recipe.
"""

from __future__ import annotations

import argparse
import sys

from .report import default_out_dir
from .train import LMConfig, add_common_args, config_from_args, run_and_report, set_threads

DEFAULTS = LMConfig(task="bert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m torchcame.recipes.bert",
        description="Train a small BERT (masked LM on bytes) with several optimizers.",
    )
    add_common_args(parser, DEFAULTS)
    parser.add_argument(
        "--mask-prob",
        type=float,
        default=DEFAULTS.mask_prob,
        help="share of byte positions chosen for prediction",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_threads(args.threads)
    cfg = config_from_args(args, "bert")
    cfg.mask_prob = args.mask_prob
    out = args.out or default_out_dir("bert")
    run_and_report(
        cfg,
        title="BERT (masked LM, bytes): optimizer comparison",
        out=out,
        progress=not args.no_progress,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

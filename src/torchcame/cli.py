"""The ``torchcame`` command line: ``torchcame demo`` and ``torchcame bench``."""

from __future__ import annotations

import argparse
import sys


def _add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    """``torchcame demo``: GPT-2 with CAME, AdamW and Adafactor; writes a report folder."""
    from .recipes.demo import add_demo_arguments, run_demo

    demo = subparsers.add_parser(
        "demo",
        help="train a small GPT-2 with CAME, AdamW and Adafactor and write a report (1-2 min)",
        description="Train a small GPT-2 on this Python's standard library (bytes) with CAME, "
        "AdamW and Adafactor; print the comparison and write report.md, loss.png, results.json.",
    )
    add_demo_arguments(demo)
    demo.set_defaults(handler=run_demo)


def _add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    """``torchcame bench``: step time and memory of CAME's paths, came-pytorch, AdamW, Adafactor."""
    from .bench import add_bench_arguments, run_bench_cli

    bench = subparsers.add_parser(
        "bench",
        help="time optimizer steps (CAME paths vs came-pytorch, AdamW, Adafactor) and memory",
        description="Step time (median of interleaved rounds, ratio to fused AdamW and to a "
        "memory-bandwidth floor), optimizer state bytes and extra step memory on named "
        "parameter sets; prints a table and writes JSON.",
    )
    add_bench_arguments(bench)
    bench.set_defaults(handler=run_bench_cli)


# Each subcommand adds itself with an ``_add_<name>_parser(subparsers)`` function that calls
# ``set_defaults(handler=fn)``; ``main`` calls ``args.handler(args)``.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchcame", description="CAME optimizer for PyTorch: demo and benchmarks."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="{demo,bench}")
    _add_demo_parser(subparsers)
    _add_bench_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if getattr(args, "handler", None) is not None:
        return int(args.handler(args) or 0)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``torchcame`` command line: ``torchcame demo`` and ``torchcame bench``."""

from __future__ import annotations

import argparse
import sys


def _add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    """``torchcame demo``: GPT-2 with CAME, AdamW and Adafactor; writes a report folder."""
    from .recipes.demo import add_demo_arguments, run_demo

    demo = subparsers.add_parser(
        "demo",
        help="train a small GPT-2 with CAME, AdamW and Adafactor and write a report (~3 min)",
        description="Train a small GPT-2 on this Python's standard library (bytes) with CAME, "
        "AdamW and Adafactor; print the comparison and write report.md, loss.png, results.json.",
    )
    add_demo_arguments(demo)
    demo.set_defaults(handler=run_demo)


# Each subcommand adds itself with an ``_add_<name>_parser(subparsers)`` function that calls
# ``set_defaults(handler=fn)``; ``main`` calls ``args.handler(args)``.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchcame", description="CAME optimizer for PyTorch: demo and benchmarks."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="{demo,bench}")
    _add_demo_parser(subparsers)
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

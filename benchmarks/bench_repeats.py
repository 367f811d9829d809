"""Fused CAME against fused AdamW, the whole interleaved bench repeated: one noisy machine's spread.

One ``torchcame bench`` run already steps the candidates in turn and quotes the median of
per-round ratios, but on a shared VM whose host changes its memory bandwidth from minute to
minute (the triad probe has read 45-73 GB/s on the same 2 cores), one run is not the
machine's answer. This script runs the bench ``--repeats`` times back to back, keeps every
run's JSON, and summarizes per set: each run's ratio (median of its rounds), its floor ratio
(the read/byte floor of fused CAME over fused AdamW's, see :mod:`torchcame.bench.core`) and
fused CAME's step over its own floor, with the median over runs.

    python benchmarks/bench_repeats.py --repeats 4 --out benchmarks/results/bench/repeats

Stop other jobs on the machine first (the evidence tracks were SIGSTOPped for the committed
results). Writes ``run_<i>.json``, ``summary.json`` and ``summary.md`` under ``--out``; runs
already there are kept and summarized with the new ones (so every run taken is reported).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from torchcame.bench.core import machine_info, run_bench, write_json

CANDIDATES = ["CAME fused", "AdamW fused"]


def summarize(reports: list[dict]) -> dict:
    """Per set: each run's ratios and the medians over runs."""
    sets: dict[str, dict] = {}
    for report in reports:
        for s in report["sets"]:
            rows = {r["name"]: r for r in s["results"]}
            came = rows["CAME fused"]
            entry = sets.setdefault(s["set"], {"runs": []})
            entry["runs"].append({
                "ratio_to_adamw_fused": came["ratio_to_adamw_fused"],
                "floor_ratio_to_adamw": came["floor_ratio_to_adamw"],
                "came_ratio_to_floor": came["ratio_to_floor"],
                "adamw_ratio_to_floor": rows["AdamW fused"]["ratio_to_floor"],
                "triad_GBps": s["probe_GBps"]["triad (a += s*b)"],
                "read_GBps": s["probe_GBps"]["read (sum a)"],
            })
    for entry in sets.values():
        for key in ("ratio_to_adamw_fused", "floor_ratio_to_adamw", "came_ratio_to_floor"):
            entry[f"median_{key}"] = statistics.median(r[key] for r in entry["runs"])
    return sets


def to_markdown(summary: dict, command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    for name, entry in summary.items():
        lines += [f"### {name}", "",
                  "| run | fused CAME × fused AdamW | floor ratio (CAME / AdamW) "
                  "| CAME × its floor | AdamW × its floor | triad GB/s | read GB/s |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for i, r in enumerate(entry["runs"], 1):
            lines.append(f"| {i} | {r['ratio_to_adamw_fused']:.2f} | "
                         f"{r['floor_ratio_to_adamw']:.2f} | {r['came_ratio_to_floor']:.2f} | "
                         f"{r['adamw_ratio_to_floor']:.2f} | {r['triad_GBps']:.1f} | "
                         f"{r['read_GBps']:.1f} |")
        lines += [f"| median | **{entry['median_ratio_to_adamw_fused']:.2f}** | "
                  f"{entry['median_floor_ratio_to_adamw']:.2f} | "
                  f"{entry['median_came_ratio_to_floor']:.2f} | | | |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--sets", default="gpt2-124m,vit-b16")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/bench/repeats")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_repeats.py " + " ".join(argv or sys.argv[1:])
    # runs already in --out count too (the summary covers every run kept there)
    done = sorted(out.glob("run_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    reports = [json.loads(p.read_text()) for p in done]
    first = len(done) + 1
    for i in range(first, first + args.repeats):
        report = run_bench(args.sets.split(","), rounds=args.rounds, names=CANDIDATES,
                           progress=False, command=command)
        write_json(report, str(out / f"run_{i}.json"))
        reports.append(report)
        ratios = summarize([report])
        print(f"run {i}: " + ", ".join(
            f"{name} {entry['runs'][0]['ratio_to_adamw_fused']:.2f}"
            for name, entry in ratios.items()), flush=True)
    summary = summarize(reports)
    (out / "summary.json").write_text(json.dumps(
        {"command": command, "machine": machine_info(torch.device("cpu")), "sets": summary},
        indent=1) + "\n")
    table = to_markdown(summary, command)
    (out / "summary.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

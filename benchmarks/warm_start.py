"""Effect of ``bias_correction=True`` on CAME's first steps (the demo's GPT-2, 200 steps).

The paper's rule starts every statistic at zero with no bias correction, so the first updates
of a matrix are amplified by up to ~(1 - β1^t) / sqrt(1 - β3^t) (≈ 20× around step 12 with
the default betas). This script trains the demo model twice per seed -- faithful CAME and
CAME with bias correction -- with the same data and initial weights, under two schedules: the
demo's (linear warmup, which hides part of the effect) and a constant lr with no warmup
(where the amplification acts in full). It also records the update size per step.

    python benchmarks/warm_start.py            # ~6 min on 2 CPU cores

Writes ``benchmarks/results/warm_start/`` (``warm_start.json``, ``warm_start.png``,
``warm_start.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from torchcame.recipes.demo import DEMO_DEFAULTS
from torchcame.recipes.report import machine_info, mean_std, write_json
from torchcame.recipes.train import run_comparison

OUT = Path(__file__).resolve().parent / "results" / "warm_start"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    schedules = {
        "demo schedule (warmup 10%, cosine)": dict(warmup=args.steps // 10, min_lr_ratio=0.1),
        "constant lr, no warmup": dict(warmup=0, min_lr_ratio=1.0),
    }
    results = {"machine": machine_info(), "command": "python benchmarks/warm_start.py "
               + " ".join(argv if argv is not None else sys.argv[1:]), "schedules": {}}
    all_runs = {}
    for title, sched in schedules.items():
        cfg = replace(DEMO_DEFAULTS, steps=args.steps, optimizers=("came", "came-bc"),
                      seeds=tuple(args.seeds), eval_every=max(1, args.steps // 10),
                      measure_memory=False, **sched)
        runs, _ = run_comparison(cfg)
        all_runs[title] = runs
        rows = []
        for name in cfg.optimizers:
            member = [r for r in runs if r["optimizer"] == name]
            early = [max(r["history"]["train_loss"][: args.steps // 4]) for r in member]
            final = [r["final_val_loss"] for r in member]
            rows.append({
                "optimizer": name,
                "max_train_loss_first_quarter": mean_std(early),
                "final_val_loss": mean_std(final),
                "train_loss_at": {
                    str(s): mean_std([r["history"]["train_loss"][s - 1] for r in member])
                    for s in (10, 25, 50, 100, args.steps) if s <= args.steps
                },
            })
        results["schedules"][title] = {"config": cfg.as_dict(), "rows": rows,
                                       "runs": [{k: v for k, v in r.items()} for r in runs]}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(results, args.out / "warm_start.json")
    _plot(all_runs, args.out / "warm_start.png", args.steps)
    md = _markdown(results)
    (args.out / "warm_start.md").write_text(md + "\n")
    print(md)
    return 0


def _plot(all_runs: dict, path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_runs), figsize=(12, 4.5), dpi=110, sharey=True)
    labels = {"came": "CAME (faithful: zero init, no bias correction)",
              "came-bc": "CAME, bias_correction=True"}
    for ax, (title, runs) in zip(axes, all_runs.items()):
        for name, color in (("came", "C0"), ("came-bc", "C3")):
            member = [r for r in runs if r["optimizer"] == name]
            curves = torch.tensor([r["history"]["train_loss"][:steps] for r in member])
            mean = curves.mean(0)
            xs = range(1, len(mean) + 1)
            ax.plot(xs, mean, color=color, label=f"{labels[name]} ({len(member)} seeds)")
            if len(member) > 1:
                ax.fill_between(xs, curves.min(0).values, curves.max(0).values, color=color,
                                alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss (nats/byte)")
    axes[0].legend(fontsize=8)
    fig.suptitle("First steps of the demo GPT-2: CAME with and without bias correction")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _markdown(results: dict) -> str:
    lines = ["# CAME bias correction: the first steps", "",
             f"Command: `{results['command']}`", "",
             f"Machine: {json.dumps(results['machine'])}", ""]
    for title, block in results["schedules"].items():
        lines += [f"## {title}", "",
                  "| optimizer | max train loss, first quarter | train loss @10 | @25 | @50 | "
                  "final val loss |", "|---|---|---|---|---|---|"]
        for row in block["rows"]:
            at = row["train_loss_at"]
            cells = [f"{at[k][0]:.3f}" if k in at else "-" for k in ("10", "25", "50")]
            m, s = row["final_val_loss"]
            e, es = row["max_train_loss_first_quarter"]
            lines.append(f"| {row['optimizer']} | {e:.3f} ± {es:.3f} | " + " | ".join(cells)
                         + f" | {m:.4f} ± {s:.4f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

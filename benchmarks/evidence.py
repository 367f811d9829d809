"""Experiments behind docs/evidence.md: do the CAME paper's claims hold at small scale?

Usage (from the repository root, the ``[recipes]`` extra installed)::

    python benchmarks/evidence.py all            # everything below, in order
    python benchmarks/evidence.py sweep-gpt      # lr sweep, GPT-2, 100 steps, seed 0
    python benchmarks/evidence.py sweep-bert     # lr sweep, BERT, 100 steps, seed 0 (+ LAMB)
    python benchmarks/evidence.py gpt            # GPT-2, 3 seeds, best lr of the sweep each
    python benchmarks/evidence.py bert           # BERT, 3 seeds, best lr of the sweep each
    python benchmarks/evidence.py large-batch    # BERT at 8x the batch, sqrt-scaled lrs
    python benchmarks/evidence.py toy            # the 1-layer MLP toy problem
    python benchmarks/evidence.py lr-check-gpt   # GPT, 300 steps: the sweep's lr vs neighbours
    python benchmarks/evidence.py summary        # print the markdown tables of all results

Every experiment writes ``benchmarks/results/evidence/<name>/`` (``results.json``,
``loss.png``, ``report.md``) and is skipped when its ``results.json`` exists, unless
``--force``. The learning rates of ``gpt``, ``bert`` and ``large-batch`` are read from the
sweeps' results, so run the sweeps first (``all`` does).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from torchcame.recipes.report import (
    markdown_table,
    mean_std,
    plot_curves,
    summarize,
    write_report,
)
from torchcame.recipes.train import LMConfig, claim_checks, run_comparison, run_one, set_threads

RESULTS = Path(__file__).resolve().parent / "results" / "evidence"

# base model of every LM experiment (the demo's): 2 layers, d_model 128, 4 heads, context 64
BASE = {"n_layer": 2, "d_model": 128, "n_head": 4, "seq_len": 64}
BASE_BATCH = 16
MAIN_STEPS = 300  # the demo's length
SWEEP_STEPS = 100
SEEDS = (0, 1, 2)
# values a factor ~3 apart around each optimizer's customary lr; the first pass had three
# each and its best lrs sat on the edges, so the grids were extended outward until the best
# was inside (CAME and Adafactor needed two extensions)
SWEEP_LRS = {
    "came": (3e-5, 1e-4, 3e-4, 1e-3, 3e-3),
    "came-bc": (3e-4, 1e-3, 3e-3),  # opt-in bias correction (not the paper's rule)
    "adamw": (3e-4, 1e-3, 3e-3, 1e-2),
    "adafactor": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "lamb": (2e-3, 6e-3, 2e-2, 6e-2),
}
MAIN_OPTIMIZERS = ("came", "adamw", "adafactor", "came-bc")
LARGE_BATCH_FACTOR = 8
LARGE_BATCH_STEPS = 80


def _done(name: str, force: bool) -> bool:
    path = RESULTS / name / "results.json"
    if path.exists() and not force:
        print(f"[{name}] exists, skipping ({path}); --force to rerun")
        return True
    return False


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sweep(task: str, optimizers: tuple[str, ...], force: bool, progress: bool) -> None:
    name = f"sweep-{task}"
    if _done(name, force):
        return
    cfg = LMConfig(
        task=task,
        **BASE,
        batch_size=BASE_BATCH,
        steps=SWEEP_STEPS,
        warmup=SWEEP_STEPS // 10,
        eval_every=50,
        eval_batches=8,
        optimizers=optimizers,
        seeds=(0,),
        measure_memory=False,
    )
    from torchcame.recipes.data import load_corpus

    corpus = load_corpus(None, max_bytes=cfg.max_bytes)
    # reuse the runs of a previous sweep with the same settings (the grid may have grown)
    cached = {}
    previous = RESULTS / name / "results.json"
    if previous.exists():
        old = json.loads(previous.read_text())
        if old["config"]["steps"] == cfg.steps and old["config"]["seq_len"] == cfg.seq_len:
            cached = {(r["optimizer"], r["lr"]): r for r in old["runs"]}
    runs = []
    t0 = time.perf_counter()
    for opt in optimizers:
        for lr in SWEEP_LRS[opt]:
            if (opt, lr) in cached:
                runs.append(cached[(opt, lr)])
                continue
            _log(f"{name}: {opt} lr={lr:g}")
            runs.append(run_one(cfg, corpus, opt, 0, lr=lr, progress=progress))
    best = _best_lrs(runs)
    edges = [k for k, v in best.items() if v in (min(SWEEP_LRS[k]), max(SWEEP_LRS[k]))]
    notes = [
        "Best lr (lowest final validation loss) per optimizer: "
        + ", ".join(f"{k} {v:g}" for k, v in best.items())
        + (f". On the edge of its grid: {', '.join(edges)}." if edges else ".")
    ]
    write_report(
        RESULTS / name,
        title=f"lr sweep: {task}, {SWEEP_STEPS} steps, seed 0",
        config={**cfg.as_dict(), "sweep_lrs": {o: SWEEP_LRS[o] for o in optimizers}},
        runs=runs,
        notes=notes,
        extra={"best_lr": best, "wall_seconds": time.perf_counter() - t0},
    )
    _log(f"{name}: best {best}")


def _best_lrs(runs: list[dict]) -> dict[str, float]:
    best: dict[str, tuple[float, float]] = {}
    for r in runs:
        loss = r["final_val_loss"]
        if math.isnan(loss):
            continue
        if r["optimizer"] not in best or loss < best[r["optimizer"]][1]:
            best[r["optimizer"]] = (r["lr"], loss)
    return {k: v[0] for k, v in best.items()}


def _sweep_best(task: str) -> dict[str, float]:
    path = RESULTS / f"sweep-{task}" / "results.json"
    if not path.exists():
        raise SystemExit(f"run `python benchmarks/evidence.py sweep-{task}` first")
    return json.loads(path.read_text())["best_lr"]


def main_comparison(task: str, force: bool, progress: bool) -> None:
    if _done(task, force):
        return
    lrs = _sweep_best(task)
    cfg = LMConfig(
        task=task,
        **BASE,
        batch_size=BASE_BATCH,
        steps=MAIN_STEPS,
        warmup=MAIN_STEPS // 10,
        eval_every=25,
        eval_batches=8,
        optimizers=MAIN_OPTIMIZERS,
        lrs={k: lrs[k] for k in MAIN_OPTIMIZERS},
        seeds=SEEDS,
    )
    _log(f"{task}: {cfg.optimizers} x seeds {SEEDS}, lrs {cfg.lrs}")
    t0 = time.perf_counter()
    runs, corpus = run_comparison(cfg, progress=progress)
    rows = summarize(runs)
    checks = claim_checks(rows)
    write_report(
        RESULTS / task,
        title=f"{task}: CAME vs AdamW vs Adafactor, {len(SEEDS)} seeds",
        config={**cfg.as_dict(), "corpus": corpus.summary()},
        runs=runs,
        notes=["Targets:\n\n" + "\n".join(checks)],
        extra={"claim_checks": checks, "wall_seconds": time.perf_counter() - t0},
    )
    print(markdown_table(rows))
    print("\n".join(checks))


def large_batch(force: bool, progress: bool) -> None:
    name = "large-batch"
    if _done(name, force):
        return
    base = _sweep_best("bert")
    scale = math.sqrt(LARGE_BATCH_FACTOR)
    lrs = {k: base[k] * scale for k in ("came", "adamw", "lamb")}
    batch = BASE_BATCH * LARGE_BATCH_FACTOR
    cfg = LMConfig(
        task="bert",
        **BASE,
        batch_size=batch,
        steps=LARGE_BATCH_STEPS,
        warmup=LARGE_BATCH_STEPS // 10,
        eval_every=15,
        eval_batches=2,
        optimizers=("came", "adamw", "lamb"),
        lrs=lrs,
        seeds=(0,),
    )
    _log(f"{name}: batch {batch}, lrs {lrs} (sqrt scaling x{scale:.3f} of the batch-16 sweep)")
    t0 = time.perf_counter()
    runs, corpus = run_comparison(cfg, progress=progress)
    notes = [
        f"Batch {batch} = {LARGE_BATCH_FACTOR}x the base batch {BASE_BATCH}; every lr is the "
        f"best of the batch-{BASE_BATCH} BERT sweep times sqrt({LARGE_BATCH_FACTOR}) = "
        f"{scale:.3f}. Validation uses {cfg.eval_batches} batches of {batch} sequences."
    ]
    write_report(
        RESULTS / name,
        title=f"BERT at batch {batch}: CAME vs AdamW vs LAMB",
        config={
            **cfg.as_dict(),
            "corpus": corpus.summary(),
            "base_lrs": {k: base[k] for k in lrs},
            "lr_scaling": "sqrt",
        },
        runs=runs,
        notes=notes,
        plot_x="tokens",
        extra={"wall_seconds": time.perf_counter() - t0},
    )
    # the batch-16 runs of the main BERT experiment (seed 0) on the same tokens axis
    main = RESULTS / "bert" / "results.json"
    if main.exists():
        small = [
            dict(r, label=f"{r['optimizer']} batch {BASE_BATCH}")
            for r in json.loads(main.read_text())["runs"]
            if r["seed"] == 0 and r["optimizer"] in ("came", "adamw")
        ]
        big = [dict(r, label=f"{r['optimizer']} batch {batch}") for r in runs]
        plot_curves(
            big + small,
            RESULTS / name / "loss_vs_tokens.png",
            x="tokens",
            title=f"BERT: batch {batch} (sqrt-scaled lr) vs batch {BASE_BATCH}",
            train=False,
        )
    print(markdown_table(summarize(runs)))


def neighbours(force: bool, progress: bool) -> None:
    """Is the 100-step sweep's choice still best at the main length? GPT, seed 0, 300 steps,
    each optimizer at its grid neighbours (lr/3 and 3·lr) beside the main run's chosen lr."""
    name = "lr-check-gpt"
    if _done(name, force):
        return
    best = _sweep_best("gpt")
    main = json.loads((RESULTS / "gpt" / "results.json").read_text())
    cfg = LMConfig(
        task="gpt",
        **BASE,
        batch_size=BASE_BATCH,
        steps=MAIN_STEPS,
        warmup=MAIN_STEPS // 10,
        eval_every=25,
        eval_batches=8,
        optimizers=("came", "adamw", "adafactor"),
        seeds=(0,),
        measure_memory=False,
    )
    from torchcame.recipes.data import load_corpus

    corpus = load_corpus(None, max_bytes=cfg.max_bytes)
    runs = []
    t0 = time.perf_counter()
    for opt in cfg.optimizers:
        grid = SWEEP_LRS[opt]
        i = grid.index(best[opt])
        for lr in grid[max(0, i - 1) : i + 2]:
            if lr == best[opt]:
                runs += [r for r in main["runs"] if r["optimizer"] == opt and r["seed"] == 0]
                continue
            _log(f"{name}: {opt} lr={lr:g}")
            runs.append(run_one(cfg, corpus, opt, 0, lr=lr, progress=progress))
    write_report(
        RESULTS / name,
        title=f"GPT, {MAIN_STEPS} steps, seed 0: the sweep's lr and its neighbours",
        config=cfg.as_dict(),
        runs=runs,
        extra={"wall_seconds": time.perf_counter() - t0},
    )
    print(markdown_table(summarize(runs)))


def toy(force: bool, progress: bool) -> None:
    name = "toy"
    if _done(name, force):
        return
    from torchcame.recipes.toy_mlp import ToyConfig, run_toy, toy_report

    cfg = ToyConfig()
    result = run_toy(cfg, progress=progress)
    toy_report(result, RESULTS / name)


def summary() -> None:
    for name in EXPERIMENTS:
        path = RESULTS / name / "results.json"
        if not path.exists():
            print(f"## {name}: not run\n")
            continue
        data = json.loads(path.read_text())
        print(f"## {name} ({data.get('wall_seconds', 0):.0f} s)\n")
        if isinstance(data.get("summary"), list):
            print(markdown_table(data["summary"]))
        elif name == "toy":
            for opt, row in data["summary"].items():
                print(f"{opt}: lr {row['lr']:g}, final loss {row['final_train_loss']}, "
                      f"departure {row['departure']}")
        for line in data.get("claim_checks", []):
            print(line)
        if "best_lr" in data:
            print("best lr:", data["best_lr"])
        if name in ("gpt", "bert"):
            for opt in ("came", "adamw", "adafactor"):
                vals = [r["final_val_loss"] for r in data["runs"] if r["optimizer"] == opt]
                m, s = mean_std(vals)
                print(f"{opt}: val {m:.4f} ± {s:.4f} over {len(vals)} seeds: {vals}")
        print()


EXPERIMENTS = ("sweep-gpt", "sweep-bert", "gpt", "bert", "large-batch", "toy", "lr-check-gpt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=(*EXPERIMENTS, "all", "summary"))
    parser.add_argument("--force", action="store_true", help="rerun even if results exist")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    if args.what == "summary":
        summary()
        return 0
    threads = set_threads(args.threads)
    _log(f"torch {torch.__version__}, {threads} threads")
    todo = EXPERIMENTS if args.what == "all" else (args.what,)
    for what in todo:
        t0 = time.perf_counter()
        if what == "sweep-gpt":
            sweep("gpt", ("came", "came-bc", "adamw", "adafactor"), True, args.progress)
        elif what == "sweep-bert":
            sweep("bert", ("came", "came-bc", "adamw", "adafactor", "lamb"), True, args.progress)
        elif what in ("gpt", "bert"):
            main_comparison(what, args.force, args.progress)
        elif what == "large-batch":
            large_batch(args.force, args.progress)
        elif what == "toy":
            toy(args.force, args.progress)
        elif what == "lr-check-gpt":
            neighbours(args.force, args.progress)
        _log(f"{what} done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

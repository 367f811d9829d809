"""The paper's toy problem: a 1-hidden-layer MLP where Adafactor departs from Adam.

Luo et al. (2023, Fig. 1) train a one-layer MLP with Adam, Adafactor and CAME from the same
start and show Adafactor's trajectory leaving Adam's while CAME's stays close to it. The
paper does not publish that problem's data, so this module makes a small synthetic one whose
gradient second moments are *not* rank one (the case where a factored second moment
``r ⊗ c / sum(r)`` is a poor approximation):

- inputs ``x ∈ R^32`` from 10 classes; class ``k`` has a sparse mean (6 active features with
  magnitude ±1) and every feature has its own noise scale, log-spaced over 0.1 … 3, so the
  size of a weight's gradient depends jointly on which hidden unit and which input feature
  it connects (the class structure couples rows and columns);
- 10% of the labels replaced by random ones, so the best loss is well above zero;
- the model ``Linear(32, 64) → tanh → Linear(64, 10)``, cross-entropy, minibatches of 64
  drawn from 4,096 fixed samples, constant learning rate, 400 steps;
- the loss reported is on the whole 4,096-sample training set, every 10 steps.

Optimizers: Adam (``torch.optim.AdamW`` with no weight decay), Adafactor
(``torch.optim.Adafactor``: factored second moment, no momentum, relative step), CAME, and
``adafactor_momentum``: CAME with the confidence step removed (factored second moment,
update clipping and momentum, ``Δ = m``), to tell momentum apart from confidence. Each is
run at three learning rates and three seeds; the curves use each optimizer's best lr.
Departure from Adam is measured per seed as the mean over evaluations of
``|loss_opt − loss_adam| / loss_adam``.

Run ``python -m torchcame.recipes.toy_mlp``; seconds on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..came import CAME

__all__ = [
    "ToyConfig",
    "make_toy_data",
    "FactoredMomentum",
    "run_toy",
    "toy_report",
    "toy_search",
    "departure",
    "main",
]


@dataclass
class ToyConfig:
    """The toy problem and what to run on it."""

    n_in: int = 32
    n_hidden: int = 64
    n_classes: int = 10
    n_samples: int = 4096
    active: int = 6  # features with a non-zero class mean
    magnitude: float = 1.0  # of those means
    label_noise: float = 0.1
    scale_min: float = 0.1  # per-feature noise scales, log-spaced over [scale_min, scale_max]
    scale_max: float = 3.0
    batch_size: int = 64
    steps: int = 400
    eval_every: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)
    device: str = "cpu"
    lrs: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "adam": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
            "adafactor": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
            "came": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
            "adafactor_momentum": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
        }
    )
    common_lr: float = 1e-2  # the lr of the "same lr" panel (in every grid above)


def make_toy_data(cfg: ToyConfig, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed dataset (the same for every seed: seeds change init and batch order)."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.zeros(cfg.n_classes, cfg.n_in)
    for k in range(cfg.n_classes):
        active = torch.randperm(cfg.n_in, generator=gen)[: cfg.active]
        means[k, active] = cfg.magnitude * torch.sign(torch.randn(cfg.active, generator=gen))
    scales = torch.logspace(math.log10(cfg.scale_min), math.log10(cfg.scale_max), cfg.n_in)
    scales = scales[torch.randperm(cfg.n_in, generator=gen)]
    y = torch.randint(0, cfg.n_classes, (cfg.n_samples,), generator=gen)
    x = means[y] + scales * torch.randn(cfg.n_samples, cfg.n_in, generator=gen)
    # label noise keeps the optimum away from zero loss
    flip = torch.rand(cfg.n_samples, generator=gen) < cfg.label_noise
    y = torch.where(flip, torch.randint(0, cfg.n_classes, (cfg.n_samples,), generator=gen), y)
    return x, y


class FactoredMomentum(torch.optim.Optimizer):
    """CAME without the confidence step: factored second moment, update clip, momentum.

    For a matrix: ``r, c`` as in CAME, ``u = g / sqrt(r ⊗ c / mean(r))`` clipped to RMS ≤ d,
    ``m = β1 m + (1-β1) u``, ``θ -= lr·m``. Vectors use a full second moment. This is
    Adafactor with momentum (and without relative steps); only for the toy ablation.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-30,
        clip_threshold: float = 1.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "d": clip_threshold})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    if p.dim() >= 2:
                        state["exp_avg_sq_row"] = p.new_zeros(p.shape[:-1])
                        state["exp_avg_sq_col"] = p.new_zeros(p.shape[:-2] + p.shape[-1:])
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(p)
                sq = g * g + group["eps"]
                if p.dim() >= 2:
                    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    row.mul_(beta2).add_(sq.mean(-1), alpha=1 - beta2)
                    col.mul_(beta2).add_(sq.mean(-2), alpha=1 - beta2)
                    v = (row / row.mean(-1, keepdim=True)).unsqueeze(-1) * col.unsqueeze(-2)
                else:
                    v = state["exp_avg_sq"].mul_(beta2).add_(sq, alpha=1 - beta2)
                u = g / v.sqrt()
                u.div_(max(1.0, float(u.square().mean().sqrt()) / group["d"]))
                state["exp_avg"].mul_(beta1).add_(u, alpha=1 - beta1)
                p.add_(state["exp_avg"], alpha=-group["lr"])


def _build(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr)
    if name == "came":
        return CAME(params, lr=lr)
    if name == "came_bc":
        return CAME(params, lr=lr, bias_correction=True)
    if name == "adafactor_momentum":
        return FactoredMomentum(params, lr=lr)
    raise ValueError(f"unknown toy optimizer {name!r}")


def _model(cfg: ToyConfig, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(cfg.n_in, cfg.n_hidden), nn.Tanh(), nn.Linear(cfg.n_hidden, cfg.n_classes)
    )


def _train(cfg: ToyConfig, x, y, name: str, lr: float, seed: int) -> dict[str, Any]:
    model = _model(cfg, seed).to(cfg.device)
    x, y = x.to(cfg.device), y.to(cfg.device)
    opt = _build(name, model.parameters(), lr)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    steps, losses = [], []

    def evaluate(step: int) -> None:
        with torch.no_grad():
            steps.append(step)
            losses.append(float(loss_fn(model(x), y)))

    evaluate(0)
    for step in range(cfg.steps):
        idx = torch.randint(0, cfg.n_samples, (cfg.batch_size,), generator=gen).to(cfg.device)
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % cfg.eval_every == 0:
            evaluate(step + 1)
    final = losses[-1] if math.isfinite(losses[-1]) else math.nan
    with torch.no_grad():
        acc = float((model(x).argmax(-1) == y).float().mean())
    return {
        "optimizer": name,
        "lr": lr,
        "seed": seed,
        "final_train_loss": final,
        "accuracy": acc,
        "history": {"eval_step": steps, "loss": losses},
    }


def run_toy(cfg: ToyConfig | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Run every optimizer × lr × seed; pick each optimizer's best lr (mean final loss)."""
    from tqdm.auto import tqdm

    cfg = cfg or ToyConfig()
    x, y = make_toy_data(cfg)
    jobs = [(n, lr, s) for n, lrs in cfg.lrs.items() for lr in lrs for s in cfg.seeds]
    t0 = time.perf_counter()
    runs = [
        _train(cfg, x, y, n, lr, s)
        for n, lr, s in tqdm(jobs, desc="toy MLP runs", disable=not progress)
    ]
    best: dict[str, float] = {}
    for name, lrs in cfg.lrs.items():

        def mean_final(lr: float, name: str = name) -> float:
            vals = [r["final_train_loss"] for r in runs if r["optimizer"] == name and r["lr"] == lr]
            return statistics.fmean(vals) if all(math.isfinite(v) for v in vals) else math.inf

        best[name] = min(lrs, key=mean_final)
    # departure from Adam's curve (same seed, each at its best lr)
    by_key = {(r["optimizer"], r["lr"], r["seed"]): r for r in runs}
    departure: dict[str, list[float]] = {}
    for name in cfg.lrs:
        vals = []
        for s in cfg.seeds:
            ref = by_key[("adam", best["adam"], s)]["history"]["loss"]
            cur = by_key[(name, best[name], s)]["history"]["loss"]
            gaps = [abs(c - a) / a for c, a in zip(cur, ref)]
            vals.append(statistics.fmean(gaps) if all(map(math.isfinite, gaps)) else math.nan)
        departure[name] = vals
    return {
        "config": asdict(cfg),
        "runs": runs,
        "best_lr": best,
        "departure": departure,
        "wall_seconds": time.perf_counter() - t0,
    }


def toy_report(result: dict[str, Any], out: str | Path) -> Path:
    """Write ``report.md``, ``loss.png`` and ``results.json`` for a :func:`run_toy` result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import format_mean_std, machine_info, mean_std, write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    best, runs = result["best_lr"], result["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5), dpi=110)
    rows = [
        "| optimizer | best lr | final train loss | accuracy | departure from Adam |",
        "|---|---|---|---|---|",
    ]
    summary = {}
    for name, lr in best.items():
        members = [r for r in runs if r["optimizer"] == name and r["lr"] == lr]
        steps = members[0]["history"]["eval_step"]
        curves = torch.tensor([r["history"]["loss"] for r in members])
        mean, std = curves.mean(0), curves.std(0) if len(members) > 1 else curves[0] * 0
        axes[0].plot(steps, mean, label=f"{name} (lr {lr:g})")
        axes[0].fill_between(steps, mean - std, mean + std, alpha=0.2)
        ref = torch.tensor(
            [
                r["history"]["loss"]
                for r in runs
                if r["optimizer"] == "adam" and r["lr"] == best["adam"]
            ]
        )
        axes[2].plot(steps, ((curves - ref).abs() / ref).mean(0), label=name)
        common = result["config"]["common_lr"]
        same = [r["history"]["loss"] for r in runs if r["optimizer"] == name and r["lr"] == common]
        if same:
            axes[1].plot(steps, torch.tensor(same).mean(0), label=f"{name} (lr {common:g})")
        fl = mean_std(r["final_train_loss"] for r in members)
        acc = mean_std(r["accuracy"] for r in members)
        dep = mean_std(result["departure"][name])
        n = len(members)
        summary[name] = {"lr": lr, "final_train_loss": fl, "accuracy": acc, "departure": dep}
        rows.append(
            f"| {name} | {lr:g} | {format_mean_std(*fl, 4, n)} | "
            f"{format_mean_std(*acc, 3, n)} | {format_mean_std(*dep, 3, n)} |"
        )
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training-set loss (log)")
    axes[0].set_title("1-hidden-layer MLP toy: loss (mean ± std over seeds, best lr each)")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("training-set loss (log)")
    axes[1].set_title("the same lr for all (mean over seeds)")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("|loss − loss_Adam| / loss_Adam")
    axes[2].set_title("departure from Adam's curve (same seed, best lr each)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss.png")
    plt.close(fig)
    lr_rows = ["| optimizer | lr | final train loss (mean ± std) |", "|---|---|---|"]
    for name, lrs in result["config"]["lrs"].items():
        for lr in lrs:
            vals = [r["final_train_loss"] for r in runs if r["optimizer"] == name and r["lr"] == lr]
            lr_rows.append(
                f"| {name} | {lr:g} | {format_mean_std(*mean_std(vals), 4, len(vals))} |"
            )
    machine = machine_info()
    write_json({**result, "summary": summary, "machine": machine}, out / "results.json")
    text = [
        "# Toy problem: 1-hidden-layer MLP, Adam vs Adafactor vs CAME",
        "",
        "\n".join(rows),
        "",
        "![loss curves](loss.png)",
        "",
        "Departure from Adam: mean over evaluations of |loss − loss_Adam| / loss_Adam, same "
        "seed, each optimizer at its best lr. `adafactor_momentum` is CAME without the "
        "confidence step (factored second moment, update clipping, momentum).",
        "",
        "## Learning-rate sweep",
        "",
        "\n".join(lr_rows),
        "",
        "## Setup",
        "",
        f"`{result['config']}`",
        "",
        f"Wall time {result['wall_seconds']:.1f} s on "
        f"{machine['cpu']} ({machine['torch_threads']} threads).",
    ]
    (out / "report.md").write_text("\n".join(text) + "\n")
    return out / "report.md"


def departure(curve: list[float], reference: list[float]) -> float:
    """Mean over evaluations of ``|curve - reference| / reference`` (NaN if either diverged)."""
    gaps = [abs(c - a) / a for c, a in zip(curve, reference)]
    return statistics.fmean(gaps) if gaps and all(map(math.isfinite, gaps)) else math.nan


#: the problem space searched by :func:`toy_search`: batch noise (batch size), how far the
#: gradient second moments are from rank one (the spread of the per-feature noise scales),
#: the learning rate shared by every optimizer (the paper's figure compares them at one lr),
#: and momentum (Adafactor without it, as torch ships it, and with it: ``adafactor_momentum``)
SEARCH_SPACE: dict[str, tuple] = {
    "batch_size": (8, 64, 512),
    "scales": ((0.1, 3.0), (0.01, 10.0), (1.0, 1.0)),
    "lr": (1e-3, 1e-2, 1e-1),
}
SEARCH_OPTIMIZERS = ("adam", "adafactor", "came", "came_bc", "adafactor_momentum")


def toy_search(
    out: str | Path, *, quick: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Search the toy problem space for Adafactor departing from Adam while CAME stays close.

    Every point of :data:`SEARCH_SPACE` trains the four optimizers at the same lr (seed 0)
    and measures each one's :func:`departure` from Adam's loss curve. A point *shows the
    effect* when Adafactor departs by more than 5% and CAME by less than half as much. The
    point with the largest ratio is rerun with 3 seeds. Writes ``results.json`` and
    ``report.md`` to ``out``; returns the results.
    """
    import itertools

    from tqdm.auto import tqdm

    space = {k: v[:2] for k, v in SEARCH_SPACE.items()} if quick else SEARCH_SPACE
    base = ToyConfig(steps=20 if quick else 400, n_samples=512 if quick else 4096)
    t0 = time.perf_counter()

    def measure(cfg: ToyConfig, lr: float, seed: int) -> dict[str, float]:
        x, y = make_toy_data(cfg)
        curves = {
            name: _train(cfg, x, y, name, lr, seed)["history"]["loss"]
            for name in SEARCH_OPTIMIZERS
        }
        return {name: departure(curves[name], curves["adam"]) for name in SEARCH_OPTIMIZERS} | {
            f"{name}_final": curves[name][-1] for name in SEARCH_OPTIMIZERS
        }

    points = []
    grid = list(itertools.product(space["batch_size"], space["scales"], space["lr"]))
    for batch, (lo, hi), lr in tqdm(grid, desc="toy search", disable=not progress):
        cfg = dataclasses.replace(base, batch_size=batch, scale_min=lo, scale_max=hi)
        d = measure(cfg, lr, 0)
        shows = d["adafactor"] > 0.05 and d["came"] < 0.5 * d["adafactor"]
        points.append(
            {"batch_size": batch, "scales": [lo, hi], "lr": lr, "departure": d, "shows": shows}
        )

    def ratio(p: dict) -> float:
        d = p["departure"]
        return d["adafactor"] / d["came"] if d["came"] > 0 and math.isfinite(d["adafactor"]) else 0

    best = max(points, key=ratio)
    cfg = dataclasses.replace(
        base, batch_size=best["batch_size"], scale_min=best["scales"][0],
        scale_max=best["scales"][1],
    )
    confirm = [measure(cfg, best["lr"], seed) for seed in (0, 1, 2)]
    result = {
        "space": {k: list(v) for k, v in space.items()},
        "steps": base.steps,
        "points": points,
        "best": best,
        "confirm": confirm,
        "wall_seconds": time.perf_counter() - t0,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Toy MLP: where does Adafactor depart from Adam while CAME stays close?",
        "",
        f"{len(points)} points, {base.steps} steps, seed 0, every optimizer at the point's lr. "
        "Departure = mean over evaluations of |loss − loss_Adam| / loss_Adam. "
        "*shows*: Adafactor > 5% and CAME < half of Adafactor's.",
        "",
        "| batch | noise scales | lr | Adafactor | CAME | CAME (bias-corrected) "
        "| Adafactor + momentum | shows |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        d = p["departure"]
        lines.append(
            f"| {p['batch_size']} | {p['scales'][0]:g}–{p['scales'][1]:g} | {p['lr']:g} | "
            f"{d['adafactor']:.3f} | {d['came']:.3f} | {d['came_bc']:.3f} | "
            f"{d['adafactor_momentum']:.3f} | "
            f"{'**yes**' if p['shows'] else 'no'} |"
        )
    dep = {n: [c[n] for c in confirm] for n in SEARCH_OPTIMIZERS[1:]}
    lines += [
        "",
        f"Largest Adafactor/CAME ratio: batch {best['batch_size']}, scales {best['scales']}, "
        f"lr {best['lr']:g}; over seeds 0, 1, 2: "
        + ", ".join(
            f"{n} {statistics.fmean(v):.3f} ± {statistics.stdev(v):.3f}" for n, v in dep.items()
        ),
        "",
        f"Wall time {result['wall_seconds']:.0f} s.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    from .report import default_out_dir
    from .train import set_threads

    parser = argparse.ArgumentParser(
        prog="python -m torchcame.recipes.toy_mlp",
        description="The 1-layer MLP toy problem of the CAME paper.",
    )
    parser.add_argument("--steps", type=int, default=ToyConfig.steps)
    parser.add_argument("--batch-size", type=int, default=ToyConfig.batch_size)
    parser.add_argument("--hidden", type=int, default=ToyConfig.n_hidden)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--optimizers", default="adam,adafactor,came,adafactor_momentum")
    parser.add_argument(
        "--lr",
        action="append",
        metavar="NAME=LR[,LR...]",
        help="lrs to try for one optimizer, e.g. came=1e-2,3e-2",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    cfg = ToyConfig(
        device=args.device,
        steps=args.steps,
        batch_size=args.batch_size,
        n_hidden=args.hidden,
        seeds=tuple(int(s) for s in args.seeds.split(",")),
    )
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    if "adam" not in names:
        names.insert(0, "adam")  # the reference curve
    for item in args.lr or []:
        name, values = item.split("=", 1)
        cfg.lrs[name.strip()] = tuple(float(v) for v in values.split(","))
    cfg.lrs = {n: cfg.lrs[n] for n in names}
    cfg.eval_every = max(1, min(cfg.eval_every, cfg.steps))
    result = run_toy(cfg, progress=not args.no_progress)
    path = toy_report(result, args.out or default_out_dir("toy"))
    print(path.read_text().split("![")[0])
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

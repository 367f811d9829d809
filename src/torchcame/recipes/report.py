"""Reports shared by ``torchcame demo``, the recipes and the benchmarks: tables, plots, JSON.

A *run* is a dict produced by a recipe (see :mod:`torchcame.recipes.train`) with at least
``optimizer``, ``lr``, ``seed`` and a ``history`` of ``step``/``tokens``/``train_loss``
(every step) and ``eval_step``/``eval_tokens``/``val_loss`` (every evaluation), plus scalar
results such as ``final_val_loss``. :func:`summarize` groups runs by optimizer (mean and
standard deviation over seeds), :func:`markdown_table` renders rows, :func:`plot_curves`
draws the loss curves and :func:`write_report` writes a report folder::

    out/
      report.md     title, setup, the summary table, notes
      loss.png      train (smoothed) and validation loss curves, mean over seeds
      results.json  the config and every run, with full histories

``matplotlib`` is imported lazily, with the non-interactive ``Agg`` backend.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "Column",
    "DEFAULT_COLUMNS",
    "default_out_dir",
    "machine_info",
    "mean_std",
    "summarize",
    "markdown_table",
    "format_mean_std",
    "plot_curves",
    "write_json",
    "write_report",
]

Column = tuple[str, str, Callable[[dict[str, Any]], str]]


def default_out_dir(kind: str, base: str | os.PathLike[str] = "torchcame-report") -> Path:
    """``./torchcame-report/<kind>-<UTC timestamp>`` (not created)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(base) / f"{kind}-{stamp}"


def machine_info() -> dict[str, Any]:
    """Where a result was measured: CPU, cores, threads, versions."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores_available": cores,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN if any value is NaN."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    if any(math.isnan(v) for v in vals):
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def format_mean_std(mean: float, std: float, digits: int = 4, n: int = 1) -> str:
    """``"1.2345 ± 0.0012"``, or just the mean for one sample, ``"diverged"`` for NaN."""
    if math.isnan(mean):
        return "diverged"
    return f"{mean:.{digits}f}" if n <= 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


SUMMARY_KEYS = (
    "final_train_loss",
    "final_val_loss",
    "optimizer_state_mb",
    "peak_memory_mb",
    "step_time_ms",
    "wall_seconds",
)


def summarize(
    runs: Sequence[dict[str, Any]], keys: Sequence[str] = SUMMARY_KEYS
) -> list[dict[str, Any]]:
    """Group runs by ``(optimizer, lr)`` in first-seen order; mean and std of each key.

    Returns:
        One row per group: ``optimizer``, ``lr``, ``seeds`` (list), ``n`` and for each key
        ``<key>`` (mean) and ``<key>_std``.
    """
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["optimizer"], float(run["lr"])), []).append(run)
    rows = []
    for (name, lr), members in groups.items():
        row: dict[str, Any] = {
            "optimizer": name,
            "lr": lr,
            "seeds": [m.get("seed") for m in members],
            "n": len(members),
        }
        for key in keys:
            present = [m[key] for m in members if key in m and m[key] is not None]
            if present:
                row[key], row[f"{key}_std"] = mean_std(present)
        rows.append(row)
    return rows


def _ms(key: str, digits: int) -> Callable[[dict[str, Any]], str]:
    def fmt(row: dict[str, Any]) -> str:
        if key not in row:
            return "-"
        return format_mean_std(row[key], row.get(f"{key}_std", 0.0), digits, row.get("n", 1))

    return fmt


DEFAULT_COLUMNS: list[Column] = [
    ("optimizer", "optimizer", lambda r: str(r["optimizer"])),
    ("lr", "lr", lambda r: f"{r['lr']:g}"),
    ("seeds", "seeds", lambda r: str(r.get("n", 1))),
    ("final_train_loss", "final train loss", _ms("final_train_loss", 4)),
    ("final_val_loss", "final val loss", _ms("final_val_loss", 4)),
    ("optimizer_state_mb", "optimizer state (MB)", _ms("optimizer_state_mb", 3)),
    ("peak_memory_mb", "peak step memory (MB)", _ms("peak_memory_mb", 2)),
    ("step_time_ms", "step time (ms)", _ms("step_time_ms", 1)),
]


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column] | None = None) -> str:
    """A GitHub markdown table of ``rows``; columns whose key no row has are dropped."""
    columns = list(DEFAULT_COLUMNS if columns is None else columns)
    columns = [c for c in columns if any(c[0] in r for r in rows)]
    lines = [
        "| " + " | ".join(c[1] for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(c[2](row) for c in columns) + " |")
    return "\n".join(lines)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (ignores NaN)."""
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        finite = [a for a in acc if not math.isnan(a)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def _mean_curves(curves: list[list[float]]) -> list[float]:
    n = min(len(c) for c in curves)
    return [statistics.fmean(c[i] for c in curves) for i in range(n)]


def plot_curves(
    runs: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    x: str = "step",
    title: str = "",
    smooth: int = 20,
    log_y: bool = False,
    train: bool = True,
) -> Path:
    """Plot train (smoothed, thin) and validation (thick, markers) loss, mean over seeds.

    Args:
        runs: runs with a ``history``.
        path: the PNG to write.
        x: ``"step"`` or ``"tokens"`` (tokens seen, to compare batch sizes).
        title: figure title.
        smooth: moving-average window of the per-step training loss.
        log_y: logarithmic loss axis.
        train: draw the training curves too.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        label = run.get("label") or f"{run['optimizer']} (lr {run['lr']:g})"
        groups.setdefault(label, []).append(run)
    xkey_train = "tokens" if x == "tokens" else "step"
    xkey_eval = "eval_tokens" if x == "tokens" else "eval_step"
    for i, (label, members) in enumerate(groups.items()):
        color = colors[i % len(colors)]
        hists = [m["history"] for m in members]
        has_val = all(h.get("val_loss") for h in hists)
        if train and all(h.get("train_loss") for h in hists):
            xs = hists[0][xkey_train]
            ys = _mean_curves([_smooth(h["train_loss"], smooth) for h in hists])
            ax.plot(
                xs[: len(ys)],
                ys,
                color=color,
                alpha=0.45,
                linewidth=1.0,
                label=None if has_val else label,
            )
        if has_val:
            xs = hists[0][xkey_eval]
            ys = _mean_curves([h["val_loss"] for h in hists])
            n = f", {len(members)} seeds" if len(members) > 1 else ""
            ax.plot(
                xs[: len(ys)],
                ys,
                color=color,
                linewidth=2.0,
                marker="o",
                markersize=3,
                label=f"{label} val{n}",
            )
    ax.set_xlabel("tokens seen" if x == "tokens" else "step")
    ax.set_ylabel("loss (nats/token)" + (", log scale" if log_y else ""))
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title or "loss (thin: train, smoothed; thick: validation)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as indented JSON (NaN stays NaN, tensors become lists)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    return path


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    title: str,
    config: dict[str, Any],
    runs: Sequence[dict[str, Any]],
    notes: Sequence[str] = (),
    columns: Sequence[Column] | None = None,
    plot_x: str = "step",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``report.md``, ``loss.png`` and ``results.json`` into ``out_dir``.

    Args:
        out_dir: the folder (created).
        title: the report title.
        config: what was run (written to JSON and listed in the markdown).
        runs: the runs (see the module docstring).
        notes: markdown paragraphs appended after the table.
        columns: table columns (default :data:`DEFAULT_COLUMNS`).
        plot_x: ``"step"`` or ``"tokens"``.
        extra: more JSON fields (e.g. timings).

    Returns:
        The path of ``report.md``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(runs)
    table = markdown_table(rows, columns)
    plot_curves(runs, out / "loss.png", x=plot_x, title=title)
    machine = machine_info()
    write_json(
        {
            "title": title,
            "config": config,
            "machine": machine,
            "summary": rows,
            "runs": runs,
            **(extra or {}),
        },
        out / "results.json",
    )
    lines = [f"# {title}", "", table, "", "![loss curves](loss.png)", "", "## Setup", ""]
    for key, value in config.items():
        lines.append(f"- **{key}**: `{value}`")
    lines += ["", "## Machine", ""]
    lines += [f"- **{k}**: {v}" for k, v in machine.items()]
    if notes:
        lines += ["", "## Notes", ""]
        for note in notes:
            lines += [note, ""]
    (out / "report.md").write_text("\n".join(lines).rstrip() + "\n")
    return out / "report.md"

"""Step time and memory of CAME's implementations against its peers, in one interleaved run.

For each named parameter set (:mod:`.shapes`), every candidate optimizer gets its own state
over the *same* parameters and gradients. After warm-up, candidates are stepped in turn,
round after round (the order rotates each round), and two bandwidth probes over as many
elements as the parameter set are timed in every round too (:data:`PROBES`). Reported per
candidate:

* ``median_step_s``: median step time over rounds;
* ``ratio_to_adamw_fused``: median over rounds of (step time / fused AdamW's step time in the
  same round) -- robust to a shared, noisy machine, since both run under the same load;
* ``floor_s`` and ``ratio_to_floor``: the time the algorithm's minimal traffic (its pass
  schedule, below) needs on this machine, and the step time over it (>= 1 unless the floor
  is wrong). Two bounds, the larger wins (``floor_bound``): all its bytes at the attainable
  bandwidth, and its *read* bytes at the attainable read bandwidth. Memory systems read and
  write partly in parallel, so a pass that only reads can be slower per byte than one that
  reads and writes (on the 2-core EPYC VM of the README, reads saturate near 31 GB/s while
  the triad moves 48: 32 read plus 16 written), and an algorithm that reads more bytes is
  bound by its reads. Each bandwidth is the best rate seen in the same rounds: the probes
  (an in-place triad ``a += s * b``, 12 bytes per element of which 8 read, with no
  write-allocate reads; a read-only sum, 4 bytes per element) and every candidate's own
  achieved rates (its bytes, and its read bytes, over its median time): a step that moved
  its bytes at some rate proves the machine can. ``bandwidth_source`` and
  ``read_bandwidth_source`` name which set them. ``floor_ratio_to_adamw`` is the floor over
  fused AdamW's floor: the step-time ratio no implementation can beat on this machine.
  A plain ``copy_`` is not used: its destination is read for ownership before it is written,
  so its nominal 8 bytes per element under-count the traffic and the floor came out too low
  (steps ran at 0.6-0.8x of it);
* ``state_bytes``: optimizer state (tensors with ``dim > 0``; step counters excluded);
* ``extra_step_bytes``: peak bytes of tensors allocated during ``step()`` beyond params,
  grads and state (:func:`torchcame.memory.measure_step_memory`; on CPU a dispatch-level
  tracker, which sees tensors created by operators, not scratch buffers inside a kernel);
* ``first_step_s``: the first step (state allocation, plus compilation for compiled paths).

Bytes each algorithm must move per element per step (float32), used for the floor, and of
them the bytes read: AdamW 28, 16 read (read g; read+write p, m, v). CAME, factored tensors
32, 24 read (the row/column statistics need three reads of g -- sums of g^2, RMS of u,
instability sums -- then read+write m, read m and read+write p); vectors 36, 24 read (g
twice, v twice, m, p). Adafactor (no momentum), factored 20, 16 read (three reads of g,
read+write p), vectors 28, 20 read.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .shapes import describe, param_shapes
from .timing import interleaved_times, median_ratios, timed

__all__ = ["Candidate", "candidates", "run_set", "run_bench", "format_table", "BYTES_PER_ELEMENT",
           "READ_BYTES_PER_ELEMENT", "PROBES", "PROBE_READ_BYTES", "attainable_bandwidth"]

#: Bytes per element each algorithm must move per step: (factored tensors, other tensors).
BYTES_PER_ELEMENT = {
    "adamw": (28, 28),
    # 8-bit m and v (torchao): read g, read+write p (float32), read+write both 1-byte states;
    # the per-block scales are negligible
    "adamw8bit": (16, 16),
    "came": (32, 36),
    "adafactor": (20, 28),
}


#: Of those, the bytes read: (factored tensors, other tensors).
READ_BYTES_PER_ELEMENT = {
    "adamw": (16, 16),
    "adamw8bit": (10, 10),
    "came": (24, 24),
    "adafactor": (16, 20),
}


#: Bandwidth probes timed in every round: name -> (bytes moved per element, make(a, b) -> step).
#: Both are multi-threaded torch kernels over float32 buffers of the parameter set's size.
PROBES: dict[str, tuple[int, Callable[[torch.Tensor, torch.Tensor], Callable[[], Any]]]] = {
    "triad (a += s*b)": (12, lambda a, b: lambda: a.add_(b, alpha=1e-6)),
    "read (sum a)": (4, lambda a, b: lambda: a.sum()),
}


#: Bytes each probe reads per element (of the bytes it moves).
PROBE_READ_BYTES = {"triad (a += s*b)": 8, "read (sum a)": 4}


def attainable_bandwidth(rates: dict[str, float]) -> tuple[float, str]:
    """The highest achieved rate (bytes/s) among probes and candidates, and whose it is."""
    source = max(rates, key=lambda name: rates[name])
    return rates[source], source


@dataclass
class Candidate:
    """One optimizer configuration in the benchmark."""

    name: str
    algorithm: str  # key of BYTES_PER_ELEMENT
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    note: str = ""


def candidates(device: torch.device, with_compile: bool = False) -> list[Candidate]:
    """The optimizers compared: CAME's paths, the authors' package, AdamW, Adafactor."""
    from torchcame import CAME

    lr = 1e-4
    out = [
        Candidate("CAME fused", "came", lambda ps: CAME(ps, lr=lr, fused=True),
                  "torchcame, fused=True" + (" (C++ kernel)" if device.type == "cpu"
                                              else " (torch.compile)")),
        Candidate("CAME foreach", "came", lambda ps: CAME(ps, lr=lr, foreach=True),
                  "torchcame, foreach=True"),
        Candidate("CAME reference", "came",
                  lambda ps: CAME(ps, lr=lr, foreach=False, fused=False),
                  "torchcame, per-tensor reference path"),
    ]
    if with_compile:
        out.append(Candidate("CAME compiled", "came", _compiled_came(lr),
                             "torchcame fused step via torch.compile (per shape)"))
    try:
        import came_pytorch

        out.append(Candidate("came-pytorch", "came", lambda ps: came_pytorch.CAME(ps, lr=lr),
                             "the authors' package"))
    except ImportError:
        pass
    out += [
        Candidate("AdamW fused", "adamw",
                  lambda ps: torch.optim.AdamW(ps, lr=lr, fused=True), "torch.optim"),
        Candidate("AdamW foreach", "adamw",
                  lambda ps: torch.optim.AdamW(ps, lr=lr, foreach=True), "torch.optim"),
    ]
    adamw8bit = _torchao_adamw8bit()
    if adamw8bit is not None:
        out.append(Candidate("AdamW 8-bit (torchao)", "adamw8bit",
                             lambda ps: adamw8bit(ps, lr=lr), "torchao.optim.AdamW8bit"))
    if hasattr(torch.optim, "Adafactor"):
        out.append(Candidate("Adafactor foreach", "adafactor",
                             lambda ps: torch.optim.Adafactor(ps, lr=lr, foreach=True),
                             "torch.optim (no momentum)"))
    return out


def _torchao_adamw8bit() -> type | None:
    """torchao's 8-bit AdamW (block-wise quantized m and v) when torchao is installed."""
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        try:  # torchao before 0.11
            from torchao.prototype.low_bit_optim import AdamW8bit
        except ImportError:
            return None
    return AdamW8bit


def _compiled_came(lr: float) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    """A CAME whose step goes through :func:`torchcame._impl.compiled.step_compiled` (the
    CUDA fallback of ``fused=True``), here on any device."""
    from torchcame import CAME
    from torchcame._impl.compiled import step_compiled
    from torchcame.functional import init_state
    from torchcame.options import StepArgs
    from torchcame.state import layout_of

    class CompiledCAME(CAME):
        @torch.no_grad()
        def step(self, closure=None):  # noqa: D401 - benchmark-only variant
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                states = []
                for p in params:
                    if not self.state[p]:
                        self.state[p].update(init_state(p))
                    states.append(self.state[p])
                    self.state[p]["step"] += 1
                args = StepArgs(lr=torch.tensor(group["lr"]), betas=group["betas"],
                                eps=group["eps"], clip_threshold=group["clip_threshold"],
                                weight_decay=group["weight_decay"], maximize=group["maximize"])
                layouts = [layout_of(p, group) for p in params]
                step_compiled(params, [p.grad for p in params], states, args, layouts)

    return lambda ps: CompiledCAME(ps, lr=lr)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    from torchcame.memory import optimizer_state_bytes

    return optimizer_state_bytes(opt, include_scalars=False)


def _extra_step_bytes(opt: torch.optim.Optimizer, device: torch.device) -> tuple[int, str]:
    """Peak bytes allocated during one ``step()`` beyond what exists before it."""
    try:
        from torchcame.memory import measure_step_memory
    except ImportError:  # pragma: no cover - memory.py is part of the package
        return -1, "unavailable"
    result = measure_step_memory(opt.step, device=device)
    return int(result.allocated_peak_bytes), result.method


def _floor_bytes(shapes: list[tuple[int, ...]], algorithm: str, element_size: int,
                 table: dict[str, tuple[int, int]] = BYTES_PER_ELEMENT) -> int:
    factored_b, other_b = table[algorithm]
    total = 0
    for s in shapes:
        n = math.prod(s)
        total += n * (factored_b if len(s) >= 2 else other_b)
    return total * element_size // 4


def run_set(
    set_name: str,
    *,
    device: torch.device,
    rounds: int = 7,
    warmup: int = 2,
    with_compile: bool = False,
    names: list[str] | None = None,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Benchmark every candidate on one parameter set; returns a JSON-ready dict."""
    shapes = param_shapes(set_name)
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((0.02 * torch.randn(s, generator=gen)).to(device))
        p.grad = (1e-3 * torch.randn(s, generator=gen)).to(device)
        params.append(p)
    cands = [c for c in candidates(device, with_compile) if names is None or c.name in names]
    if not any(c.name == "AdamW fused" for c in cands):
        raise ValueError("the benchmark needs the 'AdamW fused' candidate as its yardstick")

    numel = sum(p.numel() for p in params)
    probe_a = torch.randn(max(numel, 1 << 22), device=device)
    probe_b = torch.randn_like(probe_a)
    probes = {name: (bpe * probe_a.numel(), make(probe_a, probe_b))
              for name, (bpe, make) in PROBES.items()}

    bar = _progress(total=len(cands) * (warmup + 2) + rounds * (len(cands) + len(probes)),
                    desc=set_name, enabled=progress)
    opts: dict[str, torch.optim.Optimizer] = {}
    first: dict[str, float] = {}
    for cand in cands:
        opt = cand.make(params)
        first[cand.name] = timed(opt.step, device)
        bar.update(1)
        for _ in range(warmup):
            opt.step()
            bar.update(1)
        opts[cand.name] = opt

    memory: dict[str, tuple[int | None, str]] = {}
    for cand in cands:
        if cand.name == "CAME compiled" and device.type == "cpu":
            # torch.compile refuses to run under the CPU tracker's dispatch mode (the step
            # would fall back to eager code), so there is nothing meaningful to measure.
            memory[cand.name] = (None, "n/a: torch.compile does not run under a dispatch mode")
        else:
            memory[cand.name] = _extra_step_bytes(opts[cand.name], device)
        bar.update(1)

    steps = {c.name: opts[c.name].step for c in cands}
    for name, (_, probe) in probes.items():
        steps[name] = probe
    times = interleaved_times(steps, rounds, device, on_step=lambda: bar.update(1))
    bar.close()

    element_size = params[0].element_size()
    floors = {c.name: _floor_bytes(shapes, c.algorithm, element_size) for c in cands}
    reads = {c.name: _floor_bytes(shapes, c.algorithm, element_size, READ_BYTES_PER_ELEMENT)
             for c in cands}
    median = {name: statistics.median(t) for name, t in times.items()}
    rates = {name: nbytes / median[name] for name, (nbytes, _) in probes.items()}
    rates.update({c.name: floors[c.name] / median[c.name] for c in cands})
    read_rates = {name: PROBE_READ_BYTES[name] * probe_a.numel() / median[name]
                  for name in probes}
    read_rates.update({c.name: reads[c.name] / median[c.name] for c in cands})
    bandwidth, bandwidth_source = attainable_bandwidth(rates)
    read_bandwidth, read_source = attainable_bandwidth(read_rates)

    def floor_of(name: str) -> tuple[float, str]:
        total_s, read_s = floors[name] / bandwidth, reads[name] / read_bandwidth
        return (total_s, "bytes") if total_s >= read_s else (read_s, "reads")

    adamw_floor_s = floor_of("AdamW fused")[0]
    ratios = median_ratios(times, "AdamW fused")
    adamw_state = _state_bytes(opts["AdamW fused"])
    rows = []
    for cand in cands:
        t = times[cand.name]
        floor_bytes = floors[cand.name]
        floor_s, bound = floor_of(cand.name)
        state = _state_bytes(opts[cand.name])
        extra, method = memory[cand.name]
        rows.append({
            "name": cand.name,
            "note": cand.note,
            "median_step_s": statistics.median(t),
            "ratio_to_adamw_fused": ratios[cand.name],
            "floor_bytes": floor_bytes,
            "floor_read_bytes": reads[cand.name],
            "floor_s": floor_s,
            "floor_bound": bound,
            "floor_ratio_to_adamw": floor_s / adamw_floor_s,
            "ratio_to_floor": statistics.median(t) / floor_s,
            "achieved_GBps": rates[cand.name] / 1e9,
            "achieved_read_GBps": read_rates[cand.name] / 1e9,
            "state_bytes": state,
            "state_ratio_to_adamw": state / adamw_state if adamw_state else None,
            "extra_step_bytes": extra,
            "extra_step_ratio_to_params": None if extra is None else extra / (numel * element_size),
            "memory_method": method,
            "first_step_s": first[cand.name],
            "step_times_s": t,
        })
    return {
        "set": set_name,
        "shapes": describe(shapes),
        "param_bytes": numel * element_size,
        "bandwidth_GBps": bandwidth / 1e9,
        "bandwidth_source": bandwidth_source,
        "read_bandwidth_GBps": read_bandwidth / 1e9,
        "read_bandwidth_source": read_source,
        "probe_GBps": {name: rates[name] / 1e9 for name in probes},
        "probe_times_s": {name: times[name] for name in probes},
        "rounds": rounds,
        "warmup": warmup,
        "results": rows,
    }


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the benchmark ran: the recipes' machine description plus device details."""
    from ..recipes.report import machine_info as base_info

    info = {**base_info(), "device": str(device), "cpu_capability": _cpu_capability()}
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = os.getloadavg()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover
        return "unknown"


def run_bench(
    sets: list[str],
    *,
    device: str | torch.device = "cpu",
    rounds: int = 7,
    warmup: int = 2,
    with_compile: bool = False,
    names: list[str] | None = None,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Run :func:`run_set` for each set; returns the whole report (JSON-ready)."""
    device = torch.device(device)
    report: dict[str, Any] = {
        "command": command or " ".join(["torchcame", "bench", *sys.argv[1:]]),
        "machine": machine_info(device),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sets": [],
    }
    for name in sets:
        report["sets"].append(run_set(name, device=device, rounds=rounds, warmup=warmup,
                                      with_compile=with_compile, names=names,
                                      progress=progress))
    if hasattr(os, "getloadavg"):
        report["machine"]["loadavg_end"] = os.getloadavg()
    return report


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def format_table(report: dict[str, Any]) -> str:
    """A Markdown table per parameter set."""
    lines = []
    for s in report["sets"]:
        lines.append(
            f"### {s['set']} ({s['shapes']['parameters'] / 1e6:.1f}M params, "
            f"{s['shapes']['tensors']} tensors; attainable bandwidth "
            f"{s['bandwidth_GBps']:.1f} GB/s ({s['bandwidth_source']}; "
            + ", ".join(f"{k} {v:.1f}" for k, v in s["probe_GBps"].items())
            + (f"), reads {s['read_bandwidth_GBps']:.1f} GB/s ({s['read_bandwidth_source']}"
               if "read_bandwidth_GBps" in s else "")
            + f"); {s['rounds']} rounds)"
        )
        lines.append("")
        lines.append("| optimizer | step ms (median) | × fused AdamW | × bandwidth floor | "
                     "floor × AdamW's | GB/s | state MiB | state × AdamW | extra step MiB | "
                     "first step s |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in s["results"]:
            state_ratio = r["state_ratio_to_adamw"]
            lines.append(
                f"| {r['name']} | {1e3 * r['median_step_s']:,.1f} | "
                f"{r['ratio_to_adamw_fused']:.2f} | {r['ratio_to_floor']:.2f} | "
                f"{_floor_cell(r)} | {r['achieved_GBps']:.1f} | {_mib(r['state_bytes'])} | "
                f"{'' if state_ratio is None else f'{state_ratio:.2f}'} | "
                f"{'n/a' if r['extra_step_bytes'] is None else _mib(r['extra_step_bytes'])} | "
                f"{r['first_step_s']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def _floor_cell(row: dict[str, Any]) -> str:
    if "floor_ratio_to_adamw" not in row:  # reports written before the read bound
        return ""
    return f"{row['floor_ratio_to_adamw']:.2f} ({row['floor_bound']})"


def write_json(report: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")


def plot(report: dict[str, Any], path: str) -> None:
    """A bar chart of each set's step time relative to fused AdamW (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = report["sets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(4.5 * len(sets), 3.8), squeeze=False)
    for ax, s in zip(axes[0], sets, strict=True):
        names = [r["name"] for r in s["results"]]
        ratios = [r["ratio_to_adamw_fused"] for r in s["results"]]
        colors = ["tab:blue" if n.startswith("CAME") else "tab:gray" for n in names]
        ax.barh(names[::-1], ratios[::-1], color=colors[::-1])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("step time / fused AdamW (median of rounds)")
        ax.set_title(s["set"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NullBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NullBar()
    return tqdm(total=total, desc=desc, unit="step", leave=False)

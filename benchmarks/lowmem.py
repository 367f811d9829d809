"""Low-memory CAME, measured: state bytes, peak training memory, quantization error, quality.

Parts (``--parts``, default all):

* ``state``: optimizer-state bytes per parameter on GPT-2 124M shapes for CAME (float32,
  bf16 and int8 momentum), torch AdamW, torch Adafactor and the authors' ``came-pytorch``.
* ``peak``: peak tensor memory of one training step of the demo model (GPT-2 2x128, batches
  of 1 to 16 sequences of 64 tokens; 16 is the demo's) for AdamW fp32, CAME fp32, and CAME
  with bf16 weights + 8-bit momentum + stochastic rounding + step-in-backward (and the steps
  in between), beside a floor no optimizer can beat (bf16 weights, gradients freed as they
  arrive, no update). The fused kernel's C++ scratch memory (not tensors) is added as its
  bound, ``torchcame._impl.cpu_kernel.kernel_workspace_bytes``.
* ``peak-wide``: the same at batch 1 on a model whose weights, gradients and state dominate
  (the demo's GPT-2 widened to 4 layers of d=512, 12.7M parameters).
* ``error``: block-wise int8 error of the momentum of a float32 CAME run of the demo model,
  for several block sizes (bitsandbytes-style: relative L2 error, and max error against the
  absmax/254 bound).
* ``quality``: final validation loss of the GPT recipe (demo model, ``--steps``) over seeds
  for each momentum mode, and the whole low-memory configuration, next to float32 CAME.
* ``speed``: optimizer-step time on GPT-2 124M shapes of the low-memory step (bf16 weights,
  int8 momentum, stochastic rounding) on the fused kernel and on the multi-tensor path,
  beside fused AdamW and fused float32 CAME (interleaved rounds, median of ratios).

Results go to ``benchmarks/results/lowmem/`` (JSON, PNG, markdown). Run from the repo root:

    python benchmarks/lowmem.py                    # everything (~15 min on 2 CPU cores)
    python benchmarks/lowmem.py --parts state peak # the quick parts
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

from torchcame import CAME, step_in_backward
from torchcame.bench.timing import interleaved_times, median_ratios, median_times
from torchcame.lowbit import dequantize_blockwise, quantize_blockwise
from torchcame.memory import MB, measure_step_memory, optimizer_state_bytes
from torchcame.recipes.report import machine_info, mean_std, write_json

OUT = Path(__file__).resolve().parent / "results" / "lowmem"


def gpt2_124m_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of GPT-2 small (124M; Radford et al. 2019), tied output embedding."""
    d, ff, vocab, ctx, layers = 768, 3072, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, ff), (ff,), (ff, d), (d,)]
    return shapes + [(d,), (d,)]


# ------------------------------------------------------------------------------ state bytes


def part_state() -> dict:
    from tqdm.auto import tqdm

    shapes = gpt2_124m_shapes()
    params = [torch.zeros(s, requires_grad=True) for s in shapes]
    numel = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    candidates = {
        "AdamW (torch)": lambda ps: torch.optim.AdamW(ps, lr=1e-4),
        "Adafactor (torch)": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
        "came-pytorch (authors)": _came_pytorch,
        "CAME float32 momentum": lambda ps: CAME(ps, lr=1e-4),
        "CAME bf16 momentum": lambda ps: CAME(ps, lr=1e-4, momentum_dtype=torch.bfloat16),
        "CAME int8 momentum": lambda ps: CAME(ps, lr=1e-4, momentum_dtype="int8"),
    }
    rows = []
    for name, make in tqdm(candidates.items(), desc="state bytes"):
        if make is None:
            continue
        opt = make(params)
        if opt is None:
            continue
        opt.step()
        nbytes = optimizer_state_bytes(opt, include_scalars=False)
        rows.append({"optimizer": name, "state_bytes": nbytes, "bytes_per_param": nbytes / numel})
        del opt
        gc.collect()
    adamw = rows[0]["state_bytes"]
    for row in rows:
        row["ratio_to_adamw"] = row["state_bytes"] / adamw
    return {"params": numel, "rows": rows}


def _came_pytorch(params):
    try:
        from came_pytorch import CAME as ReferenceCAME
    except ImportError:
        return None
    return ReferenceCAME(params, lr=1e-4)


# ------------------------------------------------------------------------------ peak memory


PEAK_CONFIGS = {
    "AdamW fp32": dict(opt="adamw"),
    "CAME fp32": dict(opt="came"),
    "CAME fp32 + step-in-backward": dict(opt="came", sib=True),
    "CAME int8 momentum": dict(opt="came", momentum="int8"),
    "CAME bf16 weights + int8 + SR": dict(opt="came", momentum="int8", bf16=True),
    "CAME bf16 weights + int8 + SR + step-in-backward": dict(
        opt="came", momentum="int8", bf16=True, sib=True
    ),
    "CAME bf16 weights + int8 + SR + step-in-backward, fused": dict(
        opt="came", momentum="int8", bf16=True, sib=True, fused=True
    ),
    "floor: bf16 weights, no optimizer state, grads freed": dict(opt="none", bf16=True),
}

#: The configuration the issue's target is about, and the floor no optimizer can go below.
TARGET_CONFIG = "CAME bf16 weights + int8 + SR + step-in-backward, fused"
FLOOR_CONFIG = "floor: bf16 weights, no optimizer state, grads freed"


#: A model whose weights, gradients and optimizer state dominate a batch-1 step: the demo's
#: GPT-2 widened to d=512 and 4 layers (12.7M parameters, byte vocabulary, 64-token context).
WIDE_MODEL = {"n_layer": 4, "d_model": 512, "n_head": 8}


def _demo_model(bf16: bool, seed: int = 0, wide: bool = False):
    from torchcame.recipes.demo import DEMO_DEFAULTS
    from torchcame.recipes.train import LMConfig, build_model

    torch.manual_seed(seed)
    cfg = DEMO_DEFAULTS
    if wide:
        cfg = LMConfig(**{**DEMO_DEFAULTS.as_dict(), **WIDE_MODEL})
    model = build_model(cfg)
    return model.to(torch.bfloat16) if bf16 else model


def _free_grads_in_backward(model) -> list:
    """Drop each gradient as soon as it is accumulated (the floor: no update at all)."""
    def drop(param):
        param.grad = None

    return [p.register_post_accumulate_grad_hook(drop) for p in model.parameters()]


def _kernel_workspace(opt, cfg: dict) -> int:
    """Bytes of the fused CPU kernel's C++ scratch memory (not tensors, so not tracked):
    the largest tensor's bound with step-in-backward (one tensor at a time), else the sum
    of the ``threads`` largest (small tensors are stepped concurrently)."""
    if not cfg.get("fused"):
        return 0
    from torchcame._impl.cpu_kernel import kernel_workspace_bytes

    block = opt.param_groups[0]["quantization_block_size"]
    sizes = sorted((kernel_workspace_bytes(
        p.shape, unit=block if "exp_avg_absmax" in opt.state[p] else 4096)
        for g in opt.param_groups for p in g["params"]), reverse=True)
    return sizes[0] if cfg.get("sib") else sum(sizes[: torch.get_num_threads()])


def part_peak(batch_size: int, wide: bool = False) -> dict:
    from tqdm.auto import tqdm

    from torchcame.recipes.demo import DEMO_DEFAULTS

    seq = DEMO_DEFAULTS.seq_len
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (batch_size, seq), generator=gen) for _ in range(4)]
    rows = []
    configs = {k: v for k, v in PEAK_CONFIGS.items() if not wide or k in WIDE_CONFIGS}
    label = "wide model" if wide else "demo model"
    for name, cfg in tqdm(configs.items(), desc=f"peak memory, {label}, batch {batch_size}"):
        model = _demo_model(cfg.get("bf16", False), wide=wide)
        handles = []
        if cfg["opt"] == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        elif cfg["opt"] == "none":
            opt = None
            handles = _free_grads_in_backward(model)
        else:
            opt = CAME(model.parameters(), lr=1e-3, momentum_dtype=cfg.get("momentum", "float32"),
                       stochastic_rounding=cfg.get("bf16", False), fused=cfg.get("fused"))
        if cfg.get("sib"):
            handles.append(step_in_backward(opt))

        def train_step(batch, model=model, opt=opt):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)

        for batch in batches[:3]:  # state exists before the measured step
            train_step(batch)
        baseline = [model] if opt is None else [model, opt]
        memory = measure_step_memory(lambda: train_step(batches[3]), baseline=baseline)
        workspace = 0 if opt is None else _kernel_workspace(opt, cfg)
        params_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        rows.append({
            "config": name,
            "impl": "fused" if cfg.get("fused") else ("-" if opt is None else "default"),
            "peak_bytes": memory.peak_bytes + workspace,
            "params_bytes": params_bytes,
            "state_bytes": 0 if opt is None else optimizer_state_bytes(opt),
            "step_allocated_peak_bytes": memory.allocated_peak_bytes,
            "kernel_workspace_bytes": workspace,
        })
        for handle in handles:
            handle.remove()
    base = rows[0]["peak_bytes"]
    for row in rows:
        row["ratio_to_adamw_fp32"] = row["peak_bytes"] / base
    params = sum(p.numel() for p in _demo_model(False, wide=wide).parameters())
    return {"batch_size": batch_size, "seq_len": seq, "rows": rows,
            "model": f"GPT-2 {'4x512' if wide else '2x128'}, {params / 1e6:.2f}M params"}


WIDE_CONFIGS = ("AdamW fp32", "CAME fp32", "CAME int8 momentum", TARGET_CONFIG, FLOOR_CONFIG)


def plot_peak(results: list[dict], path: Path) -> None:
    """Peak memory over AdamW fp32's, against the batch size, for a few configurations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ["CAME fp32", "CAME bf16 weights + int8 + SR + step-in-backward", TARGET_CONFIG,
             FLOOR_CONFIG]
    batches = [r["batch_size"] for r in results]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in shown:
        ratios = [next(x["ratio_to_adamw_fp32"] for x in r["rows"] if x["config"] == name)
                  for r in results]
        ax.plot(batches, ratios, marker="o", label=name.replace("step-in-backward", "SIB"),
                linestyle="--" if name == FLOOR_CONFIG else "-")
    ax.axhline(0.35, color="grey", linewidth=1)
    ax.text(batches[0], 0.355, "target 0.35", color="grey", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (sequences of 64 tokens)")
    ax.set_ylabel("peak memory / AdamW fp32 peak")
    ax.set_title("Peak training-step memory, demo model (GPT-2 2x128)")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------- quantization error


def part_error(steps: int, block_sizes: list[int]) -> dict:
    """Quantize the momentum of a float32 CAME run at a few steps, per block size."""
    from tqdm.auto import tqdm

    from torchcame.recipes.data import BatchSampler, load_corpus
    from torchcame.recipes.demo import DEMO_DEFAULTS

    model = _demo_model(False)
    opt = CAME(model.parameters(), lr=1e-3)

    corpus = load_corpus(None, max_bytes=2_000_000)
    sampler = BatchSampler(corpus.train, DEMO_DEFAULTS.batch_size, DEMO_DEFAULTS.seq_len, seed=0)
    checkpoints = sorted({max(1, steps // 20), steps // 4, steps // 2, steps})
    samples = []
    for step in tqdm(range(1, steps + 1), desc="error study"):
        batch = next(sampler)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step in checkpoints:
            for block in block_sizes:
                num = den = 0.0
                worst = 0.0
                for state in opt.state.values():
                    m = state["exp_avg"]
                    if m.numel() < 4096:
                        continue
                    codes, absmax = quantize_blockwise(m, block)
                    err = dequantize_blockwise(codes, absmax, block) - m
                    num += float(err.square().sum())
                    den += float(m.square().sum())
                    bound = (absmax / 254).repeat_interleave(block)[: m.numel()].view(m.shape)
                    worst = max(worst, float((err.abs() / bound.clamp_min(1e-38)).max()))
                samples.append({"step": step, "block_size": block,
                                "relative_l2_error": (num / den) ** 0.5,
                                "max_error_over_bound": worst,
                                "bytes_per_element": 1 + 4 / block})
    return {"steps": steps, "samples": samples}


def plot_error(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = sorted({s["step"] for s in result["samples"]})
    for step in steps:
        pts = [s for s in result["samples"] if s["step"] == step]
        ax.plot([s["block_size"] for s in pts], [s["relative_l2_error"] for s in pts],
                marker="o", label=f"step {step}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size (elements per float32 scale)")
    ax.set_ylabel("relative L2 error of int8 momentum")
    ax.set_title("Block-wise int8 momentum error (GPT-2 demo model, CAME)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ quality


#: fp32 CAME first (the reference), then the momentum modes, then the whole low-memory
#: configuration (bf16 weights + int8 momentum + stochastic rounding + step-in-backward,
#: fused kernel; without the recipe's global gradient clipping, see LOWMEM_TRAINING).
QUALITY_MODES = ("came", "came-bf16", "came-int8", "came-lowmem")


def part_quality(steps: int, seeds: list[int], modes: list[str], command: str,
                 previous: dict | None = None) -> dict:
    """Train each mode over ``seeds``; rows of ``previous`` (same steps and seeds) for modes
    not run now are kept, so modes can be (re)measured one at a time."""
    from torchcame.recipes.demo import DEMO_DEFAULTS
    from torchcame.recipes.train import LMConfig, run_comparison

    cfg = LMConfig(**{**DEMO_DEFAULTS.as_dict(), "lrs": {}, "steps": steps,
                      "optimizers": tuple(modes), "seeds": tuple(seeds),
                      "measure_memory": False})
    runs, _ = run_comparison(cfg)
    kept = {}
    if previous and previous.get("steps") == steps and previous.get("seeds") == seeds:
        kept = {r["mode"]: r for r in previous["rows"] if r["mode"] not in modes}
        runs = [r for r in previous.get("runs", []) if r["optimizer"] in kept] + runs
    rows = []
    for mode in QUALITY_MODES:
        if mode in kept:
            rows.append(kept[mode])
            continue
        vals = [r["final_val_loss"] for r in runs if r["optimizer"] == mode]
        if not vals:
            continue
        mean, std = mean_std(vals)
        secs = [r["wall_seconds"] for r in runs if r["optimizer"] == mode]
        rows.append({"mode": mode, "final_val_loss": vals, "mean": mean, "std": std,
                     "wall_seconds_mean": sum(secs) / len(secs), "command": command})
    base = next((r["mean"] for r in rows if r["mode"] == "came"), None)
    for row in rows:
        row["relative_to_fp32"] = None if base is None else row["mean"] / base - 1
    return {"steps": steps, "seeds": seeds, "rows": rows,
            "runs": [{k: v for k, v in r.items() if k != "history"} for r in runs]}


# ------------------------------------------------------------------------------ step speed


SPEED_CONFIGS = {
    "AdamW fused, fp32 weights": dict(opt="adamw", dtype=torch.float32),
    "CAME fused, fp32 weights": dict(opt="came", dtype=torch.float32, fused=True),
    "CAME bf16 weights + int8 + SR, fused kernel": dict(
        opt="came", dtype=torch.bfloat16, fused=True, momentum="int8", sr=True),
    "CAME bf16 weights + int8 + SR, foreach (float32 chunks)": dict(
        opt="came", dtype=torch.bfloat16, foreach=True, momentum="int8", sr=True),
}


def part_speed(rounds: int) -> dict:
    """Optimizer-step time on GPT-2 124M shapes, candidates stepped in turn round after round;
    the median over rounds of each candidate's time over fused AdamW's in the same round."""
    from tqdm.auto import tqdm

    shapes = gpt2_124m_shapes()
    gen = torch.Generator().manual_seed(0)
    grads32 = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    setups = {}
    for name, cfg in SPEED_CONFIGS.items():
        params = [torch.zeros(s, dtype=cfg["dtype"], requires_grad=True) for s in shapes]
        for p, g in zip(params, grads32):
            p.grad = g.to(cfg["dtype"])
        if cfg["opt"] == "adamw":
            opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        else:
            opt = CAME(params, lr=1e-4, momentum_dtype=cfg.get("momentum", "float32"),
                       stochastic_rounding=cfg.get("sr", False), fused=cfg.get("fused"),
                       foreach=cfg.get("foreach"))
        opt.step()  # state, kernel build, warm caches
        setups[name] = opt
    del grads32
    bar = tqdm(total=rounds * len(setups), desc="step speed (steps)")
    times = interleaved_times({name: opt.step for name, opt in setups.items()}, rounds,
                              on_step=lambda: bar.update(1))
    bar.close()
    ratios = median_ratios(times, "AdamW fused, fp32 weights")
    seconds = median_times(times)
    rows = [{"config": name, "median_seconds": seconds[name],
             "ratio_to_fused_adamw": ratios[name], "times": times[name]} for name in setups]
    return {"rounds": rounds, "threads": torch.get_num_threads(), "rows": rows}


# ------------------------------------------------------------------------------ main


def markdown(results: dict) -> str:
    lines = [f"# Low-memory CAME — measured ({time.strftime('%Y-%m-%d')})", "",
             "Each section names the command that produced it (`python benchmarks/lowmem.py` "
             "runs them all).", "", f"Machine: {json.dumps(results['machine'])}", ""]

    def command(part) -> list[str]:
        return [f"Command: `{part.get('command', 'python benchmarks/lowmem.py')}`", ""]

    if "state" in results:
        r = results["state"]
        lines += [f"## Optimizer state on GPT-2 124M shapes ({r['params'] / 1e6:.1f}M params)", ""]
        lines += command(r) + ["| optimizer | state MB | bytes / param | × AdamW |",
                               "|---|---|---|---|"]
        lines += [f"| {x['optimizer']} | {x['state_bytes'] / MB:.1f} | {x['bytes_per_param']:.3f} "
                  f"| {x['ratio_to_adamw']:.3f} |" for x in r["rows"]]
        lines.append("")
    for r in results.get("peak", []) + results.get("peak_wide", []):
        lines += [f"## Peak training-step memory, {r.get('model', 'demo model')} (batch "
                  f"{r['batch_size']}×{r['seq_len']})", ""]
        lines += command(r) + ["| configuration | peak MB | params MB | state MB | "
                               "kernel scratch KB | × AdamW fp32 |", "|---|---|---|---|---|---|"]
        lines += [f"| {x['config']} | {x['peak_bytes'] / MB:.2f} | {x['params_bytes'] / MB:.2f} | "
                  f"{x['state_bytes'] / MB:.2f} | {x.get('kernel_workspace_bytes', 0) / 1024:.1f} "
                  f"| {x['ratio_to_adamw_fp32']:.3f} |" for x in r["rows"]]
        lines.append("")
    if "speed" in results:
        r = results["speed"]
        lines += [f"## Optimizer-step time, GPT-2 124M shapes ({r['threads']} threads, "
                  f"{r['rounds']} interleaved rounds)", ""]
        lines += command(r) + ["| configuration | median step s | × fused AdamW (median of "
                               "per-round ratios) |", "|---|---|---|"]
        lines += [f"| {x['config']} | {x['median_seconds']:.3f} | "
                  f"{x['ratio_to_fused_adamw']:.2f} |" for x in r["rows"]]
        lines.append("")
    if "error" in results:
        r = results["error"]
        lines += ["## int8 momentum error by block size", ""]
        lines += command(r) + [
            "| step | block | relative L2 error | max error / (absmax/254) | bytes/elem |",
            "|---|---|---|---|---|"]
        lines += [f"| {s['step']} | {s['block_size']} | {s['relative_l2_error']:.4f} | "
                  f"{s['max_error_over_bound']:.3f} | {s['bytes_per_element']:.4f} |"
                  for s in r["samples"]]
        lines.append("")
    if "quality" in results:
        r = results["quality"]
        lines += [f"## Final validation loss, GPT recipe (demo model, {r['steps']} steps, "
                  f"seeds {r['seeds']})", ""]
        lines += ["| mode | mean ± std | vs fp32 CAME | command |", "|---|---|---|---|"]
        lines += [f"| {x['mode']} | {x['mean']:.4f} ± {x['std']:.4f} | "
                  f"{100 * (x['relative_to_fp32'] or 0):+.2f}% | "
                  f"`{x.get('command', r.get('command', ''))}` |" for x in r["rows"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parts = ["state", "peak", "peak-wide", "error", "quality", "speed"]
    parser.add_argument("--parts", nargs="+", default=parts, choices=parts)
    parser.add_argument("--speed-rounds", type=int, default=7)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                        help="peak: batch sizes (16 is the demo's)")
    parser.add_argument("--error-steps", type=int, default=200)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512,
                                                                         2048])
    parser.add_argument("--quality-steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quality-modes", nargs="+", default=list(QUALITY_MODES),
                        choices=list(QUALITY_MODES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "lowmem.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = machine_info()
    cmd = "python benchmarks/lowmem.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if "state" in args.parts:
        results["state"] = {**part_state(), "command": cmd}
    if "peak" in args.parts:
        results["peak"] = [{**part_peak(b), "command": cmd} for b in args.batch_sizes]
        plot_peak(results["peak"], args.out / "peak_vs_batch.png")
    if "peak-wide" in args.parts:
        results["peak_wide"] = [{**part_peak(1, wide=True), "command": cmd}]
    if "error" in args.parts:
        results["error"] = {**part_error(args.error_steps, args.block_sizes), "command": cmd}
        plot_error(results["error"], args.out / "int8_error.png")
    if "quality" in args.parts:
        results["quality"] = part_quality(args.quality_steps, args.seeds, args.quality_modes,
                                          cmd, results.get("quality"))
    if "speed" in args.parts:
        results["speed"] = {**part_speed(args.speed_rounds), "command": cmd}
    write_json(results, path)
    (args.out / "lowmem.md").write_text(markdown(results) + "\n")
    print(markdown(results))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

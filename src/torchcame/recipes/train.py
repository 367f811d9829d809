"""The training loop shared by the GPT and BERT recipes and by ``torchcame demo``.

One :class:`LMConfig` describes a comparison: a model size, a corpus, a schedule (linear
warmup then cosine decay to ``min_lr_ratio`` of the peak), and the optimizers and seeds to
run. :func:`run_comparison` trains one fresh model per (seed, optimizer): for a given seed
every optimizer starts from the same initial weights and sees the same batches in the same
order, so the optimizers are the only difference. Each run measures

- the per-step training loss and the validation loss every ``eval_every`` steps,
- the final training and validation loss on fixed held-out windows (``eval_batches``
  batches each; the training ones are fixed windows of the training stream),
- the optimizer state size (:func:`torchcame.memory.optimizer_state_bytes`),
- the peak tensor memory of one training step (:func:`torchcame.memory.measure_step_memory`:
  parameters + optimizer state + everything the step allocates; CUDA: the allocator's peak),
- the median step time (forward, backward, clipping, optimizer step) excluding the first
  steps and the measured one.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..memory import MB, measure_step_memory, optimizer_state_bytes
from ..step_in_backward import step_in_backward
from .data import MLM_VOCAB, PAD_ID, BatchSampler, Corpus, load_corpus, mask_tokens
from .optimizers import (
    DEFAULT_LR,
    HYPER_KEYS,
    LOWMEM_TRAINING,
    OPTIMIZERS,
    VARIANTS,
    build_optimizer,
    resolved_hyper,
)

__all__ = [
    "LMConfig",
    "build_model",
    "lr_lambda",
    "run_one",
    "run_comparison",
    "add_common_args",
    "config_from_args",
    "set_threads",
]


@dataclass
class LMConfig:
    """What a GPT or BERT comparison runs (all fields are recorded in the report)."""

    task: str = "gpt"  # "gpt" (causal LM), "bert" (masked LM) or "llama" (causal LM)
    n_layer: int = 2
    d_model: int = 128
    n_head: int = 4
    seq_len: int = 64
    batch_size: int = 16
    steps: int = 300
    warmup: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global gradient-norm clipping for every optimizer; 0 = off
    eval_every: int = 50
    eval_batches: int = 8
    mask_prob: float = 0.15
    optimizers: tuple[str, ...] = ("came", "adamw", "adafactor")
    lrs: dict[str, float] = field(default_factory=dict)  # overrides of DEFAULT_LR
    # per-optimizer overrides of betas, eps, clip_threshold, beta2_decay, weight_decay
    hyper: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    device: str = "cpu"
    data: str | None = None  # None: the standard library of this interpreter
    max_bytes: int = 8_000_000
    measure_memory: bool = True

    def lr_of(self, name: str) -> float:
        return float(self.lrs.get(name, DEFAULT_LR[name]))

    def weight_decay_of(self, name: str) -> float:
        return float(self.hyper.get(name, {}).get("weight_decay", self.weight_decay))

    def overrides_of(self, name: str) -> dict[str, Any]:
        """The hyperparameter overrides of ``name`` other than lr and weight decay."""
        return {k: v for k, v in self.hyper.get(name, {}).items() if k != "weight_decay"}

    def hyper_of(self, name: str, lr: float | None = None) -> dict[str, Any]:
        """Every hyperparameter optimizer ``name`` runs with (see ``resolved_hyper``)."""
        return resolved_hyper(
            name,
            lr=self.lr_of(name) if lr is None else lr,
            weight_decay=self.weight_decay_of(name),
            hyper=self.overrides_of(name),
        )

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lrs"] = {name: self.lr_of(name) for name in self.optimizers}
        d["hyper"] = {name: self.hyper_of(name) for name in self.optimizers}
        return d


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads; ``None`` or ``0`` picks the idle cores.

    Auto mode takes the cores this process may run on minus the 1-minute load average
    (at least 1). On a shared machine this matters a lot: with more busy threads than
    cores, OpenMP threads wait for each other at every barrier, and a 2-thread step of the
    demo model measured 2.6 s instead of 0.1 s with 1 thread (load average ~8 on 2 cores).
    """
    if threads is None or threads <= 0:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
        threads = max(1, min(cores, int(cores - load + 0.5)))
    torch.set_num_threads(threads)
    return threads


def build_model(cfg: LMConfig) -> torch.nn.Module:
    """A freshly initialized GPT-2 (``GPT2LMHeadModel``), BERT (``BertForMaskedLM``) or
    Llama (``LlamaForCausalLM``: RMSNorm, rotary positions, SwiGLU of width 8/3·d_model
    rounded up to a multiple of 8).

    Built from a config, never downloaded. Byte vocabulary (256; BERT adds 4 special ids),
    no dropout (the runs are short and deterministic), feed-forward width 4·d_model, tied
    input and output embeddings (the library default).
    """
    import transformers

    transformers.logging.set_verbosity_error()
    if cfg.task == "gpt":
        config = transformers.GPT2Config(
            vocab_size=256,
            n_positions=cfg.seq_len,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
        )
        return transformers.GPT2LMHeadModel(config)
    if cfg.task == "bert":
        config = transformers.BertConfig(
            vocab_size=MLM_VOCAB,
            hidden_size=cfg.d_model,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            intermediate_size=4 * cfg.d_model,
            max_position_embeddings=cfg.seq_len,
            type_vocab_size=1,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=PAD_ID,
        )
        return transformers.BertForMaskedLM(config)
    if cfg.task == "llama":
        config = transformers.LlamaConfig(
            vocab_size=256,
            hidden_size=cfg.d_model,
            intermediate_size=8 * math.ceil(8 * cfg.d_model / 3 / 8),
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_head,
            max_position_embeddings=cfg.seq_len,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
        return transformers.LlamaForCausalLM(config)
    raise ValueError(f"unknown task {cfg.task!r} (gpt, bert or llama)")


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


class _Task:
    """Turns token windows into model inputs and losses for one task."""

    def __init__(self, cfg: LMConfig, seed: int) -> None:
        self.cfg = cfg
        self.mask_gen = torch.Generator().manual_seed(10_000 + seed)
        # BERT: [CLS] + seq_len-2 bytes + [SEP]; GPT: seq_len bytes
        self.window = cfg.seq_len - 2 if cfg.task == "bert" else cfg.seq_len

    def prepare(self, tokens: torch.Tensor, gen: torch.Generator | None = None) -> dict:
        if self.cfg.task != "bert":
            return {"input_ids": tokens, "labels": tokens}
        inputs, labels = mask_tokens(tokens, gen or self.mask_gen, mask_prob=self.cfg.mask_prob)
        b = tokens.shape[0]
        cls = torch.full((b, 1), 258, dtype=tokens.dtype)
        sep = torch.full((b, 1), 259, dtype=tokens.dtype)
        ignore = torch.full((b, 1), -100, dtype=tokens.dtype)
        return {
            "input_ids": torch.cat([cls, inputs, sep], 1),
            "labels": torch.cat([ignore, labels, ignore], 1),
        }

    def fixed(self, stream: torch.Tensor, n_batches: int) -> list[dict]:
        sampler = BatchSampler(stream, self.cfg.batch_size, self.window)
        gen = torch.Generator().manual_seed(1234)  # the same masks for every run
        return [self.prepare(b, gen) for b in sampler.fixed_batches(n_batches)]


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def _evaluate(model: torch.nn.Module, batches: list[dict], device: torch.device) -> float:
    model.eval()
    total = 0.0
    for batch in batches:
        total += float(model(**_to(batch, device)).loss)
    model.train()
    return total / len(batches)


def run_one(
    cfg: LMConfig,
    corpus: Corpus,
    optimizer: str,
    seed: int,
    *,
    lr: float | None = None,
    progress: bool = True,
    eval_sets: tuple[list[dict], list[dict]] | None = None,
    init_state: dict[str, torch.Tensor] | None = None,
    extra_evals: dict[str, list[dict]] | None = None,
    keep_model: bool = False,
) -> dict[str, Any]:
    """Train one model with one optimizer and seed; return the run dict for the report.

    Args:
        init_state: a state dict to start from (fine-tuning) instead of the seed's init.
        extra_evals: more fixed batches, by name, evaluated at the end:
            ``final_<name>_loss`` in the run dict (NaN when diverged).
        keep_model: put the trained model in the run dict under ``"model"``.
    """
    from tqdm.auto import tqdm

    device = torch.device(cfg.device)
    lr = cfg.lr_of(optimizer) if lr is None else float(lr)
    task = _Task(cfg, seed)
    if eval_sets is None:
        eval_sets = (
            task.fixed(corpus.train, cfg.eval_batches),
            task.fixed(corpus.val, cfg.eval_batches),
        )
    train_eval, val_eval = eval_sets
    torch.manual_seed(seed)
    lowmem = LOWMEM_TRAINING.get(optimizer, {})
    model = build_model(cfg)
    if init_state is not None:
        model.load_state_dict(init_state)
    model = model.to(device, dtype=lowmem.get("param_dtype", torch.float32))
    model.train()
    hyper = cfg.hyper_of(optimizer, lr)
    opt = build_optimizer(
        optimizer,
        model.parameters(),
        lr=lr,
        weight_decay=cfg.weight_decay_of(optimizer),
        hyper=cfg.overrides_of(optimizer),
    )
    in_backward = step_in_backward(opt) if lowmem.get("step_in_backward") else None
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(cfg.warmup, cfg.steps, cfg.min_lr_ratio)
    )
    sampler = BatchSampler(corpus.train, cfg.batch_size, task.window, seed=seed)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    hist: dict[str, list] = {
        k: [] for k in ("step", "tokens", "train_loss", "eval_step", "eval_tokens", "val_loss")
    }
    step_times: list[float] = []
    memory = None
    diverged = False
    losses: list[float] = []

    def train_step(batch: dict) -> None:
        loss = model(**batch).loss
        loss.backward()  # with step-in-backward, the parameters are updated here
        if in_backward is None:
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    def evaluate_now(step: int) -> None:
        hist["eval_step"].append(step)
        hist["eval_tokens"].append(step * tokens_per_step)
        hist["val_loss"].append(_evaluate(model, val_eval, device))

    start = time.perf_counter()
    evaluate_now(0)
    bar = tqdm(
        range(cfg.steps),
        desc=f"{optimizer:>9} lr={lr:g} seed={seed}",
        disable=not progress,
        dynamic_ncols=True,
        leave=True,
        mininterval=0.1 if sys.stderr.isatty() else 10.0,  # logs: a line every 10 s
    )
    for step in bar:
        batch = _to(task.prepare(next(sampler)), device)
        if step == 2 and cfg.measure_memory:
            memory = measure_step_memory(
                lambda b=batch: train_step(b), device=device, baseline=[model, opt]
            )
        else:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            train_step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= 3:
                step_times.append(time.perf_counter() - t0)
        sched.step()
        loss = losses[-1]
        hist["step"].append(step + 1)
        hist["tokens"].append((step + 1) * tokens_per_step)
        hist["train_loss"].append(loss)
        if not math.isfinite(loss):
            diverged = True
            bar.close()
            break
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            evaluate_now(step + 1)
            bar.set_postfix(train=f"{loss:.3f}", val=f"{hist['val_loss'][-1]:.3f}")
    wall = time.perf_counter() - start
    if in_backward is not None:
        in_backward.remove()
    state_bytes = optimizer_state_bytes(opt)
    final_val = math.nan if diverged else hist["val_loss"][-1]
    final_train = math.nan if diverged else _evaluate(model, train_eval, device)
    extra = {
        f"final_{name}_loss": math.nan if diverged else _evaluate(model, batches, device)
        for name, batches in (extra_evals or {}).items()
    }
    if keep_model:
        extra["model"] = model
    return {
        **extra,
        "task": cfg.task,
        "optimizer": optimizer,
        "lr": lr,
        "hyper": hyper,
        "seed": seed,
        "params": sum(p.numel() for p in model.parameters()),
        "batch_size": cfg.batch_size,
        "tokens_per_step": tokens_per_step,
        "diverged": diverged,
        "final_train_loss": final_train,
        "final_val_loss": final_val,
        "optimizer_state_mb": state_bytes / MB,
        "optimizer_state_bytes": state_bytes,
        "peak_memory_mb": memory.peak_bytes / MB if memory else None,
        "memory": memory.as_dict() if memory else None,
        "step_time_ms": 1000 * statistics.median(step_times) if step_times else None,
        "wall_seconds": wall,
        "history": hist,
    }


def run_comparison(
    cfg: LMConfig, *, corpus: Corpus | None = None, progress: bool = True
) -> tuple[list[dict[str, Any]], Corpus]:
    """Run every optimizer of ``cfg`` for every seed; returns ``(runs, corpus)``."""
    for name in cfg.optimizers:
        if name not in DEFAULT_LR:
            raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
        cfg.hyper_of(name)  # an override the optimizer does not take fails before training
    if corpus is None:
        corpus = load_corpus(cfg.data, max_bytes=cfg.max_bytes)
    task = _Task(cfg, 0)
    eval_sets = (
        task.fixed(corpus.train, cfg.eval_batches),
        task.fixed(corpus.val, cfg.eval_batches),
    )
    runs = []
    for seed in cfg.seeds:
        for name in cfg.optimizers:
            runs.append(run_one(cfg, corpus, name, seed, progress=progress, eval_sets=eval_sets))
    return runs, corpus


def _parse_lrs(items: Sequence[str] | None, optimizers: Sequence[str]) -> dict[str, float]:
    """``["1e-3"]`` (every optimizer) or ``["came=1e-3", "adamw=2e-3"]``."""
    lrs: dict[str, float] = {}
    for item in items or []:
        for part in item.split(","):
            if "=" in part:
                name, value = part.split("=", 1)
                name = name.strip().lower()
                if name not in DEFAULT_LR:
                    raise argparse.ArgumentTypeError(f"--lr: unknown optimizer {name!r}")
                lrs[name] = float(value)
            else:
                lrs.update({name: float(part) for name in optimizers})
    return lrs


def _number_or_none(text: str) -> float | None:
    text = text.strip()
    return None if text.lower() == "none" else float(text)


def parse_hyper(
    args: argparse.Namespace, optimizers: Sequence[str]
) -> tuple[float | None, dict[str, dict[str, Any]]]:
    """The hyperparameter options of :func:`add_common_args` as per-optimizer overrides.

    Returns:
        ``(global weight decay or None, {name: {key: value}})``. A bare value applies to every
        optimizer of ``optimizers`` whose base optimizer takes the key; ``NAME=VALUES`` to one
        (which must be among ``optimizers``).
    """
    hyper: dict[str, dict[str, Any]] = {}
    global_wd = None
    options = (
        ("weight_decay", "--weight-decay"),
        ("betas", "--betas"),
        ("eps", "--eps"),
        ("clip_threshold", "--clip-threshold"),
        ("beta2_decay", "--beta2-decay"),
    )
    for key, flag in options:
        for item in getattr(args, key, None) or []:
            name, sep, text = item.partition("=")
            if not sep:
                name, text = "", item
            values = [_number_or_none(v) for v in text.split(",") if v.strip()]
            if not values:
                raise SystemExit(f"{flag} {item!r}: no value")
            scalar = key in ("weight_decay", "clip_threshold", "beta2_decay")
            value: Any = values[0] if scalar or (key == "eps" and len(values) == 1) else tuple(
                values
            )
            name = name.strip().lower()
            if name:
                if name not in optimizers:
                    raise SystemExit(f"{flag} {item!r}: {name!r} is not among --optimizers")
                targets = [name]
            elif key == "weight_decay":
                global_wd = float(value)
                continue
            else:
                targets = [n for n in optimizers if key in HYPER_KEYS[VARIANTS[n][0]]]
            for target in targets:
                hyper.setdefault(target, {})[key] = value
    return global_wd, hyper


def add_common_args(parser: argparse.ArgumentParser, defaults: LMConfig) -> None:
    """The options every LM recipe and the demo share."""
    g = parser.add_argument_group("model")
    g.add_argument("--layers", type=int, default=defaults.n_layer, help="transformer layers")
    g.add_argument("--d-model", type=int, default=defaults.d_model, help="hidden size")
    g.add_argument("--heads", type=int, default=defaults.n_head, help="attention heads")
    g.add_argument("--seq-len", type=int, default=defaults.seq_len, help="context length")
    g = parser.add_argument_group("training")
    g.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps per run")
    g.add_argument("--batch-size", type=int, default=defaults.batch_size)
    g.add_argument(
        "--warmup", type=int, default=None, help="warmup steps (default: 10%% of --steps)"
    )
    g.add_argument(
        "--weight-decay",
        action="append",
        metavar="[NAME=]WD",
        help=f"decoupled weight decay, 'came=0.01' or '0.01' for all; repeatable "
        f"(default {defaults.weight_decay:g})",
    )
    g.add_argument(
        "--grad-clip",
        type=float,
        default=defaults.grad_clip,
        help="global gradient-norm clip for every optimizer (0: off)",
    )
    g.add_argument(
        "--optimizers",
        default=",".join(defaults.optimizers),
        help=f"comma-separated, from {','.join(OPTIMIZERS)}",
    )
    g.add_argument(
        "--lr",
        action="append",
        metavar="[NAME=]LR",
        help="peak lr override: 'came=1e-3' or '1e-3' for all; repeatable "
        f"(defaults: {', '.join(f'{k} {v:g}' for k, v in DEFAULT_LR.items())})",
    )
    g = parser.add_argument_group(
        "optimizer hyperparameters",
        "Each takes 'NAME=VALUES' (one optimizer) or bare VALUES (every selected optimizer that "
        "has the hyperparameter) and repeats. Defaults are each variant's own (came: betas "
        "0.9,0.999,0.9999, eps 1e-30,1e-16, clip 1; came-short: betas 0.9,0.95,0.995; adamw: "
        "betas 0.9,0.999, eps 1e-8; adamw-b95: betas 0.9,0.95; adafactor: eps None,1e-3, "
        "clip (d) 1, beta2-decay -0.8; lamb: betas 0.9,0.999, eps 1e-6). Every value used is "
        "recorded in the report.",
    )
    g.add_argument("--betas", action="append", metavar="[NAME=]B1,B2[,B3]")
    g.add_argument("--eps", action="append", metavar="[NAME=]EPS[,EPS2]")
    g.add_argument(
        "--clip-threshold",
        action="append",
        metavar="[NAME=]D",
        help="CAME's update clip d; Adafactor's d",
    )
    g.add_argument("--beta2-decay", action="append", metavar="[NAME=]C", help="Adafactor only")
    g = parser.add_argument_group("runs")
    g.add_argument(
        "--seeds",
        default=",".join(map(str, defaults.seeds)),
        help="comma-separated seeds (model init and batch order)",
    )
    g.add_argument("--eval-every", type=int, default=defaults.eval_every)
    g.add_argument("--eval-batches", type=int, default=defaults.eval_batches)
    g.add_argument(
        "--no-memory", action="store_true", help="skip the peak-memory measurement of one step"
    )
    g = parser.add_argument_group("data and machine")
    g.add_argument(
        "--data", default=None, help="text file or folder (default: this Python's standard library)"
    )
    g.add_argument(
        "--max-bytes", type=int, default=defaults.max_bytes, help="cap on the corpus bytes read"
    )
    g.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1, ...")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: the cores available)",
    )
    g.add_argument("--out", default=None, help="report folder (default ./torchcame-report/...)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def config_from_args(args: argparse.Namespace, task: str) -> LMConfig:
    """Build an :class:`LMConfig` from the options of :func:`add_common_args`."""
    optimizers = tuple(s.strip().lower() for s in args.optimizers.split(",") if s.strip())
    for name in optimizers:
        if name not in DEFAULT_LR:
            raise SystemExit(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    global_wd, hyper = parse_hyper(args, optimizers)
    cfg = LMConfig(
        task=task,
        n_layer=args.layers,
        d_model=args.d_model,
        n_head=args.heads,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=warmup,
        weight_decay=LMConfig.weight_decay if global_wd is None else global_wd,
        hyper=hyper,
        grad_clip=args.grad_clip,
        eval_every=max(1, min(args.eval_every, args.steps)),
        eval_batches=args.eval_batches,
        optimizers=optimizers,
        lrs=_parse_lrs(args.lr, optimizers),
        seeds=tuple(int(s) for s in str(args.seeds).split(",") if s.strip()),
        device=args.device,
        data=args.data,
        max_bytes=args.max_bytes,
        measure_memory=not args.no_memory,
    )
    for name in optimizers:
        try:
            cfg.hyper_of(name)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    return cfg


def claim_checks(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The paper's claims checked on summary rows (mean over seeds), as markdown bullets.

    CAME's final validation loss within 2% of AdamW's and below Adafactor's, with at most
    55% of AdamW's optimizer state.
    """
    by_name = {r["optimizer"]: r for r in rows}
    came, adamw, adafactor = (by_name.get(n) for n in ("came", "adamw", "adafactor"))
    lines = []
    if came is None or "final_val_loss" not in came:
        return lines

    def verdict(ok: bool) -> str:
        return "yes" if ok else "**no**"

    c = came["final_val_loss"]
    if adamw is not None and "final_val_loss" in adamw:
        a = adamw["final_val_loss"]
        rel = (c - a) / a if math.isfinite(a) and math.isfinite(c) else math.nan
        lines.append(
            f"- CAME validation loss within 2% of AdamW's: {verdict(abs(rel) <= 0.02)} "
            f"(CAME {c:.4f}, AdamW {a:.4f}, {100 * rel:+.2f}%)"
        )
        if came.get("optimizer_state_mb") and adamw.get("optimizer_state_mb"):
            ratio = came["optimizer_state_mb"] / adamw["optimizer_state_mb"]
            lines.append(
                f"- CAME optimizer state ≤ 55% of AdamW's: {verdict(ratio <= 0.55)} "
                f"({100 * ratio:.1f}%: {came['optimizer_state_mb']:.3f} MB vs "
                f"{adamw['optimizer_state_mb']:.3f} MB)"
            )
    if adafactor is not None and "final_val_loss" in adafactor:
        f = adafactor["final_val_loss"]
        better = math.isfinite(c) and (not math.isfinite(f) or c < f)
        lines.append(
            f"- CAME validation loss below Adafactor's: {verdict(better)} "
            f"(CAME {c:.4f}, Adafactor {f:.4f})"
        )
    return lines


def run_and_report(
    cfg: LMConfig,
    *,
    title: str,
    out: str | os.PathLike[str],
    progress: bool = True,
    notes: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], Any]:
    """Run a comparison, write its report folder, print the table; returns (runs, path)."""
    from .report import markdown_table, summarize, write_report

    t0 = time.perf_counter()
    runs, corpus = run_comparison(cfg, progress=progress)
    wall = time.perf_counter() - t0
    rows = summarize(runs)
    checks = claim_checks(rows)
    setup_note = (
        f"Corpus: {corpus.name}: {corpus.summary()['train_bytes']:,} train bytes from "
        f"{len(corpus.train_files)} files, {corpus.summary()['val_bytes']:,} validation bytes "
        f"from {len(corpus.val_files)} files (sha256 {corpus.sha256[:12]}). Model: "
        f"{runs[0]['params']:,} parameters. Total wall time {wall:.1f} s."
    )
    all_notes = [setup_note, *(["Targets:\n\n" + "\n".join(checks)] if checks else []), *notes]
    config = {**cfg.as_dict(), "corpus": corpus.summary()}
    path = write_report(
        out,
        title=title,
        config=config,
        runs=runs,
        notes=all_notes,
        extra={"wall_seconds": wall, "claim_checks": checks, **(extra or {})},
    )
    print()
    print(markdown_table(rows))
    print()
    for line in checks:
        print(line)
    print(f"\nwall time {wall:.1f} s; report: {path}")
    return runs, path

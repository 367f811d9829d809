"""Tests of the recipes: corpus, batching, masking, training loop, reports, demo, toy MLP."""

from __future__ import annotations

import argparse
import json
import math
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from torchcame import cli  # noqa: E402
from torchcame.recipes.data import (  # noqa: E402
    MASK_ID,
    BatchSampler,
    load_corpus,
    mask_tokens,
    split_of,
    stdlib_files,
)
from torchcame.recipes.report import (  # noqa: E402
    format_mean_std,
    markdown_table,
    mean_std,
    summarize,
)
from torchcame.recipes.train import (  # noqa: E402
    LMConfig,
    _parse_lrs,
    claim_checks,
    lr_lambda,
    run_comparison,
    set_threads,
)

TINY = {
    "n_layer": 1,
    "d_model": 32,
    "n_head": 2,
    "seq_len": 32,
    "batch_size": 4,
    "eval_every": 5,
    "eval_batches": 2,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # one intra-op thread: on a shared 2-core runner, 2 threads can be 20x slower
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- corpus


def test_stdlib_files_sorted_and_without_installed_packages():
    root, files = stdlib_files()
    assert files == sorted(files)
    assert len(files) > 100
    assert all(f.endswith(".py") for f in files)
    assert not any("site-packages" in f.split("/") for f in files)
    assert "os.py" in files and (root / "os.py").is_file()


def test_default_corpus_is_deterministic_and_split_by_file():
    a = load_corpus(max_bytes=300_000)
    b = load_corpus(max_bytes=300_000)
    assert a.sha256 == b.sha256
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.train.dtype == torch.uint8
    assert set(a.train_files).isdisjoint(a.val_files)
    assert a.train_files and a.val_files
    assert all(split_of(f) == "train" for f in a.train_files)
    assert all(split_of(f) == "val" for f in a.val_files)
    # the cap bounds what is read (each file adds a 2-byte separator at most)
    assert a.train.numel() + a.val.numel() <= 300_000 + 4
    # the split of a file does not depend on the cap (it is a hash of the path)
    c = load_corpus(max_bytes=600_000)
    assert set(a.val_files) <= set(c.val_files) and set(a.train_files) <= set(c.train_files)


def test_split_of_is_a_stable_function_of_the_path():
    paths = [f"pkg/mod{i}.py" for i in range(2000)]
    splits = [split_of(p) for p in paths]
    assert splits == [split_of(p) for p in paths]
    share = splits.count("val") / len(splits)
    assert 0.07 < share < 0.13  # 10% of files by default
    assert split_of("json/__init__.py") == split_of("json/__init__.py")


def test_data_from_a_text_file(tmp_path):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(500)).encode()
    path = tmp_path / "corpus.txt"
    path.write_bytes(text)
    corpus = load_corpus(path)
    n_val = int(len(text) * 0.1)
    assert bytes(corpus.train.tolist()) == text[:-n_val]
    assert bytes(corpus.val.tolist()) == text[-n_val:]
    capped = load_corpus(path, max_bytes=1000)
    assert capped.train.numel() + capped.val.numel() == 1000


def test_data_from_a_folder_splits_by_file(tmp_path):
    for i in range(60):
        sub = tmp_path / f"d{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}.txt").write_text(f"file {i} " * 50)
    (tmp_path / ".hidden").write_text("never read")
    corpus = load_corpus(tmp_path)
    assert set(corpus.train_files).isdisjoint(corpus.val_files)
    assert len(corpus.train_files) + len(corpus.val_files) == 60
    assert all(split_of(f) == "val" for f in corpus.val_files)
    assert b"never read" not in bytes(corpus.train.tolist()) + bytes(corpus.val.tolist())
    for name in corpus.val_files:
        assert (tmp_path / name).read_bytes() in bytes(corpus.val.tolist())


def test_data_tiny_folder_still_has_validation(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 100)
    (tmp_path / "b.txt").write_text("beta " * 100)
    corpus = load_corpus(tmp_path)
    assert corpus.train.numel() > 0 and corpus.val.numel() > 0
    assert set(corpus.train_files).isdisjoint(corpus.val_files)


def test_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_corpus(tmp_path / "missing")
    (tmp_path / "one.txt").write_text("x")
    with pytest.raises(ValueError, match="too small"):
        load_corpus(tmp_path / "one.txt")


# ---------------------------------------------------------------- batches and masking


def test_batch_sampler_same_seed_same_batches():
    stream = torch.arange(1000, dtype=torch.uint8).repeat(3)
    a, b, c = (BatchSampler(stream, 4, 16, seed=s) for s in (0, 0, 1))
    batches_a = [next(a) for _ in range(5)]
    assert all(torch.equal(x, next(b)) for x in batches_a)
    assert not torch.equal(batches_a[0], next(c))
    assert batches_a[0].shape == (4, 16) and batches_a[0].dtype == torch.long
    # windows are contiguous slices of the stream
    row = batches_a[0][0]
    assert torch.equal((row[1:] - row[:-1]) % 256, torch.ones(15, dtype=torch.long))
    fixed = a.fixed_batches(3)
    assert len(fixed) == 3 and all(torch.equal(x, y) for x, y in zip(fixed, b.fixed_batches(3)))


def test_batch_sampler_short_stream_repeats():
    s = BatchSampler(torch.tensor([1, 2, 3], dtype=torch.uint8), 2, 10)
    assert next(s).shape == (2, 10)


def test_mask_tokens_bert_rule():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (64, 128))
    inputs, labels = mask_tokens(tokens, gen)
    chosen = labels != -100
    assert 0.13 < chosen.float().mean().item() < 0.17
    assert chosen.any(dim=1).all()  # at least one target per row
    assert torch.equal(labels[chosen], tokens[chosen])
    assert torch.equal(inputs[~chosen], tokens[~chosen])
    masked = (inputs == MASK_ID) & chosen
    assert 0.75 < masked.sum().item() / chosen.sum().item() < 0.85
    assert inputs.max().item() <= MASK_ID


# ---------------------------------------------------------------- schedule, options


def test_lr_lambda_warmup_then_cosine():
    f = lr_lambda(10, 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_parse_lrs():
    assert _parse_lrs(["1e-3"], ["came", "adamw"]) == {"came": 1e-3, "adamw": 1e-3}
    assert _parse_lrs(["came=2e-3", "adamw=1e-3,lamb=5e-3"], ["came"]) == {
        "came": 2e-3,
        "adamw": 1e-3,
        "lamb": 5e-3,
    }
    with pytest.raises(argparse.ArgumentTypeError):
        _parse_lrs(["sgd=1"], ["came"])


def test_set_threads():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_threads(None) >= 1
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- training loop


@pytest.fixture(scope="module")
def small_corpus():
    return load_corpus(max_bytes=200_000)


@pytest.mark.parametrize("task", ["gpt", "bert"])
def test_comparison_same_start_and_measurements(task, small_corpus):
    cfg = LMConfig(
        task=task, **TINY, steps=12, warmup=2, optimizers=("came", "adamw", "adafactor", "lamb")
    )
    runs, _ = run_comparison(cfg, corpus=small_corpus, progress=False)
    assert [r["optimizer"] for r in runs] == ["came", "adamw", "adafactor", "lamb"]
    # same seed: same initial weights and validation batches -> same loss before training
    first = {r["history"]["val_loss"][0] for r in runs}
    assert len(first) == 1
    initial = first.pop()
    assert initial == pytest.approx(math.log(256 if task == "gpt" else 260), rel=0.1)
    for r in runs:
        h = r["history"]
        assert h["step"] == list(range(1, 13)) and len(h["train_loss"]) == 12
        assert h["eval_step"] == [0, 5, 10, 12]
        assert h["tokens"][-1] == 12 * 4 * 32
        assert math.isfinite(r["final_val_loss"]) and math.isfinite(r["final_train_loss"])
        assert r["final_val_loss"] < initial  # every optimizer learns something
        assert r["memory"]["peak_bytes"] > r["memory"]["baseline_bytes"] > 0
        assert r["step_time_ms"] > 0 and not r["diverged"]
    state = {r["optimizer"]: r["optimizer_state_bytes"] for r in runs}
    assert state["adafactor"] < state["came"] < state["adamw"]
    assert state["lamb"] == pytest.approx(state["adamw"], rel=0.01)


def test_lowmem_recipe_trains_bf16_weights_in_backward(small_corpus, recwarn):
    """came-lowmem: bf16 weights, int8 momentum, stochastic rounding, step-in-backward (no
    scheduler warning: the hooks count as optimizer steps); it learns like fp32 CAME."""
    cfg = LMConfig(task="gpt", **TINY, steps=12, warmup=2, optimizers=("came", "came-lowmem"))
    runs, _ = run_comparison(cfg, corpus=small_corpus, progress=False)
    came, low = runs
    assert low["history"]["val_loss"][0] == pytest.approx(came["history"]["val_loss"][0],
                                                          rel=0.02)  # bf16 copy of the start
    assert low["final_val_loss"] < low["history"]["val_loss"][0]
    assert low["final_val_loss"] == pytest.approx(came["final_val_loss"], rel=0.05)
    assert low["optimizer_state_bytes"] < 0.6 * came["optimizer_state_bytes"]  # small: fp32 m
    assert low["memory"]["peak_bytes"] < 0.75 * came["memory"]["peak_bytes"]
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_runs_are_reproducible(small_corpus):
    cfg = LMConfig(
        task="gpt", **TINY, steps=6, warmup=1, optimizers=("came",), measure_memory=False
    )
    a, _ = run_comparison(cfg, corpus=small_corpus, progress=False)
    b, _ = run_comparison(cfg, corpus=small_corpus, progress=False)
    assert a[0]["history"]["train_loss"] == b[0]["history"]["train_loss"]
    cfg.seeds = (1,)
    c, _ = run_comparison(cfg, corpus=small_corpus, progress=False)
    assert c[0]["history"]["train_loss"] != a[0]["history"]["train_loss"]


def test_divergence_is_reported(small_corpus):
    # AdamW at lr 1e6 without clipping: the loss is NaN after the first step
    cfg = LMConfig(
        task="gpt",
        **TINY,
        steps=30,
        warmup=1,
        optimizers=("adamw",),
        lrs={"adamw": 1e6},
        grad_clip=0.0,
        measure_memory=False,
    )
    runs, _ = run_comparison(cfg, corpus=small_corpus, progress=False)
    r = runs[0]
    assert r["diverged"]
    assert math.isnan(r["final_val_loss"]) and math.isnan(r["final_train_loss"])
    assert len(r["history"]["train_loss"]) < 30  # training stopped at the first NaN
    rows = summarize(runs)
    assert format_mean_std(rows[0]["final_val_loss"], 0.0) == "diverged"
    assert "diverged" in markdown_table(rows)


# ---------------------------------------------------------------- report


def _run(name, lr, seed, val):
    return {
        "optimizer": name,
        "lr": lr,
        "seed": seed,
        "final_val_loss": val,
        "optimizer_state_mb": 1.0 if name == "adamw" else 0.5,
        "history": {
            "step": [1, 2],
            "tokens": [8, 16],
            "train_loss": [3.0, 2.0],
            "eval_step": [0, 2],
            "eval_tokens": [0, 16],
            "val_loss": [3.1, val],
        },
    }


def test_summarize_and_table():
    runs = [_run("came", 1e-3, s, v) for s, v in [(0, 2.0), (1, 2.2)]]
    runs += [_run("adamw", 1e-3, s, v) for s, v in [(0, 2.1), (1, 2.1)]]
    rows = summarize(runs)
    assert [r["optimizer"] for r in rows] == ["came", "adamw"]
    assert rows[0]["final_val_loss"] == pytest.approx(2.1)
    assert rows[0]["final_val_loss_std"] == pytest.approx(math.sqrt(0.02))
    assert rows[0]["seeds"] == [0, 1] and rows[0]["n"] == 2
    table = markdown_table(rows)
    assert "| came | 0.001 | 2 |" in table and "2.1000 ± 0.1414" in table
    assert "peak step memory" not in table  # no row has it
    checks = claim_checks(rows)
    assert any("within 2% of AdamW's: yes" in c and "+0.00%" in c for c in checks)
    assert any("≤ 55% of AdamW's: yes" in c for c in checks)


def test_mean_std_edge_cases():
    assert mean_std([1.0]) == (1.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([1.0, math.nan]))
    assert all(math.isnan(v) for v in mean_std([]))
    assert format_mean_std(1.23456, 0.1, 2, n=3) == "1.23 ± 0.10"
    assert format_mean_std(1.23456, 0.1, 2, n=1) == "1.23"


# ---------------------------------------------------------------- demo, end to end


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+\.\d+", text)]


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    for name in ("report.md", "loss.png", "results.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for opt in ("came", "adamw", "adafactor"):
        assert re.search(rf"^\| {opt} \|", report, re.M), report
        assert f"| {opt} |" in printed
    table_rows = [line for line in report.splitlines() if line.startswith("| came |")]
    assert len(_numbers(table_rows[0])) >= 5  # losses, state, peak memory, step time
    assert str(out / "report.md") in printed
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["steps"] == 20 and results["config"]["task"] == "gpt"
    # the demo's own learning rates (the swept best of its setting), not the recipe defaults
    from torchcame.recipes.demo import DEMO_LRS
    from torchcame.recipes.optimizers import DEFAULT_LR

    assert results["config"]["lrs"] == DEMO_LRS
    assert DEMO_LRS["adamw"] != DEFAULT_LR["adamw"] and "best for this setting" in report
    assert len(results["runs"]) == 3 and results["wall_seconds"] > 0
    for run in results["runs"]:
        assert math.isfinite(run["final_val_loss"]) and run["optimizer_state_bytes"] > 0
        assert run["peak_memory_mb"] > 0
    assert results["config"]["corpus"]["val_files"] > 0


def test_demo_with_data_folder_and_options(tmp_path, capsys):
    src = tmp_path / "texts"
    src.mkdir()
    for i in range(30):
        (src / f"doc{i}.md").write_text(f"# document {i}\n" + "lorem ipsum dolor " * 40)
    out = tmp_path / "r"
    argv = [
        "demo",
        "--quick",
        "--data",
        str(src),
        "--optimizers",
        "came,lamb",
        "--lr",
        "came=3e-3",
        "--steps",
        "8",
        "--seeds",
        "0,1",
        "--out",
        str(out),
        "--no-progress",
        "--no-memory",
    ]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["data"] == str(src)
    assert results["config"]["lrs"] == {"came": 3e-3, "lamb": 5e-3}
    assert [(r["optimizer"], r["seed"]) for r in results["runs"]] == [
        ("came", 0),
        ("lamb", 0),
        ("came", 1),
        ("lamb", 1),
    ]
    assert "folder" in results["config"]["corpus"]["name"]
    assert "± " in (out / "report.md").read_text()  # two seeds: mean ± std


def test_demo_with_data_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("some text to model. " * 500)
    out = tmp_path / "r"
    assert (
        cli.main(
            [
                "demo",
                "--quick",
                "--data",
                str(path),
                "--optimizers",
                "adamw",
                "--out",
                str(out),
                "--no-progress",
                "--no-memory",
            ]
        )
        == 0
    )
    assert json.loads((out / "results.json").read_text())["runs"][0]["final_val_loss"] < 6


def test_cli_help_lists_demo(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert "--quick" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("module", ["gpt", "bert"])
def test_recipe_modules_write_reports(module, tmp_path):
    import importlib

    mod = importlib.import_module(f"torchcame.recipes.{module}")
    out = tmp_path / module
    assert (
        mod.main(
            [
                "--layers",
                "1",
                "--d-model",
                "32",
                "--heads",
                "2",
                "--seq-len",
                "32",
                "--steps",
                "10",
                "--batch-size",
                "4",
                "--eval-batches",
                "2",
                "--max-bytes",
                "100000",
                "--out",
                str(out),
                "--no-progress",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["task"] == module and len(results["runs"]) == 3
    assert (out / "loss.png").exists()


# ---------------------------------------------------------------- toy MLP


def test_toy_mlp_runs_and_reports(tmp_path):
    from torchcame.recipes.toy_mlp import ToyConfig, make_toy_data, run_toy, toy_report

    cfg = ToyConfig(
        steps=30,
        seeds=(0,),
        eval_every=10,
        lrs={
            "adam": (1e-2,),
            "adafactor": (1e-2, 3e-2),
            "came": (1e-2,),
            "adafactor_momentum": (1e-2,),
        },
    )
    x, y = make_toy_data(cfg)
    assert x.shape == (cfg.n_samples, cfg.n_in) and int(y.max()) < cfg.n_classes
    assert torch.equal(make_toy_data(cfg)[0], x)
    result = run_toy(cfg, progress=False)
    assert set(result["best_lr"]) == {"adam", "adafactor", "came", "adafactor_momentum"}
    assert result["departure"]["adam"] == [0.0]
    for r in result["runs"]:
        assert r["history"]["eval_step"] == [0, 10, 20, 30]
        assert r["final_train_loss"] < r["history"]["loss"][0]  # every optimizer learns
    path = toy_report(result, tmp_path / "toy")
    assert "| came |" in path.read_text() and (tmp_path / "toy" / "loss.png").exists()
    assert json.loads((tmp_path / "toy" / "results.json").read_text())["best_lr"]["adam"] == 1e-2


def test_factored_momentum_first_step():
    # the toy ablation (CAME without confidence) follows its equations on a first step
    from torchcame.recipes.toy_mlp import FactoredMomentum

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3))
    g = torch.randn(5, 3)
    opt = FactoredMomentum([p], lr=0.1)
    p.grad = g.clone()
    before = p.detach().clone()
    opt.step()
    sq = g * g + 1e-30
    r, c = 0.001 * sq.mean(-1), 0.001 * sq.mean(-2)
    u = g / ((r / r.mean()).unsqueeze(-1) * c.unsqueeze(-2)).sqrt()
    u = u / max(1.0, float(u.square().mean().sqrt()))
    torch.testing.assert_close(p.detach(), before - 0.1 * 0.1 * u)


# ---------------------------------------------------------------- hyperparameters


def _gpt_cfg(argv):
    from torchcame.recipes.gpt import build_parser
    from torchcame.recipes.train import config_from_args

    return config_from_args(build_parser().parse_args(argv), "gpt")


def test_hyperparameters_from_the_command_line_reach_the_optimizers():
    from torchcame.recipes.optimizers import build_optimizer

    cfg = _gpt_cfg(
        [
            "--optimizers", "came,came-short,adamw-b95,adafactor",
            "--betas", "came=0.9,0.99,0.999",
            "--eps", "adamw-b95=1e-6",
            "--clip-threshold", "2",
            "--weight-decay", "0.01",
            "--weight-decay", "came=0.1",
            "--beta2-decay", "-0.5",
            "--lr", "adamw-b95=3e-3",
        ]
    )
    came, short, adamw, adafactor = (cfg.hyper_of(n) for n in cfg.optimizers)
    assert came == {"lr": 2e-4, "weight_decay": 0.1, "betas": [0.9, 0.99, 0.999],
                    "eps": [1e-30, 1e-16], "clip_threshold": 2.0}
    assert short["betas"] == [0.9, 0.95, 0.995] and short["clip_threshold"] == 2.0
    assert short["weight_decay"] == 0.01
    assert adamw == {"lr": 3e-3, "weight_decay": 0.01, "betas": [0.9, 0.95], "eps": 1e-6}
    assert adafactor["beta2_decay"] == -0.5 and adafactor["clip_threshold"] == 2.0
    # what is recorded is what the optimizer gets
    p = [torch.nn.Parameter(torch.randn(4, 4))]
    for name in cfg.optimizers:
        group = build_optimizer(
            name, p, lr=cfg.lr_of(name), weight_decay=cfg.weight_decay_of(name),
            hyper=cfg.overrides_of(name),
        ).param_groups[0]
        h = cfg.hyper_of(name)
        assert group["lr"] == h["lr"] and group["weight_decay"] == h["weight_decay"]
        if "betas" in h:
            assert list(group["betas"]) == h["betas"]
    group = build_optimizer("adafactor", p, hyper=cfg.overrides_of("adafactor")).param_groups[0]
    assert group["d"] == 2.0 and group["beta2_decay"] == -0.5
    group = build_optimizer("came-short", p).param_groups[0]
    assert group["betas"] == (0.9, 0.95, 0.995)


@pytest.mark.parametrize(
    "argv",
    [
        ["--optimizers", "came,adamw", "--betas", "adamw=0.9,0.95,0.99"],  # AdamW takes two
        ["--optimizers", "came", "--betas", "lamb=0.9,0.99"],  # lamb is not selected
        ["--optimizers", "adamw", "--clip-threshold", "adamw=1"],  # AdamW has no clip
    ],
)
def test_hyperparameter_errors(argv):
    with pytest.raises(SystemExit):
        _gpt_cfg(argv)


def test_runs_record_every_hyperparameter(small_corpus):
    cfg = LMConfig(task="gpt", **TINY, steps=3, warmup=1, optimizers=("came-short", "adamw"),
                   hyper={"adamw": {"betas": (0.8, 0.9), "weight_decay": 0.1}},
                   measure_memory=False)
    runs, _ = run_comparison(cfg, corpus=small_corpus, progress=False)
    assert runs[0]["hyper"]["betas"] == [0.9, 0.95, 0.995]
    assert runs[1]["hyper"] == {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.8, 0.9],
                                "eps": 1e-8}
    assert cfg.as_dict()["hyper"]["adamw"] == runs[1]["hyper"]


def test_pydoc_topics_corpus_is_english_and_split():
    from torchcame.recipes.data import load_pydoc_topics

    c = load_pydoc_topics()
    text = bytes(c.train[:5000].tolist()).decode("utf-8", errors="replace")
    assert "the" in text.split() and "def " not in text[:200]
    assert 0.05 < c.val.numel() / (c.train.numel() + c.val.numel()) < 0.15
    assert load_pydoc_topics().sha256 == c.sha256


def test_llama_model_builds_and_learns(small_corpus):
    cfg = LMConfig(task="llama", **TINY, steps=10, warmup=2, optimizers=("adamw",),
                   lrs={"adamw": 1e-2}, measure_memory=False)
    runs, _ = run_comparison(cfg, corpus=small_corpus, progress=False)
    assert runs[0]["final_val_loss"] < runs[0]["history"]["val_loss"][0]

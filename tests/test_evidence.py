"""The evidence study's machinery (benchmarks/evidence.py): sweeps, the run cache, claims.json."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def _load_evidence():
    spec = importlib.util.spec_from_file_location("evidence", ROOT / "benchmarks" / "evidence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["evidence"] = module
    spec.loader.exec_module(module)
    return module


ev = _load_evidence()


def test_ladder_values_and_spacing():
    assert ev.lr_at(0) == 1.0
    assert [ev.lr_at(k) for k in (-12, -11, -10, -9)] == [1e-4, 2e-4, 5e-4, 1e-3]
    for k in range(-20, 5):
        ratio = ev.lr_at(k + 1) / ev.lr_at(k)
        assert 2.0 - 1e-9 <= ratio <= 2.5 + 1e-9
        assert ev.ladder_index(ev.lr_at(k)) == k
        assert ev.ladder_index(ev.lr_at(k) * 1.1) == k


def _bowl(minimum: int, calls: list, diverge_above: int | None = None):
    """A fake training run: loss quadratic in the ladder index, lowest at ``minimum``."""

    def train(lr: float, seed: int) -> float:
        k = ev.ladder_index(lr)
        calls.append((k, seed))
        if diverge_above is not None and k > diverge_above:
            return math.nan
        return 1.0 + 0.05 * (k - minimum) ** 2 + 0.001 * seed

    return train


@pytest.mark.parametrize("offset", [-4, -1, 0, 2, 5])
def test_sweep_extends_until_the_best_is_interior(offset):
    calls: list = []
    center = -10
    result = ev.sweep(_bowl(center + offset, calls), center)
    assert result.best == center + offset
    assert result.interior and result.complete
    grid = sorted(result.losses)
    assert grid == list(range(grid[0], grid[-1] + 1))  # contiguous on the ladder
    assert grid[0] < result.best < grid[-1]
    # extended only as far as needed: one value beyond the best on the side it moved to
    assert len(grid) == 3 + abs(offset)
    seed0 = [k for k, s in calls if s == 0]
    assert sorted(seed0) == grid  # every grid value trained once
    assert sorted(s for k, s in calls if s != 0) == [1, 2]
    assert all(k == result.best for k, s in calls if s != 0)
    assert result.seed_losses == pytest.approx({0: 1.0, 1: 1.001, 2: 1.002})


def test_near_tie_runs_the_runner_up_seeds_and_takes_the_better_mean():
    # seed 0 prefers index -9 by 0.5%, but -10 is better on average over seeds
    table = {
        (-11, 0): 1.30, (-10, 0): 1.005, (-9, 0): 1.000, (-8, 0): 1.20,
        (-10, 1): 1.00, (-10, 2): 1.00, (-9, 1): 1.10, (-9, 2): 1.10,
    }
    calls = []

    def train(lr, seed):
        calls.append((ev.ladder_index(lr), seed))
        return table[(ev.ladder_index(lr), seed)]

    result = ev.sweep(train, -10)
    assert result.best == -10 and result.complete
    assert set(result.seeds_at) == {-10, -9}
    assert result.seed_losses == {0: 1.005, 1: 1.00, 2: 1.00}
    # a clear winner (runner-up > 1% behind) runs seeds only at the best
    table[(-10, 0)] = 1.02
    calls.clear()
    result = ev.sweep(train, -10)
    assert result.best == -9 and set(result.seeds_at) == {-9}
    # the same choice rebuilt from cached runs
    runs = [
        {"seed": s, "hyper": {"lr": ev.lr_at(k)}, "final_val_loss": v, "diverged": False}
        for (k, s), v in table.items()
    ]
    table[(-10, 0)] = 1.005
    runs = [dict(r, final_val_loss=table[(ev.ladder_index(r["hyper"]["lr"]), r["seed"])])
            for r in runs]
    b = ev.best_of(runs)
    assert b["best_lr"] == ev.lr_at(-10) and b["complete"]
    b = ev.best_of([r for r in runs if not (r["seed"] == 2 and r["hyper"]["lr"] == ev.lr_at(-9))])
    assert not b["complete"]  # the runner-up's seeds are missing: not settled


def test_sweep_treats_divergence_as_worst():
    calls: list = []
    # the bowl's minimum sits above the divergence edge: the best finite lr is the edge,
    # interior because the next value up diverged
    result = ev.sweep(_bowl(-5, calls, diverge_above=-8), -9)
    assert result.best == -8
    assert result.interior
    assert math.isnan(result.losses[-7])


def test_sweep_all_diverged_goes_down():
    calls: list = []
    result = ev.sweep(_bowl(-15, calls, diverge_above=-13), -9)
    assert result.best == -15 and result.interior


def test_sweep_stops_at_max_points_without_seeds():
    calls: list = []
    result = ev.sweep(lambda lr, seed: calls.append(seed) or -lr, -10, max_points=5)
    assert len(result.losses) == 5
    assert not result.interior and not result.complete
    assert result.best == max(result.losses)
    assert set(calls) == {0}  # no seeds at a best that is on the edge


def test_instability_count():
    losses = [5.0, 4.0, 3.0, 2.0, 2.5, 3.5, 1.9, 2.9, math.nan, 2.0]
    # after warmup 2: 3.5 > 1.5*2.0 and 2.9 > 1.5*1.9 and the NaN
    assert ev.instability_count(losses, warmup=2) == 3
    assert ev.instability_count(losses, warmup=8) == 1
    assert ev.instability_count([1.0] * 10, warmup=0) == 0


def test_claims_verdicts_follow_the_standard():
    def run(opt, lr, seed, loss, exp="horizon-gpt"):
        return {
            "experiment": exp,
            "setting": {"task": "gpt", "model": "demo", "batch_size": 16, "steps": 300},
            "optimizer": opt,
            "hyper": {"lr": lr, "betas": [0.9, 0.95, 0.995]},
            "seed": seed,
            "final_val_loss": loss,
            "diverged": False,
            "runs": [],
        }

    runs = []
    for opt, base in (("came", 2.0), ("adamw", 2.1)):
        runs += [run(opt, lr, 0, base + 0.1 * i * i) for i, lr in zip((-1, 0, 1), (1, 2, 5))]
        runs += [run(opt, 2, s, base + 0.001 * s) for s in (1, 2)]
    out = ev.verdicts(runs)
    (v,) = [v for v in out if v["claim"].startswith("CAME reaches")]
    assert v["verdict"] == "reproduced" and "gap -4.76%" in v["evidence"]
    # CAME 10% worse: not reproduced
    worse = [dict(r, final_val_loss=r["final_val_loss"] + 0.3) if r["optimizer"] == "came" else r
             for r in runs]
    (v,) = [v for v in ev.verdicts(worse) if v["claim"].startswith("CAME reaches")]
    assert v["verdict"] == "not reproduced"
    # drop a seed: pending (verdict unclear, evidence says pending)
    (v,) = [v for v in ev.verdicts(runs[:-1]) if v["claim"].startswith("CAME reaches")]
    assert v["verdict"] == "unclear" and v["evidence"].startswith("pending")


def test_quick_study_caches_resumes_and_writes_claims(tmp_path, monkeypatch):
    import torchcame.recipes.train as train

    trained = []
    real = train.run_one

    def counting(*args, **kwargs):
        trained.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "run_one", counting)
    argv = ["horizon-gpt", "--quick", "--results", str(tmp_path), "--no-progress"]
    assert ev.main(argv) == 0
    first = len(trained)
    files = sorted((tmp_path / "runs").rglob("*.json"))
    assert first == len(files) > 6

    claims = json.loads((tmp_path / "claims.json").read_text())
    assert set(claims) == {"runs", "verdicts"}
    assert len(claims["runs"]) == len(files)  # every run, not only the best
    for r in claims["runs"]:
        for key in ev.CLAIM_RUN_KEYS:
            assert key in r
        assert r["tokens"] == r["steps"] * r["batch_size"] * 32
        assert r["hyper"]["lr"] > 0 and "betas" in r["hyper"] and "weight_decay" in r["hyper"]
        assert r["experiment"] == "horizon-gpt"
    for v in claims["verdicts"]:
        assert set(v) == {"claim", "experiment", "verdict", "evidence"}
        assert v["verdict"] in ("reproduced", "not reproduced", "unclear")
    assert (tmp_path / "gap_vs_tokens.png").exists()
    # the shorter length swept both AdamW betas; the longer one only the better of the two
    by_len = {}
    for r in claims["runs"]:
        by_len.setdefault(r["steps"], set()).add(r["optimizer"])
    short, long = sorted(by_len)
    assert {"adamw", "adamw-b95"} <= by_len[short]
    assert len({"adamw", "adamw-b95"} & by_len[long]) == 1

    # resume: nothing reruns; a deleted run (an interrupted sweep) is the only one retrained
    assert ev.main(argv) == 0
    assert len(trained) == first
    files[3].unlink()
    assert ev.main(argv) == 0
    assert len(trained) == first + 1
    assert files[3].exists()


def test_cache_key_depends_on_every_hyperparameter(tmp_path):
    study = ev.Study(tmp_path)
    s = ev.Setting("x", "gpt", "quick", 10, 4)
    hyper = {"lr": 1e-3, "betas": [0.9, 0.999, 0.9999], "weight_decay": 0.0}
    a = study.run_path(s, "came", hyper, 0)
    assert a == study.run_path(s, "came", dict(hyper), 0)
    assert a != study.run_path(s, "came", {**hyper, "betas": [0.9, 0.95, 0.995]}, 0)
    assert a != study.run_path(s, "came", {**hyper, "weight_decay": 0.01}, 0)
    assert a != study.run_path(s, "came", hyper, 1)
    assert a != study.run_path(ev.Setting("x", "gpt", "quick", 11, 4), "came", hyper, 0)


def _swept(exp, opt, batch, steps, loss_at_best, extra=None):
    """A complete sweep's cached runs: 3 grid values (best in the middle) + 2 more seeds."""
    runs = []
    for lr, seed, loss in ((1, 0, 9.0), (2, 0, loss_at_best), (5, 0, 9.0), (2, 1, loss_at_best),
                           (2, 2, loss_at_best)):
        runs.append({
            "experiment": exp,
            "setting": {"task": "bert", "model": "demo", "batch_size": batch, "steps": steps},
            "optimizer": opt, "hyper": {"lr": lr}, "seed": seed, "final_val_loss": loss,
            "diverged": False, **(extra or {}),
        })
    return runs


def test_large_batch_verdict_uses_losses_and_instabilities():
    def study(came_loss, came_spikes):
        runs = []
        for opt, loss, spikes in (("came", came_loss, came_spikes), ("adamw", 3.0, 1),
                                  ("lamb", 3.1, 0)):
            runs += _swept("large-bert", opt, 128, 150, loss, {"instabilities": spikes})
            runs += _swept("large-bert", opt, 16, 1200, loss, {"instabilities": 0})
        return [v for v in ev.verdicts(runs) if "large batch" in v["claim"]]

    (v,) = study(2.9, 0)
    assert v["verdict"] == "reproduced" and "8x the base batch" in v["claim"]
    assert "Batch 16 at the same tokens: adamw 3.0000, came 2.9000, lamb 3.1000" in v["evidence"]
    (v,) = study(3.5, 0)
    assert v["verdict"] == "not reproduced"
    (v,) = study(2.9, 5)  # better loss but more instability steps than LAMB: not settled
    assert v["verdict"] == "unclear"
    runs = _swept("large-bert", "came", 128, 150, 2.9, {"instabilities": 0})
    runs += _swept("large-bert", "came", 16, 1200, 2.9, {"instabilities": 0})
    (v,) = [v for v in ev.verdicts(runs) if "large batch" in v["claim"]]
    assert v["evidence"].startswith("pending") and "adamw" in v["evidence"]


def test_finetune_verdict_reports_both_domains():
    runs = _swept("finetune-llama", "came", 16, 300, 1.31, {"pretrain_val_loss": 2.1})
    runs += _swept("finetune-llama", "adamw", 16, 300, 1.30, {"pretrain_val_loss": 2.0})
    (v,) = ev.verdicts(runs)
    assert v["verdict"] == "reproduced"
    assert "came 1.3100 vs adamw 1.3000" in v["evidence"] and "came 2.1000" in v["evidence"]


# tracks: sweeps claimed by one process are skipped by another ------------------------------


class _FakeStudy(ev.Study):
    """A study whose runs cost nothing: the loss is a parabola in log-lr around 1e-3."""

    def train(self, setting, optimizer, lr, seed, **kw):
        self.trained += 1
        return {"final_val_loss": 2.0 + (math.log10(lr) + 3.0) ** 2 + 0.001 * seed}


def _claim_file(study, setting, optimizer):
    return study.root / "runs" / setting.experiment / setting.slug / f"{optimizer}.claim"


def _hold(path, pid, start, host=None):
    import socket

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "start": start, "host": host or socket.gethostname()}))


@pytest.fixture
def other_process():
    """A live process other than this one: ``(pid, start time)``."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc.pid, ev._process_start(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_claim_is_held_for_the_block_and_released(tmp_path):
    path = tmp_path / "a" / "came.claim"
    with ev.claim(path) as held:
        assert held and path.exists()
        assert json.loads(path.read_text())["pid"] == __import__("os").getpid()
        with pytest.raises(RuntimeError, match="already claimed by this process"):
            with ev.claim(path):
                pass
    assert not path.exists()
    with pytest.raises(KeyError):  # an error in the block still releases the claim
        with ev.claim(path):
            raise KeyError("x")
    assert not path.exists()


def test_claim_of_a_live_process_is_respected_and_a_dead_ones_taken_over(tmp_path, other_process):
    import subprocess

    path = tmp_path / "came.claim"
    pid, start = other_process
    _hold(path, pid, start)
    with ev.claim(path) as held:
        assert not held
    assert json.loads(path.read_text())["pid"] == pid  # untouched

    _hold(path, pid, "1")  # same pid, another start time: a reused pid, so the claim is stale
    with ev.claim(path) as held:
        assert held
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    _hold(path, int(done.stdout), "123")  # that process has exited
    with ev.claim(path) as held:
        assert held
    _hold(path, pid, start, host="another-host")  # can't tell: assumed alive
    with ev.claim(path) as held:
        assert not held


def test_horizon_skips_claimed_sweeps_and_their_longer_lengths(tmp_path, other_process):
    study = _FakeStudy(tmp_path, progress=False)
    h = ev.Horizon("horizon-x", "gpt", "quick", (10, 30), ("came", "adamw", "adamw-b95"))
    first = ev.Setting(h.name, h.task, h.model, 10, h.batch_size, evals=h.evals,
                       max_bytes=1000)
    _hold(_claim_file(study, first, "came"), *other_process)
    results = ev.run_horizon(study, h, max_bytes=1000)
    # came is the other process's at 10 steps, so at 30 too; the AdamW pair ran, and at the
    # longer length only the better β2 of the two (equal losses here: one of them)
    assert {k for k in results} == {(10, "adamw"), (10, "adamw-b95"), (30, "adamw")} or \
        {k for k in results} == {(10, "adamw"), (10, "adamw-b95"), (30, "adamw-b95")}
    assert study.skipped == [f"horizon-x {first.slug} came"]
    assert results[(10, "adamw")].best_lr == 1e-3 and results[(10, "adamw")].complete
    assert not list(tmp_path.rglob("*.claim"))[1:]  # only the other process's claim is left

    # one of the AdamW pair held elsewhere: the β2 choice (and so both) wait at 30 steps
    study = _FakeStudy(tmp_path / "b", progress=False)
    _hold(_claim_file(study, first, "adamw-b95"), *other_process)
    results = ev.run_horizon(study, h, max_bytes=1000)
    assert set(results) == {(10, "came"), (10, "adamw"), (30, "came")}


def test_main_exits_75_when_it_skipped_a_sweep(tmp_path, monkeypatch, other_process):
    monkeypatch.setattr(ev.Study, "train", _FakeStudy.train)
    monkeypatch.setattr(ev, "plot_gaps", lambda root: None)
    monkeypatch.setattr(ev, "plot_large", lambda root: None)
    argv = ["finetune-llama", "--quick", "--results", str(tmp_path), "--no-progress"]
    monkeypatch.setattr(ev.Study, "pretrained", lambda self, *a, **k: ("init", {}))
    tune = ev.Setting("finetune-llama", "llama", "quick", 8, 4, max_bytes=300_000)
    _hold(_claim_file(ev.Study(tmp_path), tune, "adamw"), *other_process)
    assert ev.main(argv) == ev.EX_TEMPFAIL == 75
    _claim_file(ev.Study(tmp_path), tune, "adamw").unlink()
    assert ev.main(argv) == 0


def test_queue_comes_back_to_stages_that_waited_on_the_other_track(tmp_path):
    """evidence_queue.sh: a stage that exits 75 runs again after the others; failures don't
    stop the queue."""
    import os
    import subprocess

    fake = tmp_path / "fakepy"
    log = tmp_path / "calls"
    # exits 75 the first two times it is asked for large-bert, 1 for toy-search, else 0
    fake.write_text(
        "#!/bin/bash\n"
        f'echo "$2" >> {log}\n'
        f'if [ "$2" = large-bert ] && [ $(grep -c large-bert {log}) -le 2 ]; then exit 75; fi\n'
        'if [ "$2" = toy-search ]; then exit 1; fi\n'
        "exit 0\n"
    )
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), EVIDENCE_QUEUE_WAIT="0")
    out = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "evidence_queue.sh"), "1"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    calls = log.read_text().split()
    assert calls.count("large-bert") == 3 and calls[-1] == "large-bert"
    assert calls.count("toy-search") == 1 and "failed (exit 1)" in out.stdout
    assert calls.count("size-gpt") == 2  # "size-gpt --max-steps 300" and "size-gpt"
    assert "track 1 finished" in out.stdout


def test_the_worse_adamw_stays_dropped_at_every_longer_length(tmp_path):
    class Study(_FakeStudy):
        def train(self, setting, optimizer, lr, seed, **kw):
            loss = super().train(setting, optimizer, lr, seed, **kw)["final_val_loss"]
            return {"final_val_loss": loss + (0.5 if optimizer == "adamw-b95" else 0.0)}

    study = Study(tmp_path, progress=False)
    h = ev.Horizon("horizon-x", "gpt", "quick", (10, 30, 90), ("came", "adamw", "adamw-b95"))
    results = ev.run_horizon(study, h, max_bytes=1000)
    assert set(results) == {
        (10, "came"), (10, "adamw"), (10, "adamw-b95"),
        (30, "came"), (30, "adamw"),
        (90, "came"), (90, "adamw"),
    }


def test_without_leaves_optimizers_for_later(tmp_path, monkeypatch):
    """--without came-bc: a horizon sweeps the others; naming an optimizer the horizon does not
    have, or using it on another experiment, is an error before anything runs."""
    seen = []

    def fake_horizon(study, h, *, max_bytes):
        seen.append(h.optimizers)
        return {}

    monkeypatch.setattr(ev, "run_horizon", fake_horizon)
    study = _FakeStudy(tmp_path, progress=False)
    ev.run_experiment("horizon-gpt", study, without=("came-bc",))
    assert seen == [tuple(o for o in ev.HORIZONS["horizon-gpt"].optimizers if o != "came-bc")]
    with pytest.raises(ValueError, match="lamb"):
        ev.run_experiment("horizon-gpt", study, without=("lamb",))
    with pytest.raises(SystemExit):
        ev.main(["large-bert", "--without", "came", "--results", str(tmp_path)])
    assert len(seen) == 1 and study.trained == 0


def test_pretrained_weights_rebuilt_on_a_fresh_clone_keep_the_committed_record(
    tmp_path, monkeypatch, capsys
):
    """The checkpoint is not committed; rebuilding it must not rewrite the record the cached
    fine-tune runs were tuned against, and a difference is reported, not hidden."""
    import torch

    import torchcame.recipes.train as train

    machine = {"bias": 0.0}  # stands for the last bits CPU kernels differ by between machines

    def fake_run_one(cfg, corpus, optimizer, seed, **kw):
        model = torch.nn.Linear(3, 2)
        with torch.no_grad():
            model.weight.fill_(0.5 + machine["bias"])
            model.bias.fill_(0.25)
        loss = 1.5 + machine["bias"]
        history = {"tokens": [1, 2], "train_loss": [2.0, loss], "eval_tokens": [2],
                   "val_loss": [loss]}
        return {"model": model, "history": history, "params": 8, "optimizer": optimizer,
                "hyper": {"lr": kw["lr"]}, "seed": seed, "final_val_loss": loss,
                "final_train_loss": loss, "diverged": False, "wall_seconds": 1.0}

    monkeypatch.setattr(train, "run_one", fake_run_one)
    monkeypatch.setattr(ev.Study, "corpus", lambda self, *a: None)
    monkeypatch.setattr(ev.Study, "eval_sets", lambda self, *a: (None, None))
    pre = ev.Setting("finetune-x-pretrain", "llama", "quick", 8, 4, max_bytes=1000)

    study = ev.Study(tmp_path, progress=False)
    ident, state = study.pretrained(pre, "adamw", 2e-3)
    record_path = next((tmp_path / "runs").rglob("*.json"))
    first = json.loads(record_path.read_text())
    assert first["final_val_loss"] == 1.5
    assert first["weights_sha1"] == ev.state_digest(state)
    assert study.pretrained(pre, "adamw", 2e-3)[0] == ident and study.trained == 1  # cached

    # a fresh clone on another machine: the record is committed, the weights are not
    for weights in (tmp_path / "cache").glob("*.pt"):
        weights.unlink()
    machine["bias"] = 1e-6
    capsys.readouterr()
    again = ev.Study(tmp_path, progress=False)
    ident2, state2 = again.pretrained(pre, "adamw", 2e-3)
    assert ident2 == ident and again.trained == 1
    assert torch.equal(state2["weight"], torch.full((2, 3), 0.5 + 1e-6))
    assert json.loads(record_path.read_text()) == first  # the record is kept
    out = capsys.readouterr().out
    assert "differ from the recorded run" in out and "1.50000 recorded" in out

    # rebuilt identically: nothing to report
    for weights in (tmp_path / "cache").glob("*.pt"):
        weights.unlink()
    machine["bias"] = 0.0
    ev.Study(tmp_path, progress=False).pretrained(pre, "adamw", 2e-3)
    assert "differ" not in capsys.readouterr().out
    assert json.loads(record_path.read_text()) == first


def test_state_digest_sees_values_dtypes_and_names():
    import torch

    a = {"w": torch.zeros(2, 2), "b": torch.ones(2)}
    assert ev.state_digest(a) == ev.state_digest({"b": torch.ones(2), "w": torch.zeros(2, 2)})
    assert ev.state_digest(a) != ev.state_digest({"w": torch.zeros(2, 2), "b2": torch.ones(2)})
    assert ev.state_digest(a) != ev.state_digest({"w": torch.zeros(4), "b": torch.ones(2)})
    double = {"w": torch.zeros(2, 2).double(), "b": torch.ones(2)}
    assert ev.state_digest(a) != ev.state_digest(double)
    b = {"w": torch.zeros(2, 2), "b": torch.ones(2)}
    b["w"][1, 1] = 1e-30
    assert ev.state_digest(a) != ev.state_digest(b)

"""``torchcame bench`` runs on a tiny parameter set and writes valid JSON."""

from __future__ import annotations

import json

import pytest

from torchcame.bench import candidates, format_table, run_set
from torchcame.bench.core import (
    BYTES_PER_ELEMENT,
    PROBE_READ_BYTES,
    PROBES,
    READ_BYTES_PER_ELEMENT,
    _floor_bytes,
    attainable_bandwidth,
)
from torchcame.bench.shapes import PARAM_SETS, describe, param_shapes
from torchcame.cli import main


def test_param_sets_have_expected_sizes():
    assert describe(param_shapes("gpt2-124m"))["parameters"] == 124_439_808
    assert 86_000_000 < describe(param_shapes("vit-b16"))["parameters"] < 87_000_000
    assert describe(param_shapes("big-matrix"))["tensors"] == 1
    assert set(PARAM_SETS) >= {"gpt2-124m", "vit-b16", "big-matrix", "tiny"}
    with pytest.raises(ValueError, match="unknown parameter set"):
        param_shapes("nope")


def test_floor_bytes_follow_the_pass_schedule():
    shapes = [(10, 20), (5,)]
    assert _floor_bytes(shapes, "adamw", 4) == 28 * 205
    assert _floor_bytes(shapes, "came", 4) == 32 * 200 + 36 * 5
    assert _floor_bytes(shapes, "adamw8bit", 4) == 16 * 205
    assert set(BYTES_PER_ELEMENT) == {"adamw", "adamw8bit", "came", "adafactor"}
    # reads: CAME reads g three times, m twice and p once; AdamW g, p, m, v once
    assert _floor_bytes(shapes, "came", 4, READ_BYTES_PER_ELEMENT) == 24 * 205
    assert _floor_bytes(shapes, "adamw", 4, READ_BYTES_PER_ELEMENT) == 16 * 205
    assert set(READ_BYTES_PER_ELEMENT) == set(BYTES_PER_ELEMENT)
    for name, (factored, other) in READ_BYTES_PER_ELEMENT.items():
        assert 0 < factored < BYTES_PER_ELEMENT[name][0] and 0 < other < BYTES_PER_ELEMENT[name][1]
    assert set(PROBE_READ_BYTES) == set(PROBES)


def test_run_set_tiny_reports_every_candidate():
    import torch

    names = ["CAME fused", "CAME foreach", "AdamW fused"]
    result = run_set("tiny", device=torch.device("cpu"), rounds=2, warmup=1, names=names,
                     progress=False)
    rows = {r["name"]: r for r in result["results"]}
    assert set(rows) == set(names)
    assert rows["AdamW fused"]["state_ratio_to_adamw"] == 1.0
    # CAME keeps m plus factored statistics: about half of AdamW's state for matrices
    assert 0.4 < rows["CAME fused"]["state_ratio_to_adamw"] < 0.65
    assert rows["CAME fused"]["state_bytes"] == rows["CAME foreach"]["state_bytes"]
    for r in rows.values():
        assert r["median_step_s"] > 0 and len(r["step_times_s"]) == 2
        # the floor uses the best rates anyone reached, so no step beats it
        assert r["ratio_to_floor"] >= 1 - 1e-9
        assert r["achieved_GBps"] <= result["bandwidth_GBps"] * (1 + 1e-9)
        assert r["achieved_read_GBps"] <= result["read_bandwidth_GBps"] * (1 + 1e-9)
        assert r["floor_bound"] in ("bytes", "reads")
        assert r["floor_s"] == pytest.approx(max(
            r["floor_bytes"] / (result["bandwidth_GBps"] * 1e9),
            r["floor_read_bytes"] / (result["read_bandwidth_GBps"] * 1e9)))
    assert rows["AdamW fused"]["floor_ratio_to_adamw"] == 1.0
    assert set(result["probe_GBps"]) == set(PROBES)
    assert result["bandwidth_source"] in set(PROBES) | set(names)
    best = max(r["ratio_to_floor"] for r in rows.values())
    source = result["bandwidth_source"]
    if source in rows:  # a candidate set the bandwidth: its own ratio is exactly 1
        assert rows[source]["ratio_to_floor"] == pytest.approx(1.0)
    assert best >= 1
    # the fused path allocates no full-size temporaries; the foreach path does
    param_bytes = result["param_bytes"]
    assert rows["CAME fused"]["extra_step_bytes"] < 0.05 * param_bytes
    assert rows["CAME foreach"]["extra_step_bytes"] > 0.5 * param_bytes
    report = {"sets": [result]}
    table = format_table(report)
    assert "CAME fused" in table and "× fused AdamW" in table


def test_attainable_bandwidth_is_the_best_rate():
    assert attainable_bandwidth({"triad": 3e10, "AdamW fused": 4e10, "read": 1e10}) == (
        4e10, "AdamW fused")
    assert attainable_bandwidth({"triad": 5e10, "AdamW fused": 4e10}) == (5e10, "triad")


def test_candidates_include_peers():
    import torch

    names = [c.name for c in candidates(torch.device("cpu"))]
    for expected in ["CAME fused", "CAME foreach", "CAME reference", "came-pytorch",
                     "AdamW fused", "AdamW foreach", "Adafactor foreach"]:
        assert expected in names


def test_torchao_adamw8bit_joins_when_installed(monkeypatch):
    import sys
    import types

    import torch

    names = [c.name for c in candidates(torch.device("cpu"))]
    assert ("AdamW 8-bit (torchao)" in names) == (
        __import__("importlib").util.find_spec("torchao") is not None)
    fake_optim = types.ModuleType("torchao.optim")

    class AdamW8bit(torch.optim.AdamW):
        pass

    fake_optim.AdamW8bit = AdamW8bit
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.optim", fake_optim)
    (cand,) = [c for c in candidates(torch.device("cpu")) if c.name == "AdamW 8-bit (torchao)"]
    assert cand.algorithm == "adamw8bit" and BYTES_PER_ELEMENT["adamw8bit"] == (16, 16)
    assert isinstance(cand.make([torch.nn.Parameter(torch.zeros(2))]), AdamW8bit)


def test_cli_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--quick", "--rounds", "2", "--warmup", "1", "--no-progress",
                 "--only", "CAME fused,CAME foreach,came-pytorch", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["machine"]["cores_available"] >= 1
    (tiny,) = report["sets"]
    assert tiny["set"] == "tiny" and tiny["bandwidth_GBps"] > 0
    names = {r["name"] for r in tiny["results"]}
    assert names == {"CAME fused", "CAME foreach", "came-pytorch", "AdamW fused"}
    assert "| CAME fused |" in capsys.readouterr().out


def test_cli_rejects_unknown_set(tmp_path):
    assert main(["bench", "--sets", "nope", "--out", str(tmp_path / "x.json")]) == 2


def test_bench_repeats_keeps_and_summarizes_every_run(tmp_path):
    """benchmarks/bench_repeats.py: each call adds runs; the summary covers all of them."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_repeats.py"
    spec = importlib.util.spec_from_file_location("bench_repeats", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--repeats", "1", "--sets", "tiny", "--rounds", "1", "--out", str(tmp_path)]
    assert module.main(args) == 0
    assert module.main(args) == 0
    assert sorted(p.name for p in tmp_path.glob("run_*.json")) == ["run_1.json", "run_2.json"]
    summary = json.loads((tmp_path / "summary.json").read_text())["sets"]["tiny"]
    assert len(summary["runs"]) == 2
    ratios = [r["ratio_to_adamw_fused"] for r in summary["runs"]]
    assert summary["median_ratio_to_adamw_fused"] == pytest.approx(sum(ratios) / 2)
    assert all(r["came_ratio_to_floor"] >= 1 - 1e-9 for r in summary["runs"])
    assert "| median |" in (tmp_path / "summary.md").read_text()

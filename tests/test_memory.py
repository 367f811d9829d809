"""Tests of torchcame.memory: the CPU allocation tracker and the state-size helpers."""

from __future__ import annotations

import gc

import pytest
import torch

from torchcame import CAME
from torchcame.memory import (
    TensorAllocationTracker,
    measure_step_memory,
    module_bytes,
    optimizer_state_bytes,
    tensor_bytes,
)


def test_tracker_counts_new_storages_and_frees():
    tracker = TensorAllocationTracker()
    with tracker:
        a = torch.zeros(1000)  # 4000 bytes
        b = torch.zeros(1000, dtype=torch.float64)  # 8000 bytes
        c = a + 1  # 4000 bytes -> 16000 live
        assert tracker.current_bytes == 16000
        del a
        gc.collect()
        assert tracker.current_bytes == 12000
        d = torch.empty(250)  # 1000 bytes -> 13000
    assert tracker.peak_bytes == 16000
    assert tracker.current_bytes == 13000
    assert tracker.allocations == 4
    assert tracker.total_allocated_bytes == 17000
    del b, c, d
    gc.collect()
    assert tracker.current_bytes == 0


def test_tracker_skips_views_inplace_and_outside_tensors():
    outside = torch.zeros(500)
    tracker = TensorAllocationTracker()
    with tracker:
        v = outside.view(5, 100)  # view of a pre-existing storage
        outside.add_(1)  # in-place
        w = v[1:]  # view
        torch.add(outside, 1, out=outside)  # out= into an input
        x = torch.zeros(10)
        y = x.t()  # view of a new storage: counted once
    assert tracker.allocations == 1
    assert tracker.peak_bytes == 40
    del v, w, x, y


def test_tracker_reset_peak():
    tracker = TensorAllocationTracker()
    with tracker:
        a = torch.zeros(100)
        del a
        gc.collect()
        tracker.reset_peak()
        b = torch.zeros(10)
    assert tracker.peak_bytes == 40
    del b


def test_tracker_sees_backward_and_optimizer_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    opt = torch.optim.AdamW(model.parameters())
    tracker = TensorAllocationTracker()
    with tracker:
        model(torch.randn(8, 64)).sum().backward()
        opt.step()
    params = 64 * 32 + 32
    # gradients (fp32) and two AdamW moments must be alive at the end, all created inside
    assert tracker.current_bytes >= 3 * 4 * params
    assert tracker.peak_bytes >= tracker.current_bytes


def test_tensor_bytes_dedups_shared_storage():
    a = torch.zeros(100)
    assert tensor_bytes([a, a[10:], a.view(10, 10), "not a tensor"]) == 400
    assert tensor_bytes([]) == 0


def test_module_bytes_counts_tied_weights_once():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.Sequential(emb, head)
    assert module_bytes(model) == 10 * 4 * 4
    model(torch.tensor([1, 2])).sum().backward()
    assert module_bytes(model, grads=True) == 2 * 10 * 4 * 4


@pytest.mark.parametrize(
    "make, expected",
    [
        # AdamW: exp_avg + exp_avg_sq per element (+ a 0-d float32 step per parameter)
        (lambda p: torch.optim.AdamW(p), 2 * 4 * (256 * 128 + 128) + 2 * 4),
        # CAME: exp_avg (full) + 4 factored vectors for the matrix; exp_avg + exp_avg_sq for
        # the bias; step counters
        (lambda p: CAME(p), 4 * (256 * 128 + 2 * 256 + 2 * 128) + 4 * 2 * 128),
    ],
    ids=["adamw", "came"],
)
def test_optimizer_state_bytes_matches_layout(make, expected):
    model = torch.nn.Linear(256, 128)
    opt = make(model.parameters())
    assert optimizer_state_bytes(opt) == 0
    model(torch.randn(4, 256)).sum().backward()
    opt.step()
    got = optimizer_state_bytes(opt, include_scalars=False)
    assert abs(got - expected) <= 64, (got, expected)
    assert optimizer_state_bytes(opt) >= got


def test_came_state_is_about_half_of_adamw():
    model = torch.nn.Linear(512, 512)
    states = {}
    for name, cls in [("adamw", torch.optim.AdamW), ("came", CAME)]:
        opt = cls(model.parameters(), lr=1e-3)
        model(torch.randn(4, 512)).sum().backward()
        opt.step()
        opt.zero_grad()
        states[name] = optimizer_state_bytes(opt)
    assert 0.45 < states["came"] / states["adamw"] < 0.55


def test_measure_step_memory_cpu():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.ReLU(), torch.nn.Linear(512, 8))
    opt = CAME(model.parameters(), lr=1e-3)

    def step():
        model(torch.randn(64, 128)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    result = measure_step_memory(step, device="cpu", baseline=[model, opt])
    assert result.method == "dispatch-tracker"
    assert result.baseline_bytes == module_bytes(model) + optimizer_state_bytes(opt)
    # the step must at least hold all gradients and the 64x512 hidden activation at once
    assert result.allocated_peak_bytes >= module_bytes(model) + 64 * 512 * 4
    assert result.peak_bytes == result.baseline_bytes + result.allocated_peak_bytes
    assert result.seconds > 0
    assert set(result.as_dict()) >= {"peak_bytes", "baseline_bytes", "device"}

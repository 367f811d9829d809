"""CAME with ``torch.compile``: a compiled model, and a compiled optimizer step.

Compiled code fuses and reorders float32 arithmetic, so compiled runs are compared with eager
runs to the table's ``(float32, "compiled")`` tolerance (tests/cases.py) after 6 steps. The
compiled step must not recompile per step when a scheduler changes a tensor lr: every graph
is compiled by the second step (the first step creates the state, which changes the guards
once).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from cases import param_tol
from driver import train
from torch import nn

from torchcame import CAME

STEPS = 6
TOL = param_tol(torch.float32, "compiled")

pytestmark = [
    pytest.mark.skipif(
        not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported(),
        reason="torch.compile is not supported here",
    ),
    # older trees traced the first-step DCP-caller check (sys._getframe): a harmless warning
    pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace:UserWarning"),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))


def _batches():
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(6, 8, generator=gen), torch.randn(6, 4, generator=gen))
            for _ in range(STEPS)]


def _schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2) * 0.8**s)


def _backward(model):
    batches = _batches()

    def set_grads(t: int) -> None:
        x, y = batches[t]
        nn.functional.mse_loss(model(x), y).backward()
    return set_grads


def _train(model, opt, sched, step_fn=None, after=None) -> None:
    step_fn = step_fn or (lambda: (opt.step(), sched.step()))
    train(opt, STEPS, _backward(model), step=step_fn, after=after)


def _assert_close_models(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=TOL.rtol, atol=TOL.atol, msg=name)


@pytest.mark.slow  # ~20 s on 2 cores: compiles forward and backward
def test_compiled_model_trains_with_came() -> None:
    """``torch.compile(model)`` + CAME (eager step) == the eager model + CAME."""
    eager = _mlp()
    opt = CAME(eager.parameters(), lr=1e-2, weight_decay=0.1)
    _train(eager, opt, _schedule(opt))

    model = _mlp()
    compiled = torch.compile(model)
    opt = CAME(compiled.parameters(), lr=1e-2, weight_decay=0.1)
    _train(compiled, opt, _schedule(opt))
    _assert_close_models(model, eager)
    assert all(float(s["step"]) == STEPS for s in opt.state.values())


@pytest.mark.parametrize(
    "impl",
    [
        pytest.param({"foreach": False, "fused": False}, id="reference"),
        pytest.param({"foreach": True}, id="foreach", marks=pytest.mark.slow),  # ~25 s
        pytest.param({"fused": True}, id="fused", marks=[
            pytest.mark.slow,
            pytest.mark.skipif(importlib.util.find_spec("torchcame._impl.fused") is None,
                               reason="no fused path yet"),
        ]),
    ],
)
def test_compiled_step_with_tensor_lr_scheduler(impl: dict) -> None:
    """``@torch.compile def step(): opt.step(); sched.step()`` with a tensor lr: same result
    as eager, and no recompilation after the first step although lr changes every step."""
    eager = _mlp()
    opt = CAME(eager.parameters(), lr=torch.tensor(1e-2), weight_decay=0.1, **impl)
    _train(eager, opt, _schedule(opt))

    model = _mlp()
    opt = CAME(model.parameters(), lr=torch.tensor(1e-2), weight_decay=0.1, **impl)
    sched = _schedule(opt)

    @torch.compile
    def step() -> None:
        opt.step()
        sched.step()

    graphs = []
    _train(model, opt, sched, step_fn=step, after=lambda t: graphs.append(_graphs()))
    assert graphs[0] > 0, "nothing was compiled"
    assert graphs[2:] == [graphs[1]] * (STEPS - 2), f"recompiled while lr changed: {graphs}"
    _assert_close_models(model, eager)


def test_compiled_step_float_lr_constant() -> None:
    """A float lr that does not change compiles once and matches eager (with a changing
    float lr, use a tensor: see docs/integrations.md)."""
    eager = _mlp()
    opt = CAME(eager.parameters(), lr=1e-2, weight_decay=0.1)
    _train(eager, opt, None, step_fn=opt.step)

    model = _mlp()
    opt = CAME(model.parameters(), lr=1e-2, weight_decay=0.1)
    compiled_step = torch.compile(opt.step)
    _train(model, opt, None, step_fn=compiled_step)
    _assert_close_models(model, eager)


@pytest.mark.slow  # ~18 s: one compile per distinct float lr
def test_compiled_step_changing_float_lr_with_weight_decay() -> None:
    """A float lr changed every step (recompiles, but) still decays with the current lr."""
    def sched_of(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.7**t)

    eager = _mlp()
    opt = CAME(eager.parameters(), lr=1e-2, weight_decay=0.5)
    _train(eager, opt, sched_of(opt))

    model = _mlp()
    opt = CAME(model.parameters(), lr=1e-2, weight_decay=0.5)
    sched = sched_of(opt)
    compiled_step = torch.compile(opt.step)
    _train(model, opt, None, step_fn=lambda: (compiled_step(), sched.step()))
    _assert_close_models(model, eager)

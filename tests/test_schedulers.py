"""LR schedulers drive CAME on every implementation, with a float or a tensor lr.

Each case runs 12 scheduled steps on a small parameter set (matrix, batch of matrices,
vector) and compares the parameters with a hand-written loop on the reference path that sets
``group["lr"]`` (and, for OneCycleLR, β1) to the schedule's values as floats. Tolerance
(float32 params): the table's ``(float32, "scheduled")`` row (tests/cases.py) — the
implementations agree to a few ulps per step, a float vs a tensor lr differs only in how
``lr * weight_decay`` is rounded.

The fused path must not compile anything per step: the number of graphs Dynamo compiled may
not grow after the first step.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import IMPLS, param_tol
from cases import SHAPES as TABLE_SHAPES
from driver import assign, make_params, random_grads, train

from torchcame import CAME

SHAPES = [TABLE_SHAPES[3], TABLE_SHAPES[4], TABLE_SHAPES[1]]  # matrix, batch, vector
STEPS = 12
BASE_LR = 1e-2
TOL = param_tol(torch.float32, "scheduled")


def _hf_cosine(opt, total):
    transformers = pytest.importorskip("transformers")
    return transformers.get_cosine_schedule_with_warmup(
        opt, num_warmup_steps=3, num_training_steps=total
    )


SCHEDULERS = {
    "lambda": lambda opt, total: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 4) * 0.9**s
    ),
    "cosine": lambda opt, total: torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=total, eta_min=1e-4
    ),
    "onecycle": lambda opt, total: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=BASE_LR, total_steps=total
    ),
    "onecycle_fixed_beta1": lambda opt, total: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=BASE_LR, total_steps=total, cycle_momentum=False
    ),
    "hf_cosine_warmup": _hf_cosine,
}


def _params() -> list[torch.Tensor]:
    return make_params(SHAPES)


_LIKE = [torch.zeros(s) for s in SHAPES]


def _grads(step: int) -> list[torch.Tensor]:
    return random_grads(_LIKE, step, seed=2)


def _dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["stats"].values()) + sum(counters["frames"].values())


def _run_scheduled(name: str, lr: float | torch.Tensor, impl: dict):
    """Returns (final params, [(lr, betas) used at each step], [dynamo counts per step])."""
    params = _params()
    opt = CAME(params, lr=lr, weight_decay=0.1, **impl)
    sched = SCHEDULERS[name](opt, STEPS)
    used, graphs = [], []
    set_grads = assign(params, _grads)

    def record_and_set_grads(step):
        group = opt.param_groups[0]
        used.append((float(group["lr"]), tuple(group["betas"])))
        set_grads(step)

    train(opt, STEPS, record_and_set_grads,
          after=lambda step: (sched.step(), graphs.append(_dynamo_graphs())))
    return params, used, graphs, opt


def _run_manual(used) -> list[torch.Tensor]:
    params = _params()
    opt = CAME(params, lr=BASE_LR, weight_decay=0.1, **IMPLS["reference"])
    set_grads = assign(params, _grads)

    def set_hyper_and_grads(step):
        opt.param_groups[0]["lr"], opt.param_groups[0]["betas"] = used[step]
        set_grads(step)

    train(opt, len(used), set_hyper_and_grads)
    return params


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_drives_came(name: str, lr_kind: str, impl: str) -> None:
    lr = BASE_LR if lr_kind == "float" else torch.tensor(BASE_LR)
    params, used, graphs, opt = _run_scheduled(name, lr, IMPLS[impl])

    group = opt.param_groups[0]
    if lr_kind == "tensor":  # schedulers fill the tensor in place, never replace it
        assert group["lr"] is lr
    assert len(group["betas"]) == 3
    lrs = [u[0] for u in used]
    assert len(set(lrs)) > 3, "the schedule should actually change lr"
    if name == "onecycle":
        # OneCycleLR cycles betas[0] (0.95 -> 0.85 -> 0.95) and keeps beta2, beta3
        beta1s = [u[1][0] for u in used]
        assert min(beta1s) < 0.9 < max(beta1s)
        assert all(u[1][1:] == (0.999, 0.9999) for u in used)
    else:
        assert all(u[1] == (0.9, 0.999, 0.9999) for u in used)

    expected = _run_manual(used)
    for got, want in zip(params, expected):
        torch.testing.assert_close(got, want, rtol=TOL.rtol, atol=TOL.atol)

    if impl == "fused":  # no compilation per step: whatever was compiled, was at step 1
        assert graphs[1:] == [graphs[0]] * (STEPS - 1), f"dynamo counters grew: {graphs}"


def test_hf_cosine_schedule_values() -> None:
    """transformers' warmup+cosine schedule sets exactly its documented lr on CAME."""
    transformers = pytest.importorskip("transformers")
    opt = CAME([torch.zeros(2, 2, requires_grad=True)], lr=torch.tensor(1e-3))
    sched = transformers.get_cosine_schedule_with_warmup(opt, 2, 10)
    seen = []
    train(opt, 10, lambda t: seen.append(float(opt.param_groups[0]["lr"])),
          after=lambda t: sched.step())
    expected = [1e-3 * s / 2 if s < 2 else 1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8))
                for s in range(10)]
    assert seen == pytest.approx(expected, rel=1e-6)


def test_scheduler_state_dict_round_trip() -> None:
    """Optimizer and scheduler checkpoints resume a scheduled run exactly."""
    def make():
        params = _params()
        opt = CAME(params, lr=torch.tensor(BASE_LR), weight_decay=0.1)
        return params, opt, SCHEDULERS["onecycle"](opt, STEPS)

    def run(params, opt, sched, steps):
        train(opt, len(steps), assign(params, _grads), start=steps[0],
              after=lambda t: sched.step())

    params, opt, sched = make()
    run(params, opt, sched, range(STEPS))

    half_params, half_opt, half_sched = make()
    run(half_params, half_opt, half_sched, range(STEPS // 2))
    saved = (
        [p.detach().clone() for p in half_params],
        half_opt.state_dict(),
        half_sched.state_dict(),
    )
    new_params, new_opt, new_sched = make()
    with torch.no_grad():
        for p, s in zip(new_params, saved[0]):
            p.copy_(s)
    new_opt.load_state_dict(saved[1])
    new_sched.load_state_dict(saved[2])
    run(new_params, new_opt, new_sched, range(STEPS // 2, STEPS))
    for got, want in zip(new_params, params):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.slow  # compiles two small graphs (~10-20 s on 2 cores)
@pytest.mark.parametrize("lr_kind, schedule", [("float", "lambda"), ("tensor", "lambda"),
                                               ("float", "onecycle")])
def test_fused_compiled_step_no_recompile_under_scheduler(lr_kind: str, schedule: str) -> None:
    """The torch.compile backend of ``fused=True`` (the CUDA path; run here on CPU through
    ``step_compiled``) compiles once per tensor shape: an lr that changes every step (float
    or tensor), or a beta1 cycled by OneCycleLR, does not recompile, and the result matches
    the reference."""
    from torchcame._impl.compiled import step_compiled
    from torchcame.functional import init_state
    from torchcame.options import StepArgs
    from torchcame.state import layout_of

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    lr = BASE_LR if lr_kind == "float" else torch.tensor(BASE_LR)
    params = [p.detach() for p in _params()]
    states = [init_state(p) for p in params]
    holder = CAME([torch.zeros(1, requires_grad=True)], lr=lr)  # only to drive the scheduler
    sched = SCHEDULERS[schedule](holder, STEPS)
    used, graphs = [], []

    def compiled_step(step):
        group = holder.param_groups[0]
        used.append((float(group["lr"]), tuple(group["betas"])))
        args = StepArgs(lr=group["lr"], betas=group["betas"], eps=group["eps"],
                        clip_threshold=group["clip_threshold"], weight_decay=0.1)
        for state in states:  # the caller counts the step (functional.step_group does)
            state["step"] += 1
        assert step_compiled(params, _grads(step), states, args,
                             [layout_of(p, {}) for p in params]) == []

    train(holder, STEPS, compiled_step,
          after=lambda step: (sched.step(), graphs.append(_dynamo_graphs())))
    assert graphs[0] > 0, "nothing was compiled"
    assert graphs[1:] == [graphs[0]] * (STEPS - 1), f"recompiled while lr changed: {graphs}"
    for got, want in zip(params, _run_manual(used)):
        torch.testing.assert_close(got, want.detach(), rtol=TOL.rtol, atol=TOL.atol)
    torch._dynamo.reset()

"""Behaviour of the CAME class: step semantics, options, validation and errors."""

from __future__ import annotations

import pytest
import torch
from cases import SHAPES, param_tol
from driver import (
    assert_raises_untouched,
    assert_same_values,
    assign,
    clone_params,
    make_params,
    random_grads,
    snapshot,
    train,
)

import torchcame
from torchcame import CAME

# ------------------------------------------------------------------- step semantics


def test_drop_in_positional_signature():
    (p,) = make_params([(4, 3)])
    opt = CAME([p], 1e-3, (1e-30, 1e-16), 1.0, (0.9, 0.999, 0.9999), 0.01)
    group = opt.param_groups[0]
    assert group["lr"] == 1e-3 and group["eps"] == (1e-30, 1e-16)
    assert group["clip_threshold"] == 1.0 and group["betas"] == (0.9, 0.999, 0.9999)
    assert group["weight_decay"] == 0.01 and group["maximize"] is False


def test_step_runs_without_recording_autograd():
    model = torch.nn.Linear(4, 3)
    opt = CAME(model.parameters(), lr=1e-2)
    model(torch.randn(8, 4)).square().mean().backward()
    opt.step()  # in-place updates of leaves that require grad would fail outside no_grad
    assert model.weight.grad_fn is None and model.weight.requires_grad


def test_closure_runs_with_grad_enabled_and_loss_returned():
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = CAME(model.parameters(), lr=1e-2)
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = model.weight.detach().clone()
    loss = opt.step(closure)
    assert seen == [True]
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert not torch.equal(before, model.weight)


def _pair(opt_a, params_a, opt_b, params_b, steps, grads_b=lambda g: g):
    """Step two optimizers on the same gradients (``grads_b`` maps them for the second)."""
    def set_grads(t):
        for p, q, g in zip(params_a, params_b, random_grads(params_a, t)):
            p.grad, q.grad = g.clone(), grads_b(g)
    train(opt_a, steps, set_grads, step=lambda: (opt_a.step(), opt_b.step()), zero_grad=False)


def test_maximize_equals_minimizing_negated_objective():
    params = make_params([SHAPES[2], SHAPES[1], SHAPES[0]])
    mirror = clone_params(params)
    opt_max = CAME(params, lr=1e-2, weight_decay=0.1, maximize=True)  # gradient of f
    opt_min = CAME(mirror, lr=1e-2, weight_decay=0.1)  # gradient of -f
    _pair(opt_max, params, opt_min, mirror, 20, grads_b=lambda g: -g)
    for p, q in zip(params, mirror):
        assert torch.equal(p, q)


def test_tensor_lr_equals_float_lr():
    params = make_params([SHAPES[2], SHAPES[1]])
    mirror = clone_params(params)
    opt_t = CAME(params, lr=torch.tensor(1e-2), weight_decay=0.1)
    opt_f = CAME(mirror, lr=1e-2, weight_decay=0.1)
    _pair(opt_t, params, opt_f, mirror, 20)
    tol = param_tol(torch.float32, "tensor_lr")
    for p, q in zip(params, mirror):
        torch.testing.assert_close(p, q, rtol=tol.rtol, atol=tol.atol)


def test_tensor_lr_can_be_changed_in_place_by_a_scheduler():
    (p,) = make_params([SHAPES[2]])
    lr = torch.tensor(1e-2)
    opt = CAME([p], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    train(opt, 3, assign([p], lambda t: random_grads([p], t)), after=lambda t: sched.step())
    assert opt.param_groups[0]["lr"] is lr
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-2 * 0.5**3)


# ------------------------------------------------------------------- skip_nonfinite


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_skip_nonfinite_leaves_group_untouched_and_counts(bad):
    params = make_params([SHAPES[2], SHAPES[1]])
    other = make_params([(2, 2)], seed=3)
    opt = CAME([{"params": params}, {"params": other}], lr=1e-2, skip_nonfinite=True)
    everything = params + other
    train(opt, 2, assign(everything, lambda t: random_grads(everything, t)))
    grads = random_grads(everything, 5)
    grads[0][1, 2] = bad
    assign(everything, lambda t: grads)(5)
    def group_snapshot():  # params, grads and state of the first group
        return snapshot(None, params), [{k: v.clone() for k, v in opt.state[p].items()}
                                        for p in params]

    before = group_snapshot()
    other_before = other[0].detach().clone()
    opt.step()
    assert_same_values(group_snapshot(), before, "the skipped group")
    assert opt.param_groups[0]["skipped_steps"] == 1
    assert opt.param_groups[1]["skipped_steps"] == 0
    assert not torch.equal(other[0], other_before)  # the healthy group still stepped
    train(opt, 1, assign(everything, lambda t: random_grads(everything, t)), start=6)
    assert float(opt.state[params[0]]["step"]) == 3
    assert all(torch.isfinite(v).all() for v in opt.state[params[0]].values())


def test_default_does_not_skip_nonfinite():
    (p,) = make_params([SHAPES[2]])
    opt = CAME([p], lr=1e-2)
    g = random_grads([p], 0)[0]
    g[0, 0] = float("nan")
    p.grad = g
    opt.step()
    assert float(opt.state[p]["step"]) == 1
    assert torch.isnan(opt.state[p]["exp_avg_sq_col"]).any()  # the faithful rule poisons state


# ------------------------------------------------------------------- validation


def test_lr_zero_is_allowed_and_moves_nothing():
    (p,) = make_params([(3, 4)])
    before = p.detach().clone()
    opt = CAME([p], lr=0.0, weight_decay=0.1)
    p.grad = random_grads([p], 0)[0]
    opt.step()
    assert torch.equal(p, before)


def test_complex_params_refused_with_advice():
    p = torch.randn(3, 4, dtype=torch.complex64, requires_grad=True)
    assert_raises_untouched(None, [p], lambda: CAME([p], lr=1e-3), TypeError,
                            r"complex64.*view_as_real")


def test_functional_rejects_mismatched_lengths():
    params = make_params([(3, 4)])
    with pytest.raises(ValueError, match="same length"):
        torchcame.came(params, [], [torchcame.init_state(params[0])], lr=1e-3)

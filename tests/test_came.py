"""Behaviour of the CAME class: step semantics, options, validation and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from driver import clone_params, make_params, random_grads

import torchcame
from torchcame import CAME


def _snapshot(opt, params):
    return (
        [p.detach().clone() for p in params],
        copy.deepcopy({id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}),
    )


def _assert_unchanged(opt, params, snap):
    before_params, before_state = snap
    for p, b in zip(params, before_params):
        assert torch.equal(p, b)
    for p in params:
        now = opt.state[p]
        was = before_state[id(p)]
        assert set(now) == set(was)
        for k in was:
            assert torch.equal(now[k], was[k]), k


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


def test_params_without_grad_are_skipped_and_keep_no_state():
    a, b = make_params([(3, 4), (5,)])
    opt = CAME([a, b], lr=1e-2)
    before = b.detach().clone()
    for t in range(3):
        a.grad = random_grads([a], t)[0]
        opt.step()
    assert torch.equal(b, before)
    assert b not in opt.state and float(opt.state[a]["step"]) == 3


def test_maximize_equals_minimizing_negated_objective():
    params = make_params([(3, 4), (5,), ()])
    mirror = clone_params(params)
    opt_max = CAME(params, lr=1e-2, weight_decay=0.1, maximize=True)
    opt_min = CAME(mirror, lr=1e-2, weight_decay=0.1)
    for t in range(20):
        for p, q, g in zip(params, mirror, random_grads(params, t)):
            p.grad = g           # gradient of f
            q.grad = -g          # gradient of -f
        opt_max.step()
        opt_min.step()
    for p, q in zip(params, mirror):
        assert torch.equal(p, q)


def test_tensor_lr_equals_float_lr():
    params = make_params([(3, 4), (5,)])
    mirror = clone_params(params)
    opt_t = CAME(params, lr=torch.tensor(1e-2), weight_decay=0.1)
    opt_f = CAME(mirror, lr=1e-2, weight_decay=0.1)
    for t in range(20):
        for p, q, g in zip(params, mirror, random_grads(params, t)):
            p.grad, q.grad = g, g.clone()
        opt_t.step()
        opt_f.step()
    for p, q in zip(params, mirror):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_tensor_lr_can_be_changed_in_place_by_a_scheduler():
    (p,) = make_params([(3, 4)])
    lr = torch.tensor(1e-2)
    opt = CAME([p], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    for t in range(3):
        p.grad = random_grads([p], t)[0]
        opt.step()
        sched.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-2 * 0.5**3)


def test_param_groups_equal_separate_optimizers():
    params = make_params([(3, 4), (5,), (2, 3, 4)])
    mirror = clone_params(params)
    grouped = CAME(
        [{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "weight_decay": 0.1}],
        lr=3e-3,
    )
    separate = [CAME(mirror[:2], lr=1e-2), CAME(mirror[2:], lr=3e-3, weight_decay=0.1)]
    for t in range(10):
        for p, q, g in zip(params, mirror, random_grads(params, t)):
            p.grad, q.grad = g, g.clone()
        grouped.step()
        for o in separate:
            o.step()
    for p, q in zip(params, mirror):
        assert torch.equal(p, q)


def test_non_contiguous_param_equals_contiguous():
    base = torch.randn(6, 4, dtype=torch.float64)
    p = base.t().detach().requires_grad_()       # non-contiguous (4, 6)
    q = base.t().contiguous().requires_grad_()
    assert not p.is_contiguous()
    opt_p, opt_q = CAME([p], lr=1e-2), CAME([q], lr=1e-2)
    for t in range(10):
        g = random_grads([q], t)[0]
        p.grad, q.grad = g.t().contiguous().t(), g.clone()
        opt_p.step()
        opt_q.step()
    torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_dtype_and_shape_preserved():
    params = make_params([(3, 4), (5,)], dtype=torch.bfloat16)
    opt = CAME(params, lr=1e-2)
    for p, g in zip(params, random_grads(params, 0)):
        p.grad = g
    opt.step()
    assert [p.dtype for p in params] == [torch.bfloat16] * 2
    assert opt.state[params[0]]["exp_avg_sq_row"].shape == (3,)
    assert opt.state[params[0]]["exp_avg_sq_col"].shape == (4,)
    assert opt.state[params[1]]["exp_avg_sq"].dtype == torch.float32


# ------------------------------------------------------------------- skip_nonfinite


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_skip_nonfinite_leaves_group_untouched_and_counts(bad):
    params = make_params([(3, 4), (5,)])
    other = make_params([(2, 2)], seed=3)
    opt = CAME([{"params": params}, {"params": other}], lr=1e-2, skip_nonfinite=True)
    for t in range(2):
        for p, g in zip(params + other, random_grads(params + other, t)):
            p.grad = g
        opt.step()
    snap = _snapshot(opt, params)
    other_before = other[0].detach().clone()
    grads = random_grads(params + other, 5)
    grads[0][1, 2] = bad
    for p, g in zip(params + other, grads):
        p.grad = g
    opt.step()
    _assert_unchanged(opt, params, snap)
    assert opt.param_groups[0]["skipped_steps"] == 1
    assert opt.param_groups[1]["skipped_steps"] == 0
    assert not torch.equal(other[0], other_before)  # the healthy group still stepped
    for p, g in zip(params + other, random_grads(params + other, 6)):
        p.grad = g
    opt.step()
    assert float(opt.state[params[0]]["step"]) == 3
    assert all(torch.isfinite(v).all() for v in opt.state[params[0]].values())


def test_default_does_not_skip_nonfinite():
    (p,) = make_params([(3, 4)])
    opt = CAME([p], lr=1e-2)
    g = random_grads([p], 0)[0]
    g[0, 0] = float("nan")
    p.grad = g
    opt.step()
    assert float(opt.state[p]["step"]) == 1
    assert torch.isnan(opt.state[p]["exp_avg_sq_col"]).any()  # the faithful rule poisons state


# ------------------------------------------------------------------- validation


BAD_HPARAMS = [
    (dict(lr=-1e-3), ValueError, "lr"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(lr=None), TypeError, "lr"),
    (dict(lr="0.1"), TypeError, "lr"),
    (dict(lr=torch.tensor([1e-3, 2e-3])), ValueError, "lr"),
    (dict(lr=torch.tensor(-1.0)), ValueError, "lr"),
    (dict(betas=(0.9, 0.999)), ValueError, "betas"),
    (dict(betas=(1.0, 0.999, 0.9999)), ValueError, r"betas\[0\]"),
    (dict(betas=(0.9, -0.1, 0.9999)), ValueError, r"betas\[1\]"),
    (dict(betas=(0.9, 0.999, float("nan"))), ValueError, r"betas\[2\]"),
    (dict(betas=0.9), TypeError, "betas"),
    (dict(eps=(1e-30,)), ValueError, "eps"),
    (dict(eps=(-1e-30, 1e-16)), ValueError, r"eps\[0\]"),
    (dict(eps=(1e-30, -1.0)), ValueError, r"eps\[1\]"),
    (dict(clip_threshold=0.0), ValueError, "clip_threshold"),
    (dict(clip_threshold=-1.0), ValueError, "clip_threshold"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(maximize=1), TypeError, "maximize"),
    (dict(skip_nonfinite="yes"), TypeError, "skip_nonfinite"),
    (dict(foreach=True, fused=True), ValueError, "exclusive"),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD_HPARAMS)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, exc, match):
    (p,) = make_params([(3, 4)])
    with pytest.raises(exc, match=match):
        CAME([p], **kwargs)


@pytest.mark.parametrize("kwargs, exc, match", BAD_HPARAMS[:8])
def test_bad_group_hyperparameters_raise(kwargs, exc, match):
    a, b = make_params([(3, 4), (2,)])
    with pytest.raises(exc, match=match):
        CAME([{"params": [a]}, {"params": [b], **kwargs}], lr=1e-3)


def test_lr_zero_is_allowed_and_moves_nothing():
    (p,) = make_params([(3, 4)])
    before = p.detach().clone()
    opt = CAME([p], lr=0.0, weight_decay=0.1)
    p.grad = random_grads([p], 0)[0]
    opt.step()
    assert torch.equal(p, before)


def test_complex_params_refused_with_advice():
    p = torch.randn(3, 4, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(TypeError, match="view_as_real"):
        CAME([p], lr=1e-3)


def test_sparse_grad_refused_before_any_state_changes():
    dense = make_params([(3, 4)])
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = CAME([{"params": dense}, {"params": emb.parameters()}], lr=1e-2)
    dense[0].grad = random_grads(dense, 0)[0]
    emb(torch.tensor([1, 2])).sum().backward()
    before = dense[0].detach().clone()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(dense[0], before)
    assert len(opt.state) == 0


def test_complex_grad_refused():
    (p,) = make_params([(3, 4)])
    opt = CAME([p], lr=1e-2)
    p.grad_dtype = None  # torch itself refuses a complex grad on a real param otherwise
    p.grad = torch.randn(3, 4, dtype=torch.complex64)
    with pytest.raises(TypeError, match="complex"):
        opt.step()
    assert len(opt.state) == 0


def test_functional_rejects_mismatched_lengths():
    params = make_params([(3, 4)])
    with pytest.raises(ValueError, match="same length"):
        torchcame.came(params, [], [torchcame.init_state(params[0])], lr=1e-3)

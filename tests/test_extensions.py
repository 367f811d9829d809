"""Opt-in fixes of the reference's weak points: ``factor_dims`` and ``bias_correction``.

The default update is covered by test_parity.py; here each option is checked against an
independent statement of what it does.
"""

from __future__ import annotations

import pytest
import torch
from driver import make_params, random_grads
from test_parity import spec_state

from torchcame import CAME


def _drive(pairs, steps, **kwargs):
    """Step param ``a`` with grad g and param ``b`` with ``view(g)``; return optimizers."""
    opt_a = CAME([a for a, _, _ in pairs], lr=1e-2, weight_decay=0.01, **kwargs.get("a", {}))
    opt_b = CAME([b for _, b, _ in pairs], lr=1e-2, weight_decay=0.01, **kwargs.get("b", {}))
    for t in range(steps):
        for a, b, view in pairs:
            (g,) = random_grads([a], t)
            a.grad, b.grad = g, view(g).contiguous()
        opt_a.step()
        opt_b.step()
    return opt_a, opt_b


def test_largest_policy_on_1x1_conv_equals_the_matrix():
    (w,) = make_params([(12, 7, 1, 1)], torch.float64)
    mat = w.detach().reshape(12, 7).clone().requires_grad_()
    opt_a, _ = _drive([(w, mat, lambda g: g.reshape(12, 7))], 20,
                      a=dict(factor_dims="largest"))
    torch.testing.assert_close(w.detach().reshape(12, 7), mat.detach(), rtol=1e-12, atol=1e-14)
    state = opt_a.state[w]
    assert state["exp_avg_sq_row"].shape == (1, 1, 12)
    assert state["exp_avg_sq_col"].shape == (1, 1, 7)


def test_largest_policy_moves_the_big_dims_last():
    (w,) = make_params([(6, 5, 3, 2)], torch.float64)
    moved = w.detach().permute(2, 3, 0, 1).clone().requires_grad_()
    _drive([(w, moved, lambda g: g.permute(2, 3, 0, 1))], 15, a=dict(factor_dims="largest"))
    torch.testing.assert_close(w.detach().permute(2, 3, 0, 1), moved.detach(),
                               rtol=1e-12, atol=1e-14)


def test_largest_policy_is_the_default_for_matrices_and_min_dim_unfactors():
    (a,) = make_params([(5, 9)])
    b = a.detach().clone().requires_grad_()
    _drive([(a, b, lambda g: g)], 10, a=dict(factor_dims="largest"))
    assert torch.equal(a, b)
    (c,) = make_params([(3, 40)])
    opt = CAME([c], lr=1e-2, factor_dims="largest", factor_min_dim=4)
    c.grad = random_grads([c], 0)[0]
    opt.step()
    assert set(opt.state[c]) == {"step", "exp_avg", "exp_avg_sq"}


def test_default_conv_state_is_the_reference_layout():
    (w,) = make_params([(12, 7, 1, 1)])
    opt = CAME([w], lr=1e-2)
    w.grad = random_grads([w], 0)[0]
    opt.step()
    assert opt.state[w]["exp_avg_sq_row"].shape == (12, 7, 1)


# ---------------------------------------------------------------- bias correction


def spec_step_bias_corrected(theta, g, s, t, *, lr, betas, eps, wd):
    """The spec's rule with Adam-style bias correction of m, v_hat and S_hat (written out)."""
    b1, b2, b3 = betas
    e1, e2 = eps
    G = g * g + e1
    factored = theta.dim() >= 2
    if factored:
        s["r"] = b2 * s["r"] + (1 - b2) * G.sum(-1)
        s["c"] = b2 * s["c"] + (1 - b2) * G.sum(-2)
        V = s["r"].unsqueeze(-1) * s["c"].unsqueeze(-2) / s["r"].sum(-1)[..., None, None]
    else:
        s["v"] = b2 * s["v"] + (1 - b2) * G
        V = s["v"]
    u = g / torch.sqrt(V / (1 - b2**t))
    u_hat = u / max(1.0, float(torch.sqrt(torch.mean(u * u))))
    s["m"] = b1 * s["m"] + (1 - b1) * u_hat
    m_hat = s["m"] / (1 - b1**t)
    if factored:
        U = (u_hat - s["m"]) ** 2 + e2
        s["R"] = b3 * s["R"] + (1 - b3) * U.sum(-1)
        s["C"] = b3 * s["C"] + (1 - b3) * U.sum(-2)
        S = s["R"].unsqueeze(-1) * s["C"].unsqueeze(-2) / s["R"].sum(-1)[..., None, None]
        delta = m_hat / torch.sqrt(S / (1 - b3**t))
    else:
        delta = m_hat
    return theta - lr * wd * theta - lr * delta


@pytest.mark.parametrize("shape", [(7,), (5, 3), (2, 4, 6)])
def test_bias_correction_matches_written_out_rule(shape):
    hp = dict(lr=2e-2, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16))
    (p,) = make_params([shape], torch.float64)
    theta = p.detach().clone()
    opt = CAME([p], weight_decay=0.01, bias_correction=True, **hp)
    s = spec_state(shape)
    for t in range(1, 31):
        (g,) = random_grads([p], t)
        p.grad = g
        opt.step()
        theta = spec_step_bias_corrected(theta, g, s, t, wd=0.01, **hp)
        torch.testing.assert_close(p.detach(), theta, rtol=1e-10, atol=1e-12)


def test_bias_correction_removes_early_amplification():
    """Without it the first steps of a matrix move ~10-20x lr per element; with it ~lr."""
    sizes = {}
    for bc in (False, True):
        (p,) = make_params([(64, 32)])
        p0 = p.detach().clone()
        opt = CAME([p], lr=1e-3, bias_correction=bc)
        biggest = 0.0
        for t in range(20):
            p.grad = random_grads([p], t)[0]
            before = p.detach().clone()
            opt.step()
            biggest = max(biggest, float((p.detach() - before).abs().mean() / 1e-3))
        sizes[bc] = biggest
        assert not torch.equal(p, p0)
    assert sizes[False] > 5.0
    assert sizes[True] < 2.0

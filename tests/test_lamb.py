"""Tests of the LAMB baseline (You et al. 2019, Algorithm 2) used by the recipes."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from torchcame.recipes.optimizers import DEFAULT_LR, LAMB, OPTIMIZERS, build_optimizer


def _lamb_reference(x, grads, lr, beta1, beta2, eps, wd):
    """LAMB written element by element in float64 from the paper's equations."""
    x = [float(v) for v in x]
    m = [0.0] * len(x)
    v = [0.0] * len(x)
    for t, g in enumerate(grads, start=1):
        g = [float(e) for e in g]
        m = [beta1 * mi + (1 - beta1) * gi for mi, gi in zip(m, g)]
        v = [beta2 * vi + (1 - beta2) * gi * gi for vi, gi in zip(v, g)]
        m_hat = [mi / (1 - beta1**t) for mi in m]
        v_hat = [vi / (1 - beta2**t) for vi in v]
        r = [mh / (math.sqrt(vh) + eps) + wd * xi for mh, vh, xi in zip(m_hat, v_hat, x)]
        x_norm = math.sqrt(sum(xi * xi for xi in x))
        r_norm = math.sqrt(sum(ri * ri for ri in r))
        ratio = x_norm / r_norm if x_norm > 0 and r_norm > 0 else 1.0
        x = [xi - lr * ratio * ri for xi, ri in zip(x, r)]
    return x


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lamb_matches_paper_equations(wd):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    grads = [torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(7)]
    p = torch.nn.Parameter(x0.clone())
    opt = LAMB([p], lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = _lamb_reference(
        x0.flatten().tolist(), [g.flatten().tolist() for g in grads], 0.05, 0.8, 0.95, 1e-6, wd
    )
    torch.testing.assert_close(
        p.detach().flatten(), torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12
    )
    assert opt.state[p]["step"].item() == 7


def test_lamb_step_norm_is_lr_times_param_norm():
    # the trust ratio makes every per-tensor step exactly lr * ||x|| long
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(8, 8) * 3.0)
    b = torch.nn.Parameter(torch.randn(4) * 0.01)
    before = [a.detach().clone(), b.detach().clone()]
    opt = LAMB([a, b], lr=0.01)
    a.grad = torch.randn(8, 8) * 1e3
    b.grad = torch.randn(4) * 1e-3
    opt.step()
    for p, old in zip([a, b], before):
        step = torch.linalg.vector_norm(p.detach() - old)
        assert step.item() == pytest.approx(0.01 * torch.linalg.vector_norm(old).item(), rel=1e-4)


def test_lamb_zero_param_uses_unit_trust_ratio():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = LAMB([p], lr=0.1, eps=0.0)
    p.grad = torch.tensor([1.0, -2.0, 0.5])
    opt.step()
    # first step with bias correction: m_hat/sqrt(v_hat) = sign(g); ratio 1
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.1, -0.1]))


def test_lamb_skips_params_without_grad_and_minimizes():
    torch.manual_seed(0)
    target = torch.randn(16)
    w = torch.nn.Parameter(torch.randn(16))
    frozen = torch.nn.Parameter(torch.ones(2))
    opt = LAMB([w, frozen], lr=0.05)
    first = None
    for _ in range(200):
        loss = (w - target).square().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first
    assert torch.equal(frozen.detach(), torch.ones(2))
    assert frozen not in opt.state


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": -1.0},
        {"lr": float("nan")},
        {"betas": (1.0, 0.9)},
        {"eps": -1.0},
        {"weight_decay": -0.1},
    ],
)
def test_lamb_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        LAMB([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_lamb_state_dict_round_trip():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = LAMB([p], lr=0.01)
    p.grad = torch.randn(4, 4)
    opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = LAMB([q], lr=0.01)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # no shared tensors
    g = torch.randn(4, 4)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    torch.testing.assert_close(p, q)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_build_optimizer_by_name(name):
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = build_optimizer(name.upper(), [p])
    assert opt.param_groups[0]["lr"] == DEFAULT_LR[name]
    opt = build_optimizer(name, [p], lr=0.123, weight_decay=0.01)
    assert opt.param_groups[0]["lr"] == 0.123
    assert opt.param_groups[0]["weight_decay"] == 0.01
    p.grad = torch.randn(4, 4)
    before = p.detach().clone()
    opt.step()
    assert not torch.equal(before, p.detach())


def test_build_optimizer_unknown_name():
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("sgdx", [torch.nn.Parameter(torch.zeros(1))])

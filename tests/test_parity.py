"""Parity of torchcame.CAME with two independent oracles.

1. The authors' package ``came_pytorch`` (test-only dependency) on the same inputs.
2. The spec's equations written out plainly below for one tensor, in the paper's sum form
   ``V = r c^T / 1^T r`` (the package uses the mean form), so the suite does not only trust
   the reference package.
"""

from __future__ import annotations

import math

import pytest
import torch
from driver import SHAPES, clone_params, make_params, random_grads
from hypothesis import given, settings
from hypothesis import strategies as st

import torchcame

came_pytorch = pytest.importorskip("came_pytorch")

STATE_KEYS = ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row",
              "exp_avg_res_col", "exp_avg_sq")

# float32: the reference path follows the authors' op order, so it agrees to the last bit in
# practice; the bound allows one rounding per op, not a loosened tolerance.
TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-7),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.bfloat16: dict(rtol=0, atol=0),  # same float32 math, same final rounding
    torch.float16: dict(rtol=0, atol=0),
}


def _groups(params, split_hparams):
    """Split params into groups with per-group hyperparameters."""
    groups = []
    for i, hp in enumerate(split_hparams):
        chunk = params[i :: len(split_hparams)]
        if chunk:
            groups.append({"params": chunk, **hp})
    return groups


GROUP_HPARAMS = [
    dict(lr=1e-2, weight_decay=0.0),
    dict(lr=3e-3, weight_decay=0.1, betas=(0.8, 0.99, 0.999), clip_threshold=0.5),
    dict(lr=5e-2, weight_decay=0.01, eps=(1e-20, 1e-12)),
]


def run_pair(shapes, dtype, steps, group_hparams, grad_scale_cycle=(1.0, 30.0, 0.01)):
    """Step torchcame and came_pytorch on identical inputs; compare after every step."""
    ours = make_params(shapes, dtype)
    theirs = clone_params(ours)
    opt_a = torchcame.CAME(_groups(ours, group_hparams), lr=1e-3)
    opt_b = came_pytorch.CAME(_groups(theirs, group_hparams), lr=1e-3)
    tol = TOL[dtype]
    for t in range(steps):
        scale = grad_scale_cycle[t % len(grad_scale_cycle)]
        for p, q, g in zip(ours, theirs, random_grads(ours, t, scale=scale)):
            p.grad = g.clone()
            q.grad = g.clone()
        opt_a.step()
        opt_b.step()
        for i, (p, q) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(
                p, q, **tol, msg=lambda m, i=i, t=t: f"param {i} step {t}: {m}"
            )
            if p.numel() == 0:
                continue
            sa, sb = opt_a.state[p], opt_b.state[q]
            assert float(sa["step"]) == sb["step"]
            for key in STATE_KEYS:
                if key in sb:
                    torch.testing.assert_close(sa[key], sb[key], **TOL[sa[key].dtype])
    return ours, opt_a


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_came_pytorch_all_ranks_groups_weight_decay(dtype):
    shapes = [s for s in SHAPES if math.prod(s) > 0]
    run_pair(shapes, dtype, steps=60, group_hparams=GROUP_HPARAMS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_came_pytorch_low_precision_params(dtype):
    shapes = [(6,), (5, 3), (2, 4, 6)]
    params, opt = run_pair(shapes, dtype, steps=50, group_hparams=GROUP_HPARAMS[:2])
    for p in params:
        assert p.dtype == dtype
        for key, value in opt.state[p].items():
            if key != "step":
                assert value.dtype == torch.float32, key


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    shapes=st.lists(
        st.lists(st.integers(1, 6), min_size=0, max_size=4).map(tuple), min_size=1, max_size=4
    ),
    lr=st.floats(1e-4, 1e-1),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999),
    beta3=st.floats(0.5, 0.99999),
    clip=st.floats(0.1, 10.0),
    wd=st.sampled_from([0.0, 1e-3, 0.1]),
)
def test_matches_came_pytorch_random_shapes_and_hparams(shapes, lr, beta1, beta2, beta3, clip, wd):
    hp = [dict(lr=lr, betas=(beta1, beta2, beta3), clip_threshold=clip, weight_decay=wd)]
    run_pair(shapes, torch.float32, steps=12, group_hparams=hp)


def test_zero_size_params_step_and_stay_finite():
    params = make_params([(0, 4), (4, 0), (0,), (0, 3, 2), (3, 2)])
    opt = torchcame.CAME(params, lr=1e-2, weight_decay=0.1)
    for t in range(3):
        for p, g in zip(params, random_grads(params, t)):
            p.grad = g
        opt.step()
    for p in params:
        state = opt.state[p]
        assert float(state["step"]) == 3
        for key, value in state.items():
            assert torch.isfinite(value).all(), (tuple(p.shape), key)
    assert torch.isfinite(params[-1]).all()


# ------------------------------------------------------------------ the spec, written out


def spec_step(theta, g, s, *, lr, betas, eps, d, wd):
    """One CAME step from ../shared/CAME_SPEC.md, in the paper's sum form. Returns new theta."""
    b1, b2, b3 = betas
    e1, e2 = eps
    G = g * g + e1
    factored = theta.dim() >= 2
    if factored:
        s["r"] = b2 * s["r"] + (1 - b2) * G.sum(dim=-1)          # row sums
        s["c"] = b2 * s["c"] + (1 - b2) * G.sum(dim=-2)          # column sums
        V = s["r"].unsqueeze(-1) * s["c"].unsqueeze(-2) / s["r"].sum(-1)[..., None, None]
        u = g / torch.sqrt(V)
    else:
        s["v"] = b2 * s["v"] + (1 - b2) * G
        u = g / torch.sqrt(s["v"])
    rms_u = torch.sqrt(torch.mean(u * u))
    u_hat = u / max(1.0, float(rms_u) / d)
    s["m"] = b1 * s["m"] + (1 - b1) * u_hat
    if factored:
        U = (u_hat - s["m"]) ** 2 + e2
        s["R"] = b3 * s["R"] + (1 - b3) * U.sum(dim=-1)
        s["C"] = b3 * s["C"] + (1 - b3) * U.sum(dim=-2)
        S = s["R"].unsqueeze(-1) * s["C"].unsqueeze(-2) / s["R"].sum(-1)[..., None, None]
        delta = s["m"] / torch.sqrt(S)
    else:
        delta = s["m"]
    theta = theta - lr * wd * theta
    return theta - lr * delta


def spec_state(shape):
    z = torch.zeros
    if len(shape) >= 2:
        return dict(m=z(shape, dtype=torch.float64), r=z(shape[:-1], dtype=torch.float64),
                    c=z(shape[:-2] + shape[-1:], dtype=torch.float64),
                    R=z(shape[:-1], dtype=torch.float64),
                    C=z(shape[:-2] + shape[-1:], dtype=torch.float64))
    return dict(m=z(shape, dtype=torch.float64), v=z(shape, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(), (7,), (5, 3), (2, 4, 6), (2, 3, 4, 5)])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_matches_spec_equations(shape, wd):
    hp = dict(lr=2e-2, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16))
    (p,) = make_params([shape], torch.float64)
    theta = p.detach().clone()
    opt = torchcame.CAME([p], clip_threshold=1.0, weight_decay=wd, **hp)
    s = spec_state(shape)
    for t in range(50):
        (g,) = random_grads([p], t, scale=(1.0, 20.0)[t % 2])
        p.grad = g
        opt.step()
        theta = spec_step(theta, g, s, d=1.0, wd=wd, **hp)
        torch.testing.assert_close(p.detach(), theta, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["exp_avg"], s["m"], rtol=1e-10, atol=1e-12)


def test_functional_form_equals_class():
    params = make_params([(3, 4), (5,)])
    mirror = clone_params(params)
    opt = torchcame.CAME(params, lr=1e-2, weight_decay=0.01)
    states = [torchcame.init_state(p) for p in mirror]
    for t in range(10):
        grads = random_grads(params, t)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        torchcame.came(mirror, grads, states, lr=1e-2, weight_decay=0.01)
    for p, q in zip(params, mirror):
        assert torch.equal(p, q)

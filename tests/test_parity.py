"""Parity with the authors' package ``came_pytorch`` (a test-only dependency): the same
updates on the same inputs, and its checkpoints load and continue identically.

The spec's equations themselves are checked by the float64 oracle (tests/oracle.py) in
test_invariants.py; this file checks the drop-in promise against the package users come from.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import SHAPES, SMALL_SHAPES, param_tol
from driver import assign, clone_params, make_params, random_grads, save_load, train
from hypothesis import given, settings
from hypothesis import strategies as st

import torchcame

came_pytorch = pytest.importorskip("came_pytorch")

STATE_KEYS = ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row",
              "exp_avg_res_col", "exp_avg_sq")


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
NONEMPTY = [s for s in SMALL_SHAPES if math.prod(s) > 0]


def run_pair(shapes, dtype, steps, group_hparams, grad_scale_cycle=(1.0, 30.0, 0.01)):
    """Step torchcame and came_pytorch on identical inputs; compare after every step."""
    ours = make_params(shapes, dtype)
    theirs = clone_params(ours)
    opt_a = torchcame.CAME(_groups(ours, group_hparams), lr=1e-3)
    opt_b = came_pytorch.CAME(_groups(theirs, group_hparams), lr=1e-3)
    tol = param_tol(dtype, "came_pytorch")

    def grads(t):
        return random_grads(ours, t, scale=grad_scale_cycle[t % len(grad_scale_cycle)])

    def compare(t):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(p, q, rtol=tol.rtol, atol=tol.atol,
                                       msg=lambda m, i=i, t=t: f"param {i} step {t}: {m}")
            sa, sb = opt_a.state[p], opt_b.state[q]
            assert float(sa["step"]) == sb["step"]
            for key in STATE_KEYS:
                if key in sb:
                    state_tol = param_tol(sa[key].dtype, "came_pytorch")
                    torch.testing.assert_close(sa[key], sb[key], rtol=state_tol.rtol,
                                               atol=state_tol.atol)

    set_ours, set_theirs = assign(ours, grads), assign(theirs, grads)
    train(opt_a, steps, lambda t: (set_ours(t), set_theirs(t)),
          step=lambda: (opt_a.step(), opt_b.step()), after=compare, zero_grad=False)
    return ours, opt_a


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_came_pytorch_all_ranks_groups_weight_decay(dtype):
    run_pair(NONEMPTY, dtype, steps=60, group_hparams=GROUP_HPARAMS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_came_pytorch_low_precision_params(dtype):
    shapes = [SHAPES[1], SHAPES[2], SHAPES[4]]  # vector, matrix, batch of matrices
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


def test_reference_package_checkpoint_loads_and_continues_identically():
    shapes = [SHAPES[2], SHAPES[1], SHAPES[0], SHAPES[4]]
    hp = dict(lr=1e-2, weight_decay=0.05)
    theirs = make_params(shapes)
    ref = came_pytorch.CAME(theirs, **hp)
    train(ref, 6, assign(theirs, lambda t: random_grads(theirs, t)))
    sd = save_load(ref.state_dict())
    assert any("RMS" in s for s in sd["state"].values())  # the unused entry is there ...

    ours = clone_params(theirs)
    opt = torchcame.CAME(ours, **hp)
    opt.load_state_dict(sd)
    for p in ours:
        assert "RMS" not in opt.state[p]             # ... and dropped
        assert isinstance(opt.state[p]["step"], torch.Tensor)
    train(ref, 10, assign(theirs, lambda t: random_grads(theirs, t)), start=6)
    train(opt, 10, assign(ours, lambda t: random_grads(ours, t)), start=6)
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)


def test_functional_form_equals_class():
    params = make_params([SHAPES[2], SHAPES[1]])
    mirror = clone_params(params)
    opt = torchcame.CAME(params, lr=1e-2, weight_decay=0.01)
    states = [torchcame.init_state(p) for p in mirror]
    train(opt, 10, assign(params, lambda t: random_grads(params, t)))
    for t in range(10):
        torchcame.came(mirror, random_grads(mirror, t), states, lr=1e-2, weight_decay=0.01)
    for p, q in zip(params, mirror):
        assert torch.equal(p, q)

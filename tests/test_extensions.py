"""Opt-in fixes of the reference's weak points: ``factor_dims`` and ``bias_correction``.

What each option computes is checked against the float64 oracle (tests/oracle.py) for every
row of the table in test_invariants.py; here: the state layouts they create, and the effect
bias correction is for.
"""

from __future__ import annotations

import torch
from cases import SHAPES
from driver import assign, make_params, random_grads, train

from torchcame import CAME

CONV_1X1 = SHAPES[6]  # (6, 5, 1, 1)


def _state_after_one_step(shape, **options) -> dict:
    (p,) = make_params([shape])
    opt = CAME([p], lr=1e-2, **options)
    train(opt, 1, assign([p], lambda t: random_grads([p], t)))
    return opt.state[p]


def test_largest_policy_factors_a_1x1_conv_over_out_and_in():
    state = _state_after_one_step(CONV_1X1, factor_dims="largest")
    assert state["exp_avg_sq_row"].shape == (1, 1, 6)
    assert state["exp_avg_sq_col"].shape == (1, 1, 5)
    assert state["exp_avg_res_row"].shape == (1, 1, 6)
    assert state["exp_avg"].shape == CONV_1X1


def test_largest_policy_min_dim_keeps_a_full_second_moment():
    state = _state_after_one_step((3, 40), factor_dims="largest", factor_min_dim=4)
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["exp_avg_sq"].shape == (3, 40)


def test_default_conv_state_is_the_reference_layout():
    state = _state_after_one_step(CONV_1X1)
    assert state["exp_avg_sq_row"].shape == (6, 5, 1)
    assert state["exp_avg_sq_col"].shape == (6, 5, 1)


def test_bias_correction_removes_early_amplification():
    """Without it the first steps of a matrix move ~10-20x lr per element; with it ~lr."""
    sizes = {}
    for bc in (False, True):
        (p,) = make_params([(64, 32)])
        p0 = p.detach().clone()
        opt = CAME([p], lr=1e-3, bias_correction=bc)
        moves = []

        def record(t, p=p, moves=moves):
            moves.append(p.detach().clone())

        record(-1)
        train(opt, 20, assign([p], lambda t, p=p: random_grads([p], t)), after=record)
        sizes[bc] = max(float((b - a).abs().mean() / 1e-3) for a, b in zip(moves, moves[1:]))
        assert not torch.equal(p, p0)
    assert sizes[False] > 5.0
    assert sizes[True] < 2.0

"""state_dict / load_state_dict: round trip, exact resume, reference checkpoints, refusals."""

from __future__ import annotations

import pytest
import torch
from driver import clone_params, make_params, random_grads, save_load

from torchcame import CAME

came_pytorch = pytest.importorskip("came_pytorch")

SHAPES = [(3, 4), (5,), (), (2, 3, 4)]
HP = dict(lr=1e-2, weight_decay=0.05)


def _step(opt, params, t):
    for p, g in zip(params, random_grads(params, t)):
        p.grad = g
    opt.step()



def test_round_trip_keeps_every_state_tensor():
    params = make_params(SHAPES)
    opt = CAME(params, **HP)
    for t in range(5):
        _step(opt, params, t)
    sd = save_load(opt.state_dict())
    other = CAME(clone_params(params), lr=1.0)
    other.load_state_dict(sd)
    assert other.param_groups[0]["lr"] == HP["lr"]
    for p, q in zip(params, other.param_groups[0]["params"]):
        a, b = opt.state[p], other.state[q]
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype, k


def test_resume_is_bitwise_identical_to_uninterrupted_run():
    params = make_params(SHAPES)
    opt = CAME(params, **HP)
    for t in range(8):
        _step(opt, params, t)
    checkpoint = save_load({"params": [p.detach() for p in params], "opt": opt.state_dict()})
    for t in range(8, 20):
        _step(opt, params, t)

    resumed = [p.clone().requires_grad_() for p in checkpoint["params"]]
    opt2 = CAME(resumed, **HP)
    opt2.load_state_dict(checkpoint["opt"])
    for t in range(8, 20):
        _step(opt2, resumed, t)
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


def test_reference_package_checkpoint_loads_and_continues_identically():
    theirs = make_params(SHAPES)
    ref = came_pytorch.CAME(theirs, **HP)
    for t in range(6):
        _step(ref, theirs, t)
    sd = save_load(ref.state_dict())
    assert any("RMS" in s for s in sd["state"].values())  # the unused entry is there ...

    ours = clone_params(theirs)
    opt = CAME(ours, **HP)
    opt.load_state_dict(sd)
    for p in ours:
        assert "RMS" not in opt.state[p]             # ... and dropped
        assert isinstance(opt.state[p]["step"], torch.Tensor)
    for t in range(6, 16):
        _step(ref, theirs, t)
        _step(opt, ours, t)
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)


def test_mismatched_shapes_refused_and_nothing_loaded():
    params = make_params(SHAPES)
    opt = CAME(params, **HP)
    for t in range(3):
        _step(opt, params, t)
    good = opt.state_dict()

    other_params = make_params([(3, 4), (6,), (), (2, 3, 4)])  # second shape differs
    other = CAME(other_params, lr=0.5)
    _step(other, other_params, 0)
    before = {k: v.clone() for k, v in other.state[other_params[0]].items()}
    with pytest.raises(ValueError, match=r"exp_avg.*shape \(5,\).*expected \(6,\)"):
        other.load_state_dict(good)
    assert other.param_groups[0]["lr"] == 0.5
    for k, v in before.items():
        assert torch.equal(other.state[other_params[0]][k], v)


def test_wrong_group_structure_refused():
    params = make_params(SHAPES)
    opt = CAME(params, **HP)
    sd = opt.state_dict()
    two_groups = CAME([{"params": params[:2]}, {"params": params[2:]}], lr=1e-3)
    with pytest.raises(ValueError, match="parameter groups"):
        two_groups.load_state_dict(sd)
    fewer = CAME(params[:3], lr=1e-3)
    with pytest.raises(ValueError, match="parameters"):
        fewer.load_state_dict(sd)


def test_missing_state_key_refused():
    params = make_params([(3, 4)])
    opt = CAME(params, **HP)
    _step(opt, params, 0)
    sd = opt.state_dict()
    del sd["state"][0]["exp_avg_res_col"]
    with pytest.raises(ValueError, match="exp_avg_res_col"):
        CAME(clone_params(params), **HP).load_state_dict(sd)


def test_factored_state_for_vector_refused():
    """A checkpoint of a matrix loaded onto a vector of the same numel must not load."""
    mat = make_params([(3, 4)])
    opt = CAME(mat, **HP)
    _step(opt, mat, 0)
    vec = make_params([(12,)])
    with pytest.raises(ValueError, match="does not match"):
        CAME(vec, **HP).load_state_dict(opt.state_dict())


def test_bf16_param_state_stays_float32_on_load():
    params = make_params([(3, 4), (5,)], dtype=torch.bfloat16)
    opt = CAME(params, **HP)
    for t in range(4):
        _step(opt, params, t)
    other = CAME(clone_params(params), **HP)
    other.load_state_dict(save_load(opt.state_dict()))
    for p, q in zip(params, other.param_groups[0]["params"]):
        for k, v in opt.state[p].items():
            assert other.state[q][k].dtype == v.dtype
            assert torch.equal(other.state[q][k], v), k
    assert opt.state[params[0]]["exp_avg"].dtype == torch.float32

"""The bad-input contract (issue #11): each case a new user hit gets a clear ``ValueError`` /
``TypeError`` naming the bad value before anything changes, or correct behaviour, or a
documented, warned limit."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import warnings

import pytest
import torch

from torchcame import CAME, step_in_backward


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _train(opt: CAME, params: list[torch.Tensor], steps: int = 2, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def _snapshot(opt: CAME, params: list[torch.Tensor]) -> tuple:
    state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)
             if opt.state.get(p)}
    return ([p.detach().clone() for p in params], state, copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]))


def _assert_same(before: tuple, after: tuple) -> None:
    params_a, state_a, groups_a = before
    params_b, state_b, groups_b = after
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b), "a parameter changed"
    assert state_a.keys() == state_b.keys(), "state was created or dropped"
    for i in state_a:
        for key in state_a[i]:
            assert torch.equal(state_a[i][key], state_b[i][key]), f"state {key} changed"
    assert str(groups_a) == str(groups_b), "param groups changed"


def raises_untouched(opt: CAME, params: list[torch.Tensor], action, exc: type, match: str):
    """``action()`` raises ``exc`` matching ``match`` and changes no param, state or group."""
    before = _snapshot(opt, params)
    with pytest.raises(exc, match=match):
        action()
    _assert_same(before, _snapshot(opt, params))


# ------------------------------------------------------------------------- hyperparameters


def test_tensor_lr_inf_or_nan_is_refused():
    p = torch.zeros(3, requires_grad=True)
    for value in (math.inf, -math.inf, math.nan, -1.0):
        with pytest.raises(ValueError, match="lr"):
            CAME([p], lr=torch.tensor(value))


def test_betas_and_eps_from_a_generator_are_read_once():
    p = torch.zeros(4, 3, requires_grad=True)
    opt = CAME([p], betas=(b for b in (0.9, 0.99, 0.999)), eps=(e for e in (1e-30, 1e-16)))
    assert opt.param_groups[0]["betas"] == (0.9, 0.99, 0.999)
    assert opt.param_groups[0]["eps"] == (1e-30, 1e-16)
    _train(opt, [p])
    assert torch.isfinite(p).all() and float(opt.state[p]["step"]) == 2


def test_a_set_of_params_is_refused():
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(TypeError, match="set"):
        CAME({p, q})
    with pytest.raises(TypeError, match="set"):
        CAME([{"params": {p, q}}])


def test_huge_block_size_is_refused_before_anything():
    p = torch.zeros(64, 64, requires_grad=True)
    with pytest.raises(ValueError, match=r"quantization_block_size.*68719476736"):
        CAME([p], momentum_dtype="int8", quantization_block_size=2**36)
    opt = CAME([p])
    with pytest.raises(ValueError, match="quantization_block_size"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)],
                             "quantization_block_size": 2**36})


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="bias_corection"):
        CAME([torch.zeros(2, requires_grad=True)], bias_corection=True)


# ------------------------------------------------------------------ layout options changed


@pytest.mark.parametrize("change", [
    {"quantization_block_size": 64},
    {"momentum_dtype": torch.bfloat16},
    {"momentum_dtype": "float32"},
    {"factor_dims": "largest"},
])
def test_layout_options_changed_after_state_exist_are_refused_before_any_change(change):
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Conv2d(8, 4, 1))
    params = list(model.parameters())
    opt = CAME(params, momentum_dtype="int8", min_quantized_numel=16,
               quantization_block_size=128)
    _train(opt, params)
    opt.param_groups[0].update(change)
    for p in params:
        p.grad = torch.randn_like(p)
    raises_untouched(opt, params, opt.step, ValueError, "layout options")


def test_layout_change_that_keeps_the_layout_is_accepted():
    p = torch.zeros(8, 8, requires_grad=True)  # 64 elements: int8 needs >= 4096 either way
    opt = CAME([p], momentum_dtype="int8")
    _train(opt, [p])
    opt.param_groups[0]["min_quantized_numel"] = 1000
    _train(opt, [p])
    assert float(opt.state[p]["step"]) == 4


# --------------------------------------------------------------------------- state dicts


def _trained(momentum_dtype="float32"):
    model = _model()
    params = list(model.parameters())
    opt = CAME(params, lr=1e-2, momentum_dtype=momentum_dtype, min_quantized_numel=16,
               quantization_block_size=32)
    _train(opt, params)
    return opt, params


def _corrupt(mutate):
    opt, params = _trained()
    sd = copy.deepcopy(opt.state_dict())
    mutate(sd)
    fresh_opt, _ = _trained()
    return fresh_opt, list(fresh_opt.param_groups[0]["params"]), sd


@pytest.mark.parametrize("name, mutate, match", [
    ("nan statistic", lambda sd: sd["state"][0]["exp_avg_sq_row"].fill_(math.nan), "non-finite"),
    ("inf momentum", lambda sd: sd["state"][0]["exp_avg"].fill_(math.inf), "non-finite"),
    ("negative statistic", lambda sd: sd["state"][1]["exp_avg_sq"].fill_(-1.0), "negative"),
    ("complex momentum", lambda sd: sd["state"][0].update(
        exp_avg=sd["state"][0]["exp_avg"].to(torch.complex64)), "complex"),
    ("negative step", lambda sd: sd["state"][0].update(step=torch.tensor(-1.0)), "step"),
    ("nan step", lambda sd: sd["state"][0].update(step=torch.tensor(math.nan)), "step"),
    ("fractional step", lambda sd: sd["state"][0].update(step=2.5), "step"),
    ("string step", lambda sd: sd["state"][0].update(step="3"), "step"),
    ("two-element step", lambda sd: sd["state"][0].update(step=torch.tensor([1.0, 2.0])),
     "step"),
    ("group without lr", lambda sd: sd["param_groups"][0].pop("lr"), "lr"),
    ("bad beta in group", lambda sd: sd["param_groups"][0].update(betas=(0.9, 1.5, 0.9)),
     "betas"),
    ("state not a dict", lambda sd: sd["state"].update({0: [1, 2]}), "dict"),
    ("wrong shape", lambda sd: sd["state"][0].update(exp_avg=torch.zeros(3)), "shape"),
])
def test_corrupt_checkpoints_are_refused_and_nothing_loads(name, mutate, match):
    opt, params, sd = _corrupt(mutate)
    raises_untouched(opt, params, lambda: opt.load_state_dict(sd), ValueError, match)


def test_pytorch_optimizer_came_state_dict_is_a_value_error():
    """pytorch_optimizer's CAME keeps eps1/eps2 (no 'eps') and its step in the group."""
    opt, params = _trained()
    p = params[0]
    foreign = {
        "state": {0: {"exp_avg": torch.zeros_like(p), "exp_avg_sq_row": torch.zeros(p.shape[0]),
                      "exp_avg_sq_col": torch.zeros(p.shape[1]),
                      "exp_avg_res_row": torch.zeros(p.shape[0]),
                      "exp_avg_res_col": torch.zeros(p.shape[1])}},
        "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.999, 0.9999), "weight_decay": 0.0,
                          "weight_decouple": True, "fixed_decay": False, "clip_threshold": 1.0,
                          "ams_bound": False, "eps1": 1e-30, "eps2": 1e-16, "step": 3,
                          "params": list(range(len(params)))}],
    }
    raises_untouched(opt, params, lambda: opt.load_state_dict(foreign), ValueError, "eps")


def test_valid_checkpoint_still_round_trips():
    opt, params = _trained("int8")
    sd = copy.deepcopy(opt.state_dict())
    fresh, _ = _trained("int8")
    fresh.load_state_dict(sd)
    for p, q in zip(params, fresh.param_groups[0]["params"]):
        assert opt.state[p].keys() == fresh.state[q].keys()
        for key, value in opt.state[p].items():
            assert torch.equal(fresh.state[q][key], value), key


# --------------------------------------------------------------------- step in backward


def test_step_in_backward_sparse_gradient_raises_before_any_update():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    head = torch.nn.Linear(4, 2)
    params = [*head.parameters(), *emb.parameters()]
    opt = CAME(params, lr=1e-2)
    handle = step_in_backward(opt)
    before = [p.detach().clone() for p in params]
    with pytest.raises(TypeError, match="sparse"):
        head(emb(torch.tensor([1, 2, 3]))).sum().backward()
    for a, p in zip(before, params):
        assert torch.equal(a, p), "a parameter was updated before the error"
    assert not any(opt.state.get(p) for p in params)
    handle.remove()


def test_step_in_backward_gradient_accumulation_warns():
    model = _model()
    opt = CAME(model.parameters(), lr=1e-2)
    handle = step_in_backward(opt)
    x = torch.randn(4, 8)
    model(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # one backward since the last step: no warning
    model(x).sum().backward()
    model(x).sum().backward()
    with pytest.warns(UserWarning, match="accumulated"):
        opt.step()
    handle.remove()


def test_step_in_backward_equals_step_after_the_first_backward():
    torch.manual_seed(0)
    a, b = _model(), _model()
    opt_a, opt_b = CAME(a.parameters(), lr=1e-2), CAME(b.parameters(), lr=1e-2)
    handle = step_in_backward(opt_b)
    for t in range(3):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(t))
        a(x).square().sum().backward()
        opt_a.step()
        opt_a.zero_grad()
        b(x).square().sum().backward()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    handle.remove()


# ---------------------------------------------------------------------- no C++ compiler


@pytest.mark.slow
def test_no_compiler_warning_says_so():
    """Without a working C++ compiler, fused=True warns that none was found and which path
    runs instead (not a truncated build command line), and still steps correctly."""
    code = (
        "import warnings, torch\n"
        "from torchcame import CAME\n"
        "p = torch.ones(4, 3, requires_grad=True); q = p.detach().clone().requires_grad_()\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    o = CAME([p], lr=1e-2, fused=True); p.grad = torch.ones_like(p); o.step()\n"
        "r = CAME([q], lr=1e-2); q.grad = torch.ones_like(q); r.step()\n"
        "print('WARN:', ' | '.join(str(x.message) for x in w))\n"
        "assert torch.allclose(p, q)\n"
    )
    import os
    import tempfile

    env = dict(os.environ, CXX="/nonexistent/c++", CC="/nonexistent/cc",
               TORCH_EXTENSIONS_DIR=tempfile.mkdtemp())
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    warning = out.stdout.split("WARN:", 1)[1]
    assert "compiler" in warning and "foreach" in warning, warning
    assert "ninja -v" not in warning and "c++ -MMD" not in warning, warning


# ------------------------------------------------------ the bitwise promise, stated exactly


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_default_path_vs_came_pytorch_by_memory_layout(layout):
    """README: the default path equals ``came_pytorch`` bit for bit when gradients are
    contiguous; with channels_last or transposed gradients the authors' package allocates
    its momentum in the gradient's memory format and reduces over it in another order, so
    the two agree to float32 rounding only (bounded here at 2e-6 relative after 5 steps)."""
    came_pytorch = pytest.importorskip("came_pytorch")
    gen = torch.Generator().manual_seed(0)
    shape = (6, 5, 3, 3) if layout == "channels_last" else (7, 9)
    p = torch.randn(shape, generator=gen)
    if layout == "channels_last":
        p = p.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        p = torch.randn(shape[::-1], generator=gen).t()
    p.requires_grad_()
    q = p.detach().clone().requires_grad_()  # same strides (clone preserves them)
    ours, theirs = CAME([p], lr=1e-2), came_pytorch.CAME([q], lr=1e-2)
    for _ in range(5):
        g = torch.randn(shape, generator=gen)
        if layout == "channels_last":
            g = g.contiguous(memory_format=torch.channels_last)
        elif layout == "transposed":
            g = g.t().contiguous().t()
        p.grad, q.grad = g.clone(memory_format=torch.preserve_format), g.clone(
            memory_format=torch.preserve_format)
        ours.step()
        theirs.step()
    if layout == "contiguous":
        assert torch.equal(p, q)
    else:
        scale = q.abs().max()
        assert ((p - q).abs() <= 2e-6 * scale).all(), float((p - q).abs().max() / scale)

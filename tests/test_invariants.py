"""Every row of the table (tests/cases.py) through the shared invariants.

(a) each path matches: the reference path the float64 oracle (tests/oracle.py), the other
    paths the reference path, within the tolerance the table states for (dtype, path);
(b) state dicts: save / load / continue equals the uninterrupted run, and a checkpoint of one
    momentum format loads into an optimizer of another (converted, its layout kept);
(c) param groups equal separate optimizers;
(d) zero-size params, and params whose grad is None on some steps or always;
(e) transposed and channels_last params and grads equal contiguous ones;
(f) errors leave everything untouched: every option's bad values (constructor,
    add_param_group, a loaded state dict), bad gradients and bad state dicts.

Runs are cached per (case, dtype, path, layout): (a), (d) and (e) share them.
"""

from __future__ import annotations

import functools
import math

import oracle
import pytest
import torch
from cases import (
    CASE_BY_NAME,
    CASES,
    DTYPES,
    IMPLS,
    INT8,
    LAYOUT_OPTIONS,
    LOW_PRECISION,
    MOMENTUM_BF16_TOL,
    MOMENTUM_INT8_MAX_CODE_DIFF,
    NEVER_GRAD,
    NONE_ON_ODD_STEPS,
    OPTIONS,
    SHAPES,
    SMALL_SHAPES,
    STEPS,
    ZERO_SIZE,
    Tol,
    param_tol,
    spacing,
    sr_spacings,
    state_tol,
    uncovered_options,
)
from driver import (
    assert_raises_untouched,
    assert_same_run,
    assign,
    clone_params,
    grads_of,
    make_params,
    random_grads,
    run_case,
    save_load,
    train,
)

from torchcame import CAME

# ---------------------------------------------------------------------------- the runs


@functools.cache
def run(case: str, dtype: str, impl: str, layout: str = "contiguous"):
    """:func:`driver.run_case`, cached: (a), (d) and (e) share the runs."""
    return run_case(CASE_BY_NAME[case], DTYPES[dtype], impl, layout)


@functools.cache
def oracle_run(case: str, dtype: str) -> oracle.Oracle:
    params = make_params(SHAPES, DTYPES[dtype])
    o = oracle.Oracle(params, CASE_BY_NAME[case].kwargs())
    grads = grads_of(params)
    for t in range(STEPS):
        o.step(grads(t))
    return o


# ------------------------------------------------------------------------ comparisons


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: Tol, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if tol.exact:
        assert actual.dtype == expected.dtype, what
        assert torch.equal(actual, expected), f"{what}: not bitwise equal"
        return
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol.rtol,
                               atol=tol.atol, msg=lambda m: f"{what}: {m}")


def assert_params_close(actual, expected, dtype, path, case, what) -> None:
    """Parameters within the table's tolerance; with stochastic rounding of bf16/fp16 params,
    a path drawing other bits (or the oracle's exact value) may be a spacing away per step."""
    tol = param_tol(dtype, path)
    if case.stochastic and dtype in LOW_PRECISION and not tol.exact:
        allowed = sr_spacings(STEPS) * spacing(actual.detach()) + tol.atol
        diff = (actual.detach().double() - expected.double()).abs()
        assert (diff <= allowed.double()).all(), f"{what}: max diff {diff.max():.3g}"
        return
    assert_close(actual.detach(), expected, tol, what)


def assert_states_close(actual: dict, expected: dict, dtype, path, what) -> None:
    """Every state tensor: ``step`` exactly; the momentum as stored (int8 codes within one,
    bf16 within one rounding, unless the path is bitwise); statistics per STATE_TOLERANCES."""
    assert sorted(actual) == sorted(expected), f"{what}: state keys"
    tol = state_tol(dtype, path)
    exact = param_tol(dtype, path).exact
    for key, want in expected.items():
        got = actual[key]
        where = f"{what} state {key}"
        if key == "step":
            assert float(got) == float(want), where
        elif got.dtype == torch.int8:
            assert want.dtype == torch.int8, where
            limit = 0 if exact else MOMENTUM_INT8_MAX_CODE_DIFF
            assert bool(((got.int() - want.int()).abs() <= limit).all()), where
        elif got.dtype == torch.bfloat16 and key == "exp_avg":
            assert_close(got, want.to(got.dtype), exact_or(exact, MOMENTUM_BF16_TOL), where)
        elif key == "exp_avg":  # m is O(1) and may cancel to ~0: the params' absolute part
            assert_close(got, want, exact_or(exact, Tol(tol.rtol, param_atol(dtype, path))),
                         where)
        else:
            assert_close(got, want, tol, where)


def exact_or(exact: bool, tol: Tol) -> Tol:
    return Tol(0.0, 0.0) if exact else tol


def param_atol(dtype, path) -> float:
    compute = torch.float32 if dtype in LOW_PRECISION else dtype
    return param_tol(compute, path).atol


def oracle_applies(case, dtype: str) -> bool:
    """The oracle is compared in float64 for every row, and in the other dtypes for float32
    momentum: with bf16/int8 momentum, a float32 m a few ulps off the oracle's float64 m may
    round to the neighbouring stored value (~1e-5 of the elements per step), and from there
    the trajectories part by a whole bf16 rounding / int8 code. Those rows' float32, bf16 and
    fp16 runs are compared with the reference path instead (foreach bitwise, fused within
    one code / rounding)."""
    return dtype == "float64" or case.momentum == "float32"


def _matrix():
    out = []
    for case in CASES:
        for dtype in case.dtypes:
            for impl in IMPLS:
                if impl == "reference" and not oracle_applies(case, dtype):
                    continue
                out.append(pytest.param(case.name, dtype, impl, id=f"{case}-{dtype}-{impl}"))
    return out


# ------------------------------------------------------------------- (a) paths agree


def one_step_at_a_time(case, path: str) -> bool:
    """Low-bit momentum on the fused path: a float32 m a few ulps off the reference's (another
    summation order) can be stored as the neighbouring bf16 value / int8 code, and from there
    the two runs follow different momenta (one code is ~1% of a block's absmax; CAME's
    confidence factor scales it up to ~1e-2 of a parameter within a few steps). Such rows are
    compared one step at a time: before each step the fused run gets the reference run's
    params and state, so each step's own error is what is checked, against the table. The
    same holds for transposed / channels_last params ("layout": other reduction orders)."""
    return path in ("fused", "layout") and case.momentum != "float32"


@pytest.mark.parametrize("case, dtype, impl", _matrix())
def test_path_matches_oracle_or_reference(case: str, dtype: str, impl: str) -> None:
    c, dt = CASE_BY_NAME[case], DTYPES[dtype]
    if one_step_at_a_time(c, impl):
        return _compare_one_step_at_a_time(c, dtype, "reference", impl)
    params, opt = run(case, dtype, impl)
    if impl == "reference":
        o = oracle_run(case, dtype)
        expected = o.theta
        expected_states = [None if s is None else oracle.state_dict(s) for s in o.states]
    else:
        ref_params, ref_opt = run(case, dtype, "reference")
        expected = [p.detach() for p in ref_params]
        expected_states = [dict(ref_opt.state[p]) if p in ref_opt.state else None
                           for p in ref_params]
    _assert_run_close(params, opt, expected, expected_states, c, dt, impl,
                      f"{case}/{dtype}/{impl}")


def _assert_run_close(params, opt, expected, expected_states, c, dt, impl, what) -> None:
    for i, (p, want) in enumerate(zip(params, expected, strict=True)):
        where = f"{what} param {i} {SHAPES[i]}"
        assert p.dtype == dt, where
        assert_params_close(p, want, dt, impl, c, where)
        if expected_states[i] is None:
            assert p not in opt.state or not opt.state[p], where
        else:
            assert_states_close(opt.state[p], expected_states[i], dt, impl, where)
            assert_state_dtypes(opt.state[p], p, c, where)


def assert_state_dtypes(state: dict, p: torch.Tensor, c, what: str) -> None:
    """README: statistics in the compute dtype (float32 for bf16/fp16 params), ``step`` a
    float32 scalar, the momentum in its storage format (int8 codes with float32 scales)."""
    compute = torch.float32 if p.dtype in LOW_PRECISION else p.dtype
    options = {**oracle.DEFAULTS, **c.kwargs()}
    momentum = {"bfloat16": torch.bfloat16, "int8": torch.int8}.get(c.momentum, compute)
    if c.momentum == "int8" and not oracle.quantized(tuple(p.shape), options):
        momentum = compute
    for key, value in state.items():
        want = {"step": torch.float32, "exp_avg": momentum,
                "exp_avg_absmax": torch.float32}.get(key, compute)
        assert value.dtype == want, f"{what} state {key}: {value.dtype}, expected {want}"


def _compare_one_step_at_a_time(c, dtype: str, ref_impl: str, impl: str,
                                layout: str = "contiguous") -> None:
    """``impl`` on ``layout`` against ``ref_impl`` on contiguous params, step by step."""
    dt, path = DTYPES[dtype], ("layout" if layout != "contiguous" else impl)
    ref_params = make_params(SHAPES, dt)
    params = make_params(SHAPES, dt, layout=layout)
    ref = CAME(ref_params, **c.kwargs(), **IMPLS[ref_impl])
    opt = CAME(params, **c.kwargs(), **IMPLS[impl])
    ref_grads = assign(ref_params, grads_of(ref_params))
    grads = assign(params, grads_of(params, layout))
    for t in range(STEPS):
        with torch.no_grad():
            for p, q in zip(params, ref_params, strict=True):
                p.copy_(q)
                for key, value in ref.state.get(q, {}).items():
                    opt.state[p][key].copy_(value)
        torch.manual_seed(t)
        train(ref, 1, ref_grads, start=t)
        torch.manual_seed(t)
        train(opt, 1, grads, start=t)
        expected_states = [dict(ref.state[q]) if q in ref.state else None for q in ref_params]
        _assert_run_close(params, opt, [q.detach() for q in ref_params], expected_states, c,
                          dt, path, f"{c}/{dtype}/{impl}/{layout} step {t}")


@pytest.mark.parametrize("case", ["default", "everything"])
def test_long_run_matches_oracle(case: str) -> None:
    """40 steps in float64 (the table's runs are 6): drift the short runs cannot show. The
    shapes are the table's without its big matrix."""
    c = CASE_BY_NAME[case]
    params, opt = run_case(c, torch.float64, "reference", shapes=SMALL_SHAPES, steps=40)
    o = oracle.Oracle(make_params(SMALL_SHAPES, torch.float64), c.kwargs())
    grads = grads_of(params)
    for t in range(40):
        o.step(grads(t))
    tol = param_tol(torch.float64, "reference")
    for i, (p, want) in enumerate(zip(params, o.theta, strict=True)):
        assert_close(p.detach(), want, tol, f"{case} param {i} after 40 steps")


def test_every_option_is_in_the_table() -> None:
    assert uncovered_options() == []
    assert set(OPTIONS) >= {k for c in CASES for k in c.options}


# ---------------------------------------------------------------------- (b) state dicts


def _impl_matrix(dtypes=("float32", "bfloat16")):
    return [pytest.param(c.name, dt, impl, id=f"{c}-{dt}-{impl}")
            for c in CASES for dt in dtypes if dt in c.dtypes for impl in IMPLS]


def _float32_and_sr_rows():
    """Every row with float32 params, and the stochastic-rounding rows with bf16 params (the
    dtypes where the invariant has something to show: state dtypes, random draws)."""
    return _impl_matrix(("float32",)) + [
        pytest.param(c.name, "bfloat16", impl, id=f"{c}-bfloat16-{impl}")
        for c in CASES if c.stochastic and "bfloat16" in c.dtypes for impl in IMPLS]


@pytest.mark.parametrize("case, dtype, impl", _float32_and_sr_rows())
def test_state_dict_round_trip_resumes_exactly(case: str, dtype: str, impl: str) -> None:
    c = CASE_BY_NAME[case]
    params = make_params(SHAPES, DTYPES[dtype])
    opt = CAME(params, **c.kwargs(), **IMPLS[impl])
    torch.manual_seed(0)
    train(opt, 3, assign(params, grads_of(params)))
    ckpt = save_load({"params": [p.detach() for p in params], "opt": opt.state_dict()})
    torch.manual_seed(1)
    train(opt, 3, assign(params, grads_of(params)), start=3)

    resumed = [p.clone().requires_grad_() for p in ckpt["params"]]
    opt2 = CAME(resumed, **{**c.kwargs(), "lr": 0.5}, **IMPLS[impl])  # lr from the checkpoint
    opt2.load_state_dict(ckpt["opt"])
    torch.manual_seed(1)
    train(opt2, 3, assign(resumed, grads_of(resumed)), start=3)
    assert_same_run(params, opt, resumed, opt2, f"{case}/{dtype}/{impl}")


def _encode(m: torch.Tensor, fmt: str, shape, options: dict) -> dict:
    """The state entries of momentum ``m`` stored in format ``fmt`` (README)."""
    if fmt == "int8" and oracle.quantized(tuple(shape), {**options, "momentum_dtype": "int8"}):
        codes, absmax = oracle.encode_int8(m, options["quantization_block_size"])
        return {"exp_avg": codes, "exp_avg_absmax": absmax}
    if fmt == "bfloat16":
        return {"exp_avg": m.to(torch.bfloat16)}
    return {"exp_avg": m}


def _decode(state: dict, block: int) -> torch.Tensor:
    if "exp_avg_absmax" in state:
        return oracle.decode_int8(state["exp_avg"], state["exp_avg_absmax"], block)
    return state["exp_avg"].float()


@pytest.mark.parametrize("case, dtype", [
    pytest.param(c.name, "float32" if "float32" in c.dtypes else c.dtypes[0], id=c.name)
    for c in CASES])
def test_momentum_formats_convert_on_load(case: str, dtype: str) -> None:
    """A checkpoint of this row loads into an optimizer of every momentum format: the
    momentum is decoded and re-encoded (README: "a float32 checkpoint loads into an 8-bit
    optimizer and the other way round"), the loading optimizer keeps its layout options, every
    other state tensor loads unchanged."""
    c = CASE_BY_NAME[case]
    params = make_params(SHAPES, DTYPES[dtype])
    source = CAME(params, **c.kwargs())
    torch.manual_seed(0)
    train(source, 3, assign(params, grads_of(params)))
    saved = save_load(source.state_dict())
    src_block = source.param_groups[0]["quantization_block_size"]
    for fmt, layout in (("float32", {"momentum_dtype": torch.float32}),
                        ("bfloat16", {"momentum_dtype": torch.bfloat16}),
                        ("int8", INT8)):
        target_options = {**c.kwargs(), **layout}
        target = CAME(clone_params(params), **target_options)
        target.load_state_dict(saved)
        group = target.param_groups[0]
        for key in LAYOUT_OPTIONS:  # the loading optimizer keeps its own layout
            want = {**OPTIONS, **target_options}[key]
            assert group[key] == (fmt if key == "momentum_dtype" else want), key
        options = {**oracle.DEFAULTS, **target_options}
        for i, (p, q) in enumerate(zip(params, group["params"], strict=True)):
            if p not in source.state:
                assert q not in target.state or not target.state[q]
                continue
            old, new = source.state[p], target.state[q]
            m = _decode(old, src_block)
            expected = {k: v for k, v in old.items() if k not in ("exp_avg", "exp_avg_absmax")}
            if "exp_avg_absmax" in old and fmt == "int8" and src_block == INT8[
                    "quantization_block_size"]:
                expected.update(exp_avg=old["exp_avg"], exp_avg_absmax=old["exp_avg_absmax"])
            else:  # the same encoding is kept bit for bit; others are decoded, re-encoded
                expected.update(_encode(m, fmt, p.shape, options))
            what = f"{case}/{dtype} -> {fmt}: param {i} {tuple(p.shape)}"
            assert sorted(new) == sorted(expected), what
            for key, want in expected.items():
                assert new[key].dtype == want.dtype, f"{what} {key} dtype"
                assert torch.equal(new[key], want), f"{what} {key}"


# -------------------------------------------------------------------- (c) param groups


@pytest.mark.parametrize("case, dtype, impl", _float32_and_sr_rows())
def test_param_groups_equal_separate_optimizers(case: str, dtype: str, impl: str) -> None:
    c = CASE_BY_NAME[case]
    other = {"lr": 5e-3, "weight_decay": 0.05, "betas": (0.85, 0.99, 0.999)}
    params = make_params(SHAPES, DTYPES[dtype])
    mirror = clone_params(params)
    first, second = params[0::2], params[1::2]
    grouped = CAME([{"params": first, **c.kwargs()}, {"params": second, **other}],
                   **IMPLS[impl])
    separate = [CAME(mirror[0::2], **c.kwargs(), **IMPLS[impl]),
                CAME(mirror[1::2], **other, **IMPLS[impl])]
    torch.manual_seed(0)
    train(grouped, STEPS, assign(params, grads_of(params)))
    torch.manual_seed(0)
    train(separate[0], STEPS, assign(mirror, grads_of(mirror)),
          step=lambda: [o.step() for o in separate], zero_grad=False)
    for opt, ps, qs in ((separate[0], first, mirror[0::2]), (separate[1], second, mirror[1::2])):
        assert_same_run(ps, grouped, qs, opt, f"{case}/{dtype}/{impl} groups")


# ------------------------------------------------------------ (d) zero-size, None grads


@pytest.mark.parametrize("case, dtype, impl", _impl_matrix(("float32", "bfloat16")))
def test_zero_size_and_missing_grads(case: str, dtype: str, impl: str) -> None:
    params, opt = run(case, dtype, impl)
    start = make_params(SHAPES, DTYPES[dtype])
    for i in ZERO_SIZE:
        state = opt.state[params[i]]
        assert float(state["step"]) == STEPS, SHAPES[i]  # zero-size params count steps
        assert all(bool(torch.isfinite(v.float()).all()) for v in state.values()), SHAPES[i]
    assert float(opt.state[params[NONE_ON_ODD_STEPS]]["step"]) == math.ceil(STEPS / 2)
    never = params[NEVER_GRAD]
    assert never not in opt.state or not opt.state[never]  # no state, not moved
    assert torch.equal(never, start[NEVER_GRAD])
    for p in params:
        assert bool(torch.isfinite(p).all())


# ---------------------------------------------------- (e) non-contiguous, channels_last


@pytest.mark.parametrize("case, dtype, impl", _impl_matrix(("float32",)))
def test_transposed_and_channels_last_equal_contiguous(case: str, dtype: str,
                                                       impl: str) -> None:
    c, dt = CASE_BY_NAME[case], DTYPES[dtype]
    strided = make_params(SHAPES, dt, layout="strided")
    assert any(not p.is_contiguous() for p in strided)
    if one_step_at_a_time(c, "layout"):
        return _compare_one_step_at_a_time(c, dtype, impl, impl, "strided")
    params, opt = run(case, dtype, impl, "strided")
    ref_params, ref_opt = run(case, dtype, impl)
    for i, (p, q, fresh) in enumerate(zip(params, ref_params, strided, strict=True)):
        what = f"{case}/{dtype}/{impl} strided param {i} {SHAPES[i]}"
        assert p.stride() == fresh.stride(), f"{what}: the step changed the strides"
        assert_params_close(p, q.detach(), dt, "layout", c, what)
        if q in ref_opt.state and ref_opt.state[q]:
            assert_states_close(opt.state[p], dict(ref_opt.state[q]), dt, "layout", what)


# --------------------------------------------------------- (f) errors change nothing

#: A bad value of every option: (keyword arguments, exception, regex naming option and value).
BAD_OPTIONS = [
    ({"lr": -1e-3}, ValueError, r"lr.*-0\.001"),
    ({"lr": float("nan")}, ValueError, r"lr.*nan"),
    ({"lr": float("inf")}, ValueError, r"lr.*inf"),
    ({"lr": None}, TypeError, r"lr.*None"),
    ({"lr": "0.1"}, TypeError, r"lr.*'0\.1'"),
    ({"lr": torch.tensor([1e-3, 2e-3])}, ValueError, r"lr.*\(2,\)"),
    ({"lr": torch.tensor(-1.0)}, ValueError, r"lr.*-1\.0"),
    ({"lr": torch.tensor(1)}, TypeError, r"lr.*torch\.int64"),
    ({"lr": torch.tensor(float("inf"))}, ValueError, r"lr.*inf"),
    ({"betas": (0.9, 0.999)}, ValueError, r"betas.*\(0\.9, 0\.999\)"),
    ({"betas": (1.0, 0.999, 0.9999)}, ValueError, r"betas\[0\].*1\.0"),
    ({"betas": (0.9, -0.1, 0.9999)}, ValueError, r"betas\[1\].*-0\.1"),
    ({"betas": (0.9, 0.999, float("nan"))}, ValueError, r"betas\[2\].*nan"),
    ({"betas": 0.9}, TypeError, r"betas.*0\.9"),
    ({"betas": (0.9, "a", 0.99)}, TypeError, r"betas\[1\].*'a'"),
    ({"eps": (1e-30,)}, ValueError, r"eps.*1e-30"),
    ({"eps": (-1e-30, 1e-16)}, ValueError, r"eps\[0\].*-1e-30"),
    ({"eps": (1e-30, float("inf"))}, ValueError, r"eps\[1\].*inf"),
    ({"clip_threshold": 0.0}, ValueError, r"clip_threshold.*0\.0"),
    ({"clip_threshold": -1.0}, ValueError, r"clip_threshold.*-1\.0"),
    ({"clip_threshold": float("nan")}, ValueError, r"clip_threshold.*nan"),
    ({"weight_decay": -0.1}, ValueError, r"weight_decay.*-0\.1"),
    ({"weight_decay": float("inf")}, ValueError, r"weight_decay.*inf"),
    ({"maximize": 1}, TypeError, r"maximize.*1"),
    ({"foreach": "yes"}, TypeError, r"foreach.*'yes'"),
    ({"fused": 1}, TypeError, r"fused.*1"),
    ({"foreach": True, "fused": True}, ValueError, r"foreach=True.*fused=True"),
    ({"skip_nonfinite": "yes"}, TypeError, r"skip_nonfinite.*'yes'"),
    ({"momentum_dtype": torch.float16}, ValueError, r"momentum_dtype.*torch\.float16"),
    ({"momentum_dtype": "int4"}, ValueError, r"momentum_dtype.*'int4'"),
    ({"quantization_block_size": 0}, ValueError, r"quantization_block_size.*0"),
    ({"quantization_block_size": 2.5}, TypeError, r"quantization_block_size.*2\.5"),
    ({"min_quantized_numel": -1}, ValueError, r"min_quantized_numel.*-1"),
    ({"stochastic_rounding": None}, TypeError, r"stochastic_rounding.*None"),
    ({"bias_correction": 1}, TypeError, r"bias_correction.*1"),
    ({"factor_dims": "first_two"}, ValueError, r"factor_dims.*'first_two'"),
    ({"factor_min_dim": 0}, ValueError, r"factor_min_dim.*0"),
]


def _kwargs_of(entry) -> dict:
    return entry.values[0] if hasattr(entry, "values") else entry[0]


def _option_id(entry) -> str:
    return "-".join(f"{k}={v!r}" for k, v in _kwargs_of(entry).items()).replace(" ", "")


def test_every_option_has_a_bad_value() -> None:
    assert {k for e in BAD_OPTIONS for k in _kwargs_of(e)} == set(OPTIONS)


def stepped_optimizer(n: int = 4, **options):
    """An optimizer with state after two steps (lr 0.5, so a loaded lr shows), its params."""
    params = make_params(SHAPES[:n])
    opt = CAME(params, **{"lr": 0.5, **options})
    train(opt, 2, assign(params, lambda t: random_grads(params, t)), zero_grad=False)
    return opt, params


@pytest.mark.parametrize("kwargs, exc, match", BAD_OPTIONS,
                         ids=[_option_id(e) for e in BAD_OPTIONS])
@pytest.mark.parametrize("where", ["constructor", "add_param_group", "load_state_dict"])
def test_bad_option_raises_and_changes_nothing(where: str, kwargs: dict, exc, match: str):
    opt, params = stepped_optimizer()
    if where == "constructor":
        fresh = make_params(SHAPES[:3])
        assert_raises_untouched(None, fresh, lambda: CAME(fresh, **kwargs), exc, match)
    elif where == "add_param_group":
        (new,) = make_params([(3, 2)], seed=5)
        assert_raises_untouched(opt, params + [new],
                                lambda: opt.add_param_group({"params": [new], **kwargs}),
                                exc, match)
    else:
        sd = opt.state_dict()
        sd["param_groups"][0].update(kwargs)
        assert_raises_untouched(opt, params, lambda: opt.load_state_dict(sd), exc, match)


def _sparse_grad_in_second_group():
    dense = make_params([(3, 4)])
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = CAME([{"params": dense}, {"params": emb.parameters()}], lr=1e-2)
    dense[0].grad = random_grads(dense, 0)[0]
    emb(torch.tensor([1, 2])).sum().backward()
    return opt, dense + [emb.weight], opt.step


def _complex_grad():
    opt, params = stepped_optimizer()
    params[2].grad_dtype = None  # torch itself refuses a complex grad on a real param otherwise
    params[2].grad = torch.randn(params[2].shape, dtype=torch.complex64)
    return opt, params, opt.step


def _layout_changed_after_state(key, value):
    def build():
        opt, params = stepped_optimizer(n=9, **INT8)
        opt.param_groups[0][key] = value
        return opt, params, opt.step
    return build



#: Bad inputs at step time: name -> (builder of (optimizer, params, action), exception, regex
#: naming the bad value[, marks]).
BAD_STEPS = {
    "sparse_grad": (_sparse_grad_in_second_group, TypeError, r"sparse"),
    "complex_grad": (_complex_grad, TypeError, r"complex.*torch\.complex64"),
    "block_size_changed_after_state": (
        _layout_changed_after_state("quantization_block_size", 8), ValueError,
        r"quantization_block_size.*8"),
}


@pytest.mark.parametrize("build, exc, match", [
    pytest.param(build, exc, match, id=name, marks=marks)
    for name, (build, exc, match, *marks) in BAD_STEPS.items()])
def test_bad_step_raises_and_changes_nothing(build, exc, match: str) -> None:
    opt, params, action = build()
    for p in params:  # every param has a gradient: a step would change them all
        if p.grad is None:
            p.grad = torch.ones_like(p)
    assert_raises_untouched(opt, params, action, exc, match)


def _entry(sd, index):
    return sd["state"][index]


#: Bad state dicts: name -> (in-place edit of a good state dict of 4 params (0-d, vector,
#: (5, 3), (3, 8)), exception, regex naming the bad value[, marks]). Each is loaded into an
#: optimizer that already has state.
BAD_STATE_DICTS = {
    "no_state_entry": (lambda sd: sd.pop("state"), ValueError, r"'state'"),
    "group_count": (lambda sd: sd["param_groups"].append({**sd["param_groups"][0],
                                                          "params": []}),
                    ValueError, r"2 parameter groups.*has 1"),
    "param_count": (lambda sd: sd["param_groups"][0]["params"].pop(), ValueError,
                    r"has 3 parameters.*has 4"),
    "shape": (lambda sd: _entry(sd, 2).update(exp_avg=torch.zeros(3, 5)), ValueError,
              r"exp_avg.*shape \(3, 5\).*expected \(5, 3\)"),
    "missing_key": (lambda sd: _entry(sd, 2).pop("exp_avg_res_col"), ValueError,
                    r"missing \['exp_avg_res_col'\]"),
    "unexpected_key": (lambda sd: _entry(sd, 1).update(foo=torch.zeros(7)), ValueError,
                       r"unexpected \['foo'\]"),
    "factored_state_for_a_vector": (lambda sd: sd["state"].update({1: dict(sd["state"][2])}),
                                    ValueError, r"shape \(7,\).*missing \['exp_avg_sq'\]"),
    "unknown_param_id": (lambda sd: sd["state"].update({99: dict(sd["state"][0])}),
                         ValueError, r"unknown parameter id 99"),
    "not_a_tensor": (lambda sd: _entry(sd, 2).update(exp_avg_sq_row=[1.0] * 5), ValueError,
                     r"exp_avg_sq_row.*not a tensor"),
    "int8_without_scales": (lambda sd: (sd["param_groups"][0].update(INT8), _entry(sd, 2)
                                        .update(exp_avg=torch.zeros(5, 3, dtype=torch.int8))),
                            ValueError, r"exp_avg_absmax"),
    "group_without_lr": (lambda sd: sd["param_groups"][0].pop("lr"), ValueError, r"lr",
                         ),
    "two_element_step": (lambda sd: _entry(sd, 2).update(step=torch.tensor([1.0, 2.0])),
                         ValueError, r"step"),
    "negative_step": (lambda sd: _entry(sd, 2).update(step=torch.tensor(-3.0)), ValueError,
                      r"step.*-3"),
    "nan_step": (lambda sd: _entry(sd, 2).update(step=torch.tensor(float("nan"))),
                 ValueError, r"step.*nan"),
    "string_step": (lambda sd: _entry(sd, 2).update(step="2"), (ValueError, TypeError),
                    r"step.*'2'"),
    "nan_statistics": (lambda sd: _entry(sd, 2)["exp_avg_sq_row"].fill_(float("nan")),
                       ValueError, r"exp_avg_sq_row.*nan"),
    "complex_momentum": (lambda sd: _entry(sd, 2).update(
        exp_avg=torch.zeros(5, 3, dtype=torch.complex64)), (ValueError, TypeError),
        r"exp_avg.*complex"),
}


@pytest.mark.parametrize("edit, exc, match", [
    pytest.param(edit, exc, match, id=name, marks=marks)
    for name, (edit, exc, match, *marks) in BAD_STATE_DICTS.items()])
def test_bad_state_dict_raises_and_changes_nothing(edit, exc, match: str) -> None:
    source, _ = stepped_optimizer()
    sd = save_load(source.state_dict())
    edit(sd)
    opt, params = stepped_optimizer()
    opt.param_groups[0]["lr"] = 0.25  # so a partly loaded group would show
    assert_raises_untouched(opt, params, lambda: opt.load_state_dict(sd), exc, match)

"""Every CAME implementation against the per-tensor reference.

Cases are data: shapes (0-d .. 4-d, zero-size, one tensor large enough for the fused kernel's
row-parallel branch next to many small ones for its tensor-parallel branch) x dtypes x
hyperparameter configurations, stepped >= 50 times with gradients whose scale changes
(so RMS clipping is active on some steps).

Tolerances, per path and dtype (params and every state tensor, after every checked step):

* ``foreach``: bit-identical to the reference for every dtype (same operations, same order).
* ``fused`` (native CPU kernel), float64: rtol 1e-12. float32: states rtol 1e-5, atol 1e-6;
  params rtol 1e-5, atol 1e-5 (1e-3 of one step at lr 1e-2, after 50 steps) -- the kernel
  sums rows/columns in a different order (blocks of 32 rows, double accumulators), which
  moves statistics by a few ulps, and 50 steps accumulate that in the params.
  bf16/fp16 params: the float32 update is the same to those few ulps, but it can round a
  parameter to the neighbouring bf16/fp16 value; the difference then stays one ulp of the
  magnitude where it happened, so params get one ulp for |p| < 8 (bf16 atol 2^-5, rtol
  2^-7; fp16 atol 2^-8, rtol 2^-10); their float32 states keep the float32 tolerance
  (CAME's state depends on gradients only).
"""

from __future__ import annotations

import pytest
import torch
from conftest import SHAPES

import torchcame
from torchcame._impl import cpu_kernel
from torchcame._impl.common import StepArgs
from torchcame.functional import _resolve_impl, came, init_state

SHAPES_IMPL = [*SHAPES, (300, 200), (3, 5, 7), (33, 65)]
STEPS = 50

CONFIGS = {
    "default": dict(lr=1e-2),
    "decay-maximize": dict(lr=3e-3, weight_decay=0.1, maximize=True,
                           betas=(0.8, 0.99, 0.999), clip_threshold=0.3),
    "tensor-lr": dict(lr="tensor", weight_decay=0.01, eps=(1e-20, 1e-12)),
}

TOL = {
    "foreach": {dt: dict(rtol=0.0, atol=0.0) for dt in
                (torch.float64, torch.float32, torch.bfloat16, torch.float16)},
    "fused": {
        torch.float64: dict(rtol=1e-12, atol=1e-14),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.bfloat16: dict(rtol=2**-7, atol=2**-5),  # one ulp for |p| < 8
        torch.float16: dict(rtol=2**-10, atol=2**-8),  # one ulp for |p| < 8
    },
}
STATE_TOL = {torch.float64: dict(rtol=1e-12, atol=1e-14)}
STATE_TOL_DEFAULT = dict(rtol=1e-5, atol=1e-6)

needs_kernel = pytest.mark.skipif(not cpu_kernel.kernel_buildable(),
                                  reason="no C++ compiler for the fused CPU kernel")


def _kwargs(config: dict) -> dict:
    kw = dict(config)
    if kw.get("lr") == "tensor":
        kw["lr"] = torch.tensor(2e-2)
    return kw


def _grads(shapes, dtype, step, gen):
    scale = (1.0, 30.0, 0.01)[step % 3]
    return [(scale * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype)
            for s in shapes]


def _assert_close(actual, expected, tol, what):
    if tol["rtol"] == 0 and tol["atol"] == 0:
        assert torch.equal(actual, expected), what
    else:
        torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}", **tol)


def _compare(impl, dtype, config, shapes=SHAPES_IMPL, steps=STEPS, check_every=10):
    gen = torch.Generator().manual_seed(0)
    ref = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    ours = [p.clone() for p in ref]
    ref_states = [init_state(p) for p in ref]
    our_states = [init_state(p) for p in ours]
    kw = _kwargs(config)
    flags = dict(fused=True) if impl == "fused" else dict(foreach=True)
    tol = TOL[impl][dtype]
    state_tol = STATE_TOL.get(dtype, STATE_TOL_DEFAULT) if impl == "fused" else tol
    for t in range(steps):
        grads = _grads(shapes, dtype, t, gen)
        came(ref, grads, ref_states, foreach=False, **kw)
        came(ours, grads, our_states, **flags, **kw)
        if t % check_every == check_every - 1 or t == steps - 1:
            for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
                _assert_close(a, b, tol, f"step {t} param {i} {tuple(shapes[i])}")
                for key, value in ref_states[i].items():
                    _assert_close(our_states[i][key], value,
                                  tol if key == "step" else state_tol,
                                  f"step {t} param {i} {tuple(shapes[i])} state {key}")
    for p in ours:
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_foreach_matches_reference_bitwise(dtype, config):
    _compare("foreach", dtype, CONFIGS[config])


@needs_kernel
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_fused_matches_reference(dtype, config):
    _compare("fused", dtype, CONFIGS[config])


def test_foreach_chunking_does_not_change_results(monkeypatch):
    from torchcame._impl import foreach

    monkeypatch.setattr(foreach, "CHUNK_ELEMENTS", 64)  # many chunks, some single-tensor
    _compare("foreach", torch.float32, CONFIGS["decay-maximize"], steps=12, check_every=4)


def test_fused_without_kernel_falls_back_to_foreach(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_module", None)
    monkeypatch.setattr(cpu_kernel, "_failure", "no compiler (test)")
    # without the kernel the fused path runs the foreach path: bit-identical to the reference
    monkeypatch.setitem(TOL, "fused", TOL["foreach"])
    monkeypatch.setitem(STATE_TOL, torch.float32, TOL["foreach"][torch.float32])
    _compare("fused", torch.float32, CONFIGS["default"], steps=6, check_every=3)


@needs_kernel
def test_fused_non_contiguous_params_use_foreach_and_match():
    base = torch.randn(40, 30, dtype=torch.float64)
    ref, ours = base.t().clone(), base.clone().t()  # same values, ours non-contiguous
    assert not ours.is_contiguous()
    sa, sb = init_state(ref), init_state(ours)
    sb = {k: v.t().contiguous().t() if v.dim() == 2 else v for k, v in sb.items()}
    for _ in range(5):
        g = torch.randn(30, 40, dtype=torch.float64)
        came([ref], [g], [sa], lr=1e-2, foreach=False)
        came([ours], [g], [sb], lr=1e-2, fused=True)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)


@needs_kernel
def test_fused_float32_grads_of_bf16_params_are_not_rounded():
    """Mixed precision: float32 grads for bf16 params, upcast as the reference does."""
    gen = torch.Generator().manual_seed(5)
    ref = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in [(40, 30), (30,)]]
    ours = [p.clone() for p in ref]
    sa, sb = [init_state(p) for p in ref], [init_state(p) for p in ours]
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in ref]  # float32
        came(ref, grads, sa, lr=1e-2, foreach=False)
        came(ours, grads, sb, lr=1e-2, fused=True)
    for a, b in zip(sb, sa, strict=True):
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("flags", [dict(foreach=True), pytest.param(dict(fused=True),
                                                                     marks=needs_kernel)])
def test_optimizer_groups_and_none_grads_match_reference(flags):
    """Several param groups, a param without grad, zero-size params, through CAME."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 5), (5,), (0, 3), (2, 3, 4), (), (7, 2), (4,)]

    def build(**f):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i),
                                                 dtype=torch.float64))
                  for i, s in enumerate(shapes)]
        groups = [
            {"params": params[:3], "lr": 1e-2},
            {"params": params[3:5], "lr": torch.tensor(3e-3), "weight_decay": 0.1},
            {"params": params[5:], "lr": 5e-3, "maximize": True, "clip_threshold": 0.3},
        ]
        return params, torchcame.CAME(groups, **f)

    ref_params, ref_opt = build(foreach=False)
    our_params, our_opt = build(**flags)
    for t in range(50):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        for params in (ref_params, our_params):
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                p.grad = None if i == 1 and t % 2 == 0 else g.clone()  # None every other step
        ref_opt.step()
        our_opt.step()
    for a, b in zip(our_params, ref_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(our_params, ref_params, strict=True):
        sa, sb = our_opt.state[a], ref_opt.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-12, atol=1e-14)
    assert float(our_opt.state[our_params[1]]["step"]) == 25.0
    assert float(our_opt.state[our_params[2]]["step"]) == 50.0  # zero-size params count too


@needs_kernel
def test_fused_step_allocates_no_full_size_temporaries():
    from torchcame.memory import measure_step_memory

    params = [torch.nn.Parameter(torch.randn(512, 384)), torch.nn.Parameter(torch.randn(384))]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torchcame.CAME(params, lr=1e-3, fused=True, weight_decay=0.01)
    opt.step()  # state allocation
    extra = measure_step_memory(opt.step).allocated_peak_bytes
    assert extra < 1024, extra  # a 0-d lr tensor at most; nothing of the params' size


def test_resolve_impl():
    cpu = [torch.zeros(3)]
    assert _resolve_impl(cpu, None, None) == "foreach"
    assert _resolve_impl(cpu, None, False) == "foreach"
    assert _resolve_impl(cpu, False, None) == "reference"
    assert _resolve_impl(cpu, False, False) == "reference"
    assert _resolve_impl(cpu, True, None) == "foreach"
    assert _resolve_impl(cpu, None, True) == "fused"
    assert _resolve_impl([torch.zeros(3, device="meta")], None, None) == "reference"
    with pytest.raises(ValueError, match="exclusive"):
        _resolve_impl(cpu, True, True)


@pytest.mark.slow
def test_compiled_step_matches_reference():
    """The torch.compile backend of the fused path (used on CUDA), run here on CPU."""
    from torchcame._impl.fused import step_compiled

    shapes = [(), (7,), (12, 9), (2, 3, 4)]
    gen = torch.Generator().manual_seed(0)
    ref = [torch.randn(s, generator=gen) for s in shapes]
    ours = [p.clone() for p in ref]
    sa, sb = [init_state(p) for p in ref], [init_state(p) for p in ours]
    args = StepArgs(lr=torch.tensor(1e-2), betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16),
                    clip_threshold=1.0, weight_decay=0.1, maximize=True)
    for t in range(8):
        grads = _grads(shapes, torch.float32, t, gen)
        came(ref, grads, sa, lr=args.lr, weight_decay=0.1, maximize=True, foreach=False)
        assert step_compiled(ours, grads, sb, args) == []
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(sb, sa, strict=True):
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)

"""The Triton kernels of the fused step (:mod:`torchcame._impl.triton_kernels`).

Without a GPU they run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set
below before the kernels are defined), with small shapes: the interpreter checks logic and
numerics, not speed. With CUDA (``bash benchmarks/gpu_check.sh``) the same tests run the
compiled kernels on CUDA tensors.

Tolerances (per path and dtype, after every step):

* float32 parameters: within ``1e-5`` of the size of the whole update so far
  (``max |p_ref - p_0|``); float32 states rtol 1e-5, atol 1e-6 (the kernels sum rows and
  columns in other orders than torch, a few ulps apart).
* bf16/fp16 parameters: one ulp for ``|p| < 8`` (as the CPU kernel's tests: a float32 update a
  few ulps apart can round to the neighbouring value); with stochastic rounding, a few
  spacings (other random bits than the reference's ``torch.rand``).
* bf16 momentum: one bf16 ulp; int8 codes: at most one code apart where a value sits on a
  rounding boundary; bitwise equality wherever the inputs are the same bits (int8 codes of
  the same float32 momentum, checkpoints resumed on the same path).
"""

from __future__ import annotations

import importlib
import os
import re
import warnings

import pytest
import torch

CUDA = torch.cuda.is_available()
# Without CUDA the kernels run under Triton's interpreter, which must be on before triton is
# first imported: triton.jit picks it when a function is defined (triton's own tl.sum & co.
# included) and triton reads it again at the first launch, so it stays set for the session
# (torch's inductor reads it only for GPU Triton kernels, which need CUDA). If another test
# module imported triton first (torch._dynamo does), the tests of this file are run by one test
# in a fresh process instead (setting TRITON_INTERPRET=1 in conftest.py avoids the detour).
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton; "
                             "it is in the [dev] extra)")
FRESH_PROCESS = (not CUDA and
                 type(triton.language.standard.sum).__name__ != "InterpretedFunction")
from torchcame._impl import triton_kernels as tk  # noqa: E402

if not CUDA and not tk.interpreted() and not FRESH_PROCESS:  # imported without the interpreter
    tk = importlib.reload(tk)

from torchcame import _warnings  # noqa: E402
from torchcame._factored import factored_dims  # noqa: E402
from torchcame._impl.reference import step_single_tensor  # noqa: E402
from torchcame.functional import init_state  # noqa: E402
from torchcame.lowbit import dequantize_blockwise, quantize_blockwise  # noqa: E402
from torchcame.options import StepArgs  # noqa: E402
from torchcame.state import StateLayout  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
SHAPES = [(3, 5), (2, 4, 6), (7,), (), (0, 3), (9, 33), (4, 0), (0,)]
LOWBIT_SHAPES = [(3, 5), (2, 3, 7), (7,), (9, 33)]  # block 8: int8 blocks cross rows
MODES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": "int8"}
ULP = {torch.bfloat16: dict(rtol=2**-7, atol=2**-5), torch.float16: dict(rtol=2**-10, atol=2**-8)}
STATE_TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True)
def _interpreter_tiles(monkeypatch):
    """Under the interpreter, whose cost is per operation and not per element, larger tiles
    (fewer programs and loop steps) run the same logic several times faster."""
    if not CUDA:
        monkeypatch.setattr(tk, "TILE", 4096)
        monkeypatch.setattr(tk, "UPDATE_TILE", 4096)


_NO_INTERPRETER_NEEDED = ("test_in_a_fresh_process", "test_kernels_compile_for_cuda_without_a_gpu")


@pytest.fixture(autouse=True)
def _interpreter_in_this_process(request):
    if FRESH_PROCESS and request.node.originalname not in _NO_INTERPRETER_NEEDED:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: this file's tests "
                    "run in a fresh process (test_in_a_fresh_process)")


@pytest.mark.skipif(not FRESH_PROCESS, reason="the interpreter is on in this process")
def test_in_a_fresh_process():
    """This file's tests, in a process where the interpreter is on before triton is imported
    (the slow compile test is left to this process: it needs no interpreter)."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
         os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert re.search(r"\d+ passed", result.stdout), result.stdout[-2000:]


def _setup(shapes, dtype=torch.float32, momentum="float32", block_size=256, seed=0,
           policy="last_two", min_dim=1):
    gen = torch.Generator().manual_seed(seed)
    params, states, layouts = [], [], []
    for shape in shapes:
        p = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
        state = init_state(p, momentum_dtype=MODES[momentum], quantization_block_size=block_size,
                           min_quantized_numel=0, factor_dims=policy, factor_min_dim=min_dim)
        dims = factored_dims(p.shape, policy, min_dim)
        stored = momentum if (momentum != "int8" or p.dim() >= 2) else "float32"
        layouts.append(StateLayout(stored, block_size, dims, torch.float32))
        params.append(p)
        states.append(state)
    return params, states, layouts


def _grads(params, step, seed=1):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    scale = (1.0, 1e-3, 30.0)[step % 3]  # RMS clipping active on some steps, not on others
    return [(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64))
            .to(p.dtype).to(DEVICE) for p in params]


def _clone(params, states):
    return ([p.clone() for p in params],
            [{k: v.clone() for k, v in s.items()} for s in states])


def _triton(params, grads, states, args, layouts):
    for state in states:
        state["step"] += 1  # the caller counts the step
    tk.step_triton(params, grads, states, args, layouts)


def _reference(params, grads, states, args, layouts):
    for state in states:
        state["step"] += 1  # the caller counts the step
    step_single_tensor(params, grads, states, args, layouts)


_LAYOUT_KEYS = ("block_size", "factor_dims", "factor_min_dim")  # carried by the layouts


def _args(**kw):
    kw = {k: v for k, v in kw.items() if k not in _LAYOUT_KEYS}
    base = dict(lr=1e-2, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), clip_threshold=1.0,
                weight_decay=0.0)
    base.update(kw)
    return StepArgs(**base)


def _assert_params_close(got, want, start, dtype, what):
    if dtype == torch.float32:
        size = (want - start).abs().max().item() if want.numel() else 0.0
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * size + 1e-12,
                                   msg=lambda m: f"{what}: {m}")
    else:
        torch.testing.assert_close(got.float(), want.float(), **ULP[dtype],
                                   msg=lambda m: f"{what}: {m}")


def _assert_states_close(got, want, what, lowbit=False):
    for key, value in want.items():
        mine = got[key]
        assert mine.dtype == value.dtype and mine.shape == value.shape, (what, key)
        if key == "step":
            assert torch.equal(mine, value)
        elif value.dtype == torch.int8:  # a code may flip where a value sits on a boundary
            assert (mine.int() - value.int()).abs().max().item() <= 1, (what, key)
        elif value.dtype == torch.bfloat16:
            torch.testing.assert_close(mine.float(), value.float(), rtol=2**-7, atol=1e-6,
                                       msg=lambda m, key=key: f"{what} {key}: {m}")
        elif lowbit and key in ("exp_avg", "exp_avg_absmax", "exp_avg_res_row",
                                "exp_avg_res_col"):  # depend on the stored momentum
            torch.testing.assert_close(mine, value, rtol=1e-2, atol=1e-4,
                                       msg=lambda m, key=key: f"{what} {key}: {m}")
        else:
            torch.testing.assert_close(mine, value, **STATE_TOL,
                                       msg=lambda m, key=key: f"{what} {key}: {m}")


CONFIGS = {
    "default": dict(),
    "decay-maximize-clip": dict(lr=3e-3, weight_decay=0.1, maximize=True,
                                betas=(0.8, 0.99, 0.999), clip_threshold=0.3),
    "tensor-lr": dict(lr="tensor", weight_decay=0.01, eps=(1e-20, 1e-12)),
    "bias-correction": dict(bias_correction=True, weight_decay=0.05),
}


def _config_args(config, step):
    kw = dict(CONFIGS[config])
    if kw.get("lr") == "tensor":  # a scheduler changing a tensor lr between steps
        kw["lr"] = torch.tensor(1e-2 * (0.5 ** step), dtype=torch.float64, device=DEVICE)
    return _args(**kw)


# ------------------------------------------------------------------------ parity: float32


@pytest.mark.parametrize("config", list(CONFIGS))
def test_float32_matches_reference(config):
    params, states, layouts = _setup(SHAPES)
    start = [p.clone() for p in params]
    ref, ref_states = _clone(params, states)
    for step in range(3):
        args = _config_args(config, step)
        grads = _grads(params, step)
        _triton(params, grads, states, args, layouts)
        _reference(ref, grads, ref_states, args, layouts)
        for i, (p, q) in enumerate(zip(params, ref)):
            _assert_params_close(p, q, start[i], torch.float32, f"step {step} {tuple(p.shape)}")
            _assert_states_close(states[i], ref_states[i], f"step {step} {tuple(p.shape)}")


def test_small_tiles_exercise_every_loop(monkeypatch):
    """Tiles of 2x4, two row and column groups, 4-element flat blocks and statistics chunks:
    column chunks, row tiles, row/column groups and partial-sum reductions all loop more than
    once."""
    monkeypatch.setattr(tk, "MAX_BLOCK_M", 4)
    monkeypatch.setattr(tk, "TILE", 8)
    monkeypatch.setattr(tk, "MAX_ROW_GROUPS", 2)
    monkeypatch.setattr(tk, "MIN_GROUP_ROWS", 1)
    monkeypatch.setattr(tk, "MAX_COL_GROUPS", 2)
    monkeypatch.setattr(tk, "FLAT_BLOCK", 4)
    monkeypatch.setattr(tk, "UPDATE_TILE", 8)
    monkeypatch.setattr(tk, "FINALIZE_BLOCK", 4)
    shapes = [(18, 5), (2, 3, 9), (11,)]  # 18 rows: 5 row chunks of 4, summed in 2 steps
    for momentum in ("float32", "int8"):
        params, states, layouts = _setup(shapes, momentum=momentum, block_size=8)
        start = [p.clone() for p in params]
        ref, ref_states = _clone(params, states)
        args = _args(weight_decay=0.1, block_size=8)
        for step in range(2):
            grads = _grads(params, step)
            _triton(params, grads, states, args, layouts)
            _reference(ref, grads, ref_states, args, layouts)
        for i, (p, q) in enumerate(zip(params, ref)):
            _assert_params_close(p, q, start[i], torch.float32, f"{momentum} {p.shape}")
            _assert_states_close(states[i], ref_states[i], f"{momentum} {p.shape}",
                                 lowbit=momentum != "float32")


# ------------------------------------------------------------------------ parity: low bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("momentum", ["bfloat16", "int8"])
def test_lowbit_matches_reference(dtype, momentum):
    params, states, layouts = _setup(LOWBIT_SHAPES, dtype, momentum, block_size=8)
    start = [p.clone() for p in params]
    ref, ref_states = _clone(params, states)
    for step in range(3):
        args = _config_args("tensor-lr" if dtype == torch.float16 else "decay-maximize-clip",
                            step)
        grads = _grads(params, step)
        _triton(params, grads, states, args, layouts)
        _reference(ref, grads, ref_states, args, layouts)
    for i, (p, q) in enumerate(zip(params, ref)):
        assert p.dtype == dtype
        _assert_params_close(p, q, start[i], dtype, f"{tuple(p.shape)}")
        _assert_states_close(states[i], ref_states[i], f"{tuple(p.shape)}", lowbit=True)


def test_int8_momentum_with_the_vector_rule():
    """A matrix kept unfactored (``factor_dims="largest"`` with ``factor_min_dim`` above its
    dims) with int8 momentum, and two block sizes in one call."""
    params, states, layouts = _setup([(3, 5), (4, 6)], momentum="int8", block_size=4,
                                     policy="largest", min_dim=7)
    assert all(not lay.factored and lay.quantized for lay in layouts)
    assert all("exp_avg_sq" in s and "exp_avg_absmax" in s for s in states)
    params2, states2, layouts2 = _setup([(2, 9)], momentum="int8", block_size=8)
    start = [p.clone() for p in params + params2]
    ref, ref_states = _clone(params, states)
    ref2, ref_states2 = _clone(params2, states2)
    for step in range(2):
        grads = _grads(params + params2, step)
        _triton(params + params2, grads, states + states2, _args(weight_decay=0.1),
                layouts + layouts2)
        _reference(ref, grads[:2], ref_states, _args(weight_decay=0.1), layouts)
        _reference(ref2, grads[2:], ref_states2, _args(weight_decay=0.1), layouts2)
    for i, (p, q, s, t) in enumerate(zip(params + params2, ref + ref2, states + states2,
                                         ref_states + ref_states2)):
        _assert_params_close(p, q, start[i], torch.float32, f"{tuple(p.shape)}")
        _assert_states_close(s, t, f"{tuple(p.shape)}", lowbit=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowbit_momentum_is_the_float32_momentum_encoded(dtype):
    """From the same state, the int8 (bf16) run stores exactly quantize_blockwise (the bf16
    rounding) of the float32 run's momentum, and steps the weights identically: the update
    uses this step's float32 m, and the codes round as the CPU path's."""
    shapes = [(3, 5), (2, 3, 7), (9, 33)]
    params, states, layouts = _setup(shapes, dtype)
    args = _args(weight_decay=0.1, block_size=8)
    for step in range(2):  # a non-trivial momentum first
        _triton(params, _grads(params, step), states, args, layouts)
    for momentum in ("int8", "bfloat16"):
        f32_params, f32_states = _clone(params, states)
        low_params, low_states = _clone(params, states)
        low_layouts = [StateLayout(momentum, 8, lay.factored_dims, torch.float32)
                       for lay in layouts]
        for s in low_states:  # the float32 momentum is exactly representable in both
            m = s.pop("exp_avg")
            if momentum == "int8":
                s["exp_avg"], s["exp_avg_absmax"] = quantize_blockwise(m, 8)
            else:
                s["exp_avg"] = m.to(torch.bfloat16)
        for s, lo in zip(f32_states, low_states):
            s["exp_avg"] = (dequantize_blockwise(lo["exp_avg"], lo["exp_avg_absmax"], 8)
                            if momentum == "int8" else lo["exp_avg"].float())
        grads = _grads(params, 5)
        _triton(f32_params, grads, f32_states, args, layouts)
        _triton(low_params, grads, low_states, args, low_layouts)
        for p, q, s, lo in zip(f32_params, low_params, f32_states, low_states):
            assert torch.equal(p, q)
            if momentum == "int8":
                codes, absmax = quantize_blockwise(s["exp_avg"], 8)
                assert torch.equal(lo["exp_avg"], codes)
                assert torch.equal(lo["exp_avg_absmax"], absmax)
            else:
                assert torch.equal(lo["exp_avg"], s["exp_avg"].to(torch.bfloat16))


def test_gradients_of_another_dtype_and_layout():
    """float32 gradients of bf16 weights are read as float32 (not rounded to bf16 first);
    non-contiguous gradients are stepped from a contiguous copy."""
    params, states, layouts = _setup([(3, 5), (6,)], torch.bfloat16)
    ref, ref_states = _clone(params, states)
    grads = [torch.randn(5, 3, device=DEVICE).t(), torch.randn(6, device=DEVICE)]
    assert not grads[0].is_contiguous()
    args = _args(weight_decay=0.1)
    _triton(params, grads, states, args, layouts)
    _reference(ref, grads, ref_states, args, layouts)
    for i, (p, q) in enumerate(zip(params, ref)):
        _assert_params_close(p, q, q, torch.bfloat16, f"{tuple(p.shape)}")
        _assert_states_close(states[i], ref_states[i], f"{tuple(p.shape)}")


# ------------------------------------------------------------------------ stochastic rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_lands_on_neighbours_and_is_unbiased(dtype):
    n = 4096
    params, states, layouts = _setup([(64, n // 64), (n,)], torch.float32)
    params = [(1.0 + p.abs()) for p in params]  # spacing 2^-7 (bf16) at [1, 2) and above
    start = [p.to(dtype) for p in params]
    exact = [p.float() for p in start]  # the float32 oracle from the same weights
    args = _args(lr=1e-3, weight_decay=0.5, stochastic_rounding=True)
    grads = [g.to(dtype) for g in _grads(params, 0)]
    ref_states = _clone(params, states)[1]
    _triton(exact, [g.float() for g in grads], ref_states, args, layouts)
    low = [p.clone() for p in start]
    torch.manual_seed(0)
    _triton(low, grads, states, args, layouts)
    for got, want in zip(low, exact):
        got = got.float()
        nearest = want.to(dtype).float()
        spacing = torch.finfo(dtype).eps * 2 * want.abs()
        assert ((got - want).abs() <= spacing).all()  # one of the two neighbours
        assert (got != nearest).any()  # some took the far neighbour
        # unbiased: |mean error| within ~4 standard errors (0.1 of nearest's mean |error|)
        assert (got - want).mean().abs() < 0.1 * (nearest - want).abs().mean()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_decay_survives_only_with_stochastic_rounding(dtype):
    """Zero gradients: the float32 step is exactly p (1 - lr wd), far below bf16's resolution
    at 1.0; round to nearest loses it, stochastic rounding keeps it on average over draws."""
    results = {}
    for sr in (False, True):
        params = [torch.ones(8192, dtype=dtype, device=DEVICE)]
        _, states, layouts = _setup([(8192,)])
        args = _args(lr=1e-3, weight_decay=0.1, stochastic_rounding=sr)
        torch.manual_seed(0)
        for _ in range(3):
            _triton(params, [torch.zeros_like(params[0])], states, args, layouts)
        results[sr] = params[0].float().mean().item()
    assert results[False] == 1.0
    assert abs(results[True] - (1 - 1e-4) ** 3) < 3e-5


def test_stochastic_rounding_is_reproducible_under_manual_seed():
    outs = []
    for seed in (0, 0, 1):
        params, states, layouts = _setup([(6, 40), (50,)], torch.bfloat16)
        torch.manual_seed(seed)
        _triton(params, _grads(params, 0), states, _args(stochastic_rounding=True), layouts)
        outs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(outs[0], outs[2]))


def test_stochastic_rounding_matches_reference_in_distribution():
    params, states, layouts = _setup(LOWBIT_SHAPES, torch.bfloat16, "int8", block_size=8)
    ref, ref_states = _clone(params, states)
    args = _args(weight_decay=0.1, stochastic_rounding=True, block_size=8)
    for step in range(3):
        grads = _grads(params, step)
        _triton(params, grads, states, args, layouts)
        _reference(ref, grads, ref_states, args, layouts)
    for i, (p, q) in enumerate(zip(params, ref)):
        spacing = 2**-7 * q.float().abs().max()
        assert ((p.float() - q.float()).abs() <= 6 * spacing).all()
        # states depend on the gradients only: they stay together
        _assert_states_close(states[i], ref_states[i], f"{tuple(p.shape)}", lowbit=True)


# ------------------------------------------------------------------------ CPU kernel interchange


def _cpu_kernel():
    from torchcame._impl import cpu_kernel

    if not cpu_kernel.kernel_buildable():
        pytest.skip("no C++ compiler for the fused CPU kernel")


def _to(states, device):
    return [{k: (v if k == "step" else v.to(device)) for k, v in s.items()} for s in states]


def _run_path(path, params, states, layouts, args, steps):
    from torchcame._impl.fused import step_fused_lowmem

    for step in steps:
        grads = _grads(params, step)
        if path == "triton":
            params[:] = [p.to(DEVICE) for p in params]
            states[:] = _to(states, DEVICE)
            _triton(params, [g.to(DEVICE) for g in grads], states, args, layouts)
        else:
            params[:] = [p.cpu() for p in params]
            states[:] = _to(states, "cpu")
            for state in states:
                state["step"] += 1  # the caller counts the step
            rest = step_fused_lowmem(params, [g.cpu() for g in grads], states, args, layouts)
            assert rest == []


@pytest.mark.parametrize("dtype,momentum", [(torch.float32, "float32"),
                                            (torch.bfloat16, "bfloat16"),
                                            (torch.bfloat16, "int8")])
def test_state_dicts_interchange_with_cpu_kernel(dtype, momentum):
    """Two steps on one path, one more on the other, against three on one path: a checkpoint
    of either path resumes on the other, within the tolerance of the two paths' parity."""
    _cpu_kernel()
    shapes = [(3, 5), (2, 3, 7), (7,), (9, 33)]
    params, states, layouts = _setup(shapes, dtype, momentum, block_size=8)
    start = [p.cpu().clone() for p in params]
    args = _args(weight_decay=0.1, block_size=8)
    runs = {}
    for first, second in (("triton", "cpu"), ("cpu", "triton"), ("triton", "triton"),
                          ("cpu", "cpu")):
        ps, ss = _clone(params, states)
        _run_path(first, ps, ss, layouts, args, range(2))
        _run_path(second, ps, ss, layouts, args, range(2, 3))
        runs[first, second] = ([p.cpu() for p in ps], _to(ss, "cpu"))
    for mixed, same in ((("triton", "cpu"), ("cpu", "cpu")),
                        (("cpu", "triton"), ("triton", "triton"))):
        for i, (p, q) in enumerate(zip(runs[mixed][0], runs[same][0])):
            what = f"{mixed} vs {same} {tuple(p.shape)}"
            _assert_params_close(p, q, start[i], dtype, what)
            _assert_states_close(runs[mixed][1][i], runs[same][1][i], what,
                                 lowbit=momentum != "float32")


# ------------------------------------------------------------------------ launches, edge cases


def test_launch_counter_and_grouping():
    """The counter proves the kernels ran; the number of launches does not grow with the
    number of tensors (one launch per pass for a whole group)."""
    deltas = []
    for count in (1, 12):
        params, states, layouts = _setup([(5,)] * count + [(3, 4)] * count)
        before = sum(tk.LAUNCHES.values())
        _triton(params, _grads(params, 0), states, _args(), layouts)
        deltas.append(sum(tk.LAUNCHES.values()) - before)
    assert deltas[0] == deltas[1] == 3 + 9  # vectors: 3 launches; matrices: 9
    assert tk.LAUNCHES["update"] > 0 and tk.LAUNCHES["pass3"] > 0


def _compiled_variants() -> int:
    caches = getattr(tk._update_kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this triton version keeps its kernel cache elsewhere")
    return sum(len(entry[0]) for entry in caches.values())


@pytest.mark.skipif(not CUDA, reason="compilation is a GPU matter (the interpreter compiles "
                    "nothing)")
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_changing_lr_does_not_recompile(lr_kind):
    params, states, layouts = _setup([(8, 16), (5,)])
    counts = []
    for step in range(3):
        lr = 1e-2 * 0.5**step
        lr = torch.tensor(lr, device=DEVICE) if lr_kind == "tensor" else lr
        _triton(params, _grads(params, step), states, _args(lr=lr, weight_decay=0.1), layouts)
        counts.append(_compiled_variants())
    assert counts[0] == counts[1] == counts[2] > 0


@pytest.mark.parametrize("dtype,momentum", [(torch.float32, "float32"),
                                            (torch.bfloat16, "int8")])
def test_step_allocates_no_full_size_tensor(dtype, momentum):
    """Tables and the documented scratch only, O(rows + cols) floats: for 256 x 256 weights
    about 13 KB, against 256 KB for one float32 copy (program maps cached by the first step)."""
    from torchcame.memory import TensorAllocationTracker

    params, states, layouts = _setup([(256, 256)], dtype, momentum)
    args = _args(stochastic_rounding=dtype != torch.float32)
    _triton(params, _grads(params, 0), states, args, layouts)  # caches the program maps
    grads = _grads(params, 1)
    tracker = TensorAllocationTracker()
    with tracker:
        _triton(params, grads, states, args, layouts)
    n = m = 256
    row_groups = min(-(-n // max(tk.TILE // tk.MAX_BLOCK_M, tk.MIN_GROUP_ROWS)),
                     tk.MAX_ROW_GROUPS)
    col_groups = 1  # one column tile of 256
    scratch = ((col_groups + 2) * n + (row_groups + 2) * m + row_groups * col_groups
               + -(-n // tk.FINALIZE_BLOCK) + 1)  # the module docstring's bound, in floats
    tables = 2 * (8 * tk._NCOL + 4 * 3) + 512  # int64 and float32 tables, with slack
    assert 0 < tracker.peak_bytes <= 4 * scratch + tables
    assert tracker.peak_bytes < 4 * n * m / 16


def test_zero_size_tensors_are_skipped():
    params, states, layouts = _setup([(0, 3), (4, 0), (0,), (2, 0, 5)])
    before = dict(tk.LAUNCHES)
    saved = _clone(params, states)[1]
    _triton(params, _grads(params, 0), states, _args(weight_decay=0.1), layouts)
    assert dict(tk.LAUNCHES) == before
    for s, t in zip(states, saved):
        assert float(s["step"]) == 1.0
        assert all(torch.equal(s[k], t[k]) for k in s if k != "step")


def test_moved_factored_dims_through_strides():
    """factor_dims="largest": a conv weight factored over (o, i), its (kh, kw) a batch dim;
    int8 blocks still run over the flat tensor."""
    shapes = [(4, 3, 2, 2), (6, 5, 1, 1), (3, 4)]
    for momentum in ("float32", "int8"):
        params, states, layouts = _setup(shapes, momentum=momentum, block_size=8,
                                         policy="largest")
        assert layouts[0].moved(4) and layouts[1].moved(4) and not layouts[2].moved(2)
        start = [p.clone() for p in params]
        ref, ref_states = _clone(params, states)
        args = _args(factor_dims="largest", weight_decay=0.1, block_size=8)
        _warnings._warned.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            for step in range(2):
                grads = _grads(params, step)
                _triton(params, grads, states, args, layouts)
                _reference(ref, grads, ref_states, args, layouts)
        for i, (p, q) in enumerate(zip(params, ref)):
            _assert_params_close(p, q, start[i], torch.float32, f"{momentum} {tuple(p.shape)}")
            _assert_states_close(states[i], ref_states[i], f"{momentum} {tuple(p.shape)}",
                                 lowbit=momentum != "float32")


def test_unmergeable_moved_dims_run_the_reference_with_a_warning():
    """(5, 2, 4, 2) factored over dims (0, 2): dims 1 and 3 do not merge into one batch dim;
    the reference path steps it (the same results), with a warning naming both."""
    params, states, layouts = _setup([(5, 2, 4, 2), (3, 4)], policy="largest")
    assert layouts[0].factored_dims == (0, 2)
    ref, ref_states = _clone(params, states)
    start = [p.clone() for p in params]
    args = _args(factor_dims="largest")
    grads = _grads(params, 0)
    _warnings._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _triton(params, grads, states, args, layouts)
    assert any("do not merge" in str(w.message) and "reference" in str(w.message)
               for w in caught)
    _reference(ref, grads, ref_states, args, layouts)
    assert torch.equal(params[0], ref[0])
    assert all(torch.equal(states[0][k], ref_states[0][k]) for k in ref_states[0])
    _assert_params_close(params[1], ref[1], start[1], torch.float32, "(3, 4)")


def test_layout_and_state_mismatch_raises():
    params, states, layouts = _setup([(3, 4)], momentum="bfloat16")
    wrong = [StateLayout("int8", 256, (0, 1), torch.float32)]
    with pytest.raises(ValueError, match="layout says"):
        _triton(params, _grads(params, 0), states, _args(), wrong)


def test_deterministic_from_run_to_run():
    outs = []
    for _ in range(2):
        params, states, layouts = _setup([(9, 33), (2, 3, 7), (11,)])
        for step in range(2):
            _triton(params, _grads(params, step), states, _args(weight_decay=0.1), layouts)
        outs.append((params, states))
    for p, q in zip(outs[0][0], outs[1][0]):
        assert torch.equal(p, q)
    for s, t in zip(outs[0][1], outs[1][1]):
        assert all(torch.equal(s[k], t[k]) for k in s)


def test_use_triton(monkeypatch):
    assert tk.triton_available()
    assert tk.use_triton(torch.device("cuda")) is True
    monkeypatch.delenv("TORCHCAME_FUSED_BACKEND", raising=False)
    assert tk.use_triton(torch.device("cpu")) is False
    monkeypatch.setenv("TORCHCAME_FUSED_BACKEND", "triton")
    assert tk.use_triton(torch.device("cpu")) is tk.interpreted()


_AOT_SCRIPT = r"""
import collections, os, re, subprocess, sys, tempfile
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torchcame._impl import triton_kernels as tk

assert not tk.interpreted()
ops = collections.Counter()

spills = []

def compile_(fn, types, num_warps=4, **consts):
    sig = {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"enable_fp_fusion": False, "num_warps": num_warps})
    ptx = kernel.asm["ptx"]
    ops.update(re.findall(r"\b(fma\.rn\.f32|div\.\w+\.f32|sqrt\.\w+\.f32|atom\.|red\.)", ptx))
    for name in ("ptxas-blackwell", "ptxas"):  # the bundled assembler that reads this PTX
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if not os.path.exists(tool):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "k.ptx"), "w") as f_:
                f_.write(ptx)
            out = subprocess.run([tool, "-arch=sm_90a", "-v", os.path.join(tmp, "k.ptx"),
                                  "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True)
        if out.returncode == 0:
            text = out.stdout + out.stderr
            if re.search(r"[1-9]\d* bytes spill", text):
                spills.append((fn.__name__, consts))
            break

f = "fp32"
base = dict(meta="*i64", fmeta="*fp32", prog_map="*i32", ws="*fp32")
row = dict(base, eps1=f, eps2=f, b1=f, a1=f, sign=f)
bn = tk.TILE // tk.MAX_BLOCK_M  # the tiles step_triton uses for wide matrices
for PASS in (1, 2, 3):
    compile_(tk._rowtile_kernel, row, PASS=PASS, P_DTYPE=tl.bfloat16, G_DTYPE=tl.bfloat16,
             M_FMT=2, M_DTYPE=tl.int8, BLOCK_N=bn, BLOCK_M=tk.MAX_BLOCK_M, IDX64=PASS == 3,
             MOVED=False)
compile_(tk._rowtile_kernel, row, PASS=3, P_DTYPE=tl.float32, G_DTYPE=tl.float32, M_FMT=0,
         M_DTYPE=tl.float32, BLOCK_N=bn, BLOCK_M=tk.MAX_BLOCK_M, IDX64=False, MOVED=True)
compile_(tk._stat_ema_kernel, dict(base, beta=f, one_minus_beta=f), RES=1, BLOCK=1024)
compile_(tk._row_factor_kernel, base, RES=0, BLOCK=1024)
compile_(tk._denom_kernel, dict(meta="*i64", fmeta="*fp32", ws="*fp32", clip=f), BLOCK=256)
compile_(tk._vector_kernel, dict(base, eps1=f, b2=f, a2=f, sign=f), G_DTYPE=tl.float16,
         BLOCK=1024)
upd = dict(base, lr_ptr="*fp64", lr=f, decay=f, neg_wd=f, b1=f, a1=f, sign=f)
for factored, p, fmt, m, sr, idx64, moved in (
        (True, tl.bfloat16, 2, tl.int8, True, False, False),
        (True, tl.float32, 0, tl.float32, False, True, False),
        (True, tl.bfloat16, 2, tl.int8, False, False, True),
        (False, tl.float16, 1, tl.bfloat16, False, False, False)):
    compile_(tk._update_kernel, upd, num_warps=8, FACTORED=factored, P_DTYPE=p,
             G_DTYPE=tl.float32, M_FMT=fmt, M_DTYPE=m, LR_TENSOR=True, HAS_DECAY=True, SR=sr,
             QB=tk.UPDATE_TILE // 256, UW=256, IDX64=idx64, MOVED=moved)
print(dict(ops), spills)
assert not spills, f"register spills: {spills}"
assert ops["fma.rn.f32"] == 0, "a multiply-add was contracted"
assert ops["atom."] == 0 and ops["red."] == 0, "atomics"
assert ops["div.rn.f32"] > 0 and ops["sqrt.rn.f32"] > 0
assert not [k for k in ops if k.startswith(("div.approx", "div.full", "sqrt.approx"))]
"""


@pytest.mark.slow
def test_kernels_compile_for_cuda_without_a_gpu():
    """Every kernel family compiles to sm_90 machine code (the interpreter does not check
    types and shapes as the compiler does), with no contracted multiply-add, only correctly
    rounded divisions and square roots, no atomics, and (where the bundled ptxas reads the
    PTX) no register spills at the tile sizes step_triton uses."""
    import subprocess
    import sys

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # pragma: no cover - a triton build without the CUDA backend
        pytest.skip(f"triton's CUDA backend is not importable: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_fused_true_runs_the_triton_kernels(monkeypatch):
    """``CAME(fused=True)`` dispatches to the Triton kernels: on CUDA by default, on CPU with
    the testing switch ``TORCHCAME_FUSED_BACKEND=triton`` (under the interpreter); the
    launch counter proves they ran, and the result matches the reference."""
    from torchcame import CAME

    if not CUDA:
        monkeypatch.setenv("TORCHCAME_FUSED_BACKEND", "triton")
    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 5), (2, 3, 4), (7,)]
    ours = [torch.randn(s, generator=gen).to(DEVICE).requires_grad_() for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    initial = [p.detach().clone() for p in ours]
    opt = CAME(ours, lr=1e-2, weight_decay=0.1, fused=True, bias_correction=True)
    opt_ref = CAME(ref, lr=1e-2, weight_decay=0.1, foreach=False, bias_correction=True)
    before = sum(tk.LAUNCHES.values())
    for _ in range(3):
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, generator=gen).to(DEVICE)
            p.grad, q.grad = g, g.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning: the kernels ran everything
            opt.step()
        opt_ref.step()
    assert sum(tk.LAUNCHES.values()) > before
    for p, q, p0, s in zip(ours, ref, initial, shapes):
        scale = (q.detach() - p0).abs().max()  # the size of the whole update
        assert scale > 0 and (p.detach() - q.detach()).abs().max() <= 1e-5 * scale, s


def test_float64_parameters_run_the_reference_with_a_warning(monkeypatch):
    """float64 tensors (a compute dtype the kernels do not have) beside float32 ones: the
    float64 one is stepped by the reference path, bit for bit, with a warning naming it; the
    float32 one by the kernels."""
    from torchcame import CAME

    if not CUDA:
        monkeypatch.setenv("TORCHCAME_FUSED_BACKEND", "triton")
    gen = torch.Generator().manual_seed(5)
    ours = [torch.randn(4, 6, generator=gen, dtype=dtype).to(DEVICE).requires_grad_()
            for dtype in (torch.float64, torch.float32)]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opt = CAME(ours, lr=1e-2, fused=True)
    opt_ref = CAME(ref, lr=1e-2, foreach=False)
    _warnings._warned.clear()
    before = tk.LAUNCHES["pass1"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            for p, q in zip(ours, ref):
                g = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(DEVICE)
                p.grad, q.grad = g, g.clone()
            opt.step()
            opt_ref.step()
    assert any("torch.float64 parameters" in str(w.message) for w in caught)
    assert tk.LAUNCHES["pass1"] == before + 2  # the float32 matrix, once per step
    assert torch.equal(ours[0], ref[0])
    for key, value in opt_ref.state[ref[0]].items():
        assert torch.equal(opt.state[ours[0]][key], value), key
    scale = ref[1].detach().abs().max()
    assert (ours[1].detach() - ref[1].detach()).abs().max() <= 1e-5 * scale

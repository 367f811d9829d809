"""The native CPU kernel's driver, :func:`torchcame._impl.cpu_kernel.step_cpu_kernel`.

It receives each tensor's :class:`~torchcame.state.StateLayout`, leaves ``step`` to the caller,
returns what it did not touch, runs every option (``bias_correction`` and
``factor_dims="largest"`` included), and says clearly why when it cannot be built.

Tolerances against the reference path (one oracle, :mod:`torchcame._impl.reference`), as in
``test_impls.py``: float64 rtol 1e-12; float32 rtol/atol 1e-5 (the kernel sums rows and
columns in another order). The kernel's low-bit momentum is compared bitwise with its own
float32-momentum step on a decoded copy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from torchcame._impl import cpu_kernel
from torchcame._impl.cpu_kernel import step_cpu_kernel
from torchcame._impl.reference import step_single_tensor
from torchcame.functional import init_state
from torchcame.lowbit import dequantize_blockwise, quantize_blockwise
from torchcame.options import StepArgs
from torchcame.state import resolve_layout

needs_kernel = pytest.mark.skipif(not cpu_kernel.kernel_buildable(),
                                  reason="no C++ compiler for the fused CPU kernel")

SHAPES = [(40, 30), (3, 5, 7), (1, 1), (9,), (), (0, 3), (4, 3, 1, 1), (2, 6, 1, 9)]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-5, atol=1e-5)}
OPTIONS = dict(factor_dims="last_two", factor_min_dim=1)


def _setup(shapes, dtype, momentum="float32", block_size=256, **layout_options):
    options = {**OPTIONS, **layout_options}
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    init = dict(momentum_dtype=momentum, quantization_block_size=block_size, min_quantized_numel=1,
                **options)
    states = [init_state(p, **init) for p in params]
    layouts = [resolve_layout(p, **init) for p in params]
    return params, states, layouts


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    scale = (1.0, 30.0, 0.01)[step % 3]  # the RMS clip is active on some steps
    return [(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(p.dtype)
            for p in params]


def _kernel_step(params, grads, states, args, layouts) -> list[int]:
    for state in states:
        state["step"] += 1  # the caller counts the step
    return step_cpu_kernel(params, grads, states, args, layouts)


def _args(**overrides) -> StepArgs:
    base = dict(lr=1e-2, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), clip_threshold=1.0,
                weight_decay=0.0)
    overrides = {k: v for k, v in overrides.items()
                 if k not in ("factor_dims", "factor_min_dim")}  # carried by the layouts
    return StepArgs(**{**base, **overrides})


def _reference_step(params, grads, states, args, layouts) -> None:
    for state in states:
        state["step"] += 1  # the caller counts the step
    step_single_tensor(params, grads, states, args, layouts)


def _assert_states_close(ours, ref, tol, what):
    for key, value in ref.items():
        torch.testing.assert_close(ours[key], value, msg=lambda m, k=key: f"{what} {k}: {m}",
                                   **(tol if key != "step" else dict(rtol=0, atol=0)))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("options", [
    dict(bias_correction=True, weight_decay=0.1),
    dict(bias_correction=True, maximize=True, clip_threshold=0.3, lr=torch.tensor(3e-3)),
    dict(factor_dims="largest", weight_decay=0.1),
    dict(factor_dims="largest", factor_min_dim=4, bias_correction=True),
], ids=["bias_correction", "bias_correction-maximize-tensor_lr", "largest", "largest-min_dim"])
def test_kernel_runs_every_option_like_the_reference(dtype, options):
    options = dict(options)
    layout_options = {k: options[k] for k in ("factor_dims", "factor_min_dim") if k in options}
    args = _args(**options)
    params, states, layouts = _setup(SHAPES, dtype, **layout_options)
    ref_params = [p.clone() for p in params]
    ref_states = [{k: v.clone() for k, v in s.items()} for s in states]
    for t in range(12):
        grads = _grads(params, t)
        assert _kernel_step(params, grads, states, args, layouts) == []  # it takes them all
        _reference_step(ref_params, grads, ref_states, args, layouts)
    for i, (ours, ref) in enumerate(zip(params, ref_params, strict=True)):
        torch.testing.assert_close(ours, ref, **TOL[dtype], msg=lambda m, i=i: f"param {i}: {m}")
        _assert_states_close(states[i], ref_states[i], TOL[dtype], f"param {i}")
    assert all(float(s["step"]) == 12 for s in states)


@needs_kernel
@pytest.mark.parametrize("momentum", ["bfloat16", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowbit_momentum_with_bias_correction_equals_the_float32_kernel_bitwise(dtype,
                                                                                momentum):
    """bf16/int8 momentum is decoded, stepped and re-encoded inside the kernel: the same bits
    as the float32-momentum kernel on a decoded copy, then encoded as torch does."""
    shapes = [(12, 40), (3, 5, 7), (70,), (4, 3, 1, 1)]
    args = _args(bias_correction=True, weight_decay=0.1, clip_threshold=0.5,
                 factor_dims="largest")
    params, states, layouts = _setup(shapes, dtype, momentum, block_size=16,
                                     factor_dims="largest")
    for t in range(3):  # a nonzero momentum to start from
        _kernel_step(params, _grads(params, t), states, args, layouts)
    copies = [p.clone() for p in params]
    decoded = []
    for state, layout in zip(states, layouts, strict=True):
        state = {k: v.clone() for k, v in state.items()}
        if layout.quantized:
            state["exp_avg"] = dequantize_blockwise(state.pop("exp_avg"),
                                                    state.pop("exp_avg_absmax"), 16)
        state["exp_avg"] = state["exp_avg"].float()
        decoded.append(state)
    float_layouts = [resolve_layout(p, momentum_dtype="float32", factor_dims="largest")
                     for p in params]
    grads = _grads(params, 3)
    assert _kernel_step(params, grads, states, args, layouts) == []
    assert _kernel_step(copies, grads, decoded, args, float_layouts) == []
    for p, q, state, ref, layout in zip(params, copies, states, decoded, layouts, strict=True):
        assert torch.equal(p, q)
        if layout.quantized:
            codes, absmax = quantize_blockwise(ref.pop("exp_avg"), 16)
            assert torch.equal(state["exp_avg"], codes)
            assert torch.equal(state["exp_avg_absmax"], absmax)
        elif layout.momentum == "bfloat16":
            assert torch.equal(state["exp_avg"], ref.pop("exp_avg").bfloat16())
        for key, value in ref.items():
            assert torch.equal(state[key], value), key


@needs_kernel
def test_kernel_returns_what_it_cannot_take_untouched():
    args = _args(weight_decay=0.1, factor_dims="largest")
    params, states, layouts = _setup([(6, 5), (3, 20, 2, 30), (4, 3), (5, 4), (7,), (8, 2)],
                                     torch.float32, factor_dims="largest")
    grads = _grads(params, 0)
    grads[2] = grads[2].double()  # a gradient of another dtype than its param
    params[3] = params[3].t().contiguous().t()  # non-contiguous
    states[3] = init_state(params[3])
    wide = torch.randn(8, 2, dtype=torch.float64)  # float64 with bf16 momentum
    params[5], grads[5] = wide, torch.randn(8, 2, dtype=torch.float64)
    states[5] = init_state(wide, momentum_dtype="bfloat16")
    layouts[5] = resolve_layout(wide, momentum_dtype="bfloat16")
    before = [p.clone() for p in params]
    states_before = [{k: v.clone() for k, v in s.items()} for s in states]
    # (3, 20, 2, 30) is factored over dims 1 and 3: not a view with them last without a copy
    assert _kernel_step(params, grads, states, args, layouts) == [1, 2, 3, 5]
    for i in (1, 2, 3, 5):
        assert torch.equal(params[i], before[i])
        for key, value in states_before[i].items():
            if key != "step":
                assert torch.equal(states[i][key], value), (i, key)
    for i in (0, 4):
        assert not torch.equal(params[i], before[i])


@needs_kernel
def test_non_contiguous_gradients_are_stepped_as_their_contiguous_copies():
    args = _args(weight_decay=0.1, factor_dims="largest")
    params, states, layouts = _setup([(6, 5), (4, 3, 1, 1), (2, 3, 4)], torch.float32,
                                     factor_dims="largest")
    copies = [p.clone() for p in params]
    copy_states = [{k: v.clone() for k, v in s.items()} for s in states]
    grads = [g.transpose(0, -1).contiguous().transpose(0, -1) for g in _grads(params, 0)]
    assert not any(g.is_contiguous() for g in grads)
    assert _kernel_step(params, grads, states, args, layouts) == []
    assert _kernel_step(copies, [g.contiguous() for g in grads], copy_states, args,
                        layouts) == []
    for p, q, state, ref in zip(params, copies, states, copy_states, strict=True):
        assert torch.equal(p, q)
        for key, value in ref.items():
            assert torch.equal(state[key], value), key


_NO_TOOLCHAIN = textwrap.dedent("""
    import sys, warnings
    import torch
    import torch.utils.cpp_extension
    from torchcame import CAME
    from torchcame._impl import cpu_kernel

    if sys.argv[1] == "no-ninja":
        torch.utils.cpp_extension.is_ninja_available = lambda: False
        sys.modules["ninja"] = None  # the ninja package cannot be found either
    def run(**flags):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 5), (7,)]]
        opt = CAME(params, lr=1e-2, **flags)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape)
            opt.step()
        return params
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = run(fused=True)
        run(fused=True)
    assert all(torch.equal(a, b) for a, b in zip(fused, run(foreach=True)))
    messages = [str(w.message) for w in caught if "native CPU kernel" in str(w.message)]
    assert len(messages) == 1, messages
    print(messages[0])
""")


@pytest.mark.parametrize("case,expected", [
    ("no-compiler", "no C++ compiler was found ('/nonexistent/c++' is not on PATH"),
    ("no-ninja", "ninja was not found (pip install ninja)"),
])
def test_without_compiler_or_ninja_the_warning_says_so_and_names_the_path(case, expected,
                                                                          tmp_path):
    """No toolchain (and no cached build): one clear warning, then the multi-tensor path."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX="/nonexistent/c++")
    env.pop("TORCHCAME_NO_KERNEL", None)
    if case == "no-ninja":
        env["CXX"] = sys.executable  # runs `--version`: a "compiler" that passes the check
    result = subprocess.run([sys.executable, "-c", _NO_TOOLCHAIN, case], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert expected in message
    assert "The multi-tensor (foreach) path runs instead" in message
    assert "[1/" not in message and "-isystem" not in message  # no ninja command line
    assert not list(tmp_path.rglob("*.so"))  # nothing was built

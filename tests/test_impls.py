"""Implementation details the table (tests/cases.py, test_invariants.py) does not reach:
chunking of the multi-tensor path, the fused path without its kernel, mixed-precision grads,
the fused step's memory, the choice of implementation, and the ``torch.compile`` backend.

Every path against the reference over every option, dtype and shape is test_invariants.py.
"""

from __future__ import annotations

import pytest
import torch
from cases import CASE_BY_NAME, SHAPES, STEPS, param_tol
from driver import assert_same_run, run_case

import torchcame
from torchcame._impl import cpu_kernel
from torchcame.functional import came, init_state, resolve_impl
from torchcame.options import StepArgs
from torchcame.state import layout_of


def test_foreach_chunking_does_not_change_results(monkeypatch):
    from torchcame._impl import foreach

    monkeypatch.setattr(foreach, "CHUNK_ELEMENTS", 64)  # many chunks, some single-tensor
    case = CASE_BY_NAME["maximize"]  # ("everything" has options the foreach path hands on)
    assert_same_run(*run_case(case, torch.float32, "foreach"),
                    *run_case(case, torch.float32, "reference"), "chunked foreach")


@pytest.mark.parametrize("case, dtype", [("weight_decay", torch.float32),
                                         ("maximize", torch.bfloat16)])
def test_fused_row_chunks_match_reference(case, dtype):
    """A matrix of more than 32768 elements: the fused kernel sums its rows in several chunks
    on several threads and combines the partial sums (the table's big matrix is one chunk)."""
    row, shapes = CASE_BY_NAME[case], [(300, 200), SHAPES[1], SHAPES[2]]
    params, opt = run_case(row, dtype, "fused", shapes=shapes + [(9,)])
    ref_params, ref_opt = run_case(row, dtype, "reference", shapes=shapes + [(9,)])
    tol, state_tol = param_tol(dtype, "fused"), param_tol(torch.float32, "fused")
    for p, q in zip(params[:3], ref_params[:3], strict=True):
        torch.testing.assert_close(p, q, rtol=tol.rtol, atol=tol.atol)
        for key, value in ref_opt.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=state_tol.rtol,
                                       atol=state_tol.atol)


def test_fused_without_kernel_falls_back_to_foreach(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_module", None)
    monkeypatch.setattr(cpu_kernel, "_failure", "no compiler (test)")
    # without the kernel the fused path runs the foreach path: bit-identical to the reference
    case = CASE_BY_NAME["weight_decay"]
    assert_same_run(*run_case(case, torch.float32, "fused"),
                    *run_case(case, torch.float32, "reference"), "fused without kernel")


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


@pytest.mark.skipif(not cpu_kernel.kernel_buildable(),
                    reason="no C++ compiler for the fused CPU kernel")
def test_fused_step_allocates_no_full_size_temporaries():
    from torchcame.memory import measure_step_memory

    params = [torch.nn.Parameter(torch.randn(512, 384)), torch.nn.Parameter(torch.randn(384))]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torchcame.CAME(params, lr=1e-3, fused=True, weight_decay=0.01)
    opt.step()  # state allocation
    extra = measure_step_memory(opt.step).allocated_peak_bytes
    assert extra < 1024, extra  # a 0-d lr tensor at most; nothing of the params' size


def testresolve_impl():
    cpu = [torch.zeros(3)]
    assert resolve_impl(cpu, None, None) == "foreach"
    assert resolve_impl(cpu, None, False) == "foreach"
    assert resolve_impl(cpu, False, None) == "reference"
    assert resolve_impl(cpu, False, False) == "reference"
    assert resolve_impl(cpu, True, None) == "foreach"
    assert resolve_impl(cpu, None, True) == "fused"
    assert resolve_impl([torch.zeros(3, device="meta")], None, None) == "reference"
    with pytest.raises(ValueError, match="exclusive"):
        resolve_impl(cpu, True, True)


@pytest.mark.slow
def test_compiled_step_matches_reference():
    """The torch.compile backend of the fused path (used on CUDA), run here on CPU, on four
    of the table's shapes (0-d, vector, matrix, batch: each shape compiles its own graph)."""
    from torchcame._impl.compiled import step_compiled

    shapes = [SHAPES[i] for i in (0, 1, 2, 4)]
    gen = torch.Generator().manual_seed(0)
    ref = [torch.randn(s, generator=gen) for s in shapes]
    ours = [p.clone() for p in ref]
    sa, sb = [init_state(p) for p in ref], [init_state(p) for p in ours]
    args = StepArgs(lr=torch.tensor(1e-2), betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16),
                    clip_threshold=1.0, weight_decay=0.1, maximize=True)
    for t in range(STEPS):
        grads = [(1.0, 30.0, 0.01)[t % 3] * torch.randn(s, generator=gen) for s in shapes]
        came(ref, grads, sa, lr=args.lr, weight_decay=0.1, maximize=True, foreach=False)
        for state in sb:  # the caller counts the step (functional.step_group does)
            state["step"] += 1
        assert step_compiled(ours, grads, sb, args, [layout_of(p, {}) for p in ours]) == []
    tol = param_tol(torch.float32, "compiled")
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=tol.rtol, atol=tol.atol)
    for a, b in zip(sb, sa, strict=True):
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=tol.rtol, atol=tol.atol)

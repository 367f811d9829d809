"""Low-memory options: bf16 / block-wise int8 momentum, stochastic rounding, step in backward."""

from __future__ import annotations

import pytest
import torch
from cases import CASE_BY_NAME
from driver import assert_same_run, assign, clone_params, make_params, random_grads, run_case, train

from torchcame import CAME, step_in_backward
from torchcame.lowbit import (
    dequantize_blockwise,
    quantize_blockwise,
    stochastic_round_,
)

BIG = [(96, 64), (5000,), (40, 3, 50)]  # >= 4096 elements: int8 (the vector stays float32)
SMALL = [(8, 8), (30,)]  # below the threshold: stay float32


def _run(params, steps, **kwargs):
    opt = CAME(params, lr=1e-2, weight_decay=0.01, **kwargs)
    train(opt, steps, assign(params, lambda t: random_grads(params, t)))
    return opt


# ---------------------------------------------------------------- block-wise quantization


@pytest.mark.parametrize("block", [64, 256, 1000])
def test_blockwise_quantization_error_bound(block):
    x = torch.randn(7, 333) * torch.logspace(-3, 1, 333)  # varied magnitudes, ragged tail
    codes, absmax = quantize_blockwise(x, block)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.numel() == -(-x.numel() // block)
    err = (dequantize_blockwise(codes, absmax, block) - x).reshape(-1)
    bound = (absmax / 254).repeat_interleave(block)[: x.numel()]
    assert (err.abs() <= bound * (1 + 1e-5) + 1e-12).all()
    zeros, zmax = quantize_blockwise(torch.zeros(10), 4)
    assert torch.equal(dequantize_blockwise(zeros, zmax, 4), torch.zeros(10))


# ---------------------------------------------------------------- momentum storage


@pytest.mark.parametrize("mode", [torch.bfloat16, "int8"])
def test_lowbit_momentum_layout(mode):
    params = make_params(BIG + SMALL)
    opt = _run(params, 2, momentum_dtype=mode)
    for p in params:
        state = opt.state[p]
        if mode == "int8" and p.numel() >= 4096 and p.dim() >= 2:
            assert state["exp_avg"].dtype == torch.int8
            assert state["exp_avg_absmax"].shape == (-(-p.numel() // 256),)
        elif mode == "int8":
            assert state["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in state
        else:
            assert state["exp_avg"].dtype == torch.bfloat16
        for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_sq"):
            if key in state:
                assert state[key].dtype == torch.float32


@pytest.mark.parametrize("mode, rel", [(torch.bfloat16, 0.02), ("int8", 0.05)])
def test_lowbit_trajectory_stays_close_to_float32(mode, rel):
    params = make_params(BIG)
    ref = clone_params(params)
    start = [p.detach().clone() for p in params]
    opt = _run(params, 30, momentum_dtype=mode)
    opt_ref = _run(ref, 30)
    for p, q, p0 in zip(params, ref, start):
        moved = (q - p0).norm()
        assert (p - q).norm() <= rel * moved
        m_ref = opt_ref.state[q]["exp_avg"]
        st = opt.state[p]
        m = (dequantize_blockwise(st["exp_avg"], st["exp_avg_absmax"], 256)
             if "exp_avg_absmax" in st else st["exp_avg"].float())
        assert (m - m_ref).norm() <= 2 * rel * m_ref.norm()



# ---------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased(dtype):
    x = torch.full((200_000,), 1.0) + 3e-4 * torch.rand(200_000)
    out = torch.empty(200_000, dtype=dtype)
    stochastic_round_(out, x, generator=torch.Generator().manual_seed(1234))  # not x's seed
    assert abs(out.float().mean() - x.mean()) < 2e-5
    assert abs(x.to(dtype).float().mean() - x.mean()) > 1e-4  # nearest is biased here
    # each value lands on one of its two neighbours
    assert ((out.float() - x).abs() <= 2 * torch.finfo(dtype).eps).all()


@pytest.mark.parametrize("impl", [dict(foreach=False), dict(foreach=True), dict(fused=True)])
@pytest.mark.parametrize("shape", [(65536,), (256, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_decay_survives_in_bf16_only_with_stochastic_rounding(dtype, shape, impl):
    """Zero gradients: the float32 step is exactly theta * (1 - lr * wd), far below bf16's
    resolution at 1.0. Round-to-nearest loses it; stochastic rounding keeps it on average."""
    results = {}
    for sr in (False, True):
        p = torch.ones(shape, dtype=dtype, requires_grad=True)
        opt = CAME([p], lr=1e-3, weight_decay=0.1, stochastic_rounding=sr,
                   momentum_dtype="int8", **impl)
        torch.manual_seed(0)
        for _ in range(3):
            p.grad = torch.zeros_like(p)
            opt.step()
        results[sr] = p.detach().float().mean().item()
    expected = (1 - 1e-4) ** 3
    assert results[False] == 1.0
    assert abs(results[True] - expected) < 3e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_stochastic_rounding_is_unbiased_and_lands_on_neighbours(dtype):
    """The kernel's own rounding: E[new weight] is the float32 update, and every weight is
    one of the two neighbours of its float32 update (computed here on float32 weights)."""
    n = 1 << 16
    torch.manual_seed(0)
    start = (1.0 + torch.rand(256, n // 256)).to(dtype)
    grad = torch.randn(start.shape).to(dtype)
    exact = start.float().requires_grad_()
    opt32 = CAME([exact], lr=1e-3, weight_decay=0.5)  # the float32 oracle
    exact.grad = grad.float()
    opt32.step()
    p = start.clone().requires_grad_()
    opt = CAME([p], lr=1e-3, weight_decay=0.5, stochastic_rounding=True, fused=True)
    p.grad = grad.clone()
    opt.step()
    got, want = p.detach().float(), exact.detach()
    spacing = torch.finfo(dtype).eps * 2 * want.abs()
    assert ((got - want).abs() <= spacing).all()
    assert (got != want.to(dtype).float()).any()  # some weights took the far neighbour
    assert abs((got - want).mean()) < 0.02 * (want.to(dtype).float() - want).abs().mean()


def test_fused_stochastic_rounding_does_not_depend_on_threads():
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            params = make_params(BIG + SMALL, torch.bfloat16)
            torch.manual_seed(3)
            _run(params, 3, fused=True, momentum_dtype="int8", stochastic_rounding=True)
            results.append(params)
    finally:
        torch.set_num_threads(threads)
    for p, q in zip(*results):
        assert torch.equal(p, q)


def test_stochastic_rounding_leaves_float32_params_alone():
    params = make_params([(5, 6), (7,)])
    ref = clone_params(params)
    _run(params, 5, stochastic_rounding=True)
    _run(ref, 5)
    for p, q in zip(params, ref):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- step in backward


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.LayerNorm(16),
                               torch.nn.Linear(16, 3))


def test_step_in_backward_equals_normal_step_with_scheduler():
    a, b = _model(), _model()
    opt_a = CAME(a.parameters(), lr=1e-2, weight_decay=0.01)
    opt_b = CAME(b.parameters(), lr=1e-2, weight_decay=0.01)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=3, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=3, gamma=0.5)

    def backward(model):
        def set_grads(t):
            gen = torch.Generator().manual_seed(1000 + t)
            x, y = torch.randn(32, 6, generator=gen), torch.randn(32, 3, generator=gen)
            torch.nn.functional.mse_loss(model(x), y).backward()
        return set_grads

    def released(t):
        assert all(p.grad is None for p in b.parameters())  # released during backward
        sched_b.step()

    train(opt_a, 8, backward(a), after=lambda t: sched_a.step())
    handle = step_in_backward(opt_b)
    train(opt_b, 8, backward(b), after=released)  # opt_b.step() is a no-op now
    handle.remove()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    sd_a, sd_b = opt_a.state_dict(), opt_b.state_dict()
    for k in sd_a["state"]:
        for key in sd_a["state"][k]:
            assert torch.equal(sd_a["state"][k][key], sd_b["state"][k][key])


def test_step_in_backward_remove_restores_normal_stepping():
    m = _model()
    opt = CAME(m.parameters(), lr=1e-2)
    with step_in_backward(opt):
        m(torch.randn(4, 6)).sum().backward()
    m(torch.randn(4, 6)).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_step_in_backward_refuses_other_optimizers():
    with pytest.raises(TypeError, match="CAME"):
        step_in_backward(torch.optim.SGD(_model().parameters(), lr=0.1))


# ---------------------------------------------------------------- on the fast paths


@pytest.mark.parametrize("case, dtype", [("momentum_int8", torch.float32),
                                         ("momentum_bf16", torch.float32),
                                         ("lowmem", torch.bfloat16)])
def test_lowmem_options_on_several_chunks_match_reference(case, dtype, monkeypatch):
    """The fast paths step low-bit momentum (and stochastically rounded weights) on float32
    copies, a chunk of tensors at a time; with many chunks the multi-tensor path still equals
    the reference bit for bit (the table's runs fit in one chunk)."""
    from torchcame._impl import foreach

    monkeypatch.setattr(foreach, "LOWBIT_CHUNK_ELEMENTS", 6000)  # several chunks
    row = CASE_BY_NAME[case]
    assert_same_run(*run_case(row, dtype, "foreach"), *run_case(row, dtype, "reference"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["int8", torch.bfloat16])
def test_fused_kernel_lowbit_matches_the_chunked_fused_path_bitwise(dtype, mode, monkeypatch):
    """The kernel decodes/encodes bf16 and int8 momentum itself; its codes, scales, weights
    and statistics equal those of the fused float32 step on a dequantized copy followed by
    torch's re-quantization (the path used when the kernel cannot take a tensor)."""
    import torchcame._impl.fused as fused

    params = make_params(BIG + SMALL + [(3, 1000)], dtype)  # (3, 1000): blocks cross rows
    ref = clone_params(params)
    opt = _run(params, 4, fused=True, momentum_dtype=mode,
               quantization_block_size=128)
    monkeypatch.setattr(fused, "step_fused_lowmem", lambda p, g, s, a, layouts: list(range(len(p))))
    opt_ref = _run(ref, 4, fused=True, momentum_dtype=mode,
               quantization_block_size=128)
    for p, q in zip(params, ref):
        assert torch.equal(p, q)
        for key, value in opt_ref.state[q].items():
            assert torch.equal(opt.state[p][key], value), key


@pytest.mark.parametrize("impl,bounded", [(dict(fused=True), True), (dict(foreach=True), False)])
def test_fused_lowmem_step_allocates_no_full_size_copies(impl, bounded):
    """bf16 weights + int8 momentum + stochastic rounding: the fused kernel's step creates no
    tensor of the weight's size (the chunked fast path makes float32 copies: 4 bytes/element
    at least -- the check can tell them apart)."""
    from torchcame.memory import TensorAllocationTracker

    p = torch.randn(512, 512).to(torch.bfloat16).requires_grad_()
    opt = CAME([p], lr=1e-3, momentum_dtype="int8", stochastic_rounding=True, **impl)
    for _ in range(2):
        p.grad = torch.randn(p.shape).to(torch.bfloat16)
        opt.step()
    p.grad = torch.randn(p.shape).to(torch.bfloat16)
    tracker = TensorAllocationTracker()
    with tracker:
        opt.step()
    if bounded:
        assert tracker.peak_bytes < 0.01 * p.numel()
    else:
        assert tracker.peak_bytes >= 4 * p.numel()


@pytest.mark.parametrize("impl", [dict(foreach=True), dict(fused=True)])
def test_stochastic_rounding_keeps_extremes(impl):
    """Just above the largest bf16 (less than half a spacing), stochastic rounding stays at
    the largest bf16 instead of picking inf (an unguarded bit trick would, ~40% of the time
    here); inf and NaN weights stay what they are."""
    big = torch.finfo(torch.bfloat16).max
    p = torch.full((64, 64), big, dtype=torch.bfloat16)
    p[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -big])
    p.requires_grad_()
    # the first update is ~11 lr (the zero-started instability EMA): ~0.4 spacing at the top
    opt = CAME([p], lr=5e34, stochastic_rounding=True, **impl)
    p.grad = -torch.ones_like(p)  # pushes every finite weight up
    opt.step()
    rest = p.detach().float()[1:]
    assert (rest == big).all()
    head = p.detach().float()[0, :4]
    assert head[0] == float("inf") and head[1] == float("-inf") and torch.isnan(head[2])
    assert torch.isfinite(head[3])

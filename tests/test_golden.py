"""Golden trajectories: 20 steps of every path x momentum format x param dtype (and the opt-in
options), compared with results stored before the architecture redesign (issue #11).

Each configuration steps a few small tensors (matrix, 3-D batch, 1x1-conv shape, vector,
scalar, zero-size) with gradients drawn from a seeded uniform generator (exact on any CPU);
the final parameters and every state tensor are compared with ``tests/golden/<config>.pt``.

The comparison is bitwise on a CPU of the capability the files were written on (recorded in
each file: torch's vectorized reductions and the fused kernel's build flags depend on it);
on another capability, float32 within 2e-6 relative of the tensor's scale and int8 codes
within one step (the reduction order differs, nothing else). Stochastic rounding is
reproduced by seed (``torch.manual_seed`` before the run), so it is compared the same way.

Regenerate (only when a change of results is intended, and say so in the commit):
``TORCHCAME_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from torchcame import CAME

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("TORCHCAME_REGEN_GOLDEN") == "1"
STEPS = 20
SHAPES = {"matrix": (6, 10), "batch": (2, 3, 7), "conv": (4, 3, 1, 1), "vector": (9,),
          "scalar": (), "empty": (0, 3)}


def _configs() -> dict[str, dict]:
    configs: dict[str, dict] = {}
    paths = {"reference": {"foreach": False}, "foreach": {"foreach": True},
             "fused": {"fused": True}}
    for path, flags in paths.items():
        for momentum in ("float32", "bfloat16", "int8"):
            for dtype in ("float32", "bfloat16"):
                configs[f"{path}-{momentum}-{dtype}"] = dict(
                    flags, momentum_dtype=momentum, dtype=dtype, weight_decay=1e-2)
            configs[f"{path}-{momentum}-bfloat16-sr"] = dict(
                flags, momentum_dtype=momentum, dtype="bfloat16", stochastic_rounding=True,
                weight_decay=1e-2)
        configs[f"{path}-maximize"] = dict(flags, maximize=True)
        configs[f"{path}-bias_correction"] = dict(flags, bias_correction=True, weight_decay=1e-2)
        configs[f"{path}-tensor_lr"] = dict(flags, tensor_lr=True, weight_decay=1e-2)
        configs[f"{path}-largest"] = dict(flags, factor_dims="largest")
    return configs


CONFIGS = _configs()


def _run(config: dict) -> dict[str, torch.Tensor]:
    config = dict(config)
    dtype = getattr(torch, config.pop("dtype", "float32"))
    lr = 1e-2
    if config.pop("tensor_lr", False):
        lr = torch.tensor(lr)
    torch.manual_seed(0)  # stochastic rounding's draws
    gen = torch.Generator().manual_seed(1234)
    params = {
        name: ((torch.rand(shape, generator=gen, dtype=torch.float64) - 0.5) * 2).to(dtype)
        .requires_grad_()
        for name, shape in SHAPES.items()
    }
    extra = {}
    if config.get("momentum_dtype") == "int8":
        extra = dict(quantization_block_size=16, min_quantized_numel=1)
    opt = CAME(list(params.values()), lr=lr, **extra, **config)
    for step in range(STEPS):
        scale = 1.0 + step % 3
        for p in params.values():
            g = (torch.rand(p.shape, generator=gen, dtype=torch.float64) - 0.5) * scale
            p.grad = g.to(p.dtype)
        opt.step()
    out = {f"param.{name}": p.detach().clone() for name, p in params.items()}
    for name, p in params.items():
        for key, value in opt.state[p].items():
            out[f"state.{name}.{key}"] = value.detach().clone()
    return out


def _close(expected: torch.Tensor, actual: torch.Tensor) -> bool:
    if expected.dtype == torch.int8:
        return bool(((expected.int() - actual.int()).abs() <= 1).all())
    e, a = expected.double(), actual.double()
    scale = e.abs().max().item() if e.numel() else 0.0
    rel = 2**-7 if expected.dtype == torch.bfloat16 else 2e-6  # one bf16 rounding apart
    tol = rel * max(scale, 1e-30)
    return bool(((e - a).abs() <= tol).all())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_golden_trajectory(name: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions and the fused kernel's partial sums: one order
    try:
        result = _run(CONFIGS[name])
    finally:
        torch.set_num_threads(threads)
    path = GOLDEN / f"{name}.pt"
    capability = torch.backends.cpu.get_cpu_capability()
    if REGEN:
        GOLDEN.mkdir(exist_ok=True)
        torch.save({"capability": capability, "tensors": result}, path)
        pytest.skip(f"wrote {path}")
    stored = torch.load(path, weights_only=True)
    expected = stored["tensors"]
    assert sorted(expected) == sorted(result), "the set of state tensors changed"
    bitwise = stored["capability"] == capability
    for key, want in expected.items():
        got = result[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        if bitwise:
            assert torch.equal(got, want), f"{name}: {key} differs from the golden trajectory"
        else:
            assert _close(want, got), f"{name}: {key} differs (CPU capability {capability} " \
                f"vs {stored['capability']}: tolerance comparison)"

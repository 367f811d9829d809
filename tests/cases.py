"""The test table: optimizer configurations x parameter dtypes x implementations, one shape
list and one tolerance table. ``test_invariants.py`` runs every row through shared invariants;
other test files take their shapes, cases and tolerances from here.

Adding an option: add it to ``OPTIONS`` (with a bad value in ``BAD_OPTIONS`` of
``test_invariants.py``) and a row to ``CASES`` that turns it on. Adding an implementation: one
entry in ``IMPLS`` and one row per dtype in ``TOLERANCES``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# ------------------------------------------------------------------------------- options

#: Every constructor option of ``torchcame.CAME`` and its default (README, Options).
#: TODO(lead): derive this from ``torchcame.options.OPTIONS`` once options.py lands on main
#: (name, default, check, doc, fixes-the-state-layout), and assert here that every option with
#: a non-default value appears in at least one row of ``CASES`` (see ``uncovered_options``).
OPTIONS = {
    "lr": 2e-4,
    "eps": (1e-30, 1e-16),
    "clip_threshold": 1.0,
    "betas": (0.9, 0.999, 0.9999),
    "weight_decay": 0.0,
    "maximize": False,
    "foreach": None,
    "fused": None,
    "skip_nonfinite": False,
    "momentum_dtype": torch.float32,
    "quantization_block_size": 256,
    "min_quantized_numel": 4096,
    "stochastic_rounding": False,
    "bias_correction": False,
    "factor_dims": "last_two",
    "factor_min_dim": 1,
}
#: Options that fix the layout of a parameter's state when it is created (README: "the loading
#: optimizer keeps its own layout options").
LAYOUT_OPTIONS = ("momentum_dtype", "quantization_block_size", "min_quantized_numel",
                  "factor_dims", "factor_min_dim")

# ----------------------------------------------------------------------- implementations

#: The implementations, by the flags that select them. ``reference`` is the per-tensor loop
#: every other path is compared with; without a C++ compiler ``fused`` falls back to
#: ``foreach`` (with a warning), which meets the fused tolerances too.
IMPLS = {
    "reference": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
LOW_PRECISION = (torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------- shapes

#: The one shape list: 0-d .. 4-d, non-square (both ways), a batch of matrices, a 1x1 conv,
#: a 1x1 matrix, zero-size tensors (rows, columns, a vector, a batch), and one matrix big
#: enough to take the fused kernel's one-tensor-at-a-time (row-parallel) branch next to the
#: small ones of its tensor-parallel branch, yet under torch's 32768-element grain, so the
#: suite's elementwise ops stay single-threaded (on a busy 2-core machine every OpenMP region
#: waits for a descheduled thread). Several chunks of rows: test_impls.py, (300, 200).
SHAPES = [(), (7,), (5, 3), (3, 8), (2, 4, 6), (2, 3, 4, 5), (6, 5, 1, 1), (1, 1), (33, 65),
          (0, 4), (4, 0), (0,), (0, 3, 2), (200, 160), (9,)]
#: The shapes without the big matrix, for runs that repeat many steps.
SMALL_SHAPES = [s for s in SHAPES if math.prod(s) <= 4096]
#: Indices into SHAPES (or any shape list ending in a vector): a parameter whose gradient is
#: None on odd steps, and the last one, which never gets a gradient (it must keep no state
#: and not move).
NONE_ON_ODD_STEPS = 1
NEVER_GRAD = -1
ZERO_SIZE = tuple(i for i, s in enumerate(SHAPES) if math.prod(s) == 0)

#: Steps per run, and the gradient scale of step t: GRAD_SCALES[t % 3] (x30 makes the RMS
#: clip bind on some steps, x0.01 lets the EMAs see a change of scale).
STEPS = 6
GRAD_SCALES = (1.0, 30.0, 0.01)

# ------------------------------------------------------------------------------- cases

BASE = {"lr": 1e-2}  # the default 2e-4 makes every difference invisible after a few steps


def _tensor_lr() -> torch.Tensor:
    return torch.tensor(2e-2)


#: Small int8 blocks and thresholds so the small shapes above are quantized (block 16: blocks
#: cross rows of the (5, 3) and (3, 8) tensors; 7 divides none of the sizes: ragged tails).
INT8 = {"momentum_dtype": "int8", "quantization_block_size": 16, "min_quantized_numel": 1}


@dataclass(frozen=True)
class Case:
    """One optimizer configuration: CAME's options (over ``BASE``) and the param dtypes it is
    run with. ``lr="tensor"`` stands for a fresh 0-d tensor lr per optimizer."""

    name: str
    options: dict = field(default_factory=dict)
    dtypes: tuple[str, ...] = tuple(DTYPES)

    def kwargs(self) -> dict:
        """Constructor keyword arguments (a new tensor lr each call)."""
        kw = {**BASE, **self.options}
        if isinstance(kw["lr"], str):
            kw["lr"] = _tensor_lr()
        return kw

    @property
    def momentum(self) -> str:
        """The momentum storage format: ``"float32"``, ``"bfloat16"`` or ``"int8"``."""
        fmt = self.options.get("momentum_dtype", "float32")
        return {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(fmt, fmt)

    @property
    def stochastic(self) -> bool:
        return bool(self.options.get("stochastic_rounding", False))

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("default"),
    Case("weight_decay", {"weight_decay": 0.1}),
    Case("lr_tensor", {"lr": "tensor", "weight_decay": 0.01}),
    Case("maximize", {"maximize": True, "weight_decay": 0.1}),
    Case("betas", {"betas": (0.8, 0.99, 0.999)}),
    Case("betas_beta3_below_beta2", {"betas": (0.5, 0.999, 0.9)}),
    Case("eps", {"eps": (1e-20, 1e-12)}),
    Case("clip", {"clip_threshold": 0.3}),
    Case("no_clip", {"clip_threshold": 1e3}),
    Case("skip_nonfinite", {"skip_nonfinite": True}),  # finite grads: the default rule
    Case("momentum_bf16", {"momentum_dtype": torch.bfloat16, "weight_decay": 0.01}),
    Case("momentum_int8", {**INT8, "weight_decay": 0.01}),
    Case("momentum_int8_ragged",  # block 7; tensors under 20 elements keep float32 m
         {**INT8, "quantization_block_size": 7, "min_quantized_numel": 20}),
    Case("stochastic_rounding", {"stochastic_rounding": True, "weight_decay": 0.1}),
    Case("lowmem", {**INT8, "stochastic_rounding": True, "weight_decay": 0.01},
         dtypes=("float32", "bfloat16", "float16")),
    Case("bf16_momentum_sr", {"momentum_dtype": torch.bfloat16, "stochastic_rounding": True},
         dtypes=("bfloat16", "float16")),
    Case("bias_correction", {"bias_correction": True, "weight_decay": 0.01}),
    Case("largest", {"factor_dims": "largest"}),
    Case("largest_min_dim", {"factor_dims": "largest", "factor_min_dim": 4}),
    Case("everything", {"lr": "tensor", "betas": (0.8, 0.99, 0.999), "eps": (1e-20, 1e-12),
                        "clip_threshold": 0.5, "weight_decay": 0.05, "maximize": True,
                        "bias_correction": True, "factor_dims": "largest", **INT8,
                        "skip_nonfinite": True}),
]
CASE_BY_NAME = {c.name: c for c in CASES}


def uncovered_options() -> list[str]:
    """Options that no row of CASES (or IMPLS) sets to a non-default value."""
    set_somewhere = {k for c in CASES for k in c.options} | {k for f in IMPLS.values() for k in f}
    return sorted(set(OPTIONS) - set_somewhere - set(BASE))


# --------------------------------------------------------------------------- tolerances


@dataclass(frozen=True)
class Tol:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise (0, 0: bitwise)."""

    rtol: float
    atol: float

    @property
    def exact(self) -> bool:
        return self.rtol == 0 and self.atol == 0


EXACT = Tol(0.0, 0.0)
#: One ulp of bf16 / fp16 for |x| < 8 (rtol: the format's spacing relative to x; atol: the
#: spacing at 4 <= |x| < 8, the largest magnitude the shapes' N(0, 1) values reach in 6 steps).
ONE_ULP = {torch.bfloat16: Tol(2**-7, 2**-5), torch.float16: Tol(2**-10, 2**-8)}

#: Tolerances of the parameters, per (param dtype, path). Path "reference" is the per-tensor
#: path compared with the float64 oracle (tests/oracle.py); the others are compared with the
#: reference path on the same inputs; "layout" is a path on transposed / channels_last params
#: and grads compared with the same path on contiguous ones.
TOLERANCES: dict[tuple[torch.dtype, str], Tol] = {
    # Reference vs oracle. float64: the same rule in another operation order (the oracle uses
    # divisions and sqrt where the package uses rsqrt products): ~1e-16 per op, a few hundred
    # ops, amplified by 1/sqrt of small statistics -> 1e-10 relative keeps 4 digits of margin.
    (torch.float64, "reference"): Tol(1e-10, 1e-12),
    # float32 math vs float64: each step moves a parameter by lr * |delta| <= ~0.2 with
    # delta computed to ~1e-6 relative (float32 rounding through ~20 ops, rsqrt of a
    # normalized statistic); 6 steps -> ~1e-6 absolute; statistics are relative (below).
    (torch.float32, "reference"): Tol(1e-5, 1e-5),
    # bf16/fp16 params: the float32 update is the oracle's to ~1e-6, but it can round to the
    # neighbouring bf16/fp16 value; CAME's state does not depend on the params, so such a
    # flip does not grow (weight decay carries it 1e-3 per step at most): one ulp.
    (torch.bfloat16, "reference"): ONE_ULP[torch.bfloat16],
    (torch.float16, "reference"): ONE_ULP[torch.float16],
    # foreach: the same operations in the same order as the reference, batched: bitwise.
    **{(dt, "foreach"): EXACT for dt in DTYPES.values()},
    # fused (CPU kernel): sums rows/columns in blocks with double accumulators, so the
    # statistics move by a few float32 ulps, and the params by lr * that per step. float64:
    # the same in double.
    (torch.float64, "fused"): Tol(1e-12, 1e-14),
    (torch.float32, "fused"): Tol(1e-5, 1e-5),
    (torch.bfloat16, "fused"): ONE_ULP[torch.bfloat16],
    (torch.float16, "fused"): ONE_ULP[torch.float16],
    # transposed / channels_last: the reductions over rows and columns run in another memory
    # order (issue #11: ~1e-7 after 5 steps in float32): the fused tolerances.
    (torch.float64, "layout"): Tol(1e-12, 1e-14),
    (torch.float32, "layout"): Tol(1e-5, 1e-5),
    (torch.bfloat16, "layout"): ONE_ULP[torch.bfloat16],
    (torch.float16, "layout"): ONE_ULP[torch.float16],
    # Paths outside the table, float32 params, each compared with the reference path:
    # came-pytorch (tests/test_parity.py): the reference follows the authors' op order, so it
    # agrees to the last bit in practice; the bound allows one rounding per op. bf16/fp16: the
    # same float32 math and the same final rounding: bitwise.
    (torch.float64, "came_pytorch"): Tol(1e-12, 1e-14),
    (torch.float32, "came_pytorch"): Tol(1e-6, 1e-7),
    (torch.bfloat16, "came_pytorch"): EXACT,
    (torch.float16, "came_pytorch"): EXACT,
    # torch.compile (test_compile.py, the compiled fused step): compiled code fuses and
    # reorders float32 arithmetic; observed a few 1e-7 after 6 steps.
    (torch.float32, "compiled"): Tol(1e-5, 1e-6),
    # a tensor lr against a float one (test_came.py): lr·λ is rounded as a float32 product
    # instead of a double one, a few ulps per step over 20 steps.
    (torch.float32, "tensor_lr"): Tol(1e-6, 1e-7),
    # lr schedulers (test_schedulers.py): each path against the reference path driven by hand
    # with float lrs; a tensor lr rounds lr·λ differently from a float one (a few ulps a step).
    (torch.float32, "scheduled"): Tol(1e-5, 1e-6),
    # process groups (test_distributed.py, a norm-wise relative bound: max|a − b| <=
    # rtol·max|b| per tensor): cross-rank sums change the summation order; 12-15 steps.
    (torch.float32, "distributed"): Tol(1e-5, 0.0),
}

#: Tolerances of the float statistics (every state tensor except the momentum's storage and
#: ``step``), per (compute dtype, path): they depend on gradients only, so they are those of
#: the compute dtype (float32 for bf16/fp16 params). float32: a few ulps per EMA update.
STATE_TOLERANCES: dict[tuple[torch.dtype, str], Tol] = {
    (torch.float64, "reference"): Tol(1e-10, 1e-30),
    (torch.float32, "reference"): Tol(1e-5, 1e-30),
    **{(dt, "foreach"): EXACT for dt in (torch.float64, torch.float32)},
    (torch.float64, "fused"): Tol(1e-12, 1e-30),
    (torch.float32, "fused"): Tol(1e-5, 1e-30),
    (torch.float64, "layout"): Tol(1e-12, 1e-30),
    (torch.float32, "layout"): Tol(1e-5, 1e-30),
}

#: Momentum stored in bf16 or int8, where it is not bitwise: a float32 m a few ulps away can
#: round to the neighbouring bf16 value or int8 code (at most one code apart). "A few ulps"
#: is absolute, not relative: m = β1·m + (1 − β1)·û cancels to values far below its O(1)
#: terms, so its float32 error is ~1e-7 of the terms (the float32 atol above), which is
#: several bf16 spacings of a tiny m (seen: 2 spacings of an m of 1e-5, transposed grads).
MOMENTUM_BF16_TOL = Tol(2**-7, 1e-5)  # one bf16 spacing (<= 2^-7 of the value), or the atol
MOMENTUM_INT8_MAX_CODE_DIFF = 1


def param_tol(dtype: torch.dtype, path: str) -> Tol:
    return TOLERANCES[(dtype, path)]


def state_tol(dtype: torch.dtype, path: str) -> Tol:
    compute = torch.float32 if dtype in LOW_PRECISION else dtype
    return STATE_TOLERANCES[(compute, path)]


def sr_spacings(steps: int) -> int:
    """Stochastic rounding: each step rounds to one of the two neighbours of the float32
    result, so a path that draws other random bits (the fused kernel), or the oracle's exact
    value, is at most one spacing of the param dtype per step away."""
    return steps


def spacing(x: torch.Tensor) -> torch.Tensor:
    """The gap between ``x`` (bf16/fp16) and its neighbour away from zero, as float32."""
    eps = torch.finfo(x.dtype).eps
    tiny = torch.finfo(x.dtype).tiny
    return (x.float().abs() * eps).clamp(min=tiny) * 2

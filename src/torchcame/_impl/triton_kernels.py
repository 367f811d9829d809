"""Fused CAME step as Triton kernels (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

:func:`step_triton` steps a list of tensors with a handful of launches. Tensors are grouped by
(device, parameter dtype, gradient dtype, momentum format and int8 block size, factored or not,
column tile width: the next power of two of the last dim, capped at ``MAX_BLOCK_M``, so all
matrices of a transformer share one group); every launch covers a whole group. Each program
reads its tensor's pointers, shape and scratch offsets from a small int64 table (one row per
tensor) and finds its tensor through a program -> tensor map (one int32 per program, cached
per set of shapes), so a model's hundreds of biases and norms are stepped by the same few
launches as its matrices: no per-tensor Python loop of launches, and nothing is copied into a
packed buffer.

**Factored tensors** ``(B, n, m)`` (leading dims flattened into ``B``; statistics over the last
two dims) take nine launches, four of them passes over the tensor:

1. *pass 1*, row tiles, read ``g``: row sums and per-row-group column partial sums of
   ``G = g^2 + eps1``;
2. *statistics*: ``r, c`` EMAs from the partial sums, ``rsqrt(c)``, and per-chunk sums of the
   new ``r`` (one program per ``FINALIZE_BLOCK`` rows or columns of a batch); then *row
   factors* ``rsqrt(r / mean(r))`` (one program per row chunk);
3. *pass 2*, row tiles, read ``g``: partial sums of ``u^2``, ``u = (rf_i cf_j) g``;
4. *denominator*, one program per tensor: ``max(1, RMS(u) / d)`` from the partial sums;
5. *pass 3*, row tiles, read ``g`` and ``m``: ``u_hat``, the new ``m`` (written back here when
   it is stored in float32) and the row/column sums of ``U = (u_hat - m)^2 + eps2``;
6. *statistics* and *row factors* of ``R, C`` (two launches, as in 2);
7. *update*, flat over storage units (int8 blocks): weight decay, ``p -= lr (Rf_i Cf_j) m``;
   with bf16/int8 momentum it re-reads ``g`` and the old ``m``, recomputes the new ``m`` with
   the same float32 operations as pass 3 (so the same bits) and encodes it block by block.

**Vectors and scalars** (and any tensor whose layout has ``factored_dims=None``) take three:
``v`` EMA and partial sums of ``u^2`` (read ``g``, read/write ``v``), the denominator, and the
update (read ``g, v, m, p``; write ``m, p``).

Bytes moved per element (``P``, ``G``: parameter and gradient bytes; scratch is O(rows + cols)
and not counted; int8 adds 4 bytes of scale per block, ``4/256`` at the default block size):

==================  ==================================  ====================================
momentum            factored                            vectors
==================  ==================================  ====================================
float32             ``3G + 12 + 2P`` (32: float32 p)    ``2G + 20 + 2P`` (36: float32 p)
bfloat16            ``4G + 6 + 2P`` (18: bf16 p)        ``2G + 16 + 2P``
int8                ``4G + 3.05 + 2P`` (15.05: bf16 p)  ``2G + 14.03 + 2P``
==================  ==================================  ====================================

(float32 factored: ``g`` read by passes 1-3, ``m`` read and written by pass 3 and read by the
update, ``p`` read and written once: the CPU kernel's 32 bytes. Low-bit momentum: ``g`` is
read a fourth time and ``m`` read twice and written once in its compact format.)

Scratch per factored tensor, in float32: ``(C + 2) B n + (P + 2) B m + B P C + B n / 1024 + 1``
with ``P`` row groups (at most ``MAX_ROW_GROUPS``) and ``C`` column groups (at most
``MAX_COL_GROUPS``) per batch: O(rows + cols); per vector: one partial sum per ``FLAT_BLOCK``
elements, plus one. Nothing of the tensor's size is allocated.

**Determinism.** No atomics: every partial sum has one writer, and the reductions of partial
sums run in a fixed order in one program. Results do not depend on timing; they can differ
from the CPU kernel's in the last bits (other summation orders), as any two reduction trees do.
Launches pass ``enable_fp_fusion=False``: no multiply-add is contracted, so the momentum
recomputed by the update launch equals pass 3's bit for bit and int8 codes round as torch's.
Divisions and square roots are the correctly rounded ``div_rn``/``sqrt_rn``.

**Numerics**: the CPU kernel's operations, in its order, in float32: ``u = ((rf cf) (s g)) /
denom``, ``m = m b1 + (1 - b1) u``, weight decay ``p + decay p`` with ``decay = -wd * lr``
formed in float64 (float lr) or ``-wd * lr`` with ``lr`` read from memory and rounded to the
parameter dtype (tensor lr, as the reference's ``addcmul_``); the decayed weight is rounded to a
bf16/fp16 parameter's dtype before the step, except with stochastic rounding. int8 codes are
``clamp(round_half_even(m * ((1 / absmax) * 127)), -127, 127)``, bf16 momentum is rounded to
nearest even: the same codes and bits as :func:`torchcame.lowbit.quantize_blockwise` and the
CPU kernel for the same float32 momentum, so checkpoints move between the paths both ways.

**Bias correction** (opt-in): ``u`` is scaled by ``sqrt(1 - beta2^t)`` before the RMS clip and
the step by ``sqrt(1 - beta3^t) / (1 - beta1^t)`` (vectors: ``1 / (1 - beta1^t)``), as the
reference does, with ``t`` read per tensor from ``state["step"]`` on the host (a CPU tensor:
no device sync). A tensor ``lr`` is read by the update kernel from memory: a scheduler changing
it recompiles nothing. Hyperparameter values (lr, betas, eps, clip, weight decay, the sign of
``maximize``) are runtime arguments; compile-time constants are only the dtypes, the momentum
format, the tile sizes and three switches (weight decay on, tensor lr, stochastic rounding).

**Stochastic rounding** (bf16/fp16 parameters): the new weight is one of its two neighbours in
the parameter dtype, the far one with probability (distance to the nearest) / (spacing), from
``tl.randint`` (Philox, counter-based: offset = element index, key = a per-tensor seed derived
from one draw of torch's default generator per call). Reproducible under ``torch.manual_seed``;
not the CPU kernel's random bits.

**Factored dims other than the last two** (``factor_dims="largest"``, e.g. a conv weight
``(o, i, kh, kw)`` factored over ``(o, i)``) are stepped through strides: the passes address the
``(B, n, m)`` view of the tensor with its factored dims moved last, and the update maps each
element's offset to its view coordinates (``(offset // stride) % size``, three divisions). This
needs the other dims to merge into one batch dim (true when they are adjacent in memory, as
for ``(o, i, kh, kw)``); other layouts are not handled.

**Sharded tensors** (FSDP2 / tensor-parallel DTensor local shards, ``fused=True``): the
passes run on the local shards as they are, and :mod:`torchcame.distributed` reduces the raw
partial sums between them (:class:`TritonGroup`'s ``factored_sums`` / ``sq_sum``, then
``set_factors`` / ``set_denom``) in place of the statistics and denominator launches, so the
traffic per element is the table's and each step adds the same three all-reduces as the
reference math on shards.

**Not handled here** (stepped by the reference path instead, with a one-time warning naming
both): moved factored dims whose other dims do not merge, float64 parameters or gradients,
non-contiguous parameters or states, states on another device than their parameter.
Zero-size tensors are skipped.

**GPU performance is not measured yet** (no GPU where this was written; the kernels compile
for sm_90 and run under the interpreter in the tests): tile sizes are first guesses. The
denominator launch runs one program per tensor over its ``B P C`` partial sums (a few thousand
at most for one batch). Element offsets use 32-bit divisions unless a tensor has 2^31
elements or more.

The environment variable ``TORCHCAME_FUSED_BACKEND=triton`` is a *testing switch*: it makes
:func:`use_triton` answer ``True`` for CPU tensors, so the kernels run under Triton's
interpreter (which must be enabled with ``TRITON_INTERPRET=1`` before this module is imported).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import defaultdict

import torch
from torch import Tensor

from .._warnings import warn_once
from ..options import StepArgs

__all__ = ["step_triton", "plan_groups", "TritonGroup", "triton_available", "use_triton",
           "LAUNCHES", "interpreted", "traffic_bytes"]

#: Launches per kernel name since import; tests read it to prove the Triton path ran.
LAUNCHES: dict[str, int] = defaultdict(int)

# Tile configuration (module constants so tests can shrink them to exercise every loop). With
# these, ptxas (sm_90a) gives the heaviest kernels (pass 3 and the int8 + stochastic-rounding
# update) under 90 registers per thread and no spills; 2048-element tiles needed 168-254
# registers and spilled, which would starve a memory-bound kernel of resident warps.
MAX_BLOCK_M = 256  # columns per tile (a power of two)
TILE = 512  # elements per row tile: BLOCK_N = TILE // BLOCK_M rows (4 per thread, 4 warps)
MAX_ROW_GROUPS = 128  # P: programs along the rows of one batch (column partial sums per group)
MAX_COL_GROUPS = 16  # C: programs along the columns (row partial sums per group)
MIN_GROUP_ROWS = 32  # rows per row group at least: column partial sums cost <= 1/8 B/element
FLAT_BLOCK = 1024  # elements per program of the vector pass, units of non-int8 updates
UPDATE_TILE = 1024  # elements per program of the update launch (4 per thread, 8 warps)
FINALIZE_BLOCK = 1024  # rows or columns per program of the statistics launches

try:  # pragma: no cover - exercised where triton is installed
    import triton
    import triton.language as tl

    _TRITON_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - any import failure means "no triton"
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_ERROR = f"{type(exc).__name__}: {exc}"


def triton_available() -> bool:
    """Whether ``triton`` imports (and so the kernels are defined).

    Returns:
        ``True`` when ``import triton`` succeeded at import of this module.
    """
    return triton is not None


def unavailable_reason() -> str:
    """Why ``triton`` is not usable here (``"available"`` when it is)."""
    return "available" if triton is not None else f"import triton failed: {_TRITON_ERROR}"


def interpreted() -> bool:
    """Whether the kernels were defined under Triton's interpreter.

    Returns:
        ``True`` when ``TRITON_INTERPRET=1`` was set when this module was imported: the
        kernels then run on CPU tensors (slowly), and not as compiled GPU code.
    """
    if triton is None:
        return False
    return _INTERPRETED


def use_triton(device: torch.device) -> bool:
    """Whether the fused step should run these kernels for tensors on ``device``.

    Args:
        device: the parameters' device.

    Returns:
        For CUDA, whether triton is importable. For CPU, ``True`` only when the testing switch
        ``TORCHCAME_FUSED_BACKEND=triton`` is set and the kernels run under the interpreter
        (with the switch set but no interpreter a warning says how to enable it). ``False``
        for any other device.
    """
    device = torch.device(device)
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    if device.type == "cpu" and os.environ.get("TORCHCAME_FUSED_BACKEND") == "triton":
        if interpreted():
            return True
        _warn_once("torchcame: TORCHCAME_FUSED_BACKEND=triton for CPU tensors needs Triton's "
                   "interpreter: set TRITON_INTERPRET=1 before importing torchcame; the CPU "
                   "fused path runs instead")
    return False


def _warn_once(message: str) -> None:
    warn_once(message, stacklevel=3)


# ------------------------------------------------------------------------------ table layout
# int64 columns of the per-tensor table
_C_P, _C_G, _C_M, _C_AMAX, _C_ROW, _C_COL, _C_RROW, _C_RCOL = range(8)
_C_B, _C_N, _C_MC = 8, 9, 10  # batches, rows n, columns m
_C_PG, _C_CG, _C_RPP, _C_CPP = 11, 12, 13, 14  # row groups, col groups, rows/cols per program
_C_WRP, _C_WCP, _C_WRF, _C_WCF, _C_WRRF, _C_WRCF, _C_WSQ, _C_WDEN = range(15, 23)
_C_SQCNT, _C_NUMEL, _C_UNIT, _C_SEED = 23, 24, 25, 26
_C_S_TILE, _C_S_FIN, _C_S_UPD, _C_S_VEC, _C_S_FAC = 27, 28, 29, 30, 31
_C_WRS = 32  # per (batch, row chunk) sums of the new row statistic (for its mean)
_C_SB, _C_SN, _C_SM = 33, 34, 35  # element strides of the (B, n, m) view of moved dims
_NCOL = 36
# float32 columns
_F_BC2, _F_SCALE, _F_SQRTN = 0, 1, 2
_NFCOL = 3

_FMT = {"float32": 0, "bfloat16": 1, "int8": 2}
_MAGIC = 12582912.0  # 1.5 * 2^23: (x + magic) - magic rounds |x| < 2^22 half to even

if triton is not None:
    try:
        from triton import knobs as _knobs

        _INTERPRETED = bool(_knobs.runtime.interpret)
    except ImportError:  # triton < 3.4 reads the variable directly
        _INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")

    K_P = tl.constexpr(_C_P)
    K_G = tl.constexpr(_C_G)
    K_M = tl.constexpr(_C_M)
    K_AMAX = tl.constexpr(_C_AMAX)
    K_ROW = tl.constexpr(_C_ROW)
    K_COL = tl.constexpr(_C_COL)
    K_RROW = tl.constexpr(_C_RROW)
    K_RCOL = tl.constexpr(_C_RCOL)
    K_B = tl.constexpr(_C_B)
    K_N = tl.constexpr(_C_N)
    K_MC = tl.constexpr(_C_MC)
    K_PG = tl.constexpr(_C_PG)
    K_CG = tl.constexpr(_C_CG)
    K_RPP = tl.constexpr(_C_RPP)
    K_CPP = tl.constexpr(_C_CPP)
    K_WRP = tl.constexpr(_C_WRP)
    K_WCP = tl.constexpr(_C_WCP)
    K_WRF = tl.constexpr(_C_WRF)
    K_WCF = tl.constexpr(_C_WCF)
    K_WRRF = tl.constexpr(_C_WRRF)
    K_WRCF = tl.constexpr(_C_WRCF)
    K_WSQ = tl.constexpr(_C_WSQ)
    K_WDEN = tl.constexpr(_C_WDEN)
    K_SQCNT = tl.constexpr(_C_SQCNT)
    K_NUMEL = tl.constexpr(_C_NUMEL)
    K_UNIT = tl.constexpr(_C_UNIT)
    K_SEED = tl.constexpr(_C_SEED)
    K_S_TILE = tl.constexpr(_C_S_TILE)
    K_S_FIN = tl.constexpr(_C_S_FIN)
    K_S_FAC = tl.constexpr(_C_S_FAC)
    K_WRS = tl.constexpr(_C_WRS)
    K_SB = tl.constexpr(_C_SB)
    K_SN = tl.constexpr(_C_SN)
    K_SM = tl.constexpr(_C_SM)
    K_S_UPD = tl.constexpr(_C_S_UPD)
    K_S_VEC = tl.constexpr(_C_S_VEC)
    NCOL = tl.constexpr(_NCOL)
    F_BC2 = tl.constexpr(_F_BC2)
    F_SCALE = tl.constexpr(_F_SCALE)
    F_SQRTN = tl.constexpr(_F_SQRTN)
    NFCOL = tl.constexpr(_NFCOL)
    MAGIC = tl.constexpr(_MAGIC)

    # -------------------------------------------------------------------- element helpers

    @triton.jit
    def _upcast(x, DTYPE: tl.constexpr):
        """``x`` (of ``DTYPE``) as float32, exactly (bf16 by its bits: no rounding mode)."""
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
            return bits.to(tl.float32, bitcast=True)
        else:
            return x.to(tl.float32)

    @triton.jit
    def _ema_from_partials(stat_ptr, parts_ws, n_parts, stride, idx, mask, count, beta,
                           one_minus_beta, other, BLOCK: tl.constexpr):
        """``stat = beta * stat + (1 - beta) * (sum of the parts' partial sums) / count`` for
        ``BLOCK`` entries, the parts added in a fixed order; returns the new values."""
        s = tl.zeros([BLOCK], dtype=tl.float32)
        for part in range(0, n_parts):
            s += tl.load(parts_ws + part * stride + idx, mask=mask, other=0.0)
        value = tl.load(stat_ptr + idx, mask=mask, other=other)
        value = value * beta + one_minus_beta * tl.math.div_rn(s, count.to(tl.float32))
        tl.store(stat_ptr + idx, value, mask=mask)
        return value

    @triton.jit
    def _locate(meta, prog_map, START: tl.constexpr):
        """This program's tensor (its row of the table), its index among that tensor's
        programs of the launch (``START``: the column of its first program), and the
        tensor's ``(B, n, m)``."""
        pid = tl.program_id(0)
        t = tl.load(prog_map + pid)
        local = pid - tl.load(meta + t * NCOL + START)
        return (t, local, tl.load(meta + t * NCOL + K_B), tl.load(meta + t * NCOL + K_N),
                tl.load(meta + t * NCOL + K_MC))

    @triton.jit
    def _tile(b, i0, cols, r_hi, cm, n, m, s_b, s_n, s_m, MOVED: tl.constexpr,
              BLOCK_N: tl.constexpr):
        """Rows, row mask, global row index, element mask and element offsets of the row
        tile at ``i0`` of batch ``b`` (contiguous ``(B, n, m)``, or the strided view of
        moved dims)."""
        rows = i0 + tl.arange(0, BLOCK_N)
        rm = rows < r_hi
        k = b * n + rows
        mask = rm[:, None] & cm[None, :]
        if MOVED:  # the factored dims are not the last two: a strided view
            offs = (b * s_b + rows * s_n)[:, None] + cols[None, :] * s_m
        else:
            offs = k[:, None] * m + cols[None, :]
        return rows, rm, k, mask, offs

    @triton.jit
    def _load_f32(ptr, offs, mask, DTYPE: tl.constexpr):
        return _upcast(tl.load(ptr + offs, mask=mask, other=0.0), DTYPE)

    @triton.jit
    def _is_finite(x):
        bits = x.to(tl.int32, bitcast=True)
        return (bits & 0x7F800000) != 0x7F800000

    @triton.jit
    def _round_nearest(x, DTYPE: tl.constexpr):
        """float32 ``x`` rounded to nearest even in ``DTYPE`` (bf16 by integer arithmetic, as
        c10::BFloat16 does, so the interpreter and the GPU agree; NaN stays a quiet NaN)."""
        if DTYPE == tl.bfloat16:
            b = x.to(tl.uint32, bitcast=True)
            special = (b & 0x7F800000) == 0x7F800000
            rounded = b + 0x7FFF + ((b >> 16) & 1)
            quiet = tl.where((b & 0x007FFFFF) != 0, 0x00400000, 0).to(tl.uint32)
            out = tl.where(special, b | quiet, rounded)
            return (out >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        elif DTYPE == tl.float32:
            return x
        else:
            return x.to(DTYPE)

    @triton.jit
    def _stochastic_round(x, bits, DTYPE: tl.constexpr):
        """float32 ``x`` to one of its two ``DTYPE`` neighbours, the far one with probability
        (x - nearest) / (other - nearest): the rule of ``torchcame.lowbit.stochastic_round_``
        (an infinite neighbour is never chosen; NaN, inf and exact values stay)."""
        nearest = _round_nearest(x, DTYPE)
        near = _upcast(nearest, DTYPE)
        nb = nearest.to(tl.uint16, bitcast=True).to(tl.int32)
        up = x > near
        neg = (nb & 0x8000) != 0
        zero = (nb & 0x7FFF) == 0
        ob = tl.where(zero, tl.where(up, 1, 0x8001), tl.where(up != neg, nb + 1, nb - 1))
        other = ob.to(tl.uint16).to(DTYPE, bitcast=True)
        far = _upcast(other, DTYPE)
        safe = (x != near) & _is_finite(near) & _is_finite(far)
        p_other = tl.math.div_rn(tl.where(safe, x - near, 0.0), tl.where(safe, far - near, 1.0))
        u = (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)
        return tl.where(safe & (u < p_other), other, nearest)

    @triton.jit
    def _decode(m_ptr, amax_ptr, offs, mask, block, M_FMT: tl.constexpr):
        """The stored momentum at ``offs`` as float32 (int8: code * (absmax / 127), ``block``
        the int8 block index of each element)."""
        if M_FMT == 0:
            return tl.load(m_ptr + offs, mask=mask, other=0.0)
        elif M_FMT == 1:
            return _upcast(tl.load(m_ptr + offs, mask=mask, other=0.0), tl.bfloat16)
        else:
            codes = tl.load(m_ptr + offs, mask=mask, other=0).to(tl.float32)
            absmax = tl.load(amax_ptr + block, mask=mask, other=0.0)
            return codes * tl.math.div_rn(absmax, 127.0)

    # -------------------------------------------------------------------- row-tile passes

    @triton.jit
    def _rowtile_kernel(meta, fmeta, prog_map, ws, eps1, eps2, b1, a1, sign,
                        PASS: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                        M_FMT: tl.constexpr, M_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_M: tl.constexpr, IDX64: tl.constexpr, MOVED: tl.constexpr):
        """Passes 1-3 of a factored tensor over one (batch, row group, column group) block.

        PASS 1: row and column partial sums of ``G = g^2 + eps1``. PASS 2: the partial sum of
        ``u^2``. PASS 3: the new momentum (stored when float32) and row and column partial
        sums of the instability ``U = (u_hat - m)^2 + eps2``.
        """
        t, local, nb, n, m = _locate(meta, prog_map, K_S_TILE)
        n_pg = tl.load(meta + t * NCOL + K_PG)
        n_cg = tl.load(meta + t * NCOL + K_CG)
        rpp = tl.load(meta + t * NCOL + K_RPP)
        cpp = tl.load(meta + t * NCOL + K_CPP)
        b = local // (n_pg * n_cg)
        pg = (local // n_cg) % n_pg
        cg = local % n_cg
        r_lo = pg * rpp
        r_hi = tl.minimum(r_lo + rpp, n)
        c_lo = cg * cpp
        c_hi = tl.minimum(c_lo + cpp, m)
        g_ptr = tl.load(meta + t * NCOL + K_G).to(tl.pointer_type(G_DTYPE))
        big_n = nb * n
        if MOVED:
            s_b = tl.load(meta + t * NCOL + K_SB)
            s_n = tl.load(meta + t * NCOL + K_SN)
            s_m = tl.load(meta + t * NCOL + K_SM)
        else:  # unused by _tile (MOVED is a compile-time constant)
            s_b = 0
            s_n = 0
            s_m = 0
        if PASS == 2:
            rf_ws = ws + tl.load(meta + t * NCOL + K_WRF)
            cf_ws = ws + tl.load(meta + t * NCOL + K_WCF)
            bc2 = tl.load(fmeta + t * NFCOL + F_BC2)
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for c0 in range(c_lo, c_hi, BLOCK_M):
                cols = c0 + tl.arange(0, BLOCK_M)
                cm = cols < c_hi
                cf = tl.load(cf_ws + b * m + cols, mask=cm, other=0.0)
                for i0 in range(r_lo, r_hi, BLOCK_N):
                    rows, rm, k, mask, offs = _tile(b, i0, cols, r_hi, cm, n, m, s_b, s_n,
                                                    s_m, MOVED, BLOCK_N)
                    g = _load_f32(g_ptr, offs, mask, G_DTYPE)
                    rf = tl.load(rf_ws + k, mask=rm, other=0.0)
                    u = ((rf[:, None] * cf[None, :]) * g) * bc2
                    acc += tl.where(mask, u * u, 0.0)
            sq_ws = ws + tl.load(meta + t * NCOL + K_WSQ)
            tl.store(sq_ws + local, tl.sum(tl.sum(acc, axis=1), axis=0))
        else:
            rp_ws = ws + tl.load(meta + t * NCOL + K_WRP)
            cp_ws = ws + tl.load(meta + t * NCOL + K_WCP)
            if PASS == 3:
                m_ptr = tl.load(meta + t * NCOL + K_M).to(tl.pointer_type(M_DTYPE))
                amax_ptr = tl.load(meta + t * NCOL + K_AMAX).to(tl.pointer_type(tl.float32))
                unit = tl.load(meta + t * NCOL + K_UNIT)
                rf_ws = ws + tl.load(meta + t * NCOL + K_WRF)
                cf_ws = ws + tl.load(meta + t * NCOL + K_WCF)
                bc2 = tl.load(fmeta + t * NFCOL + F_BC2)
                denom = tl.load(ws + tl.load(meta + t * NCOL + K_WDEN))
            for c0 in range(c_lo, c_hi, BLOCK_M):
                cols = c0 + tl.arange(0, BLOCK_M)
                cm = cols < c_hi
                col_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
                if PASS == 3:
                    cf = tl.load(cf_ws + b * m + cols, mask=cm, other=0.0)
                for i0 in range(r_lo, r_hi, BLOCK_N):
                    rows, rm, k, mask, offs = _tile(b, i0, cols, r_hi, cm, n, m, s_b, s_n,
                                                    s_m, MOVED, BLOCK_N)
                    g = _load_f32(g_ptr, offs, mask, G_DTYPE)
                    if PASS == 1:
                        val = g * g + eps1
                    else:
                        rf = tl.load(rf_ws + k, mask=rm, other=0.0)
                        u = tl.math.div_rn(((rf[:, None] * cf[None, :]) * (sign * g)) * bc2,
                                           denom)
                        if M_FMT == 2:
                            if IDX64:
                                block = offs // unit
                            else:
                                block = offs.to(tl.int32) // unit.to(tl.int32)
                        else:
                            block = offs
                        old = _decode(m_ptr, amax_ptr, offs, mask, block, M_FMT)
                        mv = old * b1 + a1 * u
                        if M_FMT == 0:
                            tl.store(m_ptr + offs, mv, mask=mask)
                        d = u - mv
                        val = d * d + eps2
                    val = tl.where(mask, val, 0.0)
                    col_acc += tl.sum(val, axis=0)
                    row_sum = tl.sum(val, axis=1)
                    # one writer per (column group, row): accumulate over this program's chunks
                    later = (rows * 0 + c0) > c_lo  # not this program's first column chunk
                    prev = tl.load(rp_ws + cg * big_n + k, mask=rm & later, other=0.0)
                    tl.store(rp_ws + cg * big_n + k, prev + row_sum, mask=rm)
                tl.store(cp_ws + pg * (nb * m) + b * m + cols, col_acc, mask=cm)

    @triton.jit
    def _stat_ema_kernel(meta, prog_map, ws, beta, one_minus_beta,
                         RES: tl.constexpr, BLOCK: tl.constexpr):
        """EMA of ``BLOCK`` rows or columns of a factored statistic (RES=0: r, c; RES=1: R, C)
        of one batch from the partial sums (added in a fixed order). A row chunk also writes
        the sum of its new row statistic (for the mean); a column chunk writes ``rsqrt(c)``."""
        t, local, nb, n, m = _locate(meta, prog_map, K_S_FIN)
        row_chunks = tl.cdiv(n, BLOCK)
        chunks = row_chunks + tl.cdiv(m, BLOCK)
        b = local // chunks
        j = local % chunks
        if RES == 0:
            row_ptr = tl.load(meta + t * NCOL + K_ROW).to(tl.pointer_type(tl.float32))
            col_ptr = tl.load(meta + t * NCOL + K_COL).to(tl.pointer_type(tl.float32))
            cf_ws = ws + tl.load(meta + t * NCOL + K_WCF)
        else:
            row_ptr = tl.load(meta + t * NCOL + K_RROW).to(tl.pointer_type(tl.float32))
            col_ptr = tl.load(meta + t * NCOL + K_RCOL).to(tl.pointer_type(tl.float32))
            cf_ws = ws + tl.load(meta + t * NCOL + K_WRCF)
        if j < row_chunks:
            n_cg = tl.load(meta + t * NCOL + K_CG)
            rp_ws = ws + tl.load(meta + t * NCOL + K_WRP)
            i = j * BLOCK + tl.arange(0, BLOCK)
            mask = i < n
            idx = b * n + i
            r = _ema_from_partials(row_ptr, rp_ws, n_cg, nb * n, idx, mask, m, beta,
                                   one_minus_beta, 0.0, BLOCK)
            rs_ws = ws + tl.load(meta + t * NCOL + K_WRS)
            tl.store(rs_ws + b * row_chunks + j, tl.sum(tl.where(mask, r, 0.0), axis=0))
        else:
            n_pg = tl.load(meta + t * NCOL + K_PG)
            cp_ws = ws + tl.load(meta + t * NCOL + K_WCP)
            i = (j - row_chunks) * BLOCK + tl.arange(0, BLOCK)
            mask = i < m
            idx = b * m + i
            c = _ema_from_partials(col_ptr, cp_ws, n_pg, nb * m, idx, mask, n, beta,
                                   one_minus_beta, 1.0, BLOCK)
            tl.store(cf_ws + idx, tl.math.div_rn(1.0, tl.sqrt_rn(c)), mask=mask)

    @triton.jit
    def _row_factor_kernel(meta, prog_map, ws, RES: tl.constexpr, BLOCK: tl.constexpr):
        """``rsqrt(r / mean(r))`` for ``BLOCK`` rows of one batch; the mean from the row
        chunks' sums, added in a fixed order (the same bits in every program)."""
        pid = tl.program_id(0)
        t = tl.load(prog_map + pid)
        local = pid - tl.load(meta + t * NCOL + K_S_FAC)
        n = tl.load(meta + t * NCOL + K_N)
        row_chunks = tl.cdiv(n, BLOCK)
        b = local // row_chunks
        j = local % row_chunks
        if RES == 0:
            row_ptr = tl.load(meta + t * NCOL + K_ROW).to(tl.pointer_type(tl.float32))
            rf_ws = ws + tl.load(meta + t * NCOL + K_WRF)
        else:
            row_ptr = tl.load(meta + t * NCOL + K_RROW).to(tl.pointer_type(tl.float32))
            rf_ws = ws + tl.load(meta + t * NCOL + K_WRRF)
        rs_ws = ws + tl.load(meta + t * NCOL + K_WRS) + b * row_chunks
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(0, row_chunks, BLOCK):
            k = c0 + tl.arange(0, BLOCK)
            acc += tl.load(rs_ws + k, mask=k < row_chunks, other=0.0)
        mean = tl.math.div_rn(tl.sum(acc, axis=0), n.to(tl.float32))
        i = j * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        r = tl.load(row_ptr + b * n + i, mask=mask, other=1.0)
        rf = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(r, mean)))
        tl.store(rf_ws + b * n + i, rf, mask=mask)

    @triton.jit
    def _denom_kernel(meta, fmeta, ws, clip, BLOCK: tl.constexpr):
        """The RMS clip divisor ``max(1, RMS(u) / d)`` of one tensor from its partial sums."""
        t = tl.program_id(0)
        sq_ws = ws + tl.load(meta + t * NCOL + K_WSQ)
        count = tl.load(meta + t * NCOL + K_SQCNT)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i0 in range(0, count, BLOCK):
            idx = i0 + tl.arange(0, BLOCK)
            acc += tl.load(sq_ws + idx, mask=idx < count, other=0.0)
        rms = tl.math.div_rn(tl.sqrt_rn(tl.sum(acc, axis=0)),
                             tl.load(fmeta + t * NFCOL + F_SQRTN))
        denom = tl.maximum(tl.math.div_rn(rms, clip), 1.0)
        tl.store(ws + tl.load(meta + t * NCOL + K_WDEN), denom)

    # -------------------------------------------------------------------- vector pass

    @triton.jit
    def _vector_kernel(meta, fmeta, prog_map, ws, eps1, b2, a2, sign,
                       G_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        """Vectors: ``v = b2 v + (1 - b2) (g^2 + eps1)`` and a partial sum of ``u^2``,
        ``u = g / sqrt(v)``, over ``BLOCK`` elements."""
        pid = tl.program_id(0)
        t = tl.load(prog_map + pid)
        local = pid - tl.load(meta + t * NCOL + K_S_VEC)
        numel = tl.load(meta + t * NCOL + K_NUMEL)
        g_ptr = tl.load(meta + t * NCOL + K_G).to(tl.pointer_type(G_DTYPE))
        v_ptr = tl.load(meta + t * NCOL + K_ROW).to(tl.pointer_type(tl.float32))
        offs = local * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = sign * _load_f32(g_ptr, offs, mask, G_DTYPE)
        v = tl.load(v_ptr + offs, mask=mask, other=1.0)
        v = v * b2 + a2 * (g * g + eps1)
        tl.store(v_ptr + offs, v, mask=mask)
        u = (tl.math.div_rn(1.0, tl.sqrt_rn(v)) * g) * tl.load(fmeta + t * NFCOL + F_BC2)
        sq_ws = ws + tl.load(meta + t * NCOL + K_WSQ)
        tl.store(sq_ws + local, tl.sum(tl.where(mask, u * u, 0.0), axis=0))

    # -------------------------------------------------------------------- the update

    @triton.jit
    def _update_kernel(meta, fmeta, prog_map, ws, lr_ptr, lr, decay, neg_wd, b1, a1, sign,
                       FACTORED: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                       M_FMT: tl.constexpr, M_DTYPE: tl.constexpr, LR_TENSOR: tl.constexpr,
                       HAS_DECAY: tl.constexpr, SR: tl.constexpr, QB: tl.constexpr,
                       UW: tl.constexpr, IDX64: tl.constexpr, MOVED: tl.constexpr):
        """Weight decay and the step over ``QB`` storage units of ``unit`` elements (an int8
        block; tile width ``UW``, a power of two >= unit), re-encoding the momentum."""
        pid = tl.program_id(0)
        t = tl.load(prog_map + pid)
        local = pid - tl.load(meta + t * NCOL + K_S_UPD)
        numel = tl.load(meta + t * NCOL + K_NUMEL)
        unit = tl.load(meta + t * NCOL + K_UNIT)
        units = local * QB + tl.arange(0, QB)
        lane = tl.arange(0, UW)
        offs = units[:, None] * unit + lane[None, :]
        mask = (lane[None, :] < unit) & (offs < numel)
        p_ptr = tl.load(meta + t * NCOL + K_P).to(tl.pointer_type(P_DTYPE))
        m_ptr = tl.load(meta + t * NCOL + K_M).to(tl.pointer_type(M_DTYPE))
        amax_ptr = tl.load(meta + t * NCOL + K_AMAX).to(tl.pointer_type(tl.float32))
        scale = tl.load(fmeta + t * NFCOL + F_SCALE)
        if FACTORED:
            m = tl.load(meta + t * NCOL + K_MC)
            n = tl.load(meta + t * NCOL + K_N)
            if MOVED:  # coordinates in the (B, n, m) view: (offset // stride) % size
                s_b = tl.load(meta + t * NCOL + K_SB)
                s_n = tl.load(meta + t * NCOL + K_SN)
                s_m = tl.load(meta + t * NCOL + K_SM)
                nb = tl.load(meta + t * NCOL + K_B)
                bi = (offs // s_b) % nb
                k = bi * n + (offs // s_n) % n
                colidx = bi * m + (offs // s_m) % m
            elif IDX64:
                k = offs // m
                colidx = (k // n) * m + (offs - k * m)
            else:  # 32-bit divisions: several times cheaper than 64-bit ones on GPUs
                o32, m32 = offs.to(tl.int32), m.to(tl.int32)
                k = o32 // m32
                colidx = (k // n.to(tl.int32)) * m32 + (o32 - k * m32)
            rrf = tl.load(ws + tl.load(meta + t * NCOL + K_WRRF) + k, mask=mask, other=0.0)
            rcf = tl.load(ws + tl.load(meta + t * NCOL + K_WRCF) + colidx, mask=mask,
                          other=0.0)
        if FACTORED and M_FMT == 0:
            mv = tl.load(m_ptr + offs, mask=mask, other=0.0)  # pass 3 stored the new m
        else:
            g_ptr = tl.load(meta + t * NCOL + K_G).to(tl.pointer_type(G_DTYPE))
            g = sign * _load_f32(g_ptr, offs, mask, G_DTYPE)
            bc2 = tl.load(fmeta + t * NFCOL + F_BC2)
            denom = tl.load(ws + tl.load(meta + t * NCOL + K_WDEN))
            if FACTORED:
                rf = tl.load(ws + tl.load(meta + t * NCOL + K_WRF) + k, mask=mask, other=0.0)
                cf = tl.load(ws + tl.load(meta + t * NCOL + K_WCF) + colidx, mask=mask,
                             other=0.0)
                u = tl.math.div_rn(((rf * cf) * g) * bc2, denom)
            else:
                v_ptr = tl.load(meta + t * NCOL + K_ROW).to(tl.pointer_type(tl.float32))
                v = tl.load(v_ptr + offs, mask=mask, other=1.0)
                u = tl.math.div_rn((tl.math.div_rn(1.0, tl.sqrt_rn(v)) * g) * bc2, denom)
            old = _decode(m_ptr, amax_ptr, offs, mask, units[:, None], M_FMT)
            mv = old * b1 + a1 * u
        if FACTORED:
            delta = ((rrf * rcf) * mv) * scale
        else:
            delta = mv * scale
        if LR_TENSOR:
            lr_value = tl.load(lr_ptr).to(tl.float32)
        else:
            lr_value = lr
        pv = _load_f32(p_ptr, offs, mask, P_DTYPE)
        if HAS_DECAY:
            if LR_TENSOR:
                if SR:
                    decay_value = neg_wd * lr_value
                else:  # the reference's addcmul_ with lr cast to the parameter's dtype
                    decay_value = neg_wd * _upcast(_round_nearest(lr_value, P_DTYPE), P_DTYPE)
            else:
                decay_value = decay
            pv = pv + decay_value * pv
            if not SR:
                pv = _upcast(_round_nearest(pv, P_DTYPE), P_DTYPE)
        new = pv - delta * lr_value
        if SR:
            seed = tl.load(meta + t * NCOL + K_SEED)
            bits = tl.randint(seed, offs)
            tl.store(p_ptr + offs, _stochastic_round(new, bits, P_DTYPE), mask=mask)
        else:
            tl.store(p_ptr + offs, _round_nearest(new, P_DTYPE), mask=mask)
        # store the new momentum in its format
        if M_FMT == 1:
            tl.store(m_ptr + offs, _round_nearest(mv, tl.bfloat16), mask=mask)
        elif M_FMT == 2:
            amax = tl.max(tl.where(mask, tl.abs(mv), 0.0), axis=1)
            inv = tl.where(amax > 0.0, tl.math.div_rn(1.0, tl.where(amax > 0.0, amax, 1.0))
                           * 127.0, 0.0)
            code = (mv * inv[:, None] + MAGIC) - MAGIC  # round half to even, as torch.round
            code = tl.minimum(tl.maximum(code, -127.0), 127.0)
            tl.store(m_ptr + offs, code.to(tl.int8), mask=mask)
            n_units = (numel + unit - 1) // unit
            tl.store(amax_ptr + units, amax, mask=units < n_units)
        elif not FACTORED:
            tl.store(m_ptr + offs, mv, mask=mask)


# ------------------------------------------------------------------------------ host side


def traffic_bytes(numel: int, param_dtype: torch.dtype, grad_dtype: torch.dtype, momentum: str,
                  factored: bool, block_size: int = 256) -> float:
    """Bytes one step of these kernels moves to and from memory for one tensor.

    The table of the module docstring; scratch and the O(rows + cols) statistics are not
    counted. Benchmarks divide the sum over a model by the step time to get the achieved
    bandwidth.

    Args:
        numel: elements of the parameter.
        param_dtype, grad_dtype: dtypes of the parameter and its gradient.
        momentum: the layout's momentum format (``"float32"``, ``"bfloat16"``, ``"int8"``).
        factored: whether the layout keeps factored statistics.
        block_size: int8 block size (one float32 scale per block).

    Returns:
        The bytes read and written, as a float.
    """
    p = torch.empty((), dtype=param_dtype).element_size()
    g = torch.empty((), dtype=grad_dtype).element_size()
    m = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0 + 4.0 / block_size}[momentum]
    if factored:
        per = (3 * g + 3 * m if momentum == "float32" else 4 * g + 3 * m) + 2 * p
    else:
        per = 2 * g + 12 + 2 * m + 2 * p
    return per * numel



def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _moved_view(param: Tensor, dims: tuple[int, int]) -> Tensor | None:
    """``param`` with its factored ``dims`` moved last, as a ``(B, n, m)`` view (no copy), or
    ``None`` when its other dims cannot merge into one batch dim."""
    moved = param.movedim(dims, (-2, -1))
    try:
        return moved.view(-1, moved.shape[-2], moved.shape[-1])
    except RuntimeError:
        return None


def _fallback_reason(param: Tensor, grad: Tensor, layout) -> str | None:
    """Why the kernels cannot step this tensor, from its dtypes and layout alone (``None``
    when they can); :func:`_state_fallback_reason` looks at its state."""
    if param.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"{param.dtype} parameters"
    if grad.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"{grad.dtype} gradients"
    if layout.moved(param.dim()) and _moved_view(param, layout.factored_dims) is None:
        return "factored dims other than the last two whose other dims do not merge into one"
    if layout.compute_dtype != torch.float32:
        return f"compute dtype {layout.compute_dtype}"
    return None


def _state_fallback_reason(param: Tensor, grad: Tensor, state: dict, layout) -> str | None:
    """Why the kernels cannot step this tensor's (layout-checked) state: memory layout and
    device (``None`` when they can)."""
    keys = (("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col")
            if layout.factored else ("exp_avg_sq",))
    tensors = [param, state["exp_avg"], *(state[k] for k in keys)]
    if layout.quantized:
        tensors.append(state["exp_avg_absmax"])
    if not all(t.is_contiguous() for t in tensors):
        return "non-contiguous parameters or states"
    if any(t.device != param.device for t in [grad, *tensors]):
        return "state on another device than its parameter"
    return None


def _check_layout(param: Tensor, state: dict, layout) -> None:
    expected = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
    if layout.momentum not in expected:
        raise ValueError(f"torchcame triton: unknown momentum format {layout.momentum!r}")
    if state["exp_avg"].dtype != expected[layout.momentum]:
        raise ValueError(f"torchcame triton: state exp_avg is {state['exp_avg'].dtype} but the "
                         f"layout says {layout.momentum!r} momentum")
    if layout.quantized:
        blocks = -(-param.numel() // layout.block_size)
        if state["exp_avg_absmax"].numel() != blocks:
            raise ValueError("torchcame triton: int8 momentum needs one exp_avg_absmax per "
                             f"block ({blocks}), got {state['exp_avg_absmax'].numel()}")


_map_cache: dict[tuple, Tensor] = {}


def _program_map(counts: list[int], device: torch.device) -> Tensor:
    """int32 tensor: for each program, the index of its tensor (cached per ``counts``)."""
    key = (tuple(counts), device)
    cached = _map_cache.get(key)
    if cached is None:
        if len(_map_cache) > 256:
            _map_cache.clear()
        cached = torch.repeat_interleave(
            torch.arange(len(counts), dtype=torch.int32),
            torch.tensor(counts, dtype=torch.int64),
        ).to(device)
        _map_cache[key] = cached
    return cached


def _tensor_seed(seed: int, i: int) -> int:
    """A per-tensor Philox key from the call's seed (a 64-bit mix; non-negative int64)."""
    x = (seed * 0x9E3779B97F4A7C15 + (i + 1) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 29
    return x & (2**63 - 1)


def _launch(name: str, kernel, grid: int, *args, num_warps: int = 4, **kwargs) -> None:
    if grid <= 0:
        return
    kernel[(grid,)](*args, enable_fp_fusion=False, num_warps=num_warps, **kwargs)
    LAUNCHES[name] += 1


def plan_groups(params: list[Tensor], grads: list[Tensor], states: list[dict], args: StepArgs,
                layouts: list) -> tuple[dict[tuple, list[int]], list[int], int | None]:
    """Sort tensors into launch groups; nothing is changed.

    Returns:
        ``(groups, fallback, seed)``: group key -> indices of its tensors; the indices the
        kernels do not handle (a one-time warning names why); the call's stochastic-rounding
        seed (one draw of torch's default generator, or ``None``). Zero-size tensors are in
        neither.

    Raises:
        ValueError: a tensor on a device the kernels cannot run on, or a state that does not
            match its layout.
    """
    if triton is None:
        raise RuntimeError(f"torchcame: triton is not importable ({_TRITON_ERROR})")
    for param in params:
        if not (param.device.type == "cuda" or (param.device.type == "cpu" and _INTERPRETED)):
            raise ValueError(f"torchcame: the Triton step cannot run on {param.device} tensors "
                             "(CUDA, or CPU under TRITON_INTERPRET=1 set before import)")
    groups: dict[tuple, list[int]] = defaultdict(list)
    fallback: list[int] = []
    for i, (param, grad, state, layout) in enumerate(zip(params, grads, states, layouts,
                                                         strict=True)):
        if param.numel() == 0:
            continue
        reason = _fallback_reason(param, grad, layout)
        if reason is None:  # (the reference path checks its own state)
            _check_layout(param, state, layout)
            reason = _state_fallback_reason(param, grad, state, layout)
        if reason is not None:
            _warn_once(f"torchcame: the Triton fused step does not handle {reason}; those "
                       "tensors run the reference (single-tensor) path")
            fallback.append(i)
            continue
        moved = layout.moved(param.dim())
        if layout.factored:
            block_m = min(_next_pow2(param.shape[layout.factored_dims[1]]), MAX_BLOCK_M)
        else:
            block_m = 0
        unit = layout.block_size if layout.quantized else FLAT_BLOCK
        key = (param.device, param.dtype, grad.dtype, layout.momentum, layout.factored,
               block_m, unit, moved)
        groups[key].append(i)
    seed = None
    if args.stochastic_rounding and any(key[1] != torch.float32 for key in groups):
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # one draw per call
    return dict(groups), fallback, seed


def step_triton(params: list[Tensor], grads: list[Tensor], states: list[dict],
                args: StepArgs, layouts: list) -> None:
    """One CAME step for each ``(param, grad, state)``, in place, with Triton kernels.

    The caller has already counted the step (``state["step"]`` is this step's t). Tensors
    the kernels do not handle (see the module docstring) are stepped by the reference path,
    with a one-time warning; zero-size tensors are skipped.

    Raises:
        ValueError: a tensor on a device the kernels cannot run on (anything but CUDA, or
            CPU under the interpreter), or a state that does not match its layout; raised
            before anything is changed.

    Args:
        params: parameters (float32, bf16 or fp16; contiguous).
        grads: their gradients (any float dtype; copied when non-contiguous).
        states: per-parameter states, laid out as ``layouts`` say.
        args: the group's hyperparameters.
        layouts: one :class:`torchcame.state.StateLayout` per parameter.
    """
    groups, fallback, seed = plan_groups(params, grads, states, args, layouts)
    for key, idx in groups.items():
        TritonGroup(key, [params[i] for i in idx], [grads[i] for i in idx],
                    [states[i] for i in idx], [layouts[i] for i in idx], idx, args,
                    seed).run()
    if fallback:
        from .reference import step_single_tensor

        step_single_tensor([params[i] for i in fallback], [grads[i] for i in fallback],
                           [states[i] for i in fallback], args, [layouts[i] for i in fallback])


class TritonGroup:
    """One launch group of :func:`plan_groups`: its per-tensor table, its workspace and its
    launches, one method each.

    :meth:`run` is the single-process step: every launch in order. The sharded step of
    :mod:`torchcame.distributed` (FSDP2/TP local shards) runs only the passes over the
    tensors (:meth:`pass1`, :meth:`pass2`, :meth:`pass3`, :meth:`vector`, :meth:`update`)
    and does the O(rows + cols) work between them itself: it reads each tensor's local
    partial sums (:meth:`factored_sums`, :meth:`sq_sum`), reduces them across ranks, and
    writes back the factors and the clip divisor (:meth:`set_factors`, :meth:`set_denom`)
    that the next pass reads.
    """

    def __init__(self, key: tuple, params: list[Tensor], grads: list[Tensor],
                 states: list[dict], layouts: list, indices: list[int], args: StepArgs,
                 seed: int | None) -> None:
        device, p_dtype, g_dtype, momentum, factored, block_m, unit, moved = key
        self.device, self.factored, self.args = device, factored, args
        grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
        self._keep = (params, grads, states)  # the table holds their pointers
        beta1, beta2, beta3 = args.betas
        fmt = _FMT[momentum]
        M_DTYPE = (tl.float32, tl.bfloat16, tl.int8)[fmt]
        tl_dtype = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                    torch.float16: tl.float16}
        P_DTYPE, G_DTYPE = tl_dtype[p_dtype], tl_dtype.get(g_dtype)
        if G_DTYPE is None:
            raise TypeError(f"torchcame triton: unsupported gradient dtype {g_dtype}")
        block_n = max(1, TILE // block_m) if factored else 0
        sr = bool(args.stochastic_rounding) and p_dtype != torch.float32
        idx64 = max(p.numel() for p in params) + UPDATE_TILE >= 2**31  # element offsets
        unit_w = _next_pow2(unit)  # the update's tile width; one int8 block per tile row
        qb = max(1, UPDATE_TILE // unit_w)

        rows: list[list[int]] = []
        frows: list[list[float]] = []
        counts_tile: list[int] = []
        counts_fin: list[int] = []
        counts_fac: list[int] = []
        counts_upd: list[int] = []
        counts_vec: list[int] = []
        ws_size = 0
        for j, (p, g, st, lay) in enumerate(zip(params, grads, states, layouts)):
            numel = p.numel()
            row = [0] * _NCOL
            row[_C_P], row[_C_G] = p.data_ptr(), g.data_ptr()
            row[_C_M] = st["exp_avg"].data_ptr()
            row[_C_AMAX] = st["exp_avg_absmax"].data_ptr() if lay.quantized else 0
            row[_C_NUMEL], row[_C_UNIT] = numel, unit
            row[_C_SEED] = _tensor_seed(seed, indices[j]) if seed is not None else 0
            t = 1.0
            if args.bias_correction:
                t = float(st["step"])
            if factored:
                view = _moved_view(p, lay.factored_dims) if moved else p.view(-1, *p.shape[-2:])
                nb, n, m = (int(d) for d in view.shape)
                row[_C_SB], row[_C_SN], row[_C_SM] = (max(1, int(d)) for d in view.stride())
                pg = min(_cdiv(n, max(block_n, MIN_GROUP_ROWS)), MAX_ROW_GROUPS)
                rpp = -(-n // pg)
                pg = -(-n // rpp)
                chunks = -(-m // block_m)
                cg = min(chunks, MAX_COL_GROUPS)
                cpp = -(-chunks // cg) * block_m
                cg = -(-m // cpp)
                row[_C_ROW] = st["exp_avg_sq_row"].data_ptr()
                row[_C_COL] = st["exp_avg_sq_col"].data_ptr()
                row[_C_RROW] = st["exp_avg_res_row"].data_ptr()
                row[_C_RCOL] = st["exp_avg_res_col"].data_ptr()
                row[_C_B], row[_C_N], row[_C_MC] = nb, n, m
                row[_C_PG], row[_C_CG], row[_C_RPP], row[_C_CPP] = pg, cg, rpp, cpp
                row_chunks = _cdiv(n, FINALIZE_BLOCK)
                sizes = [cg * nb * n, pg * nb * m, nb * n, nb * m, nb * n, nb * m, nb * pg * cg,
                         1, nb * row_chunks]
                cols = [_C_WRP, _C_WCP, _C_WRF, _C_WCF, _C_WRRF, _C_WRCF, _C_WSQ, _C_WDEN,
                        _C_WRS]
                row[_C_SQCNT] = nb * pg * cg
                counts_tile.append(nb * pg * cg)
                counts_fin.append(nb * (row_chunks + _cdiv(m, FINALIZE_BLOCK)))
                counts_fac.append(nb * row_chunks)
                bc2 = math.sqrt(1.0 - beta2**t) if args.bias_correction else 1.0
                scale = ((1.0 / (1.0 - beta1**t)) * math.sqrt(1.0 - beta3**t)
                         if args.bias_correction else 1.0)
            else:
                row[_C_ROW] = st["exp_avg_sq"].data_ptr()
                nvec = -(-numel // FLAT_BLOCK)
                sizes, cols = [nvec, 1], [_C_WSQ, _C_WDEN]
                row[_C_SQCNT] = nvec
                counts_vec.append(nvec)
                bc2 = math.sqrt(1.0 - beta2**t) if args.bias_correction else 1.0
                scale = 1.0 / (1.0 - beta1**t) if args.bias_correction else 1.0
            for col, size in zip(cols, sizes):
                row[col] = ws_size
                ws_size += size
            counts_upd.append(_cdiv(_cdiv(numel, unit), qb))
            rows.append(row)
            frows.append([bc2, scale, math.sqrt(float(numel))])
        for col, counts in ((_C_S_TILE, counts_tile), (_C_S_FIN, counts_fin),
                            (_C_S_FAC, counts_fac), (_C_S_UPD, counts_upd),
                            (_C_S_VEC, counts_vec)):
            start = 0
            for row, c in zip(rows, counts):
                row[col] = start
                start += c
        self.rows = rows
        self.meta = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
        self.fmeta = torch.tensor(frows, dtype=torch.float32).to(device, non_blocking=True)
        self.ws = torch.empty(ws_size, dtype=torch.float32, device=device)
        self._sign = -1.0 if args.maximize else 1.0
        self._common = dict(P_DTYPE=P_DTYPE, G_DTYPE=G_DTYPE, M_FMT=fmt, M_DTYPE=M_DTYPE,
                            BLOCK_N=block_n, BLOCK_M=block_m, IDX64=idx64, MOVED=moved)
        self._update_consts = dict(FACTORED=factored, P_DTYPE=P_DTYPE, G_DTYPE=G_DTYPE,
                                   M_FMT=fmt, M_DTYPE=M_DTYPE, SR=sr, QB=qb, UW=unit_w,
                                   IDX64=idx64, MOVED=moved)
        self._maps = {}
        for name, counts in (("tile", counts_tile), ("fin", counts_fin), ("fac", counts_fac),
                             ("upd", counts_upd), ("vec", counts_vec)):
            if counts:
                self._maps[name] = (_program_map(counts, device), int(sum(counts)))

    def _guard(self):
        # triton launches on the current device: make it the tensors' one
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    def run(self) -> None:
        """The whole step: every launch, in order."""
        if self.factored:
            self.pass1()
            self.statistics(0)  # r, c and their factors
            self.pass2()
            self.denom()
            self.pass3()
            self.statistics(1)  # R, C and their factors
        else:
            self.vector()
            self.denom()
        self.update()

    # the launches ------------------------------------------------------------------------

    def _rowtile(self, name: str, pass_: int) -> None:
        beta1 = self.args.betas[0]
        eps1, eps2 = self.args.eps
        prog_map, grid = self._maps["tile"]
        with self._guard():
            _launch(name, _rowtile_kernel, grid, self.meta, self.fmeta, prog_map, self.ws,
                    eps1, eps2, beta1, 1.0 - beta1, self._sign, PASS=pass_, **self._common)

    def pass1(self) -> None:
        """Factored: per-group partial row and column sums of ``G = g^2 + eps1``."""
        self._rowtile("pass1", 1)

    def pass2(self) -> None:
        """Factored: partial sums of ``u^2``, from the factors of ``r`` and ``c``."""
        self._rowtile("pass2", 2)

    def pass3(self) -> None:
        """Factored: the new momentum and partial row and column sums of ``U``."""
        self._rowtile("pass3", 3)

    def statistics(self, res: int) -> None:
        """Factored: the EMAs of ``r, c`` (``res=0``) or ``R, C`` (``res=1``) from the local
        partial sums, and their factors (two launches)."""
        beta = self.args.betas[2 if res else 1]
        fin_map, n_fin = self._maps["fin"]
        fac_map, n_fac = self._maps["fac"]
        with self._guard():
            _launch("stat_ema", _stat_ema_kernel, n_fin, self.meta, fin_map, self.ws, beta,
                    1.0 - beta, RES=res, BLOCK=FINALIZE_BLOCK)
            _launch("row_factor", _row_factor_kernel, n_fac, self.meta, fac_map, self.ws,
                    RES=res, BLOCK=FINALIZE_BLOCK)

    def vector(self) -> None:
        """Vectors: the ``v`` EMA and partial sums of ``u^2``."""
        beta2 = self.args.betas[1]
        vec_map, grid = self._maps["vec"]
        with self._guard():
            _launch("vector", _vector_kernel, grid, self.meta, self.fmeta, vec_map, self.ws,
                    self.args.eps[0], beta2, 1.0 - beta2, self._sign, G_DTYPE=self._common[
                        "G_DTYPE"], BLOCK=FLAT_BLOCK)

    def denom(self) -> None:
        """Each tensor's RMS-clip divisor from its own partial sums of ``u^2``."""
        with self._guard():
            _launch("denom", _denom_kernel, len(self.rows), self.meta, self.fmeta, self.ws,
                    float(self.args.clip_threshold), BLOCK=256)

    def update(self) -> None:
        """Weight decay, the parameter step and the stored momentum."""
        args, device = self.args, self.device
        beta1 = args.betas[0]
        lr = args.lr
        lr_tensor = isinstance(lr, Tensor)
        if lr_tensor:
            lr_arg = lr.detach()
            if lr_arg.device != device or lr_arg.dtype not in (torch.float32, torch.float64):
                lr_arg = lr_arg.to(device=device, dtype=torch.float64)
            lr_float, decay = 0.0, 0.0
        else:
            lr_arg = self.ws  # unused (LR_TENSOR=False)
            lr_float = float(lr)
            decay = -float(args.weight_decay) * float(lr)  # formed in float64, as the reference
        upd_map, grid = self._maps["upd"]
        with self._guard():
            _launch("update", _update_kernel, grid, self.meta, self.fmeta, upd_map, self.ws,
                    lr_arg, lr_float, decay, -float(args.weight_decay), beta1, 1.0 - beta1,
                    self._sign, LR_TENSOR=lr_tensor, HAS_DECAY=args.weight_decay != 0,
                    num_warps=8, **self._update_consts)

    # the sharded step's view of the workspace ---------------------------------------------

    def _span(self, j: int, col: int, size: int) -> Tensor:
        start = self.rows[j][col]
        return self.ws[start : start + size]

    def factored_sums(self, j: int) -> tuple[Tensor, Tensor]:
        """Tensor ``j``'s row sums ``(B n,)`` and column sums ``(B m,)`` of its local values
        after :meth:`pass1` (``G``) or :meth:`pass3` (``U``), from the partial sums."""
        row = self.rows[j]
        nb, n, m, pg, cg = row[_C_B], row[_C_N], row[_C_MC], row[_C_PG], row[_C_CG]
        rows = self._span(j, _C_WRP, cg * nb * n).view(cg, nb * n).sum(dim=0)
        cols = self._span(j, _C_WCP, pg * nb * m).view(pg, nb * m).sum(dim=0)
        return rows, cols

    def sq_sum(self, j: int) -> Tensor:
        """Tensor ``j``'s local ``sum u^2`` after :meth:`pass2` or :meth:`vector` (1 element)."""
        return self._span(j, _C_WSQ, self.rows[j][_C_SQCNT]).sum().reshape(1)

    def set_factors(self, j: int, res: int, row_factor: Tensor, col_factor: Tensor) -> None:
        """Write tensor ``j``'s factors ``rsqrt(r / mean r)`` and ``rsqrt(c)`` (``res=0``,
        read by :meth:`pass2`, :meth:`pass3`) or those of ``R, C`` (``res=1``, read by
        :meth:`update`)."""
        row = self.rows[j]
        nb, n, m = row[_C_B], row[_C_N], row[_C_MC]
        rcol, ccol = (_C_WRRF, _C_WRCF) if res else (_C_WRF, _C_WCF)
        self._span(j, rcol, nb * n).copy_(row_factor.reshape(-1))
        self._span(j, ccol, nb * m).copy_(col_factor.reshape(-1))

    def set_denom(self, j: int, denom: Tensor) -> None:
        """Write tensor ``j``'s RMS-clip divisor ``max(1, RMS(u) / d)`` (read by :meth:`pass3`
        and :meth:`update`)."""
        self._span(j, _C_WDEN, 1).copy_(denom.reshape(1))

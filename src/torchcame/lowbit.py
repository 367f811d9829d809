"""Low-precision optimizer state and parameters: block-wise 8-bit / bf16 momentum, stochastic
rounding.

CAME's only full-size state is the momentum ``m``; every other statistic is O(n + m) and stays
float32. ``momentum_dtype`` chooses how ``m`` is stored between steps:

* ``torch.float32`` (default): as the reference does (the parameter's compute dtype).
* ``torch.bfloat16``: rounded to nearest bf16 after each step (2 bytes per element).
* ``"int8"``: block-wise absmax quantization over blocks of ``block_size`` consecutive
  elements of the flattened tensor, one float32 scale per block (Dettmers et al., "8-bit
  Optimizers via Block-wise Quantization", ICLR 2022). A code ``q`` in [-127, 127] stands for
  ``q / 127 * absmax``; the error of any element is at most ``absmax / 254`` of its block.

The math of a step always uses this step's float32 ``m``: the instability ``(û - m)²`` and the
update ``m / sqrt(Ŝ)`` use it before it is stored back. The multi-tensor and reference paths
hold it as a float32 copy (a chunk of tensors at a time); the fused CPU kernel recomputes it
a block at a time and never stores it at full size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "n_blocks",
    "quantize_blockwise",
    "dequantize_blockwise",
    "block_absmax",
    "load_momentum",
    "store_momentum_",
    "stochastic_round_",
]

_QMAX = 127.0


def _blocks(x: Tensor, block_size: int, offset: int = 0) -> Tensor:
    """``x`` flattened and zero-padded to a ``(n_blocks, block_size)`` view.

    ``offset``: where ``x``'s first element sits in its first block (a slice of a larger
    tensor that starts inside a block, as a ZeRO partition does); that many zeros go first.
    """
    flat = x.reshape(-1)
    pad = (-(offset + flat.numel())) % block_size
    if pad or offset:
        flat = F.pad(flat, (offset, pad))
    return flat.view(-1, block_size)


def n_blocks(numel: int, block_size: int) -> int:
    """Number of quantization blocks of a tensor with ``numel`` elements."""
    return math.ceil(numel / block_size)


def block_absmax(x: Tensor, block_size: int, offset: int = 0) -> Tensor:
    """The float32 absmax of each block of ``x`` (``offset`` as in :func:`quantize_blockwise`)."""
    return _blocks(x.float(), block_size, offset).abs().amax(dim=1)


def quantize_blockwise(x: Tensor, block_size: int, offset: int = 0,
                       absmax: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` to int8 codes of its shape and one float32 absmax per block.

    Rounds to nearest; all-zero blocks get scale 0 and codes 0. ``offset``: ``x`` is a slice
    of a larger tensor starting ``offset`` elements into its first block, so its first and
    last blocks may be partial. ``absmax``: the scales to use (a partial block's absmax over
    the whole block, from every rank holding part of it) instead of ``x``'s own.
    """
    blocks = _blocks(x.float(), block_size, offset)
    if absmax is None:
        absmax = blocks.abs().amax(dim=1)
    inv_scale = torch.where(absmax > 0, _QMAX / absmax, torch.zeros_like(absmax))
    codes = (blocks * inv_scale.unsqueeze(1)).round_().clamp_(-_QMAX, _QMAX).to(torch.int8)
    return codes.reshape(-1)[offset : offset + x.numel()].view(x.shape), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, block_size: int,
                         offset: int = 0) -> Tensor:
    """Inverse of :func:`quantize_blockwise`: a float32 tensor of ``codes``' shape."""
    blocks = _blocks(codes, block_size, offset).float()
    values = blocks.mul_((absmax.reshape(-1) / _QMAX).unsqueeze(1))
    return values.reshape(-1)[offset : offset + codes.numel()].view(codes.shape)


def load_momentum(state: dict, momentum: str, block_size: int, dtype: torch.dtype,
                  offset: int = 0) -> Tensor:
    """The momentum ``m`` as a ``dtype`` tensor to compute with.

    ``momentum`` is the state's storage format (``StateLayout.momentum``). For ``"float32"``
    (the compute dtype) this is the state tensor itself, updated in place; for ``"bfloat16"``
    and ``"int8"`` a new tensor, to be written back by :func:`store_momentum_`. ``offset``:
    int8 blocks of a slice (:func:`quantize_blockwise`).
    """
    exp_avg = state["exp_avg"]
    if momentum == "int8":
        return dequantize_blockwise(exp_avg, state["exp_avg_absmax"], block_size,
                                    offset).to(dtype)
    if momentum == "bfloat16":
        return exp_avg.to(dtype)
    return exp_avg


def store_momentum_(state: dict, momentum_value: Tensor, momentum: str, block_size: int,
                    offset: int = 0, absmax: Tensor | None = None) -> None:
    """Write the float ``momentum_value`` back into the state's storage format ``momentum``.

    ``offset`` and ``absmax``: int8 blocks of a slice and their scales
    (:func:`quantize_blockwise`).
    """
    exp_avg = state["exp_avg"]
    if momentum == "int8":
        codes, absmax = quantize_blockwise(momentum_value, block_size, offset, absmax)
        exp_avg.copy_(codes)
        state["exp_avg_absmax"].copy_(absmax.view(state["exp_avg_absmax"].shape))
    elif momentum_value is not exp_avg:
        exp_avg.copy_(momentum_value)


def stochastic_round_(dst: Tensor, src: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round float32 ``src`` into lower-precision ``dst`` stochastically, in place.

    Each element becomes one of its two neighbours in ``dst.dtype`` with probabilities
    proportional to closeness, so ``E[dst] == src``: updates far below the format's resolution
    (and weight decay) survive in expectation instead of vanishing as with round-to-nearest.
    Works for bfloat16 and float16 (any floating dtype coarser than float32).
    """
    src = src.float()
    nearest = src.to(dst.dtype)
    near32 = nearest.float()
    # the other neighbour: one step of dst.dtype away from `nearest`, towards src
    direction = torch.where(src > near32, torch.full_like(near32, math.inf),
                            torch.full_like(near32, -math.inf))
    other = torch.nextafter(nearest, direction.to(dst.dtype))
    other32 = other.float()
    gap = other32 - near32
    # probability of taking `other` = distance from nearest / gap (0 when exact)
    p_other = torch.where(gap != 0, (src - near32) / gap, torch.zeros_like(src))
    u = torch.rand(src.shape, generator=generator, device=src.device, dtype=torch.float32)
    choose_other = (u < p_other) & torch.isfinite(other32)
    return dst.copy_(torch.where(choose_other, other, nearest))

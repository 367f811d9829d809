"""Pieces shared by every CAME step implementation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype CAME's math and statistics use for a parameter of ``param_dtype``.

    float16/bfloat16 parameters are computed and stored in float32 (as the spec and the
    reference do); float32 and float64 parameters in their own dtype.
    """
    return torch.float32 if param_dtype in _LOW_PRECISION else param_dtype


@dataclass(frozen=True)
class StepArgs:
    """The hyperparameters of one param group's step, validated by the caller."""

    lr: float | Tensor
    betas: tuple[float, float, float]
    eps: tuple[float, float]
    clip_threshold: float
    weight_decay: float
    maximize: bool = False
    # opt-in extensions (defaults reproduce the paper's rule exactly)
    block_size: int = 256  # elements per scale of int8 momentum
    stochastic_rounding: bool = False  # bf16/fp16 params: round the new weight stochastically
    bias_correction: bool = False  # Adam-style bias correction of m, v and the instability
    factor_dims: str = "last_two"  # which two dims a >= 2-d tensor is factored over
    factor_min_dim: int = 1  # "largest" policy: factor only if both dims are at least this

    @property
    def extended(self) -> bool:
        """Whether an opt-in option that changes the step's arithmetic is on."""
        return self.stochastic_rounding or self.bias_correction or self.factor_dims != "last_two"

"""CAME's per-parameter state: the resolved layout, creation, and state-dict checks.

Every fact about how a parameter's state is stored lives here, decided once when the state is
created and recorded as a :class:`StateLayout`. Implementations receive the layout; none of
them re-derives it from tensor dtypes or shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["StateLayout", "MOMENTUM_FORMATS", "resolve_layout"]

#: How the momentum ``m`` is stored between steps. ``"float32"`` means the compute dtype
#: (float32, or float64 for float64 parameters); ``"bfloat16"`` rounds to nearest bf16;
#: ``"int8"`` is block-wise absmax 8-bit (``exp_avg`` codes + ``exp_avg_absmax`` scales).
MOMENTUM_FORMATS = ("float32", "bfloat16", "int8")


@dataclass(frozen=True)
class StateLayout:
    """How one parameter's state is laid out; fixed when the state is created.

    Attributes:
        momentum: one of :data:`MOMENTUM_FORMATS`.
        block_size: elements per int8 block (meaningful for ``momentum == "int8"`` only).
        factored_dims: the two dims the second moment and the instability are factored over
            (``(ndim - 2, ndim - 1)`` for the reference rule), or ``None`` for a full second
            moment and no confidence statistic (vectors, scalars).
        compute_dtype: the dtype of the step's math and of every statistic.
    """

    momentum: str
    block_size: int
    factored_dims: tuple[int, int] | None
    compute_dtype: torch.dtype

    @property
    def factored(self) -> bool:
        """Whether the tensor keeps factored (row/column) statistics."""
        return self.factored_dims is not None

    @property
    def quantized(self) -> bool:
        """Whether the momentum is stored as int8 codes and block scales."""
        return self.momentum == "int8"

    def moved(self, ndim: int) -> bool:
        """Whether the factored dims are not the last two (statistics refer to a movedim)."""
        return self.factored_dims is not None and self.factored_dims != (ndim - 2, ndim - 1)


def resolve_layout(
    param: torch.Tensor,
    *,
    momentum_dtype: str = "float32",
    block_size: int = 256,
    min_quantized_numel: int = 4096,
    factor_dims: str = "last_two",
    factor_min_dim: int = 1,
) -> StateLayout:
    """The layout of ``param``'s state under the given (validated) options.

    int8 momentum applies to tensors of at least two dims and ``min_quantized_numel``
    elements; vectors and smaller tensors keep the compute dtype. Factoring follows
    :func:`torchcame._factored.factored_dims`.
    """
    from ._factored import factored_dims
    from ._impl.common import compute_dtype

    shape = tuple(param.shape)
    momentum = momentum_dtype
    if momentum == "int8" and (len(shape) < 2 or param.numel() < min_quantized_numel):
        momentum = "float32"
    return StateLayout(
        momentum=momentum,
        block_size=block_size,
        factored_dims=factored_dims(shape, factor_dims, factor_min_dim),
        compute_dtype=compute_dtype(param.dtype),
    )

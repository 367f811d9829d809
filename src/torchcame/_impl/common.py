"""Names shared by the implementations (kept importable from here for older callers)."""

from __future__ import annotations

from .._factored import compute_dtype
from ..options import StepArgs

__all__ = ["StepArgs", "compute_dtype"]

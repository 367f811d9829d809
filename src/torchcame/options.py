"""Every CAME hyperparameter and option, defined once.

Each :class:`Option` gives a name, its default, the check that validates (and normalizes) a
value, one line of documentation, and its *role*:

* ``"step"``: read by the step's arithmetic; carried to the implementations in :class:`StepArgs`;
* ``"layout"``: fixes how a parameter's state is stored when it is created
  (:func:`torchcame.state.resolve_layout`); changing it afterwards is refused;
* ``"dispatch"``: chooses the implementation (``foreach``, ``fused``);
* ``"guard"``: changes what ``CAME.step`` does around the arithmetic (``skip_nonfinite``).

The optimizer's constructor signature and docstring, its param-group defaults, the defaults
given to param groups of older state dicts, the functional :func:`torchcame.came` and the
implementations' :class:`StepArgs` all derive from :data:`OPTIONS`: adding an option is one
entry here plus its math.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, make_dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Option",
    "OPTIONS",
    "DEFAULTS",
    "LAYOUT_OPTIONS",
    "STEP_OPTIONS",
    "StepArgs",
    "validate_options",
    "step_args",
    "FACTOR_POLICIES",
    "MOMENTUM_DTYPES",
    "MAX_BLOCK_SIZE",
]

#: ``factor_dims`` policies: the reference's last two dims, or the two largest dims.
FACTOR_POLICIES = ("last_two", "largest")

#: Names of the accepted ``momentum_dtype`` values (aliases are normalized to these).
MOMENTUM_DTYPES = ("float32", "bfloat16", "int8")

#: Largest int8 block. A larger block saves nothing (the scales already cost < 0.01% of the
#: codes) and would make every tensor's padded block buffer that large.
MAX_BLOCK_SIZE = 1 << 16


# ------------------------------------------------------------------------------- the checks


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN, got {value!r}")
    return value


def _reals(name: str, value: Any, length: int) -> tuple[float, ...]:
    if isinstance(value, (str, bytes, Tensor)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a tuple of {length} numbers, got {value!r}")
    items = tuple(value)  # consumed once: a generator is read here and nowhere else
    if len(items) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(items)}: {items!r}")
    return tuple(_real(f"{name}[{i}]", v) for i, v in enumerate(items))


def _check_lr(name: str, lr: Any) -> float | Tensor:
    if isinstance(lr, Tensor):
        if lr.dim() != 0:
            raise ValueError(f"{name} as a Tensor must be 0-d, got shape {tuple(lr.shape)}")
        if not lr.is_floating_point():
            raise TypeError(f"{name} as a Tensor must be floating point, got {lr.dtype}")
        value = float(lr.detach().cpu())
        if not math.isfinite(value) or value < 0.0:
            raise ValueError(f"Invalid {name}: tensor({value}) (must be finite and >= 0)")
        return lr
    if lr is None:
        raise TypeError(f"{name} must be a float or a 0-d tensor, got None")
    value = _real(name, lr)
    if value < 0.0 or math.isinf(value):
        raise ValueError(f"Invalid {name}: {lr!r} (must be finite and >= 0)")
    return value


def _check_betas(name: str, value: Any) -> tuple[float, float, float]:
    betas = _reals(name, value, 3)
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid {name}[{i}]: {beta!r} (must be in [0, 1)); {name}={betas}")
    return betas  # type: ignore[return-value]


def _check_eps(name: str, value: Any) -> tuple[float, float]:
    eps = _reals(name, value, 2)
    for i, e in enumerate(eps):
        if e < 0.0 or math.isinf(e):
            raise ValueError(f"Invalid {name}[{i}]: {e!r} (must be finite and >= 0); {name}={eps}")
    return eps  # type: ignore[return-value]


def _positive(name: str, value: Any) -> float:
    value = _real(name, value)
    if value <= 0.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be > 0)")
    return value


def _non_negative_finite(name: str, value: Any) -> float:
    value = _real(name, value)
    if value < 0.0 or math.isinf(value):
        raise ValueError(f"Invalid {name}: {value!r} (must be finite and >= 0)")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _optional_flag(name: str, value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be None or a bool, got {value!r}")
    return value


def _int_in(low: int, high: int | None = None) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {value!r}")
        value = int(value)
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"Invalid {name}: {value!r} (must be {bound})")
        return value

    return check


_MOMENTUM_ALIASES: dict[Any, str] = {
    torch.float32: "float32", "float32": "float32", "fp32": "float32",
    torch.bfloat16: "bfloat16", "bfloat16": "bfloat16", "bf16": "bfloat16",
    torch.int8: "int8", "int8": "int8", "8bit": "int8",
}


def _check_momentum_dtype(name: str, value: Any) -> str:
    try:
        return _MOMENTUM_ALIASES[value]
    except (KeyError, TypeError):
        raise ValueError(
            f"Invalid {name}: {value!r}; expected torch.float32, torch.bfloat16 or 'int8'"
        ) from None


def _check_factor_dims(name: str, value: Any) -> str:
    if value not in FACTOR_POLICIES:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {FACTOR_POLICIES}")
    return value


# ------------------------------------------------------------------------------ the options


@dataclass(frozen=True)
class Option:
    """One CAME hyperparameter or option.

    Attributes:
        name: the keyword (and param-group key).
        default: its default value (the paper's rule for every option that changes the math).
        check: ``check(name, value)`` returns the normalized value or raises a
            ``TypeError``/``ValueError`` naming the option and the value.
        doc: one line of documentation.
        role: ``"step"``, ``"layout"``, ``"dispatch"`` or ``"guard"`` (module docstring).
        positional: accepted positionally by the constructor (the authors' order).
    """

    name: str
    default: Any
    check: Callable[[str, Any], Any]
    doc: str
    role: str
    positional: bool = False


OPTIONS: tuple[Option, ...] = (
    Option("lr", 2e-4, _check_lr, "learning rate η: a float or a 0-d tensor (a tensor lets a "
           "scheduler change it without recompiling a compiled step); >= 0", "step", True),
    Option("eps", (1e-30, 1e-16), _check_eps, "(ε1, ε2): added to g² and to the instability "
           "(û − m)²; each >= 0", "step", True),
    Option("clip_threshold", 1.0, _positive, "d: the update is scaled by 1 / max(1, RMS(u) / d); "
           "> 0", "step", True),
    Option("betas", (0.9, 0.999, 0.9999), _check_betas, "(β1, β2, β3) for the momentum, the "
           "second moment and the instability; each in [0, 1)", "step", True),
    Option("weight_decay", 0.0, _non_negative_finite, "decoupled weight decay λ: "
           "θ ← θ − η·λ·θ before the step; >= 0", "step", True),
    Option("maximize", False, _flag, "maximize the objective (identical to minimizing −f)",
           "step"),
    Option("foreach", None, _optional_flag, "True: the multi-tensor path; False: the per-tensor "
           "reference; None: the fastest path bit-identical to the reference", "dispatch"),
    Option("fused", None, _optional_flag, "True: the fused path (CPU: a C++ kernel; CUDA: "
           "Triton kernels or torch.compile), equal to the reference to float32 rounding",
           "dispatch"),
    Option("skip_nonfinite", False, _flag, "skip a param group's step when its gradients hold "
           "inf/NaN, counted in group['skipped_steps'] (one host sync per group and step)",
           "guard"),
    Option("momentum_dtype", "float32", _check_momentum_dtype, "storage of the momentum m: "
           "torch.float32, torch.bfloat16 or 'int8' (block-wise absmax)", "layout"),
    Option("quantization_block_size", 256, _int_in(1, MAX_BLOCK_SIZE), "elements per int8 "
           "block (one float32 scale each)", "layout"),
    Option("min_quantized_numel", 4096, _int_in(0), "tensors smaller than this, and vectors, "
           "keep a float32 momentum under 'int8'", "layout"),
    Option("stochastic_rounding", False, _flag, "bf16/fp16 params: round the new weight to the "
           "param dtype stochastically (unbiased) instead of to nearest", "step"),
    Option("bias_correction", False, _flag, "divide m, the second moment and the instability "
           "by (1 − βᵗ) (not the paper's rule)", "step"),
    Option("factor_dims", "last_two", _check_factor_dims, "which two dims a >= 2-D tensor is "
           "factored over: 'last_two' (the reference) or 'largest'", "layout"),
    Option("factor_min_dim", 1, _int_in(1), "'largest': factor only if both dims are at least "
           "this (else a full second moment)", "layout"),
)

_BY_NAME = {option.name: option for option in OPTIONS}

#: Default of every option, by name.
DEFAULTS: dict[str, Any] = {option.name: option.default for option in OPTIONS}

#: Options that fix the state layout at creation.
LAYOUT_OPTIONS: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.role == "layout")

#: Options the step's arithmetic reads (the fields of :class:`StepArgs`).
STEP_OPTIONS: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.role == "step")

#: The hyperparameters of one param group's step, as the implementations receive them
#: (validated): one field per ``"step"`` option.
StepArgs = make_dataclass(
    "StepArgs",
    [(name, Any, field(default=DEFAULTS[name])) for name in STEP_OPTIONS],
    frozen=True,
    namespace={"__module__": __name__,
               "__doc__": "The validated step options of one param group (see OPTIONS)."},
)


def validate_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """Check every option present in ``values`` and return them normalized.

    Keys that are not options are returned unchanged (param groups carry ``params`` and
    bookkeeping). Raises ``TypeError``/``ValueError`` naming the option and the value.
    """
    out = dict(values)
    for name, value in values.items():
        option = _BY_NAME.get(name)
        if option is not None:
            out[name] = option.check(name, value)
    if out.get("foreach") and out.get("fused"):
        raise ValueError("foreach=True and fused=True are exclusive; set at most one of them")
    return out


def unknown_options(names: Iterable[str]) -> list[str]:
    """The names that are not CAME options."""
    return [name for name in names if name not in _BY_NAME]


def step_args(values: Mapping[str, Any]) -> Any:
    """The :class:`StepArgs` of validated options ``values`` (missing ones at their default)."""
    return StepArgs(**{name: values.get(name, DEFAULTS[name]) for name in STEP_OPTIONS})


def layout_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """The layout options of ``values`` (missing ones at their default)."""
    return {name: values.get(name, DEFAULTS[name]) for name in LAYOUT_OPTIONS}


def options_doc(indent: str = "        ") -> str:
    """The ``Args:`` lines of every option, for the optimizer's docstring."""
    lines = []
    for option in OPTIONS:
        lines.append(f"{indent}{option.name}: {option.doc} (default: {option.default!r}).")
    return "\n".join(lines)

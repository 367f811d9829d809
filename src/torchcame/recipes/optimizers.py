"""Build the optimizers compared by the recipes, by name, with every hyperparameter explicit.

``build_optimizer("came", model.parameters())`` returns a :class:`torchcame.CAME` with the
recipe default learning rate and the paper's betas; ``lr=``, ``weight_decay=`` and
``hyper={"betas": ..., "eps": ..., "clip_threshold": ...}`` override them. Every name is a
*variant*: a base optimizer plus its hyperparameters, so a configuration with other betas has
its own name (``came-short``, ``adamw-b95``) and a result can always say exactly what ran.

Base optimizers: :class:`torchcame.CAME`; ``torch.optim.AdamW``; ``torch.optim.Adafactor``
(factored second moment, no momentum, relative step ``min(lr, 1/sqrt(t))`` scaled by the
parameter RMS; its update clip ``d`` is called ``clip_threshold`` here); and :class:`LAMB`
(below). :func:`resolved_hyper` returns the full dict of a run's hyperparameters (what the
reports and ``claims.json`` record).

The default learning rates (:data:`DEFAULT_LR`) are each optimizer's customary value for a
small transformer; ``docs/evidence.md`` shows the sweeps that check them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..came import CAME

__all__ = [
    "LAMB",
    "CAME_VARIANTS",
    "DEFAULT_LR",
    "HYPER_KEYS",
    "OPTIMIZERS",
    "VARIANTS",
    "build_optimizer",
    "lamb_step",
    "resolved_hyper",
]

#: The hyperparameters each base optimizer takes from the command line (besides ``lr`` and
#: ``weight_decay``, which all take). ``eps`` is a pair for CAME and Adafactor, a number for
#: AdamW and LAMB; Adafactor has no betas (its second-moment decay is ``beta2_decay``).
HYPER_KEYS: dict[str, tuple[str, ...]] = {
    "came": ("betas", "eps", "clip_threshold"),
    "adamw": ("betas", "eps"),
    "adafactor": ("beta2_decay", "eps", "clip_threshold"),
    "lamb": ("betas", "eps"),
}

_BASE_HYPER: dict[str, dict[str, Any]] = {
    "came": {"betas": (0.9, 0.999, 0.9999), "eps": (1e-30, 1e-16), "clip_threshold": 1.0},
    "adamw": {"betas": (0.9, 0.999), "eps": 1e-8},
    "adafactor": {"beta2_decay": -0.8, "eps": (None, 1e-3), "clip_threshold": 1.0},
    "lamb": {"betas": (0.9, 0.999), "eps": 1e-6},
}

#: Every optimizer name the recipes accept: ``(base optimizer, hyperparameters that differ from
#: the base's defaults, options that are not hyperparameters)``. ``came-short`` is the authors'
#: current advice for pretraining runs that are short against 1/(1-β3) (their Llama-1B C4
#: run: betas (0.9, 0.95, 0.995)); ``adamw-b95`` the β2 = 0.95 common in LM pretraining.
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "came": ("came", {}, {}),
    "came-short": ("came", {"betas": (0.9, 0.95, 0.995)}, {}),
    "came-bc": ("came", {}, {"bias_correction": True}),
    "came-bf16": ("came", {}, {"momentum_dtype": torch.bfloat16}),
    "came-int8": ("came", {}, {"momentum_dtype": "int8"}),
    "came-lowmem": (
        "came",
        {},
        {"momentum_dtype": "int8", "stochastic_rounding": True, "fused": True},
    ),
    "adamw": ("adamw", {}, {}),
    "adamw-b95": ("adamw", {"betas": (0.9, 0.95)}, {}),
    "adafactor": ("adafactor", {}, {}),
    "lamb": ("lamb", {}, {}),
}

#: customary peak learning rate of each optimizer for a small transformer: CAME's is the
#: authors' recommended 2e-4 (their README), AdamW's the usual 1e-3 of small GPTs, Adafactor's
#: torch's default 1e-2 (a relative step), LAMB's a common 5e-3. docs/evidence.md sweeps them.
DEFAULT_LR: dict[str, float] = {
    name: {"came": 2e-4, "adamw": 1e-3, "adafactor": 1e-2, "lamb": 5e-3}[base]
    for name, (base, _, _) in VARIANTS.items()
}

#: CAME with opt-in options, by name (same default lr as ``came``), kept for callers of the
#: previous API: name -> the keyword options passed to :class:`torchcame.CAME`.
CAME_VARIANTS: dict[str, dict[str, Any]] = {
    name: options
    for name, (base, _, options) in VARIANTS.items()
    if base == "came" and options
}

#: How the training loop changes for an optimizer name: ``came-lowmem`` trains bf16 weights
#: (no float32 copy; stochastic rounding) and steps each parameter during backward
#: (:func:`torchcame.step_in_backward`, gradients freed at once), so the recipe's global
#: gradient-norm clipping, which needs every gradient at once, is not applied (CAME clips
#: its update per tensor either way).
LOWMEM_TRAINING: dict[str, dict[str, Any]] = {
    "came-lowmem": {"param_dtype": torch.bfloat16, "step_in_backward": True},
}

OPTIMIZERS = tuple(VARIANTS)


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def resolved_hyper(
    name: str,
    *,
    lr: float | None = None,
    weight_decay: float = 0.0,
    hyper: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every hyperparameter of optimizer ``name`` as it will run (JSON-friendly lists).

    Args:
        name: one of :data:`OPTIMIZERS` (case-insensitive).
        lr: peak learning rate; ``None`` takes :data:`DEFAULT_LR` ``[name]``.
        weight_decay: decoupled weight decay.
        hyper: overrides of the variant's hyperparameters (keys of :data:`HYPER_KEYS`).

    Returns:
        ``{"lr", "weight_decay", <the base's HYPER_KEYS>}``, plus the variant's options
        (``bias_correction``, ...) when it has any.

    Raises:
        ValueError: unknown name, or an override the base optimizer does not take.
    """
    key = name.lower()
    if key not in VARIANTS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    base, variant_hyper, options = VARIANTS[key]
    out: dict[str, Any] = {
        "lr": float(DEFAULT_LR[key] if lr is None else lr),
        "weight_decay": float(weight_decay),
    }
    values = {**_BASE_HYPER[base], **variant_hyper}
    for k, v in (hyper or {}).items():
        if k not in HYPER_KEYS[base]:
            raise ValueError(
                f"{name}: unknown hyperparameter {k!r} (it takes lr, weight_decay, "
                f"{', '.join(HYPER_KEYS[base])})"
            )
        values[k] = _tuple(v)
    if base == "came" and len(values["betas"]) != 3:
        raise ValueError(f"{name}: betas needs three values (β1, β2, β3), got {values['betas']}")
    if base in ("adamw", "lamb") and len(values["betas"]) != 2:
        raise ValueError(f"{name}: betas needs two values (β1, β2), got {values['betas']}")
    for k in HYPER_KEYS[base]:
        v = values[k]
        out[k] = list(v) if isinstance(v, tuple) else v
    for k, v in options.items():
        out[k] = str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v
    return out


def lamb_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> float:
    r"""One LAMB update of one parameter tensor, in place; returns the trust ratio used.

    You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes", Algorithm 2, with :math:`\phi(z) = z`:

    .. math::

        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \hat m_t = m_t / (1-\beta_1^t), \quad \hat v_t = v_t / (1-\beta_2^t) \\
        r_t = \hat m_t / (\sqrt{\hat v_t} + \epsilon) + \lambda x_t \\
        x_{t+1} = x_t - \eta \, \frac{\lVert x_t \rVert}{\lVert r_t \rVert} \, r_t

    The trust ratio is 1 when either norm is zero (a zero-initialized tensor or no update).
    """
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias1 = 1.0 - beta1**step
    bias2 = 1.0 - beta2**step
    update = (exp_avg / bias1) / ((exp_avg_sq / bias2).sqrt_().add_(eps))
    if weight_decay != 0.0:
        update.add_(param, alpha=weight_decay)
    param_norm = float(torch.linalg.vector_norm(param))
    update_norm = float(torch.linalg.vector_norm(update))
    trust_ratio = param_norm / update_norm if param_norm > 0.0 and update_norm > 0.0 else 1.0
    param.add_(update, alpha=-lr * trust_ratio)
    return trust_ratio


class LAMB(Optimizer):
    """LAMB (layer-wise adaptive moments for batch training), You et al. 2019, Algorithm 2.

    A small single-tensor implementation for the large-batch baseline of the recipes: Adam
    moments with bias correction, decoupled weight decay added to the update, and a per-tensor
    trust ratio ``||x|| / ||update||``. See :func:`lamb_step` for the equations.

    Args:
        params: parameters or param groups.
        lr: learning rate (:math:`\\eta`).
        betas: :math:`(\\beta_1, \\beta_2)`.
        eps: added to :math:`\\sqrt{\\hat v}`.
        weight_decay: :math:`\\lambda`, added to the update before the trust ratio.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0.0):
            raise ValueError(f"Invalid lr: {lr!r} (must be a finite number >= 0)")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Invalid betas: {betas!r} (two numbers in [0, 1))")
        if not eps >= 0.0:
            raise ValueError(f"Invalid eps: {eps!r} (must be >= 0)")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay!r} (must be >= 0)")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LAMB does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                lamb_step(
                    p,
                    p.grad,
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    int(state["step"].item()),
                    lr=float(group["lr"]),
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )
        return loss


def build_optimizer(
    name: str,
    params: Iterable[Any],
    *,
    lr: float | None = None,
    weight_decay: float = 0.0,
    hyper: Mapping[str, Any] | None = None,
) -> Optimizer:
    """Build an optimizer by name with its recipe defaults and any overrides.

    Args:
        name: one of :data:`OPTIMIZERS` (case-insensitive).
        params: parameters or param groups.
        lr: peak learning rate; ``None`` takes :data:`DEFAULT_LR` ``[name]``.
        weight_decay: decoupled weight decay (every optimizer here scales it by ``lr``).
        hyper: overrides of ``betas``, ``eps``, ``clip_threshold`` (CAME, Adafactor's ``d``)
            or ``beta2_decay`` (Adafactor); see :data:`HYPER_KEYS`.

    Returns:
        The optimizer. Defaults other than the variant's: CAME betas (0.9, 0.999, 0.9999),
        eps (1e-30, 1e-16), clip 1.0; AdamW betas (0.9, 0.999), eps 1e-8; Adafactor
        beta2_decay -0.8, eps (None, 1e-3), d 1.0; LAMB betas (0.9, 0.999), eps 1e-6.
    """
    key = name.lower()
    h = resolved_hyper(key, lr=lr, weight_decay=weight_decay, hyper=hyper)
    base, _, options = VARIANTS[key]
    lr, wd = h["lr"], h["weight_decay"]
    if base == "came":
        return CAME(
            params,
            lr=lr,
            betas=tuple(h["betas"]),
            eps=tuple(h["eps"]),
            clip_threshold=float(h["clip_threshold"]),
            weight_decay=wd,
            **options,
        )
    if base == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=tuple(h["betas"]), eps=float(h["eps"]), weight_decay=wd
        )
    if base == "adafactor":
        return torch.optim.Adafactor(
            params,
            lr=lr,
            beta2_decay=float(h["beta2_decay"]),
            eps=tuple(h["eps"]),
            d=float(h["clip_threshold"]),
            weight_decay=wd,
        )
    return LAMB(params, lr=lr, betas=tuple(h["betas"]), eps=float(h["eps"]), weight_decay=wd)

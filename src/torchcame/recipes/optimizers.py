"""Build the optimizers compared by the recipes, by name, with per-optimizer defaults.

``build_optimizer("came", model.parameters())`` returns a :class:`torchcame.CAME` with the
recipe default learning rate; ``lr=`` overrides it. Names: ``came``, ``adamw``,
``adafactor`` (``torch.optim.Adafactor``: factored second moment, no momentum, relative step
``min(lr, 1/sqrt(t))`` scaled by the parameter RMS) and ``lamb`` (:class:`LAMB`, below).

The default learning rates (:data:`DEFAULT_LR`) are each optimizer's customary value for a
small transformer; ``docs/evidence.md`` shows the short sweep that checks them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..came import CAME

__all__ = ["LAMB", "CAME_VARIANTS", "DEFAULT_LR", "OPTIMIZERS", "build_optimizer", "lamb_step"]

#: customary peak learning rate of each optimizer for a small transformer: CAME's is the
#: authors' recommended 2e-4 (their README), AdamW's the usual 1e-3 of small GPTs, Adafactor's
#: torch's default 1e-2 (a relative step), LAMB's a common 5e-3. docs/evidence.md sweeps them.
DEFAULT_LR: dict[str, float] = {
    "came": 2e-4,
    "adamw": 1e-3,
    "adafactor": 1e-2,
    "lamb": 5e-3,
}

#: CAME with opt-in options, by name (same default lr as ``came``): 8-bit / bf16 momentum,
#: bias correction, and the whole low-memory configuration ``came-lowmem`` (bf16 weights,
#: see :data:`LOWMEM_TRAINING`).
CAME_VARIANTS: dict[str, dict[str, Any]] = {
    "came-bf16": {"momentum_dtype": torch.bfloat16},
    "came-int8": {"momentum_dtype": "int8"},
    "came-bc": {"bias_correction": True},
    "came-lowmem": {"momentum_dtype": "int8", "stochastic_rounding": True, "fused": True},
}

#: How the training loop changes for an optimizer name: ``came-lowmem`` trains bf16 weights
#: (no float32 copy; stochastic rounding) and steps each parameter during backward
#: (:func:`torchcame.step_in_backward`, gradients freed at once), so the recipe's global
#: gradient-norm clipping, which needs every gradient at once, is not applied (CAME clips
#: its update per tensor either way).
LOWMEM_TRAINING: dict[str, dict[str, Any]] = {
    "came-lowmem": {"param_dtype": torch.bfloat16, "step_in_backward": True},
}
DEFAULT_LR.update({name: DEFAULT_LR["came"] for name in CAME_VARIANTS})

OPTIMIZERS = tuple(DEFAULT_LR)


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
) -> Optimizer:
    """Build an optimizer by name with its recipe default learning rate.

    Args:
        name: one of :data:`OPTIMIZERS` (case-insensitive).
        params: parameters or param groups.
        lr: peak learning rate; ``None`` takes :data:`DEFAULT_LR` ``[name]``.
        weight_decay: decoupled weight decay (every optimizer here scales it by ``lr``).

    Returns:
        The optimizer. Hyperparameters other than ``lr``/``weight_decay`` are each
        optimizer's own defaults (CAME: betas (0.9, 0.999, 0.9999), eps (1e-30, 1e-16),
        clip 1.0; AdamW: betas (0.9, 0.999), eps 1e-8; Adafactor: beta2_decay -0.8,
        d 1.0; LAMB: betas (0.9, 0.999), eps 1e-6).
    """
    key = name.lower()
    if key not in DEFAULT_LR:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    lr = DEFAULT_LR[key] if lr is None else float(lr)
    if key == "came" or key in CAME_VARIANTS:
        return CAME(params, lr=lr, weight_decay=weight_decay, **CAME_VARIANTS.get(key, {}))
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if key == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)
    return LAMB(params, lr=lr, weight_decay=weight_decay)

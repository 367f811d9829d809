"""Hugging Face ``transformers.Trainer`` with CAME.

Two ways, both taking the hyperparameters from ``TrainingArguments``:

.. code-block:: python

    from torchcame.integrations.transformers import came_optimizer_cls_and_kwargs

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizer_cls_and_kwargs=came_optimizer_cls_and_kwargs(args))

(the Trainer builds the optimizer itself, with its own no-decay rule for biases and
LayerNorms; transformers >= 4.47), or

.. code-block:: python

    from torchcame.integrations.transformers import came_from_training_args

    optimizer = came_from_training_args(model, args)          # param groups by module type
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(optimizer, None))

(the scheduler is still built by the Trainer from ``args``). Checkpoints saved by the
Trainer contain CAME's state and resume exactly (``resume_from_checkpoint``).

How ``TrainingArguments`` map onto CAME (:func:`came_kwargs_from_training_args`):

============================  ===================================================
``TrainingArguments``          CAME
============================  ===================================================
``learning_rate``              ``lr`` (peak lr; the Trainer's scheduler scales it)
``weight_decay``               ``weight_decay`` (decoupled, multiplied by lr, as AdamW)
``adam_beta1``                 β1 (momentum of the normalized update)
``adam_beta2``                 β2 (EMA of the factored second moment, Adam's β2 role)
— (CAME only)                  β3 (EMA of the instability), ``beta3=`` (0.9999)
``adam_epsilon``               **not mapped**: Adam adds it to √v (≈1e-8); CAME's ε1 is added
                               to g² (1e-30) and ε2 to the instability (1e-16). ``eps=``.
``max_grad_norm``              not an optimizer argument: the Trainer clips the global
                               gradient norm before ``step``; CAME's ``clip_threshold``
                               (per-tensor RMS clip of the update) applies as well.
``optim``, ``optim_args``      ignored (the optimizer is given explicitly)
============================  ===================================================
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping
from typing import Any

from torch import nn

from ..came import CAME
from .param_groups import Pattern, param_groups

__all__ = [
    "DEFAULT_BETA3",
    "came_kwargs_from_training_args",
    "came_optimizer_cls_and_kwargs",
    "came_from_training_args",
]

#: CAME's default β3 (the instability EMA), which ``TrainingArguments`` has no field for
DEFAULT_BETA3 = 0.9999


def came_kwargs_from_training_args(
    args: Any, *, beta3: float = DEFAULT_BETA3, **overrides: Any
) -> dict[str, Any]:
    """CAME keyword arguments from a ``transformers.TrainingArguments``.

    ``lr = args.learning_rate``, ``weight_decay = args.weight_decay``,
    ``betas = (args.adam_beta1, args.adam_beta2, beta3)``; ``args.adam_epsilon`` is not used
    (CAME's two epsilons have other roles and scales; pass ``eps=`` to change them).

    Args:
        args: a ``TrainingArguments`` (anything with ``learning_rate``, ``weight_decay``,
            ``adam_beta1``, ``adam_beta2``).
        beta3: β3, the instability EMA; the paper uses β3 > β2. A warning is issued if not.
        **overrides: any :class:`torchcame.CAME` keyword argument; replaces the mapped value
            (``betas=`` replaces all three betas).

    Returns:
        A dict of keyword arguments for :class:`torchcame.CAME`.
    """
    kwargs: dict[str, Any] = {
        "lr": float(args.learning_rate),
        "betas": (float(args.adam_beta1), float(args.adam_beta2), float(beta3)),
        "weight_decay": float(args.weight_decay),
    }
    kwargs.update(overrides)
    betas = tuple(kwargs["betas"])
    if len(betas) == 3 and not betas[2] > betas[1]:
        warnings.warn(
            f"CAME betas {betas}: the paper uses beta3 > beta2 (the instability is averaged "
            "over a longer window than the second moment); pass beta3= to set it",
            stacklevel=2,
        )
    return kwargs


def came_optimizer_cls_and_kwargs(
    args: Any, *, beta3: float = DEFAULT_BETA3, **overrides: Any
) -> tuple[type[CAME], dict[str, Any]]:
    """``(CAME, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    The kwargs include ``lr``: without it ``Trainer`` would build CAME with CAME's default
    lr (2e-4), not ``args.learning_rate``, because it passes only the param groups. The
    Trainer sets each group's ``weight_decay`` itself (``args.weight_decay``, 0 for biases
    and LayerNorm weights).
    """
    return CAME, came_kwargs_from_training_args(args, beta3=beta3, **overrides)


def came_from_training_args(
    model: nn.Module,
    args: Any,
    *,
    beta3: float = DEFAULT_BETA3,
    no_decay: Collection[str] = ("bias", "norm"),
    overrides: Mapping[Pattern, Mapping[str, Any]] | None = None,
    **came_overrides: Any,
) -> CAME:
    """A :class:`torchcame.CAME` for ``model`` configured from a ``TrainingArguments``.

    Parameters are grouped by :func:`torchcame.integrations.param_groups` (no weight decay
    for biases and norm weights by default; per-name ``overrides``), with
    ``args.weight_decay`` for the others. Pass the result as
    ``Trainer(..., optimizers=(optimizer, None))``; the model must already be on its
    training device (as for any optimizer given to the Trainer).

    Args:
        model: the model the Trainer will train.
        args: its ``TrainingArguments``.
        beta3: β3 (``TrainingArguments`` has no field for it).
        no_decay: categories without weight decay, see :func:`param_groups`.
        overrides: name pattern -> hyperparameters, see :func:`param_groups`.
        **came_overrides: any :class:`torchcame.CAME` keyword argument (``eps``,
            ``clip_threshold``, ``foreach``, ``lr``, ...).
    """
    kwargs = came_kwargs_from_training_args(args, beta3=beta3, **came_overrides)
    groups = param_groups(
        model, weight_decay=kwargs["weight_decay"], no_decay=no_decay, overrides=overrides
    )
    return CAME(groups, **kwargs)

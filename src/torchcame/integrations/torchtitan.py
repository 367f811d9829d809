"""torchtitan with CAME: an ``OptimizersContainer`` whose factory knows ``"CAME"``.

torchtitan (0.3) builds its optimizers from ``Trainer.Config.optimizer``, an
``OptimizersContainer.Config``; its own factory knows Adam, AdamW and DistMuon only. Use
:class:`CAMEOptimizersContainer`'s config instead (every other optimizer name still works, so
CAME and AdamW groups can be mixed)::

    from torchtitan.components.optimizer import ParamGroupConfig
    from torchcame.integrations.torchtitan import CAMEOptimizersContainer, default_came

    config.optimizer = default_came(lr=2e-4, weight_decay=1e-2)        # every parameter, or
    config.optimizer = CAMEOptimizersContainer.Config(
        implementation="for-loop",
        param_groups=[
            ParamGroupConfig(pattern=r"norm", optimizer_name="CAME",
                             optimizer_kwargs={"lr": 2e-4, "weight_decay": 0.0}),
            ParamGroupConfig(pattern=r".*", optimizer_name="CAME",
                             optimizer_kwargs={"lr": 2e-4, "weight_decay": 1e-2,
                                               "betas": (0.9, 0.999, 0.9999)}),
        ],
    )

``optimizer_kwargs`` are :class:`torchcame.CAME` keyword arguments (``lr``, ``betas`` (three),
``eps`` (two), ``weight_decay``, ``clip_threshold`` and the options such as
``momentum_dtype``); lists from a TOML/JSON config are accepted where tuples are expected.

What the container adds to torchtitan's:

- ``implementation`` (``"fused"`` by default in torchtitan) sets CAME's ``fused``/``foreach``
  flags in every group: ``"fused"`` runs CAME's fused path on plain tensors (a C++ kernel on
  CPU, Triton on CUDA; equal to the reference up to float32 rounding), ``"foreach"`` its
  multi-tensor path and ``"for-loop"`` its per-tensor reference. Sharded (DTensor) parameters
  (torchtitan wraps even one rank in FSDP2) always use the reference math on their local
  shards; with ``"fused"`` CAME warns once that it does. ``"fused_opt_states_bf16"`` is an
  Adam-only mode: for CAME groups it raises, pointing to ``momentum_dtype``.
- The ``param_names`` torchtitan puts in every group are kept by CAME (torch.optim records
  them); checkpoints are keyed by them.
- State initialization is exact. torchtitan's ``init_optim_state`` (run by
  ``state_dict()``/``load_state_dict()`` on an optimizer without state, e.g. when resuming)
  builds lazy state with a zero-gradient, lr = 0 step; for CAME such a step is not a no-op (it
  counts a step and moves the statistics toward ε). The container calls
  :meth:`torchcame.CAME.init_state` first, which allocates the zero state without stepping,
  so torchtitan's step is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.optim import Optimizer

try:
    from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
except ImportError as exc:  # pragma: no cover - exercised only without torchtitan
    raise ImportError(
        "torchcame.integrations.torchtitan needs torchtitan (pip install 'torchcame[torchtitan]')"
    ) from exc

from ..came import CAME

__all__ = ["CAMEOptimizersContainer", "build_came", "default_came"]

#: optimizer_kwargs that CAME takes as tuples (a TOML or JSON config gives lists)
_TUPLE_KWARGS = ("betas", "eps")


def build_came(param_groups: list[dict[str, Any]], **defaults: Any) -> CAME:
    """The factory behind ``optimizer_name="CAME"``: a :class:`torchcame.CAME` over
    torchtitan's param groups (each with ``params``, ``param_names``, ``fused``, ``foreach``
    and its ``optimizer_kwargs``); ``defaults`` come from
    ``optimizer_factory_kwargs_by_name["CAME"]``."""
    groups = [_normalized(group) for group in param_groups]
    return CAME(groups, **_normalized(defaults))


def _normalized(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    for key in _TUPLE_KWARGS:
        if isinstance(out.get(key), list):
            out[key] = tuple(out[key])
    return out


class CAMEOptimizersContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` that also builds ``optimizer_name="CAME"``
    (:func:`build_came`) and initializes CAME's state exactly (see the module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        """``OptimizersContainer.Config``; ``optimizer_name="CAME"`` is accepted in
        ``param_groups``."""

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        if config.implementation == "fused_opt_states_bf16" and any(
            group.optimizer_name == "CAME" for group in config.param_groups
        ):
            raise ValueError(
                "implementation='fused_opt_states_bf16' is an Adam/AdamW mode; for CAME use "
                "implementation='fused' and optimizer_kwargs={'momentum_dtype': "
                "torch.bfloat16} (or 'int8')"
            )
        super().__init__(config, model_parts=model_parts)

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Callable[..., Optimizer]:
        if name == "CAME":
            return build_came
        return OptimizersContainer._resolve_optimizer_factory(name)

    def init_came_state(self) -> None:
        """Allocate the zero state of every CAME optimizer that has none (no step taken)."""
        for optim in self.optimizers:
            if isinstance(optim, CAME) and not optim.state:
                optim.init_state()

    def state_dict(self) -> dict[str, Any]:
        self.init_came_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.init_came_state()
        super().load_state_dict(state_dict)


def default_came(lr: float = 2e-4, **kwargs: Any) -> CAMEOptimizersContainer.Config:
    """A config with one catch-all CAME param group (torchtitan's ``default_adamw``, for
    CAME): ``lr``, ``weight_decay=1e-2`` and CAME's defaults otherwise; ``kwargs`` are CAME
    keyword arguments, plus ``implementation=`` for the container."""
    implementation = kwargs.pop("implementation", "fused")
    optimizer_kwargs = {"lr": lr, "weight_decay": 1e-2, **kwargs}
    return CAMEOptimizersContainer.Config(
        implementation=implementation,
        param_groups=[
            ParamGroupConfig(pattern=r".*", optimizer_name="CAME",
                             optimizer_kwargs=optimizer_kwargs)
        ],
    )


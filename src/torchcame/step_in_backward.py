"""Optimizer step in backward (gradient release).

Each parameter is updated as soon as its gradient has been accumulated during
``loss.backward()``, and its gradient is freed right away, so the full set of gradients never
exists at once: peak training memory drops by up to the size of the model's gradients.

CAME's update of a tensor depends only on that tensor's gradient and state (its clipping is
per tensor, unlike a global grad-norm clip), so this gives exactly the result of a normal
``optimizer.step()`` with the same gradients.

Limits: one backward per step (no gradient accumulation over micro-batches: each backward
would step), and no global gradient clipping (there is no moment when all gradients exist).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["step_in_backward", "StepInBackwardHandle"]


class StepInBackwardHandle:
    """Returned by :func:`step_in_backward`; ``remove()`` restores normal stepping."""

    def __init__(self, handles: list[Any]) -> None:
        self._handles = handles

    def remove(self) -> None:
        """Unregister every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> StepInBackwardHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def step_in_backward(optimizer: torch.optim.Optimizer) -> StepInBackwardHandle:
    """Make ``optimizer`` (a :class:`torchcame.CAME`) step each parameter during backward.

    Registers a post-accumulate-grad hook on every parameter of every param group. The hook
    reads the group's current hyperparameters, so LR schedulers keep working (call
    ``scheduler.step()`` as usual; ``optimizer.step()`` may still be called and then finds no
    gradients). ``state_dict()``/``load_state_dict()`` are unchanged. With
    ``skip_nonfinite=True`` a parameter whose gradient is not finite is skipped (and counted in
    its group's ``skipped_steps``) on its own.

    Example::

        optimizer = CAME(model.parameters(), lr=2e-4)
        handle = step_in_backward(optimizer)
        for batch in data:
            loss_fn(model(batch)).backward()   # parameters are updated here
            scheduler.step()
        handle.remove()
    """
    step_group = getattr(optimizer, "_step_group", None)
    if step_group is None:
        raise TypeError(
            f"step_in_backward needs a torchcame.CAME optimizer, got {type(optimizer).__name__}"
        )
    handles = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not param.requires_grad:
                continue
            handles.append(param.register_post_accumulate_grad_hook(_make_hook(optimizer, group)))
    return StepInBackwardHandle(handles)


def _make_hook(optimizer: Any, group: dict[str, Any]):
    def hook(param: Tensor) -> None:
        with torch.no_grad():
            grads = optimizer._gather({"params": [param]})[1]
            if grads:
                if group["skip_nonfinite"] and not bool(torch.isfinite(grads[0]).all()):
                    group["skipped_steps"] += 1
                else:
                    optimizer._step_group(group, [param], grads)
                    # what torch's LR schedulers check to tell "optimizer.step() ran" (they
                    # would otherwise warn that scheduler.step() came before it)
                    optimizer._opt_called = True
        param.grad = None

    return hook

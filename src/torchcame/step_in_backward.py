"""Optimizer step in backward (gradient release).

Each parameter is updated as soon as its gradient has been accumulated during
``loss.backward()``, and its gradient is freed right away, so the full set of gradients never
exists at once: peak training memory drops by up to the size of the model's gradients.

CAME's update of a tensor depends only on that tensor's gradient and state (its clipping is
per tensor, unlike a global grad-norm clip), so this gives exactly the result of a normal
``optimizer.step()`` with the same gradients. It uses only the optimizer's public
:meth:`torchcame.CAME.step_parameters`.

The first backward after :func:`step_in_backward` checks every gradient before stepping any
parameter (so a bad one — sparse, complex, of the wrong shape — raises before anything
changes); from the second on, each parameter steps as its gradient arrives.

Limits: one backward per step. Gradient accumulation over micro-batches is not possible (each
backward steps every parameter): when ``optimizer.step()`` is called after more than one
backward, a warning says so. No global gradient clipping (there is no moment when all
gradients exist).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

__all__ = ["step_in_backward", "StepInBackwardHandle"]


class StepInBackwardHandle:
    """Returned by :func:`step_in_backward`; ``remove()`` restores normal stepping."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self._handles: list[Any] = []
        self.validated = False  # the first backward checks every gradient first
        self._first: list[Tensor] = []  # parameters whose gradient arrived in that backward
        self._in_backward = False
        self.backwards_since_step = 0
        self._warned = False

    def remove(self) -> None:
        """Unregister every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> StepInBackwardHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------------------- hooks

    def _on_grad(self, param: Tensor) -> None:
        if not self._in_backward:  # once per backward: count it, and finish it at its end
            self._in_backward = True
            self.backwards_since_step += 1
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        if self.validated:
            self.optimizer.step_parameters([param])
            param.grad = None
        else:
            self._first.append(param)

    def _end_of_backward(self) -> None:
        self._in_backward = False
        if not self.validated:
            first, self._first = self._first, []
            try:
                self.optimizer.step_parameters(first)  # checks all, then steps
            finally:
                for param in first:
                    param.grad = None
            self.validated = True

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.backwards_since_step > 1 and not self._warned:
            self._warned = True
            warnings.warn(
                f"torchcame.step_in_backward: {self.backwards_since_step} backward passes ran "
                "since the last optimizer.step(); under step_in_backward every backward steps "
                "the parameters, so gradients are not accumulated over micro-batches. Use a "
                "normal optimizer.step() for gradient accumulation.",
                UserWarning,
                stacklevel=3,
            )
        self.backwards_since_step = 0


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
    if not callable(getattr(optimizer, "step_parameters", None)):
        raise TypeError(
            f"step_in_backward needs a torchcame.CAME optimizer, got {type(optimizer).__name__}"
        )
    handle = StepInBackwardHandle(optimizer)
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.requires_grad:
                handle._handles.append(param.register_post_accumulate_grad_hook(handle._on_grad))
    handle._handles.append(optimizer.register_step_pre_hook(handle._before_step))
    return handle

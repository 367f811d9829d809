"""The CAME optimizer class: param groups, state, validation at the boundary, dispatch.

Options are defined in :mod:`torchcame.options`, the state layout in :mod:`torchcame.state`,
the arithmetic in :mod:`torchcame._factored` and :mod:`torchcame._impl`; this class holds
the param groups and their state, checks every input before anything changes, and calls
:func:`torchcame.functional.step_group` once per group.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import distributed
from .functional import step_group
from .options import (
    DEFAULTS,
    LAYOUT_OPTIONS,
    OPTIONS,
    options_doc,
    step_args,
    unknown_options,
    validate_options,
)
from .state import (
    StateLayout,
    check_layout_unchanged,
    convert_state,
    init_state,
    layout_of,
    state_dtype,
)

__all__ = ["CAME"]

#: Param-group keys every state dict of CAME (and of the authors' package) has.
_REQUIRED_GROUP_KEYS = tuple(o.name for o in OPTIONS if o.positional)

_DOC = r"""CAME: Confidence-guided Adaptive Memory Efficient optimization (Luo et al., ACL 2023).

    .. math::

        \begin{aligned}
        &G_t = g_t^2 + \epsilon_1 \\
        &r_t = \beta_2 r_{t-1} + (1-\beta_2)\,\mathrm{mean}_{-1}(G_t), \quad
         c_t = \beta_2 c_{t-1} + (1-\beta_2)\,\mathrm{mean}_{-2}(G_t) \\
        &\hat v_t = (r_t / \mathrm{mean}(r_t)) \otimes c_t, \quad u_t = g_t / \sqrt{\hat v_t} \\
        &\hat u_t = u_t / \max(1, \mathrm{RMS}(u_t) / d) \\
        &m_t = \beta_1 m_{t-1} + (1-\beta_1)\,\hat u_t \\
        &U_t = (\hat u_t - m_t)^2 + \epsilon_2 \\
        &R_t = \beta_3 R_{t-1} + (1-\beta_3)\,\mathrm{mean}_{-1}(U_t), \quad
         C_t = \beta_3 C_{t-1} + (1-\beta_3)\,\mathrm{mean}_{-2}(U_t) \\
        &\hat S_t = (R_t / \mathrm{mean}(R_t)) \otimes C_t \\
        &\theta_t = \theta_{t-1} - \eta\lambda\,\theta_{t-1} - \eta\, m_t / \sqrt{\hat S_t}
        \end{aligned}

    Tensors with two or more dimensions are factored over their last two dimensions (leading
    dimensions are batch dimensions). Scalars and vectors keep a full second moment
    :math:`v_t` and take :math:`\Delta = m_t` (no confidence scaling). There is no bias
    correction and every statistic starts at zero, exactly as in the paper's code.

    The positional arguments are those of the authors' ``came_pytorch.CAME``, so replacing
    ``from came_pytorch import CAME`` with ``from torchcame import CAME`` changes nothing in a
    training script, and checkpoints of that package load here. Differences from it:
    validation with clear errors, ``torch.no_grad`` steps, zero-size tensors stay finite,
    ``maximize``, ``skip_nonfinite``, the fast implementations, and no unused ``RMS`` state.

    Args:
        params: parameters or dicts defining parameter groups (an ordered collection: a
            ``set`` is refused, its order changes between runs).
{options}

    Raises:
        TypeError, ValueError: for a bad option (naming it and the value), an unknown option,
            or bad parameters; nothing is built.
    """


class CAME(Optimizer):
    __doc__ = _DOC.replace("{options}", options_doc())

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = DEFAULTS["lr"],
        eps: tuple[float, float] = DEFAULTS["eps"],
        clip_threshold: float = DEFAULTS["clip_threshold"],
        betas: tuple[float, float, float] = DEFAULTS["betas"],
        weight_decay: float = DEFAULTS["weight_decay"],
        **options: Any,
    ) -> None:
        unknown = unknown_options(options)
        if unknown:
            raise TypeError(f"CAME got unexpected keyword argument(s) {unknown}; options are "
                            f"{[o.name for o in OPTIONS]}")
        defaults = validate_options({**DEFAULTS, "lr": lr, "eps": eps,
                                     "clip_threshold": clip_threshold, "betas": betas,
                                     "weight_decay": weight_decay, **options})
        if isinstance(params, (set, frozenset)):
            raise TypeError("params must be an ordered collection (a list or generator), not a "
                            "set: a set's order changes between runs, and so would the state")
        self._layout_cache: dict[int, tuple[dict, tuple, dict[Tensor, StateLayout]]] = {}
        self._flat_partitions: dict[Tensor, distributed.FlatPartition] = {}
        super().__init__(params, defaults)

    def attach_flat_partitions(self, partitions: Mapping[Tensor, distributed.FlatPartition],
                               ) -> None:
        """Declare flat 1-D tensors of the param groups to be ZeRO-style flat partitions.

        Each key is a 1-D tensor that holds pieces of several parameters (the client
        optimizer's parameter under DeepSpeed ZeRO); its
        :class:`~torchcame.flat_partition.FlatPartition` says which elements of which
        parameter (global shape) sit where, and where ranks divide them. CAME then steps every
        piece as one process holding the full tensors would, with a constant number of small
        all-reduces per step (:mod:`torchcame.flat_partition`). The tensor may join a param
        group later (ZeRO-3 puts it there during ``step`` only).
        ``torchcame.integrations.deepspeed.initialize`` calls this; there is no need to
        otherwise.

        Raises:
            TypeError, ValueError: a key that is not a floating 1-D tensor of the partition's
                length, or a value that is not a ``FlatPartition``; nothing is attached.
        """
        checked = {}
        for tensor, partition in partitions.items():
            if not isinstance(partition, distributed.FlatPartition):
                raise TypeError(f"attach_flat_partitions expects FlatPartition values, got "
                                f"{type(partition).__name__}")
            if (not isinstance(tensor, Tensor) or tensor.dim() != 1
                    or not tensor.is_floating_point()):
                raise TypeError("attach_flat_partitions expects floating 1-D tensors as keys, "
                                f"got {type(tensor).__name__} {getattr(tensor, 'shape', '')}")
            if tensor.numel() != partition.numel:
                raise ValueError(f"a flat tensor of {tensor.numel()} elements got a partition "
                                 f"map of {partition.numel}")
            if self.state.get(tensor):
                raise ValueError("attach_flat_partitions: this tensor already has CAME state "
                                 "(stepped as a plain vector); attach before the first step")
            checked[tensor] = partition
        self._flat_partitions.update(checked)
        self._layout_cache.clear()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its options and parameters are validated first."""
        params = param_group["params"]
        if isinstance(params, (set, frozenset)):
            raise TypeError("a param group's params must be an ordered collection, not a set")
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"CAME can only optimize Tensors, got {type(p).__name__}")
            if p.is_complex():
                raise TypeError(
                    f"CAME does not support complex parameters (got one of dtype {p.dtype} "
                    f"and shape {tuple(p.shape)}); optimize torch.view_as_real(param) instead"
                )
            if not p.is_floating_point():
                raise TypeError(f"CAME can only optimize floating-point tensors, got {p.dtype}")
            if distributed.is_dtensor(p):
                distributed.check_param(p)
        merged = validate_options({**self.defaults, **param_group, "params": params})
        merged.setdefault("skipped_steps", 0)
        super().add_param_group(merged)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in DEFAULTS.items():
                if key not in _REQUIRED_GROUP_KEYS:
                    group.setdefault(key, value)  # groups saved before the option existed
            group.setdefault("skipped_steps", 0)

    # ------------------------------------------------------------------------------- layouts

    def _layouts(self, index: int, group: dict[str, Any],
                 params: list[Tensor]) -> list[StateLayout]:
        """The layout of each of ``params`` (of ``group``), checked against existing state.

        Resolved once per parameter and cached while the group's layout options stay the
        same; when they change, existing state is checked against them first (a
        ``ValueError`` before anything changes).
        """
        cache_all = self.__dict__.setdefault("_layout_cache", {})
        options = tuple(group[k] for k in LAYOUT_OPTIONS)
        cached = cache_all.get(id(group))
        if cached is None or cached[0] is not group or cached[1] != options:
            changed = ""
            if cached is not None and cached[0] is group:
                changed = ", ".join(f"{k} changed from {a!r} to {b!r}" for k, a, b in
                                    zip(LAYOUT_OPTIONS, cached[1], options) if a != b)
            cached = (group, options, {})
            cache_all[id(group)] = cached
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    layout = self._layout(cached[2], group, p)
                    if distributed.is_flat_layout(layout):
                        if not distributed.flat_state_unchanged(state, layout):
                            raise ValueError(_layout_changed_message(p, index, changed))
                        continue
                    check_layout_unchanged(p, state, layout, index, changed)
        return [self._layout(cached[2], group, p) for p in params]

    def _layout(self, cache: dict[Tensor, StateLayout], group: dict,
                param: Tensor) -> StateLayout:
        layout = cache.get(param)
        if layout is None:
            layout = self._resolve_layout(param, group)
            cache[param] = layout
        return layout

    def _resolve_layout(self, param: Tensor, options: dict) -> StateLayout:
        """``param``'s layout under a group's (or a saved group's) ``options``: with its
        DTensor placement, or as a flat partition's container of pieces."""
        partition = self.__dict__.get("_flat_partitions", {}).get(param)
        if partition is not None:
            return distributed.flat_layout(param, partition, options)
        layout = layout_of(param, options)
        if distributed.is_dtensor(param):  # resolved once, with the layout
            layout = dataclasses.replace(layout, shard=distributed.shard_layout(param))
        return layout

    def _check_new_states(self, params: list[Tensor], layouts: list[StateLayout]) -> None:
        """Raise for a parameter whose state cannot be created (a DTensor layout the step
        does not support), before any state of any parameter is created."""
        for p, layout in zip(params, layouts):
            if distributed.is_dtensor(p) and not self.state.get(p):
                distributed.check_layout(p, layout)

    def _states(self, params: list[Tensor], layouts: list[StateLayout]) -> list[dict]:
        """Each parameter's state, created (zero) where missing."""
        states = []
        for p, layout in zip(params, layouts):
            state = self.state[p]
            if len(state) == 0:
                state.update(_new_state(p, layout))
            states.append(state)
        return states

    # ---------------------------------------------------------------------------------- step

    def _gather(self, params: Iterable[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The parameters with a gradient, and their gradients, checked."""
        out_params, grads = [], []
        for p in params:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise TypeError(
                    "CAME does not support sparse gradients (got one for a parameter of shape "
                    f"{tuple(p.shape)}); use a dense embedding (sparse=False) or "
                    "torch.optim.SparseAdam for that parameter"
                )
            if grad.is_complex():
                raise TypeError(
                    f"CAME does not support complex gradients (dtype {grad.dtype}); optimize "
                    "torch.view_as_real(param) instead"
                )
            if grad.shape != p.shape:
                raise ValueError(
                    f"gradient shape {tuple(grad.shape)} does not match parameter shape "
                    f"{tuple(p.shape)}"
                )
            out_params.append(p)
            grads.append(grad)
        return out_params, grads

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss; it
                runs with gradients enabled.

        Returns:
            The closure's loss, or None.
        """
        if not self.state and _first_step_checks(self):
            return None  # DCP's state-init call: zero state allocated, nothing stepped
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_groups([(group, group["params"]) for group in self.param_groups])
        return loss

    @torch.no_grad()
    def step_parameters(self, params: Iterable[Tensor]) -> None:
        """Step only ``params``, each with its current ``.grad`` and its group's options.

        The public per-parameter step (what :func:`torchcame.step_in_backward` uses): the
        result for a parameter equals :meth:`step`'s, since CAME's update of a tensor depends
        only on its gradient and state. Every gradient is checked before any parameter or
        state changes. ``skip_nonfinite`` applies to the given parameters of a group.

        Raises:
            ValueError: for a tensor this optimizer does not hold.
        """
        params = list(params)
        owner = {p: i for i, group in enumerate(self.param_groups) for p in group["params"]}
        chosen: dict[int, list[Tensor]] = {}
        for p in params:
            index = owner.get(p)
            if index is None:
                raise ValueError(f"step_parameters got a tensor of shape {tuple(p.shape)} that "
                                 "is not in this optimizer's param groups")
            chosen.setdefault(index, []).append(p)
        self._step_groups([(self.param_groups[i], ps) for i, ps in chosen.items()])
        # what torch's LR schedulers check to tell that the optimizer stepped
        self._opt_called = True  # type: ignore[attr-defined]

    def _step_groups(self, work: list[tuple[dict[str, Any], list[Tensor]]]) -> None:
        """Check every input of every group, then step them (one batch of collectives)."""
        index = {id(group): i for i, group in enumerate(self.param_groups)}
        prepared = []
        for group, params in work:  # every check before any change
            params, grads = self._gather(params)
            layouts = self._layouts(index[id(group)], group, params)
            self._check_new_states(params, layouts)
            prepared.append((group, params, grads, layouts))
        batch = any(distributed.is_dtensor(p) or distributed.is_flat_layout(layout)
                    for _, params, _, layouts in prepared for p, layout in zip(params, layouts))
        with distributed.batched_collectives() if batch else contextlib.nullcontext():
            for group, params, grads, layouts in prepared:
                if not params:
                    continue
                if group["skip_nonfinite"] and not _all_finite(grads, layouts):
                    group["skipped_steps"] += 1
                    continue
                step_group(params, grads, self._states(params, layouts), step_args(group),
                           layouts, foreach=group["foreach"], fused=group["fused"])

    @torch.no_grad()
    def init_state(self) -> None:
        """Allocate the zero state of every trainable parameter now, without stepping.

        State is otherwise created lazily at a parameter's first step. Call this before
        ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` /
        ``set_optimizer_state_dict`` (or ``dcp.load``) on a fresh optimizer, so the state dict
        lists every parameter's tensors (DTensors for FSDP2 parameters). Parameters that
        already have state, and those with ``requires_grad=False``, are left alone.
        """
        todo = []
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.requires_grad]
            layouts = self._layouts(index, group, params)
            self._check_new_states(params, layouts)
            todo.append((params, layouts))
        for params, layouts in todo:
            self._states(params, layouts)

    # ----------------------------------------------------------------------------- state dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of the authors' ``came_pytorch.CAME``.

        The whole dict is checked against the current parameters first: groups (sizes, a
        valid value of every option, the required hyperparameters), each parameter's state
        (keys, shapes, dtypes, a whole ``step`` >= 0, finite statistics >= 0); on any
        mismatch a ``ValueError`` is raised and nothing is loaded. The unused ``RMS`` entry
        of the authors' package is dropped, an integer ``step`` becomes a tensor, and
        statistics keep the float32 compute dtype of bf16/fp16 parameters.

        The layout options of this optimizer (``momentum_dtype``, the quantization block and
        threshold, ``factor_dims``) are kept, and the loaded momentum is converted to them:
        a float32 checkpoint loads into an 8-bit optimizer and the other way round.
        """
        if not isinstance(state_dict, dict):
            raise ValueError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
            raise ValueError("state_dict must have a 'state' dict and a 'param_groups' list")
        groups = self.param_groups
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer "
                f"has {len(groups)}"
            )
        saved_groups = [_checked_saved_group(i, g) for i, g in enumerate(saved_groups)]
        id_to_param: dict[Any, Tensor] = {}
        id_to_groups: dict[Any, tuple[dict, dict]] = {}
        for group, saved in zip(groups, saved_groups):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"a loaded parameter group has {len(saved['params'])} parameters, the "
                    f"optimizer's has {len(group['params'])}"
                )
            id_to_param.update(zip(saved["params"], group["params"]))
            id_to_groups.update((pid, (saved, group)) for pid in saved["params"])
        converted: dict[Any, dict[str, Any]] = {}
        for pid, entry in saved_state.items():
            if pid not in id_to_param:
                raise ValueError(f"state dict has state for unknown parameter id {pid!r}")
            saved, group = id_to_groups[pid]
            param = id_to_param[pid]
            where = f"parameter {pid!r}"
            layout = self._resolve_layout(param, group)
            if distributed.is_flat_layout(layout):
                entry = distributed.load_state_flat(entry, self._resolve_layout(param, saved),
                                                    layout, where)
                if entry:
                    converted[pid] = entry
                continue
            entry = convert_state(param, entry, layout_of(param, saved), layout, where)
            if entry:
                converted[pid] = _placed_state(param, entry, layout)
        for saved, group in zip(saved_groups, groups):
            saved.update({key: group[key] for key in LAYOUT_OPTIONS})  # keep this layout
        state_dict = {**state_dict, "state": {}, "param_groups": saved_groups}
        super().load_state_dict(state_dict)
        for pid, entry in converted.items():
            self.state[id_to_param[pid]] = entry


def _new_state(param: Tensor, layout: StateLayout) -> dict[str, Any]:
    if distributed.is_flat_layout(layout):
        return distributed.init_state_flat(layout)
    if distributed.is_dtensor(param):
        return distributed.init_state_dtensor(param, layout)
    return init_state(param, layout)


def _layout_changed_message(param: Tensor, index: int, changed: str) -> str:
    return (f"param group {index}: the state of a flat partition of {param.numel()} elements "
            f"was created with other layout options than the group's current ones ({changed}); "
            "these are fixed once a parameter has state")


def _placed_state(param: Tensor, entry: dict[str, Any], layout: StateLayout) -> dict[str, Any]:
    """A checked, converted state moved to ``param``'s device, dtypes and sharding."""
    if distributed.is_dtensor(param):
        return distributed.load_state_dtensor(param, entry, layout)
    out: dict[str, Any] = {"step": entry["step"]}
    for key, value in entry.items():
        if key != "step":
            out[key] = value.to(device=param.device, dtype=state_dtype(key, layout))
    return out


def _checked_saved_group(index: int, saved: Any) -> dict[str, Any]:
    """A copy of a loaded param group with every option checked (``ValueError`` naming it)
    and the options it predates at their defaults."""
    if not isinstance(saved, dict) or "params" not in saved:
        raise ValueError(f"param group {index} of the state dict is not a dict with 'params'")
    missing = [key for key in _REQUIRED_GROUP_KEYS if key not in saved]
    if missing:
        raise ValueError(
            f"param group {index} of the state dict has no {missing}: not a state dict of CAME "
            "(torchcame or came_pytorch)"
        )
    group = copy.copy(saved)
    for key, value in DEFAULTS.items():
        group.setdefault(key, value)
    group.setdefault("skipped_steps", 0)
    try:
        return validate_options(group)
    except (TypeError, ValueError) as exc:  # same type, naming the group
        raise type(exc)(f"param group {index} of the state dict: {exc}") from None


@torch.compiler.disable
def _first_step_checks(optimizer: CAME) -> bool:
    """Run before the first step; True when the call must not step at all.

    Raises for DeepSpeed ZeRO flat partitions (CAME would silently factor nothing). DCP's
    state_dict helpers build lazy state with a zero-gradient, lr=0 step, which for CAME would
    count a step and move the statistics: that call only allocates the zero state.
    Not traced by ``torch.compile`` (it inspects the caller's frames); it runs only while the
    state is empty.
    """
    if not torch.distributed.is_available():
        return False
    distributed.check_not_flat_partitions(optimizer.param_groups,
                                          optimizer.__dict__.get("_flat_partitions", {}))
    if distributed.called_from_dcp_state_init():
        optimizer.init_state()
        return True
    return False


def _all_finite(tensors: list[Tensor], layouts: list[StateLayout]) -> bool:
    """True when every element of every tensor is finite (one host sync)."""
    flat_groups = [layout.shard.group for layout in layouts if distributed.is_flat_layout(layout)]
    if flat_groups or any(distributed.is_dtensor(t) for t in tensors):  # all ranks must agree
        return distributed.all_finite(tensors, flat_groups)
    flags = [torch.isfinite(t).all() for t in tensors if t.numel() > 0]
    if not flags:
        return True
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def _signature() -> inspect.Signature:
    """``CAME.__init__``'s signature with every option spelled out (for help() and IDEs)."""
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [self_param, inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for option in OPTIONS:
        kind = (inspect.Parameter.POSITIONAL_OR_KEYWORD if option.positional
                else inspect.Parameter.KEYWORD_ONLY)
        params.append(inspect.Parameter(option.name, kind, default=option.default))
    return inspect.Signature(params, return_annotation=None)


CAME.__init__.__signature__ = _signature()  # type: ignore[attr-defined]

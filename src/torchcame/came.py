"""The CAME optimizer class: validation, param groups, state, dispatch."""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._factored import FACTOR_POLICIES
from .functional import came, init_state
from .lowbit import dequantize_blockwise, normalize_momentum_dtype, quantize_blockwise

__all__ = ["CAME"]

_DROPPED_STATE_KEYS = ("RMS",)  # stored (unused) by the authors' package

#: Group entries absent from older state dicts (and the authors' package), with the values
#: that reproduce the behaviour those dicts were saved with.
_GROUP_DEFAULTS = dict(
    maximize=False,
    foreach=None,
    fused=None,
    skip_nonfinite=False,
    skipped_steps=0,
    momentum_dtype="float32",
    quantization_block_size=256,
    min_quantized_numel=4096,
    stochastic_rounding=False,
    bias_correction=False,
    factor_dims="last_two",
    factor_min_dim=1,
)

#: Group entries that fix the layout of a parameter's state at creation.
_LAYOUT_KEYS = ("momentum_dtype", "quantization_block_size", "min_quantized_numel",
                "factor_dims", "factor_min_dim")


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN, got {value!r}")
    return value


def _check_tuple(name: str, value: Any, length: int) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a tuple of {length} numbers, got {value!r}")
    items = tuple(value)
    if len(items) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(items)}: {value!r}")
    return tuple(_check_real(f"{name}[{i}]", v) for i, v in enumerate(items))


def _check_lr(lr: Any) -> float | Tensor:
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or lr.dim() != 0:
            raise ValueError(f"lr as a Tensor must be 0-d, got shape {tuple(lr.shape)}")
        if not lr.is_floating_point():
            raise TypeError(f"lr as a Tensor must be floating point, got {lr.dtype}")
        value = float(lr.detach().cpu())
        if math.isnan(value) or value < 0.0:
            raise ValueError(f"Invalid lr: {value} (must be >= 0)")
        return lr
    if lr is None:
        raise TypeError("lr must be a float or a 0-d tensor, got None")
    value = _check_real("lr", lr)
    if value < 0.0 or math.isinf(value):
        raise ValueError(f"Invalid lr: {lr!r} (must be finite and >= 0)")
    return value


def _validate_hyperparameters(group: dict[str, Any]) -> None:
    """Check (and normalize, in place) the hyperparameters of one param group."""
    group["lr"] = _check_lr(group["lr"])
    betas = _check_tuple("betas", group["betas"], 3)
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid betas[{i}]: {beta!r} (must be in [0, 1)); betas={betas}")
    group["betas"] = betas
    eps = _check_tuple("eps", group["eps"], 2)
    for i, e in enumerate(eps):
        if e < 0.0 or math.isinf(e):
            raise ValueError(f"Invalid eps[{i}]: {e!r} (must be finite and >= 0); eps={eps}")
    group["eps"] = eps
    clip = _check_real("clip_threshold", group["clip_threshold"])
    if clip <= 0.0:
        raise ValueError(f"Invalid clip_threshold: {clip!r} (must be > 0)")
    group["clip_threshold"] = clip
    wd = _check_real("weight_decay", group["weight_decay"])
    if wd < 0.0 or math.isinf(wd):
        raise ValueError(f"Invalid weight_decay: {wd!r} (must be finite and >= 0)")
    group["weight_decay"] = wd
    group["momentum_dtype"] = normalize_momentum_dtype(group["momentum_dtype"])
    for name, low in (("quantization_block_size", 1), ("min_quantized_numel", 0),
                      ("factor_min_dim", 1)):
        value = group[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < low:
            raise ValueError(f"Invalid {name}: {value!r} (must be >= {low})")
    if group["factor_dims"] not in FACTOR_POLICIES:
        raise ValueError(
            f"Invalid factor_dims: {group['factor_dims']!r}; expected one of {FACTOR_POLICIES}"
        )
    for flag in ("maximize", "skip_nonfinite", "stochastic_rounding", "bias_correction"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{flag} must be a bool, got {group[flag]!r}")
    for flag in ("foreach", "fused"):
        if group[flag] is not None and not isinstance(group[flag], bool):
            raise TypeError(f"{flag} must be None or a bool, got {group[flag]!r}")
    if group["foreach"] and group["fused"]:
        raise ValueError("foreach=True and fused=True are exclusive; set at most one of them")


class CAME(Optimizer):
    r"""CAME: Confidence-guided Adaptive Memory Efficient optimization (Luo et al., ACL 2023).

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
        params: parameters or dicts defining parameter groups.
        lr: learning rate :math:`\eta`, a float or a 0-d tensor (default: 2e-4).
        eps: :math:`(\epsilon_1, \epsilon_2)` added to the squared gradient and to the
            instability (default: (1e-30, 1e-16)).
        clip_threshold: :math:`d`, the RMS above which the update is scaled down (default: 1.0).
        betas: :math:`(\beta_1, \beta_2, \beta_3)` for the momentum, the second moment and the
            instability (default: (0.9, 0.999, 0.9999)).
        weight_decay: decoupled weight decay :math:`\lambda`, multiplied by lr (default: 0).
        maximize: maximize the objective instead of minimizing it (default: False).
        foreach: ``True``: the multi-tensor implementation; ``False``: the per-tensor
            reference. ``None`` (with ``fused`` unset) picks the fastest path that stays bit
            for bit equal to the reference: multi-tensor on CPU and CUDA.
        fused: ``True``: the fused implementation (CPU: a C++ kernel built just in time on
            first use; CUDA: ``torch.compile``), several times faster, equal to the
            reference to float32 rounding. Opt-in.
        skip_nonfinite: if True, a param group whose gradients contain inf or NaN is not
            stepped at all (params and state untouched) and ``group["skipped_steps"]`` counts
            it; without it one bad gradient poisons the statistics for good (default: False).
            Costs one device-to-host sync per group and step.
        momentum_dtype: how the momentum m is stored between steps: ``torch.float32``
            (default), ``torch.bfloat16`` (2 bytes per element, round to nearest) or
            ``"int8"`` (block-wise absmax 8-bit, one float32 scale per
            ``quantization_block_size`` elements; vectors and tensors smaller than
            ``min_quantized_numel`` stay float32). Every factored statistic stays float32 and
            the step's math runs on a float32 m. See :mod:`torchcame.lowbit`.
        quantization_block_size: elements per int8 block (default: 256).
        min_quantized_numel: smallest tensor whose momentum is quantized (default: 4096).
        stochastic_rounding: for bf16/fp16 parameters, compute the new weight in float32 and
            round it to the parameter dtype stochastically (unbiased), so updates and weight
            decay below the format's resolution survive in expectation, without a float32
            master copy (default: False: round to nearest, as the reference does).
        bias_correction: divide m by (1 - β1^t) and the second-moment and instability
            estimates by (1 - β2^t), (1 - β3^t). Removes the early-step amplification of up to
            ~(1 - β1^t) / sqrt(1 - β3^t) of the zero-initialized rule (default: False).
        factor_dims: ``"last_two"`` (default, the reference: factor over the last two dims)
            or ``"largest"`` (the two largest dims, if both are at least ``factor_min_dim``,
            else a full second moment). ``"largest"`` stores a 1x1 conv's statistics in
            ``O(out + in)`` instead of ``2 * out * in``.
        factor_min_dim: see ``factor_dims`` (default: 1).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 2e-4,
        eps: tuple[float, float] = (1e-30, 1e-16),
        clip_threshold: float = 1.0,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        skip_nonfinite: bool = False,
        momentum_dtype: torch.dtype | str = torch.float32,
        quantization_block_size: int = 256,
        min_quantized_numel: int = 4096,
        stochastic_rounding: bool = False,
        bias_correction: bool = False,
        factor_dims: str = "last_two",
        factor_min_dim: int = 1,
    ) -> None:
        defaults = dict(
            lr=lr,
            eps=eps,
            clip_threshold=clip_threshold,
            betas=betas,
            weight_decay=weight_decay,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            skip_nonfinite=skip_nonfinite,
            momentum_dtype=momentum_dtype,
            quantization_block_size=quantization_block_size,
            min_quantized_numel=min_quantized_numel,
            stochastic_rounding=stochastic_rounding,
            bias_correction=bias_correction,
            factor_dims=factor_dims,
            factor_min_dim=factor_min_dim,
        )
        _validate_hyperparameters(dict(defaults))  # fail before any group is built
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its hyperparameters and parameters are validated first."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if isinstance(p, Tensor) and p.is_complex():
                raise TypeError(
                    f"CAME does not support complex parameters (got one of dtype {p.dtype} "
                    f"and shape {tuple(p.shape)}); optimize torch.view_as_real(param) instead"
                )
            if isinstance(p, Tensor) and not p.is_floating_point():
                raise TypeError(f"CAME can only optimize floating-point tensors, got {p.dtype}")
        merged = {**self.defaults, **param_group}
        merged.pop("params")
        _validate_hyperparameters(merged)
        param_group = {**param_group, **merged, "params": params}
        param_group.setdefault("skipped_steps", 0)
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _GROUP_DEFAULTS.items():
                group.setdefault(key, value)

    # ----------------------------------------------------------------------------------- step

    def _gather(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
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
            params.append(p)
            grads.append(grad)
        return params, grads

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

        # Validate every group's gradients before changing any state.
        gathered = [self._gather(group) for group in self.param_groups]

        with _dtensor_batch(gathered):  # FSDP2: one pair of all-reduces for all groups
            for group, (params, grads) in zip(self.param_groups, gathered):
                if not params:
                    continue
                if group["skip_nonfinite"] and not _all_finite(grads):
                    group["skipped_steps"] += 1
                    continue
                self._step_group(group, params, grads)
        return loss

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Step ``params`` (all of ``group``) with ``grads``, creating missing state."""
        states = []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state.update(init_state(p, **_layout_options(group)))
            states.append(state)
        came(
            params,
            grads,
            states,
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            clip_threshold=group["clip_threshold"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            foreach=group["foreach"],
            fused=group["fused"],
            block_size=group["quantization_block_size"],
            stochastic_rounding=group["stochastic_rounding"],
            bias_correction=group["bias_correction"],
            factor_dims=group["factor_dims"],
            factor_min_dim=group["factor_min_dim"],
        )

    @torch.no_grad()
    def init_state(self) -> None:
        """Allocate the zero state of every trainable parameter now, without stepping.

        State is otherwise created lazily at a parameter's first step. Call this before
        ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` /
        ``set_optimizer_state_dict`` (or ``dcp.load``) on a fresh optimizer, so the state dict
        lists every parameter's tensors (DTensors for FSDP2 parameters). Parameters that
        already have state, and those with ``requires_grad=False``, are left alone.
        """
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and not self.state.get(p):
                    self.state[p] = init_state(p, **_layout_options(group))

    # ----------------------------------------------------------------------------- state dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of the authors' ``came_pytorch.CAME``.

        The whole dict is checked against the current parameters first (group sizes, state
        keys, shapes); on any mismatch a ``ValueError`` is raised and nothing is loaded. The
        unused ``RMS`` entry of the authors' package is dropped, an integer ``step`` becomes a
        tensor, and statistics keep the float32 compute dtype of bf16/fp16 parameters.

        The state layout options of this optimizer (``momentum_dtype``, the quantization block
        and threshold, ``factor_dims``) are kept, and the loaded momentum is converted to them:
        a float32 checkpoint loads into an 8-bit optimizer and the other way round.
        """
        state_dict = copy.deepcopy(state_dict)
        groups = self.param_groups
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if saved_groups is None or saved_state is None:
            raise ValueError("state_dict must have 'state' and 'param_groups' entries")
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer "
                f"has {len(groups)}"
            )
        id_to_param: dict[Any, Tensor] = {}
        id_to_groups: dict[Any, tuple[dict, dict]] = {}
        for group, saved in zip(groups, saved_groups):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"a loaded parameter group has {len(saved['params'])} parameters, the "
                    f"optimizer's has {len(group['params'])}"
                )
            for key, value in _GROUP_DEFAULTS.items():
                saved.setdefault(key, value)
            hyper = {k: v for k, v in saved.items() if k != "params"}
            _validate_hyperparameters(hyper)
            id_to_param.update(zip(saved["params"], group["params"]))
            id_to_groups.update((pid, (saved, group)) for pid in saved["params"])
        converted: dict[Any, dict[str, Tensor]] = {}
        for pid, entry in saved_state.items():
            if pid not in id_to_param:
                raise ValueError(f"state dict has state for unknown parameter id {pid!r}")
            saved, group = id_to_groups[pid]
            converted[pid] = _convert_param_state(id_to_param[pid], entry, pid, saved, group)
        for saved, group in zip(saved_groups, groups):
            saved.update({key: group[key] for key in _LAYOUT_KEYS})  # keep this layout
        state_dict["state"] = {}
        super().load_state_dict(state_dict)
        for pid, entry in converted.items():
            self.state[id_to_param[pid]] = entry


def _layout_options(group: dict[str, Any]) -> dict[str, Any]:
    """The :func:`init_state` options a param group sets."""
    return dict(
        momentum_dtype=group["momentum_dtype"],
        block_size=group["quantization_block_size"],
        min_quantized_numel=group["min_quantized_numel"],
        factor_dims=group["factor_dims"],
        factor_min_dim=group["factor_min_dim"],
    )


def _convert_param_state(
    param: Tensor, entry: dict[str, Any], pid: Any, saved_group: dict, group: dict
) -> dict[str, Tensor]:
    """Check one parameter's saved state against ``param`` and convert it to our layout.

    ``saved_group`` is the parameter's group in the loaded dict (it says how its momentum was
    stored), ``group`` its group in this optimizer (the layout to convert to).
    """
    entry = {k: v for k, v in entry.items() if k not in _DROPPED_STATE_KEYS}
    if not entry:
        return {}
    is_dtensor = type(param).__name__ == "DTensor"
    if is_dtensor:  # state is checked against the global shape, then laid out like param
        meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
        expected = init_state(meta, **_layout_options(group))
    else:
        expected = init_state(param.detach().to("meta"), **_layout_options(group))
    if not any(type(v).__name__ == "DTensor" for v in entry.values()):
        entry = _convert_momentum(entry, expected, saved_group["quantization_block_size"],
                                  group["quantization_block_size"], pid)
    if is_dtensor and "exp_avg_absmax" in expected:  # DTensor int8 scales: per dim-0 slice
        from .distributed import _check_quantizable

        _check_quantizable(param, group["quantization_block_size"])  # before any change
        rows = param.shape[0]
        per_slice = expected["exp_avg_absmax"].numel() // rows if rows else 0
        slices = expected["exp_avg_absmax"].new_empty((rows, per_slice))
        expected["exp_avg_absmax"] = slices
        absmax = entry.get("exp_avg_absmax")
        if (isinstance(absmax, Tensor) and type(absmax).__name__ != "DTensor"
                and absmax.dim() == 1 and absmax.numel() == slices.numel()):
            entry = {**entry, "exp_avg_absmax": absmax.view(slices.shape)}
    missing = set(expected) - set(entry)
    unknown = set(entry) - set(expected)
    if missing or unknown:
        raise ValueError(
            f"state of parameter {pid!r} (shape {tuple(param.shape)}) does not match CAME's: "
            f"missing {sorted(missing)}, unexpected {sorted(unknown)}"
        )
    out: dict[str, Tensor] = {}
    for key, ref in expected.items():
        value = entry[key]
        if key == "step":
            step = float(value.item() if isinstance(value, Tensor) else value)
            out[key] = torch.tensor(step, dtype=torch.float32)
            continue
        if not isinstance(value, Tensor):
            raise ValueError(f"state {key!r} of parameter {pid!r} is not a tensor: {value!r}")
        if value.shape != ref.shape:
            raise ValueError(
                f"state {key!r} of parameter {pid!r} has shape {tuple(value.shape)}, expected "
                f"{tuple(ref.shape)} for a parameter of shape {tuple(param.shape)}"
            )
        if is_dtensor:
            from .distributed import to_param_layout

            out[key] = to_param_layout(param, key, value, dtype=ref.dtype)
            continue
        out[key] = value.to(device=param.device, dtype=ref.dtype)
    return out


def _convert_momentum(
    entry: dict[str, Any], expected: dict[str, Tensor], saved_block: int, block: int, pid: Any
) -> dict[str, Any]:
    """Re-encode a saved momentum (float, bf16 or int8) into the storage ``expected`` has."""
    exp_avg = entry.get("exp_avg")
    if not isinstance(exp_avg, Tensor):
        return entry  # reported by the key/shape checks
    saved_int8 = exp_avg.dtype == torch.int8
    want_int8 = expected["exp_avg"].dtype == torch.int8
    if not saved_int8 and not want_int8:
        return entry  # a cast, done with the others
    entry = dict(entry)
    if exp_avg.shape != expected["exp_avg"].shape:
        return entry  # reported by the shape check
    if saved_int8:
        absmax = entry.pop("exp_avg_absmax", None)
        if not isinstance(absmax, Tensor) or absmax.numel() != -(-exp_avg.numel() // saved_block):
            raise ValueError(
                f"int8 momentum of parameter {pid!r} has no matching 'exp_avg_absmax' for "
                f"block size {saved_block}"
            )
        if want_int8 and saved_block == block:  # the same encoding: kept bit for bit
            entry["exp_avg_absmax"] = absmax.float().reshape(-1)
            return entry
        momentum = dequantize_blockwise(exp_avg, absmax.float(), saved_block)
    else:
        momentum = exp_avg.float()
    if want_int8:
        entry["exp_avg"], entry["exp_avg_absmax"] = quantize_blockwise(momentum, block)
    else:
        entry["exp_avg"] = momentum
    return entry


def _dtensor_batch(gathered: list[tuple[list[Tensor], list[Tensor]]]) -> Any:
    """A context that defers the DTensor (FSDP2) work of all groups to one pair of
    all-reduces (:func:`torchcame.distributed.batched_collectives`); a no-op otherwise."""
    if any(type(p).__name__ == "DTensor" for params, _ in gathered for p in params):
        from .distributed import batched_collectives

        return batched_collectives()
    return contextlib.nullcontext()


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
    from .distributed import called_from_dcp_state_init, check_not_flat_partitions

    check_not_flat_partitions(optimizer.param_groups)
    if called_from_dcp_state_init():
        optimizer.init_state()
        return True
    return False


def _all_finite(tensors: list[Tensor]) -> bool:
    """True when every element of every tensor is finite (one host sync)."""
    if any(type(t).__name__ == "DTensor" for t in tensors):  # FSDP2: all ranks must agree
        from .distributed import all_finite

        return all_finite(tensors)
    flags = [torch.isfinite(t).all() for t in tensors if t.numel() > 0]
    if not flags:
        return True
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all())

"""Parameter groups for CAME (or any ``torch.optim`` optimizer): no weight decay for biases,
norm weights and, optionally, embeddings; per-name hyperparameter overrides.

``param_groups(model, weight_decay=1e-2)`` returns a list of param-group dicts to pass
straight to :class:`torchcame.CAME` (or ``torch.optim.AdamW``)::

    groups = param_groups(model, weight_decay=1e-2, overrides={"lm_head.*": {"lr": 1e-4}})
    optimizer = CAME(groups, lr=2e-4)

Rules:

- Only trainable parameters (``requires_grad``) are included, each exactly once, even when it
  is shared (tied input/output embeddings) or reachable under several names.
- A parameter is *not decayed* when it falls into one of the ``no_decay`` categories:

  ``"bias"``
      its own name (the part after the last dot) is ``bias``, starts with ``bias_`` or ends
      with ``_bias`` (``in_proj_bias``, ``bias_k`` of ``nn.MultiheadAttention``);
  ``"norm"``
      it belongs directly to a normalization module: ``nn.LayerNorm``, ``nn.RMSNorm``,
      ``nn.GroupNorm``, batch/instance norms, or any module whose class name contains
      ``"Norm"`` (``LlamaRMSNorm``, ``T5LayerNorm``, ...). Parameters of child modules of a
      norm (e.g. the ``nn.Linear`` inside an adaptive ``AdaLayerNorm``) are judged by their
      own module;
  ``"embedding"``
      it belongs directly to an ``nn.Embedding``/``nn.EmbeddingBag`` or a module whose class
      name contains ``"Embedding"`` (learned position embeddings stored as plain parameters);
      a weight tied to an embedding counts as one. Off by default: the authors' and
      Hugging Face's recipes decay embeddings;
  ``"vector"``
      it has fewer than two dimensions (every bias and norm weight, plus learned scalars).

  The default, ``("bias", "norm")``, is the rule of Hugging Face's Trainer and of most
  pretraining recipes (BERT, GPT-2, T5).
- ``overrides`` maps a name pattern to hyperparameters for the parameters it matches.
  Patterns are shell-style globs (``fnmatch``: ``*`` matches across dots) on the full
  parameter name, or compiled regular expressions (``re.compile(...)``, matched with
  ``search``). A shared parameter matches if any of its names does. The first matching
  pattern (in the dict's order) wins. A pattern that matches no trainable parameter, or
  only parameters claimed by an earlier pattern, raises ``ValueError``, so a typo cannot
  silently leave a layer at the default settings.
  A ``weight_decay`` in an override applies to the matched parameters that decay; those in
  a ``no_decay`` category keep 0.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["param_groups", "NO_DECAY_CATEGORIES", "is_norm_module", "is_embedding_module"]

#: the categories ``no_decay`` accepts
NO_DECAY_CATEGORIES = ("bias", "norm", "embedding", "vector")

_NORM_TYPES: tuple[type, ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*
)
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    _NORM_TYPES = (*_NORM_TYPES, nn.RMSNorm)

_EMBEDDING_TYPES: tuple[type, ...] = (nn.Embedding, nn.EmbeddingBag)

Pattern = str | re.Pattern


def is_norm_module(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer (by type, or ``"Norm"`` in its class name)."""
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


def is_embedding_module(module: nn.Module) -> bool:
    """Whether ``module`` is an embedding (by type, or ``"Embedding"`` in its class name)."""
    return isinstance(module, _EMBEDDING_TYPES) or "Embedding" in type(module).__name__


def _is_bias_name(leaf: str) -> bool:
    return leaf == "bias" or leaf.startswith("bias_") or leaf.endswith("_bias")


class _ParamInfo:
    """Everything known about one (deduplicated) parameter."""

    __slots__ = ("param", "names", "owners")

    def __init__(self, param: Tensor) -> None:
        self.param = param
        self.names: list[str] = []  # every name it is reachable by, canonical first
        self.owners: list[nn.Module] = []  # modules holding it directly

    def categories(self) -> set[str]:
        cats: set[str] = set()
        if any(_is_bias_name(name.rsplit(".", 1)[-1]) for name in self.names):
            cats.add("bias")
        if any(is_norm_module(m) for m in self.owners):
            cats.add("norm")
        if any(is_embedding_module(m) for m in self.owners):
            cats.add("embedding")
        if self.param.dim() < 2:
            cats.add("vector")
        return cats


def _collect(model: nn.Module) -> list[_ParamInfo]:
    """The trainable parameters of ``model`` in ``named_parameters()`` order, deduplicated."""
    infos: dict[int, _ParamInfo] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        info = infos.get(id(param))
        if info is None:
            info = infos[id(param)] = _ParamInfo(param)
        info.names.append(name)
    for module in model.modules():  # deduplicated modules; each module's own params
        for param in module.parameters(recurse=False):
            infos[id(param)].owners.append(module)
    return [info for info in infos.values() if info.param.requires_grad]


def _matches(pattern: Pattern, names: list[str]) -> bool:
    if isinstance(pattern, re.Pattern):
        return any(pattern.search(name) for name in names)
    return any(fnmatch.fnmatchcase(name, pattern) for name in names)


def _iter_examples(infos: list[_ParamInfo], limit: int = 8) -> Iterator[str]:
    for info in infos[:limit]:
        yield info.names[0]


def param_groups(
    model: nn.Module,
    weight_decay: float = 1e-2,
    *,
    no_decay: Collection[str] = ("bias", "norm"),
    overrides: Mapping[Pattern, Mapping[str, Any]] | None = None,
    param_names: bool = False,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into optimizer param groups.

    Args:
        model: the module whose parameters to group.
        weight_decay: weight decay of the parameters that decay (CAME's λ; 1e-2 is the
            authors' recommendation). Parameters in a ``no_decay`` category get 0.
        no_decay: categories of parameters that get no weight decay, a subset of
            ``("bias", "norm", "embedding", "vector")`` (see the module docstring).
        overrides: name pattern -> hyperparameters (``lr``, ``betas``, ``weight_decay``,
            ...) of the parameters it matches; first match wins; a pattern matching nothing
            raises ``ValueError``.
        param_names: also store each group's parameter names under ``"param_names"`` (the
            key ``torch.optim`` understands, torch >= 2.6); handy for checking the split.

    Returns:
        A list of param-group dicts, each with ``"params"`` and ``"weight_decay"`` (plus the
        override's keys); groups with no parameters are left out. Every trainable parameter
        is in exactly one group. Groups come in the order of their first parameter in
        ``model.named_parameters()``.

    Raises:
        ValueError: an unknown ``no_decay`` category, a negative ``weight_decay``, an override
            pattern that matches no trainable parameter (or only ones an earlier pattern
            claims), or an override that sets ``params``.
    """
    if isinstance(no_decay, str):
        no_decay = (no_decay,)
    unknown = set(no_decay) - set(NO_DECAY_CATEGORIES)
    if unknown:
        raise ValueError(
            f"unknown no_decay categories {sorted(unknown)}; choose from {NO_DECAY_CATEGORIES}"
        )
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    overrides = dict(overrides or {})
    for pattern, hyper in overrides.items():
        if not isinstance(pattern, (str, re.Pattern)):
            raise TypeError(
                f"override patterns must be str (glob) or re.Pattern, got {pattern!r}"
            )
        if not isinstance(hyper, Mapping):
            raise TypeError(f"override for {pattern!r} must be a mapping, got {hyper!r}")
        if "params" in hyper or "param_names" in hyper:
            raise ValueError(f"override for {pattern!r} must not set 'params'/'param_names'")

    infos = _collect(model)
    patterns = list(overrides)
    matched = [False] * len(patterns)  # the pattern matches some trainable parameter
    used = [False] * len(patterns)  # ... and is the first match of at least one
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for info in infos:
        which = -1  # index of the first matching override, -1 for none
        for i, pattern in enumerate(patterns):
            if _matches(pattern, info.names):
                matched[i] = True
                if which < 0:
                    which = i
                    used[i] = True
        decays = not (info.categories() & set(no_decay))
        key = (which, decays)
        group = groups.get(key)
        if group is None:
            hyper = dict(overrides[patterns[which]]) if which >= 0 else {}
            group_wd = hyper.pop("weight_decay", weight_decay) if decays else 0.0
            hyper.pop("weight_decay", None)
            group = groups[key] = {"params": [], "weight_decay": group_wd, **hyper}
            if param_names:
                group["param_names"] = []
        group["params"].append(info.param)
        if param_names:
            group["param_names"].append(info.names[0])

    shadowed = [_show(p) for p, m, u in zip(patterns, matched, used) if m and not u]
    if shadowed:
        raise ValueError(
            f"override pattern(s) {shadowed} only match parameters that an earlier pattern "
            "already claims (the first matching pattern wins); reorder or remove them"
        )
    unused = [p for p, m in zip(patterns, matched) if not m]
    if unused:
        shown = ", ".join(_iter_examples(infos))
        raise ValueError(
            f"override pattern(s) {[_show(p) for p in unused]} match no trainable parameter "
            f"of {type(model).__name__}; names look like: {shown}"
            + (", ..." if len(infos) > 8 else "")
            + " (globs use fnmatch on the full name, e.g. 'lm_head.*' or '*.attn.*')"
        )
    return list(groups.values())


def _show(pattern: Pattern) -> str:
    return f"re.compile({pattern.pattern!r})" if isinstance(pattern, re.Pattern) else pattern


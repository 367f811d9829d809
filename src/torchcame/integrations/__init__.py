"""Integrations: parameter groups, Hugging Face ``transformers.Trainer``, Accelerate, torchtitan.

``param_groups`` needs only torch. The Trainer helpers live in
:mod:`torchcame.integrations.transformers` and import nothing from ``transformers`` (they read
``TrainingArguments`` attributes), so importing this package never requires it. The torchtitan
optimizer container is in :mod:`torchcame.integrations.torchtitan`, which this package does
not import (it needs torchtitan: ``pip install 'torchcame[torchtitan]'``).
See ``docs/integrations.md``.
"""

from .param_groups import NO_DECAY_CATEGORIES, is_embedding_module, is_norm_module, param_groups
from .transformers import (
    came_from_training_args,
    came_kwargs_from_training_args,
    came_optimizer_cls_and_kwargs,
)

__all__ = [
    "param_groups",
    "NO_DECAY_CATEGORIES",
    "is_norm_module",
    "is_embedding_module",
    "came_from_training_args",
    "came_kwargs_from_training_args",
    "came_optimizer_cls_and_kwargs",
]

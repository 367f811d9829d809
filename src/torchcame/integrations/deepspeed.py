"""DeepSpeed ZeRO 1/2/3 with CAME: exact, factored CAME on DeepSpeed's flat partitions.

DeepSpeed's ZeRO optimizers give the client optimizer flat 1-D fp32 partitions instead of the
model's parameters; a plain CAME would run its vector rule on them (no factoring, no
confidence, RMS over an arbitrary slice), so ``CAME.step`` refuses them. Build the engine with
:func:`initialize` instead of ``deepspeed.initialize`` -- the same arguments and return value,
with a :class:`torchcame.CAME` as ``optimizer``::

    from torchcame import CAME
    from torchcame.integrations import deepspeed as came_deepspeed

    optimizer = CAME(param_groups, lr=2e-4, weight_decay=1e-2)
    engine, optimizer, loader, scheduler = came_deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config)

It reads from DeepSpeed's optimizer where every parameter's elements sit in each rank's
partition (:func:`partition_maps`) and hands the map to CAME
(:meth:`torchcame.CAME.attach_flat_partitions`). Every rank then steps exactly as one process
holding the full tensors would, with up to 3 small all-reduces per param group and step
(4 with int8 momentum; :mod:`torchcame.flat_partition`). ``engine.save_checkpoint`` /
``load_checkpoint`` save and restore CAME's state per rank, bit for bit.

Covered: ZeRO stages 1, 2 and 3 in fp32 and bf16 (stage 1 with bf16 and fp32 gradient
accumulation runs DeepSpeed's ``BF16_Optimizer``, the same layout). Without ZeRO, DeepSpeed
hands CAME whole tensors and nothing needs attaching. Refused before the engine is built, with the
reason: optimizer offload (``offload_optimizer``), and ``elastic_checkpoint`` (both assume an
optimizer whose state has the partition's shape); universal checkpoints are not supported.
Tested with DeepSpeed 0.19 (``DS_ACCELERATOR=cpu``, gloo).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..came import CAME
from ..distributed import UnsupportedShardingError
from ..flat_partition import FlatPartition

__all__ = ["initialize", "attach", "partition_maps", "check_config"]


def _deepspeed():
    try:
        import deepspeed
    except ImportError as exc:  # pragma: no cover - exercised only without deepspeed
        raise ImportError("torchcame.integrations.deepspeed needs DeepSpeed "
                          "(pip install 'torchcame[deepspeed]')") from exc
    return deepspeed


def initialize(args: Any = None, model: torch.nn.Module | None = None,
               optimizer: CAME | None = None, *rest: Any, **kwargs: Any) -> tuple:
    """``deepspeed.initialize`` for a :class:`torchcame.CAME` optimizer under ZeRO.

    Takes ``deepspeed.initialize``'s arguments (``args``, ``model``, ``optimizer``,
    ``model_parameters``, ..., ``config``) and returns what it returns: ``(engine, optimizer,
    training_dataloader, lr_scheduler)``. The config (a dict, a path, or
    ``args.deepspeed_config``) gets ``"zero_allow_untested_optimizer": true`` added (this
    path is the tested one) and is checked first (:func:`check_config`). After DeepSpeed has
    partitioned the parameters, the partition map of every flat partition is attached to
    ``optimizer``.

    Raises:
        TypeError: ``optimizer`` is not a CAME instance (a callable building one is not
            supported: build the CAME first).
        UnsupportedShardingError: a configuration CAME cannot step exactly (see
            :func:`check_config`), before anything is built.
    """
    deepspeed = _deepspeed()
    if not isinstance(optimizer, CAME):
        raise TypeError("torchcame.integrations.deepspeed.initialize needs optimizer=CAME(...), "
                        f"got {type(optimizer).__name__}")
    args, kwargs = _with_config(args, kwargs)
    result = deepspeed.initialize(args, model, optimizer, *rest, **kwargs)
    attach(result[0])
    return result


def attach(engine: Any) -> None:
    """Attach the partition maps of a DeepSpeed ``engine`` built elsewhere (by Accelerate's
    DeepSpeed plugin, say) to its CAME optimizer; call it before the first step.

    :func:`initialize` calls this. The engine's config is checked as :func:`check_config`
    does (building it needed ``"zero_allow_untested_optimizer": true``).

    Raises:
        TypeError: the engine's client optimizer is not a :class:`torchcame.CAME`.
        UnsupportedShardingError: see :func:`check_config`.
    """
    optimizer = engine.optimizer
    while optimizer is not None and not isinstance(optimizer, CAME):
        optimizer = getattr(optimizer, "optimizer", None)  # DeepSpeed's wrappers' client
    if optimizer is None:
        raise TypeError("torchcame.integrations.deepspeed.attach: the engine's optimizer "
                        f"({type(engine.optimizer).__name__}) does not wrap a torchcame.CAME")
    if isinstance(getattr(engine, "config", None), Mapping):
        check_config(engine.config)
    maps = partition_maps(engine.optimizer, engine.module)
    if maps:
        optimizer.attach_flat_partitions(maps)


def _with_config(args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The arguments with the config loaded, checked and marked as allowed for CAME."""
    key = "config" if kwargs.get("config") is not None else "config_params"
    config = kwargs.get(key)
    from_args = config is None and getattr(args, "deepspeed_config", None) is not None
    if from_args:
        config = args.deepspeed_config
    if config is None:
        return args, kwargs  # deepspeed.initialize raises its own error
    if not isinstance(config, Mapping):
        from deepspeed import load_ds_config

        config = load_ds_config(config)
    config = copy.deepcopy(dict(config))
    check_config(config)
    config.setdefault("zero_allow_untested_optimizer", True)
    kwargs = dict(kwargs)
    if from_args:
        args = copy.copy(args)
        args.deepspeed_config = None
        key = "config"
    kwargs[key] = config
    return args, kwargs


def check_config(config: Mapping[str, Any]) -> None:
    """Raise :class:`~torchcame.distributed.UnsupportedShardingError` for a DeepSpeed config
    under which CAME's state would not be handled correctly.

    - ``zero_optimization.offload_optimizer`` (ZeRO-Offload, CPU or NVMe): DeepSpeed's
      offload paths expect an elementwise optimizer -- its CPU Adam kernels, the NVMe swapper
      paging state tensors of the partition's shape, and (ZeRO-3 partial offload) an AdamW
      built from the client's param groups. None of that knows CAME's factored state.
    - ``zero_optimization.elastic_checkpoint``: merges and re-splits every state tensor as if
      it had the partition's shape; CAME's row and column statistics do not.
    """
    zero = config.get("zero_optimization") or {}
    offload = zero.get("offload_optimizer") or {}
    device = offload.get("device", "none") if isinstance(offload, Mapping) else "none"
    if str(device).lower() not in ("none", ""):
        raise UnsupportedShardingError(
            f"zero_optimization.offload_optimizer.device={device!r} is not supported with CAME: "
            "DeepSpeed's optimizer offload expects an elementwise optimizer (its CPU Adam "
            "kernels, an NVMe swapper that pages state tensors of the partition's shape, an "
            "AdamW fallback built from the client's groups for partial offload), none of which "
            "knows CAME's factored state. CAME's state is small (one momentum plus O(rows + "
            "cols) per matrix; momentum_dtype='int8' makes it about 1 byte per parameter): "
            "keep it on the device"
        )
    if zero.get("elastic_checkpoint"):
        raise UnsupportedShardingError(
            "zero_optimization.elastic_checkpoint is not supported with CAME: it merges and "
            "re-splits every optimizer state tensor as if it had the partition's shape, and "
            "CAME's row and column statistics do not. Checkpoints load at the world size they "
            "were saved at"
        )


# ------------------------------------------------------------------------- partition maps


def _names(module: torch.nn.Module | None) -> dict[int, str]:
    if module is None:
        return {}
    return {id(p): n for n, p in module.named_parameters()}


def _offset_in(param: Tensor, flat: Tensor) -> int:
    """Where ``param``'s storage starts in the flat buffer it is a view of."""
    data = param.data
    same = data.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    if not same or not data.is_contiguous():
        raise RuntimeError(
            f"torchcame: a parameter of shape {tuple(param.shape)} is not a contiguous view of "
            "DeepSpeed's flat buffer, so its position in the partition cannot be read "
            f"(DeepSpeed {_version()} may lay out partitions differently from 0.19)")
    return data.storage_offset() - flat.storage_offset()


def _version() -> str:
    return getattr(_deepspeed(), "__version__", "?")


def _group_rank_world(group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(group=group), dist.get_world_size(group=group)


def partition_maps(zero_optimizer: Any, module: torch.nn.Module | None = None,
                   ) -> dict[Tensor, FlatPartition]:
    """The partition map of every flat tensor DeepSpeed's ``zero_optimizer`` (the engine's
    ``optimizer``) hands its client optimizer, keyed by that tensor.

    - ZeRO-1/2 (``DeepSpeedZeroOptimizer``) and ZeRO-1 with bf16 and fp32 gradient
      accumulation (``BF16_Optimizer``): each group's parameters are views of one flat
      low-precision buffer; their offsets in it and the partition size give
      :meth:`FlatPartition.contiguous`. For ZeRO-1/2 the result is checked against
      DeepSpeed's own ``params_in_partition`` and ``first_offset``.
    - ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): each sub-group's parameters (``ds_shape``)
      split into ``partition_numel()`` pieces: :meth:`FlatPartition.per_parameter`.
    - Anything else (no ZeRO; its bf16/fp16 wrapper ``FP16_UnfusedOptimizer`` keeps one fp32
      copy per parameter): CAME holds whole tensors of the right shapes; no map.

    Raises:
        RuntimeError: DeepSpeed's layout is not the one this reads (another version).
    """
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    names = _names(module)
    if isinstance(zero_optimizer, DeepSpeedZeroOptimizer_Stage3):
        return _stage3_maps(zero_optimizer, names)
    if isinstance(zero_optimizer, DeepSpeedZeroOptimizer):
        maps = _contiguous_maps(zero_optimizer.bit16_groups, zero_optimizer.bit16_groups_flat,
                                zero_optimizer.single_partition_of_fp32_groups,
                                zero_optimizer.real_dp_process_group, names)
        _check_stage12(zero_optimizer, maps)
        return maps
    if isinstance(zero_optimizer, BF16_Optimizer):
        return _contiguous_maps(zero_optimizer.bf16_groups, zero_optimizer.bf16_groups_flat,
                                zero_optimizer.fp32_groups_flat_partition,
                                zero_optimizer.real_dp_process_group, names)
    return {}


def _contiguous_maps(groups, lp_flats, partitions, process_groups,
                     names) -> dict[Tensor, FlatPartition]:
    maps = {}
    for params, lp_flat, fp32, group in zip(groups, lp_flats, partitions, process_groups):
        rank, world = _group_rank_world(group)
        size = lp_flat.numel() // world
        if fp32.numel() != size or lp_flat.numel() != size * world:
            raise RuntimeError(
                f"torchcame: DeepSpeed's partition of {fp32.numel()} elements does not divide "
                f"its flat buffer of {lp_flat.numel()} into {world} equal parts "
                f"(DeepSpeed {_version()})")
        maps[fp32] = FlatPartition.contiguous(
            [tuple(p.shape) for p in params], [_offset_in(p, lp_flat) for p in params], size,
            rank, world, group, [names.get(id(p), "") for p in params])
    return maps


def _check_stage12(zero_optimizer: Any, maps: dict[Tensor, FlatPartition]) -> None:
    """The map must say what DeepSpeed's own bookkeeping says: which parameters the rank's
    partition touches, and how far into the first one it starts."""
    for i, fp32 in enumerate(zero_optimizer.single_partition_of_fp32_groups):
        partition = maps[fp32]
        params = zero_optimizer.bit16_groups[i]
        ours = {id(params[piece.index]) for piece in partition.pieces}
        theirs = {id(p) for p in zero_optimizer.params_in_partition[i]}
        first = [piece.start for piece in partition.pieces if piece.offset == 0]
        if ours != theirs or (first and first[0] != zero_optimizer.first_offset[i]):
            raise RuntimeError(
                f"torchcame: the partition map read for param group {i} disagrees with "
                "DeepSpeed's params_in_partition / first_offset "
                f"(DeepSpeed {_version()} lays out partitions differently from 0.19)")


def _stage3_maps(zero_optimizer: Any, names: dict[int, str]) -> dict[Tensor, FlatPartition]:
    maps = {}
    groups = getattr(zero_optimizer, "sub_group_process_groups", None)
    for i, params in enumerate(zero_optimizer.fp16_groups):
        group = groups[i] if groups else zero_optimizer.dp_process_group
        rank, world = _group_rank_world(group)
        shapes = [tuple(p.ds_shape) for p in params]
        for p, shape in zip(params, shapes):
            if p.partition_numel() != -(-math.prod(shape) // world):
                raise RuntimeError(
                    f"torchcame: DeepSpeed's ZeRO-3 piece of a parameter of shape {shape} has "
                    f"{p.partition_numel()} elements, not ceil(numel / {world}) "
                    f"(DeepSpeed {_version()})")
        fp32 = zero_optimizer.fp32_partitioned_groups_flat[i]
        partition = FlatPartition.per_parameter(shapes, rank, world, group,
                                                [names.get(id(p), "") for p in params])
        if fp32.numel() != partition.numel:
            raise RuntimeError(f"torchcame: DeepSpeed's ZeRO-3 sub-group {i} holds "
                               f"{fp32.numel()} elements, its pieces {partition.numel}")
        maps[fp32] = partition
    return maps

"""Helpers for distributed recipes: one code path for torchrun on CPU (gloo) and CUDA (nccl).

``init_distributed`` reads the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), picks the device and the backend that goes
with it, and returns a :class:`DistContext` with a 1-D device mesh. Without torchrun it sets up
a one-process group, so the same script runs alone. ``shard_model`` applies FSDP2
(``fully_shard``) to each transformer block and then to the root, or wraps the model in DDP.
``local_batch`` gives each rank its slice of a global batch, so a run on N ranks sees exactly
the data of a run on one.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistContext",
    "init_distributed",
    "pick_backend",
    "pick_device",
    "shard_model",
    "local_batch",
    "all_reduce_mean",
    "cleanup",
]


@dataclass
class DistContext:
    """The process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    mesh: Any  # torch.distributed.device_mesh.DeviceMesh, 1-D over all ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(local_rank: int, device: str | None = None) -> torch.device:
    """``device`` if given, else ``cuda:<local_rank>`` when CUDA is available, else CPU."""
    if device and device != "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def pick_backend(device: torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str | None = None) -> DistContext:
    """Initialize the default process group from torchrun's environment (or alone).

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``None``/``"auto"`` (CUDA if available).

    Returns:
        A :class:`DistContext`; its ``mesh`` is a 1-D mesh over all ranks for ``fully_shard``.
    """
    from torch.distributed.device_mesh import init_device_mesh

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(local_rank, device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = pick_backend(dev)
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:  # torchrun
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        else:  # a plain `python script.py`: one process, same code path
            dist.init_process_group(
                backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
            )
    mesh = init_device_mesh(dev.type, (world_size,))
    return DistContext(rank, world_size, local_rank, dev, backend, mesh)


def shard_model(
    model: nn.Module,
    blocks: Iterable[nn.Module],
    ctx: DistContext,
    *,
    fsdp: bool = True,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """FSDP2: ``fully_shard`` each block, then the root (which holds embeddings, tied head,
    final norm). Otherwise DDP. Parameters become DTensors sharded on dim 0 with FSDP2.

    Args:
        model: the model, already on ``ctx.device``.
        blocks: the repeated layers (e.g. ``model.transformer.h`` of a GPT-2).
        ctx: from :func:`init_distributed`.
        fsdp: FSDP2 if True, else ``DistributedDataParallel``.
        param_dtype: FSDP2 mixed precision (compute dtype of the unsharded parameters;
            gradients are reduced and the optimizer steps in float32).
    """
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"mesh": ctx.mesh}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype,
                                                   reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def local_batch(batch: Tensor, ctx: DistContext) -> Tensor:
    """This rank's rows of a global batch (every rank draws the same global batch).

    The global batch size must be divisible by the world size, so that the mean loss over
    ranks (FSDP2 and DDP average gradients) equals the loss of the global batch.
    """
    n = batch.shape[0]
    if n % ctx.world_size:
        raise ValueError(
            f"global batch size {n} is not divisible by the world size {ctx.world_size}"
        )
    per = n // ctx.world_size
    return batch[ctx.rank * per : (ctx.rank + 1) * per]


def all_reduce_mean(value: Tensor) -> Tensor:
    """Mean of a scalar over all ranks (for logging)."""
    value = value.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def cleanup() -> None:
    """Destroy the default process group if there is one."""
    if dist.is_initialized():
        dist.destroy_process_group()

"""Memory measurement for optimizers and training steps, on CPU and CUDA.

CUDA has an allocator that counts bytes (``torch.cuda.max_memory_allocated``); the CPU
allocator has no such statistic. :class:`TensorAllocationTracker` fills the gap: it is a
``TorchDispatchMode`` that sees every ATen operator call (forward, backward and optimizer
step alike), records the storage of every *new* tensor an operator returns, and attaches a
``weakref`` finalizer to that storage so its bytes are subtracted when it is freed. It keeps
the current and the peak number of bytes held by live tensors created inside the mode.

Typical use, for one training step::

    from torchcame.memory import measure_step_memory, optimizer_state_bytes

    report = measure_step_memory(step_fn, device="cpu", baseline=[model, optimizer])
    print(report.peak_bytes, report.allocated_peak_bytes, optimizer_state_bytes(optimizer))

What counts: storages created by operators while the mode is active (activations, gradients,
optimizer temporaries, lazily created optimizer state). What does not: tensors that existed
before (parameters, existing state) -- pass them as ``baseline`` to add them -- views and
in-place results (they share an input's storage), and memory that is not a tensor (the
allocator's caching, Python objects, BLAS workspaces). It is therefore a lower bound of the
process's resident memory, and a faithful count of what the tensors of a step need.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "TensorAllocationTracker",
    "StepMemory",
    "measure_step_memory",
    "optimizer_state_bytes",
    "tensor_bytes",
    "module_bytes",
    "MB",
]

MB = 1024.0 * 1024.0


def _storage_key(t: Tensor) -> tuple[str, int]:
    """Identify a storage by its device and data pointer (unique among live storages)."""
    return (str(t.device), t.untyped_storage().data_ptr())


class TensorAllocationTracker(TorchDispatchMode):
    """Count the bytes of live tensors created by operators while the mode is active.

    Attributes:
        current_bytes: bytes of storages created inside the mode that are still alive.
        peak_bytes: the maximum of ``current_bytes`` since entering (or :meth:`reset_peak`).
        allocations: number of new storages seen.
        total_allocated_bytes: bytes of all new storages seen, freed or not.

    Only storages on ``devices`` are counted (default: every device). A storage that an
    operator returns but which was already an input (in-place ops, views, ``out=``) is not a
    new allocation and is skipped. Storages without data (meta tensors, size 0) count 0.

    The finalizers stay attached after the mode exits, so ``current_bytes`` keeps falling as
    tensors created inside are freed; read the numbers you need before or right after exit.
    """

    def __init__(self, devices: Iterable[str | torch.device] | None = None) -> None:
        super().__init__()
        self._devices = None if devices is None else {torch.device(d).type for d in devices}
        self._live: dict[tuple[str, int], int] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self.allocations = 0
        self.total_allocated_bytes = 0

    def reset_peak(self) -> None:
        """Set the peak to the current number of live bytes."""
        self.peak_bytes = self.current_bytes

    def _release(self, key: tuple[str, int], nbytes: int) -> None:
        if self._live.get(key) == nbytes:
            del self._live[key]
            self.current_bytes -= nbytes

    def _record(self, t: Tensor, input_keys: set[tuple[str, int]]) -> None:
        if t.device.type == "meta":
            return
        if self._devices is not None and t.device.type not in self._devices:
            return
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0:
            return
        key = (str(t.device), storage.data_ptr())
        if key in input_keys or key in self._live:
            return  # a view or in-place result, or a storage already counted
        self._live[key] = nbytes
        self.current_bytes += nbytes
        self.allocations += 1
        self.total_allocated_bytes += nbytes
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
        weakref.finalize(storage, self._release, key, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        flat_in, _ = tree_flatten((args, kwargs))
        input_keys = {
            _storage_key(a)
            for a in flat_in
            if isinstance(a, Tensor) and a.device.type != "meta" and _has_storage(a)
        }
        out = func(*args, **kwargs)
        flat_out, _ = tree_flatten(out)
        for o in flat_out:
            if isinstance(o, Tensor) and _has_storage(o):
                self._record(o, input_keys)
        return out


def _has_storage(t: Tensor) -> bool:
    try:
        t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested, functional wrappers
        return False
    return True


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (non-tensors are ignored).

    Tensors sharing a storage (views, tied weights) are counted once.
    """
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if isinstance(t, Tensor) and _has_storage(t) and t.device.type != "meta":
            seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def module_bytes(module: torch.nn.Module, *, grads: bool = False) -> int:
    """Bytes of a module's parameters and buffers (and of their ``.grad`` if ``grads``)."""
    tensors: list[Tensor] = list(module.parameters()) + list(module.buffers())
    if grads:
        tensors += [p.grad for p in module.parameters() if p.grad is not None]
    return tensor_bytes(tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, *, include_scalars: bool = True) -> int:
    """Bytes of the tensors an optimizer keeps in ``optimizer.state``.

    Args:
        optimizer: any ``torch.optim.Optimizer``; state is created lazily, so call this after
            at least one ``step()``.
        include_scalars: count 0-d tensors (such as ``step`` counters) too.

    Returns:
        The total size in bytes of the distinct storages of all state tensors.
    """
    tensors = [value for value in _state_tensors(optimizer)
               if include_scalars or value.dim() > 0]
    return tensor_bytes(tensors)


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every tensor in ``optimizer.state``, nested ones too (a flat partition's pieces)."""
    flat, _ = tree_flatten([dict(state) for state in optimizer.state.values()])
    return [value for value in flat if isinstance(value, Tensor)]


@dataclass
class StepMemory:
    """Memory of one measured step, in bytes.

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        method: ``"dispatch-tracker"`` (CPU) or ``"cuda-allocator"``.
        baseline_bytes: bytes of the tensors alive before the step that were passed as
            ``baseline`` (on CUDA: ``torch.cuda.memory_allocated`` before the step).
        allocated_peak_bytes: peak bytes of tensors created during the step and alive at the
            same time.
        peak_bytes: ``baseline_bytes + allocated_peak_bytes`` (on CUDA: the allocator's peak).
        seconds: wall time of the measured step (slowed down by the tracker on CPU).
    """

    device: str
    method: str
    baseline_bytes: int
    allocated_peak_bytes: int
    peak_bytes: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _baseline_tensors(baseline: Iterable[Any]) -> list[Tensor]:
    tensors: list[Tensor] = []
    for item in baseline:
        if isinstance(item, torch.nn.Module):
            tensors += list(item.parameters()) + list(item.buffers())
            tensors += [p.grad for p in item.parameters() if p.grad is not None]
        elif isinstance(item, torch.optim.Optimizer):
            tensors += _state_tensors(item)
        elif isinstance(item, Tensor):
            tensors.append(item)
        else:
            flat, _ = tree_flatten(item)
            tensors += [t for t in flat if isinstance(t, Tensor)]
    return tensors


def measure_step_memory(
    step_fn: Callable[[], Any],
    *,
    device: str | torch.device = "cpu",
    baseline: Iterable[Any] = (),
) -> StepMemory:
    """Run ``step_fn()`` once and measure the peak memory of its tensors.

    On CUDA this uses the caching allocator's statistics (``reset_peak_memory_stats`` then
    ``max_memory_allocated``), which already include everything alive. Elsewhere it runs the
    step under :class:`TensorAllocationTracker` and adds the bytes of ``baseline`` -- modules
    (parameters, buffers, existing gradients), optimizers (their state) or tensors alive
    before the step -- to the tracked peak.

    Args:
        step_fn: a closure doing one full step (forward, backward, ``optimizer.step()``,
            ``zero_grad``).
        device: the device the step runs on.
        baseline: modules, optimizers and tensors alive before the step.

    Returns:
        A :class:`StepMemory`.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        step_fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device)
        return StepMemory("cuda", "cuda-allocator", before, peak - before, peak, seconds)
    base = tensor_bytes(_baseline_tensors(baseline))
    tracker = TensorAllocationTracker(devices=[device.type])
    start = time.perf_counter()
    with tracker:
        step_fn()
    seconds = time.perf_counter() - start
    peak = tracker.peak_bytes
    return StepMemory(device.type, "dispatch-tracker", base, peak, base + peak, seconds)

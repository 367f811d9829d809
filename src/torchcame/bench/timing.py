"""The one timing harness: candidates stepped in turn, round after round, and medians of
per-round ratios against a yardstick.

Machines are shared and noisy (2x between rounds), so a candidate is never timed in a block
of its own: each round steps every candidate once, starting from a different one each round,
and a candidate's figure is the median over rounds of its time divided by the yardstick's
time in the same round. ``torchcame bench`` and the scripts under ``benchmarks/`` use this.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["timed", "interleaved_times", "median_ratios", "median_times"]


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | None = None) -> float:
    """Seconds of one call of ``fn`` (synchronizing ``device`` before and after)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved_times(
    steps: dict[str, Callable[[], Any]],
    rounds: int,
    device: torch.device | None = None,
    on_step: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Time every callable once per round, ``rounds`` rounds, rotating the starting one.

    Returns each name's list of per-round seconds (round ``r`` at index ``r``).
    """
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(steps[name], device))
            if on_step is not None:
                on_step()
    return times


def median_ratios(times: dict[str, list[float]], base: str,
                  names: Iterable[str] | None = None) -> dict[str, float]:
    """Median over rounds of each candidate's time over ``base``'s time in the same round."""
    base_times = times[base]
    return {name: statistics.median(t / b for t, b in zip(times[name], base_times))
            for name in (times if names is None else names)}


def median_times(times: dict[str, list[float]]) -> dict[str, float]:
    """Median seconds of each candidate."""
    return {name: statistics.median(t) for name, t in times.items()}

"""One-time warnings shared by the implementations (a message is shown once per process)."""

from __future__ import annotations

import warnings

__all__ = ["warn_once"]

_warned: set[str] = set()


def warn_once(message: str, stacklevel: int = 4) -> None:
    """Warn ``message`` (a ``RuntimeWarning``) the first time it is given."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)

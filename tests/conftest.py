"""Shared fixtures of the torchcame test suite.

The configuration table, shapes and tolerances are in ``cases.py``, the oracle of the spec in
``oracle.py``, the training driver and input helpers in ``driver.py``.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

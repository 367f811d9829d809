"""Shared fixtures of the torchcame test suite.

The configuration table, shapes and tolerances are in ``cases.py``, the oracle of the spec in
``oracle.py``, the training driver and input helpers in ``driver.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels (tests/test_triton.py) run under Triton's interpreter, which
# must be on before triton is first imported (torch._dynamo imports it); torch's inductor reads
# it only for GPU kernels, so CPU tests are unaffected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

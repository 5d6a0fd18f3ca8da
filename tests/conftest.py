"""Shared test setup.

TRITON_INTERPRET must be set before anything imports triton: the Triton kernel tests then run on
the CPU through the interpreter (CI sets it too; without a GPU nothing else could run them).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """Bit-identical comparisons need the same float reduction order in every process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

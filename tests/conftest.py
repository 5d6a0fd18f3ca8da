"""Shared test setup.

TRITON_INTERPRET must be set before anything imports triton: the Triton kernel tests then run on
the CPU through the interpreter (CI sets it too; without a GPU nothing else could run them).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

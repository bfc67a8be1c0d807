"""Shared fixtures: the devices tests run on; one thread per xdist worker."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs in two worker processes (pyproject: -n 2) on the 2-core CI machine: one
    # thread each, or they oversubscribe the cores and slow each other down several times.
    # Subprocesses the tests start (the CLI, DDP ranks) inherit the setting.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every test that takes ``device`` runs on the CPU, and on CUDA when a GPU is there
    (skipped otherwise, listed in pytest's summary)."""
    return torch.device(request.param)

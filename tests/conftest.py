"""Shared fixtures: the devices tests run on."""

from __future__ import annotations

import pytest
import torch

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

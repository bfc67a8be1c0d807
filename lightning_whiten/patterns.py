"""Glob patterns on qualified module names, shared by model surgery and schedules."""

from __future__ import annotations

import fnmatch

__all__ = ["in_scope"]


def in_scope(name: str, pattern: str) -> bool:
    """Whether the module ``name`` (``"layer1.0.bn1"``), or one of its ancestors
    (``"layer1.0"``, ``"layer1"``), matches the glob ``pattern``: so ``"layer1"`` selects
    everything inside ``layer1`` and ``"*.bn1"`` every ``bn1``."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(len(parts), 0, -1))

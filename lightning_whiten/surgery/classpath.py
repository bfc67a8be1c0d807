"""Dotted class paths (``"torch.nn.BatchNorm2d"``): writing them, and resolving them safely."""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import Any

__all__ = ["class_path", "import_class"]


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def import_class(path: str, *, allow_import: bool = True) -> Any:
    """The object a dotted path names, or a ``ValueError`` that says which part was not found.

    With ``allow_import=False`` (names read from a checkpoint or another untrusted source) only
    modules that are already imported are searched: resolving a name never runs a module's
    top-level code.
    """
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"not a class path: {path!r} (expected 'package.module.Class')")
    # Nested qualnames (Outer.Inner): the longest prefix that is a module.
    parts = module_name.split(".")
    for cut in range(len(parts), 0, -1):
        candidate = ".".join(parts[:cut])
        if candidate in sys.modules or allow_import:
            try:
                obj: Any = sys.modules.get(candidate) or importlib.import_module(candidate)
            except ImportError:
                continue
            break
    else:
        if not allow_import:
            raise ValueError(
                f"{path!r} names a module that is not imported ({module_name}); a class named by "
                "a checkpoint is only resolved from modules already imported (import it first, "
                "or pass trust=True if you trust the file)"
            )
        raise ValueError(f"cannot import {module_name!r} for the class path {path!r}")
    for name in [*parts[cut:], attr]:
        if not hasattr(obj, name):
            public = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(name, public, n=1)
            prefix = path[: path.rfind(name)].rstrip(".")
            hint = f"; did you mean {prefix}.{close[0]}?" if close else ""
            raise ValueError(f"{prefix!r} has no {name!r} (class path {path!r}){hint}")
        obj = getattr(obj, name)
    return obj

"""Selection patterns (globs on qualified names, module types), stages and producers."""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Sequence
from typing import Union

from torch import nn

from ..patterns import in_scope
from .classpath import class_path, import_class
from .targets import Candidate

__all__ = ["Pattern", "check_patterns_match", "matches", "normalize_patterns", "pattern_to_str"]

#: A selection pattern: a glob on qualified module names, or a module type.
Pattern = Union[str, type]  # noqa: UP007 (a runtime alias, not an annotation)


def normalize_patterns(
    patterns: Pattern | Sequence[Pattern] | None, *, allow_import: bool = True
) -> list[Pattern]:
    """Accept one pattern or a list; ``"type:pkg.Class"`` strings name a type (for YAML).

    With ``allow_import=False`` (patterns read from a checkpoint) a type is only resolved from
    modules already imported (see :func:`~lightning_whiten.surgery.classpath.import_class`).
    """
    if patterns is None:
        return []
    if isinstance(patterns, (str, type)):
        patterns = [patterns]
    elif not isinstance(patterns, (list, tuple)):
        raise TypeError(
            f"selection patterns are a glob string, a type or a list of them, got {patterns!r}"
        )
    result: list[Pattern] = []
    for p in patterns:
        if isinstance(p, str) and p.startswith("type:"):
            cls = import_class(p[len("type:") :], allow_import=allow_import)
            if not isinstance(cls, type):
                raise ValueError(f"{p!r} does not name a class")
            result.append(cls)
        elif isinstance(p, (str, type)):
            result.append(p)
        else:
            raise TypeError(f"selection patterns are glob strings or types, got {p!r}")
    return result


def pattern_to_str(pattern: Pattern) -> str:
    return pattern if isinstance(pattern, str) else f"type:{class_path(pattern)}"


def matches(candidate: Candidate, pattern: Pattern) -> bool:
    """A name pattern matches a module whose qualified name, or an ancestor's, fits the glob
    (so ``"layer1"`` selects everything inside ``layer1``); a type matches by ``isinstance``."""
    if isinstance(pattern, type):
        return isinstance(candidate.module, pattern)
    return any(in_scope(name, pattern) for name in candidate.names)


def check_patterns_match(
    patterns: list[Pattern],
    candidates: list[Candidate],
    option: str,
    model: nn.Module,
    what: str = "normalization module",
) -> None:
    """A pattern that matches no candidate module is an error listing close names."""
    for pattern in patterns:
        if any(matches(c, pattern) for c in candidates):
            continue
        if isinstance(pattern, type):
            present = sorted({type(c.module).__name__ for c in candidates})
            raise ValueError(
                f"{option} type {pattern.__name__} matches no {what}; the model "
                f"has: {', '.join(present) or 'none'}"
            )
        pool = list(
            dict.fromkeys([c.name for c in candidates] + [n for n, _ in model.named_modules() if n])
        )
        matched = [n for n in pool if fnmatch.fnmatchcase(n, pattern)]
        if matched:
            more = f" and {len(matched) - 5} more" if len(matched) > 5 else ""
            raise ValueError(
                f"{option} pattern {pattern!r} matches modules ({', '.join(matched[:5])}{more}) "
                f"but none of them is or contains a {what}"
            )
        close = difflib.get_close_matches(pattern, pool, n=5, cutoff=0.5)
        if not close:
            stem = pattern.split("*")[0].split("?")[0].rstrip(".")
            close = [n for n in pool if stem and n.startswith(stem.split(".")[0])][:5]
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(f"{option} pattern {pattern!r} matches no {what}{hint}")


def stage_of(model: nn.Module, candidates: list[Candidate]) -> dict[int, int]:
    """Stage index per candidate (keyed by ``id(module)``).

    Uses timm's ``feature_info`` (the module ending each feature level: stage 0 ends with the
    first entry, e.g. the stem) or, failing that, torchvision-style ``layer1..layerN`` children
    (stage ``k`` is ``layerk``, stage 0 everything before ``layer1``).
    """
    order = [name for name, _ in model.named_modules()]
    position = {name: i for i, name in enumerate(order)}
    boundaries: list[int] = []
    feature_info = getattr(model, "feature_info", None)
    if feature_info is not None:
        try:
            modules = [f["module"] for f in feature_info]
        except (TypeError, KeyError):
            modules = (
                list(feature_info.module_name()) if hasattr(feature_info, "module_name") else []
            )
        for mod in modules:
            inside = [i for n, i in position.items() if n == mod or n.startswith(mod + ".")]
            if inside:
                boundaries.append(max(inside))
    if not boundaries:
        layers = sorted(
            (int(m.group(1)), n) for n in position if (m := re.fullmatch(r"layer(\d+)", n))
        )
        if not layers:
            raise ValueError(
                "stages= needs a timm model with feature_info or torchvision-style layer1..N "
                "children; select modules with include= glob patterns instead"
            )
        first = position[layers[0][1]]
        boundaries.append(first - 1)
        for _, n in layers:
            boundaries.append(
                max(i for m, i in position.items() if m == n or m.startswith(n + "."))
            )
    boundaries.sort()
    stages: dict[int, int] = {}
    for c in candidates:
        p = position.get(c.name, c.index)
        stage = next((k for k, end in enumerate(boundaries) if p <= end), len(boundaries))
        stages[id(c.module)] = stage
    return stages


def preceding_conv(model: nn.Module, candidate: Candidate) -> nn.Module | None:
    """The convolution registered just before ``candidate`` in its parent, if any.

    Module order is how torchvision's ``Conv2dNormActivation`` and timm's blocks lay out
    ``conv -> norm``; it is only used to keep whitening groups inside the groups of a grouped
    convolution, where a wrong guess costs decorrelation but never correctness.
    """
    parent, attr, _ = candidate.slots[0]
    previous = None
    for name, child in parent.named_children():
        if name == attr:
            break
        previous = child
    if previous is None:
        return None
    leaves = [m for m in previous.modules() if next(m.children(), None) is None] or [previous]
    last = leaves[-1]
    return last if isinstance(last, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else None

"""Griffe extension: Sphinx roles in the docstrings (``:class:`~lightning_whiten.IterNorm```)
become Markdown for mkdocstrings, and an rST literal-block marker (a paragraph ending in
``::``, whose indented block Markdown already shows as code) ends in one colon.

A role naming a public object of a module with an API page (``lightning_whiten.layers.IterNorm``,
a top-level name such as ``lightning_whiten.convert``, or one of their members) becomes a
cross-reference, which the strict build checks; any other (``torch``, a private module, a method
named without its class) becomes inline code. ``~`` shows the last component only, as in Sphinx.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")
LITERAL = re.compile(r"(?<=\S)::\n\n")
# The modules rendered in docs/api/ (the page of each lists its public names, ``__all__``).
API_MODULES = (
    "layers", "functional", "surgery", "registry", "callbacks", "schedules", "diagnostics",
    "sam", "adversarial", "checkpoint", "distributed", "models", "data",
)  # fmt: skip


class SphinxRoles(griffe.Extension):
    def __init__(self) -> None:
        self.pending: list[griffe.Object] = []

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            self.pending.append(obj)

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != "lightning_whiten":
            return
        exports = _top_level_exports(pkg)
        public = {name: set(_all(pkg, name)) for name in API_MODULES}

        def markdown(match: re.Match[str]) -> str:
            short, target = match.group(1), match.group(2).strip()
            shown = target.rsplit(".", 1)[-1] if short else target
            parts = target.split(".")
            if parts[0] == "lightning_whiten" and len(parts) >= 2 and parts[1] in exports:
                parts = ["lightning_whiten", exports[parts[1]], *parts[1:]]
            if (
                len(parts) >= 3
                and parts[0] == "lightning_whiten"
                and parts[2] in public.get(parts[1], ())
                and not any(p.startswith("_") for p in parts)
            ):
                if len(parts) == 3 and _shadowed(pkg, parts[1], parts[2]):
                    parts.append(parts[2])  # rendered at its defining module (docs/api/)
                return f"[`{shown}`][{'.'.join(parts)}]"
            return f"`{shown}`"

        for obj in self.pending:
            text = ROLE.sub(markdown, obj.docstring.value)
            obj.docstring.value = LITERAL.sub(":\n\n", text)
        self.pending.clear()


def _all(pkg: griffe.Module, module: str) -> list[str]:
    try:
        names = pkg[module].exports
    except (KeyError, griffe.AliasResolutionError):
        return []
    return [n if isinstance(n, str) else n.name for n in names or ()]


def _shadowed(pkg: griffe.Module, module: str, name: str) -> bool:
    """``lightning_whiten.<module>.<name>`` is a function re-exported under the name of the
    submodule that defines it (``surgery.convert``): griffe sees the submodule there."""
    try:
        member = pkg[module].members[name]
        return member.is_module and name in member.members
    except (KeyError, griffe.AliasResolutionError):
        return False


def _top_level_exports(pkg: griffe.Module) -> dict[str, str]:
    """``lightning_whiten._EXPORTS`` (public name -> submodule), read statically."""
    try:
        value = pkg["_EXPORTS"].value
        return ast.literal_eval(str(value))
    except (KeyError, ValueError, SyntaxError):
        return {}

"""The fenced examples of the README and of the documentation pages (docs/), for the tests that
run them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def blocks(page: str, language: str, section: str | None = None) -> list[str]:
    """The fenced ``language`` blocks of ``page`` (a path from the repository root, e.g.
    ``"docs/guide/sam-on.md"``), or of its section whose heading starts with ``section`` (up to
    the next heading of the same or a higher level)."""
    text = (ROOT / page).read_text()
    if section is not None:
        lines, level, kept, fenced = text.splitlines(keepends=True), None, [], False
        for line in lines:
            heading = None if fenced else re.match(r"(#+) ", line)  # "# ..." in a block is code
            if line.startswith("```"):
                fenced = not fenced
            if heading and level is not None and len(heading.group(1)) <= level:
                break
            if heading and level is None and line[heading.end() :].startswith(section):
                level = len(heading.group(1))
            if level is not None:
                kept.append(line)
        assert level is not None, f"{page} has no section {section!r}"
        text = "".join(kept)
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)

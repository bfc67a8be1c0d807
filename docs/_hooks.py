"""MkDocs hook: serve the repository files the pages link to (recipes, benchmark results).

Pages link to them root-relatively (``/recipes/quickstart.yaml``), which GitHub resolves against
the repository root; with ``validation.absolute_links: relative_to_docs`` mkdocs resolves the same
links against the files added here, checks that they exist and rewrites them as relative links.
The benchmark results' markdown files become pages outside the navigation.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

ROOT = Path(__file__).resolve().parent.parent
SHARED = ("recipes/*.yaml", "benchmarks/results/*.md", "benchmarks/results/*.png")


def on_files(files: Files, config) -> Files:
    for pattern in SHARED:
        for path in sorted(ROOT.glob(pattern)):
            uri = path.relative_to(ROOT).as_posix()
            files.append(
                File.generated(
                    config, uri, abs_src_path=str(path), inclusion=InclusionLevel.NOT_IN_NAV
                )
            )
    return files

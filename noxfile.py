"""Developer sessions: ``uvx nox -s tests``, ``-s lint``, ``-s bench``, ``-s docs``.

Each session syncs the locked environment with uv into its own virtualenv.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["lint", "tests"]


def _sync(session: nox.Session) -> None:
    session.run_install(
        "uv",
        "sync",
        "--locked",
        "--group",
        "dev",
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
    )


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (the same command as CI)."""
    _sync(session)
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    _sync(session)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def bench(session: nox.Session) -> None:
    """Layer- and model-level benchmarks; writes JSON to benchmarks/results/."""
    _sync(session)
    session.run("python", "-m", "benchmarks.run", *session.posargs)


@nox.session
def oldest(session: nox.Session) -> None:
    """The fast test subset against the oldest releases the install requirements allow
    (``--resolution lowest-direct``: torch 2.11 / torchvision 0.26, lightning 2.5, timm 1.0.20,
    ...), so that the ranges in pyproject.toml stay true."""
    session.run_install(
        "uv", "pip", "install", "--python", session.virtualenv.location,
        "--resolution", "lowest-direct", "-e", ".", "--group", "dev",
    )  # fmt: skip
    session.run("pytest", "-q", "-m", "not slow", *session.posargs)


@nox.session
def norm_study(session: nox.Session) -> None:
    """Normalization study (init probes, landscape, covariate shift, convergence) on Digits;
    writes benchmarks/results/norm_study.{json,md} and its plots."""
    _sync(session)
    session.run("python", "-m", "benchmarks.norm_study", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (mkdocs.yml, docs/) built into site/ with warnings as errors."""
    _sync(session)
    # Material's banner about MkDocs 2 is not a build warning; keep the log to real ones.
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})

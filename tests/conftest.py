"""Shared test helpers: run the CLI, fingerprint directories."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptconv.cli import main

try:  # hypothesis is a test dependency; only tests/test_properties.py uses it
    from hypothesis import settings

    # CI draws the same examples on every run (a failure is one to fix, not a
    # flake); HYPOTHESIS_PROFILE=explore draws new ones.
    settings.register_profile("ci", derandomize=True)
    settings.register_profile("explore", derandomize=False)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:
    pass


def digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or the file itself) -> sha256, to prove IN is unchanged."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def cli():
    """``cli(*args)`` runs ckptconv in-process and returns click's Result."""

    def run(*args: str):
        return CliRunner().invoke(main, [str(a) for a in args])

    return run

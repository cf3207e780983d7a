"""Shared test helpers: run the CLI, fingerprint directories."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptconv.cli import main


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

"""Shared test helpers: run the CLI, fingerprint directories, and the local
S3 and GCS servers the bucket tests run against (``stores``, ``bucket``)."""

from __future__ import annotations

import hashlib
import os
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptconv.cli import main

sys.path.insert(0, str(Path(__file__).parent))
import servers  # noqa: E402

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


# -- local S3 and GCS servers (tests/servers.py), for the bucket tests ---------------


@pytest.fixture(scope="session")
def stores(tmp_path_factory):
    """``{"s3": Server | reason, "gs": Server | reason}``, the env set for them."""
    empty = tmp_path_factory.mktemp("aws") / "empty"
    empty.write_text("")
    got: dict[str, object] = {}
    for scheme, start in (("s3", servers.start_moto), ("gs", servers.start_fake_gcs)):
        try:
            got[scheme] = start()
        except servers.Unavailable as e:
            got[scheme] = str(e)
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
        # Fewer lines of noise from the AWS credential chain on stderr.
        "AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty),
    }
    if isinstance(got["s3"], servers.Server):
        env["AWS_ENDPOINT_URL_S3"] = got["s3"].url
    if isinstance(got["gs"], servers.Server):
        env["TENSORSTORE_GCS_HTTP_URL"] = got["gs"].url
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield got
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    for s in got.values():
        if isinstance(s, servers.Server):
            s.stop()


def _bucket(stores, scheme: str) -> str:
    server = stores[scheme]
    if not isinstance(server, servers.Server):
        pytest.skip(f"{scheme}:// server cannot start here: {server}")
    name = f"ckpt-{uuid.uuid4().hex[:16]}"
    servers.create_bucket(server, name)
    return f"{scheme}://{name}"


@pytest.fixture(params=["s3", "gs"])
def bucket(request, stores) -> str:
    """A new, empty bucket's URL, on each store."""
    return _bucket(stores, request.param)

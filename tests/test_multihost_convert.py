"""``ckptconv to-scan/to-loop`` and ``ckptconv.convert`` as two processes of one
``jax.distributed`` program on localhost (CPU, 2 devices each): each process
writes only its leaves into ``ocdbt.process_<i>/``, process 0 merges and
commits; the output equals the one-process conversion bit for bit, Orbax
restores it in one process and ``ckptconv.restore`` in two, sharded. A killed
process stops the other with an error naming it, leaving no OUT."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from click.testing import CliRunner

import ckptconv
from ckptconv import storage
from ckptconv.cli import main

HERE = Path(__file__).parent
TIMEOUT = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def layer() -> dict:
        return {"attn": {"w": rng.standard_normal((32, 32)).astype(np.float32),
                         "b": rng.standard_normal(32).astype(np.float32)},
                "mlp": {"w": rng.standard_normal((32, 64)).astype(np.float32)}}

    params = {f"layer_{i}": layer() for i in range(4)}
    params["embed"] = rng.standard_normal((64, 32)).astype(np.float32)
    mu = {f"layer_{i}": layer() for i in range(4)}
    mu["embed"] = rng.standard_normal((64, 32)).astype(np.float32)
    return {"params": params, "opt_state": {"count": np.int32(3), "mu": mu}, "step": np.int64(7)}


@pytest.fixture(scope="module")
def loop_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mh") / "loop"
    with ocp.StandardCheckpointer() as c:
        c.save(path, _tree())
    return path


@pytest.fixture(scope="module")
def manager_root(tmp_path_factory) -> Path:
    """A CheckpointManager root with two steps, each a train state and metrics."""
    root = tmp_path_factory.mktemp("mh") / "root"
    with ocp.CheckpointManager(root, item_names=("state", "metrics")) as m:
        for step in (1, 2):
            m.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_tree(step)),
                metrics=ocp.args.JsonSave({"loss": step / 10})))
        m.wait_until_finished()
    return root


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    return {**env, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2", **extra}


def _start(argv_for, env: dict[str, str], n: int = 2) -> list[subprocess.Popen]:
    coordinator = f"127.0.0.1:{_free_port()}"
    return [subprocess.Popen(argv_for(coordinator, i), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(n)]


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            done.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def _cli2(cmd: str, src: Path, dst: Path, env: dict[str, str]) -> list[tuple[int, str, str]]:
    return _finish(_start(lambda c, i: [
        sys.executable, "-m", "ckptconv", cmd, str(src), str(dst), "--coordinator", c,
        "--num-processes", "2", "--process-id", str(i)], env))


def _leaves(path: Path) -> list[tuple[str, np.ndarray]]:
    import jax

    return [(jax.tree_util.keystr(k), np.asarray(v))
            for k, v in jax.tree_util.tree_leaves_with_path(ckptconv.load(path))]


def _assert_same(a: Path, b: Path) -> None:
    la, lb = _leaves(a), _leaves(b)
    assert [k for k, _ in la] == [k for k, _ in lb]
    for (k, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), k


def _db_arrays(db: Path) -> set[str]:
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{db}/"}).result()
    return {k.decode().split("/", 1)[0] for k in kv.list().result()}


def test_to_scan_to_loop_and_restore_two_processes(loop_ckpt, tmp_path):
    # The chunk-copy engine, so that the leaves really are split (the clone
    # engine is process 0's alone: test_clone_engine_two_processes).
    env = _env(CKPTCONV_CLONE="0")
    one = tmp_path / "scan_one"
    ckptconv.convert(loop_ckpt, one, to="scan", distributed=False)
    out = tmp_path / "scan_two"
    start = time.monotonic()
    runs = _cli2("to-scan", loop_ckpt, out, env)
    for rc, stdout, err in runs:
        assert rc == 0, err[-3000:]
        assert f"wrote {out}" in stdout
    assert time.monotonic() - start < 60
    _assert_same(one, out)
    with ocp.StandardCheckpointer() as c:
        restored = c.restore(out)
    import jax

    for (k, want), got in zip(_leaves(one), jax.tree_util.tree_leaves(restored)):
        got = np.asarray(got)
        assert got.dtype == want.dtype and np.array_equal(got, want), k
    # Orbax's multi-host layout: the process databases stay, the root references them.
    assert (out / "ocdbt.process_0" / "manifest.ocdbt").is_file()
    assert (out / "ocdbt.process_1" / "manifest.ocdbt").is_file()
    assert (out / "commit_success.txt").is_file()
    assert not list(tmp_path.glob(".*ckptconv-tmp*"))
    mine = [_db_arrays(out / f"ocdbt.process_{i}") for i in range(2)]
    assert mine[0] and mine[1] and not mine[0] & mine[1]
    assert mine[0] | mine[1] == _db_arrays(out)
    meta = json.loads((out / "_METADATA").read_bytes())
    assert len(mine[0] | mine[1]) == len(meta["tree_metadata"])

    # Back to loop form with the library's distributed=..., two processes.
    back = tmp_path / "loop_back"
    runs = _finish(_start(lambda c, i: [
        sys.executable, str(HERE / "multihost_convert_run.py"), "convert", str(out), str(back),
        c, str(i), "loop"], env))
    for rc, _, err in runs:
        assert rc == 0, err[-3000:]
    _assert_same(loop_ckpt, back)

    # Restored by two processes, each leaf sharded over both.
    runs = _finish(_start(lambda c, i: [
        sys.executable, str(HERE / "multihost_convert_run.py"), "restore", str(out), c, str(i)],
        _env()))
    got = []
    for rc, stdout, err in runs:
        assert rc == 0, err[-3000:]
        got.append(json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1]))
    assert sorted(g["process"] for g in got) == [0, 1]
    for g in got:
        assert g["processes"] == 2 and g["shards"] == g["equal"] == 2 * g["leaves"]
        assert g["split"] > 0


def test_three_processes_split_the_leaves_three_ways(loop_ckpt, tmp_path):
    """Nothing assumes two: three processes each write a share (by bytes) into
    their own database, and the result is the one-process conversion."""
    env = _env(CKPTCONV_CLONE="0", JAX_NUM_CPU_DEVICES="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    one = tmp_path / "scan_one"
    ckptconv.convert(loop_ckpt, one, to="scan", distributed=False)
    out = tmp_path / "scan_three"
    runs = _finish(_start(lambda c, i: [
        sys.executable, "-m", "ckptconv", "to-scan", str(loop_ckpt), str(out), "--coordinator", c,
        "--num-processes", "3", "--process-id", str(i)], env, n=3))
    for rc, stdout, err in runs:
        assert rc == 0, err[-3000:]
        assert f"wrote {out}" in stdout
    _assert_same(one, out)
    mine = [_db_arrays(out / f"ocdbt.process_{i}") for i in range(3)]
    assert all(mine) and not (mine[0] & mine[1] or mine[0] & mine[2] or mine[1] & mine[2])
    assert mine[0] | mine[1] | mine[2] == _db_arrays(out)
    with ocp.StandardCheckpointer() as c:
        restored = c.restore(out)
    import jax

    for (k, want), got in zip(_leaves(one), jax.tree_util.tree_leaves(restored)):
        assert np.array_equal(np.asarray(got), want), k
    assert not list(tmp_path.glob(".*ckptconv-tmp*"))


def test_clone_engine_two_processes(loop_ckpt, tmp_path):
    """The clone engine is metadata-only: process 0 alone clones, the other waits."""
    one = tmp_path / "scan_one"
    ckptconv.convert(loop_ckpt, one, to="scan", distributed=False)
    out = tmp_path / "scan_two"
    for rc, _, err in _cli2("to-scan", loop_ckpt, out, _env()):
        assert rc == 0, err[-3000:]
    _assert_same(one, out)
    assert not list(tmp_path.glob(".*ckptconv-tmp*"))


def test_killed_process_stops_the_other(loop_ckpt, tmp_path):
    env = _env(CKPTCONV_CLONE="0", CKPTCONV_BARRIER_TIMEOUT="5", CKPTCONV_MULTIHOST_PAUSE="60")
    out = tmp_path / "scan"
    procs = _start(lambda c, i: [
        sys.executable, "-m", "ckptconv", "to-scan", str(loop_ckpt), str(out), "--coordinator", c,
        "--num-processes", "2", "--process-id", str(i)], env)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".scan.ckptconv-tmp-*/ocdbt.process_1/manifest.ocdbt")):
            assert time.monotonic() < deadline, "process 1 never wrote its database"
            assert procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("Error: process 1 did not finish 'written' within 5 s"), err
    assert waited < 30
    assert not out.exists()
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())


def test_process_flag_errors(loop_ckpt, tmp_path, monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(main, ["to-scan", str(loop_ckpt), str(out), "--num-processes", "2",
                               "--process-id", "0"])
    assert res.exit_code == 2
    assert res.output == (
        "Error: --num-processes 2 needs --coordinator HOST:PORT (or JAX_COORDINATOR_ADDRESS): "
        "process 0's address, the same for every process\n")
    res = runner.invoke(main, ["to-loop", str(loop_ckpt), str(out), "--coordinator",
                               "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"])
    assert res.exit_code == 2
    assert res.output == "Error: --process-id 2 is out of range for --num-processes 2: give 0 … 1\n"
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    res = runner.invoke(main, ["extract", str(loop_ckpt), str(out), "--only", "params"])
    assert res.exit_code == 2
    assert res.output == (
        "Error: --num-processes 2 needs --process-id (or JAX_PROCESS_ID): 0 … 1, a different "
        "one for each process\n")
    assert not out.exists()


def test_one_process_imports_no_jax(loop_ckpt, tmp_path):
    """No flags: msgpack and the Orbax clone engine import no JAX, as before."""
    src = tmp_path / "in.msgpack"
    ckptconv.save({"layer_0": {"w": np.ones(3)}, "layer_1": {"w": np.ones(3)}}, src,
                  format="msgpack")
    code = (
        "import sys\n"
        "from ckptconv.cli import main\n"
        f"main(['to-scan', {str(src)!r}, {str(tmp_path / 'o.msgpack')!r}], standalone_mode=False)\n"
        f"main(['to-scan', {str(loop_ckpt)!r}, {str(tmp_path / 'o')!r}], standalone_mode=False)\n"
        "assert 'jax' not in sys.modules, 'jax imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                         text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "o" / "commit_success.txt").is_file()


def _manager_restore(root: Path | str, step: int) -> dict:
    with ocp.CheckpointManager(root, item_names=("state", "metrics")) as m:
        assert m.all_steps() == [step]
        got = m.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), metrics=ocp.args.JsonRestore()))
    return {"state": got.state, "metrics": got.metrics}


def test_manager_root_two_processes(manager_root, tmp_path):
    """A CheckpointManager root (what MaxText and Flax trainers write): the
    changed item is split between the processes, the metrics item and the
    step's files are process 0's, and the step is committed once both are
    written."""
    env = _env(CKPTCONV_CLONE="0")
    one = tmp_path / "scan_one"
    ckptconv.convert(manager_root, one, to="scan", distributed=False)
    out = tmp_path / "scan_two"
    for rc, stdout, err in _cli2("to-scan", manager_root, out, env):
        assert rc == 0, err[-3000:]
        assert f"wrote {out}" in stdout
    _assert_same(one / "2" / "state", out / "2" / "state")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in (out / "2").iterdir()) == sorted(p.name for p in (one / "2").iterdir())
    assert (out / "2" / "metrics" / "metrics").read_bytes() == (
        manager_root / "2" / "metrics" / "metrics").read_bytes()
    mine = [_db_arrays(out / "2" / "state" / f"ocdbt.process_{i}") for i in range(2)]
    assert mine[0] and mine[1] and not mine[0] & mine[1]
    assert mine[0] | mine[1] == _db_arrays(out / "2" / "state")
    got = _manager_restore(out, 2)
    assert got["metrics"] == {"loss": 0.2}
    import jax

    for (k, want), have in zip(_leaves(one / "2" / "state"), jax.tree_util.tree_leaves(got["state"])):
        assert np.array_equal(np.asarray(have), want), k
    assert not list(tmp_path.glob(".*ckptconv-tmp*"))

    # A step directory back to loop form, by the library's distributed=.
    back = tmp_path / "loop_step"
    runs = _finish(_start(lambda c, i: [
        sys.executable, str(HERE / "multihost_convert_run.py"), "convert", str(out / "2"),
        str(back), c, str(i), "loop"], env))
    for rc, _, err in runs:
        assert rc == 0, err[-3000:]
    _assert_same(manager_root / "2" / "state", back / "state")
    assert (back / "metrics" / "metrics").read_bytes() == (
        manager_root / "2" / "metrics" / "metrics").read_bytes()
    assert (back / "_CHECKPOINT_METADATA").is_file()


def _keys(url: str) -> list[str]:
    return storage.as_path(url).keys()


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_bucket_two_processes(stores, scheme, loop_ckpt, manager_root, tmp_path):
    """Two processes write into a bucket: each its own ``ocdbt.process_<i>``,
    merged by reference by process 0 (OCDBT writes the root's B-tree only:
    no data travels again), the commit markers last; and read from it."""
    from conftest import _bucket

    url = _bucket(stores, scheme)
    env = _env()
    one = tmp_path / "scan_one"
    ckptconv.convert(loop_ckpt, one, to="scan", distributed=False)
    item = f"{url}/scan"
    for rc, stdout, err in _cli2("to-scan", loop_ckpt, item, env):
        assert rc == 0, err[-3000:]
        assert f"wrote {item}" in stdout
    keys = _keys(item)
    assert {"commit_success.txt", "_METADATA", "manifest.ocdbt", "ocdbt.process_0/manifest.ocdbt",
            "ocdbt.process_1/manifest.ocdbt"} <= set(keys)
    # The root database holds B-tree nodes only; the data stay in the process databases.
    root_data = sum(len(storage.as_path(f"{item}/{k}").read_bytes()) for k in keys if k.startswith("d/"))
    share_data = sum(len(storage.as_path(f"{item}/{k}").read_bytes()) for k in keys
                     if k.startswith("ocdbt.process_") and "/d/" in k)
    assert share_data > 16 * 1024 and root_data < share_data / 4, (root_data, share_data)
    local = tmp_path / "downloaded"
    storage.copy_tree(storage.as_path(item), local)
    _assert_same(one, local)
    with ocp.StandardCheckpointer() as c:
        restored = c.restore(local)
    import jax

    for (k, want), got in zip(_leaves(one), jax.tree_util.tree_leaves(restored)):
        assert np.array_equal(np.asarray(got), want), k

    # Bucket in, local out: back to loop form.
    back = tmp_path / "loop_back"
    for rc, _, err in _cli2("to-loop", item, back, env):
        assert rc == 0, err[-3000:]
    _assert_same(loop_ckpt, back)

    # A manager root into the bucket: a MaxText pod run's case.
    root_one = tmp_path / "root_one"
    ckptconv.convert(manager_root, root_one, to="scan", distributed=False)
    root = f"{url}/root"
    for rc, _, err in _cli2("to-scan", manager_root, root, env):
        assert rc == 0, err[-3000:]
    keys = set(_keys(root))
    assert {"2/commit_success.txt", "2/state/commit_success.txt", "2/metrics/metrics",
            "2/state/ocdbt.process_1/manifest.ocdbt", "2/_CHECKPOINT_METADATA"} <= keys
    local_root = tmp_path / "root_downloaded"
    storage.copy_tree(storage.as_path(root), local_root)
    _assert_same(root_one / "2" / "state", local_root / "2" / "state")
    assert _manager_restore(local_root, 2)["metrics"] == {"loss": 0.2}


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_killed_process_on_a_bucket_leaves_nothing(stores, scheme, loop_ckpt):
    from conftest import _bucket

    url = f"{_bucket(stores, scheme)}/scan"
    env = _env(CKPTCONV_BARRIER_TIMEOUT="5", CKPTCONV_MULTIHOST_PAUSE="60")
    procs = _start(lambda c, i: [
        sys.executable, "-m", "ckptconv", "to-scan", str(loop_ckpt), url, "--coordinator", c,
        "--num-processes", "2", "--process-id", str(i)], env)
    try:
        deadline = time.monotonic() + 60
        while "ocdbt.process_1/manifest.ocdbt" not in _keys(url):
            assert time.monotonic() < deadline, "process 1 never wrote its database"
            assert procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGKILL)
        _, err = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("Error: process 1 did not finish 'written' within 5 s"), err
    assert line.endswith(f"(what was written under {url} was deleted.)"), line
    assert _keys(url) == []


def test_msgpack_refused_by_every_process(tmp_path):
    src = tmp_path / "in.msgpack"
    ckptconv.save({"layer_0": {"w": np.ones(3)}, "layer_1": {"w": np.ones(3)}}, src,
                  format="msgpack")
    out = tmp_path / "out.msgpack"
    for rc, _, err in _cli2("to-scan", src, out, _env(CKPTCONV_BARRIER_TIMEOUT="5")):
        assert rc == 2, err[-3000:]
        assert err.strip().splitlines()[-1] == (
            f"Error: {src}: a multi-process conversion takes an Orbax checkpoint to Orbax, not "
            "msgpack to msgpack; run it as one process (without --num-processes)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.msgpack"]

"""Orbax checkpoints in buckets (gs://, s3://), against local servers started here.

moto's S3 server and fake-gcs-server (tests/servers.py) run once per session
on 127.0.0.1; each test gets buckets of its own. The process environment
points TensorStore at them (``AWS_*`` with ``AWS_ENDPOINT_URL_S3``, and
``TENSORSTORE_GCS_HTTP_URL``, which TensorStore reads once, so it is set
before anything here touches the gcs driver), and CLI subprocesses inherit
it. A store whose server cannot start on this machine is skipped, saying
why; nothing else is skipped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

import ckptconv
from ckptconv import storage
from ckptconv import tree as treelib
from ckptconv.errors import FormatError, OutputExistsError

sys.path.insert(0, str(Path(__file__).parent))
import servers  # noqa: E402

LAYERS, H = 3, 16


# -- checkpoints ------------------------------------------------------------------


def _loop_tree(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    layer = lambda: {  # noqa: E731
        "attn": {"kernel": rng.standard_normal((H, H)).astype(np.float32)},
        "norm": {"scale": rng.standard_normal((H,)).astype(np.float32)},
        "q8": rng.integers(-128, 127, (4, H), dtype=np.int8),
    }
    return {
        "params": {
            **{f"layer_{i}": layer() for i in range(LAYERS)},
            "embed": rng.standard_normal((8, H)).astype(np.float32),
        },
        "step": np.int32(7),
    }


def _train_state() -> dict:
    import optax

    params = _loop_tree(1)["params"]
    opt_state = optax.adam(1e-3).init(params)
    # Orbax saves the optax state as nested containers; keep it as dicts/lists.
    opt = [
        {"count": np.asarray(opt_state[0].count), "mu": opt_state[0].mu, "nu": opt_state[0].nu},
        {},
    ]
    return {"params": params, "opt_state": opt, "step": np.int32(3)}


def _save(path: Path, tree: dict, zarr3: bool = False) -> Path:
    path = path.absolute()
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_zarr3=zarr3)) as c:
        c.save(path, args=ocp.args.PyTreeSave(tree))
    return path


def _manager(root: Path) -> Path:
    with ocp.CheckpointManager(root.absolute(), item_names=("state", "metrics")) as m:
        for step in (10, 20):
            m.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_loop_tree(step)),
                metrics=ocp.args.JsonSave({"loss": step / 10})))
        m.wait_until_finished()
    return root


def _arrays(path) -> dict:
    """Every array leaf: path -> (dtype, shape, bytes)."""
    out = {}
    for p, x in treelib.leaves_with_paths(ckptconv.load(path)):
        a = np.asarray(x)
        out["/".join(map(str, p))] = (a.dtype.str, a.shape, a.tobytes())
    return out


def _upload(src: Path, url: str) -> storage.BucketPath:
    """A local checkpoint copied to ``url`` as Orbax's save on GCS leaves it:
    each item and step with its commit_success.txt (Orbax 0.11 writes none on
    local disk; 0.12 does)."""
    dst = storage.as_path(url)
    storage.copy_tree(src, dst)
    keys = dst.keys()
    for key in keys:
        name = key.rsplit("/", 1)[-1]
        if name in ("_METADATA", "_CHECKPOINT_METADATA"):
            marker = key[: -len(name)] + "commit_success.txt"
            if marker not in keys:
                (dst / marker).write_bytes(b"Checkpoint commit was successful")
    return dst


def _download(url: str, dst: Path) -> Path:
    """The objects under ``url`` copied to ``dst`` (through TensorStore)."""
    storage.copy_tree(storage.as_path(url), dst)
    return dst


def _orbax_restore(item: Path) -> dict:
    with ocp.PyTreeCheckpointer() as c:
        return c.restore(item.absolute())


def _keys(url: str) -> list[str]:
    return storage.as_path(url).keys()


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k] == b[k], k


# -- round trips ----------------------------------------------------------------


@pytest.mark.parametrize("zarr3", [False, True], ids=["zarr2", "zarr3"])
def test_round_trip_bit_identical_to_local(bucket, tmp_path, zarr3):
    """to-scan then to-loop: local->bucket, bucket->bucket, bucket->local, each
    bit-identical to the same conversion on local disk."""
    loop = _save(tmp_path / "loop", _loop_tree(), zarr3)
    ckptconv.convert(loop, tmp_path / "scan", to="scan")
    ckptconv.convert(tmp_path / "scan", tmp_path / "loop2", to="loop")
    local_scan, local_loop = _arrays(tmp_path / "scan"), _arrays(tmp_path / "loop2")
    _same(local_loop, _arrays(loop))

    r = ckptconv.convert(loop, f"{bucket}/scan", to="scan")  # local -> bucket
    assert r.written and str(r.dst) == f"{bucket}/scan"
    _same(_arrays(f"{bucket}/scan"), local_scan)
    ckptconv.convert(f"{bucket}/scan", f"{bucket}/loop", to="loop")  # bucket -> bucket
    _same(_arrays(f"{bucket}/loop"), local_loop)
    ckptconv.convert(f"{bucket}/loop", tmp_path / "scan_from_bucket", to="scan")  # bucket -> local
    _same(_arrays(tmp_path / "scan_from_bucket"), local_scan)
    ckptconv.convert(f"{bucket}/scan", tmp_path / "loop_from_bucket", to="loop")
    _same(_arrays(tmp_path / "loop_from_bucket"), local_loop)

    keys = _keys(f"{bucket}/scan")
    assert "commit_success.txt" in keys and "_METADATA" in keys and "manifest.ocdbt" in keys
    meta = storage.as_path(f"{bucket}/scan/_METADATA").read_bytes()
    assert b'"use_zarr3": ' + (b"true" if zarr3 else b"false") in meta
    # Orbax's own restore of the bucket output, copied to local disk.
    got = _orbax_restore(_download(f"{bucket}/scan", tmp_path / "dl"))
    np.testing.assert_array_equal(
        got["params"]["blocks"]["attn"]["kernel"],
        np.stack([_loop_tree()["params"][f"layer_{i}"]["attn"]["kernel"] for i in range(LAYERS)]),
    )
    assert set(got["params"]) == {"blocks", "embed"}


def test_cli_round_trip_and_inspect(bucket, tmp_path, cli):
    loop = _save(tmp_path / "loop", _loop_tree())
    r = cli("to-scan", loop, f"{bucket}/scan")
    assert r.exit_code == 0, r.output
    assert f"{bucket}/scan" in r.output and "gs:/c" not in r.output
    r = cli("inspect", f"{bucket}/scan")
    assert r.exit_code == 0, r.output
    assert "params/blocks" in r.output
    r = cli("verify", loop, f"{bucket}/scan")  # the structural check, streamed
    assert r.exit_code == 0 and r.output.rstrip().endswith("PASS"), r.output
    r = cli("to-loop", f"{bucket}/scan", f"{bucket}/loop")
    assert r.exit_code == 0, r.output
    _same(_arrays(f"{bucket}/loop"), _arrays(loop))
    r = cli("extract", f"{bucket}/loop", tmp_path / "params", "--only", "params")
    assert r.exit_code == 0, r.output
    assert set(ckptconv.load(tmp_path / "params")) == {"params"}


def test_train_state_with_opt_state(bucket, tmp_path):
    state = _save(tmp_path / "state", _train_state())
    ckptconv.convert(state, tmp_path / "scan", to="scan")
    r = ckptconv.convert(state, f"{bucket}/scan", to="scan")
    assert {g.describe().split(":")[0] for g in r.groups} >= {
        "params/layer_{i}", "opt_state/0/mu/layer_{i}", "opt_state/0/nu/layer_{i}"}
    _same(_arrays(f"{bucket}/scan"), _arrays(tmp_path / "scan"))
    ckptconv.convert(f"{bucket}/scan", f"{bucket}/loop", to="loop")
    _same(_arrays(f"{bucket}/loop"), _arrays(state))


def test_manager_root_two_steps(bucket, tmp_path):
    root = _manager(tmp_path / "run")
    ckptconv.convert(root, tmp_path / "scan", to="scan")
    ckptconv.convert(root, f"{bucket}/run", to="scan")
    keys = _keys(f"{bucket}/run")
    assert "20/commit_success.txt" in keys and "20/state/commit_success.txt" in keys
    assert not any(k.startswith("10/") for k in keys)
    _same(_arrays(f"{bucket}/run"), _arrays(tmp_path / "scan"))
    # The whole root on the bucket (both steps), then --step.
    _upload(root, f"{bucket}/in")
    ckptconv.convert(f"{bucket}/in", f"{bucket}/s10", to="scan", step=10)
    ckptconv.convert(root, tmp_path / "scan10", to="scan", step=10)
    _same(_arrays(f"{bucket}/s10"), _arrays(tmp_path / "scan10"))
    ckptconv.convert(f"{bucket}/run", tmp_path / "loop", to="loop")
    _same(_arrays(tmp_path / "loop"), _arrays(root))
    # Orbax's CheckpointManager reads the bucket output, copied to local disk.
    with ocp.CheckpointManager(_download(f"{bucket}/run", tmp_path / "dl").absolute(),
                               item_names=("state", "metrics")) as m:
        assert m.all_steps() == [20]
        got = m.restore(20, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), metrics=ocp.args.JsonRestore()))
    assert got.metrics == {"loss": 2.0}
    assert got.state["params"]["blocks"]["attn"]["kernel"].shape == (LAYERS, H, H)


def test_manager_root_lists_committed_steps_only(bucket, tmp_path):
    root = _upload(_manager(tmp_path / "run"), f"{bucket}/in")
    (root / "20/commit_success.txt").unlink()
    layout = ckptconv.formats.orbax.describe(root)
    assert layout.step == 10
    with pytest.raises(FormatError) as e:
        ckptconv.convert(root, f"{bucket}/out", to="scan", step=20)
    assert str(e.value).startswith(f"{bucket}/in/20: incomplete CheckpointManager step 20: no commit_success.txt.")
    (root / "10/commit_success.txt").unlink()
    with pytest.raises(FormatError) as e:
        ckptconv.convert(root, f"{bucket}/out", to="scan")
    assert str(e.value) == (
        f"{bucket}/in: no complete step: steps 10, 20 have no commit_success.txt (a save that "
        "did not finish; CheckpointManager skips such steps too)."
    )


def test_restore_like_from_bucket(bucket, tmp_path):
    import jax

    loop = _save(tmp_path / "loop", _loop_tree())
    ckptconv.convert(loop, f"{bucket}/scan", to="scan")
    like = jax.eval_shape(lambda: _loop_tree())
    got = ckptconv.restore(f"{bucket}/scan", like=like)
    np.testing.assert_array_equal(
        np.asarray(got["params"]["layer_2"]["attn"]["kernel"]),
        _loop_tree()["params"]["layer_2"]["attn"]["kernel"])


# -- incomplete and failed writes ---------------------------------------------------


def test_incomplete_item_refused(bucket, tmp_path, cli):
    ckptconv.convert(_save(tmp_path / "loop", _loop_tree()), f"{bucket}/scan", to="scan")
    storage.as_path(f"{bucket}/scan/commit_success.txt").unlink()
    r = cli("inspect", f"{bucket}/scan")
    assert r.exit_code == 2
    assert r.output == (
        f"Error: {bucket}/scan: incomplete checkpoint: no commit_success.txt. On a bucket Orbax "
        "writes commit_success.txt last, so its save (or ckptconv's conversion) did not finish "
        "or is still running, and Orbax's own restore refuses it too (\"Found incomplete "
        "checkpoint\"). Use a complete checkpoint, or wait for the save to finish. (A "
        "checkpoint saved on local disk by Orbax before 0.12 has no commit_success.txt: copied "
        "to a bucket whole, it can be marked complete with an object of that name.)\n"
    )


def test_failure_half_way_leaves_nothing(bucket, tmp_path, monkeypatch):
    from ckptconv.formats.orbax_stream import plan

    loop = _save(tmp_path / "loop", _loop_tree())
    real = plan._Plan.write_files

    def fail(self, *a, **kw):
        real(self, *a, **kw)  # data, _METADATA, _sharding, ... are written
        raise OSError(28, "injected failure")

    monkeypatch.setattr(plan._Plan, "write_files", fail)
    with pytest.raises(FormatError) as e:
        ckptconv.convert(loop, f"{bucket}/scan", to="scan")
    assert str(e.value) == (
        f"cannot write {bucket}/scan: [Errno 28] injected failure; what was written under "
        f"{bucket}/scan was deleted, and the input is unchanged."
    )
    assert _keys(f"{bucket}/scan") == []

    def interrupt(self, *a, **kw):
        real(self, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(plan._Plan, "write_files", interrupt)
    with pytest.raises(KeyboardInterrupt) as ki:
        ckptconv.convert(loop, f"{bucket}/scan", to="scan")
    assert ki.value.ckptconv_message == (
        f"interrupted; what was written under {bucket}/scan was deleted, and the input is unchanged."
    )
    assert _keys(f"{bucket}/scan") == []


def test_kill_9_mid_write_leaves_no_commit(bucket, tmp_path):
    """A CLI process killed (SIGKILL) after its data and metadata are written
    but before the commit markers: no commit_success.txt under OUT, and the
    reader refuses OUT as incomplete. (The child holds still there, so the
    kill lands mid-write every time.)"""
    loop = _save(tmp_path / "loop", _loop_tree())
    out = f"{bucket}/scan"
    driver = textwrap.dedent(f"""
        import importlib, sys, time
        c = importlib.import_module("ckptconv.convert")  # the module, not the function
        def hold(*a, **kw):
            print("holding", flush=True)
            time.sleep(120)
        c._commit_bucket = hold
        from ckptconv.cli import main
        sys.argv = ["ckptconv", "to-scan", {str(loop)!r}, {out!r}]
        main()
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        # (the CLI prints its plan first)
        lines = iter(proc.stdout.readline, b"")
        assert any(line == b"holding\n" for line in lines)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    keys = _keys(out)
    assert "_METADATA" in keys and "manifest.ocdbt" in keys
    assert not any(k.endswith("commit_success.txt") for k in keys)
    with pytest.raises(FormatError, match=r"incomplete checkpoint: no commit_success\.txt"):
        ckptconv.load(out)
    with pytest.raises(FormatError, match=r"incomplete checkpoint: no commit_success\.txt"):
        ckptconv.convert(out, tmp_path / "x", to="loop")


# -- errors -------------------------------------------------------------------------


def test_output_exists(bucket, tmp_path, cli):
    loop = _save(tmp_path / "loop", _loop_tree())
    storage.as_path(f"{bucket}/out/notes.txt").write_bytes(b"x")
    r = cli("to-scan", loop, f"{bucket}/out", "--force")
    assert r.exit_code == 2
    assert r.output == (
        f"Error: {bucket}/out: output already exists (objects are stored under this prefix); "
        "choose another path, or delete them first (gcloud storage rm -r / aws s3 rm "
        "--recursive). A bucket has no rename, so --force cannot replace an output atomically "
        "and does not apply to buckets. (Objects without a commit_success.txt are what a "
        "killed run left: no reader takes them for a checkpoint, and they are safe to delete.)\n"
    )
    with pytest.raises(OutputExistsError):
        ckptconv.convert(loop, f"{bucket}/out", to="scan")
    assert _keys(f"{bucket}/out") == ["notes.txt"]


def test_missing_prefix_and_bucket(bucket, tmp_path, cli):
    r = cli("to-scan", f"{bucket}/nothing", tmp_path / "out")
    assert r.exit_code == 2
    assert r.output == (
        f"Error: {bucket}/nothing: nothing is stored under this path in bucket "
        f"{bucket.split('//')[1]} (no object has this key or starts with it); check the path.\n"
    )
    scheme = bucket.split(":")[0]
    missing = f"{scheme}://no-such-bucket-{uuid.uuid4().hex[:8]}/x"
    r = cli("inspect", missing)
    assert r.exit_code == 2 and "Traceback" not in r.output
    if scheme == "s3":
        # (TensorStore 0.1.86 says NoSuchBucket, 0.1.77 "Malformed List response")
        assert r.output.startswith(f"Error: {missing}: cannot list bucket no-such-bucket-")
        assert r.output.rstrip().endswith(
            "check the bucket name, the endpoint (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL) and "
            "the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION).")
    else:  # fake-gcs-server lists a missing bucket as empty
        assert r.output.startswith(f"Error: {missing}: nothing is stored under this path")


def test_msgpack_and_safetensors_on_bucket(bucket, tmp_path, cli):
    from flax import serialization

    blob = serialization.to_bytes(_loop_tree())
    storage.as_path(f"{bucket}/model.msgpack").write_bytes(blob)
    r = cli("to-scan", f"{bucket}/model.msgpack", tmp_path / "out.msgpack")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output == (
        f"Error: {bucket}/model.msgpack: a single object, not an Orbax checkpoint directory: "
        "bucket paths (gs://, s3://) are supported for Orbax checkpoints only; for a flax "
        "msgpack or safetensors file (or a Hugging Face directory of them), copy it to local "
        "disk first (gcloud storage cp / aws s3 cp) and pass the local path.\n"
    )
    (tmp_path / "m.msgpack").write_bytes(blob)
    r = cli("to-scan", tmp_path / "m.msgpack", f"{bucket}/out")
    assert r.exit_code == 2
    assert r.output == (
        f"Error: {bucket}/out: bucket outputs are supported for Orbax checkpoints only, not "
        "msgpack; write the msgpack output to local disk and copy it to the bucket (gcloud "
        "storage cp / aws s3 cp).\n"
    )
    assert _keys(f"{bucket}/out") == []
    # msgpack in, Orbax out on the bucket: the Orbax writer, streaming.
    r = cli("to-scan", tmp_path / "m.msgpack", f"{bucket}/orbax", "--format", "orbax")
    assert r.exit_code == 0, r.output
    ckptconv.convert(tmp_path / "m.msgpack", tmp_path / "orbax", to="scan", format="orbax")
    _same(_arrays(f"{bucket}/orbax"), _arrays(tmp_path / "orbax"))


def test_debug_shows_traceback(bucket, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "ckptconv", "--debug", "inspect", f"{bucket}/nothing"],
        capture_output=True, text=True, env=os.environ.copy(), timeout=120,
    )
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "FormatError" in r.stderr


def test_save_and_load_on_bucket(bucket):
    tree = _loop_tree()
    ckptconv.save(tree, f"{bucket}/saved")
    assert "commit_success.txt" in _keys(f"{bucket}/saved")
    got = ckptconv.load(f"{bucket}/saved")
    np.testing.assert_array_equal(got["params"]["layer_1"]["q8"], tree["params"]["layer_1"]["q8"])
    with pytest.raises(OutputExistsError):
        ckptconv.save(tree, f"{bucket}/saved")


def test_servers_do_not_outlive_a_killed_parent(stores, tmp_path):
    """PR_SET_PDEATHSIG: a process that started servers and dies takes them along."""
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import servers
        s = servers.start_fake_gcs()
        print(s.proc.pid, flush=True)
        os._exit(1)
    """))
    if not isinstance(stores["gs"], servers.Server):
        pytest.skip(f"gs:// server cannot start here: {stores['gs']}")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    pid = int(r.stdout.split()[0])
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("fake-gcs-server outlived its parent")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_mid_write_deletes_out(bucket, tmp_path, sig, code):
    """The console script (`ckptconv.__main__.run`) signalled mid-write, with
    its data and metadata written and the markers not: what it wrote is
    deleted, the message says so, 143 / 130."""
    loop = _save(tmp_path / "loop", _loop_tree())
    out = f"{bucket}/scan"
    driver = textwrap.dedent(f"""
        import importlib, sys, time
        c = importlib.import_module("ckptconv.convert")
        def hold(*a, **kw):
            print("holding", flush=True)
            time.sleep(120)
        c._commit_bucket = hold
        from ckptconv.__main__ import run
        sys.argv = ["ckptconv", "to-scan", {str(loop)!r}, {out!r}]
        run()
    """)
    # GLIBC_TUNABLES set: run() does not re-execute itself (which would drop the patch).
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.arena_max=1")
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        assert any(line == b"holding\n" for line in iter(proc.stdout.readline, b""))
        assert "_METADATA" in _keys(out)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code
    assert err.decode().splitlines()[-1] == (
        f"Error: interrupted; what was written under {out} was deleted, and the input is unchanged."
    )
    assert _keys(out) == []


def test_one_chunk_stack_streamed_from_bucket(bucket, tmp_path):
    """A stack saved as one zstd chunk (a scanned run's own checkpoint) is
    unstacked from the bucket by the decode path (byte-range reads where
    TensorStore has them), bit-identical to the local conversion."""
    layers = _loop_tree()["params"]
    scan = {"params": {
        "blocks": {
            "attn": {"kernel": np.stack([layers[f"layer_{i}"]["attn"]["kernel"] for i in range(LAYERS)])},
            "norm": {"scale": np.stack([layers[f"layer_{i}"]["norm"]["scale"] for i in range(LAYERS)])},
            "q8": np.stack([layers[f"layer_{i}"]["q8"] for i in range(LAYERS)]),
        },
        "embed": layers["embed"],
    }}
    local = _save(tmp_path / "scan", scan)
    _upload(local, f"{bucket}/scan")
    ckptconv.convert(local, tmp_path / "loop", to="loop")
    ckptconv.convert(f"{bucket}/scan", f"{bucket}/loop", to="loop")
    _same(_arrays(f"{bucket}/loop"), _arrays(tmp_path / "loop"))
    assert _arrays(f"{bucket}/loop")["params/layer_1/attn/kernel"] == (
        "<f4", (H, H), layers["layer_1"]["attn"]["kernel"].tobytes())


def test_output_in_a_missing_bucket(stores, tmp_path, cli):
    loop = _save(tmp_path / "loop", _loop_tree())
    for scheme in ("s3", "gs"):
        if not isinstance(stores[scheme], servers.Server):
            continue
        out = f"{scheme}://no-such-bucket-{uuid.uuid4().hex[:8]}/out"
        r = cli("to-scan", loop, out)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        if scheme == "s3":  # refused before anything is written
            assert r.output.startswith(f"Error: {out}: cannot list bucket no-such-bucket-")
        else:  # fake-gcs-server lists a missing bucket as empty: the first write fails
            assert r.output.startswith(f"Error: {out}: writing the output failed: NOT_FOUND")
            assert r.output.endswith(f"(what was written under {out} was deleted.)\n")

"""``ckptconv.restore(path, like=...)``: any layout into a train state's layout and shardings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

import ckptconv
from ckptconv.formats import msgpack_stream, safetensors

HERE = Path(__file__).parent


# ----------------------------------------------------------- must-show 1: resume


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> dict[str, dict]:
    """tests/resume_run.py in its own process with 8 host devices (one JSON line a run)."""
    work = tmp_path_factory.mktemp("resume")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(
        [sys.executable, str(HERE / "resume_run.py"), str(work),
         "loop-to-scan", "scan-to-loop", "period-to-scan"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    runs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    return {r["kind"]: r for r in runs}


@pytest.mark.parametrize("kind, to, options", [
    ("loop-to-scan", "scan", {"axis": 0, "pattern": "layer_{i}", "into": "blocks"}),
    ("scan-to-loop", "loop", {"axis": 0, "source": "blocks", "pattern": "layer_{i}"}),
    ("period-to-scan", "scan", {"axis": 1, "pattern": "layers_{i}", "into": "layers",
                                "period": 3, "remainder": "separate"}),
])
def test_resume_in_the_other_form(resumed, kind, to, options):
    r = resumed[kind]
    assert r["devices"] == 8
    assert (r["to"], r["options"]) == (to, options)
    assert (r["step"], r["count"]) == (3, 3)
    # The next three steps are the source run's own, within 1e-5 relative.
    rel = [abs(a - b) / abs(b) for a, b in zip(r["losses"], r["ref_losses"])]
    assert len(rel) == 3 and max(rel) <= 1e-5, (r["losses"], r["ref_losses"])
    assert r["ref_losses"][2] < r["ref_losses"][0]  # it trains
    # Every array has its target sharding, and every device's shard holds the
    # bytes of the in-memory conversion of the saved state.
    assert r["same_sharding"] == r["leaves"] > 0
    assert r["partitioned_params"] > 0
    assert r["equal_shards"] == r["shards"] == 8 * r["leaves"]
    # Each element was read once, part by part (no leaf read whole).
    assert r["elements_read"] == r["elements_restored"]
    assert r["largest_read"] < r["largest_leaf"]
    # Nothing was written: no file beside the checkpoint, none changed, none in TMPDIR.
    assert (r["written"], r["changed"], r["tmp"]) == ([], [], [])


def test_resume_plan_names_every_group(resumed):
    assert resumed["loop-to-scan"]["plan"].endswith(
        "into like (38 leaves): to-scan (axis=0, pattern='layer_{i}', into='blocks'; worked "
        "out from like): params/layer_{i}: 4 layers -> params/blocks; opt_state/0/mu/layer_{i}: "
        "4 layers -> opt_state/0/mu/blocks; opt_state/0/nu/layer_{i}: 4 layers -> "
        "opt_state/0/nu/blocks."
    )


# ----------------------------------------------------------- one device


def _loop_tree(n: int = 3) -> dict:
    rng = np.random.default_rng(0)
    layers = {f"layer_{i}": {"w": rng.standard_normal((4, 6)).astype(np.float32),
                             "b": rng.standard_normal(6).astype(np.float32)} for i in range(n)}
    return {"params": {**layers, "embed": np.arange(12, dtype=np.float32).reshape(3, 4)},
            "step": np.array(7, np.int32)}


def _abstract(t):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)


@pytest.fixture
def loop_ckpt(tmp_path) -> Path:
    path = tmp_path / "loop"
    with ocp.StandardCheckpointer() as c:
        c.save(path, _loop_tree())
    return path


def test_no_like_is_the_tree_as_stored(loop_ckpt):
    got = ckptconv.restore(loop_ckpt)
    want = ckptconv.load(loop_ckpt)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_options_without_like_are_refused(loop_ckpt):
    with pytest.raises(ckptconv.CkptconvError) as e:
        ckptconv.restore(loop_ckpt, only="params", axis=1)
    assert str(e.value) == (
        f"restore({str(loop_ckpt)!r}) without like= reads the tree as stored and takes only "
        "step=; only, axis say how to fit a target: pass it as like= (an abstract train state, "
        "e.g. jax.eval_shape of its init)."
    )


def test_into_scan_form_on_one_device(loop_ckpt):
    target = ckptconv.to_scan(_loop_tree())
    got = ckptconv.restore(loop_ckpt, like=_abstract(target))
    assert set(got["params"]) == {"blocks", "embed"}
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(target)):
        assert isinstance(a, jax.Array) and a.dtype == b.dtype
        assert a.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
        np.testing.assert_array_equal(np.asarray(a), b)


def test_nn_scan_inside_a_wrapper_module(tmp_path, cli):
    """`nn.scan(Block)()` called inside a module named `blocks` keeps its params under
    blocks/ScanBlock_0: restore(like=) and to-scan --like find the stack there, and the
    scan model computes what the loop model does."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.tanh(nn.Dense(16)(x)) + x, None

    class Loop(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(3):
                x, _ = Block(name=f"layer_{i}")(x, None)
            return nn.Dense(4)(x)

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scan()(x, None)[0]

    class Scan(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(Stack(name="blocks")(x))

    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16))
    loop = Loop().init(jax.random.PRNGKey(0), x)
    ckptconv.save(loop, tmp_path / "loop")
    like = jax.eval_shape(Scan().init, jax.random.PRNGKey(0), x)
    assert set(like["params"]["blocks"]) == {"ScanBlock_0"}
    plan = ckptconv.plan_restore(tmp_path / "loop", like=like)
    assert plan.to == "scan" and plan.options["into"] == "blocks/ScanBlock_0"
    got = ckptconv.restore(tmp_path / "loop", like=like)
    np.testing.assert_array_equal(np.asarray(Scan().apply(got, x)), np.asarray(Loop().apply(loop, x)))
    # The CLI, by example: REF is a checkpoint of the scan model.
    ckptconv.save(Scan().init(jax.random.PRNGKey(2), x), tmp_path / "ref")
    r = cli("to-scan", tmp_path / "loop", tmp_path / "scan", "--like", tmp_path / "ref")
    assert r.exit_code == 0, r.output
    out = ckptconv.load(tmp_path / "scan")
    np.testing.assert_array_equal(np.asarray(Scan().apply(out, x)), np.asarray(Loop().apply(loop, x)))
    assert f"to undo: ckptconv to-loop {tmp_path / 'scan'} LOOP_OUT --from blocks/ScanBlock_0" in r.output
    # And back: into the loop model, and by the record.
    back = ckptconv.restore(tmp_path / "scan", like=jax.eval_shape(Loop().init, jax.random.PRNGKey(0), x))
    assert ckptconv.plan_restore(tmp_path / "scan", like=loop).options["source"] == "blocks/ScanBlock_0"
    np.testing.assert_array_equal(np.asarray(Loop().apply(back, x)), np.asarray(Loop().apply(loop, x)))
    r = cli("to-loop", tmp_path / "scan", tmp_path / "back")
    assert r.exit_code == 0, r.output
    assert "params/blocks: 3 layers -> params/layer_{i}" in r.output.splitlines()
    assert not any(line.startswith("note:") for line in r.output.splitlines())  # the record's
    got = ckptconv.load(tmp_path / "back")
    assert jax.tree.structure(got) == jax.tree.structure(jax.tree.map(np.asarray, loop))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(loop)):
        np.testing.assert_array_equal(a, np.asarray(b))
    # The scan model's own checkpoint (no record): plain to-loop keeps the
    # ScanBlock_0 level inside each layer, and says how not to.
    r = cli("to-loop", tmp_path / "ref", tmp_path / "ref_loop")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[1] == (
        "note: each layer holds one subtree, ScanBlock_0, as nn.scan names the module it scans "
        "inside a wrapper module; if your loop model's layers hold what is in it directly, pass "
        "--from blocks/ScanBlock_0 (unstacks params/blocks/ScanBlock_0 into the layers).")
    assert set(ckptconv.load(tmp_path / "ref_loop")["params"]["layer_0"]) == {"ScanBlock_0"}
    lines = cli("inspect", tmp_path / "ref").output.splitlines()
    at = lines.index("  params/blocks: 3 layers -> params/layer_{i}")
    assert lines[at + 1] == (
        "  note: it holds one subtree, ScanBlock_0, as nn.scan names the module it scans inside a "
        "wrapper module; --from blocks/ScanBlock_0 unstacks it without that level in each layer")
    assert "note:" not in cli("inspect", tmp_path / "ref", "--from", "blocks/ScanBlock_0").output
    r = cli("to-loop", tmp_path / "ref", tmp_path / "ref_loop2", "--from", "blocks/ScanBlock_0")
    assert r.exit_code == 0 and "note:" not in r.output, r.output
    got = ckptconv.load(tmp_path / "ref_loop2")
    assert jax.tree.structure(got) == jax.tree.structure(jax.tree.map(np.asarray, loop))
    ref = ckptconv.load(tmp_path / "ref")
    np.testing.assert_array_equal(
        np.asarray(Loop().apply(got, x)), np.asarray(Scan().apply(ref, x)))


def test_auto_numbered_blocks(tmp_path, cli):
    """A loop of `Block()` without names saves Block_0 … Block_2, which default
    detection leaves alone (a layer's Dense_0, Dense_1 look the same). like (or
    REF) shows they are the layers; without it, the error names the option."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _=None):
            return nn.tanh(nn.Dense(16)(nn.Dense(16)(x))) + x, None

    class Loop(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(3):
                x, _ = Block()(x)
            return nn.Dense(4)(x)

    class Scan(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return nn.Dense(4)(scan(name="layers")(x, None)[0])

    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16))
    loop = Loop().init(jax.random.PRNGKey(0), x)
    ckptconv.save(loop, tmp_path / "loop")
    like = jax.eval_shape(Scan().init, jax.random.PRNGKey(0), x)
    want = np.asarray(Loop().apply(loop, x))
    plan = ckptconv.plan_restore(tmp_path / "loop", like=like)
    assert (plan.to, plan.options["pattern"], plan.options["into"]) == ("scan", "Block_{i}", "layers")
    np.testing.assert_array_equal(np.asarray(Scan().apply(ckptconv.restore(tmp_path / "loop", like=like), x)), want)
    # pattern= given: like still names into.
    got = ckptconv.restore(tmp_path / "loop", like=like, pattern="Block_{i}")
    np.testing.assert_array_equal(np.asarray(Scan().apply(got, x)), want)
    # No like: the error names what to pass.
    r = cli("to-scan", tmp_path / "loop", tmp_path / "scan")
    assert r.exit_code == 2
    assert r.output.endswith(
        "if the checkpoint is already stacked, use to-loop. Auto-numbered keys that may be the layers "
        "(not stacked by default, as a layer's own Dense_0, Dense_1 … are not): params/Block_{i} (3): "
        "--pattern 'Block_{i}'; params/Block_0/Dense_{i} (2): --pattern 'Dense_{i}'.\n"
    )
    # By example: REF, a checkpoint of the scan model.
    ckptconv.save(Scan().init(jax.random.PRNGKey(2), x), tmp_path / "ref")
    r = cli("to-scan", tmp_path / "loop", tmp_path / "scan", "--like", tmp_path / "ref")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == f"like {tmp_path / 'ref'}: to-scan --pattern 'Block_{{i}}' --into layers"
    np.testing.assert_array_equal(np.asarray(Scan().apply(ckptconv.load(tmp_path / "scan"), x)), want)


def test_large_parts_are_assembled_on_device(loop_ckpt, monkeypatch):
    restore_mod = sys.modules["ckptconv.restore"]
    like = _abstract(ckptconv.to_scan(_loop_tree()))
    like["params"] = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), like["params"])
    numpy_way = ckptconv.restore(loop_ckpt, like=like, cast=True)
    monkeypatch.setattr(restore_mod, "_ON_DEVICE_BYTES", 0)
    calls = []
    put = restore_mod._put_layer
    monkeypatch.setattr(restore_mod, "_put_layer", lambda *a: calls.append(a[2:]) or put(*a))
    device_way = ckptconv.restore(loop_ckpt, like=like, cast=True)
    assert sorted(calls) == [(0, 0)] * 2 + [(1, 0)] * 2 + [(2, 0)] * 2  # blocks/b and blocks/w, a layer at a time
    for a, b in zip(jax.tree.leaves(device_way), jax.tree.leaves(numpy_way)):
        assert a.dtype == b.dtype and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_same_layout_matches_orbax_own_restore(loop_ckpt):
    # Orbax restores a ShapeDtypeStruct without sharding as numpy; restore
    # gives a jax.Array on the default device: compare with that sharding.
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), _loop_tree())
    with ocp.StandardCheckpointer() as c:
        theirs = c.restore(loop_ckpt, abstract)
    ours = ckptconv.restore(loop_ckpt, like=abstract)
    assert ckptconv.plan_restore(loop_ckpt, like=abstract).describe() == (
        f"restore {loop_ckpt} into like (8 leaves): already in like's layout: read as stored."
    )
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_numpy_and_python_leaves_come_back_as_such(loop_ckpt):
    like = ckptconv.to_scan(_loop_tree())
    like["step"] = 0  # a Python int, as TrainState.create leaves it
    like["params"]["embed"] = np.zeros((3, 4), np.float32)
    got = ckptconv.restore(loop_ckpt, like=like)
    assert got["step"] == 7 and type(got["step"]) is int
    assert type(got["params"]["embed"]) is np.ndarray
    np.testing.assert_array_equal(got["params"]["embed"], _loop_tree()["params"]["embed"])


def test_concrete_arrays_give_their_shardings(loop_ckpt):
    target = jax.tree.map(jnp.zeros_like, ckptconv.to_scan(_loop_tree()))
    got = ckptconv.restore(loop_ckpt, like=target)
    np.testing.assert_array_equal(np.asarray(got["params"]["blocks"]["w"]),
                                  np.stack([_loop_tree()["params"][f"layer_{i}"]["w"] for i in range(3)]))


def test_msgpack_and_safetensors_files(tmp_path):
    tree = _loop_tree()
    mp = tmp_path / "loop.msgpack"
    msgpack_stream.save(tree, mp)
    st = tmp_path / "loop.safetensors"
    safetensors.save(tree["params"], st)
    target = ckptconv.to_scan(tree)
    got = ckptconv.restore(mp, like=_abstract(target))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(target)):
        np.testing.assert_array_equal(np.asarray(a), b)
    got = ckptconv.restore(st, like=_abstract(target["params"]))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(target["params"])):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_a_msgpack_train_state_with_a_python_step(tmp_path):
    """``flax.serialization.to_bytes(TrainState)`` stores ``step`` as a msgpack
    int (no shape, no dtype). A trial's restore into the scan model's state
    said "step None vs like ()" for both a concrete and an abstract like; the
    number fits a 0-d leaf and takes like's type, dtype and sharding."""
    import flax.serialization
    import optax
    from flax.training import train_state

    tree = _loop_tree()
    state = train_state.TrainState.create(apply_fn=None, params=tree["params"], tx=optax.adam(1e-2))
    state = state.replace(step=5)
    (tmp_path / "state.msgpack").write_bytes(flax.serialization.to_bytes(state))
    assert type(ckptconv.load(tmp_path / "state.msgpack")["step"]) is int
    scan = train_state.TrainState.create(
        apply_fn=None, params=ckptconv.to_scan(tree["params"]), tx=optax.adam(1e-2))
    got = ckptconv.restore(tmp_path / "state.msgpack", like=scan)  # step=0, a Python int
    assert got.step == 5 and type(got.step) is int
    np.testing.assert_array_equal(np.asarray(got.params["blocks"]["w"]),
                                  np.stack([tree["params"][f"layer_{i}"]["w"] for i in range(3)]))
    assert jax.tree.structure(got) == jax.tree.structure(scan)
    abstract = jax.eval_shape(lambda: scan.replace(step=jnp.int32(0)))
    got = ckptconv.restore(tmp_path / "state.msgpack", like=abstract)
    assert isinstance(got.step, jax.Array) and got.step.dtype == jnp.int32 and int(got.step) == 5
    like = scan.replace(step=np.int64(0))
    got = ckptconv.restore(tmp_path / "state.msgpack", like=like)
    assert type(got.step) is np.int64 and got.step == 5
    # A number the like's leaf cannot hold is an error, not truncated (a review).
    (tmp_path / "lr.msgpack").write_bytes(flax.serialization.to_bytes(state.replace(step=0.75)))
    with pytest.raises(ckptconv.RestoreError, match=r"^like/step: the checkpoint stores the number "
                       r"0\.75 there, which like's int64 cannot hold; give like a leaf that can "
                       r"\(a Python float\)\.$"):
        ckptconv.restore(tmp_path / "lr.msgpack", like=scan)
    with pytest.raises(ckptconv.RestoreError, match="shapes differ: step a number vs like"):
        ckptconv.restore(tmp_path / "state.msgpack", like=scan.replace(step=np.zeros(2, np.int32)))


def test_a_structure_that_does_not_fit_is_an_error_before_any_read(loop_ckpt, monkeypatch):
    from ckptconv.formats import orbax

    def no_read(*a):
        raise AssertionError("read before the structure was checked")

    monkeypatch.setattr(orbax, "read_region", no_read)
    four = ckptconv.to_scan(_loop_tree(4))
    with pytest.raises(ckptconv.RestoreError) as e:
        ckptconv.restore(loop_ckpt, like=_abstract(four))
    assert str(e.value) == (
        f"{loop_ckpt}: cannot restore into like: as to-scan: params: 3 layers (layer_0, layer_1, "
        "layer_2 …), but like holds no stack of them under params (its keys there: blocks, embed; "
        "params/blocks/b: a layer has shape (6,), and like's stack (4, 6), which is no stack of 3 "
        "such layers on any axis). as to-loop: the checkpoint has no stack that like holds as "
        "separate layers, so it cannot take like's loop form. As stored, 2 in like but not in the "
        "checkpoint: params/blocks/b, params/blocks/w; 6 in the checkpoint but not in like: "
        "params/layer_0/b, params/layer_0/w, params/layer_1/b, params/layer_1/w, params/layer_2/b …."
    )
    extra = ckptconv.to_scan(_loop_tree())
    extra["params"]["head"] = np.zeros(2, np.float32)
    del extra["step"]
    with pytest.raises(ckptconv.RestoreError) as e:
        ckptconv.restore(loop_ckpt, like=_abstract(extra))
    assert str(e.value) == (
        f"{loop_ckpt}: the checkpoint does not fit like (after to-scan): 1 in like but not in "
        "the checkpoint: params/head; 1 in the checkpoint but not in like: step. Nothing was restored."
    )


def test_dtypes_differ_unless_cast(loop_ckpt):
    like = _abstract(ckptconv.to_scan(_loop_tree()))
    like["params"] = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), like["params"])
    like["step"] = jax.ShapeDtypeStruct((), jnp.int64 if jax.config.jax_enable_x64 else jnp.int16)
    with pytest.raises(ckptconv.RestoreError) as e:
        ckptconv.restore(loop_ckpt, like=like)
    assert str(e.value) == (
        f"{loop_ckpt}: the checkpoint does not fit like (after to-scan): 3 dtypes differ: "
        "params/embed float32 vs like bfloat16; params/blocks/b float32 vs like bfloat16; "
        "params/blocks/w float32 vs like bfloat16. Nothing was restored. Pass cast=True to round "
        "the stored values to like's dtypes."
    )
    got = ckptconv.restore(loop_ckpt, like=like, cast=True)
    want = _loop_tree()["params"]["layer_1"]["w"].astype(ml_dtypes.bfloat16)
    assert got["params"]["blocks"]["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got["params"]["blocks"]["w"])[1], want)
    assert int(got["step"]) == 7  # integer scalars are cast without cast=True
    assert ckptconv.plan_restore(loop_ckpt, like=like, cast=True).describe().endswith(
        "; cast 4 leaves to like's dtypes (params/blocks/b: float32 -> bfloat16 …).")


def test_given_options_win_and_are_checked(loop_ckpt):
    like = _abstract(ckptconv.to_scan(_loop_tree(), axis=1))
    plan = ckptconv.plan_restore(loop_ckpt, like=like)
    assert (plan.to, plan.options, plan.inferred) == (
        "scan", {"axis": 1, "pattern": "layer_{i}", "into": "blocks"}, True)
    with pytest.raises(ckptconv.RestoreError) as e:
        ckptconv.restore(loop_ckpt, like=like, to="scan", axis=0)
    assert str(e.value) == (
        f"{loop_ckpt}: the checkpoint does not fit like (after to-scan): 2 shapes differ: "
        "params/blocks/b (3, 6) vs like (6, 3); params/blocks/w (3, 4, 6) vs like (4, 3, 6). "
        "Nothing was restored."
    )
    with pytest.raises(ckptconv.CkptconvError) as e:
        ckptconv.restore(loop_ckpt, like=like, sideways=True)
    assert str(e.value).startswith("restore takes no option sideways; its layout options are ")


def test_manager_root_step_and_item(tmp_path):
    root = tmp_path / "mgr"
    with ocp.CheckpointManager(root, item_names=("state", "extra")) as mgr:
        for step in (1, 2):
            tree = jax.tree.map(lambda a, s=step: a + s, _loop_tree())
            mgr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree),
                extra=ocp.args.StandardSave({"n": np.arange(3)})))
        mgr.wait_until_finished()
    like = _abstract(ckptconv.to_scan(_loop_tree()))
    got = ckptconv.restore(root, like=like, step=1)
    np.testing.assert_array_equal(np.asarray(got["params"]["embed"]), _loop_tree()["params"]["embed"] + 1)
    plan = ckptconv.plan_restore(root, like=like)
    assert plan.item == "state"
    with pytest.raises(ckptconv.CkptconvError) as e:
        ckptconv.restore(root, like=like, item="nope")
    assert str(e.value) == f"{root}: no item 'nope'; the items here are 'extra', 'state'."
    with pytest.raises(ckptconv.RestoreError) as e:
        ckptconv.restore(root, like={"m": jax.ShapeDtypeStruct((2,), jnp.float32)})
    assert str(e.value).startswith(f"{root}: no item fits like: item 'extra': ")
    assert str(e.value).endswith(" Pass item= to name the item.")


# ----------------------------------------------------------- MaxText's own states


def test_maxtext_loop_state_into_the_scan_state():
    """fixtures/maxtext (MaxText 0.2.5's trainer): the loop run's whole state into
    the abstract state of the scan run (params and Adam moments on axis 1, the
    nnx_aux RNG state on axis 0), as the trainer's restore would need it."""
    from ckptconv.formats import orbax
    from ckptconv.lazy import Ref

    fixtures = HERE.parent / "fixtures" / "maxtext"
    loop, scan = fixtures / "llama2_loop", fixtures / "llama2_scan"
    like = jax.tree.map(lambda r: jax.ShapeDtypeStruct(r.shape, r.dtype),
                        orbax.read_lazy(scan / "0" / "items"), is_leaf=lambda x: isinstance(x, Ref))
    with pytest.raises(ckptconv.RestoreError) as e:
        ckptconv.restore(loop, like=like)
    # The loop model's RNG streams are held once under layers_0, the scan
    # model's per layer and once more above: no layer mapping gives one from
    # the other, and restore says what does fit.
    assert str(e.value).endswith(
        "Nothing was restored. The parts that fit are opt_state, params, step: restore only them "
        "with only=['opt_state', 'params', 'step'] (like's other leaves come back as given).")
    keep = ["opt_state", "params", "step"]
    plan = ckptconv.plan_restore(loop, like=like, only=keep)
    assert (plan.item, plan.to, plan.options) == (
        "items", "scan", {"axis": 1, "pattern": "layers_{i}", "into": "layers"})
    assert plan.describe().endswith("; only opt_state, params, step (12 other leaves of like returned as given).")
    got = ckptconv.restore(loop, like=like, only=keep)
    left = jax.tree.leaves(got["nnx_aux"])
    assert len(left) == 12 and all(a is b for a, b in zip(left, jax.tree.leaves(like["nnx_aux"])))
    got = {k: got[k] for k in keep}
    want = ckptconv.to_scan({k: v for k, v in ckptconv.load(loop)["items"].items() if k in keep},
                            pattern="layers_{i}", into="layers", axis=1)
    flat_got = jax.tree_util.tree_leaves_with_path(got)
    flat_want = jax.tree_util.tree_leaves_with_path(want)
    assert [jax.tree_util.keystr(p) for p, _ in flat_got] == [jax.tree_util.keystr(p) for p, _ in flat_want]
    for (_, a), (_, b) in zip(flat_got, flat_want):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), b)


def test_a_like_one_level_off_the_checkpoint_gets_the_call_that_fits(tmp_path):
    """An HF trial: flax_model.msgpack holds the params alone, and like was the
    model's {"params": …} (a prefix mismatch, no way out named); and a train
    state's {"params": …} checkpoint restored into the params alone."""
    import flax.serialization

    loop = {"transformer": {"h": {str(i): {"w": np.full((2, 2), i, np.float32)} for i in range(3)},
                            "wte": np.ones((4, 2), np.float32)}}
    (tmp_path / "hf.msgpack").write_bytes(flax.serialization.to_bytes(loop))
    scan = ckptconv.to_scan(loop)
    with pytest.raises(ckptconv.RestoreError) as e:
        ckptconv.restore(tmp_path / "hf.msgpack", like={"params": scan})
    assert str(e.value).endswith(
        "The checkpoint's root may be like's 'params': restore into it (like['params'], or "
        "like.params of a TrainState) and put the result back under 'params'.")
    got = ckptconv.restore(tmp_path / "hf.msgpack", like=scan)
    np.testing.assert_array_equal(got["transformer"]["h"]["w"], scan["transformer"]["h"]["w"])
    ckptconv.save({"params": loop}, tmp_path / "state")
    with pytest.raises(ckptconv.RestoreError) as e:
        ckptconv.restore(tmp_path / "state", like=scan)
    assert str(e.value).endswith(" like may be the checkpoint's 'params': pass like={'params': like}.")
    got = ckptconv.restore(tmp_path / "state", like={"params": scan})
    np.testing.assert_array_equal(got["params"]["transformer"]["wte"], loop["transformer"]["wte"])

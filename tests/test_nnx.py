"""NNX: an ``nnx.List`` of blocks (state keys 0 … N-1) and the same blocks stacked
by ``nnx.vmap`` (run with ``nnx.scan``), both ways, in memory and through Orbax
files, outputs equal.

The blocks hold every kind of NNX state a layer has: ``Param`` (Linear, BatchNorm's
scale and bias), ``BatchStat`` (BatchNorm's running mean and var) and RNG state
(Dropout's own stream: an ``RngKey`` holding a typed PRNG key and an ``RngCount``),
which a vmap-built stack carries with a layer axis like the params.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import ckptconv

D, N = 16, 3


class Block(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.linear = nnx.Linear(D, D, rngs=rngs)
        self.bn = nnx.BatchNorm(D, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)  # forks a stream of its own per block

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.drop(nnx.relu(self.bn(self.linear(x))))


class LoopModel(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.blocks = nnx.List([Block(rngs=rngs) for _ in range(N)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


class ScanModel(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs) -> None:
        @nnx.vmap(in_axes=0, out_axes=0)
        def make(key: jax.Array) -> Block:
            return Block(rngs=nnx.Rngs(key))

        self.blocks = make(jax.random.split(rngs.params(), N))

    def __call__(self, x: jax.Array) -> jax.Array:
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x: jax.Array, block: Block) -> jax.Array:
            return block(x)

        return body(x, self.blocks)


X = jax.random.normal(jax.random.key(42), (8, D))


def _bits(x):
    """A leaf's value as numpy (typed PRNG keys: their key data)."""
    x = x.get_value() if isinstance(x, nnx.Variable) else x
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def _assert_states_equal(a, b):
    """Same pytree structure (keys, Variable types and metadata) and the same bits."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        x, y = _bits(x), _bits(y)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def _assert_states_close(a, b, atol):
    """As `_assert_states_equal`, floating leaves within ``atol``."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        x, y = _bits(x), _bits(y)
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def _assert_same_outputs(a, b):
    """Inference outputs equal bit for bit; a jitted training step (batch
    statistics, dropout masks from each layer's own stream) within 1e-6."""
    a.eval(), b.eval()
    np.testing.assert_array_equal(np.asarray(a(X)), np.asarray(b(X)))
    a.train(), b.train()
    step = nnx.jit(lambda m, x: m(x))
    np.testing.assert_allclose(np.asarray(step(a, X)), np.asarray(step(b, X)), rtol=0, atol=1e-6)


def _abstract_state(cls):
    return nnx.state(nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(0))))


# -- in memory ----------------------------------------------------------------


def test_default_detection_finds_the_nnx_list_with_int_keys():
    (g,) = ckptconv.find_groups(nnx.state(LoopModel(rngs=nnx.Rngs(0))))
    assert (g.path, g.keys, g.template, g.target) == ((), (0, 1, 2), "{i}", ("blocks",))


def test_to_scan_of_a_list_model_state_updates_the_vmap_model():
    loop = LoopModel(rngs=nnx.Rngs(0))
    scan = ScanModel(rngs=nnx.Rngs(1))  # other weights, to be overwritten
    state = nnx.state(loop)
    new = ckptconv.to_scan(state)
    # What nnx.state of the vmap model has: one State of plain dicts, the same
    # Variable types (Param, BatchStat, RngKey, RngCount) with their metadata.
    assert isinstance(new, nnx.State)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(nnx.state(scan))
    blocks = new["blocks"]
    assert type(blocks["bn"]["mean"]) is nnx.BatchStat and type(blocks["drop"]["rngs"]["key"]) is nnx.RngKey
    for path in [("linear", "kernel"), ("bn", "var"), ("drop", "rngs", "count"), ("drop", "rngs", "key")]:
        got = blocks
        for k in path:
            got = got[k]
        want = []
        for i in range(N):
            leaf = state["blocks"][i]
            for k in path:
                leaf = leaf[k]
            want.append(_bits(leaf))
        np.testing.assert_array_equal(_bits(got), np.stack(want))
    key = blocks["drop"]["rngs"]["key"].get_value()
    assert key.shape == (N,) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    nnx.update(scan, new)
    _assert_states_equal(nnx.state(scan), new)
    count = _bits(loop.blocks[1].drop.rngs.count).copy()  # nnx.state shares the model's Variables
    _assert_same_outputs(loop, scan)
    # After the training step both models moved their batch statistics and RNG
    # counts the same way: the scan model's state unstacked is the loop model's.
    after = ckptconv.to_loop(nnx.state(scan), pattern="{i}")
    assert _bits(after["blocks"][1]["drop"]["rngs"]["count"]) == count + 1
    _assert_states_close(after, nnx.state(loop), atol=1e-6)


def test_stack_under_another_name():
    """A scan model whose stack is another attribute (``self.stack``): ``into`` names it;
    ``pattern="blocks/{i}"`` puts the layers back into the list ``blocks``."""
    state = nnx.state(LoopModel(rngs=nnx.Rngs(0)))
    s = ckptconv.to_scan(state, into="stack")
    assert list(s.keys()) == ["stack"]
    assert s["stack"]["linear"]["kernel"].get_value().shape == (N, D, D)
    _assert_states_equal(ckptconv.to_loop(s, source="stack", pattern="blocks/{i}"), state)


def test_to_loop_of_a_vmap_model_state_updates_the_list_model():
    scan = ScanModel(rngs=nnx.Rngs(0))
    loop = LoopModel(rngs=nnx.Rngs(1))
    new = ckptconv.to_loop(nnx.state(scan), pattern="{i}")
    assert list(new["blocks"].keys()) == [0, 1, 2]  # ints, as nnx.state of an nnx.List has them
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(nnx.state(loop))
    np.testing.assert_array_equal(
        _bits(new["blocks"][2]["linear"]["kernel"]), _bits(nnx.state(scan)["blocks"]["linear"]["kernel"])[2]
    )
    nnx.update(loop, new)
    _assert_same_outputs(scan, loop)
    # And back: the round trip is the identity, bit for bit.
    _assert_states_equal(ckptconv.to_scan(nnx.state(loop)), nnx.state(scan))


def test_split_merge_forward_over_the_converted_stack():
    """The other way to run a vmap-built stack: split it and jax.lax.scan over its state."""
    loop = LoopModel(rngs=nnx.Rngs(0))
    scan = ScanModel(rngs=nnx.Rngs(1))
    nnx.update(scan, ckptconv.to_scan(nnx.state(loop)))
    loop.eval(), scan.eval()
    graphdef, state = nnx.split(scan.blocks)  # every leaf has the layer axis, RNG state too

    def body(x, layer):
        return nnx.merge(graphdef, layer)(x), None

    out, _ = jax.lax.scan(body, X, state)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(loop(X)))


def test_pure_dict_state_converts_and_updates():
    """``nnx.to_pure_dict`` state (int keys, no Variables): flax 0.12's nnx.update takes it."""
    loop = LoopModel(rngs=nnx.Rngs(0))
    scan = ScanModel(rngs=nnx.Rngs(1))
    new = ckptconv.to_scan(nnx.to_pure_dict(nnx.state(loop)))
    assert type(new) is dict and new["blocks"]["linear"]["kernel"].shape == (N, D, D)
    nnx.update(scan, new)
    _assert_states_equal(nnx.state(scan), ckptconv.to_scan(nnx.state(loop)))
    _assert_same_outputs(loop, scan)


def test_rng_streams_shared_by_all_blocks_are_not_layer_state():
    """Blocks that keep the model's one ``nnx.Rngs`` (``self.rngs = rngs``) hold it
    once, under block 0: no stack can carry it. Convert the rest and let the scan
    model keep its own RNG state."""

    class SharedBlock(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs) -> None:
            self.linear = nnx.Linear(D, D, rngs=rngs)
            self.rngs = rngs

    class SharedLoop(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs) -> None:
            self.blocks = nnx.List([SharedBlock(rngs=rngs) for _ in range(N)])

    class SharedScan(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs) -> None:
            make = nnx.vmap(lambda key: SharedBlock(rngs=nnx.Rngs(key)), in_axes=0, out_axes=0)
            self.blocks = make(jax.random.split(rngs.params(), N))

    loop, scan = SharedLoop(rngs=nnx.Rngs(0)), SharedScan(rngs=nnx.Rngs(1))
    with pytest.raises(ckptconv.NothingToConvertError, match="layer 0 has extra rngs/default/count, rngs/default/key"):
        ckptconv.to_scan(nnx.state(loop))
    rng_before = _bits(nnx.state(scan, nnx.RngState)["blocks"]["rngs"]["default"]["key"])
    nnx.update(scan, ckptconv.to_scan(nnx.state(loop, nnx.Not(nnx.RngState))))
    np.testing.assert_array_equal(
        _bits(scan.blocks.linear.kernel), np.stack([_bits(b.linear.kernel) for b in loop.blocks])
    )
    np.testing.assert_array_equal(_bits(nnx.state(scan, nnx.RngState)["blocks"]["rngs"]["default"]["key"]), rng_before)


# -- through Orbax files --------------------------------------------------------


def _save(path, state):
    with ocp.StandardCheckpointer() as ck:
        ck.save(path, state)


#: Orbax before 0.12 cannot restore a typed PRNG key into an abstract state
#: (its cast spec asks numpy for ``key<fry>``: "TypeError: Cannot interpret
#: 'key<fry>' as a data type"); ckptconv.restore can, and stands in there.
_ORBAX_RESTORES_KEYS = tuple(int(v) for v in ocp.__version__.split(".")[:2]) >= (0, 12)


def _restore(path, cls):
    """How NNX users restore: into the abstract state of the model as it is now."""
    if _ORBAX_RESTORES_KEYS:
        with ocp.StandardCheckpointer() as ck:
            state = ck.restore(path, _abstract_state(cls))
    else:
        state = ckptconv.restore(path, like=_abstract_state(cls))
    model = cls(rngs=nnx.Rngs(7))
    nnx.update(model, state)
    return model, state


def test_orbax_nnx_state_on_disk():
    """What Orbax 0.12 writes for ``nnx.state(model)``: each Variable is a dict
    with a ``value`` key, list keys are the strings '0' … 'N-1', and a typed PRNG
    key is its uint32 key data (the key impl kept in Orbax's array metadata)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        _save(f"{d}/loop", nnx.state(LoopModel(rngs=nnx.Rngs(0))))
        tree = ckptconv.load(f"{d}/loop")
    assert list(tree["blocks"]) == ["0", "1", "2"]
    assert sorted(tree["blocks"]["0"]) == ["bn", "drop", "linear"]
    assert list(tree["blocks"]["0"]["linear"]["kernel"]) == ["value"]
    key = tree["blocks"]["1"]["drop"]["rngs"]["key"]["value"]
    count = tree["blocks"]["1"]["drop"]["rngs"]["count"]["value"]
    assert (key.shape, key.dtype, count.shape, count.dtype) == ((2,), np.uint32, (), np.uint32)


def test_orbax_loop_checkpoint_to_scan_and_back(tmp_path):
    loop = LoopModel(rngs=nnx.Rngs(0))
    _save(tmp_path / "loop", nnx.state(loop))
    res = ckptconv.convert(tmp_path / "loop", tmp_path / "scan", to="scan")
    (g,) = res.items[0].groups
    assert (g.keys, g.template, g.target) == (("0", "1", "2"), "{i}", ("blocks",))
    scan, restored = _restore(tmp_path / "scan", ScanModel)
    key = restored["blocks"]["drop"]["rngs"]["key"].get_value()
    assert key.shape == (N,) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    _assert_states_equal(nnx.state(scan), ckptconv.to_scan(nnx.state(loop)))
    _assert_same_outputs(loop, scan)
    # The record makes to-loop without options give the NNX list back.
    ckptconv.convert(tmp_path / "scan", tmp_path / "back", to="loop")
    back, _ = _restore(tmp_path / "back", LoopModel)
    _assert_states_equal(nnx.state(back), nnx.state(LoopModel(rngs=nnx.Rngs(0))))


def test_orbax_scan_checkpoint_to_loop(tmp_path):
    scan = ScanModel(rngs=nnx.Rngs(0))
    _save(tmp_path / "scan", nnx.state(scan))
    # A checkpoint ckptconv did not write has no record: '{i}' puts the layers
    # back as a list under the stack's own key (default: layer_0 …).
    ckptconv.convert(tmp_path / "scan", tmp_path / "loop", to="loop", pattern="{i}")
    assert list(ckptconv.load(tmp_path / "loop")["blocks"]) == ["0", "1", "2"]
    loop, _ = _restore(tmp_path / "loop", LoopModel)
    _assert_states_equal(nnx.state(loop), ckptconv.to_loop(nnx.state(scan), pattern="{i}"))
    _assert_same_outputs(scan, loop)


def test_cli_both_ways(tmp_path, cli):
    loop = LoopModel(rngs=nnx.Rngs(0))
    _save(tmp_path / "loop", nnx.state(loop))
    r = cli("to-scan", tmp_path / "loop", tmp_path / "scan")
    assert r.exit_code == 0, r.output
    assert "blocks/{i}: 3 layers -> blocks" in r.output
    assert f"to undo: ckptconv to-loop {tmp_path / 'scan'} LOOP_OUT --pattern '{{i}}'" in r.output
    scan, _ = _restore(tmp_path / "scan", ScanModel)
    _assert_same_outputs(loop, scan)

    _save(tmp_path / "scan2", nnx.state(scan))  # saved by the scan model itself: no record
    r = cli("to-loop", tmp_path / "scan2", tmp_path / "loop2", "--pattern", "{i}")
    assert r.exit_code == 0, r.output
    assert "blocks: 3 layers -> blocks/{i}" in r.output
    loop2, _ = _restore(tmp_path / "loop2", LoopModel)
    _assert_same_outputs(scan, loop2)


def test_orbax_pure_dict_checkpoint(tmp_path):
    """Saved as ``nnx.to_pure_dict`` (no ``value`` level): restore raw, then
    ``nnx.replace_by_pure_dict`` into the scan model's state."""
    loop = LoopModel(rngs=nnx.Rngs(0))
    _save(tmp_path / "loop", nnx.to_pure_dict(nnx.state(loop)))
    ckptconv.convert(tmp_path / "loop", tmp_path / "scan", to="scan")
    with ocp.StandardCheckpointer() as ck:
        raw = ck.restore(tmp_path / "scan")
    scan = ScanModel(rngs=nnx.Rngs(7))
    state = nnx.state(scan)
    nnx.replace_by_pure_dict(state, raw)
    nnx.update(scan, state)
    _assert_same_outputs(loop, scan)


# -- ckptconv.restore straight into the model's abstract state -------------------


def test_restore_into_the_nnx_state_of_the_other_form(tmp_path):
    """``restore(like=nnx.state(abstract model))``: no converted copy on disk;
    typed keys come back typed; outputs equal, both ways."""
    loop = LoopModel(rngs=nnx.Rngs(0))
    _save(tmp_path / "loop", nnx.state(loop))
    state = ckptconv.restore(tmp_path / "loop", like=_abstract_state(ScanModel))
    key = state["blocks"]["drop"]["rngs"]["key"].get_value()
    assert key.shape == (N,) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    _assert_states_equal(state, ckptconv.to_scan(nnx.state(loop)))
    scan = ScanModel(rngs=nnx.Rngs(7))
    nnx.update(scan, state)
    _assert_same_outputs(loop, scan)
    plan = ckptconv.plan_restore(tmp_path / "loop", like=_abstract_state(ScanModel))
    assert (plan.to, plan.options) == ("scan", {"axis": 0, "pattern": "{i}", "into": "blocks"})

    scan = ScanModel(rngs=nnx.Rngs(0))
    _save(tmp_path / "scan", nnx.state(scan))
    state = ckptconv.restore(tmp_path / "scan", like=_abstract_state(LoopModel))
    _assert_states_equal(state, ckptconv.to_loop(nnx.state(scan), pattern="{i}"))
    loop = LoopModel(rngs=nnx.Rngs(7))
    nnx.update(loop, state)
    _assert_same_outputs(scan, loop)

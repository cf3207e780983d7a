"""msgpack -> Orbax and back, streaming: the Orbax writer takes another format's
leaves one at a time (a stack one layer at a time, chunked layer-thick), and
unstacking such an output into msgpack reads one layer per output leaf."""

from __future__ import annotations

import json
from pathlib import Path

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

import ckptconv

HF = Path(__file__).resolve().parents[1] / "fixtures" / "hf"


def _leaves(t):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(t)}


def test_msgpack_to_orbax_streams_layers_and_restores_in_orbax(tmp_path, monkeypatch):
    from ckptconv.formats import msgpack as msgpack_fmt

    src = HF / "gpt2" / "flax_model.msgpack"
    reads = []
    real = msgpack_fmt.read_array

    def spy(item, ref):
        reads.append(tuple(ref.shape))
        return real(item, ref)

    monkeypatch.setattr(msgpack_fmt, "read_array", spy)
    out = tmp_path / "scan"
    ckptconv.convert(src, out, to="scan", format="orbax")
    # Every read is one input array (a layer's leaf), never a stack.
    tree = flax.serialization.msgpack_restore(src.read_bytes())
    layer_shapes = {tuple(x.shape) for x in _leaves(tree).values()}
    assert reads and set(reads) <= layer_shapes
    # Orbax itself restores the output: equal to the in-memory to_scan.
    got = ocp.PyTreeCheckpointer().restore(out.absolute())
    want = ckptconv.to_scan(tree)
    assert _leaves(got).keys() == _leaves(want).keys()
    for k, v in _leaves(want).items():
        assert _leaves(got)[k].tobytes() == v.tobytes(), k
    # Stacks are chunked one layer thick, so that unstacking is a chunk copy.
    meta = json.loads((out / "_METADATA").read_text())
    assert meta["use_zarr3"] is False
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{out}"}).result()
    zarray = json.loads(bytes(kv.read("transformer.h.attn.c_attn.kernel/.zarray").result().value))
    assert zarray["shape"] == [3, 96, 32] and zarray["chunks"] == [1, 96, 32]


def test_orbax_stack_to_msgpack_reads_one_layer_per_leaf(tmp_path, monkeypatch):
    src = HF / "gpt2" / "flax_model.msgpack"
    scan = tmp_path / "scan"
    ckptconv.convert(src, scan, to="scan", format="orbax")
    from ckptconv.formats import orbax_stream

    whole, regions = [], []
    real = orbax_stream.read_array

    def spy(item, source, index=None):
        (whole if index is None else regions).append(source)
        return real(item, source, index)

    monkeypatch.setattr(orbax_stream, "read_array", spy)
    back = tmp_path / "back.msgpack"
    ckptconv.convert(scan, back, to="loop", format="msgpack", source="h", pattern="{i}")
    assert back.read_bytes() == src.read_bytes()
    stacked = [k for k in regions if k.startswith("transformer.h.")]
    assert len(stacked) == 3 * len(set(stacked))  # one read per layer of each stack
    assert not [k for k in whole if k.startswith("transformer.h.")]


def test_orbax_train_state_to_msgpack_loads_with_flax_from_bytes(tmp_path, cli):
    """Orbax keeps an optax chain's state as a list ([ScaleByAdamState, None, None]);
    a msgpack output has it as flax writes it ({"0": ..., "1": {}, "2": {}}), so
    `flax.serialization.from_bytes(TrainState, ...)` loads the file."""
    import flax.linen as nn
    import optax
    from flax.training import train_state

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(3):
                x = nn.Dense(8, name=f"layer_{i}")(x)
            return x

    x = np.ones((2, 8), np.float32)
    params = Net().init(jax.random.PRNGKey(0), x)["params"]
    state = train_state.TrainState.create(apply_fn=Net().apply, params=params, tx=optax.adamw(1e-2))
    grads = jax.tree.map(lambda p: p * 0 + 0.5, state.params)
    state = state.apply_gradients(grads=grads)
    with ocp.StandardCheckpointer() as c:
        c.save((tmp_path / "state").absolute(), state)
    r = cli("extract", tmp_path / "state", tmp_path / "state.msgpack")
    assert r.exit_code == 0, r.output
    raw = (tmp_path / "state.msgpack").read_bytes()
    # As flax writes it (its step is a Python int there, a 0-d array here).
    want = flax.serialization.msgpack_restore(flax.serialization.to_bytes(state))
    assert jax.tree.structure(flax.serialization.msgpack_restore(raw)) == jax.tree.structure(want)
    got = flax.serialization.from_bytes(state, raw)
    assert int(got.step) == 1 and int(got.opt_state[0].count) == 1
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # to-scan into msgpack: the scan model's TrainState loads it.
    r = cli("to-scan", tmp_path / "state", tmp_path / "scan.msgpack")
    assert r.exit_code == 0, r.output
    scan_state = state.replace(params=ckptconv.to_scan(jax.device_get(state.params)),
                               opt_state=ckptconv.to_scan(jax.device_get(state.opt_state)))
    got = flax.serialization.from_bytes(scan_state, (tmp_path / "scan.msgpack").read_bytes())
    np.testing.assert_array_equal(np.asarray(got.opt_state[0].mu["blocks"]["kernel"]),
                                  np.stack([np.asarray(state.opt_state[0].mu[f"layer_{i}"]["kernel"]) for i in range(3)]))

"""The streaming engine (`ckptconv.convert`) and the in-memory functions
(`load` + `to_scan`/`to_loop`) give bit-identical results, and Orbax reads every
output ckptconv writes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import ckptconv


def bits(tree):
    return jax.tree.map(
        lambda x: (np.asarray(x).dtype.str, np.asarray(x).shape, np.asarray(x).tobytes()),
        tree,
        is_leaf=lambda x: x is None,
    )


def _layers(rng, n, prefix="layer_{i}"):
    return {
        prefix.format(i=i): {
            "attn": {"q": rng.standard_normal((6, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(jnp.bfloat16)},
            "RMSNorm_0": {"scale": rng.standard_normal(6).astype(np.float32)},
            "RMSNorm_1": {"scale": rng.standard_normal(6).astype(np.float32)},
            "q8": rng.integers(-100, 100, (3, 6)).astype(np.int8),
        }
        for i in range(n)
    }


def _state(kind: str):
    rng = np.random.default_rng(7)
    if kind == "train":
        params = {**_layers(rng, 3), "embed": {"embedding": rng.standard_normal((5, 6)).astype(np.float32)}}
        fparams = jax.tree.map(lambda x: x.astype(np.float32), params)
        opt = optax.adam(1e-3).init(fparams)
        opt = jax.tree.map(lambda x: np.asarray(x) + 0.5 if np.asarray(x).dtype == np.float32 else np.asarray(x), opt)
        return {"params": params, "opt_state": [{"count": np.asarray(opt[0].count), "mu": opt[0].mu, "nu": opt[0].nu}, None]}, {}
    if kind == "pattern":
        return {"params": {"encoder": _layers(rng, 2, "enc_{i}"), "decoder": _layers(rng, 4, "enc_{i}"), "layer_0": {"x": np.zeros(2, np.float32)}}}, {"pattern": "enc_{i}", "into": "stack"}
    if kind == "nnx":
        return {"model": {"layers": {str(i): v for i, v in enumerate(_layers(rng, 3).values())}, "head": {"w": np.ones(3, np.float32)}}}, {}
    raise AssertionError(kind)


def _save(tree, path, fmt):
    ckptconv.save(tree, path, format=fmt)
    return path


def _restore_orbax(path):
    """Plain Orbax, three ways; all must agree."""
    with ocp.StandardCheckpointer() as c:
        raw = c.restore(path.absolute())
        meta = c.metadata(path.absolute()).item_metadata.tree
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)
        typed = c.restore(path.absolute(), target)
    with ocp.PyTreeCheckpointer() as c:
        py = c.restore(path.absolute())
    assert bits(raw) == bits(typed) == bits(py)
    return raw


@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("kind", ["train", "pattern", "nnx"])
def test_streaming_equals_in_memory(tmp_path, fmt, axis, kind):
    tree, opts = _state(kind)
    src = _save(tree, tmp_path / "loop", fmt)
    loaded = ckptconv.load(src)

    # to-scan
    ckptconv.convert(src, tmp_path / "scan", to="scan", axis=axis, **opts)
    expected = ckptconv.to_scan(loaded, axis=axis, **opts)
    got = _restore_orbax(tmp_path / "scan") if fmt == "orbax" else ckptconv.load(tmp_path / "scan")
    assert bits(got) == bits(expected)

    # to-loop of ckptconv's own output (layer-thick chunks in Orbax)
    back_opts = {"source": opts.get("into", "blocks" if kind != "nnx" else "layers"), "pattern": opts.get("pattern") or ("{i}" if kind == "nnx" else "layer_{i}")}
    ckptconv.convert(tmp_path / "scan", tmp_path / "back", to="loop", axis=axis, **back_opts)
    got_back = _restore_orbax(tmp_path / "back") if fmt == "orbax" else ckptconv.load(tmp_path / "back")
    assert bits(got_back) == bits(ckptconv.to_loop(expected, axis=axis, **back_opts)) == bits(loaded)


@pytest.mark.parametrize("axis", [0, 1])
def test_to_loop_of_single_chunk_scan_checkpoint(tmp_path, axis):
    """A scan checkpoint as a training run (or np.stack + save) writes it: each
    stacked array one chunk. to-loop decodes it leaf by leaf."""
    tree, _ = _state("train")
    scan = ckptconv.to_scan(tree, axis=axis)
    with ocp.StandardCheckpointer() as c:
        c.save((tmp_path / "scan").absolute(), scan)
    ckptconv.convert(tmp_path / "scan", tmp_path / "loop", to="loop", axis=axis)
    assert bits(_restore_orbax(tmp_path / "loop")) == bits(ckptconv.to_loop(ckptconv.load(tmp_path / "scan"), axis=axis))


def test_manager_output_restores_with_checkpoint_manager(tmp_path):
    tree, _ = _state("train")
    with ocp.CheckpointManager((tmp_path / "run").absolute()) as m:
        m.save(3, args=ocp.args.StandardSave(tree))
        m.wait_until_finished()
    ckptconv.convert(tmp_path / "run", tmp_path / "run_scan", to="scan")
    with ocp.CheckpointManager((tmp_path / "run_scan").absolute()) as m:
        assert m.latest_step() == 3
        got = m.restore(3)
    assert bits(got) == bits(ckptconv.to_scan(ckptconv.load(tmp_path / "run")["default"]))


@pytest.mark.parametrize("kind", ["train", "pattern", "nnx"])
def test_fast_metadata_reader_agrees_with_orbax(tmp_path, kind):
    from ckptconv.formats import orbax_stream

    tree, _ = _state(kind)
    tree["extra"] = {"none": None, "empty": {}, "lst": [np.int8(1), [np.zeros(2, jnp.bfloat16)], None], "s": np.float32(2)}
    _save(tree, tmp_path / "ck", "orbax")
    fast = orbax_stream.read_lazy(tmp_path / "ck")
    assert fast == orbax_stream.read_lazy_with_orbax(tmp_path / "ck")
    assert fast["extra"]["lst"][1][0] == ckptconv.lazy.Ref("extra.lst.1.0", (2,), np.dtype(jnp.bfloat16))

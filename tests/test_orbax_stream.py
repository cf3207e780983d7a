"""Streaming Orbax reader/writer: lazy trees in, plain-Orbax-restorable items out."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from ckptconv.errors import FormatError, OutputExistsError
from ckptconv.formats import orbax_stream
from ckptconv.formats.orbax_stream import writer
from ckptconv.formats.orbax_stream.destination import _Destination
from ckptconv.lazy import Ref, Slice, Stack, stack, unstack

N = 3  # layers


def _layer(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {
        "attn": {
            "q": rng.standard_normal((4, 6), dtype=np.float32),
            "bias": jnp.asarray(rng.standard_normal(6), dtype=jnp.bfloat16),
        },
        "mlp": {"w": jnp.asarray(rng.standard_normal((6, 4)), dtype=jnp.float32)},
        "quant": rng.integers(-128, 127, (5,), dtype=np.int8),
        "scale": jnp.float32(i + 0.5),  # 0-d jax array
        "count": np.int32(i),  # 0-d numpy array
    }


def _source_tree() -> dict:
    return {
        "params": {f"layer_{i}": _layer(i) for i in range(N)},
        "embed": np.arange(12, dtype=np.float32).reshape(3, 4),
        "none": None,
        "empty": {},
        "empty_list": [],
        "lst": [np.ones(2, np.int8), jnp.zeros((2, 2), jnp.bfloat16)],
        "step": 7,  # python scalar
        "lr": 0.25,
    }


def _save(path: Path, tree, save_args=None) -> Path:
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree, save_args=save_args)
    return path


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("src") / "item", _source_tree())


@pytest.fixture(scope="module")
def expected(src) -> dict:
    return ocp.StandardCheckpointer().restore(src)


class Spy:
    """Counts chunk-copy ops and decode jobs of `write` (which path ran), on
    the chunk-copy engine (``CKPTCONV_CLONE=0``; the clone engine, which
    moves chunks by renaming keys, is tests/test_clone.py's)."""

    def __init__(self, monkeypatch):
        from ckptconv.formats.orbax_stream import plan

        monkeypatch.setattr(plan, "CLONE", False)
        self.copied = 0
        self.decoded: list[str] = []
        copy_chunks = _Destination.copy_chunks
        decode_job = _Destination.decode_job
        spy = self

        async def count_copy(self, src_kv, src_path, ops, values, progress, **kw):
            spy.copied += sum(1 for op in ops if op.src_key)
            return await copy_chunks(self, src_kv, src_path, ops, values, progress, **kw)

        async def count_decode(self, src, job, progress):
            spy.decoded.append(job.kind)
            return await decode_job(self, src, job, progress)

        monkeypatch.setattr(_Destination, "copy_chunks", count_copy)
        monkeypatch.setattr(_Destination, "decode_job", count_decode)


def _map(f, *trees):
    if isinstance(trees[0], dict):
        return {k: _map(f, *(t[k] for t in trees)) for k in trees[0]}
    return f(*trees)


def _to_scan(lazy: dict, axis: int) -> dict:
    out = {k: v for k, v in lazy["params"].items() if not k.startswith("layer_")}
    layers = [lazy["params"][f"layer_{i}"] for i in range(N)]
    out["blocks"] = _map(lambda *refs: stack(list(refs), axis), *layers)
    return {**lazy, "params": out}


def _to_loop(lazy: dict, axis: int) -> dict:
    slices = _map(lambda ref: unstack(ref, axis), lazy["params"]["blocks"])
    out = {k: v for k, v in lazy["params"].items() if k != "blocks"}
    for i in range(N):
        out[f"layer_{i}"] = _map(lambda s, i=i: s[i], slices)
    return {**lazy, "params": out}


def _np_scan(tree: dict, axis: int) -> dict:
    layers = [tree["params"][f"layer_{i}"] for i in range(N)]
    blocks = _map(lambda *xs: np.stack([np.asarray(x) for x in xs], axis), *layers)
    return {**tree, "params": {"blocks": blocks}}


def _assert_same(got, want, path="") -> None:
    """Bit-for-bit equality with dtypes; lists stay lists, None/{}/[] stay."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), path
        for k in want:
            _assert_same(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{path}/{i}")
    elif want is None:
        assert got is None, path
    elif isinstance(want, (int, float)) and not isinstance(want, np.generic):
        assert type(got) is type(want) and got == want, path
    else:
        g, w = np.asarray(got), np.asarray(want)
        assert g.dtype == w.dtype and g.shape == w.shape, (path, g.dtype, w.dtype, g.shape, w.shape)
        assert g.tobytes() == w.tobytes(), path


def _restore_all_ways(path: Path, want: dict) -> None:
    """Plain Orbax restores `path` exactly, with and without a target."""
    _assert_same(ocp.StandardCheckpointer().restore(path), want)
    _assert_same(ocp.PyTreeCheckpointer().restore(path), want)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), want)
    got = ocp.StandardCheckpointer().restore(path, target)
    # With a target, Orbax returns python scalars as 0-d arrays.
    _assert_same(got, jax.tree.map(np.asarray, want))


def _zarray(item: Path, name: str) -> dict:
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{item}"}).result()
    return json.loads(kv.read(f"{name}/.zarray").result().value)


def test_read_lazy_describes_without_data(src):
    lazy = orbax_stream.read_lazy(src)
    layer = lazy["params"]["layer_1"]
    assert layer["attn"]["q"] == Ref("params.layer_1.attn.q", (4, 6), np.dtype(np.float32))
    assert layer["attn"]["bias"] == Ref("params.layer_1.attn.bias", (6,), np.dtype(jnp.bfloat16))
    assert layer["quant"].dtype == np.int8
    assert layer["scale"] == Ref("params.layer_1.scale", (), np.dtype(np.float32))
    assert lazy["step"] == Ref("step", (), np.dtype(np.int64))
    assert lazy["none"] is None and lazy["empty"] == {} and lazy["empty_list"] == []
    assert isinstance(lazy["lst"], list) and lazy["lst"][1].source == "lst.1"
    value = orbax_stream.read_array(src, "params.layer_1.attn.bias")
    assert value.dtype == jnp.bfloat16
    np.testing.assert_array_equal(value, np.asarray(_layer(1)["attn"]["bias"]))
    assert orbax_stream.read_array(src, "step").shape == ()


def test_read_lazy_strings(tmp_path):
    path = tmp_path / "item"
    ocp.PyTreeCheckpointer().save(path, {"name": "hello", "x": np.ones(2)})
    lazy = orbax_stream.read_lazy(path)
    assert lazy["name"] == "hello"
    orbax_stream.write(path, {"renamed": lazy["name"], "y": lazy["x"]}, tmp_path / "out")
    got = ocp.PyTreeCheckpointer().restore(tmp_path / "out")
    assert got["renamed"] == "hello"
    np.testing.assert_array_equal(got["y"], np.ones(2))


def test_copy_unchanged(src, expected, tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    total = []
    lazy = orbax_stream.read_lazy(src)
    orbax_stream.write(src, lazy, tmp_path / "out", progress=total.append)
    _restore_all_ways(tmp_path / "out", expected)
    assert spy.decoded == [] and spy.copied > 0
    nbytes = sum(x.nbytes for x in jax.tree.leaves(lazy) if isinstance(x, Ref))
    assert sum(total) == nbytes
    names = set(os.listdir(tmp_path))
    assert names == {"out"}, names  # no temporary directory left behind
    assert (tmp_path / "out" / "commit_success.txt").exists()
    assert (tmp_path / "out" / "_CHECKPOINT_METADATA").read_bytes() == (
        src / "_CHECKPOINT_METADATA"
    ).read_bytes()


def _drop_small(tree: dict) -> dict:
    """`tree` without the 0-d and 1-d layer leaves, which cannot take axis 1."""
    tree = jax.tree.map(lambda x: x, tree)  # a copy of the containers
    for i in range(N):
        layer = tree["params"][f"layer_{i}"]
        del layer["scale"], layer["count"], layer["quant"], layer["attn"]["bias"]
    return tree


@pytest.mark.parametrize("axis", [0, 1])
def test_to_scan_by_chunk_copy_then_back(src, expected, tmp_path, monkeypatch, axis):
    spy = Spy(monkeypatch)
    lazy = orbax_stream.read_lazy(src)
    want_loop = expected if axis == 0 else _drop_small(expected)
    if axis == 1:
        lazy = _drop_small(lazy)
    scan = tmp_path / "scan"
    orbax_stream.write(src, _to_scan(lazy, axis), scan)
    assert spy.decoded == [] and spy.copied > 0  # all moved as compressed chunks
    _restore_all_ways(scan, _np_scan(want_loop, axis))

    # Stacked outputs are layer-thick: one chunk per layer on the layer axis.
    z = _zarray(scan, "params.blocks.attn.q")
    shape, chunks = [4, 6], [4, 6]
    shape.insert(axis, N)
    chunks.insert(axis, 1)
    assert (z["shape"], z["chunks"]) == (shape, chunks)
    if axis == 0:
        assert _zarray(scan, "params.blocks.scale")["chunks"] == [1]
        # jax.Array leaves stay jax.Arrays, with Orbax's per-array metadata.
        restored = ocp.StandardCheckpointer().restore(scan)
        assert isinstance(restored["params"]["blocks"]["mlp"]["w"], jax.Array)
        assert isinstance(restored["params"]["blocks"]["attn"]["q"], np.ndarray)
        meta = json.loads((scan / "array_metadatas" / "process_0").read_text())
        by_name = {
            m["array_metadata"]["param_name"]: m["array_metadata"] for m in meta["array_metadatas"]
        }
        assert by_name["params.blocks.mlp.w"]["chunk_shape"] == [1, 6, 4]
        assert by_name["params.blocks.mlp.w"]["write_shape"] == [N, 6, 4]

    # to-loop of ckptconv's own output is a chunk copy too, and round-trips.
    spy.copied, spy.decoded = 0, []
    loop = tmp_path / "loop"
    orbax_stream.write(scan, _to_loop(orbax_stream.read_lazy(scan), axis), loop)
    assert spy.decoded == [] and spy.copied > 0
    _restore_all_ways(loop, want_loop)


@pytest.mark.parametrize("axis", [0, 1])
def test_to_loop_of_one_big_chunk_decodes(tmp_path, monkeypatch, axis):
    """A stacked array saved as ONE chunk (a scanned run) is sliced by decoding."""
    rng = np.random.default_rng(0)
    blocks = {
        "w": rng.standard_normal((N, 5, 7), dtype=np.float32),
        "b": jnp.asarray(rng.standard_normal((N, 7)), jnp.bfloat16),
        "q": rng.integers(-100, 100, (N, 3, 2), dtype=np.int8),
    }
    if axis == 1:
        blocks = {"w": np.moveaxis(blocks["w"], 0, 1), "q": np.moveaxis(blocks["q"], 0, 1)}
    src = _save(tmp_path / "scan", {"params": {"blocks": blocks}, "step": 3})
    assert _zarray(src, "params.blocks.w")["chunks"] == list(blocks["w"].shape)

    spy = Spy(monkeypatch)
    total = []
    lazy = orbax_stream.read_lazy(src)
    orbax_stream.write(src, _to_loop(lazy, axis), tmp_path / "loop", progress=total.append)
    assert spy.decoded == ["slices"] * len(blocks)
    assert sum(total) == sum(np.asarray(v).nbytes for v in blocks.values()) + 8

    want = {
        "params": {
            f"layer_{i}": {k: np.take(np.asarray(v), i, axis) for k, v in blocks.items()}
            for i in range(N)
        },
        "step": 3,
    }
    restored = ocp.StandardCheckpointer().restore(tmp_path / "loop")
    _assert_same(jax.tree.map(np.asarray, restored), jax.tree.map(np.asarray, want))
    if axis == 0:
        assert isinstance(restored["params"]["layer_0"]["b"], jax.Array)
    _restore_all_ways(tmp_path / "loop", jax.tree.map(lambda x: x, restored))

    # ... and stacking the decoded layers again gives the scanned run back.
    spy.copied, spy.decoded = 0, []
    back = tmp_path / "back"
    orbax_stream.write(
        tmp_path / "loop", _to_scan(orbax_stream.read_lazy(tmp_path / "loop"), axis), back
    )
    assert spy.decoded == []
    _assert_same(
        jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(back)),
        jax.tree.map(np.asarray, {"params": {"blocks": blocks}, "step": 3}),
    )


def test_split_chunks(tmp_path, monkeypatch):
    """Sources already chunked in other ways: still chunk copies where possible."""
    layers = {
        f"layer_{i}": np.arange(64, dtype=np.float32).reshape(8, 8) * (i + 1) for i in range(N)
    }
    thick = np.arange(4 * 2 * 2, dtype=np.float32).reshape(4, 2, 2)
    odd = {"a": np.ones((8, 8), np.float32), "b": np.full((8, 8), 2, np.float32)}
    save_args = {
        "layers": {k: ocp.SaveArgs(chunk_byte_size=64) for k in layers},
        "thick": ocp.SaveArgs(chunk_byte_size=32),
        "odd": {"a": ocp.SaveArgs(chunk_byte_size=64), "b": ocp.SaveArgs()},
    }
    src = _save(tmp_path / "src", {"layers": layers, "thick": thick, "odd": odd}, save_args)
    assert _zarray(src, "layers.layer_0")["chunks"] == [4, 4]
    assert _zarray(src, "thick")["chunks"] == [2, 2, 2]

    lazy = orbax_stream.read_lazy(src)
    out = {
        "stacked": stack([lazy["layers"][f"layer_{i}"] for i in range(N)], 1),
        "thick": unstack(lazy["thick"], 0),
        "mixed": stack([lazy["odd"]["a"], lazy["odd"]["b"]], 0),  # different layouts
    }
    spy = Spy(monkeypatch)
    orbax_stream.write(src, out, tmp_path / "out")
    assert sorted(spy.decoded) == ["slices", "stack"]
    assert _zarray(tmp_path / "out", "stacked")["chunks"] == [4, 1, 4]
    assert _zarray(tmp_path / "out", "mixed")["chunks"] == [1, 8, 8]
    want = {
        "stacked": np.stack([layers[f"layer_{i}"] for i in range(N)], 1),
        "thick": [thick[i] for i in range(4)],
        "mixed": np.stack([odd["a"], odd["b"]]),
    }
    _restore_all_ways(tmp_path / "out", want)


def test_non_array_leaves_and_values(src, tmp_path):
    lazy = orbax_stream.read_lazy(src)
    out = {
        "kept": {"none": None, "empty": {}, "empty_list": [], "lst": lazy["lst"], "tup": ()},
        "value": np.arange(3, dtype=np.int8),
        "jax_value": jnp.ones((2,), jnp.bfloat16),
        "scalar": 5,
        "slice0d": Slice(lazy["params"]["layer_0"]["quant"], 2, 0, (), np.dtype(np.int8)),
        "nnx": {0: lazy["embed"], 1: lazy["step"]},
    }
    orbax_stream.write(src, out, tmp_path / "out")
    got = ocp.PyTreeCheckpointer().restore(tmp_path / "out")
    assert (
        got["kept"]["none"] is None
        and got["kept"]["empty"] == {}
        and got["kept"]["empty_list"] == []
    )
    assert got["kept"]["tup"] == ()
    assert got["scalar"] == 5 and type(got["scalar"]) is int
    assert got["nnx"]["1"] == 7 and got["nnx"]["0"].dtype == np.float32
    assert got["jax_value"].dtype == jnp.bfloat16
    assert got["slice0d"].shape == () and got["slice0d"] == _layer(0)["quant"][2]
    _assert_same(got["kept"]["lst"], [np.ones(2, np.int8), np.zeros((2, 2), jnp.bfloat16)])
    _assert_same(got["value"], np.arange(3, dtype=np.int8))


def test_checkpoint_manager_reads_output(tmp_path):
    tree = {"params": {f"layer_{i}": {"w": np.full((2, 3), i, np.float32)} for i in range(N)}}
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        mngr.save(5, args=ocp.args.StandardSave(tree))
        mngr.wait_until_finished()
    item = tmp_path / "run" / "5" / "default"
    lazy = orbax_stream.read_lazy(item)
    out_step = tmp_path / "conv" / "5"
    orbax_stream.write(item, _to_scan(lazy, 0), out_step / "default")
    # The step's own files are the caller's business; copy them as they are
    # (_CHECKPOINT_METADATA; commit_success.txt too from Orbax 0.12.4 on).
    for f in (tmp_path / "run" / "5").iterdir():
        if f.is_file():
            shutil.copy(f, out_step / f.name)
    with ocp.CheckpointManager(tmp_path / "conv") as mngr:
        assert mngr.latest_step() == 5
        got = mngr.restore(5, args=ocp.args.StandardRestore())
    np.testing.assert_array_equal(
        got["params"]["blocks"]["w"],
        np.stack([tree["params"][f"layer_{i}"]["w"] for i in range(N)]),
    )


def test_errors(src, tmp_path, monkeypatch):
    lazy = orbax_stream.read_lazy(src)
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        orbax_stream.write(src, lazy, tmp_path / "exists")
    with pytest.raises(FormatError, match="no leaf named 'nope'"):
        orbax_stream.write(src, {"x": Ref("nope", (1,), np.dtype(np.float32))}, tmp_path / "a")
    with pytest.raises(FormatError, match="shape"):
        orbax_stream.write(src, {"x": Ref("embed", (4, 3), np.dtype(np.float32))}, tmp_path / "b")
    with pytest.raises(FormatError, match="_METADATA"):
        orbax_stream.read_lazy(tmp_path / "exists")
    with pytest.raises(FormatError, match="no leaf named"):
        orbax_stream.read_array(src, "params.nope")

    # A failure half-way leaves nothing behind (no output, no temporary).
    async def boom(*args, **kwargs):
        raise FormatError("disk on fire")

    monkeypatch.setattr(_Destination, "decode_job", boom)
    with pytest.raises(FormatError, match="disk on fire"):
        orbax_stream.write(src, {"v": np.ones(2)}, tmp_path / "c")
    assert sorted(os.listdir(tmp_path)) == ["exists"]


def test_stack_lazy_types(src):
    lazy = orbax_stream.read_lazy(src)
    s = stack([lazy["params"][f"layer_{i}"]["attn"]["q"] for i in range(N)], 1)
    assert isinstance(s, Stack) and s.shape == (4, N, 6)


@pytest.mark.parametrize("kind", ["no_ocdbt", "zarr3"])
def test_other_orbax_layouts(tmp_path, kind):
    """Pre-OCDBT items (one directory per array) and zarr3 items read too."""
    handler = (
        ocp.PyTreeCheckpointHandler(use_ocdbt=False)
        if kind == "no_ocdbt"
        else ocp.PyTreeCheckpointHandler(use_zarr3=True)
    )
    tree = {
        "layer_0": {"w": np.ones((2, 3), np.float32), "b": jnp.arange(3, dtype=jnp.bfloat16)},
        "layer_1": {"w": np.zeros((2, 3), np.float32), "b": jnp.arange(3, dtype=jnp.bfloat16) + 1},
        "rows": np.arange(12, dtype=np.int8).reshape(3, 4),
        "step": 3,
    }
    ocp.Checkpointer(handler).save(tmp_path / "src", tree)
    lazy = orbax_stream.read_lazy(tmp_path / "src")
    out = {
        "blocks": {
            "w": stack([lazy["layer_0"]["w"], lazy["layer_1"]["w"]], 0),
            "b": stack([lazy["layer_0"]["b"], lazy["layer_1"]["b"]], 1),
        },
        "rows": unstack(lazy["rows"], 0),
        "step": lazy["step"],
    }
    orbax_stream.write(tmp_path / "src", out, tmp_path / "out")
    want = {
        "blocks": {
            "w": np.stack([tree["layer_0"]["w"], tree["layer_1"]["w"]]),
            "b": np.stack([tree["layer_0"]["b"], tree["layer_1"]["b"]], 1),
        },
        "rows": [tree["rows"][i] for i in range(3)],
        "step": 3,
    }
    _restore_all_ways(tmp_path / "out", want)


def test_crash_leaves_nothing_orbax_accepts(src, tmp_path, monkeypatch):
    """Killed before the final rename: no output, and Orbax refuses the leftover."""
    lazy = orbax_stream.read_lazy(src)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    # As if the process died just before renaming (so no cleanup either).
    monkeypatch.setattr(writer.shutil, "rmtree", lambda *a, **k: None)
    monkeypatch.setattr(writer.os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        orbax_stream.write(src, _to_scan(lazy, 0), tmp_path / "out")
    monkeypatch.undo()
    assert not (tmp_path / "out").exists()
    [left] = os.listdir(tmp_path)
    assert orbax_stream.TMP_DIR_SUFFIX in left
    with pytest.raises(ValueError, match="incomplete"):
        ocp.StandardCheckpointer().restore(tmp_path / left)


def test_named_sharding_gets_layer_axis(tmp_path):
    """A NamedSharding's partition spec gains (loses) the layer axis as None."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    sharding = NamedSharding(mesh, PartitionSpec("data", "model"))
    tree = {
        f"layer_{i}": jax.device_put(jnp.arange(8.0).reshape(4, 2) + i, sharding) for i in range(N)
    }
    _save(tmp_path / "src", tree)
    lazy = orbax_stream.read_lazy(tmp_path / "src")
    orbax_stream.write(
        tmp_path / "src", {"blocks": stack(list(lazy.values()), 1)}, tmp_path / "scan"
    )
    got = ocp.StandardCheckpointer().restore(tmp_path / "scan")["blocks"]
    assert got.sharding.spec == PartitionSpec("data", None, "model")
    np.testing.assert_array_equal(got, np.stack([np.asarray(x) for x in tree.values()], 1))
    scan = orbax_stream.read_lazy(tmp_path / "scan")
    orbax_stream.write(tmp_path / "scan", {"l": unstack(scan["blocks"], 1)}, tmp_path / "loop")
    got = ocp.StandardCheckpointer().restore(tmp_path / "loop")["l"]
    assert got[1].sharding.spec == PartitionSpec("data", "model")
    np.testing.assert_array_equal(got[1], np.asarray(tree["layer_1"]))

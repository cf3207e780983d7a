"""zarr3 Orbax checkpoints (Orbax's ``use_zarr3``, MaxText's): chunk copies, and a zarr3 output.

Every source here is written by Orbax itself with ``use_zarr3=True`` (a few
then have arrays rewritten by TensorStore, for layouts Orbax can write but
not on one CPU device). Every output is restored by plain Orbax (with and
without a target) and read by TensorStore, and compared bit for bit with
``np.stack`` / ``np.take`` of the source's arrays.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from click.testing import CliRunner

import ckptconv
from ckptconv.cli import main
from ckptconv.errors import FormatError
from ckptconv.formats import orbax_stream
from ckptconv.formats.orbax_stream.damage import _crc32c
from ckptconv.formats.orbax_stream.destination import _Destination

N = 4  # layers
H = 16  # hidden


def _layers(seed: int = 0, n: int = N) -> dict:
    rng = np.random.default_rng(seed)
    return {
        f"layer_{i}": {
            "attn": {"q": rng.standard_normal((H, H), dtype=np.float32)},
            # jax.Array leaves: Orbax writes _sharding and array_metadatas.
            "mlp": {"w": jnp.asarray(rng.standard_normal((H, 2 * H)), jnp.float32)},
            "norm": jnp.asarray(rng.standard_normal(H), jnp.bfloat16),
            "q8": rng.integers(-128, 127, (5, H), dtype=np.int8),
        }
        for i in range(n)
    }


def _save(path: Path, tree, save_args=None) -> Path:
    path = path.absolute()
    handler = ocp.PyTreeCheckpointHandler(use_zarr3=True)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(path, args=ocp.args.PyTreeSave(tree, save_args=save_args))
    return path


def _restore(path: Path):
    with ocp.PyTreeCheckpointer() as c:
        return c.restore(path.absolute())


def _kv(item: Path) -> ts.KvStore:
    return ts.KvStore.open({"driver": "ocdbt", "base": f"file://{item}/"}).result()


def _zarr_json(item: Path, name: str) -> dict:
    return json.loads(bytes(_kv(item).read(f"{name}/zarr.json").result().value))


def _flat(tree, prefix=()) -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, (*prefix, str(key))).items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, (*prefix, str(i))).items()}
    return {prefix: tree}


def _bits(x) -> tuple:
    a = np.asarray(x)
    return a.dtype.str, a.shape, a.tobytes()


def _check_output(out: Path, want: dict) -> None:
    """`out` is zarr3, and Orbax (three ways) and TensorStore read exactly `want`."""
    meta = json.loads((out / "_METADATA").read_text())
    assert meta["use_zarr3"] is True and meta["use_ocdbt"] is True
    flat_want = {k: _bits(v) for k, v in _flat(want).items()}
    for got in (
        ocp.StandardCheckpointer().restore(out),
        _restore(out),
        ocp.StandardCheckpointer().restore(
            out, jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), want)
        ),
    ):
        assert {k: _bits(v) for k, v in _flat(got).items()} == flat_want
    kv = _kv(out)
    keys = [k.decode() for k in kv.list().result()]
    assert not any(k.endswith(".zarray") for k in keys)
    for path, bits in flat_want.items():
        name = ".".join(path)
        assert f"{name}/zarr.json" in keys, name
        arr = ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "ocdbt", "base": f"file://{out}/", "path": f"{name}/"}},
            open=True, read=True,
        ).result()
        assert _bits(arr.read().result()) == bits, name


def _scan(layers: dict, axis: int) -> dict:
    ls = [layers[f"layer_{i}"] for i in range(len(layers))]
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs], axis), *ls)


def _unscan(blocks: dict, axis: int, n: int = N) -> dict:
    return {f"layer_{i}": jax.tree.map(lambda x, i=i: np.take(np.asarray(x), i, axis), blocks) for i in range(n)}


@pytest.fixture
def no_decode(monkeypatch):
    """Fails any decode job: the whole conversion must be chunk copies."""

    async def boom(self, src, job, progress):
        raise AssertionError(f"decode path taken for {[leaf.name for leaf in job.leaves]}")

    monkeypatch.setattr(_Destination, "decode_job", boom)


@pytest.fixture
def decoded(monkeypatch):
    """Names of the output leaves written by the decode path."""
    names: list[str] = []
    real = _Destination.decode_job

    async def spy(self, src, job, progress):
        names.extend(leaf.name for leaf in job.leaves)
        return await real(self, src, job, progress)

    monkeypatch.setattr(_Destination, "decode_job", spy)
    return names


def test_orbax_zarr3_layout(tmp_path):
    """What Orbax writes with use_zarr3 (what the chunk copies rely on): one
    sharding_indexed codec whose inner chunk is the whole chunk, keys c/i/j."""
    src = _save(tmp_path / "src", {"w": np.ones((4, 6), np.float32), "s": 3})
    z = _zarr_json(src, "w")
    assert z["chunk_key_encoding"] == {"name": "default"}
    assert z["chunk_grid"]["configuration"]["chunk_shape"] == [4, 6]
    [codec] = z["codecs"]
    assert codec["name"] == "sharding_indexed"
    assert codec["configuration"]["chunk_shape"] == [4, 6]
    assert [c["name"] for c in codec["configuration"]["codecs"]] == ["bytes", "zstd"]
    assert [c["name"] for c in codec["configuration"]["index_codecs"]] == ["bytes", "crc32c"]
    keys = sorted(k.decode() for k in _kv(src).list().result())
    assert keys == ["s/c", "s/zarr.json", "w/c/0/0", "w/zarr.json"]
    shard = bytes(_kv(src).read("w/c/0/0").result().value)
    offset, nbytes = np.frombuffer(shard[-20:-4], "<u8")
    assert offset == 0 and nbytes == len(shard) - 20
    assert _crc32c(shard[-20:-4]) == int.from_bytes(shard[-4:], "little")
    assert _crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def test_read_lazy_without_orbax(tmp_path):
    src = _save(tmp_path / "src", {"params": _layers(), "step": 3, "none": None})
    assert orbax_stream.read_lazy(src) == orbax_stream.read_lazy_with_orbax(src)


@pytest.mark.parametrize("axis", [0, 1])
def test_to_scan_and_back_by_chunk_copy(tmp_path, no_decode, axis):
    layers = _layers()
    embed = np.arange(3 * H, dtype=np.float32).reshape(3, H)
    src = _save(tmp_path / "loop", {"params": {**layers, "embed": embed}, "step": 7})
    totals: list[int] = []
    ckptconv.convert(src, tmp_path / "scan", to="scan", axis=axis, progress=lambda n, t: totals.append((n, t)))
    assert sum(n for n, _ in totals) == totals[-1][1]  # progress sums exactly
    scan = {"params": {"blocks": _scan(layers, axis), "embed": embed}, "step": 7}
    _check_output(tmp_path / "scan", scan)
    # Layer-thick shards, the inner chunk one layer thick too.
    z = _zarr_json(tmp_path / "scan", "params.blocks.mlp.w")
    thick = [H, 2 * H]
    thick.insert(axis, 1)
    assert z["shape"] == list(np.shape(scan["params"]["blocks"]["mlp"]["w"]))
    assert z["chunk_grid"]["configuration"]["chunk_shape"] == thick
    assert z["codecs"][0]["configuration"]["chunk_shape"] == thick
    sharding = json.loads((tmp_path / "scan" / "_sharding").read_text())
    assert sharding and all(json.loads(s) for s in sharding.values())

    ckptconv.convert(tmp_path / "scan", tmp_path / "back", to="loop", axis=axis)
    _check_output(tmp_path / "back", {"params": {**_unscan(scan["params"]["blocks"], axis), "embed": embed}, "step": 7})


def test_train_state_params_and_adam(tmp_path, no_decode):
    params = {**_layers(1), "embed": {"embedding": np.ones((5, H), np.float32)}}
    opt = optax.adam(1e-3).init(params)
    rng = np.random.default_rng(2)
    opt = jax.tree.map(lambda x: np.asarray(x) + rng.standard_normal(np.shape(x)).astype(np.asarray(x).dtype)
                       if np.asarray(x).dtype.kind == "f" else np.asarray(x), opt)
    src = _save(tmp_path / "loop", {"params": params, "opt_state": opt, "step": np.int32(5)})
    raw = _restore(src)  # as Orbax gives the tree back: the reference
    ckptconv.convert(src, tmp_path / "scan", to="scan", axis=1)

    def scanned(sub: dict) -> dict:
        layer_keys = [k for k in sub if k.startswith("layer_")]
        return {"blocks": _scan({k: sub[k] for k in layer_keys}, 1), **{k: v for k, v in sub.items() if k not in layer_keys}}

    mu_nu = raw["opt_state"][0]
    want = {
        "params": scanned(raw["params"]),
        "opt_state": [{"count": mu_nu["count"], "mu": scanned(mu_nu["mu"]), "nu": scanned(mu_nu["nu"])}, raw["opt_state"][1]],
        "step": raw["step"],
    }
    got = _restore(tmp_path / "scan")
    assert {k: _bits(v) for k, v in _flat(got).items()} == {k: _bits(v) for k, v in _flat(want).items()}
    ckptconv.convert(tmp_path / "scan", tmp_path / "back", to="loop", axis=1)
    back = _restore(tmp_path / "back")
    assert {k: _bits(v) for k, v in _flat(back).items()} == {k: _bits(v) for k, v in _flat(raw).items()}
    assert json.loads((tmp_path / "back" / "_METADATA").read_text())["use_zarr3"] is True


def test_cli_to_scan_and_back(tmp_path, no_decode):
    layers = _layers(3)
    src = _save(tmp_path / "loop", {"params": layers})
    r = CliRunner().invoke(main, ["to-scan", str(src), str(tmp_path / "scan")])
    assert r.exit_code == 0, r.output
    _check_output(tmp_path / "scan", {"params": {"blocks": _scan(layers, 0)}})
    r = CliRunner().invoke(main, ["to-loop", str(tmp_path / "scan"), str(tmp_path / "back")])
    assert r.exit_code == 0, r.output
    _check_output(tmp_path / "back", {"params": layers})


def test_differing_layouts_stack_by_decoding(tmp_path, decoded):
    """Parts chunked differently cannot move as they are: that stack (only)
    is decoded, and written as zarr3 with the source's codecs, one layer thick."""
    layers = _layers(4)
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(), {"params": layers})
    # Orbax splits a chunk above chunk_byte_size: layer 2's q gets 4 chunks.
    save_args["params"]["layer_2"]["attn"]["q"] = ocp.SaveArgs(chunk_byte_size=H * H)
    src = _save(tmp_path / "loop", {"params": layers}, save_args)
    assert _zarr_json(src, "params.layer_2.attn.q")["chunk_grid"]["configuration"]["chunk_shape"] != [H, H]
    ckptconv.convert(src, tmp_path / "scan", to="scan", axis=1)
    assert decoded == ["params.blocks.attn.q"]
    _check_output(tmp_path / "scan", {"params": {"blocks": _scan(layers, 1)}})
    z = _zarr_json(tmp_path / "scan", "params.blocks.attn.q")
    src_codec = _zarr_json(src, "params.layer_0.attn.q")["codecs"][0]
    assert z["chunk_grid"]["configuration"]["chunk_shape"] == [H, 1, H]
    assert z["codecs"][0]["name"] == "sharding_indexed"
    assert z["codecs"][0]["configuration"]["chunk_shape"] == [H, 1, H]
    assert z["codecs"][0]["configuration"]["codecs"] == src_codec["configuration"]["codecs"]
    # ... so that its to-loop is a chunk copy again.
    decoded.clear()
    ckptconv.convert(tmp_path / "scan", tmp_path / "back", to="loop", axis=1)
    assert decoded == []
    _check_output(tmp_path / "back", {"params": layers})


@pytest.mark.parametrize("axis", [0, 1])
def test_slices_of_a_one_chunk_stack_decode(tmp_path, decoded, axis):
    """A scan checkpoint saved by Orbax (np.stack, then save: one chunk per
    array) is unstacked by decoding, into zarr3 arrays."""
    blocks = _scan(_layers(5), axis)
    src = _save(tmp_path / "scan", {"params": {"blocks": blocks}, "step": 1})
    ckptconv.convert(src, tmp_path / "loop", to="loop", axis=axis)
    assert sorted(set(name.split(".", 2)[-1] for name in decoded)) == ["attn.q", "mlp.w", "norm", "q8"]
    _check_output(tmp_path / "loop", {"params": _unscan(blocks, axis), "step": 1})
    z = _zarr_json(tmp_path / "loop", "params.layer_3.q8")
    assert z["data_type"] == "int8" and z["codecs"][0]["name"] == "sharding_indexed"


def test_cast_is_decoded_into_zarr3(tmp_path, decoded):
    layers = _layers(6)
    src = _save(tmp_path / "loop", {"params": layers})
    ckptconv.convert(src, tmp_path / "scan", to="scan", dtype="bfloat16")
    assert decoded  # a cast changes every chunk's bytes
    want = jax.tree.map(
        lambda x: x.astype(jnp.bfloat16) if x.dtype.kind == "f" else x, _scan(layers, 0)
    )
    _check_output(tmp_path / "scan", {"params": {"blocks": want}})
    z = _zarr_json(tmp_path / "scan", "params.blocks.attn.q")
    assert z["data_type"] == "bfloat16" and z["chunk_grid"]["configuration"]["chunk_shape"] == [1, H, H]


def _rewrite(item: Path, name: str, metadata: dict) -> None:
    """Rewrites array `name` of an Orbax zarr3 item with other zarr3 metadata
    (same data), through TensorStore."""
    kv = _kv(item)
    data = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "ocdbt", "base": f"file://{item}/", "path": f"{name}/"}},
        open=True, read=True,
    ).result().read().result()
    kv.delete_range(ts.KvStore.KeyRange(f"{name}/", f"{name}0")).result()
    z = {"shape": list(data.shape), "data_type": data.dtype.name, **metadata}
    arr = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "ocdbt", "base": f"file://{item}/", "path": f"{name}/"},
         "metadata": z},
        create=True,
    ).result()
    arr.write(data).result()


LAYOUTS = {
    # Several inner chunks per shard (Orbax writes these for a jax.Array
    # sharded across devices with chunk_byte_size): the index moves too.
    "inner chunks": ({
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [H, H]}},
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [4, 8],
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd"}],
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}}],
    }, False),
    # zarr v2 style chunk keys, several chunks, no sharding.
    "v2 keys": ({
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [8, H]}},
        "chunk_key_encoding": {"name": "v2", "configuration": {"separator": "."}},
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "gzip"}],
    }, False),
    # "." separated default keys, the shard index first.
    "index first": ({
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [4, H]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [4, H], "index_location": "start",
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd"}],
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]}}],
    }, False),
    # An array-to-array codec names axes: decoded.
    "transpose": ({
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [H, H]}},
        "codecs": [{"name": "transpose", "configuration": {"order": [1, 0]}},
                   {"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd"}],
    }, True),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_other_zarr3_layouts(tmp_path, decoded, layout):
    metadata, decodes = LAYOUTS[layout]
    layers = _layers(7)
    src = _save(tmp_path / "loop", {"params": layers})
    for i in range(N):
        _rewrite(src, f"params.layer_{i}.attn.q", metadata)
    assert _restore(src)["params"]["layer_1"]["attn"]["q"].tobytes() == layers["layer_1"]["attn"]["q"].tobytes()
    ckptconv.convert(src, tmp_path / "scan", to="scan", axis=1)
    assert decoded == (["params.blocks.attn.q"] if decodes else [])
    _check_output(tmp_path / "scan", {"params": {"blocks": _scan(layers, 1)}})
    if not decodes:
        z = _zarr_json(tmp_path / "scan", "params.blocks.attn.q")
        assert z["chunk_key_encoding"] == _zarr_json(src, "params.layer_0.attn.q")["chunk_key_encoding"]
        chunks = metadata["chunk_grid"]["configuration"]["chunk_shape"]
        assert z["chunk_grid"]["configuration"]["chunk_shape"] == [chunks[0], 1, chunks[1]]
    decoded.clear()
    ckptconv.convert(tmp_path / "scan", tmp_path / "back", to="loop", axis=1)
    assert decoded == []
    _check_output(tmp_path / "back", {"params": layers})


def _damage_src(tmp_path: Path) -> tuple[Path, str]:
    src = _save(tmp_path / "loop", {"params": _layers(8)})
    return src, "params.layer_2.mlp.w/c/0/0"


def _nothing_written(tmp_path: Path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop"]


@pytest.mark.parametrize("damage", ["truncated", "truncated inside the data", "missing", "metadata lies"])
def test_damaged_chunk(tmp_path, damage):
    src, key = _damage_src(tmp_path)
    kv = _kv(src)
    shard = bytes(kv.read(key).result().value)
    if damage == "truncated":
        kv.write(key, shard[: len(shard) // 2]).result()
        says = "shard index whose checksum (crc32c) does not match: the file is truncated"
    elif damage == "truncated inside the data":
        # Index intact (and its checksum), data cut short before it.
        kv.write(key, shard[:100] + shard[-20:]).result()
        says = f"has a shard index naming bytes 0..{len(shard) - 20} of a 120-byte file, outside its data"
    elif damage == "missing":
        kv.delete_range(ts.KvStore.KeyRange(key, key + "\x00")).result()
        says = "is missing, so Orbax cannot read this array either"
    else:
        for i in range(N):  # every layer's, so that the layers still agree
            name = f"params.layer_{i}.mlp.w"
            z = _zarr_json(src, name)
            z["shape"] = [H, H]
            z["chunk_grid"]["configuration"]["chunk_shape"] = [H, H]
            z["codecs"][0]["configuration"]["chunk_shape"] = [H, H]
            kv.write(f"{name}/zarr.json", json.dumps(z)).result()
        key = "params.layer_*.mlp.w/c/0/0"  # reads run concurrently: any layer's is seen first
        says = f"holds {H * 2 * H * 4} bytes, but its zarr.json (shape, chunks, data_type) says {H * H * 4}"
    with pytest.raises(FormatError) as e:
        ckptconv.convert(src, tmp_path / "scan", to="scan")
    msg = str(e.value)
    start = re.escape(f"{src}: chunk {key} of leaf 'params.blocks.mlp.w' ").replace(r"\*", r"\d")
    assert re.match(start, msg) and says in msg, msg
    _nothing_written(tmp_path)
    r = CliRunner().invoke(main, ["to-scan", str(src), str(tmp_path / "scan")])
    assert r.exit_code == 2 and re.match(f"Error: {start}", r.output), r.output
    assert "Traceback" not in r.output
    _nothing_written(tmp_path)


def test_without_ocdbt(tmp_path, no_decode):
    """Pre-OCDBT zarr3 (a file per chunk) converts by chunk copy too; a
    truncated chunk file is refused."""
    src = tmp_path / "loop"
    layers = _layers(9)
    handler = ocp.PyTreeCheckpointHandler(use_zarr3=True, use_ocdbt=False)
    with ocp.Checkpointer(handler) as c:
        c.save(src.absolute(), args=ocp.args.PyTreeSave({"params": layers}))
    ckptconv.convert(src, tmp_path / "scan", to="scan", axis=1)
    _check_output(tmp_path / "scan", {"params": {"blocks": _scan(layers, 1)}})
    shutil.rmtree(tmp_path / "scan")
    chunk = src / "params.layer_1.norm" / "c" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-3])
    with pytest.raises(FormatError) as e:
        ckptconv.convert(src, tmp_path / "scan", to="scan")
    assert str(e.value) == (
        f"{src.absolute()}: chunk params.layer_1.norm/c/0 of leaf 'params.blocks.norm' has a shard index "
        "whose checksum (crc32c) does not match: the file is truncated or overwritten. Copy the checkpoint again."
    )
    _nothing_written(tmp_path)


def test_maxtext_fixture(tmp_path, no_decode):
    """MaxText 0.2.5's own zarr3 checkpoint (params only: nnx_aux stacks on axis 0)."""
    fixture = Path(__file__).parent.parent / "fixtures" / "maxtext" / "llama2_loop" / "0" / "items"
    if not fixture.is_dir():
        pytest.skip("no MaxText fixture")
    ckptconv.convert(fixture, tmp_path / "scan", to="scan", axis=1, pattern="layers_{i}", into="layers", only="params")
    raw = _restore(fixture)["params"]["params"]["decoder"]
    got = _restore(tmp_path / "scan")["params"]["params"]["decoder"]
    want = _scan({f"layer_{i}": raw[f"layers_{i}"] for i in range(4)}, 1)
    assert {k: _bits(v) for k, v in _flat(got["layers"]).items()} == {k: _bits(v) for k, v in _flat(want).items()}
    assert json.loads((tmp_path / "scan" / "_METADATA").read_text())["use_zarr3"] is True


def test_scalars_stack_on_axis_0(tmp_path, no_decode):
    """0-d arrays (key "c", a shard of one element) stack into (N,) by chunk copy."""
    rng = np.random.default_rng(10)
    layers = {f"layer_{i}": {"count": np.uint32(i), "key": rng.integers(0, 2**31, 4).astype(np.uint32),
                             "scale": np.float32(i / 2)} for i in range(N)}
    src = _save(tmp_path / "loop", {"rngs": layers, "step": 2})
    assert sorted(k.decode() for k in _kv(src).list().result() if k.startswith(b"rngs.layer_0.count/")) == [
        "rngs.layer_0.count/c", "rngs.layer_0.count/zarr.json"]
    ckptconv.convert(src, tmp_path / "scan", to="scan")
    _check_output(tmp_path / "scan", {"rngs": {"blocks": _scan(layers, 0)}, "step": 2})
    keys = sorted(k.decode() for k in _kv(tmp_path / "scan").list().result() if k.startswith(b"rngs.blocks.count/"))
    assert keys == [f"rngs.blocks.count/c/{i}" for i in range(N)] + ["rngs.blocks.count/zarr.json"]
    ckptconv.convert(tmp_path / "scan", tmp_path / "back", to="loop")
    _check_output(tmp_path / "back", {"rngs": layers, "step": 2})


def test_values_in_the_tree_are_zarr3(tmp_path):
    """Plain arrays beside lazy leaves (`orbax_stream.write`) get Orbax's zarr3 codecs."""
    src = _save(tmp_path / "src", {"w": np.ones((2, 3), np.float32)})
    lazy = orbax_stream.read_lazy(src)
    value = np.arange(6, dtype=np.int8).reshape(3, 2)
    orbax_stream.write(src, {"w": lazy["w"], "v": value, "x": 1.5}, tmp_path / "out")
    _check_output(tmp_path / "out", {"w": np.ones((2, 3), np.float32), "v": value, "x": 1.5})
    z = _zarr_json(tmp_path / "out", "v")
    [codec] = z["codecs"]
    assert codec["name"] == "sharding_indexed" and codec["configuration"]["chunk_shape"] == [3, 2]
    assert [c["name"] for c in codec["configuration"]["codecs"]] == ["bytes", "zstd"]

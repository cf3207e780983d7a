"""Train state -> serving: `--only`, `--root`, `--dtype` and `extract`, through
the library and the command line, for Orbax, msgpack and safetensors."""

from __future__ import annotations

import json

import flax.serialization
import jax
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import digest
from safetensors.numpy import load_file

import ckptconv
from ckptconv import lazy
from ckptconv.formats import byteplan

BF16 = np.dtype(ml_dtypes.bfloat16)
LAYERS, EMB, MLP = 3, 16, 32


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    layers = {
        f"layers_{i}": {
            "mlp": {"wi": {"kernel": w(EMB, MLP)}, "wo": {"kernel": w(MLP, EMB)}},
            "norm": {"scale": w(EMB)},
            "count": np.arange(4, dtype=np.int32) + i,
        }
        for i in range(LAYERS)
    }
    return {
        "params": {
            "decoder": {**layers, "decoder_norm": {"scale": w(EMB)}},
            "token_embedder": {"embedding": w(40, EMB)},
        }
    }


def _state(seed: int = 0) -> dict:
    """A MaxText-shaped train state: params, Adam moments (non-zero), step,
    an RNG key (uint32) and a boolean flag."""
    params = _params(seed)
    opt = optax.adam(1e-3).init(params)
    rng = np.random.default_rng(seed + 1)
    opt = jax.tree_util.tree_map(
        lambda x: np.asarray(x) + rng.standard_normal(np.shape(x)).astype(np.float32)
        if np.asarray(x).dtype == np.float32 else np.asarray(x),
        opt,
    )
    return {
        "params": params,
        "opt_state": opt,
        "step": np.int32(7),
        "rng": np.asarray(jax.random.key_data(jax.random.key(3))),
        "flags": {"done": np.asarray([True, False])},
    }


@pytest.fixture
def train_state(tmp_path):
    """A CheckpointManager root holding step 7 of `_state` as item 'items'."""
    root = tmp_path / "state"
    mgr = ocp.CheckpointManager(root, item_names=("items",))
    mgr.save(
        7, args=ocp.args.Composite(items=ocp.args.StandardSave(_state())),
        metrics=None,
    )
    mgr.wait_until_finished()
    mgr.close()
    return root


def _restore(path):
    out = ckptconv.load(path)
    return out["items"] if isinstance(out, dict) and set(out) == {"items"} else out


def _key(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return f"[{getattr(k, attr)!r}]"
    raise AssertionError(k)


def _leaves(tree):
    """``"['a'][0]['b']" -> array`` (a NamedTuple's fields read like dict keys,
    as Orbax restores them)."""
    return {
        "".join(_key(k) for k in p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def test_extract_params_bfloat16_is_numpys_cast_bit_for_bit(train_state, tmp_path, cli):
    before = digest(train_state)
    out = tmp_path / "serve"
    r = cli("extract", train_state, out, "--only", "params", "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    src = {"params": _params()}
    n = len(_leaves(src))
    floats = [v for v in _leaves(src).values() if v.dtype == np.float32]
    before_bytes = sum(v.nbytes for v in floats)
    assert r.output.splitlines()[:2] == [
        "kept only params",
        f"cast {len(floats)} floating leaves to bfloat16: "
        f"{before_bytes / 1024:.1f} KB -> {before_bytes / 2048:.1f} KB (saved {before_bytes / 2048:.1f} KB)",
    ]
    # Layout unchanged: a manager root with step 7 and its item 'items'.
    assert sorted(p.name for p in out.iterdir()) == ["7"]
    assert (out / "7" / "items").is_dir()
    got = _restore(out)
    assert list(got) == ["params"]
    got_leaves = _leaves(got)
    assert len(got_leaves) == n
    for key, want in _leaves(src).items():
        have = got_leaves[key]
        if want.dtype == np.float32:
            assert have.dtype == BF16, key
            np.testing.assert_array_equal(_bits(have), _bits(want.astype(BF16)), err_msg=key)
        else:  # integer leaves are untouched
            assert have.dtype == want.dtype, key
            np.testing.assert_array_equal(have, want, err_msg=key)
    assert digest(train_state) == before


def test_dtype_leaves_integers_bools_and_rng_keys_alone(train_state, tmp_path):
    out = tmp_path / "half"
    res = ckptconv.extract(train_state, out, dtype="float16")
    got, want = _leaves(_restore(out)), _leaves(_state())
    assert set(got) == set(want)
    for key, w in want.items():
        if w.dtype == np.float32:
            assert got[key].dtype == np.float16, key
            np.testing.assert_array_equal(_bits(got[key]), _bits(w.astype(np.float16)), err_msg=key)
        else:
            assert got[key].dtype == w.dtype, key
            np.testing.assert_array_equal(got[key], w, err_msg=key)
    assert got["['rng']"].dtype == np.uint32
    assert got["['flags']['done']"].dtype == np.bool_
    floats = [w for w in want.values() if w.dtype == np.float32]
    assert res.cast.leaves == len(floats)
    assert res.cast.saved == sum(w.nbytes for w in floats) // 2


def test_only_several_paths_and_list_elements_keep_their_paths(train_state, tmp_path):
    out = tmp_path / "some"
    ckptconv.extract(train_state, out, only=["step", "opt_state/0/mu/params/decoder/layers_1"])
    got = _restore(out)
    want = _state()
    assert sorted(got) == ["opt_state", "step"]
    assert int(got["step"]) == 7
    # opt_state is a tuple (ScaleByAdamState, EmptyState): element 0 is kept
    # at its index, the others become None.
    assert len(want["opt_state"]) == 2
    assert len(got["opt_state"]) == 2 and got["opt_state"][1] is None
    mu = got["opt_state"][0]["mu"]["params"]["decoder"]
    assert list(mu) == ["layers_1"]
    np.testing.assert_array_equal(
        mu["layers_1"]["mlp"]["wi"]["kernel"],
        want["opt_state"][0].mu["params"]["decoder"]["layers_1"]["mlp"]["wi"]["kernel"],
    )


def test_to_scan_and_to_loop_with_only_and_dtype(train_state, tmp_path, cli):
    scan = tmp_path / "scan"
    r = cli("to-scan", train_state, scan, "--only", "params", "--axis", "1",
            "--pattern", "layers_{i}", "--into", "layers", "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    assert "[items] params/params/decoder/layers_{i}: 3 layers -> params/params/decoder/layers" in r.output
    got = _restore(scan)
    assert list(got) == ["params"]
    layers = _params()["params"]["decoder"]
    stacked = got["params"]["params"]["decoder"]["layers"]
    want = np.stack([layers[f"layers_{i}"]["mlp"]["wi"]["kernel"] for i in range(LAYERS)], axis=1)
    np.testing.assert_array_equal(_bits(stacked["mlp"]["wi"]["kernel"]), _bits(want.astype(BF16)))
    np.testing.assert_array_equal(
        stacked["count"], np.stack([layers[f"layers_{i}"]["count"] for i in range(LAYERS)], axis=1)
    )
    # And back, keeping the params only, cast to float32 (exact from bfloat16).
    loop = tmp_path / "loop"
    r = cli("to-loop", scan, loop, "--from", "layers", "--pattern", "layers_{i}", "--axis", "1",
            "--only", "params/params/decoder", "--dtype", "float32")
    assert r.exit_code == 0, r.output
    back = _restore(loop)
    assert list(back["params"]["params"]) == ["decoder"]
    for i in range(LAYERS):
        k = back["params"]["params"]["decoder"][f"layers_{i}"]["mlp"]["wi"]["kernel"]
        assert k.dtype == np.float32
        np.testing.assert_array_equal(k, layers[f"layers_{i}"]["mlp"]["wi"]["kernel"].astype(BF16).astype(np.float32))


def test_cast_of_layer_thick_chunks_keeps_the_chunking_and_reads_slab_by_slab(train_state, tmp_path, monkeypatch):
    """ckptconv's stacks have one-layer-thick chunks: a cast decodes one at a time."""
    from ckptconv.formats.orbax_stream.destination import _Destination

    scan = tmp_path / "scan"
    ckptconv.convert(train_state, scan, to="scan", only="params", pattern="layers_{i}", into="layers")
    reads = []
    real = _Destination._read

    async def spy(self, src, arr, name, index, **kw):
        data = await real(self, src, arr, name, index, **kw)
        reads.append((name, data.shape))
        return data

    monkeypatch.setattr(_Destination, "_read", spy)
    out = tmp_path / "bf16"
    ckptconv.extract(scan, out, dtype="bfloat16")
    name = "params.params.decoder.layers.mlp.wi.kernel"
    assert [s for n, s in reads if n == name] == [(1, EMB, MLP)] * LAYERS
    zarray = json.loads(
        _kv_read(out / "7" / "items", f"{name}/.zarray")
    )
    assert zarray["chunks"] == [1, EMB, MLP] and zarray["dtype"] == "bfloat16"


def _kv_read(item, key):
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{item}"}).result()
    return bytes(kv.read(key).result().value)


def test_root_params_as_msgpack_is_exactly_the_params_tree(train_state, tmp_path, cli):
    out = tmp_path / "flax_model.msgpack"
    r = cli("extract", train_state, out, "--root", "params", "--format", "msgpack")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == "root params"
    got = flax.serialization.msgpack_restore(out.read_bytes())
    want = _params()
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for key, w in _leaves(want).items():
        np.testing.assert_array_equal(_leaves(got)[key], w)
        assert _leaves(got)[key].dtype == w.dtype


def test_root_and_dtype_into_safetensors(train_state, tmp_path):
    out = tmp_path / "model.safetensors"
    ckptconv.extract(train_state, out, root="params/params", format="safetensors", dtype="bfloat16")
    got = load_file(out)
    want = _params()["params"]
    assert sorted(got) == sorted(
        ".".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(want)
    )
    w = want["decoder"]["layers_2"]["mlp"]["wo"]["kernel"]
    np.testing.assert_array_equal(
        _bits(got["decoder.layers_2.mlp.wo.kernel"]), _bits(w.astype(BF16))
    )


def test_msgpack_input_cast_streams_block_by_block(tmp_path, monkeypatch):
    """msgpack -> msgpack and -> safetensors, with tiny blocks so that every
    leaf is cast in several pieces, some of them split mid-row."""
    from ckptconv.formats.msgpack_stream import writer

    monkeypatch.setattr(writer, "_BLOCK", 48)
    monkeypatch.setattr(writer, "_SEG_MIN", 16)
    src = tmp_path / "in.msgpack"
    params = _params(1)
    src.write_bytes(flax.serialization.msgpack_serialize(params))
    out = tmp_path / "out.msgpack"
    ckptconv.convert(src, out, to="scan", pattern="layers_{i}", into="layers", axis=1, dtype="float16")
    got = flax.serialization.msgpack_restore(out.read_bytes())
    layers = params["params"]["decoder"]
    want = np.stack([layers[f"layers_{i}"]["norm"]["scale"] for i in range(LAYERS)], axis=1)
    np.testing.assert_array_equal(
        got["params"]["decoder"]["layers"]["norm"]["scale"], want.astype(np.float16)
    )
    np.testing.assert_array_equal(
        got["params"]["token_embedder"]["embedding"],
        params["params"]["token_embedder"]["embedding"].astype(np.float16),
    )
    assert got["params"]["decoder"]["layers"]["count"].dtype == np.int32


@pytest.mark.parametrize("block", [2, 4, 6, 10, 4096])
def test_cast_gather_equals_astype_for_any_piece_boundaries(block):
    rng = np.random.default_rng(block)
    a = rng.standard_normal((5, 7)).astype(np.float32)
    buf = a.reshape(-1).view(np.uint8)
    # Pieces of the input cut at odd byte offsets (a strand of several spans).
    spans = ((0, 13), (13, 50), (63, a.nbytes - 63))
    gather = byteplan.Gather(1, a.nbytes, [byteplan.Strand(buf, spans, 0, 0, block=7)])
    cast = byteplan.CastGather(gather, np.float32, BF16, block=block)
    assert cast.nbytes == a.size * 2
    pieces = [bytes(p) for p in cast.pieces()]
    assert max(len(p) for p in pieces) <= max(2, block // 4 * 2)
    got = np.frombuffer(b"".join(pieces), dtype=BF16).reshape(a.shape)
    np.testing.assert_array_equal(_bits(got), _bits(a.astype(BF16)))
    # A range on element boundaries (msgpack's chunked arrays).
    part = np.frombuffer(b"".join(bytes(p) for p in cast.pieces(6, 40)), dtype=BF16)
    np.testing.assert_array_equal(_bits(part), _bits(a.reshape(-1)[3:20].astype(BF16)))


def test_lazy_cast_materializes_like_astype():
    ref = lazy.Ref("x", (2, 3), np.dtype(np.float32))
    data = np.arange(6, dtype=np.float32).reshape(2, 3) / 3
    got = lazy.materialize({"a": lazy.Cast(ref, BF16)}, lambda r: data)
    np.testing.assert_array_equal(_bits(got["a"]), _bits(data.astype(BF16)))
    assert lazy.Cast(ref, BF16).nbytes == 12


# ----------------------------------------------------------------- errors


def _assert_refused(r, tmp_path, message: str, written: str = "out"):
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert lines == [message], lines
    assert not (tmp_path / written).exists()
    assert not [p for p in tmp_path.iterdir() if "ckptconv-tmp" in p.name]


def test_missing_only_path_names_the_keys_there(train_state, tmp_path, cli):
    r = cli("extract", train_state, tmp_path / "out", "--only", "parms")
    _assert_refused(
        r, tmp_path,
        f"Error: {train_state}: --only parms: no 'parms' at the top of the tree; the keys "
        "there are flags, opt_state, params, rng, step. Nothing was written.",
    )
    r = cli("to-scan", train_state, tmp_path / "out", "--only", "params/params/encoder")
    _assert_refused(
        r, tmp_path,
        f"Error: {train_state}: --only params/params/encoder: no 'encoder' under "
        "'params/params'; the keys there are decoder, token_embedder. Nothing was written.",
    )


def test_missing_root_and_root_on_a_leaf(train_state, tmp_path, cli):
    r = cli("extract", train_state, tmp_path / "out", "--root", "step")
    _assert_refused(
        r, tmp_path,
        f"Error: {train_state}: --root step is a single leaf (int32 ()), but a checkpoint's "
        "root must be a subtree: give the subtree that holds it, or keep it with --only. "
        "Nothing was written.",
    )
    r = cli("extract", train_state, tmp_path / "out", "--root", "params/decoder")
    _assert_refused(
        r, tmp_path,
        f"Error: {train_state}: --root params/decoder: no 'decoder' under 'params'; the "
        "keys there are params. Nothing was written.",
    )


@pytest.mark.parametrize("dtype", ["int8", "float64", "bool", "fp16"])
def test_dtype_that_is_not_a_cast_target(train_state, tmp_path, cli, dtype):
    r = cli("extract", train_state, tmp_path / "out", "--dtype", dtype)
    _assert_refused(
        r, tmp_path,
        f"Error: --dtype {dtype}: not a floating dtype ckptconv casts to; --dtype casts "
        "floating leaves to float32, bfloat16, float16 (integer, boolean and PRNG-key "
        "leaves stay as they are).",
    )


def test_errors_on_msgpack_input_too(tmp_path, cli):
    src = tmp_path / "in.msgpack"
    src.write_bytes(flax.serialization.msgpack_serialize(_params()))
    r = cli("extract", src, tmp_path / "out", "--root", "params/token_embedder/embedding")
    _assert_refused(
        r, tmp_path,
        f"Error: {src}: --root params/token_embedder/embedding is a single leaf (float32 "
        "(40, 16)), but a checkpoint's root must be a subtree: give the subtree that holds "
        "it, or keep it with --only. Nothing was written.",
    )
    r = cli("extract", src, tmp_path / "out", "--only", "params/decoder/layers_9")
    _assert_refused(
        r, tmp_path,
        f"Error: {src}: --only params/decoder/layers_9: no 'layers_9' under "
        "'params/decoder'; the keys there are decoder_norm, layers_0, layers_1, layers_2. "
        "Nothing was written.",
    )


def test_extract_without_options_copies_and_converts_format(train_state, tmp_path):
    out = tmp_path / "copy"
    res = ckptconv.extract(train_state, out)
    assert res.cast is None and res.groups == []
    got, want = _leaves(_restore(out)), _leaves(_state())
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


# ----------------------------------------------------------------- records


def _checkpoint_metadata(root, step=7) -> dict:
    return json.loads((root / str(step) / "_CHECKPOINT_METADATA").read_text())


def test_outputs_record_the_conversion_and_keep_scan_layers_true(tmp_path, cli):
    """MaxText keeps ``scan_layers`` in the step's custom metadata: the output's
    must say the form it is in; other custom metadata is carried over."""
    loop = tmp_path / "loop"
    mgr = ocp.CheckpointManager(loop, item_names=("items",))
    mgr.save(7, args=ocp.args.Composite(items=ocp.args.StandardSave(_state())),
             custom_metadata={"scan_layers": False, "run": "tiny"})
    mgr.wait_until_finished()
    mgr.close()
    scan = tmp_path / "scan"
    r = cli("to-scan", loop, scan, "--only", "params", "--axis", "1", "--pattern", "layers_{i}",
            "--into", "layers", "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    custom = _checkpoint_metadata(scan)["custom_metadata"]
    assert custom["scan_layers"] is True and custom["run"] == "tiny"
    rec = custom["ckptconv"]
    assert {k: rec[k] for k in ("command", "source", "axis", "only", "dtype", "cast_leaves")} == {
        "command": "to-scan", "source": "loop", "axis": 1, "only": ["params"],
        "dtype": "bfloat16", "cast_leaves": 5,  # output leaves: 3 stacks, 2 others
    }
    (group,) = rec["groups"]
    assert group["keys"] == ["layers_0", "layers_1", "layers_2"]
    assert group["into"] == "layers" and group["path"] == "params/params/decoder"
    assert group["template"] == "layers_{i}" and group["num_layers"] == 3
    # The item's own metadata carries the record too, and Orbax reads it.
    item_meta = json.loads((scan / "7" / "items" / "_METADATA").read_text())
    assert item_meta["custom_metadata"]["ckptconv"] == rec
    with ocp.CheckpointManager(scan.absolute(), item_names=("items",)) as m:
        assert m.metadata(7).custom_metadata["scan_layers"] is True
    # Orbax's commit marker names OUT, not a temporary folder.
    assert (scan / "7" / "items" / "commit_success.txt").read_text() == (
        f"Checkpoint commit was successful to {(scan / '7' / 'items').absolute()}"
    )
    back = tmp_path / "back"
    r = cli("to-loop", scan, back, "--from", "layers", "--pattern", "layers_{i}", "--axis", "1")
    assert r.exit_code == 0, r.output
    custom = _checkpoint_metadata(back)["custom_metadata"]
    assert custom["scan_layers"] is False and custom["run"] == "tiny"
    assert custom["ckptconv"]["command"] == "to-loop"
    assert "only" not in custom["ckptconv"]
    # The input's metadata is untouched.
    assert _checkpoint_metadata(loop)["custom_metadata"] == {"scan_layers": False, "run": "tiny"}


# ----------------------------------------------------------------- paths


def test_relative_dotdot_symlinked_and_trailing_slash_paths(tmp_path, monkeypatch, cli):
    """`ckptconv to-scan ../ckpt out` used to fail inside TensorStore, and an
    OUT with '..' gave a traceback."""
    import shutil
    from pathlib import Path

    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    shutil.copytree(Path(__file__).parents[1] / "fixtures" / "seed1_loop", tmp_path / "loop")
    (tmp_path / "link").symlink_to("loop")
    monkeypatch.chdir(work)
    want = _leaves(ckptconv.load(tmp_path / "loop"))
    for src, dst in [("../../loop", "../../o1"), ("../../loop/", "../../o2/"),
                     ("../../link", "./../../o3"), ("../../link/", "../b/../../o4")]:
        r = cli("to-scan", src, dst)
        assert r.exit_code == 0, (src, dst, r.output)
        out = (work / dst).resolve()
        assert out.parent == tmp_path and (out / "_METADATA").is_file(), out
        back = tmp_path / f"back_{out.name}"
        r = cli("to-loop", dst, f"../../{back.name}")
        assert r.exit_code == 0, r.output
        assert _leaves(ckptconv.load(back)).keys() == want.keys()
        for k, v in _leaves(ckptconv.load(back)).items():
            np.testing.assert_array_equal(v, want[k])
    assert (tmp_path / "link").is_symlink()
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_unexpected_exceptions_are_one_line_without_debug(tmp_path, monkeypatch, cli):
    from ckptconv.formats import orbax_stream

    def broken(*a, **k):
        raise ValueError("something TensorStore said")

    monkeypatch.setattr(orbax_stream, "write", broken)
    src = tmp_path / "state"
    with ocp.StandardCheckpointer() as c:
        c.save(src, _params())
    r = cli("to-scan", src, tmp_path / "out")
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        "Error: unexpected ValueError: something TensorStore said. Nothing was written and "
        "the input is unchanged. This is a bug in ckptconv: rerun with --debug for the "
        "traceback, and report it."
    ]
    assert not (tmp_path / "out").exists()
    r = cli("--debug", "to-scan", src, tmp_path / "out")
    assert isinstance(r.exception, ValueError)

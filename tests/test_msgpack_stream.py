"""Tests of the streaming msgpack reader and writer against flax's own serializer."""

from __future__ import annotations

import os

import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
from flax import serialization as fs

from ckptconv import lazy
from ckptconv.errors import FormatError
from ckptconv.formats import msgpack_stream as ms
from ckptconv.formats.msgpack_stream import encoder, writer

BF16 = jnp.bfloat16


def assert_same(got, want, where="<root>"):
    """Exact equality: types, key order, dtypes, shapes and bits."""
    assert type(got) is type(want), f"{where}: {type(got)} != {type(want)}"
    if isinstance(want, dict):
        assert list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_same(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}/{i}")
    elif isinstance(want, (np.ndarray, np.generic)):
        assert got.dtype == want.dtype, f"{where}: {got.dtype} != {want.dtype}"
        assert np.shape(got) == np.shape(want), where
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), where
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def rich_tree():
    rng = np.random.default_rng(0)
    return {
        "params": {
            "Dense_0": {
                "kernel": rng.standard_normal((3, 5)).astype(np.float32),
                "bias": rng.standard_normal(5).astype(BF16),
            },
            "int8": rng.integers(-128, 127, (2, 7), dtype=np.int8),
            "zero_d": np.array(1.25, np.float32),
            "empty": np.zeros((0, 3), np.float16),
            "bool": np.array([True, False]),
            "f8": np.arange(4).astype(jnp.float8_e4m3fn),
        },
        "step": np.int64(7),
        "lr": np.float32(0.5),
        "bf_scalar": np.array(2.5, BF16)[()],
        "none": None,
        "empty": {},
        "list": [1, [np.arange(3), None, []], {"b": np.ones(2, np.float64), "a": 2}],
        "py": {"int": 3, "big": 2**64 - 1, "neg": -(2**63), "float": 0.1, "bool": True},
        "text": "héllo",
        "raw": b"\x00\x01",
        "complex": 1 + 2j,
    }


def save_flax(path, tree, **kw):
    path.write_bytes(fs.msgpack_serialize(tree, **kw))
    return str(path)


def restore(path):
    with open(path, "rb") as f:
        return fs.msgpack_restore(f.read())


@pytest.fixture
def small_chunks(monkeypatch):
    """Makes flax chunk every array over 40 bytes (its threshold is 1 GiB)."""
    monkeypatch.setattr(fs, "MAX_CHUNK_SIZE", 40)


# ------------------------------------------------------------------------- reading


def test_load_equals_msgpack_restore(tmp_path):
    src = save_flax(tmp_path / "a", rich_tree())
    assert_same(ms.load(src), restore(src))
    assert_same(ms.load(src, copy=False), restore(src))


def test_load_keeps_file_key_order(tmp_path):
    tree = {"z": {"b": np.ones(2), "a": 1}, "a": None}
    src = save_flax(tmp_path / "a", tree, in_place=True)  # as to_bytes: no sorting
    assert list(ms.load(src)) == ["z", "a"]
    assert_same(ms.load(src), restore(src))


def test_to_bytes_state_dict(tmp_path):
    # to_bytes turns lists into {"0": .., "1": ..} maps, in insertion order ("10" before "2").
    state = {"opt": [np.full(2, i, np.float32) for i in range(12)], "count": np.int32(4)}
    path = tmp_path / "checkpoint_4"
    path.write_bytes(fs.to_bytes(state))
    got = ms.load(path)
    assert list(got["opt"]) == [str(i) for i in range(12)]
    assert_same(got, restore(path))
    ms.write(path, ms.read_lazy(path), tmp_path / "same", sort_keys=False)
    assert (tmp_path / "same").read_bytes() == path.read_bytes()


def test_read_lazy_refs_point_at_array_bytes(tmp_path):
    tree = rich_tree()
    src = save_flax(tmp_path / "a", tree)
    data = open(src, "rb").read()
    got = ms.read_lazy(src)
    ref = got["params"]["Dense_0"]["bias"]
    assert isinstance(ref, lazy.Ref)
    assert (ref.shape, ref.dtype) == ((5,), np.dtype(BF16))
    off, n = ref.source
    assert data[off : off + n] == tree["params"]["Dense_0"]["bias"].tobytes()
    assert got["params"]["zero_d"].shape == ()
    assert isinstance(got["list"][1][0], lazy.Ref)
    assert_same(got["step"], np.int64(7))
    assert_same(got["bf_scalar"], tree["bf_scalar"])
    assert got["none"] is None and got["empty"] == {} and got["complex"] == 1 + 2j


def test_read_array_is_zero_copy_unless_asked(tmp_path):
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    src = save_flax(tmp_path / "a", tree)
    ref = ms.read_lazy(src)["w"]
    view = ms.read_array(src, ref)
    assert not view.flags.owndata and not view.flags.writeable
    assert_same(view, tree["w"])
    copy = ms.read_array(src, ref, copy=True)
    assert copy.flags.writeable
    assert_same(copy, tree["w"])


def test_chunked_arrays_read_as_one_ref(tmp_path, small_chunks):
    big = np.arange(25, dtype=np.float32).reshape(5, 5)  # 100 bytes: 3 chunks of <= 10 items
    tree = {"a": {"big": big, "small": np.ones(3, np.float32)}, "l": [big]}
    src = save_flax(tmp_path / "a", tree)
    got = ms.read_lazy(src)
    ref = got["a"]["big"]
    assert ref.shape == (5, 5) and len(ref.source) == 3
    assert [n for _, n in ref.source] == [40, 40, 20]
    assert ms.spans(ref) == ref.source
    assert (
        isinstance(got["l"][0], lazy.Ref) and len(ms.spans(got["l"][0])) == 1
    )  # lists: never chunked
    assert_same(ms.load(src), restore(src))
    assert_same(ms.read_array(src, ref), big)


def test_chunked_root_array(tmp_path, small_chunks):
    arr = np.arange(30, dtype=np.int16)
    src = save_flax(tmp_path / "a", arr)
    assert_same(ms.load(src), restore(src))
    assert_same(ms.load(src), arr)


# ------------------------------------------------------------------------- errors


def test_every_truncation_is_a_format_error(tmp_path):
    src = save_flax(tmp_path / "ckpt", rich_tree())
    data = open(src, "rb").read()
    cut = tmp_path / "checkpoint_3"
    for n in range(len(data)):
        cut.write_bytes(data[:n])
        with pytest.raises(FormatError) as e:
            ms.read_lazy(cut)
        assert str(cut) in str(e.value) and "not a complete msgpack checkpoint" in str(e.value)
        assert not ms.is_msgpack(cut)
    assert ms.is_msgpack(src)


@pytest.mark.parametrize(
    "mutate, says",
    [
        (lambda d: d + b"\x00", "follow the end"),
        (lambda d: b"\xc1" + d[1:], "starts no msgpack value"),
        (lambda d: d.replace(b"float32", b"floatXY"), "unknown dtype"),
        (lambda d: d.replace(b"float32", b"float64"), "bytes of data"),
    ],
)
def test_corrupt_files(tmp_path, mutate, says):
    data = fs.msgpack_serialize({"k": {"w": np.ones((2, 2), np.float32)}})
    path = tmp_path / "bad"
    path.write_bytes(mutate(data))
    with pytest.raises(FormatError, match=says) as e:
        ms.load(path)
    assert str(path) in str(e.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FormatError, match="cannot read"):
        ms.read_lazy(tmp_path / "nope")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(FormatError, match="empty"):
        ms.read_lazy(tmp_path / "empty")


# ------------------------------------------------------------------------- writing


def test_headers_match_msgpack():
    packer = msgpack.Packer()
    for n in (0, 1, 2, 3, 4, 8, 15, 16, 17, 31, 255, 256, 65535, 65536):
        assert encoder._ext_header(1, n) + b"x" * n == msgpack.packb(msgpack.ExtType(1, b"x" * n))
        assert encoder._bin_header(n) + b"x" * n == msgpack.packb(b"x" * n)
    for n in (0, 15, 16, 65535, 65536, 2**32 - 1):
        assert encoder._map_header(n) == packer.pack_map_header(n)
        assert encoder._array_header(n) == packer.pack_array_header(n)


def test_copy_is_byte_identical(tmp_path):
    src = save_flax(tmp_path / "a", rich_tree())
    dst = tmp_path / "b"
    ms.write(src, ms.read_lazy(src), dst)
    assert dst.read_bytes() == open(src, "rb").read()
    assert dst.read_bytes() == fs.msgpack_serialize(restore(src))


def test_sort_keys_false_keeps_tree_order(tmp_path):
    tree = {"z": {"b": np.ones(2), "a": [{"y": 1, "x": 2}]}, "a": None}
    src = save_flax(tmp_path / "a", tree, in_place=True)
    ms.write(src, ms.read_lazy(src), tmp_path / "keep", sort_keys=False)
    assert (tmp_path / "keep").read_bytes() == open(src, "rb").read()
    ms.write(src, ms.read_lazy(src), tmp_path / "sorted")
    assert (tmp_path / "sorted").read_bytes() == fs.msgpack_serialize(restore(src))


def layers(n=3):
    rng = np.random.default_rng(1)
    return {
        f"layer_{i}": {
            "attn": {
                "kernel": rng.standard_normal((4, 6)).astype(np.float32),
                "bias": rng.standard_normal(6).astype(BF16),
            },
            "q": rng.integers(-128, 127, (2, 3, 5), dtype=np.int8),
            "scale": np.array(i + 0.5, np.float32),
        }
        for i in range(n)
    }


def zip_map(fn, trees):
    """fn over the leaves of same-structured dicts, skipping leaves fn maps to None."""
    if isinstance(trees[0], dict):
        out = {k: zip_map(fn, [t[k] for t in trees]) for k in trees[0]}
        return {k: v for k, v in out.items() if v is not None}
    return fn(trees)


BLOCKINGS = {
    "default": {},
    "segments": {"_SEG_MIN": 1, "_BLOCK": 16},  # zero-copy path, tiny pieces
    "gather": {"_SEG_MIN": 1 << 40, "_BLOCK": 40},  # numpy path, many small blocks
}


@pytest.mark.parametrize("blocking", list(BLOCKINGS))
@pytest.mark.parametrize("chunk", [None, 40])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_stack_and_slice_match_flax(tmp_path, monkeypatch, axis, chunk, blocking):
    if chunk:
        monkeypatch.setattr(fs, "MAX_CHUNK_SIZE", chunk)
    for name, value in BLOCKINGS[blocking].items():
        monkeypatch.setattr(writer, name, value)
    loop = {"params": layers(), "step": np.int64(3), "meta": {"none": None, "empty": {}}}
    names = list(loop["params"])
    src = save_flax(tmp_path / "loop", loop)
    lz = ms.read_lazy(src)

    def fits(leaves):
        return axis <= len(leaves[0].shape)  # Refs and arrays both have .shape

    # to-scan: Stack on `axis` (leaves too small for it stay per layer, in a list).
    lazy_layers = [lz["params"][k] for k in names]
    np_layers = [loop["params"][k] for k in names]
    scan_lazy = {
        "params": {
            "blocks": zip_map(lambda xs: lazy.stack(xs, axis) if fits(xs) else None, lazy_layers),
            "rest": [zip_map(lambda xs: None if fits(xs) else xs[0], [t]) for t in lazy_layers],
        },
        "step": lz["step"],
        "meta": lz["meta"],
    }
    scan_np = {
        "params": {
            "blocks": zip_map(lambda xs: np.stack(xs, axis) if fits(xs) else None, np_layers),
            "rest": [zip_map(lambda xs: None if fits(xs) else xs[0], [t]) for t in np_layers],
        },
        "step": loop["step"],
        "meta": loop["meta"],
    }
    dst = tmp_path / "scan"
    seen = []
    ms.write(src, scan_lazy, dst, progress=seen.append)
    want = fs.msgpack_serialize(scan_np)
    assert dst.read_bytes() == want
    assert sum(seen) == len(want) == ms.encoded_size(scan_lazy)

    # to-loop: Slice of the stacked arrays, read back from the scan file.
    sz = ms.read_lazy(dst)
    blocks_lazy, blocks_np = sz["params"]["blocks"], scan_np["params"]["blocks"]
    n = len(names)
    loop_lazy = {
        f"layer_{i}": zip_map(lambda xs, i=i: lazy.unstack(xs[0], axis)[i], [blocks_lazy])
        for i in range(n)
    }
    # np.asarray: np.take gives a numpy scalar for 0-d results; a Slice stays a 0-d array.
    loop_np = {
        f"layer_{i}": zip_map(lambda xs, i=i: np.asarray(np.take(xs[0], i, axis)), [blocks_np])
        for i in range(n)
    }
    ms.write(dst, {"params": loop_lazy}, tmp_path / "back")
    back = (tmp_path / "back").read_bytes()
    assert back == fs.msgpack_serialize({"params": loop_np})
    if axis == 0:  # every leaf was stacked: the round trip gives the loop file back
        assert back == fs.msgpack_serialize({"params": loop["params"]})


def test_save_matches_msgpack_serialize(tmp_path, small_chunks):
    tree = rich_tree()
    tree["jax"] = {"w": jnp.arange(20, dtype=jnp.float32), "s": jnp.ones((), BF16)}
    ms.save(tree, tmp_path / "a")
    assert (tmp_path / "a").read_bytes() == fs.msgpack_serialize(tree)


def test_failed_write_leaves_no_file(tmp_path):
    src = save_flax(tmp_path / "a", {"w": np.ones(4, np.float32)})
    ref = ms.read_lazy(src)["w"]
    bad = lazy.Ref((10**6, ref.nbytes), ref.shape, ref.dtype)
    with pytest.raises(FormatError, match="another file"):
        ms.write(src, {"x": {"w": bad}}, tmp_path / "out")
    with pytest.raises(FormatError, match="'x/obj'"):
        ms.write(src, {"x": {"obj": object()}}, tmp_path / "out")
    with pytest.raises(FormatError, match="no source file"):
        ms.write(None, {"w": ref}, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_flax_chunk_size_constant_matches_flax():
    from flax import serialization

    assert writer._FLAX_MAX_CHUNK_SIZE == serialization.MAX_CHUNK_SIZE

"""Streaming zstd decode of stacks saved as one chunk (`formats/orbax_stream/zstd_stream.py`).

to-loop of a scan checkpoint whose stacked arrays are one zstd chunk each
(Orbax's save of ``np.stack``-ed arrays, zarr2 and zarr3) is streamed layer by
layer; every output is checked bit for bit against the TensorStore decode
(``ZSTD_STREAM`` off) and against ``np.take`` of the stack. Chunks written by
hand (several frames, no content size, checksums, skippable frames) are read
by TensorStore and by the stream alike; damaged chunks are refused with the
file, chunk key and leaf named.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
import zstandard

import ckptconv
from ckptconv.errors import FormatError
from ckptconv.formats import orbax_stream
from ckptconv.formats.orbax_stream import damage, decode, zstd_stream
from ckptconv.formats.orbax_stream.destination import _Destination

N = 5


def _kv(item: Path) -> ts.KvStore:
    return ts.KvStore.open({"driver": "ocdbt", "base": f"file://{item}/"}).result()


def _blocks(axis: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def shaped(*rest):
        return tuple(rest[:axis]) + (N,) + tuple(rest[axis:])

    return {
        "w": rng.standard_normal(shaped(6, 7)).astype(np.float32),
        "b": rng.standard_normal(shaped(3)).astype(ml_dtypes.bfloat16),
        "q": rng.integers(-9, 9, shaped(4, 2, 3)).astype(np.int8),
        "z": np.zeros(shaped(8), np.float32),
    }


def _save(path: Path, tree: dict, *, zarr3: bool) -> Path:
    handler = ocp.PyTreeCheckpointHandler(use_zarr3=zarr3)
    with ocp.Checkpointer(handler) as c:
        c.save(path.absolute(), args=ocp.args.PyTreeSave(tree))
    return path


def _flat(tree, prefix=()) -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, (*prefix, str(key))).items()}
    return {prefix: tree}


def _bits(tree) -> dict:
    return {k: (np.asarray(v).dtype.str, np.shape(v), np.asarray(v).tobytes()) for k, v in _flat(tree).items()}


def _unscan(blocks: dict, axis: int) -> dict:
    return {f"layer_{i}": {k: np.take(v, i, axis) for k, v in blocks.items()} for i in range(N)}


#: The stream reads byte ranges of a chunk (``KvStore.read(byte_range=)``),
#: which the lowest tensorstore tested (0.1.77) does not offer: there the
#: stream is off and TensorStore decodes such leaves whole
#: (`test_without_byte_ranges_tensorstore_decodes`, which runs everywhere).
needs_ranges = pytest.mark.skipif(
    not orbax_stream.BYTE_RANGES,
    reason="this tensorstore's KvStore.read takes no byte_range: the stream decode is off",
)


@pytest.fixture
def streamed(monkeypatch):
    """Source names of the slices jobs that were streamed."""
    names: list[str] = []
    real = _Destination._stream_slices

    async def spy(self, lane, src, job, progress):
        done = await real(self, lane, src, job, progress)
        if done:
            names.append(job.leaves[0].value.source.source)
        return done

    monkeypatch.setattr(_Destination, "_stream_slices", spy)
    return names


def _convert_both(monkeypatch, src: Path, out: Path, axis: int) -> dict:
    """to-loop streamed and through TensorStore: the restored trees, equal."""
    ckptconv.convert(src, out, to="loop", axis=axis)
    monkeypatch.setattr(decode, "ZSTD_STREAM", False)
    ckptconv.convert(src, out.with_name(out.name + "_ts"), to="loop", axis=axis)
    monkeypatch.setattr(decode, "ZSTD_STREAM", True)
    got = ocp.StandardCheckpointer().restore(out.absolute())
    want = ocp.StandardCheckpointer().restore(out.with_name(out.name + "_ts").absolute())
    assert _bits(got) == _bits(want)
    meta = json.loads((out / "_METADATA").read_text())
    assert meta == json.loads((out.with_name(out.name + "_ts") / "_METADATA").read_text())
    return got


@needs_ranges
@pytest.mark.parametrize("zarr3", [False, True])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_streamed_to_loop_equals_tensorstore_decode(tmp_path, monkeypatch, streamed, axis, zarr3):
    if axis == 2:
        blocks = {"w": np.random.default_rng(1).standard_normal((3, 4, N, 6)).astype(np.float32)}
    else:
        blocks = _blocks(axis)
    src = _save(tmp_path / "scan", {"params": {"blocks": blocks}, "step": 3}, zarr3=zarr3)
    got = _convert_both(monkeypatch, src, tmp_path / "loop", axis)
    assert sorted(streamed) == sorted(f"params.blocks.{k}" for k in blocks)
    assert _bits(got) == _bits({"params": _unscan(blocks, axis), "step": np.int64(3)}) or _bits(
        got["params"]
    ) == _bits(_unscan(blocks, axis))


@needs_ranges
@pytest.mark.parametrize("axis", [1, 2])
def test_scatter_in_several_passes(tmp_path, monkeypatch, streamed, axis):
    """A layer axis > 0 keeps at most _SCATTER_BYTES of layers per pass: with
    a tiny bound each layer is its own pass over the stream; rows larger than a
    block are read piece by piece."""
    monkeypatch.setattr(decode, "_SCATTER_BYTES", 1)
    monkeypatch.setattr(zstd_stream, "BLOCK", 64)
    shape = (3, N, 40) if axis == 1 else (2, 3, N, 7)
    blocks = {"w": np.random.default_rng(2).standard_normal(shape).astype(np.float32)}
    src = _save(tmp_path / "scan", {"blocks": blocks}, zarr3=False)
    got = _convert_both(monkeypatch, src, tmp_path / "loop", axis)
    assert streamed == ["blocks.w"]
    assert _bits(got) == _bits(_unscan(blocks, axis))


def _hand_chunk(item: Path, name: str, data: np.ndarray, frames: list[bytes]) -> None:
    """Replaces the one chunk of zarr2 array `name` with hand-made zstd frames."""
    kv = _kv(item)
    z = json.loads(bytes(kv.read(f"{name}/.zarray").result().value))
    assert z["chunks"] == list(data.shape)
    kv.write(f"{name}/" + ".".join("0" * data.ndim), b"".join(frames)).result()


def _frames(raw: bytes, kind: str) -> list[bytes]:
    if kind == "no content size":
        return [zstandard.ZstdCompressor(write_content_size=False).compress(raw)]
    if kind == "checksum":
        return [zstandard.ZstdCompressor(level=5, write_checksum=True).compress(raw)]
    if kind == "several frames":
        cuts = [0, 1, len(raw) // 3, len(raw) // 3, len(raw)]
        return [zstandard.ZstdCompressor(write_checksum=i % 2 == 0).compress(raw[a:b]) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    if kind == "skippable frame":
        half = len(raw) // 2
        skippable = b"\x50\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"hello"
        return [zstandard.ZstdCompressor().compress(raw[:half]), skippable, zstandard.ZstdCompressor().compress(raw[half:])]
    raise AssertionError(kind)


@needs_ranges
@pytest.mark.parametrize("kind", ["no content size", "checksum", "several frames", "skippable frame"])
def test_hand_made_frames_read_as_tensorstore_reads_them(tmp_path, monkeypatch, streamed, kind):
    """TensorStore reads one frame with or without its size or checksum; it
    stops after the first of several (zstd's format, RFC 8878 2, and libzstd's
    ZSTD_decompress, which zarr-python's codec calls, decode the concatenation:
    the stream does too)."""
    blocks = _blocks(0, seed=3)
    src = _save(tmp_path / "scan", {"blocks": blocks}, zarr3=False)
    frames = _frames(blocks["w"].tobytes(), kind)
    _hand_chunk(src, "blocks.w", blocks["w"], frames)
    assert zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress(b"".join(frames)) == blocks["w"].tobytes()
    if len(frames) == 1:
        assert orbax_stream.read_array(src, "blocks.w").tobytes() == blocks["w"].tobytes()  # TensorStore's reader
        got = _convert_both(monkeypatch, src, tmp_path / "loop", 0)
    else:
        with pytest.raises(FormatError, match="Not enough data"):
            orbax_stream.read_array(src, "blocks.w")
        ckptconv.convert(src, tmp_path / "loop", to="loop")
        got = ocp.StandardCheckpointer().restore((tmp_path / "loop").absolute())
    assert "blocks.w" in streamed
    assert _bits(got) == _bits(_unscan(blocks, 0))


def _damage(src: Path, key: str, how: str) -> str:
    kv = _kv(src)
    value = bytes(kv.read(key).result().value)
    if how == "flipped":
        # The first block's header (after a 7-byte frame header): its size.
        value = value[:8] + bytes([value[8] ^ 0x10]) + value[9:]
        says = ""
    elif how == "truncated":
        value = value[: len(value) // 2]
        says = "ends early"
    elif how == "checksum cut":
        value = zstandard.ZstdCompressor(write_checksum=True).compress(
            zstandard.ZstdDecompressor().decompress(value)
        )[:-2]
        says = "ends inside a zstd frame: the chunk is truncated"
    elif how == "checksum wrong":
        value = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(
            zstandard.ZstdDecompressor().decompress(value)
        ))
        value[-1] ^= 1
        value = bytes(value)
        says = "doesn't match checksum"
    elif how == "trailing bytes":
        value += b"garbage!"
        says = "holds bytes that are not a zstd frame at offset"
    elif how == "too long":
        raw = zstandard.ZstdDecompressor().decompress(value)
        value = zstandard.ZstdCompressor().compress(raw + raw[:12])
        says = "holds "
    else:
        raise AssertionError(how)
    kv.write(key, value).result()
    return says


@needs_ranges
@pytest.mark.parametrize(
    "how", ["flipped", "truncated", "checksum cut", "checksum wrong", "trailing bytes", "too long"]
)
def test_damaged_chunk_is_refused(tmp_path, how):
    blocks = _blocks(0, seed=4)
    src = _save(tmp_path / "scan", {"blocks": blocks}, zarr3=False)
    key = "blocks.w/0.0.0"
    says = _damage(src, key, how)
    with pytest.raises(FormatError) as e:
        ckptconv.convert(src, tmp_path / "loop", to="loop")
    msg = str(e.value)
    assert msg.startswith(f"{src.absolute()}: chunk {key} of leaf 'blocks.w' "), msg
    assert says in msg and "copied whole" in msg, msg
    assert not (tmp_path / "loop").exists()


@needs_ranges
def test_damaged_zarr3_shard_index_is_refused(tmp_path):
    blocks = _blocks(0, seed=5)
    src = _save(tmp_path / "scan", {"blocks": blocks}, zarr3=True)
    key = "blocks.w/c/0/0/0"
    kv = _kv(src)
    shard = bytes(kv.read(key).result().value)
    kv.write(key, shard[:-3]).result()
    with pytest.raises(FormatError, match=re.escape(f"chunk {key} of leaf 'blocks.w' has a shard index whose checksum (crc32c) does not match")):
        ckptconv.convert(src, tmp_path / "loop", to="loop")
    kv.write(key, shard[:100] + shard[-20:]).result()
    with pytest.raises(FormatError, match=re.escape(f"chunk {key} of leaf 'blocks.w' cannot be read at bytes 0..")):
        ckptconv.convert(src, tmp_path / "loop", to="loop")


@needs_ranges
def test_missing_chunk(tmp_path, monkeypatch, streamed):
    """A missing chunk is the fill value where the source leaves out fill
    chunks (TensorStore reads it, as before) and damage where Orbax stores
    every chunk."""
    blocks = _blocks(0, seed=6)
    src = _save(tmp_path / "scan", {"blocks": blocks}, zarr3=False)
    key = "blocks.w/0.0.0"
    _kv(src).delete_range(ts.KvStore.KeyRange(key, key + "\x00")).result()
    with pytest.raises(FormatError, match=re.escape(f"chunk {key} of leaf 'blocks.w' is missing, so Orbax cannot read this array either")):
        ckptconv.convert(src, tmp_path / "loop", to="loop")
    meta = json.loads((src / "_METADATA").read_text())
    meta["store_array_data_equal_to_fill_value"] = False
    (src / "_METADATA").write_text(json.dumps(meta))
    got = _convert_both(monkeypatch, src, tmp_path / "loop2", 0)
    assert "blocks.w" not in streamed and "blocks.b" in streamed
    assert _bits(got["layer_2"]["w"]) == _bits(np.zeros_like(blocks["w"][2]))


def test_switch_forces_tensorstore_decode(tmp_path, monkeypatch, streamed):
    blocks = _blocks(0)
    src = _save(tmp_path / "scan", {"blocks": blocks}, zarr3=False)
    monkeypatch.setattr(decode, "ZSTD_STREAM", False)
    ckptconv.convert(src, tmp_path / "loop", to="loop")
    assert streamed == []
    assert _bits(ocp.StandardCheckpointer().restore((tmp_path / "loop").absolute())) == _bits(_unscan(blocks, 0))


# -- the module itself -----------------------------------------------------------


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


def _source(data: bytes, block: int = 7) -> zstd_stream.RangeSource:
    def fetch(a, b):
        return _Done(data[a:b] if b <= len(data) else ValueError("OUT_OF_RANGE"))

    return zstd_stream.RangeSource(fetch, 0, len(data), block)


def test_stream_reads_exact_sizes_and_skips():
    raw = np.random.default_rng(7).integers(0, 255, 10_000, np.uint8).tobytes()
    for frames in (_frames(raw, "several frames"), _frames(raw, "checksum"), _frames(raw, "skippable frame")):
        s = zstd_stream.Stream(_source(b"".join(frames), block=333), len(raw))
        a = bytearray(1000)
        s.readinto(a)
        s.skip(5000, bytearray(64))
        b = bytearray(4000)
        s.readinto(b)
        s.finish()
        assert bytes(a) == raw[:1000] and bytes(b) == raw[6000:]


def test_frames_walk_agrees_with_zstd():
    raw = bytes(range(256)) * 2000
    for level, checksum in ((1, False), (19, True)):
        data = zstandard.ZstdCompressor(level=level, write_checksum=checksum).compress(raw) * 2
        for step in (1, 5, 4096, len(data)):
            f = zstd_stream.Frames()
            for i in range(0, len(data), step):
                f.feed(data[i : i + step])
            assert f.complete() and f.frames == 2
        f = zstd_stream.Frames()
        f.feed(data[:-1])
        assert not f.complete()
    with pytest.raises(zstd_stream.Damage, match="not a zstd frame at offset 0"):
        zstd_stream.Frames().feed(b"PK\x03\x04")


@pytest.mark.parametrize("size", [1, 2, 3, 1000, 4097, 1 << 20])
def test_value_size(size):
    data = b"x" * size
    calls = []

    def read(a, b):
        calls.append((a, b))
        if b > len(data):
            raise ValueError("OUT_OF_RANGE")
        return data[a:b]

    for hint in (1, size, size * 3 + 5):
        assert zstd_stream.value_size(read, 0, hint) == size
    assert len(calls) < 3 * (2 * size.bit_length() + 8)


def test_leaves_keep_their_own_buffers(tmp_path, monkeypatch):
    """Each layer is decoded into a buffer of its own (TensorStore may keep a
    reference to what it is given until the transaction commits)."""
    blocks = {"w": np.arange(N * 64 * 64, dtype=np.float32).reshape(N, 64, 64)}
    src = _save(tmp_path / "scan", {"blocks": blocks}, zarr3=False)
    monkeypatch.setattr(zstd_stream, "BLOCK", 1000)
    got = _convert_both(monkeypatch, src, tmp_path / "loop", 0)
    assert [float(got[f"layer_{i}"]["w"][0, 0]) for i in range(N)] == [i * 64.0 * 64 for i in range(N)]
    assert jax.tree.structure(got) == jax.tree.structure(_unscan(blocks, 0))


def test_without_byte_ranges_tensorstore_decodes(tmp_path, monkeypatch, streamed):
    """Where KvStore.read takes no byte_range, nothing is streamed and the
    output is TensorStore's decode of the same leaves."""
    monkeypatch.setattr(decode, "BYTE_RANGES", False)
    monkeypatch.setattr(damage, "BYTE_RANGES", False)
    blocks = _blocks(0)
    src = _save(tmp_path / "scan", {"params": {"blocks": blocks}}, zarr3=False)
    ckptconv.convert(src, tmp_path / "loop", to="loop")
    assert streamed == []
    got = ocp.StandardCheckpointer().restore((tmp_path / "loop").absolute())
    assert _bits(got["params"]) == _bits(_unscan(blocks, 0))

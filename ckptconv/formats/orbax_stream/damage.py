"""Damage checks of a source chunk, without decoding it.

Damage is looked for without decoding: a missing chunk where the source says
it stores every chunk (``store_array_data_equal_to_fill_value``), a zstd frame
whose declared size differs from the chunk size the metadata implies, and in
zarr3 a shard file too short for its index, whose index checksum (crc32c)
does not match, or whose index points outside the file (a truncated copy).
Other codec chains (``gzip``, ``blosc``, a compressed shard file) are copied
unchecked: their sizes cannot be read without decoding.

The copy engine checks each chunk it reads (`_chunk_damage`); the clone
engine, which reads no chunk whole, peeks at the few bytes a check needs
(`_peek_damage`). A missing chunk is found where the chunks are read or listed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from ckptconv.formats.orbax_stream.chunk_ops import _ChunkOp
from ckptconv.formats.orbax_stream.metadata_read import _is_zarr3, _meta_chunks, _zarr_dtype
from ckptconv.formats.orbax_stream.source import BYTE_RANGES


def _chunk_damage(value: bytes, op: _ChunkOp) -> str | None:
    """What is wrong with a source chunk, from its bytes and its array's
    metadata, without decoding it; None if nothing can be seen."""
    z = op.meta
    if z is None:
        return None
    if not _is_zarr3(z):
        size = _zstd_content_size(value)
        if size is not None and size != op.cost:
            return (
                f"holds {size} bytes, but its .zarray (shape, chunks, dtype) says {op.cost}: "
                "the metadata does not describe the data"
            )
        return None
    itemsize = _zarr_dtype(z["data_type"], Path(), op.leaf).itemsize
    try:
        return _zarr3_damage(memoryview(value), z["codecs"], _meta_chunks(z), itemsize)
    except (KeyError, TypeError, ValueError, AttributeError):
        # A codec configuration this check does not know: TensorStore judges
        # it when the output is read, as it would the source.
        return None


async def _peek_damage(kv: ts.KvStore, op: _ChunkOp) -> str | None:
    """`_chunk_damage` for the clone engine, which never reads a chunk whole:
    the parts that the checks look at are read (a zstd frame's header, a
    shard's index and its last data byte), and only a chunk they find
    suspect is read whole, for `_chunk_damage`'s exact words. Layouts
    other than Orbax's (zarr2 + zstd, zarr3 one ``sharding_indexed`` codec of
    ``bytes`` + ``zstd`` with its index at the end) are not checked."""
    z = op.meta
    if z is None:
        return None
    try:
        suspect = await _peek_suspect(kv, op, z) if BYTE_RANGES else True
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        suspect = True  # a byte range outside the value: too short for what it says
    if not suspect:
        return None
    try:
        res = await kv.read(op.src_key)
    except Exception as e:  # OCDBT cannot read the value: its data file is cut short
        return f"cannot be read ({e}): the checkpoint's data files are damaged or incomplete"
    return _chunk_damage(res.value, op) if res.state == "value" else None


_ZSTD_HEADER = 18  # the longest frame header that still holds the content size


async def _peek_suspect(kv: ts.KvStore, op: _ChunkOp, z: dict[str, Any]) -> bool:
    async def head(start: int, nbytes: int) -> int | None:
        res = await kv.read(op.src_key, byte_range=slice(start, start + min(nbytes, _ZSTD_HEADER)))
        return _zstd_content_size(res.value)

    if not _is_zarr3(z):
        if (z.get("compressor") or {}).get("id") != "zstd":
            return False
        size = await head(0, _ZSTD_HEADER)
        return size is not None and size != op.cost
    codecs = z["codecs"]
    if [c["name"] for c in codecs] != ["sharding_indexed"]:
        return False
    conf = codecs[0].get("configuration", {})
    inner, shape = list(conf["chunk_shape"]), _meta_chunks(z)
    index_codecs = conf.get("index_codecs") or [{"name": "bytes"}, {"name": "crc32c"}]
    kinds = [c["name"] for c in index_codecs]
    inner_kinds = [c["name"] for c in conf.get("codecs", [])]
    if (
        kinds not in (["bytes"], ["bytes", "crc32c"])
        or (index_codecs[0].get("configuration") or {}).get("endian", "little") != "little"
        or conf.get("index_location", "end") != "end"
        or len(inner) != len(shape)
    ):
        return False
    n = math.prod(math.ceil(s / c) for s, c in zip(shape, inner))
    crc = kinds[-1] == "crc32c"
    size = 16 * n + 4 * crc
    index = (await kv.read(op.src_key, byte_range=slice(-size, None))).value
    if len(index) != size or (
        crc and _crc32c(index[: 16 * n]) != int.from_bytes(index[16 * n :], "little")
    ):
        return True
    entries = [
        (o, b) for o, b in np.frombuffer(index[: 16 * n], dtype="<u8").reshape(n, 2).tolist()
        if not (o == _NO_CHUNK and b == _NO_CHUNK)
    ]
    if not entries:
        return False
    end = max(o + b for o, b in entries) + size
    # The value holds its data and index: its byte end - 1 exists.
    await kv.read(op.src_key, byte_range=slice(end - 1, end))
    if inner_kinds != ["bytes", "zstd"]:
        return False
    itemsize = _zarr_dtype(z["data_type"], Path(), op.leaf).itemsize
    want = math.prod(inner) * itemsize
    for offset, nbytes in entries:
        got = await head(offset, nbytes)
        if got is not None and got != want:
            return True
    return False


def _zarr3_damage(
    value: memoryview, codecs: list[dict[str, Any]], shape: list[int], itemsize: int
) -> str | None:
    """`_chunk_damage` for one zarr3 chunk (or inner chunk of a shard) of
    ``shape``, encoded by ``codecs``.

    Checked: ``bytes`` alone (the size), ``bytes`` + ``zstd`` (the size the
    zstd frame declares, where the writer put it there), and
    ``sharding_indexed`` with Orbax's index codecs (``bytes`` little-endian,
    ``crc32c`` or not): the file holds its index, the index's checksum
    matches, every inner chunk it names lies inside the file (a truncated
    shard fails one of these) and is checked in turn. Anything else
    (``gzip``, ``blosc``, codecs after the sharding codec, big-endian
    indices) cannot be judged without decoding: None.
    """
    names = [c["name"] for c in codecs]
    if "sharding_indexed" in names:
        i = names.index("sharding_indexed")
        if i != len(names) - 1:
            return None  # the shard file is itself encoded again
        return _shard_damage(value, codecs[i].get("configuration", {}), shape, itemsize)
    if "bytes" not in names:
        return None
    rest = names[names.index("bytes") + 1 :]
    nbytes = math.prod(shape) * itemsize
    if not rest and len(value) != nbytes:
        return f"holds {len(value)} bytes, but its zarr.json (shape, chunks, data_type) says {nbytes}"
    if rest == ["zstd"]:
        size = _zstd_content_size(value)
        if size is not None and size != nbytes:
            return (
                f"holds {size} bytes, but its zarr.json (shape, chunks, data_type) says {nbytes}: "
                "the metadata does not describe the data"
            )
    return None


_NO_CHUNK = 2**64 - 1


def _shard_damage(
    value: memoryview, conf: dict[str, Any], shape: list[int], itemsize: int
) -> str | None:
    """`_zarr3_damage` of one ``sharding_indexed`` shard file (zarr v3 spec,
    sharding codec: an index of (offset, nbytes) uint64 pairs per inner chunk
    in C order, (2^64-1, 2^64-1) for an absent one, at the file's end unless
    ``index_location`` says "start")."""
    inner = list(conf["chunk_shape"])
    if len(inner) != len(shape) or min(inner, default=1) < 1:
        return f"is a shard of inner chunks {inner}, which do not fit its chunk shape {shape}"
    n = math.prod(math.ceil(s / c) for s, c in zip(shape, inner))
    index_codecs = conf.get("index_codecs") or [
        {"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}
    ]
    kinds = [c["name"] for c in index_codecs]
    endian = (index_codecs[0].get("configuration") or {}).get("endian", "little")
    if kinds not in (["bytes"], ["bytes", "crc32c"]) or endian != "little":
        return None
    crc = kinds[-1] == "crc32c"
    size = 16 * n + 4 * crc
    if len(value) < size:
        return (
            f"is {len(value)} bytes, shorter than its shard index ({size} bytes): the file is "
            "truncated"
        )
    at_end = conf.get("index_location", "end") != "start"
    index = value[len(value) - size :] if at_end else value[:size]
    if crc and _crc32c(index[: 16 * n]) != int.from_bytes(index[16 * n :], "little"):
        return (
            "has a shard index whose checksum (crc32c) does not match: the file is truncated "
            "or overwritten"
        )
    data_start, data_end = (0, len(value) - size) if at_end else (size, len(value))
    entries = np.frombuffer(index[: 16 * n], dtype="<u8").reshape(n, 2)
    for offset, nbytes in entries.tolist():
        if offset == _NO_CHUNK and nbytes == _NO_CHUNK:
            continue  # an inner chunk of fill values, left out
        if offset < data_start or offset + nbytes > data_end:
            return (
                f"has a shard index naming bytes {offset}..{offset + nbytes} of a "
                f"{len(value)}-byte file, outside its data: the file is truncated or overwritten"
            )
        damage = _zarr3_damage(value[offset : offset + nbytes], conf["codecs"], inner, itemsize)
        if damage is not None:
            return damage
    return None


_CRC32C_TABLE: list[int] = []


def _crc32c(data: memoryview | bytes) -> int:
    """CRC-32C (Castagnoli), as zarr3's ``crc32c`` codec computes it; for shard
    indices (16 bytes per inner chunk), so a table in Python is fast enough."""
    if not _CRC32C_TABLE:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            _CRC32C_TABLE.append(c)
    crc = 0xFFFFFFFF
    for b in bytes(data):
        crc = _CRC32C_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _zstd_content_size(frame: bytes) -> int | None:
    """The decompressed size a zstd frame's header declares, or None (no zstd
    frame, or a header without it). Checking it against the chunk size the
    ``.zarray`` implies catches metadata that lies, without decoding.

    Frame header (RFC 8878, 3.1.1): magic, descriptor (FCS flag bits 7-6,
    single-segment bit 5, dictionary-id flag bits 1-0), window byte unless
    single-segment, dictionary id (0/1/2/4 bytes), content size (0/1/2/4/8 bytes;
    the 2-byte form is offset by 256).
    """
    if len(frame) < 6 or frame[:4] != b"\x28\xb5\x2f\xfd":
        return None
    desc = frame[4]
    fcs_flag, single = desc >> 6, (desc >> 5) & 1
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[desc & 3]
    n = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if n == 0 or len(frame) < pos + n:
        return None
    size = int.from_bytes(frame[pos : pos + n], "little")
    return size + 256 if n == 2 else size

"""The decode path: output leaves computed by decoding source arrays
(`_DecodeJob`), how a stack saved as one zstd chunk is stream-decoded
(`_StreamPlan`), and the bounds decode jobs run within (`_Budget`, `_Lane`).
`_Destination.decode_job` (destination.py) runs the jobs.

Everything that cannot move as chunks (a stacked source saved as one chunk
and sliced, parts with differing layouts, a `Cast` (``--dtype``), plain values
in the tree) is decoded with TensorStore one source leaf (or one layer-thick
slab of it) at a time and encoded again. Stacks written that way get
layer-thick chunks too, so that unstacking ckptconv's own output is always a
chunk copy. For a zarr3 source, arrays written this way are zarr3 with the
source array's codecs (its chunk key encoding, codec chain and their
settings; a cast leaf in the cast dtype), every shard holding one inner chunk
as Orbax writes them; in-memory values get Orbax's own zarr3 codecs.

A stacked source saved as one zstd chunk and unstacked (to-loop of what a
scanned training run writes) is not decoded through TensorStore: its chunk's
compressed bytes are read by byte ranges from the kvstore and stream-decoded
(`zstd_stream`, see `_StreamPlan`), each layer written as soon as its bytes
are out; two such leaves decode at once, in worker threads.
``CKPTCONV_ZSTD_STREAM=0`` (`ZSTD_STREAM`) forces TensorStore's decode.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from ckptconv.errors import FormatError
from ckptconv.formats.orbax_stream import zstd_stream
from ckptconv.formats.orbax_stream.leaves import _Leaf
from ckptconv.formats.orbax_stream.metadata_read import (
    _chunk_key,
    _is_zarr3,
    _meta_chunks,
    _meta_dtype,
    _zarr_dtype,
)
from ckptconv.formats.orbax_stream.source import BYTE_RANGES
from ckptconv.lazy import Deferred, Slice, Stack

#: Stream-decode stacks saved as one zstd chunk (see `_StreamPlan`); the
#: environment variable ``CKPTCONV_ZSTD_STREAM=0`` sets it False, forcing
#: TensorStore's whole-leaf decode (same output, bit for bit).
ZSTD_STREAM = os.environ.get("CKPTCONV_ZSTD_STREAM", "1").strip().lower() not in ("0", "false", "no", "off")

# Decoded layers a streamed decode on a layer axis > 0 keeps per pass over
# the stream (there every layer's bytes are spread over the whole leaf).
_SCATTER_BYTES = 128 << 20


@dataclass
class _DecodeJob:
    """Output leaves computed by decoding (and re-encoding) array data.

    kind "stack": `leaves` is one Stack output; "slices": every Slice output of
    one source (decoded one layer-thick slab at a time); "ref": a Ref copied by
    decoding (a cast); "value": an in-memory array value.
    """

    kind: str
    leaves: list[_Leaf] = field(default_factory=list)
    #: "slices" of a source saved as one zstd chunk: how to stream it.
    stream: _StreamPlan | None = None

    @property
    def nbytes(self) -> int:
        """Decoded bytes the job holds at once: its source leaf (slices) or one part."""
        value = self.leaves[0].value
        if isinstance(value, Slice):
            return value.source.nbytes
        if isinstance(value, Stack):
            return value.parts[0].nbytes
        if isinstance(value, Deferred) and value.parts:
            return value.nbytes // len(value.parts)
        return int(getattr(value, "nbytes", 0))


@dataclass
class _StreamPlan:
    """How to stream-decode a source saved as one zstd chunk (`zstd_stream`).

    The chunk is the whole array, so its decoded bytes are the array in C
    order. On layer axis 0 layer ``l`` is bytes ``[l * layer, (l + 1) * layer)``:
    each layer is decoded straight into a buffer of its own and written, and
    memory holds about one layer. On an axis ``k > 0`` the layers interleave
    (each of the ``prod(shape[:k])`` rows holds a piece of every layer), so no
    layer is complete before the stream's end: each pass over the stream keeps
    the layers of one group of at most `_SCATTER_BYTES` (one layer at least)
    and scatters rows into them; a leaf larger than that is decoded once per
    group (time traded for memory).
    """

    #: The chunk's key in the source's kvstore.
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    #: zarr3 ``sharding_indexed``: the frame's byte range comes from the shard
    #: index (``index_crc``: the index ends with its crc32c).
    sharded: bool
    index_crc: bool
    #: The metadata file's name and what it says, for damage messages.
    what: str
    #: Decoded bytes the job holds at once.
    held: int = 0


def _stream_plan(job: _DecodeJob, z: dict[str, Any] | None) -> _StreamPlan | None:
    """A `_StreamPlan` for a "slices" job whose source is one zstd chunk of a
    little-endian dtype in C order (zarr2 ``zstd`` compressor and no filters;
    zarr3 ``bytes`` + ``zstd``, alone or inside one ``sharding_indexed`` whose
    inner chunk is the whole array), else None (TensorStore decodes it)."""
    if not ZSTD_STREAM or not BYTE_RANGES or z is None:
        return None
    first: Slice = job.leaves[0].value
    ref, axis = first.source, first.axis
    shape = tuple(int(d) for d in z.get("shape", ()))
    if not shape or list(shape) != _meta_chunks(z) or shape != tuple(ref.shape) or 0 in shape:
        return None
    try:
        dtype = _zarr_dtype(_meta_dtype(z), Path(), ref.source)
    except FormatError:
        return None
    if dtype.itemsize > 1 and dtype.byteorder == ">" or dtype.newbyteorder("=") != np.dtype(ref.dtype):
        return None
    dtype = dtype.newbyteorder("=")
    sharded = crc = False
    if _is_zarr3(z):
        chain = z.get("codecs") or []
        if z.get("storage_transformers") or not isinstance(chain, list) or not chain:
            return None
        if chain[0].get("name") == "sharding_indexed":
            conf = chain[0].get("configuration") or {}
            index = [c.get("name") for c in conf.get("index_codecs") or [{"name": "bytes"}, {"name": "crc32c"}]]
            index_endian = ((conf.get("index_codecs") or [{}])[0].get("configuration") or {}).get("endian", "little")
            if (
                len(chain) != 1 or list(conf.get("chunk_shape") or []) != list(shape)
                or index not in (["bytes"], ["bytes", "crc32c"]) or index_endian != "little"
                or conf.get("index_location", "end") != "end"
            ):
                return None
            chain, sharded, crc = conf.get("codecs") or [], True, index[-1] == "crc32c"
        if [c.get("name") for c in chain] != ["bytes", "zstd"]:
            return None
        endian = (chain[0].get("configuration") or {}).get("endian", "little")
        if dtype.itemsize > 1 and endian != "little":
            return None
        what = "its zarr.json (shape, chunks, data_type)"
    else:
        if (
            (z.get("compressor") or {}).get("id") != "zstd" or z.get("filters")
            or z.get("order", "C") != "C"
        ):
            return None
        what = "its .zarray (shape, chunks, dtype)"
    nbytes = math.prod(shape) * dtype.itemsize
    layer = nbytes // shape[axis]
    held = layer if axis == 0 else min(nbytes, max(layer, _SCATTER_BYTES // layer * layer))
    key = f"{ref.source}/{_chunk_key((0,) * len(shape), z)}"
    return _StreamPlan(key, shape, dtype, sharded, crc, what, held + 2 * zstd_stream.BLOCK)


class _Budget:
    """Admits jobs while the bytes they hold stay within a limit (one always)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> Any:
        async with self.cond:
            await self.cond.wait_for(lambda: self.used == 0 or self.used + nbytes <= self.limit)
            self.used += nbytes
        try:
            yield
        finally:
            async with self.cond:
                self.used -= nbytes
                self.cond.notify_all()


@dataclass
class _Lane:
    """One decode job's open transaction and the bytes it holds."""

    txn: ts.Transaction | None = None
    nbytes: int = 0

    def transaction(self) -> ts.Transaction:
        if self.txn is None:
            self.txn = ts.Transaction()
        return self.txn


def _raw(a: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array, as a writable uint8 view (ml_dtypes'
    bfloat16 and float8 arrays export no buffer of their own)."""
    return a.reshape(-1).view(np.uint8)


def _scatter_pass(
    stream: zstd_stream.Stream, rows: int, n: int, piece: int, dtype: np.dtype, group: list[int]
) -> dict[int, np.ndarray]:
    """One pass over a stream of an array ``(rows, n, piece)`` (C order; the
    layer axis in the middle): layers ``group`` as ``(rows, piece)`` arrays.
    Rows are decoded a block of them at a time (one row's pieces one by one
    where a row is larger than a block)."""
    outs = {i: np.empty((rows, piece), dtype) for i in group}
    row_bytes = n * piece * dtype.itemsize
    if row_bytes <= zstd_stream.BLOCK:
        step = max(1, zstd_stream.BLOCK // row_bytes)
        buf = np.empty((min(step, rows), n, piece), dtype)
        for r in range(0, rows, step):
            k = min(step, rows - r)
            stream.readinto(_raw(buf[:k]))
            for i in group:
                outs[i][r : r + k] = buf[:k, i]
    else:
        scratch = np.empty(min(piece * dtype.itemsize, zstd_stream.BLOCK), np.uint8)
        for r in range(rows):
            for i in range(n):
                if i in outs:
                    stream.readinto(_raw(outs[i][r]))
                else:
                    stream.skip(piece * dtype.itemsize, scratch)
    stream.finish()
    return outs

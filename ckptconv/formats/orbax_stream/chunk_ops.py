"""Chunk moves: which compressed source chunk becomes which output chunk
(`_ChunkOp`), for a `Ref`, a `Stack` or a `Slice`, and their batches.

`write` moves compressed chunk bytes whenever the layout allows it, through
TensorStore's kvstore API, without decoding anything:

* a `Ref` is always copied chunk for chunk, ``.zarray`` / ``zarr.json``
  included (any codecs);
* a `Stack` of parts that share one zarr layout (same chunks, dtype,
  compressor or codecs, ...) becomes an array whose chunks are one layer
  thick: chunk ``(i.., l, j..)`` of the stack *is* chunk ``(i.., j..)`` of
  part ``l``, byte for byte, because a length-1 axis does not change a
  chunk's memory layout. In zarr3 the same holds for a shard file: the inner
  chunk shape gets the same length-1 axis, so the inner chunk grid, the
  index (offsets and sizes in C order of that grid) and its checksum stay
  what they were;
* a `Slice` at ``index`` of a source whose chunks are one layer thick on the
  slice axis is the inverse: chunk ``(i.., j..)`` of the slice is chunk
  ``(i.., index, j..)`` of the source.

A zarr3 chunk move needs a codec chain that does not depend on the chunk's
shape: ``bytes``, ``sharding_indexed`` (whose inner codecs qualify too),
``zstd``, ``gzip``, ``blosc``, ``crc32c``. An array-to-array codec
(``transpose``: its ``order`` names axes) or a storage transformer sends that
Stack or Slice to the decode path; Orbax writes neither
(`metadata_write._reshaped` decides).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptconv.formats.orbax_stream.leaves import _Leaf, _leaf_dtype
from ckptconv.formats.orbax_stream.metadata_read import _chunk_key, _meta_chunks
from ckptconv.formats.orbax_stream.metadata_write import _reshaped
from ckptconv.lazy import Slice, Stack

# Upper bound of (uncompressed) chunk bytes per kvstore transaction. Peak RSS
# grows by about 6x this (each value is held by the read, by Python, by the
# transaction and by the OCDBT data-file writer, for two pipelined batches);
# on a 1.6 GB checkpoint 32, 64 and 256 MiB copied at the same speed.
_BATCH_BYTES = 32 << 20
# Also bound the number of chunk operations per batch (small chunks).
_BATCH_OPS = 4096


@dataclass
class _ChunkOp:
    """Copy one compressed chunk (or ``.zarray``) from source to output."""

    src_key: str
    dst_key: str
    # Uncompressed size of the chunk: bounds a batch's memory.
    cost: int
    # Output bytes this op completes, for `progress`.
    done: int
    leaf: str
    # The source array's zarr metadata (the chunk's layout, for damage checks).
    meta: dict[str, Any] | None = None


def _copy_ops(leaf: _Leaf, source: str, zarray: dict[str, Any], nbytes: int) -> list[_ChunkOp]:
    """Ops that copy every chunk of `source` verbatim under `leaf`'s name."""
    keys = [_chunk_key(idx, zarray) for idx in _grid(zarray["shape"], _meta_chunks(zarray))]
    return _ops(leaf, [(f"{source}/{key}", key) for key in keys], zarray, zarray, nbytes)


def _stack_ops(
    leaf: _Leaf, value: Stack, zarrays: list[dict[str, Any]]
) -> tuple[dict[str, Any], list[_ChunkOp]] | None:
    """Chunk copies for a Stack, or None when the parts' layouts differ (or,
    zarr3, a codec depends on the chunk's shape)."""
    first = zarrays[0]
    if any(z != first for z in zarrays[1:]):
        return None
    axis = value.axis
    chunks = _meta_chunks(first)
    out = _reshaped(first, list(value.shape), lambda c: [*c[:axis], 1, *c[axis:]], axis, insert=True)
    if out is None:
        return None
    pairs = []
    for layer, part in enumerate(value.parts):
        for idx in _grid(first["shape"], chunks):
            out_idx = (*idx[:axis], layer, *idx[axis:])
            pairs.append((f"{part.source}/{_chunk_key(idx, first)}", _chunk_key(out_idx, out)))
    return out, _ops(leaf, pairs, out, first, value.nbytes)


def _slice_ops(
    leaf: _Leaf, value: Slice, zarray: dict[str, Any]
) -> tuple[dict[str, Any], list[_ChunkOp]] | None:
    """Chunk copies for a Slice, or None unless chunks are one layer thick (and,
    zarr3, no codec depends on the chunk's shape)."""
    axis = value.axis
    if _meta_chunks(zarray)[axis] != 1:
        return None
    shape = list(zarray["shape"])
    out = _reshaped(
        zarray, shape[:axis] + shape[axis + 1 :], lambda c: c[:axis] + c[axis + 1 :], axis,
        insert=False,
    )
    if out is None:
        return None
    pairs = []
    for idx in _grid(out["shape"], _meta_chunks(out)):
        src_idx = (*idx[:axis], value.index, *idx[axis:])
        pairs.append((f"{value.source.source}/{_chunk_key(src_idx, zarray)}", _chunk_key(idx, out)))
    return out, _ops(leaf, pairs, out, zarray, value.nbytes)


def _ops(
    leaf: _Leaf,
    pairs: list[tuple[str, str]],
    out_zarray: dict[str, Any],
    src_zarray: dict[str, Any],
    nbytes: int,
) -> list[_ChunkOp]:
    """`_ChunkOp`s for (source key, output chunk key) pairs of one leaf."""
    itemsize = np.dtype(_leaf_dtype(leaf.value)).itemsize
    cost = math.prod(_meta_chunks(out_zarray)) * itemsize
    n = len(pairs)
    # Split the leaf's bytes over its chunks so that progress sums exactly.
    return [
        _ChunkOp(
            src, f"{leaf.name}/{dst}", cost, nbytes * (i + 1) // n - nbytes * i // n, leaf.name,
            src_zarray,
        )
        for i, (src, dst) in enumerate(pairs)
    ]


def _grid(shape: list[int], chunks: list[int]) -> Iterator[tuple[int, ...]]:
    """Indices of all chunks of a zarr array, in C order."""
    counts = [math.ceil(s / c) if c else 0 for s, c in zip(shape, chunks)]
    return itertools.product(*(range(n) for n in counts))


def _batches(ops: Iterable[_ChunkOp]) -> Iterator[list[_ChunkOp]]:
    batch: list[_ChunkOp] = []
    size = 0
    for op in ops:
        if batch and (size + op.cost > _BATCH_BYTES or len(batch) >= _BATCH_OPS):
            yield batch
            batch, size = [], 0
        batch.append(op)
        size += op.cost
    if batch:
        yield batch

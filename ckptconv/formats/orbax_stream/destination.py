"""The output OCDBT store (`_Destination`), configured as Orbax configures
it, or opened on a clone of the source's database: compressed chunks copied
in bounded transactions (`copy_chunks`), decode jobs run and written
(`decode_job`: TensorStore's decode, or the stream decode a
`decode._StreamPlan` describes), commits pipelined, and finished data files
fsynced in the background."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from ckptconv import storage
from ckptconv.errors import FormatError
from ckptconv.formats.orbax_stream import zstd_stream
from ckptconv.formats.orbax_stream.chunk_ops import _BATCH_BYTES, _batches, _ChunkOp
from ckptconv.formats.orbax_stream.damage import _NO_CHUNK, _chunk_damage, _crc32c
from ckptconv.formats.orbax_stream.decode import _DecodeJob, _Lane, _raw, _scatter_pass, _StreamPlan
from ckptconv.formats.orbax_stream.files import LOCK_SUFFIX, _fsync
from ckptconv.formats.orbax_stream.leaves import _Leaf
from ckptconv.formats.orbax_stream.metadata_read import _MAX_CHUNK_BYTES, _meta_file
from ckptconv.formats.orbax_stream.metadata_write import (
    _choose_chunks,
    _zarr3_metadata,
    _zarr_template,
    _zarray_bytes,
)
from ckptconv.formats.orbax_stream.runner import _await, _gather, _settle
from ckptconv.formats.orbax_stream.source import _base_spec, _Source
from ckptconv.lazy import Deferred, Ref, Slice, Stack

# Decode-path commits in flight at once (each holds up to `_BATCH_BYTES`).
_INFLIGHT = 2

Progress = Callable[[int], Any]


class _Destination:
    """A new OCDBT store at an item directory's root, as Orbax configures it."""

    def __init__(
        self, path: Path, context: ts.Context, *, sync: bool, zarr3: bool = False,
        existing: bool = False,
    ) -> None:
        self.path = path
        self.context = context
        #: Decoded arrays are written as zarr v3 (the source's version).
        self.zarr3 = zarr3
        base = _base_spec(path)
        bucket = storage.is_bucket(path)
        if existing:
            # A clone of the source's database (clone.py): its
            # configuration is the manifest's, and its data files are shared
            # with the source, so new files are written by the file kvstore's
            # default write-to-temporary-then-rename, never opened in place.
            self.spec: dict[str, Any] = {
                "driver": "ocdbt", "base": base, "cache_pool": "cache_pool#ocdbt",
            }
            self._init_rest(sync)
            return
        # Orbax's write spec (`tensorstore_utils._build_ocdbt_kvstore_tspec` +
        # `_add_ocdbt_write_options`): non-atomic data files, small values
        # inline in the B-tree, a single root node, a single-file manifest.
        self.spec = {
            "driver": "ocdbt",
            # (a bucket has no file locks: objects are written whole)
            "base": base if bucket else {**base, "file_io_locking": {"mode": "non_atomic"}},
            "manifest": base,
            "config": {
                "max_inline_value_bytes": 1024,
                "max_decoded_node_bytes": 100_000_000,
                "manifest_kind": "single",
            },
            "assume_config": True,
            "target_data_file_size": 2**31,
            "cache_pool": "cache_pool#ocdbt",
        }
        self._init_rest(sync)

    def _init_rest(self, sync: bool) -> None:
        self.kv: ts.KvStore | None = None
        # Commits (zstd encoding, data file writes) run while the next slab is
        # decoded and sliced: at most `_INFLIGHT` at once, to bound memory.
        self.inflight: list[asyncio.Future[Any]] = []
        self.read_lock = asyncio.Lock()
        # With `sync`, data files finished by a commit are fsynced in a thread
        # while copying goes on: the OS would otherwise start writing them
        # back only when the final fsync asks for it, and wait there.
        self.sync_pool = concurrent.futures.ThreadPoolExecutor(1) if sync else None
        self.syncing: dict[str, concurrent.futures.Future[None]] = {}

    async def open(self) -> None:
        self.kv = await ts.KvStore.open(self.spec, context=self.context)

    def _start_writeback(self) -> None:
        """fsyncs, in the background, the data files of past commits."""
        data_dir = self.path / "d"
        if self.sync_pool is None or not data_dir.is_dir():
            return
        # No commit is in flight here, so every file in d/ is complete (OCDBT
        # never rewrites a data file). A `*.__lock` file is TensorStore's
        # transient file lock (file_io_locking), gone by the time it would be
        # fsynced: skipped (a CI run hit one vanishing).
        for entry in os.scandir(data_dir):
            if entry.name not in self.syncing and not entry.name.endswith(LOCK_SUFFIX):
                self.syncing[entry.name] = self.sync_pool.submit(_fsync, Path(entry.path))

    async def close(self) -> None:
        """Waits for commits still in flight (after an error or an interrupt:
        TensorStore's threads write files under the output whatever asyncio
        does, and the caller's clean-up needs a quiet folder), then for
        background fsyncs."""
        for future in self.inflight:
            await _settle(future)
        self.inflight.clear()
        if self.sync_pool is None:
            return
        try:
            for future in self.syncing.values():
                await asyncio.wrap_future(future)
        finally:
            self.sync_pool.shutdown(wait=True)

    async def copy_chunks(
        self,
        src_kv: ts.KvStore,
        src_path: Path,
        ops: list[_ChunkOp],
        values: dict[str, bytes],
        progress: Progress | None,
        *,
        missing_is_damage: bool = True,
    ) -> None:
        """Copies compressed chunks, one bounded transaction per batch.

        ``missing_is_damage``: the source stores every chunk (Orbax's
        ``store_array_data_equal_to_fill_value``), so a missing one is an error;
        otherwise a missing chunk is the fill value and stays missing.

        Reads of a batch run concurrently; the next batch is read while the
        previous one commits, so reading and writing overlap.
        """
        assert self.kv is not None
        pending: asyncio.Future[Any] | None = None
        pending_done = 0
        try:
            for batch in _batches(ops):
                txn = ts.Transaction()
                kv = self.kv.with_transaction(txn)

                async def copy(op: _ChunkOp, kv: ts.KvStore = kv) -> None:
                    if not op.src_key:
                        await kv.write(op.dst_key, values[op.dst_key])
                        return
                    try:
                        res = await src_kv.read(op.src_key)
                    except Exception as e:
                        raise FormatError(
                            f"{src_path}: cannot read chunk {op.src_key} (for leaf {op.leaf!r}): {e}. "
                            "The checkpoint looks incomplete or damaged: check that its save finished and that it was copied whole."
                        ) from e
                    # Orbax that stores every chunk (fill values included) refuses
                    # to read an array with one missing: it is damage, not zeros.
                    # Older Orbax left out all-fill chunks: a hole stays a hole.
                    if res.state != "value" and not missing_is_damage:
                        return
                    if res.state != "value":
                        raise FormatError(
                            f"{src_path}: chunk {op.src_key} of leaf {op.leaf!r} is missing, so "
                            "Orbax cannot read this array either. The checkpoint is incomplete: "
                            "check that its save finished and that it was copied whole."
                        )
                    damage = _chunk_damage(res.value, op)
                    if damage is not None:
                        raise FormatError(
                            f"{src_path}: chunk {op.src_key} of leaf {op.leaf!r} {damage}. "
                            "Copy the checkpoint again."
                        )
                    await kv.write(op.dst_key, res.value)

                await _gather(*(copy(op) for op in batch))
                if pending is not None:
                    await self._commit(pending, progress, pending_done)
                pending = asyncio.ensure_future(_await(txn.commit_async()))
                pending_done = sum(op.done for op in batch)
            if pending is not None:
                await self._commit(pending, progress, pending_done)
                pending = None
        finally:
            if pending is not None:
                await _settle(pending)  # see `close`

    async def _commit(self, future: Any, progress: Progress | None, done: int) -> None:
        try:
            await future
        except Exception as e:
            raise FormatError(f"{self.path}: writing the output failed: {e}") from e
        self._start_writeback()
        if progress is not None and done:
            progress(done)

    # -- decode path -----------------------------------------------------------

    async def create(
        self,
        lane: _Lane,
        leaf: _Leaf,
        shape: tuple[int, ...],
        dtype: np.dtype,
        layer_axis: int | None,
        chunks: list[int] | None = None,
    ) -> ts.TensorStore:
        """Creates an output zarr array (its .zarray or zarr.json goes in the
        transaction), in the leaf's cast dtype if it has one; ``chunks`` (the
        source's) where given, else whole (one layer thick on ``layer_axis``).
        zarr3 arrays take the codecs of the leaf's `template` (Orbax's own
        without one)."""
        assert self.kv is not None
        if leaf.cast is not None:
            dtype = leaf.cast
        if chunks is None or math.prod(chunks) * np.dtype(dtype).itemsize > _MAX_CHUNK_BYTES:
            chunks = _choose_chunks(shape, dtype, layer_axis)
        if self.zarr3:
            zarray = await _zarr3_metadata(
                leaf.template, list(shape), np.dtype(dtype), chunks, cast=leaf.cast is not None
            )
        else:
            zarray = dict(_zarr_template(dtype), shape=list(shape), chunks=chunks)
        leaf.chunks = chunks
        kv = self.kv.copy()
        kv.path = f"{leaf.name}/"
        await self.kv.with_transaction(lane.transaction()).write(
            f"{leaf.name}/{_meta_file(zarray)}", _zarray_bytes(zarray)
        )
        # assume_metadata: the array's metadata is the one written just above.
        spec = {
            "driver": "zarr3" if self.zarr3 else "zarr",
            "metadata": zarray,
            "store_data_equal_to_fill_value": True,
            "recheck_cached_data": False,
            "recheck_cached_metadata": False,
        }
        return await ts.open(
            spec, kvstore=kv, open=True, assume_metadata=True, context=self.context
        )

    async def put(
        self,
        lane: _Lane,
        leaf: _Leaf,
        arr: ts.TensorStore,
        index: tuple[Any, ...],
        data: np.ndarray,
        progress: Progress | None,
    ) -> None:
        """Writes ``arr[index] = data`` in the current transaction (cast to
        the leaf's dtype first, if it has one)."""
        if leaf.cast is not None:
            data = data.astype(leaf.cast)
        try:
            await arr.with_transaction(lane.transaction())[index].write(data)
        except Exception as e:
            raise FormatError(f"{self.path}: cannot write output leaf {leaf.name!r}: {e}") from e
        lane.nbytes += data.nbytes
        if lane.nbytes >= _BATCH_BYTES:
            await self.flush(lane, progress)

    async def flush(self, lane: _Lane, progress: Progress | None) -> None:
        """Starts committing the lane's transaction once fewer than `_INFLIGHT`
        commits are in flight. The wait comes first, and the caller holds its
        share of the decode budget through it: jobs whose data waits
        uncommitted are bounded by the budget, not by the number of leaves."""
        if lane.txn is None:
            return
        txn, done = lane.txn, lane.nbytes
        lane.txn, lane.nbytes = None, 0
        while len(self.inflight) >= _INFLIGHT:
            await self.inflight.pop(0)
        # The commit's own future, not a coroutine around it: a task cancelled
        # before it starts (an error elsewhere) would leave that coroutine
        # "never awaited" (a CI run printed the RuntimeWarning).
        self.inflight.append(asyncio.ensure_future(self._commit(txn.commit_async(), progress, done)))

    async def drain(self) -> None:
        """Waits for every commit."""
        try:
            while self.inflight:
                await self.inflight.pop(0)
        finally:
            for f in self.inflight:
                f.cancel()

    async def decode_job(self, src: _Source, job: _DecodeJob, progress: Progress | None) -> None:
        """Computes a job's output leaves by decoding source arrays, in a
        transaction lane of its own (jobs run concurrently)."""
        lane = _Lane()
        await self._decode_job(lane, src, job, progress)
        await self.flush(lane, progress)

    async def _decode_job(
        self, lane: _Lane, src: _Source, job: _DecodeJob, progress: Progress | None
    ) -> None:
        if job.kind == "value":
            leaf = job.leaves[0]
            value = leaf.value
            if isinstance(value, Deferred) and value.parts is not None:
                # Another format's stack: one layer in memory at a time, and
                # layer-thick chunks, so that unstacking it is a chunk copy.
                arr = await self.create(lane, leaf, value.shape, value.dtype, value.axis)
                lead = (slice(None),) * value.axis
                for layer, part in enumerate(value.parts):
                    data = np.asarray(part()).astype(value.dtype, copy=False)
                    await self.put(lane, leaf, arr, (*lead, layer), data, progress)
                    del data
                return
            data = np.asarray(value.read() if isinstance(value, Deferred) else value)
            arr = await self.create(lane, leaf, data.shape, data.dtype, None)
            await self.put(lane, leaf, arr, (), data, progress)
        elif job.kind == "ref":
            await self._decode_ref(lane, src, job.leaves[0], progress)
        elif job.kind == "stack":
            leaf = job.leaves[0]
            value: Stack = leaf.value
            arr = await self.create(lane, leaf, value.shape, value.dtype, value.axis)
            lead = (slice(None),) * value.axis
            for layer, part in enumerate(value.parts):
                # One part in memory at a time.
                data = (await src.read_region(part.source, ())).astype(value.dtype, copy=False)
                await self.put(lane, leaf, arr, (*lead, layer), data, progress)
        else:
            await self._decode_slices(lane, src, job, progress)

    async def _decode_ref(
        self, lane: _Lane, src: _Source, leaf: _Leaf, progress: Progress | None
    ) -> None:
        """Writes a Ref by decoding it one chunk-thick slab (on axis 0) at a
        time, in the source's chunk shape: memory holds one slab (the whole
        leaf only when it was saved as one chunk), and a cast leaf is cast
        slab by slab."""
        ref: Ref = leaf.value
        src_arr = await src.open_array(ref.source)
        shape = tuple(int(d) for d in src_arr.shape)
        # The stored chunks (zarr3: shards; zarr2 has read chunk = write chunk).
        read_chunk = src_arr.chunk_layout.write_chunk.shape
        chunks = (
            [int(c) for c in read_chunk]
            if read_chunk is not None and len(read_chunk) == len(shape) and all(read_chunk)
            else None
        )
        arr = await self.create(lane, leaf, shape, ref.dtype, None, chunks)
        if not shape or chunks is None or chunks[0] >= shape[0]:
            whole = await self._read(src, src_arr, ref.source, (), lock=False)
            await self.put(lane, leaf, arr, (), whole, progress)
            return
        for start in range(0, shape[0], chunks[0]):
            index = (slice(start, min(shape[0], start + chunks[0])),)
            slab = await self._read(src, src_arr, ref.source, index)
            await self.put(lane, leaf, arr, index, slab, progress)
            del slab

    async def _read(
        self, src: _Source, src_arr: ts.TensorStore, name: str, index: tuple[Any, ...],
        *, lock: bool = True,
    ) -> np.ndarray:
        """``src_arr[index]``; with ``lock``, one such slab decodes at a time."""
        try:
            async with self.read_lock if lock else contextlib.nullcontext():
                return np.asarray(await src_arr[index].read())
        except Exception as e:
            raise FormatError(
                f"{src.path}: cannot read array {name!r}: {e}. "
                "The checkpoint looks incomplete or damaged: check that its save finished and that it was copied whole."
            ) from e

    async def _stream_slices(
        self, lane: _Lane, src: _Source, job: _DecodeJob, progress: Progress | None
    ) -> bool:
        """`_decode_slices` by streaming a source saved as one zstd chunk
        (`_StreamPlan`); False where the chunk is absent and the source's fill
        value is what it holds (TensorStore then reads it, for nothing)."""
        plan = job.stream
        assert plan is not None
        first: Slice = job.leaves[0].value
        name, axis = first.source.source, first.axis
        by_index: dict[int, list[_Leaf]] = {}
        for leaf in job.leaves:
            by_index.setdefault(leaf.value.index, []).append(leaf)
        kv = await src.kvstore()

        def damage(what: str) -> FormatError:
            return FormatError(
                f"{src.path}: chunk {plan.key} of leaf {name!r} {what}. "
                "The checkpoint looks incomplete or damaged: check that its save finished and that it was copied whole."
            )

        try:
            found = await kv.read(plan.key, byte_range=slice(0, 0))
        except Exception as e:
            raise damage(f"cannot be read: {e}") from e
        if found.state != "value":
            if src.raise_missing:
                raise damage("is missing, so Orbax cannot read this array either")
            return False
        try:
            span = await self._stream_span(kv, plan)
        except zstd_stream.Damage as e:
            raise damage(str(e)) from e
        if span is None:
            return False  # a shard whose inner chunk is left out: the fill value
        start, size = span

        def fetch(a: int, b: int) -> Any:
            return kv.read(plan.key, byte_range=slice(a, b))

        shape, dtype, total = plan.shape, plan.dtype, math.prod(plan.shape) * plan.dtype.itemsize
        n = shape[axis]
        wanted = sorted(by_index)
        part_shape = shape[:axis] + shape[axis + 1 :]
        rows = math.prod(shape[:axis])
        piece = math.prod(shape[axis + 1 :])
        layer_bytes = rows * piece * dtype.itemsize
        per_pass = max(1, (plan.held - 2 * zstd_stream.BLOCK) // layer_bytes) if axis else n
        for g in range(0, len(wanted), per_pass):
            group = wanted[g : g + per_pass]
            stream = zstd_stream.Stream(
                zstd_stream.RangeSource(fetch, start, size), total, what=plan.what
            )
            try:
                if axis == 0:
                    scratch = None
                    for i in range(n):
                        if i not in by_index:
                            scratch = scratch if scratch is not None else np.empty(
                                min(layer_bytes, zstd_stream.BLOCK), np.uint8
                            )
                            await asyncio.to_thread(stream.skip, layer_bytes, scratch)
                            continue
                        part = np.empty(part_shape, dtype)
                        await asyncio.to_thread(stream.readinto, _raw(part))
                        for leaf in by_index[i]:
                            arr = await self.create(lane, leaf, part.shape, part.dtype, None)
                            await self.put(lane, leaf, arr, (), part, progress)
                        del part
                    await asyncio.to_thread(stream.finish)
                    continue
                outs = await asyncio.to_thread(_scatter_pass, stream, rows, n, piece, dtype, group)
            except zstd_stream.Damage as e:
                raise damage(str(e)) from e
            for i in group:
                part = outs.pop(i).reshape(part_shape)
                for leaf in by_index[i]:
                    arr = await self.create(lane, leaf, part.shape, part.dtype, None)
                    await self.put(lane, leaf, arr, (), part, progress)
                del part
        return True

    @staticmethod
    async def _stream_span(kv: ts.KvStore, plan: _StreamPlan) -> tuple[int, int] | None:
        """Where the zstd frames lie in the chunk's value: (start, size); None
        for a shard whose only inner chunk is left out."""
        if not plan.sharded:
            def read(a: int, b: int) -> bytes:
                return kv.read(plan.key, byte_range=slice(a, b)).result().value

            hint = math.prod(plan.shape) * plan.dtype.itemsize
            return 0, await asyncio.to_thread(zstd_stream.value_size, read, 0, hint)
        size = 16 + 4 * plan.index_crc
        try:
            index = (await kv.read(plan.key, byte_range=slice(-size, None))).value
        except ValueError as e:
            raise zstd_stream.Damage(
                f"is shorter than its shard index ({size} bytes): the file is truncated"
            ) from e
        if plan.index_crc and _crc32c(index[:16]) != int.from_bytes(index[16:], "little"):
            raise zstd_stream.Damage(
                "has a shard index whose checksum (crc32c) does not match: the file is truncated "
                "or overwritten"
            )
        offset, nbytes = (int(x) for x in np.frombuffer(index[:16], dtype="<u8"))
        if offset == _NO_CHUNK and nbytes == _NO_CHUNK:
            return None
        return offset, nbytes

    async def _decode_slices(
        self, lane: _Lane, src: _Source, job: _DecodeJob, progress: Progress | None
    ) -> None:
        """Writes Slices of one source, reading it one chunk-thick slab at a time.

        A slab is as thick as the source's chunks along the slice axis, so each
        source chunk is decoded once and memory holds one slab (the whole leaf
        when it was saved as one chunk), not the checkpoint.
        """
        if job.stream is not None and await self._stream_slices(lane, src, job, progress):
            return
        first: Slice = job.leaves[0].value
        name, axis = first.source.source, first.axis
        src_arr = await src.open_array(name)
        n = src_arr.shape[axis]
        thick = max(1, int(src_arr.chunk_layout.read_chunk.shape[axis] or 1))
        by_index: dict[int, list[_Leaf]] = {}
        for leaf in job.leaves:
            index = leaf.value.index
            if not 0 <= index < n:
                raise FormatError(
                    f"output leaf {leaf.name!r}: index {index} is out of range for {name!r} (length {n})"
                )
            by_index.setdefault(index, []).append(leaf)
        lead = (slice(None),) * axis
        for start in range(0, n, thick):
            wanted = [i for i in range(start, min(n, start + thick)) if i in by_index]
            if not wanted:
                continue
            try:
                # One slab decodes at a time (a decode briefly holds the
                # compressed and the decoded chunk); another job's layers are
                # encoded and written meanwhile.
                async with self.read_lock:
                    slab = np.asarray(
                        await src_arr[(*lead, slice(start, min(n, start + thick)))].read()
                    )
            except Exception as e:
                raise FormatError(f"{src.path}: cannot read array {name!r}: {e}") from e
            for i in wanted:
                part = np.take(slab, i - start, axis=axis)
                for leaf in by_index[i]:
                    arr = await self.create(lane, leaf, part.shape, part.dtype, None)
                    await self.put(lane, leaf, arr, (), part, progress)
            del slab

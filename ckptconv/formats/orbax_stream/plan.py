"""What to write for an output tree (`_Plan`), and the engines that write it.

Each leaf's value metadata is filled in (`_describe`), then the array leaves
are sorted into chunk moves (`chunk_ops`) and decode jobs (`decode`):
`_Plan._work`. `_Plan.write_data` runs the moves by the clone engine (the
source's database cloned and its keys renamed, `clone`; where
`_clone_refusal` allows) or by the copy engine (`_Destination.copy_chunks`),
then the decode jobs within a budget of decoded bytes; `_Plan.write_files`
writes Orbax's metadata files, the commit marker last.

Memory is bounded by `_BATCH_BYTES` of chunk data per transaction (two
transactions are in flight: one reading, one committing) plus, on the decode
path, one source leaf (TensorStore holds a chunk compressed and decoded while
it reads it, so a leaf saved as one chunk costs about 3x its size at peak);
a streamed leaf holds one layer on axis 0 (at most `_SCATTER_BYTES` of
layers on other axes) and two 4 MiB compressed blocks.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from ckptconv import storage
from ckptconv.errors import FormatError
from ckptconv.formats.orbax_stream import clone
from ckptconv.formats.orbax_stream.chunk_ops import _ChunkOp, _copy_ops, _slice_ops, _stack_ops
from ckptconv.formats.orbax_stream.damage import _peek_damage
from ckptconv.formats.orbax_stream.decode import _Budget, _DecodeJob, _stream_plan
from ckptconv.formats.orbax_stream.destination import Progress, _Destination
from ckptconv.formats.orbax_stream.files import (
    ARRAY_METADATAS_DIR,
    CHECKPOINT_METADATA_FILE,
    COMMIT_SUCCESS_FILE,
    METADATA_FILE,
    SHARDING_FILE,
    STRINGS_FILE,
    _b64,
    _fsync,
    _fsync_tree,
    _write_file,
)
from ckptconv.formats.orbax_stream.leaves import _flatten, _Leaf, _refs
from ckptconv.formats.orbax_stream.metadata_read import (
    _EMPTY_TYPES,
    _meta_chunks,
    _meta_dtype,
    _meta_file,
    _zarr_dtype,
)
from ckptconv.formats.orbax_stream.metadata_write import _edit_partition_spec, _zarray_bytes
from ckptconv.formats.orbax_stream.runner import _gather
from ckptconv.formats.orbax_stream.source import _base_spec, _Source
from ckptconv.lazy import LAZY, Cast, Deferred, Ref, Slice, Stack

# Decoded bytes that concurrent decode jobs may hold together (one job
# always runs, whatever its size). Each job's bytes are held about 2.5 times
# at peak (decoded source, cast or encoded copy, the uncommitted
# transaction): measured with bench/export_bench.py, 256 MB gave 625 MB of
# RSS and 64 MB 265 MB, at the same speed within 3%.
_DECODE_BUDGET = 64 << 20

# Streamed decode jobs at once: one per core of the 2-core machines this was
# measured on (libzstd releases the GIL; TensorStore encodes in its own threads).
_STREAM_JOBS = 2

# The clone engine (clone.py) is used only where OUT references all but
# this fraction of the source's chunk bytes: the rest would stay alive in
# OUT's shared data files after IN is deleted (see `_Plan._clone_refusal`).
_MAX_DEAD_FRACTION = 0.01

#: ``CKPTCONV_CLONE=0`` writes every output by the chunk-copy engine (`_Plan._copy`),
#: as conversions the clone refuses are written: for comparisons and benchmarks.
CLONE = os.environ.get("CKPTCONV_CLONE", "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass
class _Work:
    """The array leaves sorted: chunk moves, metadata to write, decode jobs."""

    ops: list[_ChunkOp]
    #: ``<name>/.zarray`` (or ``zarr.json``) -> its bytes, for every moved leaf.
    meta_values: dict[str, bytes]
    jobs: list[_DecodeJob]
    #: The zarr metadata of every source array a lazy leaf refers to.
    zarrays: dict[str, dict[str, Any]]
    #: Every source array's zarr metadata (the clone engine reads them).
    source_arrays: dict[str, dict[str, Any]] = field(default_factory=dict)

    def kept(self) -> set[str]:
        """Source arrays that stay where they are: a leaf moved whole under
        its own name (an unchanged `Ref`)."""
        moved: dict[str, bool] = {}
        for op in self.ops:
            name = op.dst_key[: len(op.leaf)]
            same = op.src_key == op.dst_key and name == op.leaf
            moved[op.leaf] = moved.get(op.leaf, True) and same
        return {name for name, same in moved.items() if same}


class _Plan:
    """What to write for an out_tree: chunk copies, decode jobs, metadata."""

    def __init__(self, src: _Source, out_tree: Any) -> None:
        self.src = src
        if isinstance(out_tree, LAZY) or not isinstance(out_tree, (Mapping, list, tuple)):
            raise FormatError(
                "an Orbax checkpoint's tree must be a dict or a list at the top, not a single leaf"
            )
        self.leaves = [_Leaf(keys, value) for keys, value in _flatten(out_tree, ())]
        #: "clone" or "copy": the engine `write_data` used.
        self.engine = ""
        self.shared = clone.Shared()
        for leaf in self.leaves:
            if isinstance(leaf.value, Cast):
                if isinstance(leaf.value.value, Cast):
                    raise FormatError(f"output leaf {leaf.name!r}: a cast of a cast")
                leaf.cast, leaf.value = np.dtype(leaf.value.dtype), leaf.value.value
        seen: set[str] = set()
        for leaf in self.leaves:
            if leaf.name in seen:
                raise FormatError(
                    f"two leaves of the output tree have the same Orbax name {leaf.name!r}"
                )
            seen.add(leaf.name)
        self.strings: dict[str, str] = {}
        for leaf in self.leaves:
            self._describe(leaf)

    def _describe(self, leaf: _Leaf) -> None:
        """Fills a leaf's Orbax value metadata (everything but chunk shapes)."""
        value = leaf.value
        if isinstance(value, LAZY):
            self._describe_lazy(leaf)
        elif isinstance(value, Deferred):
            # Another format's leaf: read when its job runs, one at a time.
            leaf.value_type = "np.ndarray"
        elif value is None or (isinstance(value, (Mapping, list, tuple)) and not value):
            # Orbax's empty-value type names (`metadata.empty_values`).
            leaf.value_type = (
                "None" if value is None
                else "List" if isinstance(value, list)
                else "Tuple" if isinstance(value, tuple)
                else "Dict"
            )  # fmt: skip
            leaf.skip_deserialize = True
        elif isinstance(value, str):
            leaf.value_type = "string"
            self.strings[leaf.name] = value
        elif isinstance(value, (bool, int, float)) and not isinstance(value, np.generic):
            # Orbax's ScalarHandler: a 0-d array restored with `.item()`.
            leaf.value_type = "scalar"
            leaf.value = np.asarray(value)
        else:
            try:
                array = np.asarray(value)
            except Exception as e:
                raise FormatError(
                    f"output leaf {leaf.name!r}: cannot write a {type(value).__name__}: {e}"
                ) from e
            # ml_dtypes (bfloat16, float8) have kind "V" too, but not type np.void.
            if array.dtype.kind in "OUS" or array.dtype.type is np.void:
                raise FormatError(
                    f"output leaf {leaf.name!r}: cannot write a {type(value).__name__} as an array"
                )
            leaf.value = array

    def _describe_lazy(self, leaf: _Leaf) -> None:
        value = leaf.value
        if isinstance(value, Ref):
            meta = self.src.value_metadata(value.source)
            leaf.value_type = meta.get("value_type", "np.ndarray")
            leaf.write_shape = meta.get("write_shape")
            if leaf.value_type == "jax.Array":
                leaf.sharding = self.src.sharding(value.source)
                leaf.ext_metadata = (self.src.array_metadata(value.source) or {}).get(
                    "ext_metadata"
                )
            return
        if isinstance(value, Stack):
            if not value.parts:
                raise FormatError(f"output leaf {leaf.name!r}: a stack of no arrays")
            for part in value.parts:
                if not isinstance(part, Ref):
                    raise FormatError(
                        f"output leaf {leaf.name!r}: stack parts must be Refs, not {type(part).__name__}"
                    )
                if part.shape != value.parts[0].shape:
                    raise FormatError(
                        f"output leaf {leaf.name!r}: cannot stack {part.source!r} of shape {part.shape} "
                        f"with {value.parts[0].source!r} of shape {value.parts[0].shape}"
                    )
            source, axis = value.parts[0].source, value.axis
            if not 0 <= axis <= len(value.parts[0].shape):
                raise FormatError(f"output leaf {leaf.name!r}: stack axis {axis} is out of range")
        else:
            if not isinstance(value.source, Ref):
                raise FormatError(f"output leaf {leaf.name!r}: a slice must be of a Ref")
            source, axis = value.source.source, value.axis
            if not 0 <= axis < len(value.source.shape):
                raise FormatError(
                    f"output leaf {leaf.name!r}: slice axis {axis} is out of range for {source!r} of shape "
                    f"{value.source.shape}"
                )
            if not 0 <= value.index < value.source.shape[axis]:
                raise FormatError(
                    f"output leaf {leaf.name!r}: index {value.index} is out of range for {source!r} "
                    f"(length {value.source.shape[axis]} on axis {axis})"
                )
        meta = self.src.value_metadata(source)
        value_type = meta.get("value_type", "np.ndarray")
        # A stack of python scalars is an array; other types keep their kind.
        leaf.value_type = "np.ndarray" if value_type == "scalar" else value_type
        if leaf.value_type != "jax.Array":
            return
        write_shape = meta.get("write_shape")
        sharding = self.src.sharding(source)
        if isinstance(value, Stack):
            if write_shape is not None:
                write_shape = [*write_shape[:axis], len(value.parts), *write_shape[axis:]]
            sharding = _edit_partition_spec(sharding, axis, insert=True)
        else:
            if write_shape is not None:
                write_shape = [*write_shape[:axis], *write_shape[axis + 1 :]]
            sharding = _edit_partition_spec(sharding, axis, insert=False)
        if sharding is None:
            # Orbax cannot restore a jax.Array without a sharding when no
            # target is given; a numpy leaf restores everywhere.
            leaf.value_type = "np.ndarray"
            return
        leaf.write_shape = write_shape
        leaf.sharding = sharding
        leaf.ext_metadata = (self.src.array_metadata(source) or {}).get("ext_metadata")

    # -- data ---------------------------------------------------------------

    async def write_data(
        self, tmp: Path, progress: Progress | None, *, sync: bool, share: bool = False,
        work: _Work | None = None,
    ) -> None:
        """Writes every array's chunks into an OCDBT store under `tmp`: a clone
        of the source's database whose keys are renamed (where
        `_clone_refusal` allows it), else a new store the chunks are copied
        into. The clone's data files are IN's (``share``: hard links where
        the filesystem allows) or whole-file copies of them (``--copy``:
        ``copy_file_range``, as ``cp`` copies)."""
        work = work if work is not None else await self._work()
        self.engine = "copy"
        # The clone shares or copies data files on one filesystem: a bucket on
        # either side takes the chunk-copy engine.
        local = not storage.is_bucket(tmp) and not storage.is_bucket(self.src.path)
        if CLONE and local and await self._clone_refusal(work) is None:
            self.engine = "clone"
            self.shared = clone.share_database(self.src.path, tmp, link=share)
        dst = _Destination(
            tmp, self.src.context, sync=sync, zarr3=self.src.use_zarr3,
            existing=self.engine == "clone",
        )
        await dst.open()
        try:
            if self.engine == "clone":
                await self._rename(dst, work, progress)
            else:
                await self._copy(dst, work, progress)
            await self._decode(dst, work, progress)
        finally:
            await dst.close()

    # -- several processes (ckptconv.multihost) -------------------------------

    async def write_share(
        self, tmp: Path, process_id: int, num_processes: int, progress: Progress | None,
        *, sync: bool, share: bool,
    ) -> dict[str, Any]:
        """One process's part of a multi-process write into the item
        directory ``tmp`` (which process 0 created): returns what process 0
        needs to merge it (`merge_shares`).

        The clone engine is metadata-only (a database cloned, its keys
        renamed: seconds whatever the size), so splitting it buys nothing and
        would need N clones merged: process 0 alone does it, exactly as one
        process would, and the others write nothing. Every process decides
        the engine from the same metadata, so all agree unasked.

        Otherwise (the chunk-copy engine, decode jobs) the output's array
        leaves are assigned to processes by bytes (`multihost.assign`; a
        "slices" job, several outputs of one decoded source, is one unit so
        that no source is decoded twice), and each process writes its leaves'
        chunks and ``.zarray`` files into its own OCDBT database
        ``tmp/ocdbt.process_<i>/``, as Orbax's multi-host save does.
        """
        from ckptconv.multihost import assign

        work = await self._work()
        self.engine = "copy"
        local = not storage.is_bucket(tmp) and not storage.is_bucket(self.src.path)
        if CLONE and local and await self._clone_refusal(work) is None:
            self.engine = "clone"
            if process_id == 0:
                await self.write_data(tmp, progress, sync=sync, share=share, work=work)
            return {"engine": self.engine, "chunks": {}}
        units: dict[str, int] = {}
        for op in work.ops:
            units[op.leaf] = units.get(op.leaf, 0) + op.cost
        job_names = [f"job:{','.join(leaf.name for leaf in job.leaves)}" for job in work.jobs]
        for name, job in zip(job_names, work.jobs):
            units[name] = job.nbytes
        owner = assign(list(units.items()), num_processes)
        mine_ops = [op for op in work.ops if owner[op.leaf] == process_id]
        mine_leaves = {op.leaf for op in mine_ops}
        mine_jobs = [job for name, job in zip(job_names, work.jobs) if owner[name] == process_id]
        mine = _Work(
            mine_ops,
            {k: v for k, v in work.meta_values.items() if k.rsplit("/", 1)[0] in mine_leaves},
            mine_jobs, work.zarrays,
        )
        dst = _Destination(
            tmp / f"ocdbt.process_{process_id}", self.src.context, sync=sync,
            zarr3=self.src.use_zarr3,
        )
        await dst.open()
        try:
            await self._copy(dst, mine, progress)
            await self._decode(dst, mine, progress)
        finally:
            await dst.close()
        written = sorted(mine_leaves | {leaf.name for job in mine_jobs for leaf in job.leaves})
        return {"engine": self.engine, "leaves": written,
                "chunks": {leaf.name: leaf.chunks for job in mine_jobs for leaf in job.leaves}}

    async def merge_shares(self, tmp: Path, shares: list[dict[str, Any]], *, sync: bool) -> None:
        """Process 0, once every process has written its share: each
        process database is copied into the item's root database by
        reference (``experimental_copy_range_to``; the data files stay in
        ``ocdbt.process_<i>/d/`` and the root's B-tree points at them, as
        Orbax's ``merge_ocdbt_per_process_files`` leaves them), all in one
        ``ts.Context``; the decode-path leaves' chunk shapes come from the
        process that wrote them."""
        if self.engine == "clone":
            return
        by_name = {leaf.name: leaf for leaf in self.leaves}
        for got in shares:
            for name, chunks in got.get("chunks", {}).items():
                by_name[name].chunks = chunks
        root = _Destination(tmp, self.src.context, sync=sync, zarr3=self.src.use_zarr3)
        await root.open()
        assert root.kv is not None
        try:
            children = []
            for i in range(len(shares)):
                child = tmp / f"ocdbt.process_{i}"
                if not (child / "manifest.ocdbt").exists():
                    continue  # a process with no leaf to write
                # Orbax's spec for a process database (its base as the
                # root's, with the same file locking mode): a reference copy
                # needs the child's files under the root's base kvstore. On a
                # bucket (no file locks) the copy is by reference too: OCDBT
                # only writes the root's B-tree, pointing at the child's
                # objects, so no data travels.
                base = _base_spec(child)
                if not storage.is_bucket(child):
                    base = {**base, "file_io_locking": {"mode": "non_atomic"}}
                children.append(await ts.KvStore.open(
                    {"driver": "ocdbt", "base": base, "manifest": _base_spec(child),
                     "cache_pool": "cache_pool#ocdbt"},
                    context=self.src.context,
                ))
            try:
                await _gather(*(c.experimental_copy_range_to(root.kv) for c in children))
            except Exception as e:
                raise FormatError(f"{tmp}: merging the processes' databases failed: {e}") from e
        finally:
            await root.close()

    async def _work(self) -> _Work:
        """Sorts the array leaves into chunk moves and decode jobs (reads the
        source arrays' zarr metadata, no chunk)."""
        array_leaves = [
            leaf for leaf in self.leaves if isinstance(leaf.value, (*LAZY, Deferred, np.ndarray))
        ]
        lazy_sources = sorted(
            {
                ref.source
                for leaf in array_leaves
                if isinstance(leaf.value, LAZY)
                for ref in _refs(leaf.value)
            }
        )
        zarrays: dict[str, dict[str, Any]] = {}
        if lazy_sources:
            got = await _gather(*(self.src.zarr_meta(name) for name in lazy_sources))
            zarrays = dict(zip(lazy_sources, got))
        ops: list[_ChunkOp] = []
        jobs: list[_DecodeJob] = []
        slices: dict[tuple[str, int], _DecodeJob] = {}
        zarray_writes: list[tuple[str, dict[str, Any]]] = []

        def decode_slice(leaf: _Leaf, value: Slice) -> None:
            slices.setdefault((value.source.source, value.axis), _DecodeJob("slices")).leaves.append(leaf)

        for leaf in array_leaves:
            value = leaf.value
            if isinstance(value, LAZY):
                for ref in _refs(value):
                    self._check_ref(leaf, ref, zarrays.get(ref.source))
                # The decode path writes zarr3 arrays with their source's codecs.
                leaf.template = zarrays[_refs(value)[0].source] if self.src.use_zarr3 else None
            if isinstance(value, (np.ndarray, Deferred)):
                jobs.append(_DecodeJob("value", [leaf]))
            elif leaf.cast is not None:
                # Decoded: a cast changes every chunk's bytes.
                if isinstance(value, Slice):
                    decode_slice(leaf, value)
                else:
                    jobs.append(_DecodeJob("ref" if isinstance(value, Ref) else "stack", [leaf]))
            elif isinstance(value, Ref):
                zarray = zarrays[value.source]
                leaf.chunks = _meta_chunks(zarray)
                zarray_writes.append((leaf.name, zarray))
                ops.extend(_copy_ops(leaf, value.source, zarray, value.nbytes))
            elif isinstance(value, Stack):
                got = _stack_ops(leaf, value, [zarrays[p.source] for p in value.parts])
                if got is None:
                    jobs.append(_DecodeJob("stack", [leaf]))
                else:
                    zarray, stack_ops = got
                    leaf.chunks = _meta_chunks(zarray)
                    zarray_writes.append((leaf.name, zarray))
                    ops.extend(stack_ops)
            else:
                got = _slice_ops(leaf, value, zarrays[value.source.source])
                if got is None:
                    decode_slice(leaf, value)
                else:
                    zarray, slice_ops = got
                    leaf.chunks = _meta_chunks(zarray)
                    zarray_writes.append((leaf.name, zarray))
                    ops.extend(slice_ops)
        jobs.extend(slices.values())
        meta_values = {f"{name}/{_meta_file(z)}": _zarray_bytes(z) for name, z in zarray_writes}
        return _Work(ops, meta_values, jobs, zarrays)

    async def _copy(self, dst: _Destination, work: _Work, progress: Progress | None) -> None:
        """The chunk-copy engine: reads every compressed chunk and writes it
        into the new store, checking it for damage on the way."""
        # Metadata files are tiny: write them in the first batch of chunk copies.
        meta_ops = [_ChunkOp("", key, 0, 0, key.rsplit("/", 1)[0]) for key in work.meta_values]
        if meta_ops or work.ops:
            await dst.copy_chunks(
                await self.src.kvstore(), self.src.path, meta_ops + work.ops, work.meta_values,
                progress, missing_is_damage=self.src.raise_missing,
            )

    async def _decode(self, dst: _Destination, work: _Work, progress: Progress | None) -> None:
        # Jobs run concurrently within a budget of decoded bytes: one decodes
        # its source while another's layers are encoded and written, so both
        # cores work on small leaves; a leaf bigger than the budget runs alone,
        # so memory stays near one leaf, never the checkpoint.
        # A stack saved as one zstd chunk is streamed (`_StreamPlan`): it holds
        # about one layer, so such jobs run side by side, one per core.
        budget = _Budget(_DECODE_BUDGET)
        streams = asyncio.Semaphore(_STREAM_JOBS)

        async def run(job: _DecodeJob) -> None:
            if job.kind == "slices":
                job.stream = _stream_plan(job, work.zarrays.get(job.leaves[0].value.source.source))
            if job.stream is None:
                async with budget.hold(job.nbytes):
                    await dst.decode_job(self.src, job, progress)
                return
            async with streams, budget.hold(job.stream.held):
                await dst.decode_job(self.src, job, progress)

        await asyncio.gather(*(run(job) for job in work.jobs))
        await dst.drain()

    # -- the clone engine -----------------------------------------------------

    async def _source_arrays(self) -> dict[str, dict[str, Any]]:
        """The zarr metadata of every array the source holds."""
        names = [
            name for name, meta in self.src.entries.items()
            if meta.get("value_type") in ("jax.Array", "np.ndarray", "scalar")
            and not meta.get("skip_deserialize")
        ]
        got = await _gather(*(self.src.zarr_meta(name) for name in names))
        return dict(zip(names, got))

    async def _clone_refusal(self, work: _Work) -> str | None:
        """Why this output cannot be a clone of the source's database with
        renamed keys; None when it can.

        Refused: a source without OCDBT (pre-OCDBT Orbax); an output array
        whose name the source uses for another array (the rename would have
        to delete and write one key range in one transaction); and an output
        that leaves more than `_MAX_DEAD_FRACTION` of the source's chunk bytes
        unreferenced (casts, ``--only`` of a small part, unstacking a stack
        saved as one chunk): a clone would keep those bytes alive in OUT's
        shared data files once IN is deleted, so such an output is written
        by the copy engine, whose files hold only what OUT holds.
        """
        if not self.src.use_ocdbt or self.src.path is None:
            return "the source is not an OCDBT database"
        sources = await self._source_arrays()
        work.source_arrays = sources
        kept = work.kept()
        clash = sorted(
            leaf.name for leaf in self.leaves
            if leaf.name in sources and leaf.name not in kept
            and isinstance(leaf.value, (*LAZY, Deferred, np.ndarray))
        )
        if clash:
            return f"output array {clash[0]!r} has the name of another source array"
        total = 0
        for name, z in sources.items():
            chunks = _meta_chunks(z)
            count = math.prod(math.ceil(s / c) for s, c in zip(z["shape"], chunks))
            total += count * math.prod(chunks) * _zarr_dtype(_meta_dtype(z), self.src.path, name).itemsize
        referenced = {op.src_key: op.cost for op in work.ops}
        dead = total - sum(referenced.values())
        if dead > _MAX_DEAD_FRACTION * total:
            return (
                f"{dead} of the source's {total} chunk bytes would be unreferenced "
                f"(more than {_MAX_DEAD_FRACTION:.0%})"
            )
        return None

    async def _rename(self, dst: _Destination, work: _Work, progress: Progress | None) -> None:
        """The clone engine: in OUT's clone of the source database, every
        chunk move becomes a key copied by reference, the new arrays'
        metadata is written, and the source arrays OUT does not keep are
        deleted (one transaction)."""
        assert dst.kv is not None
        kept = work.kept()
        moves = [(op.src_key, op.dst_key) for op in work.ops if op.src_key != op.dst_key]
        if self.src.raise_missing and moves:
            # The source says it stores every chunk: a missing one is damage
            # (Orbax refuses the array), found from the B-tree's keys alone.
            present = {k.decode() for k in await dst.kv.list()}
            for op in work.ops:
                if op.src_key not in present:
                    raise FormatError(
                        f"{self.src.path}: chunk {op.src_key} of leaf {op.leaf!r} is missing, so "
                        "Orbax cannot read this array either. The checkpoint is incomplete: "
                        "check that its save finished and that it was copied whole."
                    )
        # Damage is looked for as the copy engine does, reading only the few
        # bytes each check needs (`_peek_damage`).
        src_kv = await self.src.kvstore()
        damages = await _gather(*(_peek_damage(src_kv, op) for op in work.ops))
        for op, damage in zip(work.ops, damages):
            if damage is not None:
                raise FormatError(
                    f"{self.src.path}: chunk {op.src_key} of leaf {op.leaf!r} {damage}. "
                    "Copy the checkpoint again."
                )
        writes = {k: v for k, v in work.meta_values.items() if k.rsplit("/", 1)[0] not in kept}
        drops = [f"{name}/" for name in work.source_arrays if name not in kept]
        try:
            await clone.rename_keys(dst.kv, moves, writes, drops)
        except FormatError:
            raise
        except Exception as e:
            raise FormatError(f"{dst.path}: renaming the cloned database's keys failed: {e}") from e
        if progress is not None:
            done = sum(op.done for op in work.ops)
            if done:
                progress(done)

    def _check_ref(self, leaf: _Leaf, ref: Ref, zarray: dict[str, Any] | None) -> None:
        meta = self.src.value_metadata(ref.source)
        if meta.get("skip_deserialize") or meta.get("value_type") in _EMPTY_TYPES | {"string"}:
            raise FormatError(
                f"output leaf {leaf.name!r}: {self.src.path} holds no array named {ref.source!r} "
                f"(it is a {meta.get('value_type')} leaf)"
            )
        if zarray is not None and list(zarray.get("shape", [])) != list(ref.shape):
            raise FormatError(
                f"output leaf {leaf.name!r}: array {ref.source!r} in {self.src.path} has shape "
                f"{tuple(zarray.get('shape', []))}, not {tuple(ref.shape)} as the tree says; re-read the checkpoint"
            )

    # -- metadata files -------------------------------------------------------

    def write_files(self, tmp: Path, dst: Path, *, sync: bool, commit: bool = True) -> None:
        """Writes Orbax's metadata files into `tmp`; the commit marker last
        (unless ``commit`` is false: the caller writes it)."""
        if self.strings:
            _write_file(tmp / STRINGS_FILE, json.dumps(self.strings).encode())
        jax_leaves = [leaf for leaf in self.leaves if leaf.value_type == "jax.Array"]
        if jax_leaves:
            entries = []
            for leaf in jax_leaves:
                shape = list(leaf.value.shape)
                entries.append(
                    {
                        "array_metadata": {
                            "param_name": leaf.name,
                            "write_shape": leaf.write_shape
                            if leaf.write_shape is not None
                            else shape,
                            "chunk_shape": leaf.chunks,
                            "ext_metadata": leaf.ext_metadata,
                        }
                    }
                )
            (tmp / ARRAY_METADATAS_DIR).mkdir()
            data = json.dumps({"array_metadatas": entries}).encode()
            _write_file(tmp / ARRAY_METADATAS_DIR / "process_0", data)
            shardings = {
                _b64(leaf.name): leaf.sharding for leaf in jax_leaves if leaf.sharding is not None
            }
            _write_file(tmp / SHARDING_FILE, json.dumps(shardings).encode())
        metadata = {
            k: v
            for k, v in self.src.metadata.items()
            if k not in ("tree_metadata", "value_metadata_tree")
        }
        tree_metadata = {
            str(tuple(k for k, _ in leaf.keys)): leaf.metadata_entry() for leaf in self.leaves
        }
        metadata = {
            "tree_metadata": tree_metadata,
            **metadata,
            "use_ocdbt": True,
            # Every array keeps the source's zarr version (Orbax reads all of
            # an item's arrays with one driver).
            "use_zarr3": self.src.use_zarr3,
            # Chunks are copied as they are: a source that left out
            # fill-value chunks (older Orbax) gives an output that does too,
            # so the output must say so, or Orbax refuses the missing chunks.
            "store_array_data_equal_to_fill_value": self.src.raise_missing,
            "custom_metadata": self.src.metadata.get("custom_metadata"),
        }
        _write_file(tmp / METADATA_FILE, json.dumps(metadata).encode())
        checkpoint_metadata = (
            self.src.path / CHECKPOINT_METADATA_FILE if self.src.path is not None else None
        )
        if checkpoint_metadata is not None and checkpoint_metadata.exists():
            _write_file(tmp / CHECKPOINT_METADATA_FILE, checkpoint_metadata.read_bytes())
        if sync:
            _fsync_tree(tmp)
        if not commit:
            return
        # Last: Orbax's commit marker (`CommitFileTemporaryPath`); the rename
        # that follows is the marker for `AtomicRenameTemporaryPath`.
        _write_file(
            tmp / COMMIT_SUCCESS_FILE, f"Checkpoint commit was successful to {dst}".encode()
        )
        if sync:
            _fsync(tmp / COMMIT_SUCCESS_FILE)
            _fsync(tmp)

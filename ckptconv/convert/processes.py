"""`convert` as one of several processes of a ``jax.distributed`` program: each
writes its share of the leaves into its own ``ocdbt.process_<i>``, process 0
merges them by reference and commits (`_convert_processes`)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from ckptconv import formats, record, storage
from ckptconv.convert.output import _atomic_output, _bucket_output, _commit_bucket, _fsync_tree
from ckptconv.convert.plan import ItemPlan, Result, Selection, _planned
from ckptconv.convert.write import _copy_others
from ckptconv.errors import (
    CkptconvError,
    FormatError,
)
from ckptconv.formats.layout import Layout


def _convert_processes(
    processes: Any, src: Path, dst: Path, *, to: str | None, format: str | None,
    step: int | None, force: bool, dry_run: bool, progress: Any, fsync: bool,
    selection: Selection | None, like: Any, copy: bool, options: dict[str, Any],
) -> Result:
    """`convert` as one of several processes (`ckptconv.multihost.Processes`).

    Every process plans from the metadata (no array data read; the same plan
    in each). Process 0 creates the output as one process would: on disk a
    temporary directory beside OUT (``.OUT.ckptconv-tmp-<pid of process
    0>``, so a killed run's leftover is recognised and removed as for one
    process), on a bucket OUT's prefix itself (no rename there), and shares
    its path. For each item the conversion changes (one, or each item of a
    CheckpointManager step), every process writes its share of the leaves
    into the item's own ``ocdbt.process_<i>/`` database and process 0 merges
    them by reference (`write_processes`); items left as they are, and the
    step's other files, are copied by process 0. Process 0 then writes the
    metadata files and the commit markers last, stamps the record and
    renames the directory into place; a last sync point makes every process
    return only once OUT is in place.

    Any error in any process is told to the others (`Processes.fail`), which
    stop at their next sync point; a process that does not arrive (killed)
    stops the others after ``CKPTCONV_BARRIER_TIMEOUT`` seconds. Either way
    process 0 removes the temporary directory (on a bucket: what was written
    under OUT): no OUT, no commit marker.

    Supported: Orbax in, Orbax out (an item, a CheckpointManager step or
    root), on local or shared disk (every process must see the same paths)
    or a bucket; other formats are refused with one error.
    """
    me = processes.process_id
    bucket = storage.is_bucket(dst)
    try:
        result = _planned(src, dst, to, format, step, force, selection, like, options)
        layout, out_format = result.layout, result.out_format
        if layout.format != "orbax" or out_format != "orbax":
            raise CkptconvError(
                f"{src}: a multi-process conversion takes an Orbax checkpoint to Orbax, not "
                f"{layout.format} to {out_format}; run it as one process (without "
                "--num-processes)"
            )
        if dry_run:
            return result
        total = result.nbytes
        update = (lambda n: progress(n, total)) if progress else None
        rec = record.build(result, result.options)
        if me != 0:
            made_here = contextlib.nullcontext()
        else:
            made_here = _bucket_output(dst) if bucket else _atomic_output(dst, force)
        with made_here as made:
            if me == 0:
                _make_dirs(layout, result.items, made)
            (shared,) = {p for p in processes.sync("start", str(made) if me == 0 else None) if p}
            work_dir = storage.as_path(shared)
            _write_processes(layout, result.items, work_dir, processes, update, fsync, copy)
            if me == 0:
                record.stamp(work_dir, dst, to, rec)
                if bucket:
                    _commit_bucket(work_dir, layout)
                elif fsync:
                    _fsync_tree(work_dir)
        processes.sync("done")
    except BaseException as e:
        processes.fail(str(e) or type(e).__name__)
        if isinstance(e, OSError) and not isinstance(e, CkptconvError):
            raise FormatError(
                f"cannot write {dst}: {e.strerror or e}. Check that {dst.absolute().parent} is "
                "writable and has free space; nothing was written and the input is unchanged."
            ) from e
        raise
    result.written = True
    return result


def _item_dests(layout: Layout, items: list[ItemPlan], out: Path) -> list[tuple[ItemPlan, Path]]:
    if layout.kind in ("file", "item"):
        (item,) = items
        return [(item, out)]
    return [(item, layout.item_dest(item.name, out)) for item in items]


def _make_dirs(layout: Layout, items: list[ItemPlan], out: Path) -> None:
    """Process 0, before the others start writing: the output's folders (none
    on a bucket); the items the others write into exist before they do."""
    if storage.is_bucket(out):
        return
    out.mkdir()
    for item, dest in _item_dests(layout, items, out):
        if dest != out:
            (dest if item.out_tree is not None else dest.parent).mkdir(parents=True, exist_ok=True)


def _write_processes(
    layout: Layout, items: list[ItemPlan], out: Path, processes: Any, progress: Any,
    fsync: bool, copy: bool,
) -> None:
    """`_write_same_format` for Orbax as one of several processes: the items
    in the same order in every process (each is one sync point)."""
    from ckptconv.formats.orbax_stream.writer import write_processes

    fmt = formats.get("orbax")
    bucket = storage.is_bucket(out)
    extra = {"commit": False} if bucket else {}
    dests = _item_dests(layout, items, out)
    for item, dest in dests:
        if item.out_tree is not None:
            write_processes(
                _orbax_norm(item.source), item.out_tree, dest, processes, progress=progress,
                sync=fsync, share=not copy, **extra,
            )
    if processes.process_id != 0:
        return
    for item, dest in dests:
        if item.out_tree is None:
            fmt.copy_item(item.source, dest, copy, **extra)
    if layout.kind not in ("file", "item"):
        _copy_others(layout, out)


def _orbax_norm(path: Path) -> Path:
    return path if storage.is_bucket(path) else Path(os.path.abspath(path))

"""`write`: a complete item directory for an output tree, built under a
temporary name beside the destination (a name Orbax treats as unfinished),
its commit marker written last, and only then renamed into place."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from ckptconv import storage
from ckptconv.errors import OutputExistsError
from ckptconv.formats.orbax_stream.destination import Progress
from ckptconv.formats.orbax_stream.files import TMP_DIR_SUFFIX, _fsync
from ckptconv.formats.orbax_stream.plan import _Plan
from ckptconv.formats.orbax_stream.runner import _run
from ckptconv.formats.orbax_stream.source import _NoSource, _Source


def write(
    src_dir: str | os.PathLike,
    out_tree: Any,
    dst_dir: str | os.PathLike,
    *,
    progress: Progress | None = None,
    sync: bool = True,
    share: bool = False,
    commit: bool = True,
) -> str:
    """Writes a complete Orbax item directory holding `out_tree`.

    The output is built in ``<dst_dir>.orbax-checkpoint-tmp-<pid>-<ns>`` beside
    `dst_dir` (a name Orbax treats as unfinished), its ``commit_success.txt``
    is written last, and only then is it renamed to `dst_dir`. On any error the
    temporary directory is removed.

    Args:
      src_dir: the item directory that `out_tree`'s lazy leaves refer to;
        None when it has none (another format's `lazy.Deferred` leaves, read
        one at a time as the writer reaches them, and in-memory values).
      out_tree: nested dicts (any Mapping; keys are written as ``str(key)``),
        lists and tuples whose leaves are `Ref` (copied unchanged), `Stack`
        (``np.stack`` of its parts), `Slice` (``np.take``), ``None``, empty
        containers, strings (into ``_strings.json``), python scalars (as Orbax
        "scalar" leaves) or array values (numpy, jax: written as
        ``np.ndarray`` leaves).
      dst_dir: the directory to create; it must not exist. Missing parents are
        created.
      progress: called with a number of bytes (uncompressed output bytes)
        each time output data has been committed to disk.
      sync: fsync every output file before the commit marker is written (as
        Orbax's saves do), so that a finished output survives a power loss.
        False leaves write-back to the OS: faster where the disk is slower
        than the page cache.
      share: where the output is `src_dir`'s arrays moved by chunk (to-scan
        of layers, to-loop of layer-thick stacks, copies), clone `src_dir`'s
        OCDBT database and rename its keys (clone.py): OUT shares the
        source's data files (hard links, or whole-file copies across
        filesystems) and costs the metadata, whatever the checkpoint's size.
        Deleting either side is safe, and nothing ever writes into a data
        file. False (``--copy``): the same clone with every data file copied
        whole (``copy_file_range``), OUT's files its own. Outputs the clone
        refuses (casts, one-chunk stacks unstacked, a small ``--only``; see
        `_Plan._clone_refusal`), and every output under ``CKPTCONV_CLONE=0``,
        are written by the chunk-copy engine.

      commit: write the commit marker (``commit_success.txt``). False
        only for a bucket output whose caller writes the markers itself,
        after its own last edits (`ckptconv.convert` stamps its record first).

    On a bucket (``gs://``, ``s3://``; `ckptconv.storage.BucketPath`) there is
    no rename: the item is written straight under `dst_dir`, as Orbax writes
    on GCS (`CommitFileTemporaryPath`), with ``commit_success.txt`` last, so
    a reader (Orbax's, ckptconv's) takes it for a checkpoint only once it is
    complete; `dst_dir` must hold no object yet, and on any error or
    interrupt what was written under it is deleted (best effort). The
    clone engine needs one filesystem, so bucket outputs (and bucket inputs)
    take the chunk-copy engine: the data travels through this machine, in
    the same bounded memory as on local disk. ``sync`` does not apply.

    Returns:
      The engine used: ``"clone"`` or ``"copy"``.

    Raises:
      OutputExistsError: `dst_dir` exists.
      FormatError: `src_dir` is unreadable, a lazy leaf refers to an array it
        does not hold (or with another shape), or a leaf cannot be written.
    """
    if storage.is_bucket(dst_dir):
        return _write_bucket(src_dir, out_tree, storage.as_path(dst_dir), progress, commit)
    dst = Path(dst_dir).absolute()
    if dst.exists() or dst.is_symlink():
        raise OutputExistsError(f"{dst}: output already exists; remove it or choose another path")
    src = _Source(storage.as_path(src_dir)) if src_dir is not None else _NoSource()
    plan = _Plan(src, out_tree)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}{TMP_DIR_SUFFIX}-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir()
    try:
        _run(plan.write_data(tmp, progress, sync=sync, share=share))
        plan.write_files(tmp, dst, sync=sync)
        os.rename(tmp, dst)
        if sync:
            _fsync(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return plan.engine


def _write_bucket(
    src_dir: Any, out_tree: Any, dst: storage.BucketPath, progress: Progress | None, commit: bool
) -> str:
    """`write` to a bucket prefix: straight into place, the marker last."""
    if dst.exists():
        raise OutputExistsError(
            f"{dst}: output already exists (objects are stored under it); choose another path"
        )
    src = _Source(storage.as_path(src_dir)) if src_dir is not None else _NoSource()
    plan = _Plan(src, out_tree)
    try:
        _run(plan.write_data(dst, progress, sync=False, share=False))
        plan.write_files(dst, dst, sync=False, commit=commit)
    except BaseException:
        storage.remove_written(dst)
        raise
    return plan.engine


def write_processes(
    src_dir: str | os.PathLike,
    out_tree: Any,
    dst_dir: str | os.PathLike,
    processes: Any,
    *,
    progress: Progress | None = None,
    sync: bool = False,
    share: bool = True,
    commit: bool = True,
) -> str:
    """`write` as one of several processes (`ckptconv.multihost.Processes`),
    into ``dst_dir``, an item directory process 0 has created inside the
    conversion's temporary directory, or a bucket prefix (every process is
    given the same path; the rename into place, or a bucket's commit
    markers, are the caller's, after the last sync point).

    Each process writes its share (`_Plan.write_share`); after a sync point,
    process 0 merges the process databases into the root database
    (`_Plan.merge_shares`, by reference on a bucket too) and writes the
    metadata files, the commit marker last (unless ``commit`` is false). The
    others return once process 0 has merged. On a bucket, a process that
    fails deletes its own database's objects (best effort; process 0's
    caller deletes the whole prefix).
    """
    dst = storage.as_path(dst_dir)
    if not storage.is_bucket(dst):
        dst = Path(dst).absolute()
    src = _Source(storage.as_path(src_dir))
    plan = _Plan(src, out_tree)
    try:
        mine = _run(plan.write_share(
            dst, processes.process_id, processes.num_processes, progress, sync=sync, share=share
        ))
    except BaseException:
        if storage.is_bucket(dst) and processes.process_id != 0:
            storage.remove_written(dst / f"ocdbt.process_{processes.process_id}")
        raise
    processes.pause_for_tests()
    shares = processes.sync("written", mine)
    if processes.process_id == 0:
        _run(plan.merge_shares(dst, shares, sync=sync))
        plan.write_files(dst, dst, sync=sync, commit=commit)
    return plan.engine

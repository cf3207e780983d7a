"""File-to-file conversion: the one entry point behind the command line.

`convert` reads the input's tree without its data (lazy leaves), runs the same
`to_scan` / `to_loop` as the in-memory API on it, and has the format's writer
produce the output one leaf (or one chunk) at a time, so memory does not grow
with the checkpoint. The output is written beside its final path and renamed
into place: on any failure or interrupt there is no output (or the old one,
under ``force``), and the input is never opened for writing.

A bucket output (``gs://``, ``s3://``; `ckptconv.storage`) has no rename: it
is written straight under its prefix, which must hold no object yet, and
``commit_success.txt`` is written last, for each item and then for the step,
as Orbax commits on GCS; on any error or interrupt what was written under it
is deleted (best effort), and the message says so (`_bucket_output`).

One job a file:

* ``__init__.py``: `convert` and `extract`, which plan, write and commit;
* ``plan.py``: what to write (`plan`, `plan_item`, `Result`);
* ``write.py``: the items written, in IN's format or another;
* ``output.py``: OUT made atomic (local rename, bucket commit markers);
* ``processes.py``: the same as one of several processes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckptconv import formats, record, storage
from ckptconv.convert.output import (
    _atomic_output,
    _bucket_output,
    _commit_bucket,
    _fsync_tree,
    check_output,
)
from ckptconv.convert.plan import (
    LOOP_OPTIONS,
    SCAN_OPTIONS,
    ItemPlan,
    Result,
    Selection,
    _planned,
    plan,
    plan_item,
    sharded_same_format,
)
from ckptconv.convert.processes import _convert_processes
from ckptconv.convert.write import _write_other_format, _write_same_format
from ckptconv.errors import (
    CkptconvError,
)

__all__ = [
    "LOOP_OPTIONS",
    "SCAN_OPTIONS",
    "ItemPlan",
    "Result",
    "Selection",
    "check_output",
    "convert",
    "extract",
    "plan",
    "plan_item",
]


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    to: str | None = "scan",
    format: str | None = None,
    step: int | None = None,
    force: bool = False,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
    fsync: bool = False,
    only: str | list[str] | None = None,
    root: str | None = None,
    dtype: Any = None,
    like: str | Path | None = None,
    copy: bool = False,
    distributed: Any = None,
    **options: Any,
) -> Result:
    """Convert the checkpoint at ``src`` and write it to ``dst``, in bounded memory.

    Args:
      src: a msgpack file, an Orbax item directory, a CheckpointManager step
        directory or a CheckpointManager root.
      dst: where the output goes. It keeps the input's format and layout (a
        manager root gives a manager root holding the converted step) unless
        ``format`` names the other format.
      to: ``"scan"`` (stack layers), ``"loop"`` (unstack) or None (no
        layout change: `extract`).
      format: ``"msgpack"``, ``"orbax"`` or ``"safetensors"`` for the output;
        default: what ``dst``'s name ends with (``.msgpack``, ``.safetensors``),
        else the input's (and its layout: a sharded Hugging Face directory
        stays sharded, unless ``dst`` is named as a file of its format,
        ``flax_model.msgpack``: then one file). Another format gives one file
        (or one Orbax item).
      step: for a CheckpointManager root, the step to convert (default: latest).
      force: replace an existing ``dst``.
      dry_run: plan and check everything, write nothing.
      progress: called as ``progress(nbytes, total)`` as output data is
        written (``total``: all the array bytes to write).
      fsync: flush every output file to disk before the output is renamed
        into place, for durability against power loss (Orbax's own saves do;
        ``cp`` does not). Off by default: it costs the time to write the
        whole checkpoint to disk, while atomicity against crashes and
        interrupts holds without it.
      only: keep only these subtrees (``"params"``, ``"params/params/decoder"``;
        a list for several), at their paths; nothing else is read. In a
        CheckpointManager step the paths are in each item's tree (MaxText:
        ``params``, ``opt_state``, ``step`` in ``items``).
      root: this subtree becomes the output's root (an Orbax train state's
        ``params`` as the root of a Hugging Face ``flax_model.msgpack``).
      dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: floating leaves
        are cast while streaming (round to nearest even); integer, boolean
        and PRNG-key leaves are untouched.
      like: a checkpoint in the target layout (MaxText's own checkpoint of
        the same model in the other form, a Hugging Face file): the options
        are worked out from the two trees' metadata, and the output must have
        REF's structure (paths, shapes, dtypes) or nothing is written.
      copy: give OUT data files of its own. By default an Orbax output in
        Orbax shares IN's data files wherever it holds IN's chunks as they
        are (to-scan of layers, to-loop of layer-thick stacks, items left
        unchanged): hard links where IN and OUT are on one filesystem, else
        whole-file copies, and OUT costs only its metadata. Deleting either
        side is safe, and nothing ever writes into a data file (OCDBT writes
        new files), so neither can change the other; ``copy=True``
        (``--copy``) copies those data files whole instead (in the kernel, as
        ``cp -r`` would), and OUT's files are its own.
      distributed: run as one of several processes of a ``jax.distributed``
        program (`ckptconv.multihost`), each reading and writing only its
        share of the output's leaves: a dict ``{"coordinator": "HOST:PORT",
        "num_processes": N, "process_id": I}`` (missing entries from
        ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``)
        joins or starts that program; None (the default) uses the caller's
        own when ``jax.distributed`` is already initialized with several
        processes (JAX is not imported to ask); False is one process. Every
        process calls `convert` with the same arguments. Orbax to Orbax
        (items, steps, manager roots; shared disk or buckets); see
        `_convert_processes`.
      **options: for to-scan ``pattern``, ``into``, ``axis``, ``axis_for``,
        ``period``, ``layers``, ``remainder``, ``groups``; for to-loop
        ``source``, ``pattern``, ``axis``, ``axis_for``, ``period``,
        ``layers``, ``stacks`` (as
        `ckptconv.to_scan` / `ckptconv.to_loop`).

    Returns:
      A `Result` describing the groups converted and the bytes written.

    Raises:
      OutputExistsError: ``dst`` exists and ``force`` is false.
      CkptconvError: anything else wrong with the input or the options.
    """
    # "out/" names a folder (pathlib drops the slash): a one-file format there is refused.
    folder = isinstance(dst, str) and dst.endswith("/") and dst.strip("/") != ""
    src, dst = storage.as_path(src), storage.as_path(dst)
    processes = None
    if isinstance(distributed, dict):
        from ckptconv import multihost

        processes = multihost.start(
            distributed.get("coordinator"), distributed.get("num_processes"),
            distributed.get("process_id"),
        )
    elif distributed is None or distributed is True:
        from ckptconv import multihost

        processes = multihost.current()
        if distributed is True and processes is None:
            raise CkptconvError(
                "distributed=True, but jax.distributed is not initialized with several "
                "processes; pass distributed={'coordinator': ..., 'num_processes': ..., "
                "'process_id': ...}"
            )
    if processes is not None:
        return _convert_processes(
            processes, src, dst, to=to, format=format, step=step, force=force, dry_run=dry_run,
            progress=progress, fsync=fsync, selection=Selection.of(only, root, dtype), like=like,
            copy=copy, options=options,
        )
    selection = Selection.of(only, root, dtype)
    result = _planned(src, dst, to, format, step, force, selection, like, options, folder=folder)
    layout, items, out_format = result.layout, result.items, result.out_format
    bucket = storage.is_bucket(dst)
    out_fmt = formats.get(out_format)
    if bucket and out_format != "orbax":
        raise CkptconvError(
            f"{dst}: bucket outputs are supported for Orbax checkpoints only, not {out_format}; "
            f"write the {out_format} output to local disk and copy it to the bucket "
            "(gcloud storage cp / aws s3 cp)."
        )
    if dry_run:
        return result
    in_fmt = formats.get(layout.format)
    total = result.nbytes
    update = (lambda n: progress(n, total)) if progress else None
    rec = record.build(result, result.options)
    kw = {"record": rec} if getattr(out_fmt, "WRITES_RECORD", False) else {}
    if bucket:
        kw["commit"] = False  # the markers go last, after `record.stamp`
    if not folder and _one_file(layout, out_format, dst):
        kw["single"] = True
    with _bucket_output(dst) if bucket else _atomic_output(dst, force) as tmp:
        if out_format == layout.format:
            if copy and getattr(out_fmt, "SHARES", False):
                kw["copy"] = True  # the format's default is to share
            _write_same_format(layout, items, in_fmt, tmp, update, fsync, kw)
        else:
            _write_other_format(layout, items, in_fmt, out_fmt, tmp, update, kw)
        if out_format == "orbax":
            record.stamp(tmp, dst, to, rec)
        if bucket:
            _commit_bucket(tmp, layout if out_format == layout.format else None)
        elif fsync:
            # The Orbax writer already flushed its files before its commit
            # marker; this pass covers the rest (msgpack files, copied items,
            # folders) and costs nothing on files already on disk.
            _fsync_tree(tmp)
    result.written = True
    return result


def _one_file(layout: Any, out_format: str, dst: Path) -> bool:
    """A Hugging Face sharded directory (msgpack or safetensors) into an OUT
    named as a file of its format (``flax_model.msgpack``): one file, the
    shards merged, as a user means by the name (a trial got a folder called
    flax_model.msgpack, which from_pretrained does not read)."""
    suffix = getattr(formats.get(out_format), "SUFFIX", None)
    return sharded_same_format(layout, out_format) and suffix is not None and str(dst).endswith(suffix)


def extract(
    src: str | Path,
    dst: str | Path,
    *,
    only: str | list[str] | None = None,
    root: str | None = None,
    dtype: Any = None,
    **kwargs: Any,
) -> Result:
    """Write ``src``'s ``only`` subtrees (or its ``root`` subtree), cast to
    ``dtype``, to ``dst``, with no layout change; memory bounded as in
    `convert` (whose other keywords it takes: ``format``, ``step``,
    ``force``, ``dry_run``, ``progress``, ``fsync``).

    With none of ``only``, ``root``, ``dtype`` it copies ``src`` (in another
    format, with ``format``).
    """
    return convert(src, dst, to=None, only=only, root=root, dtype=dtype, **kwargs)

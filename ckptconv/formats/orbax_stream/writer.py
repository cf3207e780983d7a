"""`write`: a complete item directory for an output tree, built under a
temporary name beside the destination (a name Orbax treats as unfinished),
its commit marker written last, and only then renamed into place."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

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

    Returns:
      The engine used: ``"clone"`` or ``"copy"``.

    Raises:
      OutputExistsError: `dst_dir` exists.
      FormatError: `src_dir` is unreadable, a lazy leaf refers to an array it
        does not hold (or with another shape), or a leaf cannot be written.
    """
    dst = Path(dst_dir).absolute()
    if dst.exists() or dst.is_symlink():
        raise OutputExistsError(f"{dst}: output already exists; remove it or choose another path")
    src = _Source(Path(src_dir)) if src_dir is not None else _NoSource()
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

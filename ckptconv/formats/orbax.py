"""Orbax checkpoints, recognised by their layout:

- an item: a directory written by ``StandardCheckpointer``/``PyTreeCheckpointer``
  (it holds ``_METADATA``);
- a step: a CheckpointManager step directory whose subdirectories are items
  (``default/``, ``state/`` …) and other items (JSON metrics …);
- a root: a CheckpointManager directory of numbered step directories; the
  latest step is used unless a step is given.

On a bucket (``gs://``, ``s3://``: `ckptconv.storage`) the same layouts are
read and written by ckptconv's own Orbax engine (`orbax_stream`; Orbax itself
reads no ``s3://`` at all, and ``gs://`` only with gcsfs). There Orbax's rule
on GCS holds: no rename exists, so a save writes in place and
``commit_success.txt`` last, and an item or step without it is incomplete.
An item or step given directly without it is refused (`_incomplete`); a
manager root lists only its committed steps, as `CheckpointManager` does.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ckptconv import storage
from ckptconv.errors import FormatError
from ckptconv.formats.layout import Layout

# orbax_stream (its clone engine too) imports TensorStore, and with it ml_dtypes: about
# 0.6 s of every start, which --help, a format sniff and a msgpack or
# safetensors conversion never need. It is imported where used.

NAME = "orbax"
#: Another format's leaves are written one at a time (`lazy.Deferred`), not
#: through an in-memory tree.
STREAMS = True

_STEP_RE = re.compile(r"^(?:.*_)?(\d+)$")


COMMIT_FILE = "commit_success.txt"


def _is_item(path: Path) -> bool:
    return path.is_dir() and (path / "_METADATA").is_file()


def _is_step(path: Path) -> bool:
    return path.is_dir() and any(_is_item(c) for c in path.iterdir())


def _committed(path: Path) -> bool:
    """On a bucket: whether the save of this item or step finished (its
    commit marker exists). On local disk the final rename is the commit."""
    return not storage.is_bucket(path) or (path / COMMIT_FILE).is_file()


def _incomplete(path: Path, what: str = "checkpoint") -> FormatError:
    return FormatError(
        f"{path}: incomplete {what}: no {COMMIT_FILE}. On a bucket Orbax writes "
        f"{COMMIT_FILE} last, so its save (or ckptconv's conversion) did not finish or is "
        "still running, and Orbax's own restore refuses it too (\"Found incomplete "
        "checkpoint\"). Use a complete checkpoint, or wait for the save to finish. (A "
        "checkpoint saved on local disk by Orbax before 0.12 has no commit_success.txt: copied "
        "to a bucket whole, it can be marked complete with an object of that name.)"
    )


def _steps(path: Path, uncommitted: dict[int, Path] | None = None) -> dict[int, Path]:
    """The numbered step directories; on a bucket only committed ones (the
    others go to ``uncommitted``)."""
    out = {}
    for c in path.iterdir():
        m = _STEP_RE.match(c.name)
        # Orbax writes unfinished steps under a temporary name; such names
        # carry a suffix and do not match.
        if m and _is_step(c):
            if _committed(c):
                out[int(m.group(1))] = c
            elif uncommitted is not None:
                uncommitted[int(m.group(1))] = c
    return out


#: Names that an Orbax save writes first: a bucket prefix holding one of them
#: but no commit marker is a save that did not finish.
_SAVE_NAMES = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA", "_sharding")


def _half_written(path: Path) -> bool:
    if not storage.is_bucket(path):
        return False
    names = {k.rsplit("/", 1)[-1] for k in path.keys()}
    return COMMIT_FILE not in names and any(n in names for n in _SAVE_NAMES)


def sniff(path: Path) -> str | None:
    if not path.is_dir():
        return "not a directory"
    uncommitted: dict[int, Path] = {}  # a root whose steps are all unfinished: describe says so
    if _is_item(path) or _is_step(path) or _steps(path, uncommitted) or uncommitted:
        return None
    if _half_written(path):
        return None
    return (
        "a directory without _METADATA, without item subdirectories holding one, "
        "and without numbered step directories"
    )


def describe(path: Path, step: int | None = None) -> Layout:
    """The layout at ``path``; for a CheckpointManager root, of ``step`` or the latest."""
    if _is_item(path):
        if not _committed(path):
            raise _incomplete(path)
        if step is not None:
            raise FormatError(
                f"{path}: --step {step} given, but this is a single Orbax checkpoint, "
                "not a CheckpointManager directory; leave out --step."
            )
        return Layout(NAME, "item", path, items={"": path})
    if _is_step(path):
        if not _committed(path):
            raise _incomplete(path, "CheckpointManager step")
        if step is not None:
            raise FormatError(
                f"{path}: --step {step} given, but this is one CheckpointManager step "
                "directory; pass its parent directory with --step, or leave out --step."
            )
        return _step_layout(path, path, "step", None)
    uncommitted: dict[int, Path] = {}
    steps = _steps(path, uncommitted)
    if step is not None and step in uncommitted:
        raise _incomplete(uncommitted[step], f"CheckpointManager step {step}")
    if not steps and uncommitted:
        raise FormatError(
            f"{path}: no complete step: step{'' if len(uncommitted) == 1 else 's'} "
            f"{', '.join(map(str, sorted(uncommitted)))} "
            f"{'has' if len(uncommitted) == 1 else 'have'} no {COMMIT_FILE} (a save that did "
            "not finish; CheckpointManager skips such steps too)."
        )
    if not steps and _half_written(path):
        raise _incomplete(path)
    if not steps:
        raise FormatError(f"{path}: not an Orbax checkpoint ({sniff(path)}).")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise FormatError(
            f"{path}: no step {step}; the steps here are "
            f"{', '.join(map(str, sorted(steps)))}. Pass one of them with --step."
        )
    layout = _step_layout(path, steps[step], "root", step)
    step_dirs = set(steps.values()) | set(uncommitted.values())
    for c in sorted(path.iterdir()):
        # Files beside the steps (CheckpointManager metadata) come along; other
        # steps do not: the output holds the converted step only.
        if c not in step_dirs:
            layout.others.append((c, c.name))
    return layout


def _step_layout(root: Path, step_dir: Path, kind: str, step: int | None) -> Layout:
    layout = Layout(NAME, kind, root, step=step)
    for c in sorted(step_dir.iterdir()):
        rel = str(c.relative_to(root))
        if _is_item(c):
            layout.items[c.name] = c
        else:
            layout.others.append((c, rel))
    return layout


def _norm(path: Path) -> Path:
    """Absolute, with ``.`` and ``..`` resolved by name as the shell does
    (TensorStore's file kvstore refuses paths that hold ``..``; Orbax,
    relative ones). Symlinks are kept: they are followed when opened. A
    bucket location stays as it is."""
    if storage.is_bucket(path):
        return storage.as_path(path)
    return Path(os.path.abspath(path))


def read_lazy(item: Path) -> Any:
    from ckptconv.formats import orbax_stream
    return orbax_stream.read_lazy(_norm(item))


def read_array(item: Path, ref: Any) -> np.ndarray:
    from ckptconv.formats import orbax_stream
    return orbax_stream.read_array(_norm(item), ref.source)


def read_slice(item: Path, ref: Any, index: int, axis: int) -> np.ndarray:
    """``np.take(array, index, axis)``, reading only the chunks it touches."""
    region = (slice(None),) * axis + (index,)
    from ckptconv.formats import orbax_stream
    return orbax_stream.read_array(_norm(item), ref.source, region)


def read_region(item: Path, ref: Any, index: tuple) -> np.ndarray:
    """``array[index]`` (ints and slices), reading only the chunks it touches
    (`ckptconv.restore`: one device's part of an array)."""
    from ckptconv.formats import orbax_stream
    return orbax_stream.read_array(_norm(item), ref.source, tuple(index))


#: `write` and `copy_item` take ``copy``: by default OUT shares IN's data files.
SHARES = True


def write(
    item: Path | None, out_tree: Any, dst: Path, progress: Any = None, fsync: bool = False,
    copy: bool = False, commit: bool = True,
) -> str:
    """Writes ``out_tree`` (lazy leaves of ``item``) as an Orbax item at ``dst``.

    With ``copy`` false, a conversion that moves whole chunks (to-scan of
    layers, to-loop of layer-thick stacks) clones ``item``'s database: OUT
    shares IN's data files (hard links on one filesystem, else whole-file
    copies), deleting either side is safe, and nothing ever writes into a data
    file (`ckptconv.formats.orbax_stream.clone`). With ``copy`` true
    (``--copy``) the clone's data files are whole-file copies, OUT's own.
    Outputs that cannot be a clone are written chunk by chunk. Returns the
    engine used, ``"clone"`` or ``"copy"``.
    """
    src = _norm(item) if item is not None else None
    from ckptconv.formats import orbax_stream
    return orbax_stream.write(
        src, out_tree, _norm(dst), progress=progress, sync=fsync, share=not copy, commit=commit
    )


def copy_item(item: Path, dst: Path, copy: bool = False, commit: bool = True) -> None:
    """Copies an item unchanged; with ``copy`` false its data files are shared
    as `write` shares them. With a bucket on either side nothing can be
    shared: the item is written again by the chunk-copy engine (its chunks
    copied as they are, memory bounded), ``commit`` as for `write`."""
    if storage.is_bucket(item) or storage.is_bucket(dst):
        from ckptconv.formats import orbax_stream
        src = _norm(item)
        orbax_stream.write(src, orbax_stream.read_lazy(src), _norm(dst), sync=False, commit=commit)
        return
    from ckptconv.formats.orbax_stream import clone
    clone.copy_item(_norm(item), _norm(dst), share=not copy)


def read_record(item: Path) -> dict | None:
    """The ckptconv record in an item's ``_METADATA`` (`ckptconv.record`)."""
    import json

    try:
        meta = json.loads((storage.as_path(item) / "_METADATA").read_bytes())
    except (OSError, ValueError):
        return None
    custom = meta.get("custom_metadata") if isinstance(meta, dict) else None
    rec = custom.get("ckptconv") if isinstance(custom, dict) else None
    return rec if isinstance(rec, dict) else None


def load_item(item: Path) -> Any:
    """Restore one item as numpy arrays, whatever device the arrays were saved from.

    A bucket item is read by ckptconv's own reader (Orbax reads no ``s3://``,
    and ``gs://`` only through gcsfs): every array leaf a numpy array."""
    if storage.is_bucket(item):
        return _load_bucket_item(storage.as_path(item))
    import orbax.checkpoint as ocp

    item = _norm(item)  # Orbax refuses relative paths
    quiet = _NoItemMetadataWarning()
    absl_log = logging.getLogger("absl")
    absl_log.addFilter(quiet)
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            meta = ckptr.metadata(item)
            tree = getattr(meta, "item_metadata", meta)
            tree = getattr(tree, "tree", tree)
            args = _restore_args(tree)
            return ckptr.restore(item, ocp.args.PyTreeRestore(restore_args=args))
    except FormatError:
        raise
    except Exception as e:  # Orbax raises many kinds; all mean "cannot read".
        raise FormatError(
            f"{item}: Orbax could not read this checkpoint ({type(e).__name__}: {e}). "
            "Is it complete? Check that the save finished (commit_success.txt / _CHECKPOINT_METADATA)."
        ) from e
    finally:
        absl_log.removeFilter(quiet)


class _NoItemMetadataWarning(logging.Filter):
    """Drops Orbax's "Metadata file does not exist: <item>/_CHECKPOINT_METADATA":
    a CheckpointManager keeps that file in the step, not in each item, so
    every restore of a manager's item says it (absl WARNING), to no purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("Metadata file does not exist")


def _load_bucket_item(item: Any) -> Any:
    from ckptconv import lazy
    from ckptconv.formats import orbax_stream

    tree = orbax_stream.read_lazy(item)
    return lazy.materialize(tree, lambda ref: orbax_stream.read_array(item, ref.source))


def _restore_args(tree: Any) -> Any:
    import orbax.checkpoint as ocp

    if isinstance(tree, dict):
        return {k: _restore_args(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_restore_args(v) for v in tree)
    if tree is None:
        return None
    return ocp.RestoreArgs(restore_type=np.ndarray)


def load(path: Path, step: int | None = None) -> Any:
    layout = describe(path, step)
    if layout.kind == "item":
        return load_item(path)
    return {name: load_item(p) for name, p in layout.items.items()}


def save(tree: Any, path: Path) -> None:
    """Write ``tree`` as one Orbax item (``StandardCheckpointer``) at ``path``
    (on a bucket: by ckptconv's own writer, each leaf a numpy array)."""
    if storage.is_bucket(path):
        from ckptconv.formats import orbax_stream
        orbax_stream.write(None, tree, storage.as_path(path), sync=False)
        return
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(_norm(path), tree)
            ckptr.wait_until_finished()
    except (ValueError, TypeError) as e:  # what Orbax refuses to store
        raise FormatError(
            f"{path}: Orbax cannot save this tree ({e}). Zero-size arrays and Python objects "
            "other than numbers and strings have no Orbax form; write msgpack instead "
            "(--format msgpack, or format='msgpack')."
        ) from e

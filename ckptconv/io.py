"""In-memory load and save, for trees that fit in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptconv import formats, storage
from ckptconv.convert.output import _atomic_output, _bucket_output, check_output
from ckptconv.errors import CkptconvError


def load(path: str | Path, *, format: str | None = None, step: int | None = None) -> Any:
    """Read a whole checkpoint into memory as numpy arrays.

    Args:
      path: a msgpack file or an Orbax directory (item, manager step or root).
      format: ``"msgpack"`` or ``"orbax"``; default: judged from the content.
      step: for a CheckpointManager root, the step (default: the latest).

    Returns:
      The tree. A CheckpointManager step or root gives ``{item_name: tree}``.

    Raises:
      FormatError: the path is missing, unreadable or of no known format.
    """
    path = storage.as_path(path)
    with storage.cached_listings():
        fmt = formats.get(format) if format else formats.detect(path)
        layout = fmt.describe(path, step) if storage.is_bucket(path) else None
    if layout is not None and layout.kind != "item":  # describe's listings reused
        return {name: fmt.load_item(p) for name, p in layout.items.items()}
    return fmt.load(path, step)


def save(tree: Any, path: str | Path, *, format: str | None = None, force: bool = False) -> None:
    """Write ``tree`` as one checkpoint, atomically.

    Args:
      tree: nested dicts/lists of numpy or jax arrays.
      path: the output file (msgpack) or directory (orbax).
      format: ``"orbax"`` (a ``StandardCheckpointer`` directory), ``"msgpack"``
        or ``"safetensors"``; default: what ``path``'s name ends with
        (``.msgpack``, ``.safetensors``), else ``"orbax"``.
      force: replace an existing ``path``.

    Raises:
      OutputExistsError: ``path`` exists and ``force`` is false.
    """
    path = storage.as_path(path)
    format = format or formats.for_output(path) or "orbax"
    fmt = formats.get(format)
    check_output(path, force)
    if storage.is_bucket(path):
        if format != "orbax":
            raise CkptconvError(
                f"{path}: bucket outputs are supported for Orbax checkpoints only, not {format}; "
                "save to local disk and copy the file to the bucket (gcloud storage cp / aws s3 cp)."
            )
        # Written in place by ckptconv's own Orbax writer, commit_success.txt last.
        with _bucket_output(path) as out:
            fmt.save(tree, out)
        return
    with _atomic_output(path, force) as tmp:
        fmt.save(tree, tmp)

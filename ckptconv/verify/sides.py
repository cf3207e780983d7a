"""The two checkpoints opened (`_Side`: a path described, not read, or an in-memory
tree) and the options SCAN's conversion record gives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ckptconv import lazy, storage
from ckptconv import tree as treelib


@dataclass
class _Side:
    """One checkpoint: its name in messages, its tree (lazy `Ref` leaves for a
    path, read with ``read``; the tree itself for an in-memory input), its
    CheckpointManager step."""

    name: str
    tree: Any
    read: Callable[[Any], np.ndarray] | None = None
    step: int | None = None
    path: Path | None = None
    items: bool = False  # the tree's top keys are a manager step's items

    def value(self, leaf: Any) -> np.ndarray:
        """A leaf's values as numpy (lazy leaves read now)."""
        if isinstance(leaf, lazy.LAZY):
            assert self.read is not None
            return np.asarray(lazy._value(leaf, self.read))
        return np.asarray(treelib._unbox(leaf))

    def conversion_record(self) -> dict | None:
        """Its ckptconv conversion record (`ckptconv.record`), read once;
        None for an in-memory tree or a checkpoint without one."""
        if self.path is None:
            return None
        if not hasattr(self, "_record"):
            from ckptconv import record

            self._record = record.read(self.path, self.step)
        return self._record

    def materialize(self, tree: Any) -> Any:
        return tree if self.read is None else lazy.materialize(tree, self.read)


def _open(x: str | Path | Any, step: int | None = None) -> _Side:
    """A checkpoint path (a CheckpointManager root at ``step``, default its
    latest; ``step`` does not apply to other inputs), described, not read."""
    if not isinstance(x, (str, Path, storage.BucketPath)):
        return _Side("<tree>", x)
    from ckptconv import formats

    path = storage.as_path(x)
    fmt = formats.detect(path)
    layout = fmt.describe(path)
    if layout.kind == "root" and step is not None:
        layout = fmt.describe(path, step)
    at = layout.step if layout.kind == "root" else None
    items = dict(layout.items)
    if list(items) == [""]:
        item = items[""]
        return _Side(str(x), fmt.read_lazy(item), lambda ref: fmt.read_array(item, ref), at, path)
    # Several items ({item: tree}, as `load` gives them): each Ref names its item.
    tree = {}
    for name, item in items.items():
        tree[name] = lazy._map_lazy(
            fmt.read_lazy(item), lambda r, n=name: lazy.Ref((n, r), r.shape, r.dtype)
        )

    def read(ref: Any) -> np.ndarray:
        name, inner = ref.source
        return fmt.read_array(items[name], inner)

    return _Side(str(x), tree, read, at, path, items=True)


def _record_options(side: _Side) -> dict[str, Any] | None:
    """The to-scan options SCAN's conversion record names, if it has one."""
    from ckptconv import record

    rec = side.conversion_record()
    if not rec or rec.get("command") != "to-scan" or not rec.get("groups"):
        return None
    opts = record.scan_options(rec)
    start = max(int(g.get("start") or 0) for g in rec["groups"])
    if start:
        opts["layers"] = f"{start}:"
    return opts


def _loop_record_options(side: _Side) -> dict[str, Any] | None:
    """The to-scan options that undo LOOP's own to-loop, if LOOP is a
    ckptconv to-loop output (checked against the scan checkpoint it came from,
    which may have no record)."""
    from ckptconv import record

    rec = side.conversion_record()
    if not rec or rec.get("command") != "to-loop" or not rec.get("groups"):
        return None
    selected = {k: rec[k] for k in ("only", "root", "dtype") if rec.get(k)}
    if selected:
        from ckptconv.errors import VerifyError

        raise VerifyError(
            f"{side.name} (LOOP) is ckptconv's to-loop of a scan checkpoint with "
            f"{record.options_text(selected)} (its record): a part or a cast of that checkpoint, "
            "which is not its loop form bit for bit. Verify SCAN against a to-loop of it without "
            "those options, or give verify the conversion's options yourself."
        )
    return record.redo_options(rec)


def _selection(selected: dict[str, Any]) -> tuple[list | None, tuple | None, np.dtype | None]:
    """``only``, ``root``, ``dtype`` as check_structure takes them."""
    from ckptconv import subset

    only = selected.get("only")
    if isinstance(only, str):
        only = [only]
    paths = [subset.parse_path(p, "--only") for p in only] if only else None
    root = selected.get("root")
    root = subset.parse_path(root, "--root") if root else None
    dtype = selected.get("dtype")
    return paths, root, (subset.parse_dtype(dtype) if dtype is not None else None)


def _record_selection(side: _Side) -> dict[str, Any]:
    """The ``--only`` / ``--root`` / ``--dtype`` SCAN's conversion record names."""
    rec = side.conversion_record() or {}
    return {k: rec[k] for k in ("only", "root", "dtype") if rec.get(k)}

"""Each item written: in IN's format by its streaming writer (`_write_same_format`,
the files beside the items copied), or in another format (`_write_other_format`)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckptconv import lazy, storage
from ckptconv.convert.output import _COMMIT_FILE
from ckptconv.convert.plan import ItemPlan
from ckptconv.formats.layout import Layout


def _write_same_format(
    layout: Layout, items: list[ItemPlan], fmt: Any, out: Path, progress: Any, fsync: bool,
    kw: dict[str, Any] | None = None,
) -> None:
    kw = kw or {}
    if layout.kind in ("file", "item"):
        (item,) = items
        fmt.write(item.source, item.out_tree, out, progress, fsync, **kw)
        return
    out.mkdir()
    for item in items:
        dest = layout.item_dest(item.name, out)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if item.out_tree is None and hasattr(fmt, "copy_item"):
            extra = {"commit": kw["commit"]} if "commit" in kw else {}
            fmt.copy_item(item.source, dest, kw.get("copy", False), **extra)
        elif item.out_tree is None:
            shutil.copytree(item.source, dest, symlinks=True)
        else:
            fmt.write(item.source, item.out_tree, dest, progress, fsync, **kw)
    _copy_others(layout, out)


def _copy_others(layout: Layout, out: Path) -> None:
    """A step's or root's files beside its items (metrics, metadata), copied."""
    buckets = storage.is_bucket(out) or storage.is_bucket(layout.path)
    for path, rel in layout.others:
        dest = out / rel
        if storage.is_bucket(out) and dest.name == _COMMIT_FILE:
            continue  # written last, by `_commit_bucket`
        dest.parent.mkdir(parents=True, exist_ok=True)
        if buckets:
            storage.copy_tree(path, dest)
        elif path.is_dir():
            shutil.copytree(path, dest, symlinks=True)
        else:
            # A symlink stays a symlink (as cp -r copies it): its target,
            # possibly outside IN, is neither read nor written.
            shutil.copy2(path, dest, follow_symlinks=False)


def _write_other_format(
    layout: Layout,
    items: list[ItemPlan],
    in_fmt: Any,
    out_fmt: Any,
    out: Path,
    progress: Any,
    kw: dict[str, Any] | None = None,
) -> None:
    """Write another format. Each output leaf is read from the input when the
    writer reaches it (``STREAMS``: msgpack, safetensors, Orbax; the Orbax
    writer runs such reads as jobs within its decode budget), so memory holds
    a few leaves, not the checkpoint. A format that does not stream gets the
    tree in memory (`save`)."""
    streams = getattr(out_fmt, "STREAMS", False)
    trees = {}
    for item in items:
        t = item.out_tree
        if t is None:
            t = in_fmt.read_lazy(item.source)
        read = _reader(in_fmt, item.source)
        if streams:
            trees[item.name] = lazy.defer(t, read)
        else:
            trees[item.name] = lazy.materialize(t, read)
            if progress:
                progress(item.nbytes)
    # One item gives the file's tree (a manager step's lone `default` or
    # `state` item too: what flax.serialization would have written of it);
    # several, a tree of items. A --root subtree is the file's root whatever
    # item it came from.
    tree_out = next(iter(trees.values())) if len(trees) == 1 else trees
    if streams:
        out_fmt.write(None, tree_out, out, progress, **(kw or {}))
    else:
        out_fmt.save(tree_out, out)


def _reader(fmt: Any, item: Path) -> Callable[[Any], Any]:
    """``read(ref)`` for ``item``, with ``read.take(ref, index, axis)`` where
    the format reads one layer of a stack on its own (Orbax)."""

    def read(ref: Any) -> Any:
        return fmt.read_array(item, ref)

    if hasattr(fmt, "read_slice"):
        read.take = lambda ref, index, axis: fmt.read_slice(item, ref, index, axis)  # type: ignore[attr-defined]
    return read

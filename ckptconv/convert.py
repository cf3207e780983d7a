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
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ckptconv import errors, formats, lazy, record, storage, subset, tree
from ckptconv import like as like_mod
from ckptconv.errors import (
    CkptconvError,
    FormatError,
    GroupError,
    NothingToConvertError,
    OutputExistsError,
)
from ckptconv.formats.layout import Layout
from ckptconv.groups import find_groups, find_near_groups
from ckptconv.stack import to_scan
from ckptconv.unstack import loop_stacks, to_loop


@dataclass
class ItemPlan:
    """What happens to one item (a msgpack file, or one Orbax pytree item)."""

    name: str
    source: Path
    groups: list[Any] = field(default_factory=list)  # groups.Group or unstack.Stacked
    out_tree: Any = None  # None: copied unchanged
    nbytes: int = 0
    cast: subset.Cast | None = None  # what --dtype did to this item
    notes: list[str] = field(default_factory=list)  # what to-scan left alone, and why


@dataclass
class Result:
    """What `convert` did (or, with ``dry_run``, would do)."""

    src: Path
    dst: Path
    to: str
    layout: Layout
    out_format: str
    items: list[ItemPlan]
    written: bool = False
    selection: Selection | None = None
    #: The layout options used (given, or read from IN's record).
    options: dict[str, Any] = field(default_factory=dict)
    #: True when the options came from IN's record (to-loop) or from REF (``like``).
    from_record: bool = False
    like: Path | None = None

    @property
    def cast(self) -> subset.Cast | None:
        """What ``dtype`` did, over all items (None without ``dtype``)."""
        casts = [i.cast for i in self.items if i.cast is not None]
        if not casts:
            return None
        return subset.Cast(
            casts[0].dtype,
            sum(c.leaves for c in casts),
            sum(c.before for c in casts),
            sum(c.after for c in casts),
        )

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.items)

    @property
    def left_out(self) -> list[str]:
        """A CheckpointManager step's non-pytree items (``1/metrics``) that an
        output in another format has no place for."""
        if self.out_format == self.layout.format or self.layout.kind not in ("step", "root"):
            return []
        return [name for path, name in self.layout.others if path.is_dir()]

    @property
    def groups(self) -> list[Any]:
        return [g for i in self.items for g in i.groups]


@dataclass(frozen=True)
class Selection:
    """What of IN goes to OUT: ``only`` subtrees, the ``root`` subtree, cast to ``dtype``."""

    only: tuple[tuple[str, ...], ...] = ()
    root: tuple[str, ...] | None = None
    dtype: Any = None  # np.dtype

    @classmethod
    def of(cls, only: Any = None, root: Any = None, dtype: Any = None) -> Selection | None:
        """From the library's (or the command line's) ``only``, ``root``, ``dtype``."""
        if isinstance(only, str):
            only = [only]
        paths = tuple(subset.parse_path(p, "--only") for p in (only or ()))
        root_path = subset.parse_path(root, "--root") if root is not None else None
        cast = subset.parse_dtype(dtype) if dtype is not None else None
        if not paths and root_path is None and cast is None:
            return None
        return cls(paths, root_path, cast)

    def describe(self) -> str:
        words = []
        if self.only:
            words.append("kept only " + ", ".join("/".join(p) for p in self.only))
        if self.root is not None:
            words.append("root " + "/".join(self.root))
        return "; ".join(words)


#: The options `convert` passes on to `stack.to_scan` / `unstack.to_loop`.
SCAN_OPTIONS = ("pattern", "into", "axis", "axis_for", "period", "layers", "remainder", "groups")
LOOP_OPTIONS = ("source", "pattern", "axis", "axis_for", "period", "layers", "stacks")


def plan_item(lazy_tree: Any, to: str, options: dict[str, Any]) -> tuple[Any, list[Any]]:
    """The converted lazy tree and the groups (or stacks) it converts."""
    allowed = SCAN_OPTIONS if to == "scan" else LOOP_OPTIONS
    unknown = sorted(k for k, v in options.items() if k not in allowed and v is not None)
    if unknown:
        raise CkptconvError(
            f"to={to!r} takes no option {', '.join(unknown)}; its options are "
            f"{', '.join(allowed)}."
        )
    opts = {k: v for k, v in options.items() if v is not None}
    if to == "scan":
        out = to_scan(lazy_tree, **opts)
        opts.pop("axis", None)
        opts.pop("axis_for", None)
        return out, find_groups(lazy_tree, **opts)
    out = to_loop(lazy_tree, **opts)
    return out, loop_stacks(lazy_tree, **opts)


def _array_bytes(t: Any) -> int:
    return sum(getattr(x, "nbytes", 0) for _, x in tree.leaves_with_paths(t))


def plan(
    src: str | Path,
    *,
    to: str | None = "scan",
    step: int | None = None,
    selection: Selection | None = None,
    like: str | Path | None = None,
    **options: Any,
) -> tuple[Layout, list[ItemPlan], dict[str, Any], bool]:
    """Read ``src``'s layout and trees (no array data) and plan every item.

    Returns the layout, the items' plans, the layout options used and whether
    they came from IN's record (a to-loop given none undoes IN's to-scan).

    ``to`` is ``"scan"``, ``"loop"`` or None (no layout change: `extract`).
    ``like``: a checkpoint in the target layout; the options are worked out
    from it (`ckptconv.like`) and the plan must give its structure.
    ``selection`` keeps subtrees (before the conversion, so that nothing else
    is read), then takes the root subtree and casts (after it).

    Raises:
      NothingToConvertError: no item has anything to convert.
      SelectionError: an ``only`` or ``root`` path that is not in ``src``.
      CkptconvError: unreadable input, inconsistent layers.
    """
    if to not in ("scan", "loop", None):
        raise CkptconvError(f"to must be 'scan' or 'loop', got {to!r}.")
    src = storage.as_path(src)
    fmt = formats.detect(src)
    layout = fmt.describe(src, step)
    sel = selection or Selection()
    from_record = from_like = False
    layout_keys = _LOOP_LAYOUT if to == "loop" else _SCAN_LAYOUT
    if to is not None and like is None and not any(options.get(k) is not None for k in layout_keys):
        # Nothing said how to convert: undo the conversion IN records, if any.
        rec = record.read(src, step)
        other = {"loop": "to-scan", "scan": "to-loop"}[to]
        if rec is not None and rec.get("command") == other and rec.get("groups"):
            undo = record.undo_options(rec) if to == "loop" else record.redo_options(rec)
            options = {**undo, **{k: v for k, v in options.items() if k not in undo}}
            from_record = True
    items = []
    first_error: NothingToConvertError | None = None
    found: set[tuple[str, ...]] = set()
    misses: dict[tuple[str, ...], str] = {}
    refs = _like_trees(like, layout, sel) if like is not None else None
    for name, path in layout.items.items():
        item = ItemPlan(name, path)
        lazy_tree = fmt.read_lazy(path)
        if sel.only:
            for p in sel.only:
                node, why = subset.find(lazy_tree, p)
                if why is None:
                    found.add(p)
                else:
                    misses.setdefault(p, _in_item(why, name, layout))
            lazy_tree = subset.keep_only(lazy_tree, sel.only)
            if lazy_tree is None:
                continue  # an item that holds none of the paths is left out
        ref_tree = None
        if refs is not None:
            ref_tree = refs.get(name, refs.get("") if len(refs) == 1 else None)
            if ref_tree is None and len(refs) == 1 and len(layout.items) == 1:
                (ref_tree,) = refs.values()
            if ref_tree is not None and not like_mod.differences(lazy_tree, ref_tree):
                items.append(item)  # already in REF's layout: copied
                continue
            if ref_tree is not None:
                try:
                    how, inferred = like_mod.infer(
                        lazy_tree, ref_tree, _hint(options) if to == "scan" else None)
                except GroupError as e:
                    raise GroupError(f"{path}: --like {like}: {e}") from e
                if how != to:
                    raise GroupError(
                        f"{path}: --like {like}: REF is in {'scan' if how == 'scan' else 'loop'} "
                        f"form, so this is a to-{how}, not a to-{to}; run ckptconv to-{how} "
                        f"IN OUT --like {like}."
                    )
                options = {**inferred, **{k: v for k, v in options.items()
                                          if v is not None and k not in inferred}}
                from_like = True
        try:
            if to is None:
                item.out_tree = lazy_tree
            else:
                item.out_tree, item.groups = plan_item(lazy_tree, to, options)
                if ref_tree is not None:
                    diff = like_mod.differences(item.out_tree, ref_tree)
                    if diff:
                        agree = like_mod.agreeing_top_keys(item.out_tree, ref_tree)
                        hint = (
                            "; the parts that match are "
                            + ", ".join(agree)
                            + ": keep only them with "
                            + " ".join(f"--only {k}" for k in agree)
                            if agree else ""
                        )
                        raise GroupError(
                            f"--like {like}: the output would not have REF's structure ("
                            + "; ".join(diff) + f"). Nothing was written{hint}."
                        )
                if to == "scan":
                    opts = {k: v for k, v in options.items()
                            if v is not None and k not in ("axis", "axis_for")}
                    item.notes = [n.message for n in find_near_groups(lazy_tree, **opts)]
        except NothingToConvertError as e:
            # Items without layers (metrics, dataset state) are copied as they are.
            first_error = first_error or e
            if selection is not None:
                item.out_tree = lazy_tree
        except GroupError as e:
            # Tree errors name the leaf; add the file (format errors have it).
            where = f"{path}" + (f" (item {name!r})" if name else "")
            raise type(e)(f"{where}: {e}") from e
        items.append(item)
    missing = [p for p in sel.only if p not in found]
    if missing:
        p = missing[0]
        raise subset.SelectionError(
            f"{src}: --only {'/'.join(p)}: {misses[p]}. Nothing was written."
        )
    if sel.root is not None:
        items = _take_root(src, layout, items, sel.root)
    if sel.dtype is not None:
        for item in items:
            if item.out_tree is not None:
                item.out_tree, item.cast = subset.cast(item.out_tree, sel.dtype)
    for item in items:
        if item.out_tree is not None:
            item.nbytes = _array_bytes(item.out_tree)
    if to is not None and not any(i.groups for i in items):
        assert first_error is not None
        raise NothingToConvertError(f"{src}: {first_error}") from first_error
    return layout, items, options, from_record or from_like


#: to-loop options that say how to unstack (without them, IN's record does).
_LOOP_LAYOUT = ("source", "pattern", "period", "layers", "stacks", "axis", "axis_for")
_SCAN_LAYOUT = ("pattern", "into", "period", "layers", "remainder", "groups", "axis", "axis_for")


def _like_trees(like: str | Path, layout: Layout, sel: Selection) -> dict[str, Any]:
    """REF's item trees (no data read), with the same --only as IN."""
    ref = storage.as_path(like)
    if not ref.exists():
        raise CkptconvError(f"--like {like}: no such file or directory.")
    ref_fmt = formats.detect(ref)
    ref_layout = ref_fmt.describe(ref)
    out = {}
    for name, p in ref_layout.items.items():
        t = ref_fmt.read_lazy(p)
        if sel.only:
            t = subset.keep_only(t, sel.only)
        if t is not None:
            out[name] = t
    return out


def _in_item(why: str, name: str, layout: Layout) -> str:
    return f"{why} (in item {name!r})" if name and len(layout.items) > 1 else why


def _take_root(
    src: Path, layout: Layout, items: list[ItemPlan], root: tuple[str, ...]
) -> list[ItemPlan]:
    """The items that hold ``root``, each with that subtree as its tree."""
    kept, why = [], None
    for item in items:
        t = item.out_tree if item.out_tree is not None else None
        node, miss = subset.find(t, root) if t is not None else (None, "nothing kept")
        if miss is not None:
            why = why or _in_item(miss, item.name, layout)
            continue
        if isinstance(node, lazy.LAZY) or tree.is_leaf(node) or not isinstance(node, (dict, list, tuple)):
            kind = (
                f"a single leaf ({np.dtype(node.dtype)} {tuple(node.shape)})"
                if isinstance(node, lazy.LAZY) else f"a single leaf ({type(node).__name__})"
            )
            raise subset.SelectionError(
                f"{src}: --root {'/'.join(root)} is {kind}, but a checkpoint's root must "
                "be a subtree: give the subtree that holds it, or keep it with --only. "
                "Nothing was written."
            )
        item.out_tree = node
        kept.append(item)
    if not kept:
        after = ""
        if any(i.groups for i in items):
            # The path may well be in IN: --root is taken after the conversion.
            after = (" (--root names a path of the converted tree: it is taken after the layers "
                     "are stacked or unstacked)")
        raise subset.SelectionError(
            f"{src}: --root {'/'.join(root)}: {why}{after}. Nothing was written.")
    if len(kept) > 1:
        raise subset.SelectionError(
            f"{src}: --root {'/'.join(root)} is in items "
            f"{', '.join(repr(i.name) for i in kept)}; a root must be one subtree: add --only "
            "with the item's path, or convert one item directory."
        )
    return kept


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
        stays sharded). Another format gives one file (or one Orbax item).
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


def _planned(
    src: Path, dst: Path, to: str | None, format: str | None, step: int | None, force: bool,
    selection: Selection | None, like: Any, options: dict[str, Any], folder: bool = False,
) -> Result:
    """The checks on IN and OUT, and the plan, as a `Result` not yet written
    (metadata only; bucket listings are answered once while it reads)."""
    with storage.cached_listings():
        _check_paths(src, dst, force)
        layout, items, used, from_record = plan(
            src, to=to, step=step, selection=selection, like=like, **options
        )
    # Without --format: what OUT's name says (`out.msgpack`), else IN's format.
    out_format = format or formats.for_output(dst) or layout.format
    suffix = getattr(formats.get(out_format), "SUFFIX", None)
    if folder and suffix:
        names = (f"{dst} without the '/'" if str(dst).endswith(suffix)
                 else f"{dst / ('model' + suffix)}, or {dst}{suffix}")
        raise CkptconvError(
            f"{dst}/: OUT ends in '/', a folder, but a {out_format} output is one file; name the "
            f"file ({names}), or pass --format orbax for a folder. Nothing was written and the "
            "input is unchanged."
        )
    result = Result(src, dst, to, layout, out_format, items, selection=selection)
    result.options, result.from_record = used, from_record
    result.like = storage.as_path(like) if like is not None else None
    return result


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


def _check_paths(src: Path, dst: Path, force: bool) -> None:
    if storage.is_bucket(src):
        formats.detect(src)  # names what is missing, or what a bucket holds instead
    elif not src.exists():
        raise CkptconvError(f"{src}: no such file or directory; check the path (relative paths start from {Path.cwd()}).")
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise CkptconvError(
            f"{dst}: the output must not be the input, inside it, or contain it ({src}). "
            "Choose another output path."
        )
    check_output(dst, force)


def check_output(dst: Path, force: bool) -> None:
    """Raise unless ``dst`` may be written: its folder exists, and ``dst`` does
    not (or ``force``). A bucket prefix has no folder; no object may be
    stored under it, ``force`` or not: without a rename an old output could
    only be deleted before the new one is complete."""
    if storage.is_bucket(dst):
        if dst.exists():
            raise OutputExistsError(
                f"{dst}: output already exists (objects are stored under this prefix); choose "
                "another path, or delete them first (gcloud storage rm -r / aws s3 rm "
                "--recursive). A bucket has no rename, so --force cannot replace an output "
                "atomically and does not apply to buckets. (Objects without a "
                "commit_success.txt are what a killed run left: no reader takes them for a "
                "checkpoint, and they are safe to delete.)"
            )
        return
    if not dst.absolute().parent.is_dir():
        raise CkptconvError(
            f"{dst}: the folder {dst.absolute().parent} does not exist; create it first "
            "(ckptconv does not create folders, so a typo cannot scatter output)."
        )
    if (dst.exists() or dst.is_symlink()) and not force:
        raise OutputExistsError(
            f"{dst} already exists; pass --force to replace it, or choose another path."
        )


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



def _hint(options: dict[str, Any]) -> str | None:
    """A to-scan's one ``pattern`` given beside a REF (auto-numbered layers)."""
    pattern = options.get("pattern")
    return pattern if isinstance(pattern, str) and options.get("groups") is None else None


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


_COMMIT_FILE = "commit_success.txt"


def _commit_bucket(out: storage.BucketPath, layout: Layout | None) -> None:
    """Writes the commit markers of a complete bucket output: every item's
    (a prefix holding ``_METADATA``), then the step's (a CheckpointManager
    step or root output: the step directory, as Orbax's `CommitFileTemporaryPath`
    finalizes a step after its items), so a reader never takes a step whose
    items are unfinished for a checkpoint."""
    items = sorted({p.parent for p in out.rglob("_METADATA")}, key=str)
    steps = sorted({p.parent for p in out.rglob("_CHECKPOINT_METADATA")} - set(items), key=str)
    if layout is not None and layout.kind in ("step", "root") and layout.items:
        rel = next(iter(layout.items.values())).parent.relative_to(layout.path)
        step_dir = out / str(rel) if str(rel) != "." else out
        steps = [s for s in steps if s != step_dir] + [step_dir]
    for path in [*items, *steps]:
        (path / _COMMIT_FILE).write_bytes(f"Checkpoint commit was successful to {path}".encode())


@contextlib.contextmanager
def _bucket_output(dst: storage.BucketPath) -> Iterator[storage.BucketPath]:
    """Yield ``dst`` itself (a bucket has no rename: OUT is written in place,
    its commit markers last, see `_commit_bucket`). On any error or interrupt,
    what was written under ``dst`` is deleted (best effort) and the error says
    so; an interrupt carries the sentence for the CLI (``ckptconv_message``)."""
    try:
        yield dst
    except OutputExistsError:
        raise  # not ours: another writer's objects appeared under dst
    except BaseException as e:
        why = storage.remove_written(dst)
        said = (
            f"what was written under {dst} was deleted" if why is None
            else f"deleting what was written under {dst} failed ({why}); delete it by hand "
            "(gcloud storage rm -r / aws s3 rm --recursive)"
        )
        if isinstance(e, CkptconvError) and e.args and isinstance(e.args[0], str):
            e.args = (f"{e.args[0].rstrip()} ({said}.)",) + e.args[1:]
        elif isinstance(e, KeyboardInterrupt):
            e.ckptconv_message = f"interrupted; {said}, and the input is unchanged."  # type: ignore[attr-defined]
        elif isinstance(e, Exception):
            raise FormatError(f"cannot write {dst}: {e}; {said}, and the input is unchanged.") from e
        raise


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


def _fsync_tree(path: Path) -> None:
    """fsync every file and directory under ``path`` (or the file itself)."""
    paths = [path] if path.is_file() else [*path.rglob("*"), path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _atomic_output(dst: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``dst``; move it into place only on success.

    Leftovers of earlier runs that were killed (SIGKILL, power loss) carry a
    dead process's id in their name and are removed first. An ``OSError``
    while writing (read-only or full disk, permissions) becomes one
    `FormatError` naming ``dst``. With ``force``, two conversions racing for
    one ``dst`` each move the other's result aside and retry, so the survivor
    is one complete output.
    """
    _remove_stale(dst)
    tmp = dst.parent / f".{dst.name}.ckptconv-tmp-{os.getpid()}"
    olds: list[Path] = []
    done = renaming = False
    _remove(tmp)
    try:
        try:
            yield tmp
            for attempt in range(20):
                if dst.exists() or dst.is_symlink():
                    if not force:  # appeared while we were writing
                        raise OutputExistsError(
                            f"{dst} appeared during the conversion; not replacing it."
                        )
                    old = dst.parent / f".{dst.name}.ckptconv-old-{os.getpid()}-{attempt}"
                    try:
                        os.rename(dst, old)
                    except FileNotFoundError:
                        continue  # another run moved it first
                    olds.append(old)
                try:
                    renaming = True
                    if tmp.is_dir():
                        os.rename(tmp, dst)  # fails if another run put a directory there
                    else:
                        os.replace(tmp, dst)
                    done = True
                    errors.completed.append(dst)
                    break
                except OSError as e:  # another run's OUT got there first
                    if not (dst.exists() and force) or isinstance(e, PermissionError):
                        raise
            else:
                raise OutputExistsError(f"{dst}: kept being replaced by another run; try again.")
        except CkptconvError as e:
            # The temporary name is ckptconv's business: messages name OUT.
            if e.args and isinstance(e.args[0], str) and str(tmp) in e.args[0]:
                named = re.sub(re.escape(str(tmp)) + r"[^\s:'\"]*", str(dst), e.args[0])
                e.args = (named,) + e.args[1:]
            raise
        except OSError as e:
            raise FormatError(
                f"cannot write {dst}: {e.strerror or e}. Check that "
                f"{dst.absolute().parent} is writable and has free space; nothing was written "
                "and the input is unchanged."
            ) from e
    finally:
        if renaming and not done and not os.path.lexists(tmp) and os.path.lexists(dst):
            # A signal right after the rename: OUT is complete and in place.
            done = True
            errors.completed.append(dst)
        _remove_own(tmp, settle=not done)
        for old in olds:
            _remove(old)


def _remove_own(tmp: Path, *, settle: bool) -> None:
    """Remove ``tmp`` and the writers' own temporaries beside it (``tmp.*``,
    ``.tmp.*``). After a failure or interrupt (``settle``), TensorStore's
    threads may still finish a write or two into a folder just removed (the
    Orbax writer waits for its commits, but not for every write TensorStore
    started for them: without these looks 1 in ~60 interrupted runs left a
    folder behind; a write held up by a busy disk can take longer), so look
    again until nothing has appeared for a second (at most about 10 s)."""
    import time

    quiet = 0
    for _ in range(200):
        found = [
            p for p in tmp.parent.iterdir()
            if p.name == tmp.name or p.name.startswith((tmp.name + ".", "." + tmp.name + "."))
        ]
        for p in found:
            _remove(p)
        quiet = 0 if found else quiet + 1
        if quiet >= (20 if settle else 1):
            return
        time.sleep(0.05)


_LEFTOVER = re.compile(r"^\.?\.(?P<name>.+?)\.ckptconv-(?:tmp|old)-(?P<pid>\d+)")


def _remove_stale(dst: Path) -> None:
    """Remove temporary files of earlier conversions to ``dst`` whose process is
    gone (``.OUT.ckptconv-tmp-PID…``, and the format writers' files inside that name)."""
    try:
        entries = list(dst.parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = _LEFTOVER.match(p.name)
        if m and m.group("name") == dst.name:
            pid = int(m.group("pid"))
            if pid != os.getpid() and not _alive(pid):
                _remove(p)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()

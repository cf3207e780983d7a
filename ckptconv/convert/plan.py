"""What a conversion will do, decided before anything is written: the items of IN
(a checkpoint, a CheckpointManager step or root), each item's tree after
``--only``/``--root``/``--dtype`` and `to_scan`/`to_loop` (`plan`, `plan_item`),
the options taken from IN's record or ``--like``, and the `Result` a caller gets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ckptconv import formats, lazy, record, storage, subset, tree
from ckptconv import like as like_mod
from ckptconv.convert.output import check_output
from ckptconv.errors import (
    CkptconvError,
    GroupError,
    NothingToConvertError,
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


def sharded_same_format(layout: Layout, out_format: str) -> bool:
    """IN is a Hugging Face sharded directory (msgpack or safetensors; an
    "item" of those formats) and OUT is of its format."""
    return out_format == layout.format and layout.format != "orbax" and layout.kind == "item"


#: The file names from_pretrained looks for, suggested for an OUT that is a folder.
_HF_NAMES = {"msgpack": "flax_model.msgpack", "safetensors": "model.safetensors"}


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
    # A Hugging Face sharded directory stays one in its own format (OUT/ is
    # such a folder), unless OUT is named as a file (`_one_file`).
    if folder and suffix and not sharded_same_format(layout, out_format):
        names = (f"{dst} without the '/'" if str(dst).endswith(suffix)
                 else f"{dst / _HF_NAMES.get(out_format, 'model' + suffix)}, or {dst}{suffix}")
        raise CkptconvError(
            f"{dst}/: OUT ends in '/', a folder, but a {out_format} output is one file; name the "
            f"file ({names}), or pass --format orbax for a folder. Nothing was written and the "
            "input is unchanged."
        )
    result = Result(src, dst, to, layout, out_format, items, selection=selection)
    result.options, result.from_record = used, from_record
    result.like = storage.as_path(like) if like is not None else None
    return result


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


def _hint(options: dict[str, Any]) -> str | None:
    """A to-scan's one ``pattern`` given beside a REF (auto-numbered layers)."""
    pattern = options.get("pattern")
    return pattern if isinstance(pattern, str) and options.get("groups") is None else None

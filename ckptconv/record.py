"""Conversions describe themselves: the record ckptconv leaves in an Orbax OUT.

After the writers are done and before OUT is renamed into place, `stamp` edits
the small metadata files of the output:

* every ``_CHECKPOINT_METADATA`` (CheckpointManager steps, and items that
  have one) and every item's ``_METADATA`` get ``custom_metadata["ckptconv"]``:
  what was done (command, groups with their names, axis and period, what was
  kept, re-rooted and cast);
* a flag that known tools read is kept true: MaxText's ``scan_layers``
  (its ``from_pretrained`` path refuses, or silently builds the wrong model
  from, a checkpoint whose flag is stale) is set to the form OUT is in;
* Orbax's ``commit_success.txt`` names OUT, not ckptconv's temporary folder.

Other custom metadata is carried over as it was. A record is JSON, so any
Orbax reader shows it (``ocp.CheckpointManager(...).metadata(step)``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ckptconv.errors import FormatError

KEY = "ckptconv"
#: Flags other tools keep in ``custom_metadata`` that say which form a checkpoint is in.
FORM_FLAGS = ("scan_layers",)


def build(result: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The record of one `convert` run (a `convert.Result`)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("ckptconv")
    except PackageNotFoundError:  # pragma: no cover (a source tree on sys.path)
        ver = "unknown"
    command = {"scan": "to-scan", "loop": "to-loop", None: "extract"}[result.to]
    rec: dict[str, Any] = {"version": ver, "command": command, "source": result.src.name}
    if result.to is not None:
        rec["axis"] = int(options.get("axis") or 0)
        from ckptconv.axes import parse_axis_for

        axis_for = parse_axis_for(options.get("axis_for"))
        if axis_for:
            rec["axis_for"] = axis_for
        # A --root at or inside a stack leaves no layer names to undo to (and
        # the other groups were cut away by it): no groups, no undo offered.
        rec["groups"] = [] if root_in_stack(result) is not None else [_group(g) for g in result.groups]
    sel = result.selection
    if sel is not None:
        if sel.only:
            rec["only"] = ["/".join(p) for p in sel.only]
        if sel.root is not None:
            rec["root"] = "/".join(sel.root)
        cast = result.cast
        if cast is not None:
            rec["dtype"] = cast.dtype.name
            rec["cast_leaves"] = cast.leaves
    return rec


def root_in_stack(result: Any) -> Any:
    """The to-scan group whose stacked subtree ``--root`` is at or inside
    (OUT then holds stacked leaves without the layers' names), if any."""
    sel = getattr(result, "selection", None)
    if result.to != "scan" or sel is None or sel.root is None:
        return None
    root = tuple(map(str, sel.root))
    for g in result.groups:
        target = tuple(map(str, getattr(g, "target", ())))
        if target and root[: len(target)] == target:
            return g
    return None


def _group(g: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"describe": g.describe()}
    for name in ("template", "pattern", "holder", "period", "remainder", "start", "num_layers"):
        value = getattr(g, name, None)
        if value not in (None, 0):
            out[name] = value
    keys = getattr(g, "keys", None)
    if keys:
        out["keys"] = [str(k) for k in keys]
    into = getattr(g, "into", None)
    if into is not None:
        out["into"] = str(into)
    path = getattr(g, "path", None)
    if path is not None:
        out["path"] = "/".join(map(str, path))
    return out


def form(to: str | None) -> bool | None:
    """The value of `FORM_FLAGS` for an output converted ``to``."""
    return {"scan": True, "loop": False}.get(to) if to else None


def stamp(tmp: Path, dst: Path, to: str | None, rec: dict[str, Any]) -> None:
    """Write ``rec`` into the Orbax metadata under ``tmp`` (to become ``dst``)."""
    flag = form(to)
    for path in sorted(tmp.rglob("_CHECKPOINT_METADATA")) + sorted(tmp.rglob("_METADATA")):
        if path.is_symlink() or not path.is_file():
            continue
        meta = _read(path)
        if not isinstance(meta, dict):
            continue
        custom = meta.get("custom_metadata")
        custom = dict(custom) if isinstance(custom, dict) else {}
        if flag is not None:
            for name in FORM_FLAGS:
                if isinstance(custom.get(name), bool):
                    custom[name] = flag
        custom[KEY] = rec
        meta["custom_metadata"] = custom
        _write(path, meta)
    for path in tmp.rglob("commit_success.txt"):
        if path.is_file() and not path.is_symlink():
            text = path.read_text(errors="replace")
            where = str(tmp.absolute())
            if where in text:
                path.write_text(text.replace(where, str(dst.absolute())))


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except ValueError as e:
        raise FormatError(f"{path}: not valid JSON ({e}); the input's metadata is damaged.") from e


def _write(path: Path, data: Any) -> None:
    if not isinstance(path, Path):  # a bucket object: one PUT replaces it whole
        path.write_bytes(json.dumps(data).encode())
        return
    new = path.with_name(path.name + ".ckptconv-new")
    new.write_bytes(json.dumps(data).encode())
    os.replace(new, path)


# --------------------------------------------------------------------------
# Reading a record back


def read(path: Path, step: int | None = None) -> dict[str, Any] | None:
    """The record of the conversion that wrote the checkpoint at ``path``
    (None when it has none, or is not a checkpoint ckptconv reads)."""
    from ckptconv import formats, storage

    path = storage.as_path(path)
    try:
        fmt = formats.detect(path)
        layout = fmt.describe(path, step)
    except Exception:  # not ours to judge here: the conversion itself will say
        return None
    reader = getattr(fmt, "read_record", None)
    if reader is None:
        return None
    for item in layout.items.values():
        rec = reader(item)
        if isinstance(rec, dict) and rec.get("command") in ("to-scan", "to-loop", "extract"):
            return rec
    return None


def undo_options(rec: dict[str, Any]) -> dict[str, Any]:
    """The to-loop options that undo a to-scan ``rec``: each stack's name with
    the pattern that gives the input's layer names back, the period, the
    first layer number and the axis."""
    pairs: list[tuple[str, str]] = []
    period = None
    start = 0
    for g in rec.get("groups", []):
        into, template = str(g.get("into", "blocks")), g.get("template", "layer_{i}")
        holder = g.get("holder")
        if holder is not None:
            pattern = "{i}" if into == holder else f"{holder}/{{i}}"
        else:
            pattern = template
        if (into, pattern) not in pairs:
            pairs.append((into, pattern))
        period = period or g.get("period")
        start = max(start, int(g.get("start") or 0))
    return _options(rec, pairs, ("source", "pattern"), "stacks", period, start)


def redo_options(rec: dict[str, Any]) -> dict[str, Any]:
    """The to-scan options that undo a to-loop ``rec``: each stack's name as
    ``into``, the layers' pattern, the period, the first layer and the axis."""
    pairs: list[tuple[str, str]] = []
    period = None
    start = 0
    for g in rec.get("groups", []):
        source = str(g.get("path", "blocks")).split("/")[-1]
        pattern = g.get("pattern") or "layer_{i}"
        if "/" in pattern or pattern == "{i}":
            pattern = "{i}"  # a digit-keyed list (beside what was left of it)
        if (pattern, source) not in pairs:
            pairs.append((pattern, source))
        period = period or g.get("period")
        start = max(start, int(g.get("start") or 0))
    return _options(rec, pairs, ("pattern", "into"), "groups", period, start)


def _options(
    rec: dict[str, Any], pairs: list[tuple[str, str]], one: tuple[str, str], many: str,
    period: int | None, start: int,
) -> dict[str, Any]:
    """Options from the pairs a record gives: one pair as the ``one`` keys,
    several as ``many``; then period, first layer, axis and axis_for."""
    opts: dict[str, Any] = {}
    if len(pairs) == 1:
        opts[one[0]], opts[one[1]] = pairs[0]
    elif pairs:
        opts[many] = pairs
    if period:
        opts["period"] = period
    if start:
        opts["layers"] = f"{start}:"
    opts["axis"] = int(rec.get("axis") or 0)
    if rec.get("axis_for"):
        opts["axis_for"] = dict(rec["axis_for"])
    return opts


def scan_options(rec: dict[str, Any]) -> dict[str, Any]:
    """The to-scan options a to-scan ``rec`` was made with (for verify)."""
    pairs = []
    period = None
    remainder = None
    for g in rec.get("groups", []):
        pair = (g.get("template", "layer_{i}"), str(g.get("into", "blocks")))
        if pair not in pairs:
            pairs.append(pair)
        period = period or g.get("period")
        remainder = remainder or g.get("remainder")
    opts: dict[str, Any] = {"axis": int(rec.get("axis") or 0)}
    if rec.get("axis_for"):
        opts["axis_for"] = dict(rec["axis_for"])
    if len(pairs) == 1:
        opts["pattern"], opts["into"] = pairs[0]
    elif pairs:
        opts["groups"] = pairs
    if period:
        opts["period"] = period
        opts["remainder"] = remainder or "separate"
    return opts


def options_text(opts: dict[str, Any]) -> str:
    """``{"source": "layers", "axis": 1}`` -> ``--from layers --axis 1``."""
    import shlex

    flags = {"source": "--from", "into": "--into", "pattern": "--pattern", "period": "--period",
             "layers": "--layers", "axis": "--axis", "remainder": "--remainder", "root": "--root",
             "dtype": "--dtype"}
    words: list[str] = []
    order = ["source", "pattern", "into", "stacks", "groups", "period", "remainder", "layers",
             "axis", "axis_for", "only", "root", "dtype"]
    opts = {k: opts[k] for k in sorted(opts, key=lambda k: order.index(k) if k in order else 99)}
    for key, value in opts.items():
        if value is None:
            continue
        if key in ("stacks", "groups"):
            a, b = ("--from", "--pattern") if key == "stacks" else ("--pattern", "--into")
            for x, y in value:
                words += [a, x, b, y]
        elif key == "axis" and not value:
            continue
        elif key == "axis_for":
            for name, n in value.items():
                words += ["--axis-for", f"{name}={n}"]
        elif key == "only":
            for path in [value] if isinstance(value, str) else value:
                words += ["--only", path if isinstance(path, str) else "/".join(map(str, path))]
        elif key in flags and value is not None:
            words += [flags[key], str(value)]
    return " ".join(shlex.quote(w) for w in words)

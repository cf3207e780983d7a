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
        rec["groups"] = [_group(g) for g in result.groups]
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


def _group(g: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"describe": g.describe()}
    for name in ("template", "pattern", "period", "start", "num_layers"):
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
    new = path.with_name(path.name + ".ckptconv-new")
    new.write_bytes(json.dumps(data).encode())
    os.replace(new, path)

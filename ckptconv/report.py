"""What `inspect` reports: a checkpoint's tree and what would be converted.

Built from lazy trees, so no array data is read.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptconv import formats, known, storage, tree
from ckptconv.errors import CkptconvError, NothingToConvertError
from ckptconv.groups import Group, NearGroup, find_groups, find_near_groups
from ckptconv.stack import to_scan
from ckptconv.unstack import Stacked, loop_stacks, to_loop


@dataclass
class LeafRow:
    path: str  # with group members folded: params/layer_{i}/Dense_0/kernel
    shape: tuple[int, ...] | None
    dtype: str | None
    nbytes: int
    count: int = 1  # how many layers share this row


@dataclass
class ItemReport:
    name: str
    path: Path
    leaves: list[LeafRow] = field(default_factory=list)
    to_scan: list[Group] = field(default_factory=list)
    to_scan_error: str | None = None
    to_loop: list[Stacked] = field(default_factory=list)
    to_loop_error: str | None = None
    near: list[NearGroup] = field(default_factory=list)
    to_loop_hint: str | None = None  # nothing named --from, but these look stacked
    known: list[str] = field(default_factory=list)  # a known tool's layout, and its command

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes * r.count for r in self.leaves)


@dataclass
class Inspection:
    format: str
    kind: str
    path: Path
    step: int | None
    items: list[ItemReport]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "layout": self.kind,
            "step": self.step,
            "items": [
                {
                    "name": it.name,
                    "path": str(it.path),
                    "bytes": it.nbytes,
                    "leaf_count": sum(r.count for r in it.leaves),
                    "leaves": [
                        {
                            "path": r.path,
                            "shape": list(r.shape) if r.shape is not None else None,
                            "dtype": r.dtype,
                            "bytes": r.nbytes,
                            "layers": r.count,
                        }
                        for r in it.leaves
                    ],
                    "to_scan": {
                        "groups": [
                            {
                                "path": tree.format_path(g.path),
                                "members": tree.format_path(g.members_path),
                                "template": g.template,
                                "layers": g.num_layers,
                                "into": tree.format_path(g.target),
                                "period": g.period,
                                "first_layer": g.start,
                                "total_layers": g.total,
                                "remainder": tree.format_path(g.remainder_target)
                                if g.remainder_target else None,
                                "plan": g.describe(),
                            }
                            for g in it.to_scan
                        ],
                        "alike_except_few": [
                            {"path": tree.format_path(n.path), "message": n.message}
                            for n in it.near
                        ],
                        "error": it.to_scan_error,
                    },
                    "to_loop": {
                        "stacks": [
                            {"path": tree.format_path(s.path), "layers": s.num_layers,
                             "period": s.period, "depths": list(s.depths) or None,
                             "leftover": s.leftover}
                            for s in it.to_loop
                        ],
                        "error": it.to_loop_error,
                    },
                    "known_layout": it.known,
                }
                for it in self.items
            ],
        }


def inspect(
    path: str | Path,
    *,
    step: int | None = None,
    scan_options: dict[str, Any] | None = None,
    loop_options: dict[str, Any] | None = None,
) -> Inspection:
    """Describe the checkpoint at ``path`` without reading its array data.

    Args:
      scan_options: `ckptconv.to_scan`'s options (pattern, into, period, layers,
        groups …) for the "to-scan would stack" part.
      loop_options: `ckptconv.to_loop`'s options (source, pattern, period, axis).
    """
    path = storage.as_path(path)
    scan_options = dict(scan_options or {})
    loop_options = dict(loop_options or {})
    with storage.cached_listings():
        fmt = formats.detect(path)
        layout = fmt.describe(path, step)
    items = []
    for name, item_path in layout.items.items():
        t = fmt.read_lazy(item_path)
        rep = ItemReport(name, item_path)
        try:
            rep.to_scan = find_groups(t, **{k: v for k, v in scan_options.items() if k != "axis"})
            if not scan_options.get("groups") and scan_options.get("pattern") is None:
                rep.near = find_near_groups(t)
            # The lazy conversion checks the layers as to-scan will (no data read).
            to_scan(t, **scan_options)
        except CkptconvError as e:
            rep.to_scan_error = str(e)
        try:
            given = {k: v for k, v in loop_options.items() if v is not None}
            stacks = loop_stacks(t, **given)
            # And the checks to-loop makes beyond finding the stacks (a stack
            # made with --layers beside its list), lazily: no data read.
            to_loop(t, **given)
            rep.to_loop = stacks
        except NothingToConvertError as e:
            if "Stacks seen" in str(e):
                rep.to_loop_hint = str(e)
        except CkptconvError as e:
            rep.to_loop_error = str(e)
        rep.leaves = _fold_rows(t, rep.to_scan)
        # Lists default to-scan would not stack (T5's block 0) get no proposal.
        try:
            stackable = {
                tree.format_path(g.path + (g.holder,)) for g in find_groups(t) if g.holder is not None
            }
        except CkptconvError:
            stackable = set()
        rep.known = known.propose(t, stackable)
        items.append(rep)
    return Inspection(layout.format, layout.kind, path, layout.step, items)


def _fold_rows(t: Any, groups: list[Group]) -> list[LeafRow]:
    """One row per leaf, with the members of each group folded into one row.

    Members fold only where shape and dtype agree: a group to-scan refuses
    (layer 0 unlike the rest) shows the odd member by its own path beside the
    folded row of the others, so that sizes and byte counts stay true."""
    members = {}
    for g in groups:
        parent = g.path + (g.holder,) if g.holder is not None else g.path
        for k in g.keys:
            members[parent + (k,)] = g.template
    # (folded path, shape, dtype) -> the row, and the first leaf it stands for
    rows: dict[tuple, tuple[LeafRow, tuple]] = {}
    for p, x in tree.leaves_with_paths(t):
        folded = list(p)
        for depth in range(len(p), 0, -1):
            template = members.get(tuple(p[:depth]))
            if template is not None:
                folded[depth - 1] = template
                break
        key = tree.format_path(folded)
        shape = tree.leaf_shape(x)
        dtype = tree.leaf_dtype(x)
        if dtype is None and tree.is_number(x):
            dtype = type(x).__name__  # a Python number (a msgpack train state's step)
        dtype = None if dtype is None else str(dtype)
        nbytes = getattr(x, "nbytes", 0)
        seen = rows.get((key, shape, dtype))
        if seen is not None:
            seen[0].count += 1
        else:
            rows[(key, shape, dtype)] = (LeafRow(key, shape, dtype, int(nbytes)), p)
    variants = Counter(key for key, _, _ in rows)
    for (key, _, _), (row, first) in rows.items():
        if variants[key] > 1 and row.count == 1:
            row.path = tree.format_path(first)  # the odd one out, by its own name
    return [row for row, _ in rows.values()]

"""Matching the two forms' intermediates (the loop form's stacked with the same
`to_scan`, layer by layer, wrappers and layer renames followed) and comparing
them within tolerance (`compare_intermediates`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptconv import lazy
from ckptconv import tree as treelib
from ckptconv.errors import GroupError, NothingToConvertError, VerifyError
from ckptconv.groups import Group, find_groups
from ckptconv.stack import to_scan
from ckptconv.verify.precision import _tolerance
from ckptconv.verify.report import Row
from ckptconv.verify.run import _listed, _shapes
from ckptconv.verify.structure import _flat, _layer_map, _where


def _compare(
    name: str, layer: int | None, a: np.ndarray, b: np.ndarray, atol: float | None,
    rtol: float | None, rounding: str = "float32",
) -> Row:
    dtype = np.dtype(a.dtype)
    at, rt = _tolerance(dtype, atol, rtol, rounding)
    x, y = a.astype(np.float64), b.astype(np.float64)
    if x.shape != y.shape:
        return Row(layer, name, dtype.name, math.inf, math.inf, math.inf, math.inf, False)
    with np.errstate(invalid="ignore"):
        d = np.abs(x - y)
    # Equal values (equal infinities included) and NaN in both forms agree;
    # any other NaN difference is infinitely wrong.
    d = np.where((x == y) | (np.isnan(x) & np.isnan(y)), 0.0, d)
    d = np.where(np.isnan(d), math.inf, d)
    if d.size == 0:
        return Row(layer, name, dtype.name, 0.0, 0.0, 0.0, 0.0, True)
    # Where the loop value is not finite, only an exact match passes.
    bound = np.where(np.isfinite(x), at + rt * np.abs(np.where(np.isfinite(x), x, 0.0)), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(d == 0, 0.0, d / np.abs(x))
        ratio = np.where(d == 0, 0.0, d / bound)
    worst = float(ratio.max())
    return Row(
        layer, name, dtype.name, float(d.max()), float(d.mean()), float(rel.max()), worst,
        bool((d <= bound).all()),
    )


#
# The loop form's intermediates are stacked as its params were (the same
# groups, layer axis 0, as nn.scan stacks them), on `Ref` leaves that name the
# loop value's path, so the same plan serves the check before running (on
# jax.eval_shape's shapes) and the comparison after (on the values).


def _refs(tree: Any, path: tuple = ()) -> Any:
    """``tree`` with every array leaf replaced by ``Ref(source=its path)``."""
    if tree is None or (not treelib.is_leaf(tree) and treelib._is_container(tree)):
        if tree is None:
            return None
        return treelib._map_children(tree, lambda v, p: _refs(v, p), path)
    shape = getattr(tree, "shape", None)
    try:
        dtype = np.dtype(tree.dtype)
    except (AttributeError, TypeError):
        return tree
    return tree if shape is None else lazy.Ref(path, tuple(shape), dtype)


def _is_digit(k: Any) -> bool:
    return isinstance(k, int) or (isinstance(k, str) and k.isdigit())


def _get(tree: Any, path: tuple) -> Any:
    node = tree
    for k in path:
        if isinstance(node, Mapping) and k in node:
            node = node[k]
        elif isinstance(node, (tuple, list)) and isinstance(k, int) and k < len(node):
            node = node[k]
        else:
            return None
    return node


def _inter_specs(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """to_scan options that stack the loop form's intermediates as ``groups``
    (the params' groups) were stacked."""
    specs: list[dict[str, Any]] = []
    for g in groups:
        in_place = g.holder is not None and g.into == g.holder
        partial = g.start != 0 or (g.total and g.num_layers != g.total)
        spec = {
            "pattern": g.template, "into": None if in_place else g.into, "period": g.period,
            "remainder": g.remainder,
            "layers": (g.start, g.start + g.num_layers) if partial else None,
        }
        if spec not in specs:
            specs.append(spec)
    return specs


@dataclass
class _Plan:
    """Which loop value(s) each scan intermediate is compared with."""

    want: dict[tuple, Any]  # scan path -> Ref (a loop path) or Stack (one Ref per layer)
    got: dict[tuple, Any]  # scan path -> scan value
    where: list[tuple[tuple, list[int], bool]]
    skipped: list[str]
    names: list[str]
    #: scan path -> the path rows are named by, where it is not the scan path
    labels: dict[tuple, tuple] = field(default_factory=dict)
    #: scan-form values with no loop counterpart, not compared (`_wrapper_calls`)
    extra: list[str] = field(default_factory=list)

    def stacked(self) -> bool:
        """Whether the scan form recorded anything of its stacked layers
        (else its nn.scan does not stack the intermediates collection)."""
        return any(_where(p, self.where) is not None for p in self.got)

    def hint(self) -> str:
        """What to check where the forms' intermediates do not correspond."""
        names = (
            "Do both forms name their modules alike (the layers' own names inside, the "
            "stacked key outside)?"
        )
        if self.stacked():  # the collection is stacked: not that hint again
            return names
        return (
            "Does the scan module stack the intermediates collection? nn.scan(..., "
            f"variable_axes={{'params': 0, 'intermediates': 0}}). {names}"
        )

    def mismatch(self) -> tuple[list[str], list[str], list[str]]:
        loop_only = [treelib.format_path(p) for p in self.want if p not in self.got]
        scan_only = [treelib.format_path(p) for p in self.got if p not in self.want]
        scan_only = [p for p in scan_only if p not in self.extra]
        shape = []
        for p, e in self.want.items():
            if p in self.got:
                se, sg = treelib.leaf_shape(e), treelib.leaf_shape(self.got[p])
                if se != sg:
                    shape.append(
                        f"{treelib.format_path(p)}: loop form {list(se) if se is not None else se} "
                        f"(stacked), scan form {list(sg) if sg is not None else sg}"
                    )
        return loop_only, scan_only, shape


def _same_leaves(a: Any, b: Any) -> bool:
    """Whether two records hold leaves at the same paths with the same shapes."""
    return _shapes(a) == _shapes(b) and bool(_shapes(a))


def _wrapper_calls(
    tree: Any, scan_inter: Any, want: dict[tuple, Any], labels: dict[tuple, tuple],
    where: list[tuple[tuple, list[int], bool]],
) -> tuple[dict[tuple, Any], list[str]]:
    """A scanned subclass of the loop's block (``class ScanBlock(Block)``
    whose ``__call__`` returns ``(super().__call__(x), None)``, the usual
    ``nn.scan`` idiom) records one more call per layer call than the loop's
    block: after the block's own records (the loop's ``m`` per call, compared
    with them) its ``(carry, ys)``, whose carry is compared with the block's
    last record of that call (or with its first item, for a block returning
    ``(x, …)``), in rows named ``__call__[c]/carry`` (``c`` the loop's index
    of that record). ``ys`` has no loop counterpart: its paths are returned,
    not compared. Returns ``want`` so remapped (in its order) and those
    paths; ``labels`` is updated in place."""
    records = {
        p[: i + 1] for p in _flat(scan_inter)
        for i, k in enumerate(p) if k == "__call__" and _where(p, where) is not None
    }
    moved: dict[tuple, list[tuple[tuple, Any]]] = {}
    extra: list[str] = []
    for rec in sorted(records, key=treelib.format_path):
        loop_calls, scan_calls = _get(tree, rec), _get(scan_inter, rec)
        if not (isinstance(loop_calls, (tuple, list)) and isinstance(scan_calls, (tuple, list))):
            continue
        calls = len(scan_calls) - len(loop_calls)  # one (carry, ys) per call
        if calls <= 0 or len(loop_calls) % calls:
            continue
        m = len(loop_calls) // calls  # the block's records per call
        pairs: list[tuple[int, int, Any]] = []  # (loop index, scan index, loop record)
        carries: list[tuple[int, int, Any]] = []  # (loop index of the last record, scan index, its carry)
        for g in range(calls):
            for j in range(m):
                pairs.append((g * m + j, g * (m + 1) + j, loop_calls[g * m + j]))
            last, outer = loop_calls[g * m + m - 1], scan_calls[g * (m + 1) + m]
            if not (isinstance(outer, (tuple, list)) and outer):
                break
            if _same_leaves(outer[0], last):
                carries.append((g * m + m - 1, g * (m + 1) + m, last))
            elif isinstance(last, (tuple, list)) and last and _same_leaves(outer[0], last[0]):
                carries.append((g * m + m - 1, g * (m + 1) + m, last[0]))
            else:
                break
        if len(carries) != calls or not all(_same_leaves(scan_calls[s], r) for _, s, r in pairs):
            continue
        first: tuple | None = None
        for c, s, record in pairs:
            for sub, leaf in treelib.leaves_with_paths(record):
                moved.setdefault(rec + (c,) + sub, [])
                first = first or rec + (c,) + sub
                moved[first].append((rec + (s,) + sub, leaf))
                labels[rec + (s,) + sub] = rec + (c,) + sub
            carry = next((x for x in carries if x[0] == c), None)
            if carry is None:
                continue
            _, s, value = carry
            for sub, leaf in treelib.leaves_with_paths(value):
                moved[first].append((rec + (s, 0) + sub, leaf))
                labels[rec + (s, 0) + sub] = rec + (c, "carry") + sub
            for sub, _ in treelib.leaves_with_paths(tuple(scan_calls[s][1:])):
                extra.append(treelib.format_path(rec + (s, 1 + sub[0]) + sub[1:]))
    if not moved:
        return want, extra
    out: dict[tuple, Any] = {}
    for p, leaf in want.items():
        out.update(moved.pop(p) if p in moved else {p: leaf})
    for pairs_of in moved.values():  # records the stacked loop tree did not list
        out.update(pairs_of)
    return out, extra


def _plan(loop_inter: Any, scan_inter: Any, specs: list[dict[str, Any]]) -> _Plan:
    tree = _refs(loop_inter)
    # A layer collection (Hugging Face's FlaxGPT2BlockCollection: children
    # 0 … N-1) records its own calls beside its layers: set them aside.
    own: dict[tuple, dict[Any, Any]] = {}

    def strip(node: Any, path: tuple) -> None:
        if not isinstance(node, dict):
            return
        digits = [k for k in node if _is_digit(k)]
        others = [k for k in node if not _is_digit(k)]
        if len(digits) >= 1 and others and all(isinstance(node[k], dict) for k in digits):
            own[path] = {k: node.pop(k) for k in others}
        for k, v in node.items():
            strip(v, path + (k,))

    has_list = any(s["pattern"] == "{i}" for s in specs)
    if has_list:
        strip(tree, ())
    where: list[tuple[tuple, list[int], bool]] = []
    for spec in specs:
        try:
            found = find_groups(tree, **spec)
            tree = to_scan(tree, axis=0, **spec)
        except NothingToConvertError:
            continue
        except GroupError as e:
            raise VerifyError(
                f"the loop model's layers do not record the same intermediates, so they cannot "
                f"be stacked to compare with the scan form's: {e}"
            ) from e
        where += _layer_map(found)
    want = _flat(tree)
    got = _flat(scan_inter)
    skipped: list[str] = []
    for path, records in own.items():
        for k, value in records.items():
            here = _get(tree, path + (k,))
            n_stacked = len(here) if isinstance(here, (tuple, list)) else 0
            there = _get(scan_inter, path + (k,))
            n_scan = len(there) if isinstance(there, (tuple, list)) else None
            calls = value if isinstance(value, (tuple, list)) else None
            if calls is not None and n_scan == n_stacked + len(calls):
                # The scan form's module records the collection's call after its layers'.
                for j, c in enumerate(calls):
                    for sub, leaf in treelib.leaves_with_paths(c):
                        want[path + (k, n_stacked + j) + sub] = leaf
            elif calls is not None and (n_scan == n_stacked or (n_scan is None and n_stacked == 0)):
                skipped.append(treelib.format_path(path + (k,)))
            else:
                for sub, leaf in treelib.leaves_with_paths(value):
                    want[path + (k,) + sub] = leaf
    labels: dict[tuple, tuple] = {}
    want, extra = _wrapper_calls(tree, scan_inter, want, labels, where)
    # nn.scan's contract: a scanned layer returns (carry, ys), the loop's layer
    # the carry alone (MaxText's `(x, None) if scan_layers else x`): the scan
    # form's record of the call then holds the carry at index 0 and nothing else.
    for p in [p for p in want if p not in got and p + (0,) in got]:
        if not any(q[: len(p)] == p and q[len(p)] != 0 for q in got if len(q) > len(p)):
            want[p + (0,)] = want.pop(p)
            labels[p + (0,)] = p
    names: list[str] = []
    for p in want:
        w = _where(p, where)
        if w is not None and (w[2] is False or isinstance(want[p], lazy.Stack)):
            n = _inter_name(labels.get(p, p)[len(w[0]):])
            if n not in names:
                names.append(n)
    return _Plan(want, got, where, skipped, names, labels, extra)


def _no_match_error(plan: _Plan) -> VerifyError:
    loop_only, scan_only, shape = plan.mismatch()
    lines = [
        f"the loop and scan models' intermediates do not correspond ({len(loop_only)} in the "
        f"loop form only, {len(scan_only)} in the scan form only, {len(shape)} of another "
        "shape), so not every layer could be compared. Nothing was run."
    ]
    lines += _listed("loop form only (after stacking its layers)", loop_only)
    lines += _listed("scan form only", scan_only)
    lines += _listed("shape", shape)
    lines.append(f"  {plan.hint()}")
    return VerifyError("\n".join(lines))


def _rows(
    plan: _Plan, values: dict[tuple, Any], atol: float | None, rtol: float | None,
    rounding: str = "float32",
) -> list[Row]:
    def row(*args: Any) -> Row:
        return _compare(*args, atol, rtol, rounding)

    rows: list[Row] = []
    for p, e in plan.want.items():
        if p not in plan.got:
            continue
        b = np.asarray(plan.got[p])
        w = _where(p, plan.where)
        label = plan.labels.get(p, p)
        if isinstance(e, lazy.Stack) and w is not None:
            prefix, layers, _ = w
            name = _inter_name(label[len(prefix):])
            if b.shape[:1] != (len(e.parts),):
                a = np.stack([np.asarray(values[r.source]) for r in e.parts])
                rows.append(row(name, None, a, b))
                continue
            for i, part in enumerate(e.parts):
                layer = layers[i] if i < len(layers) else i
                rows.append(row(name, layer, np.asarray(values[part.source]), b[i]))
            continue
        if isinstance(e, lazy.Stack):
            a = np.stack([np.asarray(values[r.source]) for r in e.parts])
        elif isinstance(e, lazy.Ref):
            a = np.asarray(values[e.source])
        else:
            a = np.asarray(e)
        if w is not None and not w[2]:
            rows.append(row(_inter_name(label[len(w[0]):]), w[1][0], a, b))
        else:
            rows.append(row(_inter_name(label), None, a, b))
    rows.sort(key=lambda r: (r.passed, -r.worst, r.layer if r.layer is not None else -1))
    return rows


def compare_intermediates(
    loop_inter: Any, scan_inter: Any, *, pattern: str | None = None, into: str | None = None,
    atol: float | None = None, rtol: float | None = None,
    period: int | None = None, remainder: str = "separate", groups: Sequence[Group] | None = None,
    rounding: str = "float32",
) -> tuple[list[Row], list[str]]:
    """Rows for every intermediate of every layer (worst first), and the names
    found in only one form. The loop form's intermediates are stacked as the
    params ``groups`` were (or as ``to_scan(..., pattern, into, period)``
    would), on axis 0; each row names the real layer number and the
    intermediate's path inside the layer. ``rounding`` (what float32 matmul
    inputs were rounded to, `matmul_rounding`) picks the default tolerances."""
    if groups is not None:
        specs = _inter_specs(groups)
    else:
        specs = [{"pattern": pattern, "into": into, "period": period, "remainder": remainder, "layers": None}]
    plan = _plan(loop_inter, scan_inter, specs)
    values = _flat(loop_inter)
    loop_only, scan_only, _ = plan.mismatch()
    unmatched = [f"loop: {p}" for p in loop_only] + [f"scan: {p}" for p in scan_only]
    return _rows(plan, values, atol, rtol, rounding), unmatched


def _inter_name(path: Sequence[Any]) -> str:
    """``('self_attention', '__call__', 0)`` -> ``self_attention/__call__[0]``."""
    out = ""
    for k in path:
        out += f"[{k}]" if isinstance(k, int) else (f"/{k}" if out else str(k))
    return out

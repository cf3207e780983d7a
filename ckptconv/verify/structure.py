"""The structural check: SCAN against ``to_scan(LOOP)`` bit for bit, one leaf pair at
a time, differences reported per leaf and per layer (`check_structure`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ckptconv import lazy
from ckptconv import tree as treelib
from ckptconv.errors import VerifyError
from ckptconv.groups import Group, find_groups
from ckptconv.stack import to_scan
from ckptconv.verify.report import LeafCheck
from ckptconv.verify.sides import _Side


def _flat(t: Any) -> dict[tuple, Any]:
    return {p: x for p, x in treelib.leaves_with_paths(t)}


def _describe(x: Any) -> str:
    shape, dtype = treelib.leaf_shape(x), treelib.leaf_dtype(x)
    if shape is None:
        return repr(x)
    return f"{dtype}{list(shape)}"


def _layer_map(groups: Sequence[Group]) -> list[tuple[tuple, list[int], bool]]:
    """Where each layer went: ``(path, layer numbers, stacked)`` per subtree of
    the converted tree. A stacked subtree's ``layer numbers[b]`` is the layer at
    index ``b`` of its layer axis (with a period K, ``<into>/<name_j>`` holds
    layers ``j, K + j, 2K + j …``); an unstacked leftover (``<into>_remainder/
    <name_j>``) holds the one layer listed."""
    out: list[tuple[tuple, list[int], bool]] = []
    for g in groups:
        if not g.period:
            out.append((g.target, [g.start + i for i in range(g.num_layers)], True))
            continue
        stacks, rest = g.blocks()
        for j, positions in enumerate(stacks):
            out.append((g.target + (g.sub_name(j),), [g.start + p for p in positions], True))
        for j, p in enumerate(rest):
            assert g.remainder_target is not None
            out.append((g.remainder_target + (g.sub_name(j),), [g.start + p], False))
    return out


def _where(path: tuple, where: list[tuple[tuple, list[int], bool]]) -> tuple[tuple, list[int], bool] | None:
    return next((w for w in where if path[: len(w[0])] == w[0]), None)


_CHUNK = 1 << 22  # elements compared at a time: bounded temporaries on large leaves


def _flat_view(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a).reshape(-1)
    return a.view(np.uint8) if a.dtype.itemsize and a.dtype.kind != "O" else a


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    x, y = _flat_view(a), _flat_view(b)
    step = _CHUNK * 4
    return all(np.array_equal(x[i : i + step], y[i : i + step]) for i in range(0, x.size, step))


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if not (a.dtype.kind in "fciu" or a.dtype.name == "bfloat16"):
        return float("nan")
    x, y = a.reshape(-1), b.reshape(-1)
    best = 0.0
    for i in range(0, x.size, _CHUNK):
        with np.errstate(invalid="ignore"):
            d = np.abs(x[i : i + _CHUNK].astype(np.float64) - y[i : i + _CHUNK].astype(np.float64))
        if d.size:
            m = np.nanmax(d) if not np.isnan(d).all() else math.nan
            best = m if math.isnan(m) or math.isnan(best) else max(best, float(m))
    return float(best)


def _scan_opts(
    pattern: str | None, into: str | None, period: int | None, remainder: str,
    layers: Any, groups: Any,
) -> dict[str, Any]:
    opts: dict[str, Any] = {"period": period, "remainder": remainder, "layers": layers}
    if groups is not None:
        opts["groups"] = groups
    else:
        opts.update(pattern=pattern, into=into)
    return opts


def check_structure(
    loop: Any, scan: Any, *, pattern: str | None = None, into: str | None = None, axis: int = 0,
    period: int | None = None, remainder: str = "separate", layers: Any = None,
    groups: Any = None, loop_read: Callable[[Any], np.ndarray] | None = None,
    scan_read: Callable[[Any], np.ndarray] | None = None,
    only: Sequence[tuple[str, ...]] | None = None,
    root: tuple[str, ...] | None = None,
    dtype: np.dtype | None = None,
    items: bool = False,
) -> list[LeafCheck]:
    """Compare SCAN with ``to_scan(LOOP)`` (same options) leaf by leaf, layer by
    layer; ``LeafCheck.layers`` are real layer numbers (``K·b + j`` with a period).

    ``only``, ``root``, ``dtype``: SCAN was written with ``--only``, ``--root``,
    ``--dtype`` (a train state's params, cast for serving): LOOP is taken as
    the conversion takes it (subtrees kept before to_scan, the root taken and
    the floating leaves cast after it); SCAN is compared as it is, so a SCAN
    that was not cast fails on its dtypes. ``items``: the trees' top keys are
    a CheckpointManager step's items, and ``only`` / ``root`` apply in each
    (as the conversion applies them).

    Trees may have lazy leaves (`ckptconv.lazy.Ref`, as the formats'
    ``read_lazy`` gives them), read with ``loop_read``/``scan_read``: then one
    SCAN leaf and one LOOP layer are in memory at a time."""
    opts = _scan_opts(pattern, into, period, remainder, layers, groups)
    from ckptconv import subset

    parts = dict(loop) if items else {None: loop}  # item name -> its tree
    if only:
        for q in only:
            whys = [why for _, why in (subset.find(t, q) for t in parts.values()) if why is not None]
            if len(whys) == len(parts):
                raise VerifyError(f"--only {'/'.join(q)}: not in LOOP: {whys[0]}.")
        kept = {n: subset.keep_only(t, list(only)) for n, t in parts.items()}
        parts = {n: t for n, t in kept.items() if t is not None}  # an item with none is left out
    loop = parts if items else parts[None]
    expected = to_scan(loop, axis=axis, **opts)
    where = _layer_map(find_groups(loop, **opts))
    if root:
        roots, whys = {}, []
        for n, t in (expected.items() if items else [(None, expected)]):
            sub, why = subset.find(t, tuple(root))
            if why is None:
                roots[n] = sub
            else:
                whys.append(why)
        if not roots:
            raise VerifyError(f"--root {'/'.join(root)}: not in to_scan(LOOP): {whys[0]}.")
        expected = roots if items else roots[None]
        head = 1 if items else 0
        n = len(root)
        where = [(p[:head] + p[head + n:], ls, st) for p, ls, st in where
                 if tuple(map(str, p[head:head + n])) == tuple(root)]
    if dtype is not None:
        expected, _ = subset.cast(expected, dtype)
    lside, sside = _Side("LOOP", loop, loop_read), _Side("SCAN", scan, scan_read)
    want, got = _flat(expected), _flat(scan)
    checks = []
    for p, e in want.items():
        name = treelib.format_path(p)
        if p not in got:
            checks.append(LeafCheck(name, "missing", expected=_describe(e)))
            continue
        f = got[p]
        se, sf = treelib.leaf_shape(e), treelib.leaf_shape(f)
        if se != sf:
            checks.append(LeafCheck(name, "shape", str(se), str(sf)))
            continue
        de, df = treelib.leaf_dtype(e), treelib.leaf_dtype(f)
        if de != df:
            checks.append(LeafCheck(name, "dtype", str(de), str(df)))
            continue
        if se is None:
            same = e == f
            checks.append(LeafCheck(name, "equal" if same else "differs", repr(e), repr(f)))
            continue
        checks.append(_check_leaf(name, p, e, f, lside, sside, where, axis))
        del f
    for p, f in got.items():
        if p not in want:
            checks.append(LeafCheck(treelib.format_path(p), "unexpected", found=_describe(f)))
    return checks


def _check_leaf(
    name: str, p: tuple, e: Any, f: Any, lside: _Side, sside: _Side,
    where: list[tuple[tuple, list[int], bool]], axis: int,
) -> LeafCheck:
    """One leaf pair. A stacked leaf of a lazy LOOP is compared layer by layer
    (SCAN's leaf, then each LOOP layer in turn), never stacked in memory."""
    b = sside.value(f)
    w = _where(p, where)
    cast_to = None
    if isinstance(e, lazy.Cast) and isinstance(e.value, lazy.Stack):
        cast_to, e = e.dtype, e.value  # cast layer by layer, as the writers do
    if isinstance(e, lazy.Stack):
        layers, worst = [], 0.0
        for i, part in enumerate(e.parts):
            a = lside.value(part)
            if cast_to is not None:
                a = a.astype(cast_to)
            bi = np.take(b, i, axis=e.axis)
            if not _same_bits(a, bi):
                layers.append(w[1][i] if w is not None and i < len(w[1]) else i)
                worst = _nanmax(worst, _max_abs(a, bi))
        if not layers:
            return LeafCheck(name, "equal")
        return LeafCheck(name, "differs", layers=layers, max_abs=worst)
    a = lside.value(e)
    if _same_bits(a, b):
        return LeafCheck(name, "equal")
    layers: list[int] = []
    if w is not None and not w[2]:
        layers = list(w[1])  # an unstacked leftover layer
    elif w is not None and a.ndim > axis:
        for i in range(a.shape[axis]):
            if not _same_bits(np.take(a, i, axis), np.take(b, i, axis)):
                layers.append(w[1][i] if i < len(w[1]) else i)
    return LeafCheck(name, "differs", layers=layers, max_abs=_max_abs(a, b))


def _nanmax(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return max(a, b)

"""Layout by example (``--like REF``): the options that turn IN into REF's structure.

REF is a checkpoint already in the target layout (MaxText's own checkpoint of
the same config in the other form, a Hugging Face file). From the two trees'
metadata alone (no array data is read), `infer` works out the direction, every
group or stack with its name, pattern and period, and the layer axis of each,
as the ordinary options (``pattern``/``into``/``groups``, ``source``/``pattern``
/``stacks``, ``period``, ``remainder``, ``layers``, ``axis``, ``axis_for``), so
the conversion itself is the usual one and prints, records and undoes as
usual. `differences` then compares the planned output with REF, path by path
(missing, unexpected, shape, dtype): a conversion whose output would not have
REF's structure is refused before anything is written.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from ckptconv import axes
from ckptconv.errors import GroupError
from ckptconv.groups import find_groups, numbered_candidates
from ckptconv.tree import format_path, is_number, leaf_dtype, leaf_shape, leaves_with_paths

_SHOWN = 5


def _node(tree: Any, path: tuple) -> Any:
    node = tree
    for k in path:
        if isinstance(node, Mapping):
            if k in node:
                node = node[k]
            elif str(k) in node:
                node = node[str(k)]
            else:
                return None
        elif isinstance(node, (list, tuple)) and str(k).isdigit() and int(k) < len(node):
            node = node[int(k)]
        else:
            return None
    return node


def _leaves(tree: Any) -> dict[str, Any]:
    return {format_path(p): x for p, x in leaves_with_paths(tree)}


def _axes_of(small: Any, big: Any, n: int) -> set[int] | None:
    """Positions where ``big``'s shape is ``small``'s with a layer axis of ``n``."""
    s, b = leaf_shape(small), leaf_shape(big)
    if s is None or b is None or len(b) != len(s) + 1:
        return None
    return {a for a in range(len(b)) if b[a] == n and b[:a] + b[a + 1:] == s}


def _group_axis(where: str, members: list[Any], stacked: Any, n: int) -> int:
    """The one layer axis that stacks ``members[0]``'s leaves into ``stacked``'s."""
    mine, theirs = _leaves(members[0]), _leaves(stacked)
    if set(mine) != set(theirs):
        raise GroupError(
            f"{where}: REF's stack holds other leaves than the layers: "
            + _set_diff(set(mine), set(theirs))
        )
    common: set[int] | None = None
    for p in mine:
        got = _axes_of(mine[p], theirs[p], n)
        if not got:
            raise GroupError(
                f"{where}/{p}: a layer has shape {leaf_shape(mine[p])}, and REF's stack "
                f"{leaf_shape(theirs[p])}, which is no stack of {n} such layers on any axis."
            )
        common = got if common is None else common & got
        if not common:
            raise GroupError(
                f"{where}: REF stacks its leaves on different axes ({p} on "
                f"{sorted(got)}); ckptconv places one layer axis per group."
            )
    return min(common) if common else 0


def _set_diff(mine: set[str], theirs: set[str]) -> str:
    a, b = sorted(mine - theirs), sorted(theirs - mine)
    parts = []
    if a:
        parts.append("the layers have " + ", ".join(a[:_SHOWN]) + (" …" if len(a) > _SHOWN else ""))
    if b:
        parts.append("REF has " + ", ".join(b[:_SHOWN]) + (" …" if len(b) > _SHOWN else ""))
    return "; ".join(parts) + "."


def _template_of(keys: list[str]) -> str | None:
    found = {re.sub(r"(0|[1-9][0-9]*)$", "{i}", k) for k in keys}
    if len(found) != 1:
        return None
    (t,) = found
    return t if "{i}" in t else None


# -------------------------------------------------------------------- to-scan


def _scan_options(tree: Any, ref: Any, pattern: str | None = None) -> dict[str, Any]:
    groups = find_groups(tree, pattern)
    if groups or pattern is not None:
        return _scan_groups(tree, ref, groups)
    # Auto-numbered layers (flax's `Block_0 … Block_N-1`) are no group by
    # default; REF shows whether they are the layers it stacks.
    tried = []
    for _, template, _ in numbered_candidates(tree):
        if template in tried:
            continue
        tried.append(template)
        try:
            return _scan_groups(tree, ref, find_groups(tree, template))
        except GroupError:
            continue
    return _scan_groups(tree, ref, [])


def _scan_groups(tree: Any, ref: Any, groups: list[Any]) -> dict[str, Any]:
    if not groups:
        raise GroupError("IN has no layer groups to stack, so it cannot take REF's scan form.")
    pairs: list[tuple[str, str]] = []
    periods, remainders = set(), set()
    bases, chosen, kept = [], [], []
    failed: list[str] = []
    for g in groups:
        base = g.path + ((g.holder,) if g.holder is not None else ())
        parent = _node(ref, g.path)
        where = format_path(g.path)
        if not isinstance(parent, Mapping):
            failed.append(f"{where}: REF has no such subtree, so it shows no place for its layers.")
            continue
        source = _node(tree, base)
        members = [source[k] for k in g.keys]
        if g.holder is not None:
            here = set(map(str, _node(tree, g.path).keys()))
            candidates = [g.holder] + [k for k in parent if str(k) not in here]
        else:
            here = set(map(str, _node(tree, g.path).keys()))
            candidates = [k for k in parent if str(k) not in here]
        into, period, remainder, axis = None, None, None, None
        why = None  # why the last candidate is no stack of these layers
        for k in candidates:
            sub = parent[k]
            if not isinstance(sub, Mapping) or not sub:
                continue
            if all(str(c).isdigit() for c in sub):
                continue  # still a list of layers: not a stack
            t = _template_of([str(c) for c in sub])
            names = [g.template.replace("{i}", str(j)) if g.template != "{i}" else str(j)
                     for j in range(len(sub))]
            if t is not None and set(map(str, sub)) == set(names) and len(sub) < len(members):
                # blocks of K layers: <into>/<name_j> (and <into>_remainder)
                K = len(sub)
                rest = parent.get(f"{k}_remainder")
                try:
                    ax = _group_axis(f"{where}/{k}/{names[0]}", members[:1], sub[names[0]],
                                     _depth(sub[names[0]], members[0]))
                except GroupError:
                    continue
                into, period, axis = str(k), K, ax
                remainder = "separate" if rest is not None else "extend"
                break
            # `nn.scan` inside a wrapper module (`blocks/ScanBlock_0/...`):
            # the stack sits under a chain of lone keys below `k`.
            inner, at = sub, [str(k)]
            while True:
                try:
                    axis = _group_axis(f"{where}/{'/'.join(at)}", members, inner, len(members))
                except GroupError as e:
                    why = why if len(at) > 1 else str(e)
                    lone = list(inner) if isinstance(inner, Mapping) else []
                    if len(lone) == 1 and isinstance(inner[lone[0]], Mapping) and len(at) < 4:
                        inner = inner[lone[0]]
                        at.append(str(lone[0]))
                        continue
                    axis = None
                break
            if axis is None:
                continue
            into = "/".join(at)
            break
        if into is None:
            failed.append(
                f"{format_path(base)}: {len(members)} layers ({', '.join(map(str, g.keys[:3]))} …), "
                f"but REF holds no stack of them under {where} (its keys there: "
                f"{', '.join(map(str, list(parent)[:8]))}"
                + (f"; {why.rstrip('.')}" if why else "") + ")."
            )
            continue
        if (g.template, into) not in pairs:
            pairs.append((g.template, into))
        periods.add(period)
        remainders.add(remainder)
        bases.append(base)
        chosen.append(axis)
        kept.append(g)
    if not kept:
        raise GroupError(" ".join(failed[:2]))
    if len(periods) > 1:
        raise GroupError("REF stacks some groups in blocks and others not; convert them one at a time.")
    opts: dict[str, Any] = _axis_options(tree, bases, groups_sigs(tree, kept), chosen)
    if len(pairs) == 1:
        opts["pattern"], opts["into"] = pairs[0]
    else:
        opts["groups"] = pairs
    (period,) = periods
    if period:
        opts["period"] = period
        (opts["remainder"],) = remainders
    return opts


def _depth(stacked: Any, layer: Any) -> int:
    """The layer count of a stack of ``layer``s (from any leaf whose rank grew)."""
    a, b = _leaves(layer), _leaves(stacked)
    for p, x in a.items():
        s, big = leaf_shape(x), leaf_shape(b.get(p))
        if s is not None and big is not None and len(big) == len(s) + 1:
            for i in range(len(big)):
                if big[:i] + big[i + 1:] == s:
                    return big[i]
    return 0


def groups_sigs(tree: Any, groups: list[Any]) -> list[frozenset]:
    out = []
    for g in groups:
        base = g.path + ((g.holder,) if g.holder is not None else ())
        out.append(axes.signature(_node(tree, base + (g.keys[0],))))
    return out


def _axis_options(tree: Any, bases: list[tuple], sigs: list[frozenset], chosen: list[int]) -> dict[str, Any]:
    """``axis`` (the params') and ``axis_for`` (every group the rule would place
    elsewhere) that give each group its ``chosen`` axis."""
    under = [c for b, c in zip(bases, chosen) if axes.PARAMS in map(str, b)]
    pool = under or chosen
    axis = max(set(pool), key=pool.count)
    rule = axes.choose(bases, sigs, axis, {}, params=axes.has_params(tree))
    axis_for = {format_path(b): c for b, c, r in zip(bases, chosen, rule) if c != r}
    opts: dict[str, Any] = {"axis": axis}
    if axis_for:
        opts["axis_for"] = axis_for
    return opts


# -------------------------------------------------------------------- to-loop


def _loop_options(tree: Any, ref: Any) -> dict[str, Any]:
    found: list[tuple[tuple, str, str, int | None, int]] = []  # (path, source, pattern, period, start)

    def walk(mine: Any, theirs: Any, path: tuple) -> None:
        if not isinstance(mine, Mapping) or not isinstance(theirs, Mapping):
            return
        mk, tk = {str(k): k for k in mine}, {str(k): k for k in theirs}
        only_mine = [k for k in mk if k not in tk]
        only_theirs = [k for k in tk if k not in mk]
        for k in mk:
            if k in tk:
                sub_t = theirs[tk[k]]
                sub_m = mine[mk[k]]
                if (isinstance(sub_t, Mapping) and sub_t and all(str(c).isdigit() for c in sub_t)
                        and isinstance(sub_m, Mapping) and not all(str(c).isdigit() for c in sub_m)):
                    # A digit list in REF where IN has a stack under the same key.
                    found.append((path, k, "{i}", None, 0))
                    continue
                walk(sub_m, sub_t, path + (k,))
        if not only_mine:
            return
        t = _template_of(only_theirs) if only_theirs else None
        for k in only_mine:
            sub = mine[mk[k]]
            if k.endswith("_remainder") or not isinstance(sub, Mapping):
                continue
            sub_keys = [str(c) for c in sub]
            if t is not None:
                names = {t.replace("{i}", str(j)) for j in range(len(sub_keys))}
                period = len(sub_keys) if set(sub_keys) == names and len(sub_keys) < len(only_theirs) else None
                found.append((path, k, t, period, 0))
                # `nn.scan` inside a wrapper module: the stack under lone keys
                # (blocks/ScanBlock_0); the one whose leaves are REF's layers' wins.
                chain, inner = [k], sub
                while (isinstance(inner, Mapping) and len(inner) == 1 and len(chain) < 4
                       and isinstance(next(iter(inner.values())), Mapping)):
                    c = next(iter(inner))
                    chain.append(str(c))
                    inner = inner[c]
                    found.append((path, "/".join(chain), t, None, 0))
            else:
                # A digit list in REF named otherwise (to-scan --into), or beside
                # what is left of it in IN (T5: block/0 stays, the rest was stacked).
                for name in tk:
                    lst = theirs[tk[name]]
                    if not (isinstance(lst, Mapping) and lst and all(str(c).isdigit() for c in lst)):
                        continue
                    if name in mk:
                        have = len(mine[mk[name]]) if isinstance(mine[mk[name]], Mapping) else 0
                    elif name in only_theirs:
                        have = 0
                    else:
                        continue
                    found.append((path, k, f"{name}/{{i}}", None, have))
                    break

    walk(tree, ref, ())
    if not found:
        raise GroupError("IN has no stack that REF holds as separate layers, so it cannot take REF's loop form.")
    pairs: list[tuple[str, str]] = []
    periods, starts = set(), set()
    bases, sigs, chosen = [], [], []
    failed: list[str] = []
    for path, source, pattern, period, start in found:
        try:
            ax = _loop_axis(tree, ref, path, source, pattern, period, start)
        except GroupError as e:
            failed.append(str(e))  # not a stack REF unstacks: the structure check names it
            continue
        stacked = _node(tree, path + tuple(source.split("/")))
        if (source, pattern) not in pairs:
            pairs.append((source, pattern))
        periods.add(period)
        starts.add(start)
        bases.append(path + tuple(source.split("/")))
        sigs.append(axes.signature(stacked))
        chosen.append(ax)
    if not pairs:
        raise GroupError(" ".join(failed[:2]))
    if len(periods) > 1 or len(starts) > 1:
        raise GroupError("REF unstacks some stacks in blocks (or from other layer numbers) and others not; convert them one at a time.")
    opts = _axis_options(tree, bases, sigs, chosen)
    if len(pairs) == 1:
        opts["source"], opts["pattern"] = pairs[0]
    else:
        opts["stacks"] = pairs
    (period,) = periods
    if period:
        opts["period"] = period
    (start,) = starts
    if start:
        opts["layers"] = f"{start}:"
    return opts


def _loop_axis(tree: Any, ref: Any, path: tuple, source: str, pattern: str,
               period: int | None, start: int) -> int:
    """The layer axis of the stack ``path/source``, from REF's first layer."""
    stacked = _node(tree, path + tuple(source.split("/")))
    holder, _, template = pattern.rpartition("/") if "/" in pattern else (None, "", pattern)
    lst_path = path + ((holder,) if holder else ((source,) if template == "{i}" else ()))
    first = template.replace("{i}", str(start)) if template != "{i}" else str(start)
    layer = _node(ref, lst_path + (first,))
    if layer is None:
        raise GroupError(f"{format_path(lst_path + (first,))}: not in REF.")
    if period:
        sub_name = template.replace("{i}", "0")
        sub = stacked[sub_name] if sub_name in stacked else stacked
        n = _depth(sub, layer)
        return _group_axis(format_path(path + (source, sub_name)), [layer], sub, n)
    n = _depth(stacked, layer)
    return _group_axis(format_path(path + (source,)), [layer], stacked, n)


# -------------------------------------------------------------------- both


def infer(tree: Any, ref: Any, pattern: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(to, options)`` that convert ``tree`` into ``ref``'s layout.

    ``pattern``: the layers' keys in ``tree`` where the default detection
    does not find them (``Block_{i}``, auto-numbered); a to-scan then groups by it.

    Raises:
      GroupError: the two trees are not one model in two forms, saying where.
    """
    _check_renamed(tree, ref)
    errors = []
    for to, fn in (("scan", lambda t, r: _scan_options(t, r, pattern)), ("loop", _loop_options)):
        try:
            return to, fn(tree, ref)
        except GroupError as e:
            errors.append(f"as to-{to}: {e}")
    raise GroupError("cannot see how IN becomes REF's layout: " + " ".join(errors))


def _check_renamed(tree: Any, ref: Any) -> None:
    """Both in loop form, the same layers under other names (``layer_{i}``
    here, ``layers_{i}`` in REF): no conversion of one form into the other,
    so say that, with the two steps that rename them."""
    try:
        mine = {(g.path, len(g.keys)): g for g in find_groups(tree) if g.holder is None}
        theirs = [g for g in find_groups(ref) if g.holder is None]
    except GroupError:
        return
    for g in theirs:
        m = mine.get((g.path, len(g.keys)))
        if m is not None and m.template != g.template and not any(t.template == m.template for t in theirs):
            raise GroupError(
                f"IN's layers {format_path(m.path + (m.template,))} ({len(m.keys)}) are REF's "
                f"{format_path(g.path + (g.template,))} under another name: both are in loop form, "
                "and ckptconv converts between the two forms without renaming layers. Rename them "
                f"in two steps: ckptconv to-scan --pattern '{m.template}', then ckptconv "
                f"to-loop --pattern '{g.template}' of its output."
            )


def _shape(x: Any) -> tuple[int, ...] | None:
    """A leaf's shape, a Python number's ``()``: a step saved by
    ``flax.serialization.to_bytes`` (a msgpack int) fits a like whose step is
    a 0-d array (``jax.eval_shape`` of a train state), and the other way; the
    number takes the other side's dtype."""
    return () if is_number(x) else leaf_shape(x)


def _shape_text(x: Any) -> str:
    return "a number" if is_number(x) else str(leaf_shape(x))


def differences(
    out: Any,
    ref: Any,
    *,
    names: tuple[str, str] = ("OUT", "REF"),
    ignore_dtype: Callable[[Any, Any], bool] | None = None,
) -> list[str]:
    """What differs between the planned output and REF, path by path.

    ``names`` are the two sides in the text; ``ignore_dtype(a, b)`` is true
    for a pair of leaves whose dtype difference does not count (a restore
    that casts)."""
    ours, theirs = names
    a, b = _leaves(out), _leaves(ref)
    lines = []
    missing = [p for p in b if p not in a]
    extra = [p for p in a if p not in b]
    if missing:
        lines.append(f"{len(missing)} in {theirs} but not in {ours}: " + ", ".join(missing[:_SHOWN])
                     + (" …" if len(missing) > _SHOWN else ""))
    if extra:
        lines.append(f"{len(extra)} in {ours} but not in {theirs}: " + ", ".join(extra[:_SHOWN])
                     + (" …" if len(extra) > _SHOWN else ""))
    shapes = [f"{p} {_shape_text(a[p])} vs {theirs} {_shape_text(b[p])}"
              for p in a if p in b and _shape(a[p]) != _shape(b[p])]
    if shapes:
        lines.append(f"{len(shapes)} shapes differ: " + "; ".join(shapes[:_SHOWN])
                     + (" …" if len(shapes) > _SHOWN else ""))
    dtypes = [f"{p} {leaf_dtype(a[p])} vs {theirs} {leaf_dtype(b[p])}"
              for p in a if p in b and _shape(a[p]) == _shape(b[p])
              and leaf_dtype(a[p]) != leaf_dtype(b[p]) and not is_number(a[p]) and not is_number(b[p])
              and not (ignore_dtype is not None and ignore_dtype(a[p], b[p]))]
    if dtypes:
        lines.append(f"{len(dtypes)} dtypes differ: " + "; ".join(dtypes[:_SHOWN])
                     + (" …" if len(dtypes) > _SHOWN else ""))
    return lines


def agreeing_top_keys(out: Any, ref: Any, *, ignore_dtype: Callable[[Any, Any], bool] | None = None) -> list[str]:
    """The top-level keys under which the output and REF agree exactly."""
    if not isinstance(out, Mapping) or not isinstance(ref, Mapping):
        return []
    return [str(k) for k in out
            if k in ref and not differences(out[k], ref[k], ignore_dtype=ignore_dtype)]

"""Unstacking: to-loop, a stacked subtree into one subtree per layer. No I/O.

The inverse of `ckptconv.stack`, including blocks of K layers (``--period``)
and numbering from START (``--layers``). Lazy leaves are answered with
`ckptconv.lazy.Slice`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ckptconv import lazy
from ckptconv.errors import GroupError, NothingToConvertError
from ckptconv.groups import (
    _range_text,
    _remainder_key,
    _template_regex,
    find_groups,
    find_near_groups,
    layer_name,
    parse_layers,
)
from ckptconv.tree import (
    _MAX_LISTED,
    _axis_metadata,
    _check_axis,
    _children,
    _is_container,
    _is_mapping,
    _jax_array,
    _map_children,
    _nnx_state,
    _nnx_variable,
    _partitioned,
    _rebuild_mapping,
    copy_containers,
    format_path,
    leaf_shape,
    leaves_with_paths,
)


@dataclass(frozen=True)
class Stacked:
    """A stacked subtree that to-loop unstacks.

    Attributes:
      path: keys from the root to the stacked subtree (its last key is the
        ``source`` name).
      num_layers: the length of the layer axis (with ``period``: all layers,
        the blocks' and the leftovers').
      period: the block size (``--period``), or None.
      depths: with ``period``, each block stack's length.
      leftover: with ``period``, the unstacked layers under ``<path>_remainder``.
    """

    path: tuple[str, ...]
    num_layers: int
    period: int | None = None
    depths: tuple[int, ...] = ()
    leftover: int = 0
    pattern: str = "layer_{i}"
    start: int = 0

    def describe(self) -> str:
        """``decoder/layers: 13 layers (period 6: …) -> decoder/layers_{i}``."""
        holder, template = loop_template(self.pattern)
        parent = self.path[:-1]
        if holder is not None:
            dest = parent + (holder, template)
        elif template == "{i}":
            dest = self.path + ("{i}",)
        else:
            dest = parent + (template,)
        how = ""
        if self.period:
            how = f" (blocks of {self.period}, {'/'.join(map(str, sorted(set(self.depths))))} deep"
            how += f", {self.leftover} in {format_path(self.path)}_remainder)" if self.leftover else ")"
        first = f", numbered from {self.start}" if self.start else ""
        count = f"{self.num_layers} layer" + ("s" if self.num_layers != 1 else "")
        return f"{format_path(self.path)}: {count}{how} -> {format_path(dest)}{first}"


def find_stacks(
    tree: Any,
    source: str = "blocks",
    *,
    axis: int = 0,
    period: int | None = None,
    pattern: str = "layer_{i}",
) -> list[Stacked]:
    """The stacked subtrees (key ``source``) that `to_loop` would unstack.

    With ``period``, each ``source`` subtree holds ``period`` stacks named by
    ``pattern`` (``layers_0 … layers_{K-1}``), and the leftover layers sit
    unstacked beside it under ``<source>_remainder``.

    Raises:
      GroupError: a stacked subtree whose leaves disagree on the layer count,
        or whose blocks do not match ``period``.
    """
    out: list[Stacked] = []
    loop_form: list[tuple[tuple, Any]] = []

    def walk(node: Any, path: tuple) -> None:
        if not _is_container(node):
            return
        items = list(node.items()) if _is_mapping(node) else _children(node)[0]
        for k, v in items:
            if _is_mapping(node) and k == source:
                rest = _remainder_key(source)
                if not period and rest in node:
                    count = len(v) if _is_mapping(v) else 0
                    names = _template_of(list(v.keys())) if _is_mapping(v) else None
                    raise GroupError(
                        f"{format_path(path + (k,))}: beside it is {format_path(path + (rest,))}, "
                        f"as in MaxText's blocks of {count} layers (Gemma-3, Llama-4). Pass "
                        f"--period {count} and --pattern naming the layers inside it "
                        + (f"(--pattern '{names}')." if names else "(for example 'layers_{i}').")
                    )
                if _is_layer_list(v):
                    # A list of layers, in loop form: left alone when other
                    # subtrees of this name are stacks (HF ResNet's stages,
                    # some of which to-scan could not stack), else an error.
                    loop_form.append((path + (k,), v))
                    continue
                ax = _axis_at(axis, path + (k,))
                if period:
                    out.append(_period_stack(node, path, source, ax, period, pattern))
                else:
                    out.append(Stacked(path + (k,), _layer_count(v, path + (k,), ax)))
            elif period and _is_mapping(node) and k == _remainder_key(source):
                continue
            else:
                walk(v, path + (k,))

    walk(tree, ())
    if loop_form and not out:
        where, v = loop_form[0]
        raise GroupError(
            f"{format_path(where)}: its keys are layer numbers "
            f"({', '.join(map(str, list(v.keys())[:3]))} …): it is a list of layers, "
            "already in loop form. Use to-scan to stack it."
        )
    return out


def _is_layer_list(v: Any) -> bool:
    """A mapping keyed by layer numbers: loop form, nothing to unstack."""
    return _is_mapping(v) and bool(v) and all(_is_digit_key(c) for c in v.keys())


def _axis_at(axis: Any, path: tuple) -> int:
    """``axis`` is an int, or a function of the stack's path (per-collection axes)."""
    return axis(path) if callable(axis) else axis


def stack_axes(tree: Any, sources: list[str], axis: int, axis_for: Any = None) -> Any:
    """The layer axis of every stack named in ``sources``, as a function of its
    path, by `ckptconv.axes.choose` (params and their mirrors on ``axis``,
    other collections on 0, ``axis_for`` overriding)."""
    from ckptconv import axes

    rule = axes.parse_axis_for(axis_for)
    for n in rule.values():
        _check_axis(n)
    if not axis and not rule:
        return axis
    paths: list[tuple] = []

    def walk(node: Any, path: tuple) -> None:
        if not _is_container(node):
            return
        items = list(node.items()) if _is_mapping(node) else _children(node)[0]
        for k, v in items:
            if _is_mapping(node) and k in sources:
                paths.append(path + (k,))
            else:
                walk(v, path + (k,))

    walk(tree, ())
    subs = []
    for p in paths:
        node = tree
        for k in p:
            node = node[k] if _is_mapping(node) else dict(_children(node)[0])[k]
        subs.append(axes.signature(node))
    chosen = dict(zip(paths, axes.choose(paths, subs, axis, rule, params=axes.has_params(tree))))
    return lambda path: chosen.get(tuple(path), axis)


def _is_digit_key(k: Any) -> bool:
    return (isinstance(k, int) and not isinstance(k, bool)) or (isinstance(k, str) and k.isdigit())


def _template_of(keys: list[Any]) -> str | None:
    """``['layers_0', 'layers_1']`` -> ``'layers_{i}'``: the template naming ``0 … K-1``."""
    import re

    found = {re.sub(r"(0|[1-9][0-9]*)$", "{i}", str(k)) for k in keys}
    if len(found) != 1:
        return None
    (template,) = found
    if "{i}" not in template:
        return None
    want = {template.replace("{i}", str(j)) for j in range(len(keys))}
    return template if want == {str(k) for k in keys} else None


def _period_stack(node: Any, path: tuple, source: str, axis: int, k: int, pattern: str) -> Stacked:
    here = path + (source,)
    sub = node[source]
    names = [layer_name(pattern, j) if pattern != "{i}" else str(j) for j in range(k)]
    if not _is_mapping(sub):
        raise GroupError(f"{format_path(here)}: --period {k} expects a subtree of {k} stacks here.")
    keys = {str(key): key for key in sub.keys()}
    have = [n for n in names if n in keys]
    if len(have) != k or len(keys) != k:
        found = ", ".join(map(str, list(sub.keys())[:_MAX_LISTED]))
        count = sum(1 for key in sub.keys() if _template_regex(pattern if pattern != "{i}" else "{i}").match(str(key)))
        hint = f" It holds {count} such stacks: pass --period {count}." if count and count != k else ""
        named = _template_of(list(sub.keys()))
        if not hint and named and named != pattern:
            hint = f" Pass --pattern '{named}'."
        raise GroupError(
            f"{format_path(here)}: --period {k} expects the stacks {names[0]} … {names[-1]} "
            f"here (named by --pattern {pattern!r}), but it holds {found or 'nothing'}.{hint}"
        )
    depths = [_layer_count(sub[keys[n]], here + (keys[n],), axis) for n in names]
    rest = node.get(_remainder_key(source)) if _is_mapping(node) else None
    extra = 0
    if rest is not None:
        rpath = path + (_remainder_key(source),)
        rkeys = {str(key) for key in rest.keys()} if _is_mapping(rest) else set()
        extra = len(rkeys)
        if rkeys != set(names[:extra]) or extra >= k:
            raise GroupError(
                f"{format_path(rpath)}: the leftover layers must be {names[0]} … "
                f"{names[max(extra - 1, 0)]} (fewer than the period {k}), but found "
                f"{', '.join(sorted(rkeys)) or 'nothing'}."
            )
    b = min(depths)
    extended = sum(1 for d in depths if d == b + 1)
    ok = all(d in (b, b + 1) for d in depths) and all(
        d == b + 1 for d in depths[:extended]
    ) and not (extended and extra)
    if not ok:
        shown = ", ".join(f"{n}: {d}" for n, d in zip(names, depths))
        raise GroupError(
            f"{format_path(here)}: with --period {k} every stack must hold the same number "
            f"of layers (or the first ones one more), but they hold {shown}. Check --period "
            "and --axis."
        )
    return Stacked(here, k * b + extended + extra, period=k, depths=tuple(depths), leftover=extra)


def _layer_count(sub: Any, path: tuple, axis: int) -> int:
    counts: dict[int, tuple] = {}
    arrays = leaves_with_paths(sub)
    if not arrays:
        raise GroupError(
            f"{format_path(path)}: nothing to unstack, the subtree holds no arrays."
        )
    for p, x in arrays:
        shape = leaf_shape(x)
        if shape is None:
            raise GroupError(
                f"{format_path(path + p)}: {type(x).__name__} {x!r} is not an array, so it "
                "has no layer axis. Is this subtree stacked? Name the stacked one with --from."
            )
        if len(shape) <= axis:
            raise GroupError(
                f"{format_path(path + p)}: shape {shape} has no layer axis {axis}. "
                "Is this subtree stacked? Pass the right --axis or --from."
            )
        counts.setdefault(shape[axis], path + p)
    if len(counts) > 1:
        (n0, p0), (n1, p1) = list(counts.items())[:2]
        others = [
            a for a in range(4) if a != axis
            and all(len(leaf_shape(x)) > a for _, x in arrays)
            and len({leaf_shape(x)[a] for _, x in arrays}) == 1
        ]
        hint = (
            f"All of them have length {leaf_shape(arrays[0][1])[others[0]]} on axis {others[0]}: "
            f"pass --axis {others[0]}."
            if others
            else "Pass the right --axis, or --from naming the stacked subtree."
        )
        raise GroupError(
            f"{format_path(path)}: leaves disagree on the layer count on axis {axis}: "
            f"{format_path(p0)} has {n0}, {format_path(p1)} has {n1}. " + hint
        )
    n = next(iter(counts))
    if n == 0:
        raise GroupError(f"{format_path(path)}: the layer axis {axis} has length 0: no layers.")
    return n


def _unstack_leaf(x: Any, n: int, axis: int, axis_name: str) -> list[Any]:
    if x is None:
        return [None] * n
    if isinstance(x, lazy.Ref):
        return lazy.unstack(x, axis)
    if isinstance(x, _axis_metadata()):
        values = _unstack_leaf(x.unbox(), n, axis, axis_name)
        out = []
        for v in values:
            boxed = x.replace_boxed(v)
            if isinstance(boxed, _partitioned()):
                boxed = boxed.remove_axis(axis, {"partition_name": axis_name})
            out.append(boxed)
        return out
    if isinstance(x, _nnx_variable()):
        return [x.replace(v) for v in _unstack_leaf(x.get_value(), n, axis, axis_name)]
    if isinstance(x, _jax_array()):
        return _unstack_jax(x, n, axis)
    x = np.asarray(x)
    index: list[Any] = [slice(None)] * axis
    # The trailing Ellipsis keeps a layer of a 1-d stack a 0-d array (a view),
    # as it was before stacking, not a numpy scalar.
    return [x[tuple(index + [i, Ellipsis])] for i in range(n)]


def _unstack_jax(x: Any, n: int, axis: int) -> list[Any]:
    import jax

    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = list(sharding.spec) + [None] * (x.ndim - len(sharding.spec))
        del spec[axis]
        out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
        take = jax.jit(
            lambda a, i: jax.lax.dynamic_index_in_dim(a, i, axis, keepdims=False),
            out_shardings=out,
        )
        return [take(x, i) for i in range(n)]
    return [jax.lax.index_in_dim(x, i, axis, keepdims=False) for i in range(n)]


def _unstack_tree(sub: Any, n: int, axis: int, axis_name: str) -> list[Any]:
    if _is_mapping(sub):
        per_key = [(k, _unstack_tree(v, n, axis, axis_name)) for k, v in sub.items()]
        return [_rebuild_mapping(sub, [(k, vs[i]) for k, vs in per_key]) for i in range(n)]
    if _is_container(sub):
        items, rebuild = _children(sub)
        per_item = [_unstack_tree(v, n, axis, axis_name) for _, v in items]
        return [rebuild([vs[i] for vs in per_item]) for i in range(n)]
    return _unstack_leaf(sub, n, axis, axis_name)


def _unstack_layers(node: Any, path: tuple, source: str, axis: int, axis_name: str,
                    period: int | None, pattern: str) -> list[Any]:
    """The layers of ``node[source]`` in layer order (with ``period``: its blocks
    and ``<source>_remainder`` interleaved back)."""
    sub = node[source]
    if not period:
        return _unstack_tree(sub, _layer_count(sub, path + (source,), axis), axis, axis_name)
    st = _period_stack(node, path, source, axis, period, pattern)
    keys = {str(k): k for k in sub.keys()}
    names = [layer_name(pattern, j) if pattern != "{i}" else str(j) for j in range(period)]
    per_block = [
        _unstack_tree(sub[keys[nm]], d, axis, axis_name) for nm, d in zip(names, st.depths)
    ]
    layers: list[Any] = [None] * st.num_layers
    for j, block in enumerate(per_block):
        for b, layer in enumerate(block):
            layers[period * b + j] = layer
    if st.leftover:
        rest = node[_remainder_key(source)]
        rkeys = {str(k): k for k in rest.keys()}
        base = period * min(st.depths)
        for j in range(st.leftover):
            layers[base + j] = copy_containers(rest[rkeys[names[j]]])
    return layers


def to_loop(
    tree: Any,
    *,
    source: str = "blocks",
    pattern: str | None = None,
    axis: int = 0,
    axis_name: str = "layers",
    period: int | None = None,
    layers: Any = None,
    stacks: Any = None,
    axis_for: Any = None,
) -> Any:
    """Unstack every subtree named ``source`` into one subtree per layer.

    Args:
      tree: a checkpoint tree holding stacked subtrees.
      source: the key of the stacked subtrees; every one, at any depth, is
        unstacked (params, optimizer ``mu``/``nu`` …). A path
        (``"blocks/ScanBlock_0"``: `nn.scan` called inside a wrapper module)
        names a stack under a chain of lone keys; its layers take the
        chain's place.
      pattern: the layers' keys, with ``{i}`` (default ``layer_{i}``; a stack
        beside a list of the same layers it was taken from, T5's, is then an
        error that names the ``NAME/{i}`` pattern). ``"{i}"`` puts the layers back
        under ``source`` itself as a digit-keyed list (keys ``'0' … 'N-1'``);
        ``"NAME/{i}"`` puts them into the digit-keyed list ``NAME`` beside
        ``source`` (merged with the layers already there: T5's ``block/0``).
      axis: the layer axis of every leaf of the params and the trees that
        mirror them; other collections' stacks have theirs on 0 (see
        `ckptconv.axes`).
      axis_for: ``{"nnx_aux": 0}`` (or ``["nnx_aux=0"]``): the layer axis of
        the stacks under a collection or path, overriding the rule.
      axis_name: the partition name removed from boxed leaves' ``names``.
      period: the inverse of `to_scan`'s ``period``: ``source`` holds K stacks
        named by ``pattern`` and the leftovers are under ``<source>_remainder``.
      layers: ``"START:"`` (or ``"START:STOP"``, checked against the layer
        count): number the layers from START, the inverse of `to_scan`'s
        ``layers``.
      stacks: several stacks in one call: a list of ``(source, pattern)``
        pairs (or dicts with ``source``, ``pattern``, ``period``, ``layers``).

    Returns:
      A new tree. For numpy leaves, layers are views of the stacked arrays.

    Raises:
      GroupError: no ``source`` subtree, leaves that disagree on the layer
        count, blocks that do not match ``period``, or a layer key that
        already exists.
    """
    _check_axis(axis)
    tree, specs = _collapse(tree, _loop_specs(source, pattern, period, layers, stacks))
    specs = _hf_defaults(tree, specs)
    axis = stack_axes(tree, [s[0] for s in specs], axis, axis_for)
    loop_stacks(tree, axis=axis, stacks=specs)  # raises when there is nothing to unstack
    by_source = {src: (pat, per, rng) for src, pat, per, rng in specs}

    def convert(node: Any, path: tuple) -> Any:
        if not _is_container(node):
            return node
        # A list of layers already in loop form is left as it is (find_stacks).
        here = [
            s for s in by_source
            if _is_mapping(node) and s in node and not _is_layer_list(node[s])
        ]
        if not here:
            return _map_children(node, convert, path)
        outputs: dict[Any, list[tuple[Any, Any]]] = {}
        merged: dict[Any, list[tuple[Any, Any]]] = {}
        drop = set()
        for src in here:
            pat, per, rng = by_source[src]
            holder, template = loop_template(pat)
            layers_ = _unstack_layers(
                node, path, src, _axis_at(axis, path + (src,)), axis_name, per, template
            )
            n = len(layers_)
            start = 0 if rng is None else (rng[0] or 0)
            if rng is not None and rng[1] is not None and rng[1] - start != n:
                raise GroupError(
                    f"{format_path(path + (src,))}: --layers {_range_text(rng)} names "
                    f"{rng[1] - start} layers, but the stack holds {n}. Pass --layers {start}:"
                    f"{start + n} (or {start}:)."
                )
            if per:
                drop.add(_remainder_key(src))
            if template == "{i}" and holder is None:
                keys = range(start, start + n) if isinstance(node, _nnx_state()) else [
                    str(i) for i in range(start, start + n)
                ]
                outputs[src] = [(src, _rebuild_mapping(node, list(zip(keys, layers_))))]
                continue
            if holder is not None:
                existing = node.get(holder)
                int_keys = isinstance(node, _nnx_state()) or (
                    existing is not None and any(isinstance(k, int) for k in existing)
                )
                keys = [i if int_keys else str(i) for i in range(start, start + n)]
                if existing is None:
                    outputs[src] = [(holder, _rebuild_mapping(node, list(zip(keys, layers_))))]
                    continue
                if existing is not None:
                    if not _is_mapping(existing):
                        raise GroupError(
                            f"{format_path(path + (holder,))}: is not a list of layers, so "
                            f"--pattern {pat!r} cannot add layers to it."
                        )
                    taken = [k for k in keys if k in existing]
                    if taken:
                        raise GroupError(
                            f"{format_path(path)}: cannot unstack {src!r} into {pat!r}: "
                            f"{format_path(path + (holder, taken[0]))} already exists. "
                            "Number the layers with --layers START: or choose another --pattern."
                        )
                merged[holder] = merged.get(holder, []) + list(zip(keys, layers_))
                outputs[src] = []
                continue
            if src in specs.defaulted:
                holder = _source_list(node, node[src], _axis_at(axis, path + (src,)))
                if holder is not None:
                    raise GroupError(
                        f"{format_path(path + (src,))}: beside it is the list "
                        f"{format_path(path + (holder,))} of the same layers "
                        f"({', '.join(map(str, list(node[holder])[:3]))}), so it was stacked from "
                        f"that list with --layers. Put the layers back into it with --pattern "
                        f"'{holder}/{{i}}' --layers {len(node[holder])}:, or name them with --pattern."
                    )
            names = [layer_name(template, i) for i in range(start, start + n)]
            taken = [nm for nm in names if nm in node]
            if taken:
                raise GroupError(
                    f"{format_path(path)}: cannot unstack {src!r} into "
                    f"{pat!r}: {format_path(path + (taken[0],))} already exists. "
                    "Choose other layer names with --pattern, or number them with --layers START:."
                )
            outputs[src] = list(zip(names, layers_))
        items: list[tuple[Any, Any]] = []
        for k, v in node.items():
            if k in outputs:
                items.extend(outputs[k])
            elif k in drop:
                continue
            elif k in merged:
                both = list(v.items()) + merged.pop(k)
                both.sort(key=lambda kv: int(kv[0]))
                items.append((k, _rebuild_mapping(v, both)))
            else:
                items.append((k, convert(v, path + (k,))))
        return _rebuild_mapping(node, items)

    return convert(tree, ())


def _loop_specs(source: Any, pattern: Any, period: Any, layers: Any, stacks: Any) -> list[tuple]:
    """``[(source, pattern, period, layers)]`` for `to_loop`'s arguments, checked.

    A pattern not given is ``layer_{i}``; its source is in `_DEFAULTED` of the result.
    """
    if stacks is None:
        specs = [(source, pattern, period, layers)]
    else:
        specs = []
        for s in stacks:
            if isinstance(s, Mapping):
                specs.append((s.get("source", "blocks"), s.get("pattern"),
                              s.get("period", period), s.get("layers", layers)))
            elif isinstance(s, (tuple, list)) and len(s) == 2:
                specs.append((s[0], s[1], period, layers))
            elif isinstance(s, tuple) and len(s) == 4:
                specs.append(s)
            else:
                raise GroupError(f"stack {s!r}: expected (source, pattern) or a dict.")
    sources = [s[0] for s in specs]
    dup = sorted({s for s in sources if sources.count(s) > 1})
    if dup:
        raise GroupError(f"--from {dup[0]!r} is given twice; name each stacked subtree once.")
    out = _Specs()
    for src, pat, per, rng in specs:
        if pat is None:
            out.defaulted.add(src)
        pat = pat or "layer_{i}"
        loop_template(pat)
        if per is not None and (not isinstance(per, int) or isinstance(per, bool) or per < 1):
            raise GroupError(f"period must be a positive integer, got {per!r}.")
        out.append((src, pat, per, parse_layers(rng)))
    return out


def _collapse(tree: Any, specs: _Specs) -> tuple[Any, _Specs]:
    """``source="blocks/ScanBlock_0"`` (`nn.scan` called inside a wrapper
    module named ``blocks``): every ``blocks`` holding only that chain of keys
    stands for the stack at its end, so the layers take ``blocks``' place.
    Returns the tree so rewritten and the specs with ``source="blocks"``."""
    chains = {s[0]: s[0].split("/") for s in specs if isinstance(s[0], str) and "/" in s[0]}
    if not chains:
        return tree, specs

    def end(v: Any, rest: list[str]) -> Any:
        for k in rest:
            if not (_is_mapping(v) and len(v) == 1 and k in v):
                return None
            v = v[k]
        return v

    def walk(node: Any, path: tuple) -> Any:
        if not _is_container(node):
            return node
        if not _is_mapping(node):
            return _map_children(node, walk, path)
        items = []
        for k, v in node.items():
            inner = next((got for parts in chains.values() if k == parts[0]
                          for got in [end(v, parts[1:])] if got is not None), None)
            items.append((k, inner if inner is not None else walk(v, path + (k,))))
        return _rebuild_mapping(node, items)

    out = _Specs()
    for src, pat, per, rng in specs:
        head = chains[src][0] if src in chains else src
        if src in specs.defaulted:
            out.defaulted.add(head)
        out.append((head, pat, per, rng))
    return walk(tree, ()), out


def _hf_defaults(tree: Any, specs: _Specs) -> _Specs:
    """A Hugging Face layer list stacked in place (``transformer/h``,
    ``model/layers`` …: `ckptconv.known`) goes back as the digit-keyed list HF
    loads when no pattern is given: ``layer_{i}`` there is a model whose
    layers ``from_pretrained`` would initialise at random."""
    from ckptconv import known

    if not (_is_mapping(tree) and any(str(k) in known.HF_ROOTS for k in tree.keys())):
        return specs
    out = _Specs()
    out.defaulted = set(specs.defaulted)
    for src, pat, per, rng in specs:
        if src in specs.defaulted and str(src) in known.HF_LISTS and per is None and rng is None:
            try:
                hf = [st.path for st in find_stacks(tree, src)]
            except GroupError:  # not a stack on axis 0: to-loop itself will say
                hf = []
            if hf and all(str(p[0]) in known.HF_ROOTS for p in hf):
                out.defaulted.discard(src)
                pat = "{i}"
        out.append((src, pat, per, rng))
    return out


class _Specs(list):
    """`_loop_specs`' result: the specs, and the sources whose pattern was not given."""

    def __init__(self) -> None:
        super().__init__()
        self.defaulted: set = set()


def suggest_stacks(tree: Any) -> list[str]:
    """What looks stacked in ``tree``, as to-loop options (for "nothing named X").

    A subtree whose array leaves all have one length on axis 0 or 1, and
    differ in shape otherwise, is a stack; ``X`` beside ``X_remainder`` is
    MaxText's blocks (``--period``); a stack beside a digit-keyed list of the
    same layers was stacked from it with ``--layers`` (T5).
    """
    from ckptconv import known

    out: list[tuple[str, str]] = []  # (where, "(what): options")
    try:
        if find_groups(tree) or find_near_groups(tree):
            return []  # loop form (T5's too): its layers would look like stacks
    except GroupError:
        pass

    def walk(node: Any, path: tuple, axes: tuple[int, ...]) -> None:
        if not _is_container(node):
            return
        items = list(node.items()) if _is_mapping(node) else _children(node)[0]
        for k, v in items:
            if not _is_container(v):
                continue
            here = format_path(path + (k,))
            if _is_mapping(node) and isinstance(k, str) and k.endswith("_remainder") and k[: -len("_remainder")] in node:
                continue
            if _is_mapping(node) and _remainder_key(k) in node and _is_mapping(v):
                template = _template_of(list(v.keys())) or "layers_{i}"
                axis = _common_axis(v, (0, 1))
                out.append((here,
                    f"(blocks of {len(v)}): --from {k} --pattern '{template}' --period {len(v)}"
                    + (f" --axis {axis[0]}" if axis and axis[0] else "")
                ))
                continue
            axis = _common_axis(v, axes)
            if axis is None:
                walk(v, path + (k,), axes)
                continue
            opts = f"--from {k}" + (f" --axis {axis[0]}" if axis[0] else "")
            holder = _source_list(node, v, axis[0]) if _is_mapping(node) else None
            if holder is not None:
                opts += f" --pattern '{holder}/{{i}}' --layers {len(node[holder])}:"
            elif axis[0] == 1:  # MaxText stacks on axis 1; its loop form names layers_{i}
                opts += f" --pattern '{k}_{{i}}' (MaxText's loop names)"
            elif path and str(path[0]) in known.HF_ROOTS and str(k) in known.HF_LISTS:
                opts += f" (a Hugging Face layer list: the layers come back as {k}/0, {k}/1 …)"
            elif k != "blocks":
                opts += (f" (and --pattern '{k}_{{i}}' for the names {k}_0, {k}_1 …, or "
                         "--pattern '{i}' if it replaced a digit-keyed list, as for HF and NNX)")
            out.append((here, f"({axis[1]} layers on axis {axis[0]}): {opts}"))

    # Axis 0 first: a whole parent whose leaves happen to share a hidden size on
    # axis 1 is less likely a stack than a child sharing its layer count on axis 0.
    for axes in ((0,), (1,)):
        walk(tree, (), axes)
        if out:
            break
    # One line for stacks that take the same options (params and the
    # optimizer moments that mirror them).
    by_advice: dict[str, list[str]] = {}
    for where, advice in out:
        by_advice.setdefault(advice, []).append(where)
    return [", ".join(w[:3]) + (f" and {len(w) - 3} more" if len(w) > 3 else "") + f" {advice}"
            for advice, w in by_advice.items()]


def _common_axis(sub: Any, axes: tuple[int, ...]) -> tuple[int, int] | None:
    """``(axis, length)`` when every array leaf of ``sub`` has that length on that
    axis (the first of ``axes`` that fits) and the leaves have more than one
    shape; else None."""
    shapes = [leaf_shape(x) for _, x in leaves_with_paths(sub)]
    if len(shapes) < 2 or any(s is None for s in shapes) or len(set(shapes)) < 2:
        return None
    for a in axes:
        if all(len(s) > a for s in shapes) and len({s[a] for s in shapes}) == 1:
            return a, shapes[0][a]
    return None


def _source_list(node: Any, stacked: Any, axis: int) -> Any:
    """The digit-keyed sibling list whose members look like layers of ``stacked``."""
    want = sorted(
        (tuple(map(str, p)), tuple(s[:axis] + s[axis + 1 :]))
        for p, x in leaves_with_paths(stacked)
        for s in [leaf_shape(x)]
    )
    for name, sib in node.items():
        if _is_mapping(sib) and sib and all(_is_digit_key(c) for c in sib.keys()):
            for member in sib.values():
                got = sorted((tuple(map(str, p)), leaf_shape(x)) for p, x in leaves_with_paths(member))
                if all(item in got for item in want):
                    return name
    return None


def loop_stacks(
    tree: Any,
    *,
    source: str = "blocks",
    pattern: str | None = None,
    axis: int = 0,
    period: int | None = None,
    layers: Any = None,
    stacks: Any = None,
    axis_for: Any = None,
) -> list[Stacked]:
    """The stacks `to_loop` with these options would unstack (same arguments).

    Raises:
      NothingToConvertError: none; GroupError: bad options or stacks.
    """
    given = _loop_specs(source, pattern, period, layers, stacks)
    tree, specs = _collapse(tree, given)
    specs = _hf_defaults(tree, specs)
    if not callable(axis):
        axis = stack_axes(tree, [s[0] for s in specs], axis, axis_for)
    found = []
    for src, pat, per, rng in specs:
        for st in find_stacks(tree, src, axis=axis, period=per, pattern=loop_template(pat)[1]):
            found.append(replace(st, pattern=pat, start=(rng or (0, None))[0] or 0))
    if not found:
        names = " or ".join(repr(s[0]) for s in given)
        seen = suggest_stacks(tree)
        if seen:
            raise NothingToConvertError(
                f"no subtree named {names} to unstack. Stacks seen: " + "; ".join(seen[:_MAX_LISTED])
                + ". (For a ckptconv output, to-scan printed the exact command as 'to undo'.)"
            )
        top = list(tree.keys())[:_MAX_LISTED] if _is_mapping(tree) else []
        raise NothingToConvertError(
            f"no subtree named {names} to unstack; the top-level keys are "
            f"{', '.join(map(str, top)) or 'none'}. Name the stacked subtree with --from; "
            "if the checkpoint is already in loop form, use to-scan."
        )
    return found


def loop_template(pattern: str) -> tuple[str | None, str]:
    """``"layers_{i}"`` -> ``(None, "layers_{i}")``; ``"block/{i}"`` -> ``("block", "{i}")``."""
    if isinstance(pattern, str) and "/" in pattern:
        holder, _, rest = pattern.rpartition("/")
        if rest != "{i}" or not holder or "/" in holder or "{i}" in holder:
            raise GroupError(
                f"pattern {pattern!r}: a pattern with '/' must be NAME/{{i}} (the layers go "
                "into the digit-keyed list NAME, as in T5's block/{i})."
            )
        return holder, "{i}"
    _template_regex(pattern)
    return None, pattern

"""Stacking: to-scan, layer subtrees into one subtree with a layer axis. No I/O.

Works on numpy and (sharded) ``jax.Array`` leaves, boxed leaves, and the lazy
leaves of the streaming engine (answered with `ckptconv.lazy.Stack`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ckptconv import axes, lazy
from ckptconv.errors import GroupError, NothingToConvertError
from ckptconv.groups import (
    DEFAULT_PREFIXES,
    Group,
    NearGroup,
    Spec,
    _check_members,
    _find,
    _remainder_key,
    _specs,
    find_groups,
    numbered_candidates,
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
    _nnx_variable,
    _partitioned,
    _rebuild_mapping,
    copy_containers,
    format_path,
)


def _stack_leaves(xs: list[Any], axis: int, axis_name: str) -> Any:
    x0 = xs[0]
    if x0 is None:
        return None
    if isinstance(x0, lazy.Ref):
        return lazy.stack(list(xs), axis)
    if isinstance(x0, _axis_metadata()):
        value = _stack_leaves([x.unbox() for x in xs], axis, axis_name)
        boxed = x0.replace_boxed(value)
        if isinstance(boxed, _partitioned()):
            boxed = boxed.add_axis(axis, {"partition_name": axis_name})
        return boxed
    if isinstance(x0, _nnx_variable()):
        return x0.replace(_stack_leaves([x.get_value() for x in xs], axis, axis_name))
    if any(isinstance(x, _jax_array()) for x in xs):
        return _stack_jax(xs, axis)
    return np.stack([np.asarray(x) for x in xs], axis=axis)


def _stack_jax(xs: list[Any], axis: int) -> Any:
    """Stack where the data lives: the output is sharded like the inputs, with the
    new layer axis unsharded, and no array is gathered to one host."""
    import jax
    import jax.numpy as jnp

    sharding = getattr(xs[0], "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = list(sharding.spec) + [None] * (xs[0].ndim - len(sharding.spec))
        spec.insert(axis, None)
        out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
        return jax.jit(lambda *a: jnp.stack(a, axis=axis), out_shardings=out)(*xs)
    return jnp.stack(xs, axis=axis)


def _stack_trees(members: list[Any], axis: int, axis_name: str) -> Any:
    m0 = members[0]
    if _is_mapping(m0):
        return _rebuild_mapping(
            m0, [(k, _stack_trees([m[k] for m in members], axis, axis_name)) for k in m0.keys()]
        )
    if _is_container(m0):
        items, rebuild = _children(m0)
        per_member = [_children(m)[0] for m in members]
        return rebuild(
            [
                _stack_trees([pm[j][1] for pm in per_member], axis, axis_name)
                for j in range(len(items))
            ]
        )
    return _stack_leaves(members, axis, axis_name)


def to_scan(
    tree: Any,
    *,
    pattern: str | None = None,
    into: str | None = None,
    axis: int = 0,
    axis_name: str = "layers",
    period: int | None = None,
    layers: Any = None,
    remainder: str = "separate",
    groups: Any = None,
    axis_for: Any = None,
) -> Any:
    """Stack every group of layer subtrees into one subtree with a layer axis.

    Args:
      tree: a checkpoint tree: params, a whole train state, or a raw Orbax
        restore. Every group at any depth is stacked (params, batch_stats,
        optimizer ``mu``/``nu``), so a train state converts in one call.
      pattern: which keys form a group (see `find_groups`).
      into: the key under which each group's stack goes, in the group's parent
        (default ``blocks``; a path, ``"blocks/ScanBlock_0"``, nests it, as
        `nn.scan` called inside a wrapper module keeps it). Digit-keyed lists
        stacked whole are replaced in place, under their own key, unless
        ``into`` is given.
      axis: position of the new layer axis in every leaf of the params and
        the trees that mirror them (MaxText uses 1); other collections stack
        on axis 0 (see `ckptconv.axes`).
      axis_for: ``{"nnx_aux": 0}`` (or ``["nnx_aux=0"]``): the layer axis of
        the groups under a collection or path, overriding the rule.
      axis_name: partition name inserted into boxed leaves' ``names`` at
        ``axis``, as ``nn.scan(metadata_params={nn.PARTITION_NAME: ...})`` does.
      period: stack blocks of K consecutive layers, as MaxText's scanned
        Gemma-3 (K = 6) and Llama-4 do: layer ``K·b + j`` goes to
        ``<into>/<name_j>`` (``<name_j>`` by the group's template:
        ``layers_0 … layers_{K-1}``) at index ``b``; the ``N mod K`` leftover
        layers go unstacked to ``<into>_remainder/<name_j>``.
      layers: ``"START:STOP"`` (or ``(start, stop)``, a slice): stack only those
        layer numbers, renumbered from 0; the other layers stay as they are.
      remainder: ``"separate"`` (as above) or ``"extend"``: the leftovers
        extend the first ``N mod K`` stacks by one layer.
      groups: several groups in one call: a list of ``(pattern, into)`` pairs
        or dicts with ``pattern``, ``into`` (and ``period``, ``layers``,
        ``remainder``; the arguments above are their defaults), e.g.
        ``[("dense_layers_{i}", "dense_layers"), ("moe_layers_{i}", "moe_layers")]``.

    Returns:
      A new tree of the same container types; leaves outside groups are the
      input's own objects.

    Raises:
      GroupError: no group found, layer numbers not ``0 … N-1``, layers that
        differ in structure, shape or dtype, ``into`` already taken, a bad
        period or range, overlapping patterns.

    Example:
      >>> t = {"layer_0": {"w": np.zeros(2)}, "layer_1": {"w": np.ones(2)}}
      >>> to_scan(t)["blocks"]["w"].shape
      (2, 2)
    """
    _check_axis(axis)
    specs = _specs(groups, pattern, into, period, layers, remainder)
    found, near = _find(tree, specs)
    if not found:
        raise NothingToConvertError(_no_group_message(tree, specs, near))
    axis_of = group_axes(tree, found, axis, axis_for)
    by_path: dict[tuple, list[Group]] = {}
    for g in found:
        by_path.setdefault(g.path, []).append(g)

    def convert(node: Any, path: tuple) -> Any:
        here = by_path.get(path)
        if here:
            return _stack_groups(node, path, here, axis_of, axis_name, convert)
        if not _is_container(node):
            return node
        return _map_children(node, convert, path)

    return convert(tree, ())


def group_axes(tree: Any, found: list[Group], axis: int, axis_for: Any = None) -> dict[int, int]:
    """``id(group) -> layer axis`` by `ckptconv.axes.choose`."""
    rule = axes.parse_axis_for(axis_for)
    for n in rule.values():
        _check_axis(n)
    bases, sigs = [], []
    for g in found:
        base = g.path + ((g.holder,) if g.holder is not None else ())
        bases.append(base)
        sigs.append(axes.signature(_at(tree, base + (g.keys[0],))))
    chosen = axes.choose(bases, sigs, axis, rule, params=axes.has_params(tree) if axis or rule else None)
    return {id(g): n for g, n in zip(found, chosen)}


def _at(tree: Any, path: tuple) -> Any:
    node = tree
    for k in path:
        node = node[k] if _is_mapping(node) else dict(_children(node)[0])[k]
    return node


def _stacked_outputs(node: Any, g: Group, axis: int, axis_name: str) -> list[tuple[Any, Any]]:
    """``[(key, subtree)]`` that replace the group's members in its parent."""
    base = g.path + ((g.holder,) if g.holder is not None else ())
    source = node[g.holder] if g.holder is not None else node
    members = [source[k] for k in g.keys]
    if not g.period:
        _check_members(base, g.keys, members, axis, g.start)
        stacked = _stack_trees(members, axis, axis_name)
        # into="blocks/ScanBlock_0": the stack under a chain of keys, as
        # `nn.scan` called inside a wrapper module named `blocks` keeps it.
        head, *rest = str(g.into).split("/") if isinstance(g.into, str) else [g.into]
        for k in reversed(rest):
            stacked = {k: stacked}
        return [(head, stacked)]
    if isinstance(g.into, str) and "/" in g.into:
        raise GroupError(
            f"{format_path(base)}: into={g.into!r} is a path; with --period the blocks go "
            "under one key. Pass a plain name."
        )
    stacks, rest = g.blocks()
    items = []
    for j, positions in enumerate(stacks):
        sub = [members[p] for p in positions]
        _check_members(base, tuple(g.keys[p] for p in positions), sub, axis, 0)
        items.append((g.sub_name(j), _stack_trees(sub, axis, axis_name)))
    out = [(g.into, _rebuild_mapping(source, items))]
    if rest:
        leftover = [(g.sub_name(j), copy_containers(members[p])) for j, p in enumerate(rest)]
        out.append((_remainder_key(g.into), _rebuild_mapping(source, leftover)))
    return out


def _stack_groups(
    node: Any, path: tuple, groups: list[Group], axis_of: dict[int, int], axis_name: str,
    convert: Any,
) -> Any:
    by_into: dict[Any, Group] = {}
    for g in groups:
        if g.into in by_into:
            names = " and ".join(
                format_path(x.members_path[len(path):]) for x in (by_into[g.into], g)
            )
            raise GroupError(
                f"{format_path(path)}: two groups ({names}) would both be stacked under "
                f"{g.into!r}. Give each its own name: --pattern A --into X --pattern B --into Y."
            )
        by_into[g.into] = g
    # Where each group's output goes: at its first member (template groups) or
    # at its list's key (digit lists), and which keys it removes.
    at: dict[Any, Group] = {}
    removed: set = set()
    partial: dict[Any, set] = {}  # digit list key -> member keys taken out
    for g in groups:
        if g.holder is None:
            at[g.keys[0]] = g
            removed.update(g.keys)
        else:
            partial.setdefault(g.holder, set()).update(g.keys)
    outputs = {id(g): _stacked_outputs(node, g, axis_of[id(g)], axis_name) for g in groups}
    new_keys = [k for g in groups for k, _ in outputs[id(g)]]
    for k in new_keys:
        replaced_whole = any(
            g.holder == k and len(partial.get(k, ())) == len(node[k]) for g in groups
        )
        if k in node and k not in removed and not replaced_whole:
            raise GroupError(
                f"{format_path(path)}: cannot put the stacked layers under {k!r}: "
                f"{format_path(path + (k,))} already exists. Choose another name with --into."
            )
    items: list[tuple[Any, Any]] = []
    for k, v in node.items():
        if k in at:
            items.extend(outputs[id(at[k])])
            continue
        if k in removed:
            continue
        if k in partial:
            g_here = [g for g in groups if g.holder == k]
            left = [(m, copy_containers(c)) for m, c in v.items() if m not in partial[k]]
            if left:
                items.append((k, _rebuild_mapping(v, left)))
            for g in g_here:
                items.extend(outputs[id(g)])
            continue
        items.append((k, convert(v, path + (k,))))
    return _rebuild_mapping(node, items)


def _no_group_message(tree: Any, specs: list[Spec], near: list[NearGroup]) -> str:
    if near:
        # Sets that differ the same way (T5's encoder and decoder) are named together.
        by_text: dict[str, list[str]] = {}
        for n in near:
            where, _, text = n.message.partition(": ")
            by_text.setdefault(text, []).append(where)
        shown = [" and ".join(w) + ": " + text for text, w in by_text.items()]
        return (
            "no layer group can be stacked as it is: "
            + "; ".join(shown[:3])
            + (f" (and {len(shown) - 3} more such sets)" if len(shown) > 3 else "")
            + "."
        )
    top = list(tree.keys())[:_MAX_LISTED] if _is_mapping(tree) else []
    patterns = [s.pattern for s in specs if s.pattern]
    what = (
        f"no keys match the pattern {patterns[0]!r}"
        if len(patterns) == 1
        else f"no keys match the patterns {', '.join(map(repr, patterns))}"
        if patterns
        else "no layer groups found (looked for "
        + ", ".join(p + "_0, " + p + "_1 …" for p in DEFAULT_PREFIXES)
        + " (or with '.': blocks.0 …) and digit keys 0, 1 … at any depth)"
    )
    seen = []
    candidates = numbered_candidates(tree)
    if patterns:  # a typo? what default detection finds, then the auto-numbered
        try:
            found = [(g.path, g.template, len(g.keys)) for g in find_groups(tree) if g.holder is None]
        except GroupError:
            found = []
        candidates = found + candidates
    for path, template, n in candidates:
        if template not in [t for t, _ in seen] and template not in patterns:
            seen.append((template, f"{format_path(path + (template,))} ({n}): --pattern '{template}'"))
    numbered = (
        (" Keys that look like layers: " if patterns else
         " Auto-numbered keys that may be the layers (not stacked by default, as a "
         "layer's own Dense_0, Dense_1 … are not): ") + "; ".join(s for _, s in seen[:2]) + "."
        if seen else ""
    )
    return (
        f"{what}; the top-level keys are {', '.join(map(str, top)) or 'none'}. "
        "If the layers have another name, pass --pattern (for example "
        "--pattern 'encoder_layer_{i}'); if the checkpoint is already stacked, use to-loop."
        + numbered
    )

"""Pure tree work: find layer groups, stack them, unstack them. No I/O.

Trees are nested mappings (``dict``, ``FrozenDict``, ``nnx.State``), sequences
(lists, tuples, namedtuples such as optax states) and any other registered JAX
pytree node, with array leaves: numpy arrays, ``jax.Array``s, lazy leaves from
`ckptconv.lazy`, boxed leaves (``nn.Partitioned``, ``nn.LogicallyPartitioned``,
``nnx.Variable``). ``None`` and empty containers are kept as they are.

Paths in messages are the keys joined by ``/`` (``params/layer_3/Dense_0/kernel``),
as Orbax and ``flax.traverse_util`` spell them.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptconv import lazy
from ckptconv.errors import GroupError, NothingToConvertError

#: Prefixes whose ``<prefix>_<i>`` siblings form a group by default.
DEFAULT_PREFIXES = ("layer", "layers", "block", "blocks", "h")

_DEFAULT_RE = re.compile(r"^(%s)_(0|[1-9][0-9]*)$" % "|".join(DEFAULT_PREFIXES))
_DIGITS_RE = re.compile(r"^(0|[1-9][0-9]*)$")
_MAX_LISTED = 10


@dataclass(frozen=True)
class Group:
    """Sibling subtrees that to-scan stacks into one.

    Attributes:
      path: keys from the root to the node holding the members.
      keys: the members' keys, in layer order (``keys[i]`` is layer ``i``).
      template: how the members are named, ``layer_{i}`` or ``{i}`` (NNX list).
      into: the key the stack is stored under in ``path``; for an NNX list
        (template ``{i}``) the node at ``path`` itself is replaced, and ``into``
        is its own key.
    """

    path: tuple[Any, ...]
    keys: tuple[Any, ...]
    template: str
    into: Any

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def members_path(self) -> tuple[str, ...]:
        """The members' path with the layer number as ``{i}`` (for messages)."""
        if self.template == "{i}":
            return self.path + (self.into, "{i}")
        return self.path + (self.template,)

    @property
    def target(self) -> tuple[str, ...]:
        """Path of the stacked subtree in the converted tree."""
        return self.path + (self.into,)


@dataclass(frozen=True)
class Stacked:
    """A stacked subtree that to-loop unstacks.

    Attributes:
      path: keys from the root to the stacked subtree (its last key is the
        ``source`` name).
      num_layers: the length of the layer axis.
    """

    path: tuple[str, ...]
    num_layers: int


# --------------------------------------------------------------------------
# Walking trees


def _types(module: str, *names: str) -> tuple[type, ...]:
    """Classes of ``module`` if it is imported, else ``()``.

    An object of such a class cannot exist before its module is imported, so
    ckptconv recognises JAX and Flax types without importing JAX or Flax
    itself: file-to-file conversion never needs them, and importing them costs
    about a second per command.
    """
    m = sys.modules.get(module)
    return tuple(getattr(m, n) for n in names if hasattr(m, n)) if m else ()


def _jax_array() -> tuple[type, ...]:
    return _types("jax", "Array")


def _axis_metadata() -> tuple[type, ...]:
    return _types("flax.core.meta", "AxisMetadata")


def _nnx_variable() -> tuple[type, ...]:
    return _types("flax.nnx", "Variable")


def _nnx_state() -> tuple[type, ...]:
    return _types("flax.nnx", "State")


def _frozen_dict() -> tuple[type, ...]:
    return _types("flax.core.frozen_dict", "FrozenDict")


def _partitioned() -> tuple[type, ...]:
    return _types("flax.core.meta", "Partitioned")


def format_path(path: Sequence[Any]) -> str:
    """``('params', 'layer_0', 'kernel')`` -> ``'params/layer_0/kernel'``."""
    return "/".join(str(k) for k in path) or "<root>"


def _is_boxed(x: Any) -> bool:
    return isinstance(x, _axis_metadata() + _nnx_variable())


def is_leaf(x: Any) -> bool:
    """True for values ckptconv treats as one leaf (never descends into)."""
    return (
        x is None
        or isinstance(x, (np.ndarray, np.generic, str, bytes, int, float, complex) + _jax_array())
        or isinstance(x, lazy.LAZY)
        or _is_boxed(x)
    )


def _is_mapping(x: Any) -> bool:
    return isinstance(x, (Mapping,) + _nnx_state())


def _rebuild_mapping(like: Any, items: list[tuple[Any, Any]]) -> Any:
    """A mapping of ``like``'s type holding ``items`` in order."""
    if isinstance(like, _frozen_dict()):
        return type(like)(items)
    if isinstance(like, _nnx_state()):
        return type(like)(dict(items))
    return dict(items)


def _children(node: Any) -> tuple[list[tuple[Any, Any]], Any]:
    """One level of a non-mapping container: ``[(key, child)]`` and a rebuild function."""
    if isinstance(node, list):
        return list(enumerate(node)), list
    if isinstance(node, tuple) and not hasattr(node, "_fields"):
        return list(enumerate(node)), tuple
    if isinstance(node, tuple):  # namedtuple: optax states
        return [(f, getattr(node, f)) for f in node._fields], lambda xs: type(node)(*xs)
    # Any other registered pytree node (flax struct dataclasses such as TrainState).
    import jax

    keyed, treedef = jax.tree_util.tree_flatten_with_path(
        node, is_leaf=lambda y: y is not node
    )
    keys = [_key_name(p[0]) for p, _ in keyed]
    return list(zip(keys, [v for _, v in keyed])), treedef.unflatten


def _key_name(key: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


def _is_container(x: Any) -> bool:
    if is_leaf(x):
        return False
    if _is_mapping(x) or isinstance(x, (list, tuple)):
        return True
    if "jax" not in sys.modules:  # no pytree node can be registered without JAX
        return False
    import jax

    leaves, treedef = jax.tree_util.tree_flatten(x, is_leaf=lambda y: y is not x)
    return not jax.tree_util.treedef_is_leaf(treedef)


def _map_children(node: Any, fn: Any, path: tuple) -> Any:
    """Rebuild a container with ``fn(child, path + (key,))`` for every child."""
    if _is_mapping(node):
        return _rebuild_mapping(node, [(k, fn(v, path + (k,))) for k, v in node.items()])
    items, rebuild = _children(node)
    return rebuild([fn(v, path + (k,)) for k, v in items])


def leaves_with_paths(tree: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """Every leaf (``None`` excluded) with its path, in tree order."""
    if tree is None:
        return []
    if is_leaf(tree):
        return [(path, tree)]
    if _is_mapping(tree):
        items = list(tree.items())
    elif _is_container(tree):
        items = _children(tree)[0]
    else:
        return [(path, tree)]
    out = []
    for k, v in items:
        out.extend(leaves_with_paths(v, path + (k,)))
    return out


def leaf_shape(x: Any) -> tuple[int, ...] | None:
    """The shape of an array leaf (boxed leaves: of the value), else None."""
    x = _unbox(x)
    shape = getattr(x, "shape", None)
    return None if shape is None else tuple(shape)


def leaf_dtype(x: Any) -> np.dtype | None:
    x = _unbox(x)
    dtype = getattr(x, "dtype", None)
    return None if dtype is None else np.dtype(dtype)


def _unbox(x: Any) -> Any:
    if isinstance(x, _axis_metadata()):
        return x.unbox()
    if isinstance(x, _nnx_variable()):
        return x.get_value()
    return x


# --------------------------------------------------------------------------
# Finding groups


def layer_name(template: str, i: int) -> str:
    """``layer_name("layers_{i}", 3) == "layers_3"`` (other braces are literal)."""
    return template.replace("{i}", str(i))


def _template_regex(pattern: str) -> re.Pattern:
    if pattern.count("{i}") != 1:
        raise GroupError(
            f"pattern {pattern!r} must contain '{{i}}' exactly once, "
            "where the layer number goes (for example 'layers_{i}')."
        )
    before, after = pattern.split("{i}")
    return re.compile("^%s(0|[1-9][0-9]*)%s$" % (re.escape(before), re.escape(after)))


def _candidate_groups(node: Any, pattern: str | None) -> list[tuple[str, dict[int, Any]]]:
    """``[(template, {index: key})]`` for the groups among ``node``'s keys."""
    keys = list(node.keys())
    found: dict[str, dict[int, Any]] = {}
    if pattern is not None:
        regex = _template_regex(pattern)
        for k in keys:
            m = regex.match(str(k))
            if m:
                found.setdefault(pattern, {})[int(m.group(1))] = k
        return list(found.items())
    for k in keys:
        m = _DEFAULT_RE.match(str(k)) if isinstance(k, str) else None
        if m:
            found.setdefault(m.group(1) + "_{i}", {})[int(m.group(2))] = k
    return list(found.items())


def _is_digit_list(node: Any) -> bool:
    """An NNX list: a non-empty mapping whose keys are all ``0 … N-1`` style digits,
    each holding a subtree with at least one array of one or more dimensions.

    The last condition keeps out flax's state-dict spelling of an optimizer's
    tuple (``opt_state: {'0': {}, '1': {}}`` for SGD, or counts only), whose
    members may look alike but are no layers.
    """
    if not node:
        return False
    for k, v in node.items():
        if isinstance(k, bool):
            return False
        if not (isinstance(k, int) or (isinstance(k, str) and _DIGITS_RE.match(k))):
            return False
        if not _is_container(v):
            return False
        if not any(len(leaf_shape(x) or ()) >= 1 for _, x in leaves_with_paths(v)):
            return False
    return True


def _consistent(members: list[Any]) -> bool:
    """True when the members have the same structure, shapes and dtypes."""
    first = {p: (leaf_shape(x), leaf_dtype(x)) for p, x in leaves_with_paths(members[0])}
    for m in members[1:]:
        if not _same_structure(members[0], m):
            return False
        if {p: (leaf_shape(x), leaf_dtype(x)) for p, x in leaves_with_paths(m)} != first:
            return False
    return True


def _same_structure(a: Any, b: Any) -> bool:
    """True when two subtrees have the same keys and container kinds throughout."""
    if a is None or b is None:
        return a is None and b is None
    if is_leaf(a) or is_leaf(b):
        return is_leaf(a) and is_leaf(b)
    if _is_mapping(a) != _is_mapping(b):
        return False
    if _is_mapping(a):
        if list(a.keys()) != list(b.keys()) and set(a.keys()) != set(b.keys()):
            return False
        return all(_same_structure(a[k], b[k]) for k in a.keys())
    ia, ib = _children(a)[0], _children(b)[0]
    if [k for k, _ in ia] != [k for k, _ in ib]:
        return False
    return all(_same_structure(x, y) for (_, x), (_, y) in zip(ia, ib))


def _ordered(path: tuple, template: str, by_index: dict[int, Any]) -> tuple[Any, ...]:
    """The member keys in layer order, after checking they number 0 … N-1."""
    indices = sorted(by_index)
    n = len(indices)
    if indices != list(range(n)):
        missing = sorted(set(range(max(indices) + 1)) - set(indices))
        names = ", ".join(layer_name(template, i) for i in missing[:_MAX_LISTED])
        raise GroupError(
            f"{format_path(path)}: layers {template} must be numbered 0 … N-1, "
            f"but found {_summarize(indices)}; missing {names}. "
            "Restore or rename the missing layers, or choose other keys with --pattern."
        )
    return tuple(by_index[i] for i in indices)


def _summarize(indices: list[int]) -> str:
    if len(indices) <= _MAX_LISTED:
        return ", ".join(map(str, indices))
    return ", ".join(map(str, indices[:_MAX_LISTED])) + f", … ({len(indices)} in all)"


def _walk_groups(
    node: Any, path: tuple, pattern: str | None, into: str, out: list[Group]
) -> None:
    if not _is_container(node):
        return
    if _is_mapping(node):
        if pattern in (None, "{i}") and path and _is_digit_list(node):
            children = list(node.values())
            # A msgpack/state-dict encoding of an optimizer's tuple also has
            # digit keys; its members differ in structure, and it is no stack.
            if all(_same_structure(children[0], c) for c in children[1:]):
                by_index = {int(k): k for k in node.keys()}
                keys = _ordered(path, "{i}", by_index)
                # `into` keeps the key as it is (an int in nnx.State).
                out.append(Group(path[:-1], keys, "{i}", path[-1]))
                return
        grouped: set = set()
        if pattern != "{i}":
            for template, by_index in _candidate_groups(node, pattern):
                try:
                    keys = _ordered(path, template, by_index)
                except GroupError:
                    # nn.Sequential names its children layers_0, layers_2 …
                    # (activations have no params): unlike, misnumbered keys are
                    # no layer stack. Alike layers with a gap are a missing layer.
                    if pattern is None and not _consistent([node[k] for k in by_index.values()]):
                        continue
                    raise
                out.append(Group(path, keys, template, into))
                grouped.update(keys)
        for k, v in node.items():
            if k not in grouped:
                _walk_groups(v, path + (k,), pattern, into, out)
        return
    for k, v in _children(node)[0]:
        _walk_groups(v, path + (k,), pattern, into, out)


def find_groups(
    tree: Any, pattern: str | None = None, *, into: str = "blocks"
) -> list[Group]:
    """The groups that `to_scan` would stack, in tree order.

    Args:
      tree: a checkpoint tree (see the module docstring).
      pattern: a template with ``{i}`` (``"layers_{i}"``) selecting exactly
        those keys; by default ``<prefix>_<i>`` for the prefixes in
        `DEFAULT_PREFIXES`, and digit-keyed NNX lists. ``"{i}"`` selects only
        digit-keyed lists.
      into: the key stacked subtrees will get (recorded in each `Group`).

    Returns:
      One `Group` per stack, with its members in layer order. Members are not
      checked for consistency here; `to_scan` does that.

    Raises:
      GroupError: a pattern without ``{i}``, or layer numbers that are not
        exactly ``0 … N-1``.

    Example:
      >>> [g.keys for g in find_groups({"layer_1": {"w": 1.0}, "layer_0": {"w": 2.0}})]
      [('layer_0', 'layer_1')]
    """
    out: list[Group] = []
    _walk_groups(tree, (), pattern, into, out)
    return out


def find_stacks(tree: Any, source: str = "blocks", *, axis: int = 0) -> list[Stacked]:
    """The stacked subtrees (key ``source``) that `to_loop` would unstack.

    Raises:
      GroupError: a stacked subtree whose leaves disagree on the layer count.
    """
    out: list[Stacked] = []

    def walk(node: Any, path: tuple) -> None:
        if not _is_container(node):
            return
        items = list(node.items()) if _is_mapping(node) else _children(node)[0]
        for k, v in items:
            if _is_mapping(node) and k == source:
                out.append(Stacked(path + (k,), _layer_count(v, path + (k,), axis)))
            else:
                walk(v, path + (k,))

    walk(tree, ())
    return out


# --------------------------------------------------------------------------
# Stacking


def _check_members(group_path: tuple, keys: tuple, members: list[Any], axis: int) -> None:
    """Raise one GroupError listing every layer and leaf that differs from the rest.

    The reference is what most layers have (ties: the lowest layer), so a
    checkpoint whose layer 0 is the odd one out names layer 0, not all others.
    """
    leaves = [leaves_with_paths(m) for m in members]
    signatures = [tuple(sorted(map(str, (p for p, _ in lv)))) for lv in leaves]
    ref_i = _majority(signatures)
    ref = leaves[ref_i]
    for p, x in ref:
        shape = leaf_shape(x) or ()  # python scalars are 0-d
        if len(shape) < axis:
            raise GroupError(
                f"{format_path(group_path + (keys[ref_i],) + p)}: shape {shape} has no room "
                f"for a layer axis at position {axis}. Use a smaller --axis (MaxText's "
                "axis 1 needs every stacked leaf to have at least one dimension)."
            )
    ref_paths = dict(ref)
    ref_name = format_path(group_path + (keys[ref_i],))
    problems: list[str] = []
    same = [i for i, sig in enumerate(signatures) if sig == signatures[ref_i]]
    for i in range(len(members)):
        if i in same:
            continue
        got = {p for p, _ in leaves[i]}
        extra = sorted(got - set(ref_paths), key=str)
        lacking = sorted(set(ref_paths) - got, key=str)
        detail = []
        if lacking:
            detail.append("lacks " + ", ".join(format_path(p) for p in lacking[:3]))
        if extra:
            detail.append("has extra " + ", ".join(format_path(p) for p in extra[:3]))
        problems.append(
            f"layer {i} ({format_path(group_path + (keys[i],))}) has a different tree "
            f"structure from layer {ref_i} ({ref_name}): it "
            + (" and ".join(detail) or "nests differently")
        )
    for p in ref_paths:
        values = {i: dict(leaves[i])[p] for i in same}
        for what, get in (("shape", leaf_shape), ("dtype", leaf_dtype)):
            found = {i: get(x) for i, x in values.items()}
            order = sorted(found)
            want_i = order[_majority([found[i] for i in order])]
            want = found[want_i]
            for i in order:
                if found[i] != want:
                    leaf = format_path(group_path + (keys[i],) + p)
                    problems.append(
                        f"layer {i}: {leaf}: expected {what} {want} (as in layer {want_i}), "
                        f"found {found[i]}"
                    )
            if any(found[i] != want for i in order):
                break  # a shape mismatch makes the dtype line noise
    if problems:
        problems.sort(key=lambda m: int(m.split()[1].rstrip(":")))
        shown = problems[:_MAX_LISTED]
        more = len(problems) - len(shown)
        raise GroupError(
            f"{format_path(group_path)}: the layers to stack differ ("
            + str(len(problems))
            + " mismatch"
            + ("es" if len(problems) > 1 else "")
            + "):\n  "
            + "\n  ".join(shown)
            + (f"\n  … and {more} more" if more else "")
            + "\nEvery layer must have the same leaves, shapes and dtypes: fix the "
            "checkpoint, or select other layer keys with --pattern."
        )


def _majority(values: list[Any]) -> int:
    """Index of the first occurrence of the most common value (ties: the earliest)."""
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    best = max(counts.values())
    return next(i for i, v in enumerate(values) if counts[v] == best)


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


def _check_axis(axis: int) -> None:
    if not isinstance(axis, int) or axis < 0:
        raise GroupError(f"axis must be a non-negative integer, got {axis!r}.")


def to_scan(
    tree: Any,
    *,
    pattern: str | None = None,
    into: str = "blocks",
    axis: int = 0,
    axis_name: str = "layers",
) -> Any:
    """Stack every group of layer subtrees into one subtree with a layer axis.

    Args:
      tree: a checkpoint tree: params, a whole train state, or a raw Orbax
        restore. Every group at any depth is stacked (params, batch_stats,
        optimizer ``mu``/``nu``), so a train state converts in one call.
      pattern: which keys form a group (see `find_groups`).
      into: the key under which each group's stack goes, in the group's parent.
        NNX lists (digit keys) are replaced in place, under their own key.
      axis: position of the new layer axis in every leaf (MaxText uses 1).
      axis_name: partition name inserted into boxed leaves' ``names`` at
        ``axis``, as ``nn.scan(metadata_params={nn.PARTITION_NAME: ...})`` does.

    Returns:
      A new tree of the same container types; leaves outside groups are the
      input's own objects.

    Raises:
      GroupError: no group found, layer numbers not ``0 … N-1``, layers that
        differ in structure, shape or dtype, or ``into`` already taken.

    Example:
      >>> t = {"layer_0": {"w": np.zeros(2)}, "layer_1": {"w": np.ones(2)}}
      >>> to_scan(t)["blocks"]["w"].shape
      (2, 2)
    """
    _check_axis(axis)
    groups = find_groups(tree, pattern, into=into)
    if not groups:
        raise NothingToConvertError(_no_group_message(tree, pattern))
    by_path: dict[tuple, list[Group]] = {}
    for g in groups:
        by_path.setdefault(g.path if g.template != "{i}" else g.path + (g.into,), []).append(g)

    def convert(node: Any, path: tuple) -> Any:
        here = by_path.get(path)
        if here and here[0].template == "{i}":
            g = here[0]
            members = [node[k] for k in g.keys]
            _check_members(path, g.keys, members, axis)
            return _stack_trees(members, axis, axis_name)
        if here:
            return _stack_groups(node, path, here, into, axis, axis_name, convert)
        if not _is_container(node):
            return node
        return _map_children(node, convert, path)

    return convert(tree, ())


def _stack_groups(
    node: Any, path: tuple, groups: list[Group], into: str, axis: int, axis_name: str, convert: Any
) -> Any:
    if into in node:
        raise GroupError(
            f"{format_path(path)}: cannot put the stacked layers under {into!r}: "
            f"{format_path(path + (into,))} already exists. Choose another name with --into."
        )
    if len(groups) > 1:
        names = " and ".join(g.template for g in groups)
        raise GroupError(
            f"{format_path(path)}: two groups ({names}) would both be stacked under "
            f"{into!r}. Convert one at a time with --pattern (and --into)."
        )
    g = groups[0]
    members = [node[k] for k in g.keys]
    _check_members(path, g.keys, members, axis)
    stacked = _stack_trees(members, axis, axis_name)
    items: list[tuple[Any, Any]] = []
    member_keys = set(g.keys)
    for k, v in node.items():
        if k in member_keys:
            if k == g.keys[0]:
                items.append((into, stacked))
            continue
        items.append((k, convert(v, path + (k,))))
    return _rebuild_mapping(node, items)


def _no_group_message(tree: Any, pattern: str | None) -> str:
    top = list(tree.keys())[:_MAX_LISTED] if _is_mapping(tree) else []
    what = (
        f"no keys match the pattern {pattern!r}"
        if pattern
        else "no layer groups found (looked for "
        + ", ".join(p + "_0, " + p + "_1 …" for p in DEFAULT_PREFIXES)
        + " and digit keys 0, 1 … at any depth)"
    )
    return (
        f"{what}; the top-level keys are {', '.join(map(str, top)) or 'none'}. "
        "If the layers have another name, pass --pattern (for example "
        "--pattern 'encoder_layer_{i}'); if the checkpoint is already stacked, use to-loop."
    )


# --------------------------------------------------------------------------
# Unstacking


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
        raise GroupError(
            f"{format_path(path)}: leaves disagree on the layer count on axis {axis}: "
            f"{format_path(p0)} has {n0}, {format_path(p1)} has {n1}. "
            "Pass the right --axis, or --from naming the stacked subtree."
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
    return [x[tuple(index + [i])] for i in range(n)]


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


def to_loop(
    tree: Any,
    *,
    source: str = "blocks",
    pattern: str = "layer_{i}",
    axis: int = 0,
    axis_name: str = "layers",
) -> Any:
    """Unstack every subtree named ``source`` into one subtree per layer.

    Args:
      tree: a checkpoint tree holding stacked subtrees.
      source: the key of the stacked subtrees; every one, at any depth, is
        unstacked (params, optimizer ``mu``/``nu`` …).
      pattern: the layers' keys, with ``{i}``. ``"{i}"`` puts the layers back
        under ``source`` itself as an NNX list (keys ``'0' … 'N-1'``).
      axis: the layer axis of every leaf.
      axis_name: the partition name removed from boxed leaves' ``names``.

    Returns:
      A new tree. For numpy leaves, layers are views of the stacked arrays.

    Raises:
      GroupError: no ``source`` subtree, leaves that disagree on the layer
        count, or a layer key that already exists.
    """
    _check_axis(axis)
    _template_regex(pattern)
    stacks = find_stacks(tree, source, axis=axis)
    if not stacks:
        top = list(tree.keys())[:_MAX_LISTED] if _is_mapping(tree) else []
        raise NothingToConvertError(
            f"no subtree named {source!r} to unstack; the top-level keys are "
            f"{', '.join(map(str, top)) or 'none'}. Name the stacked subtree with --from; "
            "if the checkpoint is already in loop form, use to-scan."
        )
    counts = {s.path: s.num_layers for s in stacks}

    def convert(node: Any, path: tuple) -> Any:
        if not _is_container(node):
            return node
        if not _is_mapping(node) or source not in node:
            return _map_children(node, convert, path)
        n = counts[path + (source,)]
        layers = _unstack_tree(node[source], n, axis, axis_name)
        names = [layer_name(pattern, i) for i in range(n)]
        items: list[tuple[Any, Any]] = []
        for k, v in node.items():
            if k != source:
                items.append((k, convert(v, path + (k,))))
                continue
            if pattern == "{i}":
                # nnx.State lists have int keys; everything else (Orbax,
                # msgpack) spells them as strings.
                keys = range(n) if isinstance(node, _nnx_state()) else names
                items.append((k, _rebuild_mapping(node, list(zip(keys, layers)))))
                continue
            taken = [nm for nm in names if nm in node]
            if taken:
                raise GroupError(
                    f"{format_path(path)}: cannot unstack {source!r} into "
                    f"{pattern!r}: {format_path(path + (taken[0],))} already exists. "
                    "Choose other layer names with --pattern."
                )
            items.extend(zip(names, layers))
        return _rebuild_mapping(node, items)

    return convert(tree, ())

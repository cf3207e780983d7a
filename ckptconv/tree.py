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
from dataclasses import dataclass, replace
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
        return f"{format_path(self.path)}: {self.num_layers} layers{how} -> {format_path(dest)}{first}"


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
# What to stack


@dataclass(frozen=True)
class Spec:
    """One group of layers to stack, and how: a ``--pattern``/``--into`` pair.

    Attributes:
      pattern: a template with ``{i}`` selecting exactly those keys; None: the
        default prefixes and digit-keyed lists.
      into: the stack's key; None: ``blocks`` (digit lists: their own key).
      period: stack blocks of ``period`` consecutive layers (MaxText's scanned
        Gemma-3 and Llama-4): layer ``K·b + j`` goes to ``<into>/<name_j>`` at
        index ``b``.
      layers: ``(start, stop)``: stack only those layer numbers (None ends mean
        the first / past the last), renumbered from 0; the others stay.
      remainder: with ``period``, where the ``N mod K`` leftover layers go:
        ``"separate"`` (unstacked under ``<into>_remainder``, as MaxText) or
        ``"extend"`` (one more layer in each of the first ``N mod K`` stacks).
    """

    pattern: str | None = None
    into: str | None = None
    period: int | None = None
    layers: tuple[int | None, int | None] | None = None
    remainder: str = "separate"


def parse_layers(value: Any) -> tuple[int | None, int | None] | None:
    """``"1:"``, ``"2:10"``, ``":6"``, ``slice(1, None)`` or ``(1, None)`` -> ``(start, stop)``.

    Raises:
      GroupError: anything else, or negative numbers.
    """
    if value is None:
        return None
    if isinstance(value, slice):
        if value.step not in (None, 1):
            raise GroupError(f"layers {value!r}: a step is not supported.")
        value = (value.start, value.stop)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", value)
        if not m:
            raise GroupError(
                f"--layers {value!r}: expected START:STOP, START: or :STOP with layer "
                "numbers (for example 1: to leave layer 0 out)."
            )
        value = tuple(int(v) if v else None for v in m.groups())
    if not (isinstance(value, tuple) and len(value) == 2):
        raise GroupError(f"layers {value!r}: expected 'START:STOP' or (start, stop).")
    start, stop = value
    for v in (start, stop):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise GroupError(f"layers {value!r}: layer numbers must be non-negative integers.")
    if start is not None and stop is not None and stop <= start:
        raise GroupError(f"--layers {_range_text((start, stop))}: STOP must be greater than START.")
    return start, stop


def _range_text(r: tuple[int | None, int | None] | None) -> str:
    if r is None:
        return ":"
    return f"{'' if r[0] is None else r[0]}:{'' if r[1] is None else r[1]}"


def _specs(
    groups: Any,
    pattern: str | None,
    into: str | None,
    period: int | None,
    layers: Any,
    remainder: str,
) -> list[Spec]:
    """The specs for `to_scan`'s arguments: ``groups`` or the single pattern/into."""
    if groups is None:
        raw: list[Any] = [Spec(pattern, into, period, layers, remainder)]
    else:
        if pattern is not None or into is not None:
            raise GroupError("give either groups=[...] or pattern/into, not both.")
        raw = list(groups)
        if not raw:
            raise GroupError("groups=[] names no group to stack.")
    out = []
    for g in raw:
        if isinstance(g, Spec):
            s = g
        elif isinstance(g, str):
            s = Spec(g)
        elif isinstance(g, Mapping):
            unknown = set(g) - {"pattern", "into", "period", "layers", "remainder"}
            if unknown:
                raise GroupError(f"group {dict(g)!r}: unknown keys {', '.join(sorted(unknown))}.")
            s = Spec(
                g.get("pattern"), g.get("into"), g.get("period", period),
                g.get("layers", layers), g.get("remainder", remainder),
            )
        elif isinstance(g, (tuple, list)) and len(g) == 2:
            s = Spec(g[0], g[1], period, layers, remainder)
        else:
            raise GroupError(
                f"group {g!r}: expected (pattern, into), a dict with 'pattern'/'into' "
                "(and 'period', 'layers', 'remainder'), or a ckptconv.Spec."
            )
        s = Spec(s.pattern, s.into, s.period, parse_layers(s.layers), s.remainder)
        if s.pattern is not None:
            _template_regex(s.pattern)
        if s.period is not None and (
            not isinstance(s.period, int) or isinstance(s.period, bool) or s.period < 1
        ):
            raise GroupError(f"period must be a positive integer, got {s.period!r}.")
        if s.remainder not in ("separate", "extend"):
            raise GroupError(f"remainder must be 'separate' or 'extend', got {s.remainder!r}.")
        out.append(s)
    if len(out) > 1 and any(s.pattern is None for s in out):
        raise GroupError(
            "several groups need a --pattern each (the default detection finds all groups "
            "on its own)."
        )
    intos = [s.into for s in out if s.into is not None]
    dup = sorted({i for i in intos if intos.count(i) > 1})
    if dup:
        raise GroupError(
            f"--into {dup[0]!r} is given for two patterns; each group needs its own --into."
        )
    return out


# --------------------------------------------------------------------------
# Finding groups


@dataclass(frozen=True)
class Group:
    """Sibling subtrees that to-scan stacks into one.

    Attributes:
      path: keys from the root to the node holding the members (for a
        digit-keyed list: the node holding the list).
      keys: the stacked members' keys, in layer order (``keys[i]`` is layer
        ``start + i``).
      template: how the members are named, ``layer_{i}`` or ``{i}`` (a
        digit-keyed list: NNX, Hugging Face).
      into: the key the stack is stored under in ``path``; for a digit list
        stacked whole, the list's own key (the list is replaced in place).
      holder: for a digit list, its key in ``path`` (else None).
      period: blocks of ``period`` layers (see `Spec`), or None.
      remainder: ``"separate"`` or ``"extend"`` (with ``period``).
      start: the layer number of ``keys[0]`` (``--layers START:``).
      total: how many layers the whole sibling set has (``0 … total-1``).
    """

    path: tuple[Any, ...]
    keys: tuple[Any, ...]
    template: str
    into: Any
    holder: Any = None
    period: int | None = None
    remainder: str = "separate"
    start: int = 0
    total: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def members_path(self) -> tuple[str, ...]:
        """The members' path with the layer number as ``{i}`` (for messages)."""
        if self.template == "{i}":
            return self.path + (self.holder, "{i}")
        return self.path + (self.template,)

    @property
    def target(self) -> tuple[str, ...]:
        """Path of the stacked subtree in the converted tree."""
        return self.path + (self.into,)

    @property
    def remainder_target(self) -> tuple[str, ...] | None:
        """Path of the unstacked leftover layers (``--period``), if there are any."""
        if self.period and self.remainder == "separate" and self.num_layers % self.period:
            return self.path + (_remainder_key(self.into),)
        return None

    def sub_name(self, j: int) -> Any:
        """The key of block position ``j`` under ``into`` (``--period``)."""
        if self.template == "{i}":
            return j if isinstance(self.keys[0], int) else str(j)
        return layer_name(self.template, j)

    def blocks(self) -> tuple[list[list[int]], list[int]]:
        """Member positions per block stack, and the leftover positions (``--period``)."""
        k, n = self.period or 1, self.num_layers
        if self.remainder == "extend":
            return [list(range(j, n, k)) for j in range(min(k, n))], []
        depth = n // k
        return [list(range(j, depth * k, k)) for j in range(k)], list(range(depth * k, n))

    def describe(self) -> str:
        """``decoder/layers_{i}: 13 layers -> decoder/layers/layers_{0…5} (2 deep) + …``."""
        r = "" if self.start == 0 and self.num_layers == self.total else (
            f" (layers {self.start} … {self.start + self.num_layers - 1} of {self.total})"
        )
        head = f"{format_path(self.members_path)}: {self.num_layers} layers{r} -> "
        if not self.period:
            return head + format_path(self.target)
        stacks, rest = self.blocks()
        depths = sorted({len(s) for s in stacks})
        deep = " or ".join(map(str, depths))
        names = f"{self.sub_name(0)} … {self.sub_name(len(stacks) - 1)}" if len(stacks) > 1 else str(self.sub_name(0))
        out = head + f"{format_path(self.target)}/{{{names}}} ({deep} deep, period {self.period})"
        if rest:
            last = f" … {self.sub_name(len(rest) - 1)}" if len(rest) > 1 else ""
            out += f" + {format_path(self.remainder_target)}/{{{self.sub_name(0)}{last}}} (unstacked)"
        return out


@dataclass(frozen=True)
class NearGroup:
    """Sibling layers that are alike except for a few members: not stacked by default.

    Attributes:
      path: the node holding the siblings (a digit-keyed list itself).
      template: ``{i}`` or the members' template.
      message: which layers differ and how, and the option that would work.
    """

    path: tuple[Any, ...]
    template: str
    message: str


def _remainder_key(into: Any) -> str:
    return f"{into}_remainder"


def layer_name(template: str, i: int) -> str:
    """``layer_name("layers_{i}", 3) == "layers_3"`` (other braces are literal)."""
    return template.replace("{i}", str(i))


def _template_regex(pattern: str) -> re.Pattern:
    if not isinstance(pattern, str) or pattern.count("{i}") != 1:
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
    """A digit-keyed list (NNX, Hugging Face): a non-empty mapping whose keys are
    all ``0 … N-1`` style digits, each holding a subtree with at least one array
    of one or more dimensions.

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


def _signature(member: Any) -> tuple:
    """Structure, shapes and dtypes of a member, comparable across members."""
    return tuple(
        sorted((tuple(map(str, p)), leaf_shape(x), str(leaf_dtype(x))) for p, x in leaves_with_paths(member))
    )


def _consistent(members: list[Any]) -> bool:
    """True when the members have the same structure, shapes and dtypes."""
    first = _signature(members[0])
    return all(_same_structure(members[0], m) and _signature(m) == first for m in members[1:])


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


def _select(path: tuple, template: str, keys: tuple, spec: Spec) -> tuple[tuple, int]:
    """The members ``spec.layers`` selects, and the layer number of the first."""
    n = len(keys)
    if spec.layers is None:
        return keys, 0
    start = spec.layers[0] or 0
    stop = n if spec.layers[1] is None else spec.layers[1]
    if stop > n or start >= n:
        raise GroupError(
            f"{format_path(path)}: --layers {_range_text(spec.layers)} asks for layers "
            f"{start} … {stop - 1}, but {template} has {n} layers (0 … {n - 1}). "
            "Pass a range within them."
        )
    return keys[start:stop], start


def _alike_run(members: list[Any]) -> tuple[int, int] | None:
    """The longest run of consecutive members alike (≥ 2, more than half), as (start, stop)."""
    sigs = [(_signature(m), _structure_key(m)) for m in members]
    best = None
    i = 0
    while i < len(sigs):
        j = i
        while j + 1 < len(sigs) and sigs[j + 1] == sigs[i]:
            j += 1
        if best is None or j + 1 - i > best[1] - best[0]:
            best = (i, j + 1)
        i = j + 1
    if best is None or best[1] - best[0] < 2 or 2 * (best[1] - best[0]) <= len(members):
        return None
    return best


def _structure_key(member: Any) -> tuple:
    return tuple(map(str, (p for p, _ in leaves_with_paths(member))))


def _near_message(path: tuple, template: str, keys: tuple, members: list[Any], run: tuple[int, int]) -> str:
    """Say which members differ from the alike run, how, and what would work."""
    ref = members[run[0]]
    ref_leaves = {p: x for p, x in leaves_with_paths(ref)}
    odd = [i for i in range(len(members)) if not run[0] <= i < run[1]]
    parts = []
    for i in odd[:3]:
        got = {p: x for p, x in leaves_with_paths(members[i])}
        extra = sorted(set(got) - set(ref_leaves), key=str)
        lacking = sorted(set(ref_leaves) - set(got), key=str)
        detail = []
        if extra:
            detail.append("has extra " + ", ".join(format_path(p) for p in extra[:3]))
        if lacking:
            detail.append("lacks " + ", ".join(format_path(p) for p in lacking[:3]))
        if not detail:
            for p in ref_leaves:
                a, b = ref_leaves[p], got[p]
                if leaf_shape(a) != leaf_shape(b) or leaf_dtype(a) != leaf_dtype(b):
                    detail.append(
                        f"has {format_path(p)} {leaf_shape(b)} {leaf_dtype(b)} where layer "
                        f"{run[0]} has {leaf_shape(a)} {leaf_dtype(a)}"
                    )
                    break
        name = f" ({layer_name(template, i)})" if template != "{i}" else ""
        parts.append(f"layer {i}{name} " + " and ".join(detail or ["nests differently"]))
    more = f" (and {len(odd) - 3} more)" if len(odd) > 3 else ""
    stop = "" if run[1] == len(members) else str(run[1])
    option = f"--layers {run[0] or ''}:{stop}"
    where = format_path(path + ((template,) if template != "{i}" else ()))
    return (
        f"{where}: layers {run[0]} … {run[1] - 1} are alike, but "
        + "; ".join(parts) + more
        + f". To stack the alike ones and keep the others as they are, pass {option}"
    )


def _alike(members: list[Any], period: int | None) -> bool:
    """Members that can be stacked as they are (per block position with a period)."""
    if not members:
        return False
    if period:
        return all(_consistent(members[j::period]) for j in range(min(period, len(members))))
    return _consistent(members)


def _digit_group_keys(node: Any, path: tuple, spec: Spec, near: list[NearGroup]) -> tuple | None:
    """The layer keys of a digit-keyed list if it is a group under ``spec``, else None.

    Default detection stacks a list only when its members are alike (the
    selected ones, with ``layers``); a list alike except for a few members
    (T5's block 0) is recorded in ``near`` with the option that would work;
    a list of unlike members (a ResNet bottleneck's convolutions, an
    optimizer's tuple) is left alone. ``--pattern '{i}'`` asks for lists
    explicitly: members then need only the same keys (differences are errors).
    """
    by_index = {int(k): k for k in node.keys()}
    children = list(node.values())
    same_keys = all(_same_structure(children[0], c) for c in children[1:])
    if spec.pattern == "{i}" and same_keys:
        return _ordered(path, "{i}", by_index)
    if sorted(by_index) != list(range(len(by_index))):
        if same_keys and _alike(children, None):
            _ordered(path, "{i}", by_index)  # alike layers with a gap: a missing layer
        return None
    keys = tuple(by_index[i] for i in range(len(by_index)))
    selected, _ = _select(path, "{i}", keys, spec)
    if _alike([node[k] for k in selected], spec.period):
        return keys
    if spec.layers is None:
        members = [node[k] for k in keys]
        run = _alike_run(members)
        if run is not None:
            near.append(NearGroup(path, "{i}", _near_message(path, "{i}", keys, members, run)))
    return None


def _walk_groups(
    node: Any,
    path: tuple,
    spec: Spec,
    out: list[Group],
    near: list[NearGroup],
) -> None:
    if not _is_container(node):
        return
    pattern = spec.pattern
    if _is_mapping(node):
        if pattern in (None, "{i}") and path and _is_digit_list(node):
            keys = _digit_group_keys(node, path, spec, near)
            if keys is not None:
                selected, start = _select(path, "{i}", keys, spec)
                whole = len(selected) == len(keys)
                into = spec.into if spec.into is not None else (path[-1] if whole else "blocks")
                out.append(Group(
                    path[:-1], selected, "{i}", into, holder=path[-1], period=spec.period,
                    remainder=spec.remainder, start=start, total=len(keys),
                ))
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
                selected, start = _select(path, template, keys, spec)
                out.append(Group(
                    path, selected, template, spec.into if spec.into is not None else "blocks",
                    period=spec.period, remainder=spec.remainder, start=start, total=len(keys),
                ))
                grouped.update(keys)
        for k, v in node.items():
            if k not in grouped:
                _walk_groups(v, path + (k,), spec, out, near)
        return
    for k, v in _children(node)[0]:
        _walk_groups(v, path + (k,), spec, out, near)


def _find(tree: Any, specs: list[Spec]) -> tuple[list[Group], list[NearGroup]]:
    groups: list[Group] = []
    near: list[NearGroup] = []
    for spec in specs:
        found: list[Group] = []
        _walk_groups(tree, (), spec, found, near)
        groups.extend(found)
    claimed: dict[tuple, Group] = {}
    for g in groups:
        base = g.path + ((g.holder,) if g.holder is not None else ())
        for k in g.keys:
            other = claimed.setdefault(base + (k,), g)
            if other is not g:
                raise GroupError(
                    f"{format_path(base + (k,))}: matched by both --pattern {other.template!r} "
                    f"and --pattern {g.template!r}; the patterns overlap. Give patterns that "
                    "select different layers."
                )
    for g in groups:
        if g.period and g.num_layers < g.period:
            raise GroupError(
                f"{format_path(g.members_path)}: --period {g.period} needs at least "
                f"{g.period} layers, but there are {g.num_layers}. Pass the period the "
                "scanned model uses (MaxText Gemma-3: 6, the attention pattern), or leave "
                "--period out."
            )
    return groups, near


def find_groups(
    tree: Any,
    pattern: str | None = None,
    *,
    into: str | None = None,
    period: int | None = None,
    layers: Any = None,
    remainder: str = "separate",
    groups: Any = None,
) -> list[Group]:
    """The groups that `to_scan` would stack, in tree order.

    Args:
      tree: a checkpoint tree (see the module docstring).
      pattern: a template with ``{i}`` (``"layers_{i}"``) selecting exactly
        those keys; by default ``<prefix>_<i>`` for the prefixes in
        `DEFAULT_PREFIXES`, and digit-keyed lists. ``"{i}"`` selects only
        digit-keyed lists.
      into, period, layers, remainder, groups: as for `to_scan`.

    Returns:
      One `Group` per stack, with its members in layer order. Members are not
      checked for consistency here; `to_scan` does that.

    Raises:
      GroupError: a pattern without ``{i}``, layer numbers that are not
        exactly ``0 … N-1``, overlapping patterns, a bad period or range.

    Example:
      >>> [g.keys for g in find_groups({"layer_1": {"w": 1.0}, "layer_0": {"w": 2.0}})]
      [('layer_0', 'layer_1')]
    """
    specs = _specs(groups, pattern, into, period, layers, remainder)
    return _find(tree, specs)[0]


def find_near_groups(tree: Any, pattern: str | None = None) -> list[NearGroup]:
    """Digit-keyed sibling layers alike except for a few members (T5's block 0),
    which default detection leaves alone; each says what option would stack them."""
    return _find(tree, _specs(None, pattern, None, None, None, "separate"))[1]


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

    def walk(node: Any, path: tuple) -> None:
        if not _is_container(node):
            return
        items = list(node.items()) if _is_mapping(node) else _children(node)[0]
        for k, v in items:
            if _is_mapping(node) and k == source:
                rest = _remainder_key(source)
                if not period and rest in node:
                    count = len(v) if _is_mapping(v) else 0
                    raise GroupError(
                        f"{format_path(path + (k,))}: beside it is {format_path(path + (rest,))}, "
                        f"as in MaxText's blocks of {count} layers (Gemma-3, Llama-4). Pass "
                        f"--period {count} and --pattern naming the layers inside it "
                        f"(for example 'layers_{{i}}')."
                    )
                if period:
                    out.append(_period_stack(node, path, source, axis, period, pattern))
                else:
                    out.append(Stacked(path + (k,), _layer_count(v, path + (k,), axis)))
            elif period and _is_mapping(node) and k == _remainder_key(source):
                continue
            else:
                walk(v, path + (k,))

    walk(tree, ())
    return out


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


# --------------------------------------------------------------------------
# Stacking


def _check_members(group_path: tuple, keys: tuple, members: list[Any], axis: int, first: int = 0) -> None:
    """Raise one GroupError listing every layer and leaf that differs from the rest.

    The reference is what most layers have (ties: the lowest layer), so a
    checkpoint whose layer 0 is the odd one out names layer 0, not all others.
    ``first`` is the layer number of ``members[0]``.
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
            f"layer {first + i} ({format_path(group_path + (keys[i],))}) has a different tree "
            f"structure from layer {first + ref_i} ({ref_name}): it "
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
                        f"layer {first + i}: {leaf}: expected {what} {want} (as in layer "
                        f"{first + want_i}), found {found[i]}"
                    )
            if any(found[i] != want for i in order):
                break  # a shape mismatch makes the dtype line noise
    if problems:
        problems.sort(key=lambda m: int(m.split()[1].rstrip(":")))
        shown = problems[:_MAX_LISTED]
        more = len(problems) - len(shown)
        run = _alike_run(members)
        hint = (
            "select other layer keys with --pattern"
            if run is None or (run[0] == 0 and run[1] == len(members))
            else f"stack only the alike layers with --layers {first + run[0] or ''}:"
            + ("" if run[1] == len(members) else str(first + run[1]))
            + " (the others stay as they are)"
        )
        raise GroupError(
            f"{format_path(group_path)}: the layers to stack differ ("
            + str(len(problems))
            + " mismatch"
            + ("es" if len(problems) > 1 else "")
            + "):\n  "
            + "\n  ".join(shown)
            + (f"\n  … and {more} more" if more else "")
            + "\nEvery layer must have the same leaves, shapes and dtypes: fix the "
            f"checkpoint, or {hint}."
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
    into: str | None = None,
    axis: int = 0,
    axis_name: str = "layers",
    period: int | None = None,
    layers: Any = None,
    remainder: str = "separate",
    groups: Any = None,
) -> Any:
    """Stack every group of layer subtrees into one subtree with a layer axis.

    Args:
      tree: a checkpoint tree: params, a whole train state, or a raw Orbax
        restore. Every group at any depth is stacked (params, batch_stats,
        optimizer ``mu``/``nu``), so a train state converts in one call.
      pattern: which keys form a group (see `find_groups`).
      into: the key under which each group's stack goes, in the group's parent
        (default ``blocks``). Digit-keyed lists stacked whole are replaced in
        place, under their own key, unless ``into`` is given.
      axis: position of the new layer axis in every leaf (MaxText uses 1).
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
    by_path: dict[tuple, list[Group]] = {}
    for g in found:
        by_path.setdefault(g.path, []).append(g)

    def convert(node: Any, path: tuple) -> Any:
        here = by_path.get(path)
        if here:
            return _stack_groups(node, path, here, axis, axis_name, convert)
        if not _is_container(node):
            return node
        return _map_children(node, convert, path)

    return convert(tree, ())


def _stacked_outputs(node: Any, g: Group, axis: int, axis_name: str) -> list[tuple[Any, Any]]:
    """``[(key, subtree)]`` that replace the group's members in its parent."""
    base = g.path + ((g.holder,) if g.holder is not None else ())
    source = node[g.holder] if g.holder is not None else node
    members = [source[k] for k in g.keys]
    if not g.period:
        _check_members(base, g.keys, members, axis, g.start)
        return [(g.into, _stack_trees(members, axis, axis_name))]
    stacks, rest = g.blocks()
    items = []
    for j, positions in enumerate(stacks):
        sub = [members[p] for p in positions]
        _check_members(base, tuple(g.keys[p] for p in positions), sub, axis, 0)
        items.append((g.sub_name(j), _stack_trees(sub, axis, axis_name)))
    out = [(g.into, _rebuild_mapping(source, items))]
    if rest:
        leftover = [(g.sub_name(j), members[p]) for j, p in enumerate(rest)]
        out.append((_remainder_key(g.into), _rebuild_mapping(source, leftover)))
    return out


def _stack_groups(
    node: Any, path: tuple, groups: list[Group], axis: int, axis_name: str, convert: Any
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
    outputs = {id(g): _stacked_outputs(node, g, axis, axis_name) for g in groups}
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
            left = [(m, c) for m, c in v.items() if m not in partial[k]]
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
            layers[base + j] = rest[rkeys[names[j]]]
    return layers


def to_loop(
    tree: Any,
    *,
    source: str = "blocks",
    pattern: str = "layer_{i}",
    axis: int = 0,
    axis_name: str = "layers",
    period: int | None = None,
    layers: Any = None,
    stacks: Any = None,
) -> Any:
    """Unstack every subtree named ``source`` into one subtree per layer.

    Args:
      tree: a checkpoint tree holding stacked subtrees.
      source: the key of the stacked subtrees; every one, at any depth, is
        unstacked (params, optimizer ``mu``/``nu`` …).
      pattern: the layers' keys, with ``{i}``. ``"{i}"`` puts the layers back
        under ``source`` itself as a digit-keyed list (keys ``'0' … 'N-1'``);
        ``"NAME/{i}"`` puts them into the digit-keyed list ``NAME`` beside
        ``source`` (merged with the layers already there: T5's ``block/0``).
      axis: the layer axis of every leaf.
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
    specs = _loop_specs(source, pattern, period, layers, stacks)
    loop_stacks(tree, axis=axis, stacks=specs)  # raises when there is nothing to unstack
    by_source = {src: (pat, per, rng) for src, pat, per, rng in specs}

    def convert(node: Any, path: tuple) -> Any:
        if not _is_container(node):
            return node
        here = [s for s in by_source if _is_mapping(node) and s in node]
        if not here:
            return _map_children(node, convert, path)
        outputs: dict[Any, list[tuple[Any, Any]]] = {}
        merged: dict[Any, list[tuple[Any, Any]]] = {}
        drop = set()
        for src in here:
            pat, per, rng = by_source[src]
            holder, template = loop_template(pat)
            layers_ = _unstack_layers(node, path, src, axis, axis_name, per, template)
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
    """``[(source, pattern, period, layers)]`` for `to_loop`'s arguments, checked."""
    if stacks is None:
        specs = [(source, pattern, period, layers)]
    else:
        specs = []
        for s in stacks:
            if isinstance(s, Mapping):
                specs.append((s.get("source", "blocks"), s.get("pattern", "layer_{i}"),
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
    out = []
    for src, pat, per, rng in specs:
        pat = pat or "layer_{i}"
        loop_template(pat)
        if per is not None and (not isinstance(per, int) or isinstance(per, bool) or per < 1):
            raise GroupError(f"period must be a positive integer, got {per!r}.")
        out.append((src, pat, per, parse_layers(rng)))
    return out


def loop_stacks(
    tree: Any,
    *,
    source: str = "blocks",
    pattern: str = "layer_{i}",
    axis: int = 0,
    period: int | None = None,
    layers: Any = None,
    stacks: Any = None,
) -> list[Stacked]:
    """The stacks `to_loop` with these options would unstack (same arguments).

    Raises:
      NothingToConvertError: none; GroupError: bad options or stacks.
    """
    specs = _loop_specs(source, pattern, period, layers, stacks)
    found = []
    for src, pat, per, rng in specs:
        for st in find_stacks(tree, src, axis=axis, period=per, pattern=loop_template(pat)[1]):
            found.append(replace(st, pattern=pat, start=(rng or (0, None))[0] or 0))
    if not found:
        top = list(tree.keys())[:_MAX_LISTED] if _is_mapping(tree) else []
        names = " or ".join(repr(s[0]) for s in specs)
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

"""Finding layer groups: which sibling subtrees to-scan stacks, and checking
that they are alike. No I/O.

A group is the sibling keys ``<prefix>_<i>`` (or a template's, ``--pattern``) or
a digit-keyed list (NNX, Hugging Face), numbered ``0 … N-1``. `Spec` says what to
stack and how (``--pattern``/``--into``, ``--period``, ``--layers``); `Group` is
what was found.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ckptconv.errors import GroupError
from ckptconv.tree import (
    _MAX_LISTED,
    _children,
    _is_container,
    _is_mapping,
    format_path,
    is_leaf,
    leaf_dtype,
    leaf_shape,
    leaves_with_paths,
)

#: Prefixes whose ``<prefix>_<i>`` siblings form a group by default.
DEFAULT_PREFIXES = ("layer", "layers", "block", "blocks", "h")


# ``layers_3``, and ``blocks.3`` (recurrentgemma names its blocks so).
_DEFAULT_RE = re.compile(r"^(%s)([_.])(0|[1-9][0-9]*)$" % "|".join(DEFAULT_PREFIXES))


_DIGITS_RE = re.compile(r"^(0|[1-9][0-9]*)$")


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
        count = f"{self.num_layers} layer" + ("s" if self.num_layers != 1 else "")
        head = f"{format_path(self.members_path)}: {count}{r} -> "
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
            found.setdefault(m.group(1) + m.group(2) + "{i}", {})[int(m.group(3))] = k
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
        what = f"layers {start} … {stop - 1}" if stop > start else f"layers from {start}"
        members = format_path(path) if template == "{i}" else template
        raise GroupError(
            f"{format_path(path)}: --layers {_range_text(spec.layers)} asks for {what}, "
            f"but {members} has {n} layers (0 … {n - 1}). Pass a range within them."
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
    if spec.pattern is None and len(by_index) < 2:
        return None  # one member is no group by default (T5's block/0 left by --layers 1:)
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
        if same_keys:
            # Same leaves, other shapes: different units (a ResNet
            # bottleneck's convolutions), not layers of one stack.
            near.append(NearGroup(path, "{i}", _unlike_message(path, members)))
            return None
        run = _alike_run(members)
        if run is not None:
            near.append(NearGroup(path, "{i}", _near_message(path, "{i}", keys, members, run)))
    return None


def _unlike_message(path: tuple, members: list[Any]) -> str:
    """Say how the members of a list of different units differ."""
    ref = dict(leaves_with_paths(members[0]))
    for i, m in enumerate(members[1:], 1):
        for p, b in leaves_with_paths(m):
            a = ref.get(p)
            if a is not None and (leaf_shape(a) != leaf_shape(b) or leaf_dtype(a) != leaf_dtype(b)):
                return (
                    f"{format_path(path)}: its {len(members)} members hold the same leaves in "
                    f"other shapes ({format_path(p)}: {leaf_shape(a)} in 0, {leaf_shape(b)} "
                    f"in {i}): different units, not layers of one stack; left as they are"
                )
    return f"{format_path(path)}: its members differ: not layers of one stack; left as they are"


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
        # X beside X_remainder is MaxText's blocks, already stacked (to-loop --period).
        grouped: set = {
            k for k in node.keys()
            if f"{k}_remainder" in node
            or (isinstance(k, str) and k.endswith("_remainder") and k[: -len("_remainder")] in node)
        }
        if pattern != "{i}":
            for template, by_index in _candidate_groups(node, pattern):
                if pattern is None and len(by_index) < 2:
                    continue  # one layer_0 is no group by default
                if set(by_index.values()) & grouped:
                    continue
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
    # State that one layer holds beside params of many (MaxText's loop model
    # keeps its RNG streams once, under layers_0) is not layer state.
    from ckptconv import axes

    bases = [g.path + ((g.holder,) if g.holder is not None else ()) for g in groups]
    once = set(axes.held_once(bases, [len(g.keys) for g in groups]))
    if once:
        most = max(len(g.keys) for g in groups)
        for i in sorted(once):
            g = groups[i]
            near.append(NearGroup(
                g.path, g.template,
                f"{format_path(bases[i] + (g.keys[0],))}: only {g.keys[0]} holds it (the "
                f"params have {most} layers): not layer state (RNG streams kept once); it "
                "stays where it is",
            ))
        groups = [g for i, g in enumerate(groups) if i not in once]
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


_NUMBERED_RE = re.compile(r"^(.+)_(0|[1-9][0-9]*)$")


def numbered_candidates(tree: Any) -> list[tuple[tuple, str, int]]:
    """``[(path, "Block_{i}", n)]``: siblings ``NAME_0 … NAME_{n-1}`` (n >= 2)
    of alike subtrees whose name is none of `DEFAULT_PREFIXES`, as flax
    auto-numbers modules (``Block_0``, and ``Dense_0`` inside one). Not
    stacked by default, since a layer's own ``Dense_0, Dense_1`` would be;
    named in errors, and tried against a REF (`ckptconv.like`), whose
    structure then decides. Largest first."""
    out: list[tuple[int, tuple, str, int]] = []

    def walk(node: Any, path: tuple) -> None:
        if not _is_mapping(node):
            return
        by_name: dict[str, dict[int, Any]] = {}
        for k in node.keys():
            m = _NUMBERED_RE.match(k) if isinstance(k, str) else None
            if m and not _DEFAULT_RE.match(k):
                by_name.setdefault(m.group(1), {})[int(m.group(2))] = k
        for name, found in by_name.items():
            members = [node[found[i]] for i in sorted(found)]
            if (len(found) >= 2 and sorted(found) == list(range(len(found)))
                    and all(_is_container(m) for m in members) and _consistent(members)):
                size = sum(len(leaves_with_paths(m)) for m in members)
                out.append((size, path, f"{name}_{{i}}", len(found)))
        for k, v in node.items():
            walk(v, path + (k,))

    walk(tree, ())
    out.sort(key=lambda c: -c[0])
    return [(p, t, n) for _, p, t, n in out]


def find_near_groups(
    tree: Any,
    pattern: str | None = None,
    *,
    into: str | None = None,
    period: int | None = None,
    layers: Any = None,
    remainder: str = "separate",
    groups: Any = None,
) -> list[NearGroup]:
    """What `to_scan` with these options leaves alone, each with a message:
    digit-keyed sibling layers alike except for a few members (T5's block 0;
    the message names the option that stacks them) and state that only one
    layer holds beside params of many (MaxText's RNG streams)."""
    return _find(tree, _specs(groups, pattern, into, period, layers, remainder))[1]


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

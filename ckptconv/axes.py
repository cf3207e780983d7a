"""Which layer axis each group (or stack) uses: per-collection layer axes.

``--axis`` places the layer axis of the params and of every tree that mirrors
them (optimizer moments); other variable collections and NNX state that is
not a ``Param`` stack on axis 0, as ``nn.scan``'s ``variable_axes`` put them
(MaxText: params and Adam ``mu``/``nu`` on ``param_scan_axis`` 1, ``nnx_aux``
RNG state on 0). ``--axis-for NAME=N`` overrides both for the groups under
NAME.

The rule, for a checkpoint that has a ``params`` key (a train state, a
variables dict):

1. ``--axis-for NAME=N``: a group whose path starts with ``NAME`` (keys
   separated by ``/``), or holds the key ``NAME`` at any depth, uses N;
2. a group under a ``params`` key uses ``--axis``;
3. so does a group whose layers hold the same leaves (paths and shapes) as
   a params group's: the optimizer's moments (``opt_state/0/mu/layer_{i}``
   of a flax TrainState, whose ``mu`` mirrors params without the key);
4. any other group uses axis 0.

Without a ``params`` key anywhere (a bare params tree), every group uses
``--axis``, as before. The rule matters only where ``--axis`` is not 0.

State that only one layer holds (MaxText's loop model keeps its RNG streams
once, under ``layers_0``) is not layer state: `held_once` names such groups,
and to-scan leaves them where they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ckptconv.errors import CkptconvError
from ckptconv.tree import format_path, leaf_shape, leaves_with_paths

PARAMS = "params"


def parse_axis_for(value: Any) -> dict[str, int]:
    """``["nnx_aux=0", "batch_stats=1"]`` (or a dict) -> ``{"nnx_aux": 0, …}``."""
    if not value:
        return {}
    if isinstance(value, Mapping):
        items = list(value.items())
    else:
        items = []
        for text in [value] if isinstance(value, str) else value:
            name, sep, n = str(text).partition("=")
            if not sep or not name.strip("/") or not n.strip().isdigit():
                raise CkptconvError(
                    f"--axis-for {text!r}: give NAME=N, a collection (or a path of keys "
                    "separated by '/') and its layer axis, like --axis-for nnx_aux=0."
                )
            items.append((name, int(n)))
    out: dict[str, int] = {}
    for name, n in items:
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise CkptconvError(f"--axis-for {name}={n}: the axis must be 0 or more.")
        out[str(name).strip("/")] = n
    return out


def _named(path: Sequence[Any], name: str) -> bool:
    keys = [str(k) for k in path]
    parts = name.split("/")
    if len(parts) == 1:
        return parts[0] in keys
    return keys[: len(parts)] == parts


def _override(path: Sequence[Any], axis_for: Mapping[str, int]) -> int | None:
    # The longest (most specific) name that applies wins.
    best = None
    for name, n in axis_for.items():
        if _named(path, name) and (best is None or len(name) > len(best[0])):
            best = (name, n)
    return None if best is None else best[1]


def _under_params(path: Sequence[Any]) -> bool:
    return PARAMS in (str(k) for k in path)


def signature(member: Any) -> frozenset:
    """The leaves of one layer (or one stack): relative paths and shapes."""
    return frozenset(
        (format_path(p), leaf_shape(x)) for p, x in leaves_with_paths(member)
    )


def has_params(tree: Any) -> bool:
    """Whether a ``params`` key is anywhere in ``tree`` (a variables dict, a
    train state): then the collections beside it take axis 0."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping) or hasattr(node, "items") and not hasattr(node, "shape"):
            try:
                items = list(node.items())
            except Exception:
                continue
            for k, v in items:
                if str(k) == PARAMS:
                    return True
                stack.append(v)
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return False


def choose(
    paths: Sequence[tuple[Any, ...]],
    signatures: Sequence[frozenset],
    axis: int,
    axis_for: Mapping[str, int] | None = None,
    params: bool | None = None,
) -> list[int]:
    """The layer axis of each group (or stack), by the rule above.

    Args:
      paths: where each group's layers are (its path, with the list key for
        digit lists; a stack's own path).
      signatures: `signature` of each group's first layer (of each stack).
      axis: ``--axis``.
      axis_for: ``--axis-for``, parsed.
      params: whether the tree has a ``params`` key (`has_params`; default:
        whether some path passes one). Pass the tree's, so that to-scan and
        to-loop (which may unstack one name at a time) agree.
    """
    axis_for = axis_for or {}
    has = any(_under_params(p) for p in paths) if params is None else params
    param_sigs = {s for p, s in zip(paths, signatures) if _under_params(p)}
    out = []
    for p, s in zip(paths, signatures):
        n = _override(p, axis_for)
        if n is None:
            if not has or _under_params(p) or s in param_sigs:
                n = axis
            else:
                n = 0
        out.append(n)
    return out


def held_once(paths: Sequence[tuple[Any, ...]], counts: Sequence[int]) -> list[int]:
    """Indices of groups that only one layer holds, beside params groups of
    several layers, outside params: not layer state (RNG streams kept once)."""
    if not any(_under_params(p) and c > 1 for p, c in zip(paths, counts)):
        return []
    return [i for i, (p, c) in enumerate(zip(paths, counts)) if c == 1 and not _under_params(p)]

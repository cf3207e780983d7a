"""What goes to OUT: ``--only`` subtrees, a ``--root`` subtree, a ``--dtype`` cast.

These act on lazy trees (nothing is read): `keep_only` drops every subtree not
named, so its data is never read; `take_root` makes one subtree the output's
root; `cast` wraps floating leaves in `ckptconv.lazy.Cast`, which the writers
apply slab by slab. Paths are ``/``-separated keys from the root of a
checkpoint item's tree (``params`` or ``params/params/decoder``); a digit
selects a list element.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptconv import lazy
from ckptconv.errors import CkptconvError

#: The dtypes ``--dtype`` casts to.
CAST_DTYPES = ("float32", "bfloat16", "float16")


class SelectionError(CkptconvError):
    """An ``--only`` / ``--root`` path that is not there, or a bad ``--dtype``."""


@dataclass(frozen=True)
class Cast:
    """What `cast` did: how many leaves, and their bytes before and after."""

    dtype: np.dtype
    leaves: int = 0
    before: int = 0
    after: int = 0

    @property
    def saved(self) -> int:
        return self.before - self.after


def parse_path(text: str | Sequence[Any], option: str = "--only") -> tuple[str, ...]:
    """``"params/params/decoder"`` -> ``("params", "params", "decoder")``."""
    if isinstance(text, str):
        parts = tuple(p for p in text.strip("/").split("/"))
    else:
        parts = tuple(str(p) for p in text)
    if not parts or any(p == "" for p in parts):
        raise SelectionError(
            f"{option} {text!r}: give a path of keys separated by '/', like params or "
            "params/params/decoder."
        )
    return parts


def parse_dtype(name: str | np.dtype | type) -> np.dtype:
    """The numpy dtype for ``--dtype`` (one of `CAST_DTYPES`)."""
    text = name if isinstance(name, str) else getattr(np.dtype(name), "name", str(name))
    if text not in CAST_DTYPES:
        raise SelectionError(
            f"--dtype {text}: not a floating dtype ckptconv casts to; --dtype casts floating "
            f"leaves to {', '.join(CAST_DTYPES)} (integer, boolean and PRNG-key leaves stay "
            "as they are)."
        )
    if text == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(text)


def _children(node: Any) -> dict[str, Any] | None:
    if isinstance(node, Mapping):
        return {str(k): v for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return {str(i): v for i, v in enumerate(node)}
    return None


def _keys_text(keys: Sequence[str]) -> str:
    shown = sorted(keys)
    text = ", ".join(shown[:12])
    return text + (f", … ({len(shown)} in all)" if len(shown) > 12 else "")


def find(tree: Any, path: tuple[str, ...]) -> tuple[Any, str | None]:
    """The subtree at ``path``, or ``(None, why)`` naming the keys that are there."""
    node = tree
    for depth, key in enumerate(path):
        kids = _children(node)
        where = "/".join(path[:depth])
        if kids is None:
            return None, f"{where} is a leaf, with no {key!r} under it"
        if key not in kids:
            at = f"under {where!r}" if where else "at the top of the tree"
            keys = f"the keys there are {_keys_text(kids)}" if kids else "there are no keys there"
            return None, f"no {key!r} {at}; {keys}"
        node = kids[key]
    return node, None


_MISSING = object()


def keep_only(tree: Any, paths: Sequence[tuple[str, ...]]) -> Any:
    """``tree`` with only the subtrees at ``paths``, each at its place (None
    when none of them is in ``tree``). Containers keep their type."""
    out = _keep(tree, paths)
    return None if out is _MISSING else out


def _keep(tree: Any, paths: Sequence[tuple[str, ...]]) -> Any:
    if any(not p for p in paths):
        return tree
    heads: dict[str, list[tuple[str, ...]]] = {}
    for p in paths:
        heads.setdefault(p[0], []).append(p[1:])
    if isinstance(tree, Mapping):
        kept = {}
        for k, v in tree.items():
            if str(k) in heads:
                sub = _keep(v, heads[str(k)])
                if sub is not _MISSING:
                    kept[k] = sub
        return kept or _MISSING
    if isinstance(tree, (list, tuple)):
        # A list keeps its length, so that the kept elements keep their
        # paths; the elements not kept become None.
        items = [_keep(v, heads[str(i)]) if str(i) in heads else _MISSING for i, v in enumerate(tree)]
        if all(v is _MISSING for v in items):
            return _MISSING
        items = [None if v is _MISSING else v for v in items]
        return items if isinstance(tree, list) else tuple(items)
    return _MISSING


def cast(tree: Any, dtype: np.dtype) -> tuple[Any, Cast]:
    """Every floating lazy leaf of ``tree`` as a `lazy.Cast` to ``dtype``; an
    in-memory array (numpy, jax: verify's trees) is cast now, with the same
    rounding. Other leaves, and leaves already cast, stay as they are."""
    count = before = after = 0

    def visit(x: Any) -> Any:
        nonlocal count, before, after
        lazy_leaf = isinstance(x, lazy.LAZY) and not isinstance(x, lazy.Cast)
        array = isinstance(x, (np.ndarray, np.generic)) or (
            not isinstance(x, lazy.LAZY) and hasattr(x, "__array__") and hasattr(x, "dtype")
            and hasattr(x, "shape"))  # a jax.Array
        if lazy_leaf or array:
            if is_floating(x.dtype) and np.dtype(x.dtype) != dtype:
                c = lazy.Cast(x, dtype) if lazy_leaf else np.asarray(x).astype(dtype)
                count += 1
                before += x.nbytes
                after += c.nbytes
                return c
            return x
        if isinstance(x, Mapping):
            return {k: visit(v) for k, v in x.items()}
        if isinstance(x, list):
            return [visit(v) for v in x]
        if isinstance(x, tuple):
            items = [visit(v) for v in x]
            return type(x)(*items) if hasattr(x, "_fields") else tuple(items)  # namedtuples kept
        return x

    out = visit(tree)
    return out, Cast(dtype, count, before, after)


def is_floating(dtype: Any) -> bool:
    """Real floating dtypes, ml_dtypes' (bfloat16, float8_*) included."""
    dt = np.dtype(dtype)
    return dt.kind == "f" or (dt.kind == "V" and dt.name.startswith(("bfloat", "float")))

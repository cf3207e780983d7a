"""Walking trees: the containers and leaves ckptconv understands. No I/O.

Trees are nested mappings (``dict``, ``FrozenDict``, ``nnx.State``), sequences
(lists, tuples, namedtuples such as optax states) and any other registered JAX
pytree node, with array leaves: numpy arrays, ``jax.Array``s, lazy leaves from
`ckptconv.lazy`, boxed leaves (``nn.Partitioned``, ``nn.LogicallyPartitioned``,
``nnx.Variable``). ``None`` and empty containers are kept as they are.

Paths in messages are the keys joined by ``/`` (``params/layer_3/Dense_0/kernel``),
as Orbax and ``flax.traverse_util`` spell them. Finding groups is `groups`,
stacking `stack`, unstacking `unstack`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ckptconv import lazy
from ckptconv.errors import GroupError

#: How many items a message lists before "… and N more".
_MAX_LISTED = 10


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
        # ``nnx.state`` nests plain dicts inside one State (``State.__getitem__``
        # only wraps them on the way out): unwrap the children, so the result
        # has the pytree structure of the target model's ``nnx.state``.
        state = _nnx_state()
        return type(like)({k: v.raw_mapping if isinstance(v, state) else v for k, v in items})
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


def is_number(x: Any) -> bool:
    """A Python number leaf (``bool``, ``int``, ``float``, ``complex``): no
    shape, no dtype of its own (a msgpack train state's ``step``)."""
    return isinstance(x, (bool, int, float, complex))


def leaf_shape(x: Any) -> tuple[int, ...] | None:
    """The shape of an array leaf (boxed leaves: of the value), else None."""
    x = _unbox(x)
    shape = getattr(x, "shape", None)
    return None if shape is None else tuple(shape)


def leaf_dtype(x: Any) -> Any:
    """The dtype of an array leaf (boxed leaves: of the value), else None.

    A numpy dtype, or JAX's own for typed PRNG key arrays (``key<fry>``, what
    ``nnx.Rngs`` holds), which numpy cannot express.
    """
    x = _unbox(x)
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return None
    try:
        return np.dtype(dtype)
    except TypeError:
        return dtype


def _unbox(x: Any) -> Any:
    if isinstance(x, _axis_metadata()):
        return x.unbox()
    if isinstance(x, _nnx_variable()):
        return x.get_value()
    return x


def copy_containers(node: Any) -> Any:
    """``node`` with every container rebuilt (leaves shared): a subtree moved to a
    new place in a converted tree is not the input's own object."""
    if not _is_container(node):
        return node
    return _map_children(node, lambda v, _: copy_containers(v), ())


def _check_axis(axis: int) -> None:
    if not isinstance(axis, int) or axis < 0:
        raise GroupError(f"axis must be a non-negative integer, got {axis!r}.")

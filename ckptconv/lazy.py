"""Leaves that stand for array data not yet read.

Readers of the streaming engine return trees whose array leaves are `Ref`s (an
array in the input file, described but not read). `ckptconv.stack.to_scan` and
`ckptconv.unstack.to_loop` accept such trees and answer with `Stack` and `Slice` leaves instead
of computing anything, so the in-memory and streaming paths share one
implementation of the tree logic; a format's writer then turns each output leaf
into bytes, one leaf (or one chunk) at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


@dataclass(frozen=True)
class Ref:
    """An array stored in the input, not read.

    Attributes:
      source: the reader's own handle (hashable): for Orbax the dotted param
        name, for msgpack the byte span of the array in the file.
      shape: the array's shape.
      dtype: the array's numpy dtype.
    """

    source: Any
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shape, self.dtype)


@dataclass(frozen=True)
class Stack:
    """Output array = ``np.stack([p.read() for p in parts], axis=axis)``."""

    parts: tuple[Ref, ...]
    axis: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


@dataclass(frozen=True)
class Slice:
    """Output array = ``np.take(source.read(), index, axis=axis)``."""

    source: Ref
    index: int
    axis: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shape, self.dtype)


@dataclass(frozen=True)
class Cast:
    """Output array = ``value.read().astype(dtype)`` (``--dtype``): a `Ref`,
    `Stack` or `Slice` whose floating values are rounded to ``dtype`` as numpy
    and ml_dtypes round (to nearest, ties to even). Writers cast slab by slab."""

    value: Ref | Stack | Slice
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shape, self.dtype)


LAZY = (Ref, Stack, Slice, Cast)


@dataclass(frozen=True)
class Deferred:
    """An array computed only when a writer needs it: ``read()``.

    Used to write another format's lazy leaves one at a time (Orbax in,
    msgpack out), so memory holds one output leaf, not the checkpoint.
    """

    read: Any
    shape: tuple[int, ...]
    dtype: np.dtype
    #: For a stack: each layer's read, and the layer axis, so that a writer
    #: can write one layer at a time (and chunk the output layer-thick).
    parts: tuple[Any, ...] | None = None
    axis: int | None = None

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shape, self.dtype)


def defer(tree: Any, read: Any) -> Any:
    """`materialize`, but each lazy leaf becomes a `Deferred` read when written."""
    return _map_lazy(tree, lambda leaf: _deferred(leaf, read))


def _deferred(leaf: Ref | Stack | Slice | Cast, read: Any) -> Deferred:
    parts = axis = None
    inner = leaf.value if isinstance(leaf, Cast) else leaf
    if isinstance(inner, Stack):
        cast = np.dtype(leaf.dtype) if isinstance(leaf, Cast) else None
        parts = tuple(
            (lambda p=p: read(p)) if cast is None else (lambda p=p: read(p).astype(cast))
            for p in inner.parts
        )
        axis = inner.axis
    return Deferred(
        lambda: _value(leaf, read), tuple(leaf.shape), np.dtype(leaf.dtype), parts, axis
    )


def stack(parts: list[Ref], axis: int) -> Stack:
    """The lazy form of ``np.stack(parts, axis)``."""
    first = parts[0]
    shape = list(first.shape)
    shape.insert(axis, len(parts))
    return Stack(tuple(parts), axis, tuple(shape), first.dtype)


def unstack(ref: Ref, axis: int) -> list[Slice]:
    """The lazy form of ``[np.take(ref, i, axis) for i in range(n)]``."""
    shape = list(ref.shape)
    n = shape.pop(axis)
    return [Slice(ref, i, axis, tuple(shape), ref.dtype) for i in range(n)]


def materialize(tree: Any, read: Any) -> Any:
    """Replace every lazy leaf of ``tree`` by its numpy value.

    Args:
      tree: nested dicts and lists with `Ref`, `Stack` and `Slice` leaves.
      read: ``read(ref) -> np.ndarray`` for the input the Refs point into.
    """
    return _map_lazy(tree, lambda leaf: _value(leaf, read))


def _value(leaf: Ref | Stack | Slice | Cast, read: Any) -> np.ndarray:
    if isinstance(leaf, Cast):
        return _value(leaf.value, read).astype(leaf.dtype)
    if isinstance(leaf, Ref):
        return read(leaf)
    if isinstance(leaf, Stack):
        return np.stack([read(p) for p in leaf.parts], axis=leaf.axis)
    # A reader that can read one layer (``read.take``) is not made to read the stack.
    take = getattr(read, "take", None)
    if take is not None:
        return np.asarray(take(leaf.source, leaf.index, leaf.axis))
    return np.take(read(leaf.source), leaf.index, axis=leaf.axis)


def _map_lazy(tree: Any, fn: Any) -> Any:
    """``tree`` with ``fn(leaf)`` in place of every lazy leaf (dicts, lists, tuples)."""
    if isinstance(tree, LAZY):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map_lazy(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map_lazy(v, fn) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_map_lazy(v, fn) for v in tree)
    return tree

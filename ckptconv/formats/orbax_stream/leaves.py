"""The output tree flattened into leaves (`_Leaf`: an Orbax key path, the
value, and the value metadata it is written with), and the source arrays a
lazy leaf refers to."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptconv.formats.orbax_stream.metadata_read import _DICT, _SEQUENCE
from ckptconv.lazy import LAZY, Ref, Stack


@dataclass
class _Leaf:
    """One output leaf: its place in the tree and its Orbax metadata."""

    keys: tuple[tuple[str, int], ...]
    value: Any
    value_type: str = "np.ndarray"
    skip_deserialize: bool = False
    write_shape: list[int] | None = None
    sharding: str | None = None
    ext_metadata: Any = None
    chunks: list[int] | None = None
    #: The dtype a `Cast` leaf is written in (its value is then the Cast's source).
    cast: np.dtype | None = None
    #: zarr3 sources: the ``zarr.json`` of the leaf's (first) source array,
    #: whose codecs the decode path writes the leaf with.
    template: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return ".".join(k for k, _ in self.keys)

    def metadata_entry(self) -> dict[str, Any]:
        value = {"value_type": self.value_type, "skip_deserialize": self.skip_deserialize}
        if self.write_shape is not None:
            value["write_shape"] = list(self.write_shape)
        return {
            "key_metadata": [{"key": k, "key_type": t} for k, t in self.keys],
            "value_metadata": value,
        }


def _flatten(
    node: Any, keys: tuple[tuple[str, int], ...]
) -> Iterator[tuple[tuple[tuple[str, int], ...], Any]]:
    """(Orbax key path, leaf) pairs; empty containers and None are leaves."""
    if isinstance(node, LAZY):
        yield keys, node
    elif isinstance(node, Mapping):
        if not node:
            yield keys, node
        for k, v in node.items():
            yield from _flatten(v, (*keys, (str(k), _DICT)))
    elif isinstance(node, (list, tuple)):
        if not node:
            yield keys, node
        for i, v in enumerate(node):
            yield from _flatten(v, (*keys, (str(i), _SEQUENCE)))
    else:
        yield keys, node


def _refs(value: Any) -> list[Ref]:
    if isinstance(value, Ref):
        return [value]
    if isinstance(value, Stack):
        return list(value.parts)
    return [value.source]


def _leaf_dtype(value: Any) -> np.dtype:
    return np.dtype(value.dtype)

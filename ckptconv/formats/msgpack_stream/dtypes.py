"""The dtypes a checkpoint may hold, by name (`FLAX_DTYPES`): a name read
from a file is looked up here, never given to ``np.dtype``'s parser; the
ml_dtypes entries are added on first need (`DtypeTable`, which the
safetensors reader and Orbax's metadata reader use too)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np


class DtypeTable(Mapping):
    """A read-only table of dtypes whose ml_dtypes entries (bfloat16, float8_*)
    are added on first need.

    ``make(ml)`` gives the table: numpy's entries only for ``ml=None``, all of
    them, in order, for the ``ml_dtypes`` module. Importing ml_dtypes costs
    0.6 to 1 s here (its extension registers casts and ufunc loops for every
    type), more than the rest of a conversion's start, and a checkpoint of
    numpy dtypes never needs it; an array of an ml_dtypes type has imported it.
    """

    def __init__(self, make: Callable[[Any], dict]) -> None:
        self._make = make
        self._plain = make(None)
        self._all: dict | None = None

    def _full(self) -> dict:
        if self._all is None:
            import ml_dtypes

            self._all = self._make(ml_dtypes)
        return self._all

    def __getitem__(self, key: Any) -> Any:
        if self._all is None and key in self._plain:
            return self._plain[key]
        return self._full()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._full())

    def __len__(self) -> int:
        return len(self._full())


def _allowed_dtypes(ml: Any) -> dict[str, np.dtype]:
    # The dtypes flax can write (``dtype.name`` of numpy's numeric types and
    # of ml_dtypes' types): a name from a file is looked up here, never given
    # to ``np.dtype``, whose parser also takes "O" (Python objects), structured
    # dtypes and comma strings (which it evaluates with ``ast.literal_eval``).
    names = ["bool"]
    names += [f"{u}int{b}" for u in ("", "u") for b in (8, 16, 32, 64)]
    names += ["float16", "float32", "float64", "complex64", "complex128"]
    out = {n: np.dtype(n) for n in names}
    for n in dir(ml) if ml is not None else ():
        t = getattr(ml, n)
        if isinstance(t, type) and issubclass(t, np.generic):
            out[np.dtype(t).name] = np.dtype(t)
    return out


#: Every dtype name a checkpoint may hold (flax's msgpack, Orbax's zarr) -> its dtype.
FLAX_DTYPES: Mapping[str, np.dtype] = DtypeTable(_allowed_dtypes)


def _dtype_from_name(name: str) -> np.dtype:
    """The numpy dtype of a dtype name flax wrote; KeyError if it is not one."""
    return FLAX_DTYPES[name]

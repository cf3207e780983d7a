"""Array data read from a checkpoint's byte spans: one array (`read_array`,
a zero-copy view on the memory map unless copied) or the whole tree (`load`)."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from ckptconv.formats import byteplan
from ckptconv.formats.msgpack_stream.parser import _close, _dontneed, _open_mmap, _Parser, spans
from ckptconv.lazy import Ref


def _as_buffer(src: Any) -> tuple[Any, str]:
    if isinstance(src, (str, os.PathLike)):
        return _open_mmap(os.fspath(src)), os.fspath(src)
    return src, "the msgpack buffer"


_check_spans = byteplan.check_spans


def read_array(src: Any, ref: Ref, *, copy: bool = False) -> np.ndarray:
    """Reads one array of a msgpack checkpoint.

    Args:
      src: the file's path, or an open ``mmap`` / bytes-like object holding the
        whole file.
      ref: a `Ref` from `read_lazy` of that file.
      copy: return an independent, writable array. Otherwise a plain array is a
        read-only, zero-copy view on the mapping (which stays open as long as
        the view lives; don't change the file meanwhile), and a chunked one is a
        fresh concatenation.

    Returns:
      The array, with ``ref.shape`` and ``ref.dtype``.

    Raises:
      FormatError: the span does not fit in the file.
    """
    buf, name = _as_buffer(src)
    sp = spans(ref)
    _check_spans(sp, len(buf), name, f"of shape {ref.shape}")
    dtype = np.dtype(ref.dtype)
    parts = [
        np.frombuffer(
            buf, dtype=dtype, count=n // dtype.itemsize if dtype.itemsize else 0, offset=off
        )
        for off, n in sp
    ]
    arr = parts[0] if len(parts) == 1 else np.concatenate(parts)
    arr = arr.reshape(ref.shape)
    if copy and len(parts) == 1:
        arr = arr.copy()
    return arr


def _map_refs(tree: Any, fn: Callable[[Ref], Any]) -> Any:
    if isinstance(tree, Ref):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map_refs(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map_refs(v, fn) for v in tree]
    return tree


def _load_one(mm: mmap.mmap, ref: Ref, copy: bool) -> np.ndarray:
    arr = read_array(mm, ref, copy=copy)
    if copy:
        # The copy is all that is kept: unmap the file pages read for it, so
        # loading costs the tree's size, not twice that.
        for off, n in spans(ref):
            _dontneed(mm, off, off + n)
    return arr


def load(path: str | os.PathLike[str], *, copy: bool = True) -> Any:
    """Reads a whole msgpack checkpoint into numpy.

    Args:
      path: the checkpoint file.
      copy: give independent, writable arrays (the file is then closed).
        ``copy=False`` gives read-only views on a memory map of the file
        instead, which costs no memory until the data is touched.

    Returns:
      The tree ``flax.serialization.msgpack_restore`` gives for the file's
      bytes: same keys and order, same values and dtypes.

    Raises:
      FormatError: the file cannot be read or is not a complete checkpoint.
    """
    path = os.fspath(path)
    mm = _open_mmap(path)
    try:
        lazy = _Parser(mm, path).root()
        return _map_refs(lazy, lambda ref: _load_one(mm, ref, copy))
    finally:
        if copy:
            _close(mm)

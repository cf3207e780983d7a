"""`write`, `save` and `encoded_size`: an output tree serialized byte for
byte as ``flax.serialization.msgpack_serialize`` would (`_Emitter`), flax's
chunking of big arrays included, its array bytes gathered from the input
through `byteplan`, into a temporary file renamed into place when complete."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable, Mapping
from typing import Any

import msgpack
import numpy as np

from ckptconv.errors import FormatError
from ckptconv.formats import byteplan
from ckptconv.formats.byteplan import Gather, Planner
from ckptconv.formats.msgpack_stream.encoder import (
    _array_header,
    _bin_header,
    _ext_header,
    _map_header,
    _pack,
)
from ckptconv.formats.msgpack_stream.parser import (
    _CHUNKED,
    _EXT_NDARRAY,
    _close,
    _keypath,
    _open_mmap,
    spans,
)
from ckptconv.formats.msgpack_stream.reader import _check_spans
from ckptconv.lazy import Ref

# Gathering blocks and zero-copy segment sizes (see `byteplan`); read at every
# write, so they can be changed here (the tests shrink them).
_BLOCK = byteplan.BLOCK
_SEG_MIN = byteplan.SEG_MIN


class _Emitter:
    """Walks the output tree and writes it as flax would serialize it.

    Array bytes come through a `byteplan.Planner`: from ``buf`` (the one input
    file) by default, or from wherever ``resolve`` says (several input files).
    """

    def __init__(
        self,
        sink: Any,
        buf: Any,
        dst: str,
        sort_keys: bool,
        max_chunk: int,
        resolve: byteplan.Resolver | None = None,
    ) -> None:
        self.sink = sink
        self.buf = buf
        self.dst = dst
        self.sort_keys = sort_keys
        self.max_chunk = max_chunk
        # _BLOCK and _SEG_MIN are read now, so changing them here takes effect.
        self.planner = Planner(resolve or self.resolve, self.fail, "flax", _BLOCK, _SEG_MIN)

    def fail(self, path: list[Any], what: str) -> FormatError:
        return FormatError(f"cannot write '{self.dst}': leaf '{_keypath(path)}' {what}")

    def resolve(self, ref: Ref, path: list[Any]) -> tuple[Any, byteplan.Spans]:
        sp = spans(ref)
        if self.buf is None and not isinstance(self.sink, byteplan.Count):
            raise self.fail(path, "refers to an input file, but no source file was given")
        if self.buf is not None:
            _check_spans(sp, len(self.buf), "the source file", f"at '{_keypath(path)}'")
        return self.buf, sp

    def node(self, x: Any, path: list[Any], via_dicts: bool) -> None:
        if self.planner.is_array(x):
            self.array(x, path, via_dicts)
        elif isinstance(x, Mapping):
            keys = list(x)
            if self.sort_keys:
                # msgpack_serialize copies the tree with jax.tree_util, which
                # sorts every dict's keys.
                try:
                    keys = sorted(keys)
                except TypeError:
                    raise self.fail(
                        path, "has keys that cannot be sorted; write with sort_keys=False"
                    ) from None
            self.sink.put(_map_header(len(keys)))
            for k in keys:
                self.sink.put(self.scalar(k, path))
                path.append(k)
                self.node(x[k], path, via_dicts)
                path.pop()
        elif isinstance(x, (list, tuple)):
            self.sink.put(_array_header(len(x)))
            for i, v in enumerate(x):
                path.append(i)
                self.node(v, path, False)
                path.pop()
        else:
            self.sink.put(self.scalar(x, path))

    def scalar(self, x: Any, path: list[Any]) -> bytes:
        try:
            return _pack(x)
        except (TypeError, ValueError, OverflowError) as e:
            raise self.fail(
                path,
                f"holds {type(x).__name__} {x!r:.60}, which msgpack cannot store ({e}); "
                "convert it to a numpy array or a plain Python value",
            ) from None

    def array(self, x: Any, path: list[Any], via_dicts: bool) -> None:
        shape, dtype, gather = self.planner.plan(x, path)
        if via_dicts and gather.nbytes > self.max_chunk:
            self.chunked(shape, dtype, gather, path)
        else:
            self.ext(shape, dtype, gather, 0, gather.nbytes, path)

    def ext(
        self,
        shape: tuple[int, ...],
        dtype: np.dtype,
        gather: Gather,
        start: int,
        stop: int,
        path: list[Any],
    ) -> None:
        n = stop - start
        inner = b"\x93" + msgpack.packb(list(shape)) + msgpack.packb(dtype.name) + _bin_header(n)
        size = len(inner) + n
        if size >= 1 << 32:
            raise self.fail(
                path,
                f"is {n} bytes, more than one msgpack record can hold, and flax does not "
                "chunk arrays below a list; keep it under a dict, or write Orbax",
            )
        self.sink.put(_ext_header(_EXT_NDARRAY, size) + inner)
        self.sink.payload(gather, start, stop)

    def chunked(
        self, shape: tuple[int, ...], dtype: np.dtype, gather: Gather, path: list[Any]
    ) -> None:
        # Flax's _chunk: 1-d chunks of max(1, int(MAX_CHUNK_SIZE / itemsize)) items.
        items = max(1, int(self.max_chunk / dtype.itemsize))
        step = items * dtype.itemsize
        starts = range(0, gather.nbytes, step)
        head = [_map_header(3), _pack(_CHUNKED), _pack(True), _pack("shape")]
        head.append(_map_header(len(shape)))
        for i, d in enumerate(shape):
            head += [_pack(str(i)), _pack(d)]
        head += [_pack("chunks"), _map_header(len(starts))]
        self.sink.put(b"".join(head))
        for i, start in enumerate(starts):
            stop = min(start + step, gather.nbytes)
            self.sink.put(_pack(str(i)))
            self.ext(((stop - start) // dtype.itemsize,), dtype, gather, start, stop, path)


#: flax.serialization.MAX_CHUNK_SIZE, for writes in a process without flax.
_FLAX_MAX_CHUNK_SIZE = 2**30


def _max_chunk_size() -> int:
    # Read at every write, so a changed (e.g. monkeypatched) flax constant is
    # honoured; without flax loaded, its value, since importing flax (and JAX)
    # would cost a file-to-file conversion a second or more.
    flax_serialization = sys.modules.get("flax.serialization")
    return getattr(flax_serialization, "MAX_CHUNK_SIZE", _FLAX_MAX_CHUNK_SIZE)


def encoded_size(out_tree: Any, *, sort_keys: bool = True) -> int:
    """The exact size in bytes of the file `write` would produce for ``out_tree``.

    Reads no array data (for sizing a progress bar or checking free space).
    """
    sink = byteplan.Count()
    _Emitter(sink, None, "<size>", sort_keys, _max_chunk_size()).node(out_tree, [], True)
    return sink.n


def write(
    src_path: str | os.PathLike[str] | None,
    out_tree: Any,
    dst_path: str | os.PathLike[str],
    *,
    progress: Callable[[int], Any] | None = None,
    sort_keys: bool = True,
    resolve: byteplan.Resolver | None = None,
) -> None:
    """Writes ``out_tree`` as a Flax msgpack checkpoint, streaming from ``src_path``.

    The bytes written are exactly ``flax.serialization.msgpack_serialize(t)``
    where ``t`` is ``out_tree`` with every lazy leaf replaced by its numpy
    value: `Ref` the array itself, `Stack` ``np.stack(parts, axis)``, `Slice`
    ``np.take(source, index, axis)``; that includes flax's chunking of arrays
    above ``flax.serialization.MAX_CHUNK_SIZE`` (read at call time). One
    difference: a 0-d `Slice` (a layer of a stacked 1-d array) is written as a
    0-d array, which is what the layer held before stacking, where ``np.take``
    would give a numpy scalar (written by flax as ext 3).

    Memory stays near one block (32 MiB) whatever the sizes: where the output
    bytes are byte ranges of the input (copies, stacks and slices on axis 0,
    long rows) the kernel copies them file to file (``copy_file_range``, see
    `byteplan.KERNEL_COPY`), or they are written straight from a memory map of
    ``src_path``; elsewhere they are gathered block by block.

    The file appears at ``dst_path`` only when complete: it is written to a
    hidden temporary file beside it and renamed over ``dst_path`` (replacing
    any file there); on any error or interrupt the temporary file is removed.

    Args:
      src_path: the msgpack file the lazy leaves refer to (from `read_lazy`);
        may be None when ``out_tree`` has no lazy leaves.
      out_tree: nested dicts (any Mapping), lists and tuples (both written as
        msgpack arrays) whose leaves are lazy leaves, numpy or jax arrays,
        numpy scalars, or Python values msgpack stores (None, bool, int, float,
        complex, str, bytes).
      dst_path: the file to write.
      progress: called with a number of bytes each time output is written;
        the calls add up to the file's size (see `encoded_size`).
      sort_keys: sort every dict's keys, as ``msgpack_serialize`` does (it
        copies the tree with ``jax.tree_util``). False keeps ``out_tree``'s
        order, as ``to_bytes`` / ``msgpack_serialize(..., in_place=True)`` do.
      resolve: where the lazy leaves' bytes are, when they come from several
        files (the shards of a Hugging Face directory): ``resolve(ref, path)
        -> (mapped buffer, spans)``, see `byteplan`. ``src_path`` is then None.

    Raises:
      FormatError: the source cannot be read, a leaf cannot be written (the
        message names its path), or the output cannot be written.
    """
    dst = os.fspath(dst_path)
    max_chunk = _max_chunk_size()
    mm = _open_mmap(os.fspath(src_path), keep_fd=True) if src_path is not None else None
    folder, name = os.path.split(os.path.abspath(dst))
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
    try:
        with byteplan.output_file(tmp, dst) as f:
            out = byteplan.Out(f, progress, _BLOCK)
            _Emitter(out, mm, dst, sort_keys, max_chunk, resolve).node(out_tree, [], True)
            out.flush()
    finally:
        if mm is not None:
            _close(mm)


def save(tree: Any, dst_path: str | os.PathLike[str], *, sort_keys: bool = True) -> None:
    """Writes an in-memory tree (numpy/jax arrays) as a Flax msgpack checkpoint.

    Same bytes as ``flax.serialization.msgpack_serialize(tree)``, written leaf by
    leaf (jax arrays are copied to host one at a time) and renamed into place
    when complete; see `write` for ``sort_keys`` and errors.
    """
    write(None, tree, dst_path, sort_keys=sort_keys)

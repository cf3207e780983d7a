"""Streaming, bounded-memory reading and writing of Flax msgpack checkpoints.

Flax (``flax.serialization.msgpack_serialize`` / ``to_bytes``, and the
``checkpoint_<step>`` files of ``flax.training.checkpoints``) writes one msgpack
object, normally a map. Its array leaves are msgpack *ext* values:

* ext 1 (ndarray): the payload is itself msgpack,
  ``[shape, dtype_name, raw_bytes]`` with the raw bytes in C order;
* ext 2 (native complex): msgpack ``[real, imag]``;
* ext 3 (numpy scalar): like ext 1, for a 0-d array turned back into a scalar.

Arrays bigger than ``flax.serialization.MAX_CHUNK_SIZE`` bytes that are reached
from the root through maps only (never through a list) are written as a map
``{"__msgpack_chunked_array__": True, "shape": {"0": d0, ...},
"chunks": {"0": flat_chunk_0, ...}}`` of 1-d chunks of at most
``MAX_CHUNK_SIZE // itemsize`` elements.

This module parses that structure itself over a memory map, so reading the
layout of a checkpoint of any size touches only the headers, and writes a new
checkpoint leaf by leaf, straight from views of the input.

Byte spans (``Ref.source``) for msgpack:

* a plain array: ``(offset, nbytes)``, the raw array bytes in the file;
* a chunked array: a tuple of such pairs, ``((offset, nbytes), ...)``, one per
  chunk in order; the array is their concatenation (C order), reshaped.
  Even a one-chunk array uses this nested form, so it stays recognisable.

`spans` turns either form into the tuple of pairs.
"""

from __future__ import annotations

import math
import mmap
import os
import secrets
import struct
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import msgpack
import numpy as np

from ckptconv.errors import FormatError
from ckptconv.formats import byteplan
from ckptconv.formats.byteplan import Gather, Planner
from ckptconv.lazy import Ref

__all__ = [
    "encoded_size",
    "is_msgpack",
    "load",
    "read_array",
    "read_lazy",
    "save",
    "spans",
    "write",
]

_EXT_NDARRAY = 1
_EXT_COMPLEX = 2
_EXT_NPSCALAR = 3
_EXT_TIMESTAMP = -1
_CHUNKED = "__msgpack_chunked_array__"

# Gathering blocks and zero-copy segment sizes (see `byteplan`); read at every
# write, so they can be changed here (the tests shrink them).
_BLOCK = byteplan.BLOCK
_SEG_MIN = byteplan.SEG_MIN
_FOLIO = byteplan.FOLIO

_INCOMPLETE = "not a complete msgpack checkpoint"
_ADVICE = (
    "The file may be truncated (an interrupted copy or save) or not a Flax msgpack "
    "checkpoint; copy or save it again."
)


# --------------------------------------------------------------------------- reading


def _keypath(path: list[Any]) -> str:
    return "/".join(str(k) for k in path) or "<root>"


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


class _Parser:
    """A msgpack parser over a buffer that records array payloads as spans."""

    def __init__(self, buf: Any, path: str) -> None:
        self.buf = buf
        self.path = path
        self.pos = 0
        self.end = len(buf)
        self.keys: list[Any] = []

    def fail(self, what: str) -> FormatError:
        where = f" at leaf '{_keypath(self.keys)}'" if self.keys else ""
        return FormatError(
            f"{self.path}: {_INCOMPLETE}: {what}{where} (byte {self.pos} of "
            f"{len(self.buf)}). {_ADVICE}"
        )

    def take(self, n: int) -> int:
        start = self.pos
        if start + n > self.end:
            if self.end == len(self.buf):
                raise self.fail(f"the data ends {start + n - self.end} bytes early")
            raise self.fail("an array record is shorter than its contents")
        self.pos = start + n
        return start

    def unpack(self, fmt: str, n: int) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(n))[0]

    def header(self) -> tuple[str, Any, Any]:
        """Reads one type header: (kind, length or value, ext code)."""
        b = self.buf[self.take(1)]
        if b <= 0x7F:
            return "int", b, None
        if b >= 0xE0:
            return "int", b - 0x100, None
        if b <= 0x8F:
            return "map", b & 0x0F, None
        if b <= 0x9F:
            return "array", b & 0x0F, None
        if b <= 0xBF:
            return "str", b & 0x1F, None
        if b in _FIXED:
            kind, fmt, n = _FIXED[b]
            return kind, self.unpack(fmt, n), None
        if 0xD4 <= b <= 0xD8:
            return "ext", 1 << (b - 0xD4), self.unpack(">b", 1)
        if b in _EXT_LEN:
            fmt, n = _EXT_LEN[b]
            length = self.unpack(fmt, n)
            return "ext", length, self.unpack(">b", 1)
        if b == 0xC0:
            return "nil", None, None
        if b == 0xC2:
            return "bool", False, None
        if b == 0xC3:
            return "bool", True, None
        self.pos -= 1
        raise self.fail(f"byte 0x{b:02x} starts no msgpack value")

    def value(self, via_dicts: bool) -> Any:
        kind, arg, code = self.header()
        if kind in ("int", "float", "nil", "bool"):
            return arg
        if kind == "str":
            start = self.take(arg)
            try:
                return bytes(self.buf[start : start + arg]).decode("utf-8")
            except UnicodeDecodeError:
                self.pos = start
                raise self.fail("a string is not valid UTF-8") from None
        if kind == "bin":
            start = self.take(arg)
            return bytes(self.buf[start : start + arg])
        if kind == "array":
            out = []
            for i in range(arg):
                self.keys.append(i)
                # Flax never chunks (nor unchunks) arrays below a list.
                out.append(self.value(False))
                self.keys.pop()
            return out
        if kind == "map":
            return self.map(arg, via_dicts)
        return self.ext(code, arg)

    def map(self, n: int, via_dicts: bool) -> Any:
        out: dict[Any, Any] = {}
        for _ in range(n):
            key_pos = self.pos
            key = self.value(False)
            try:
                hash(key)
            except TypeError:
                self.pos = key_pos
                raise self.fail("a map key is an array or a map") from None
            self.keys.append(key)
            out[key] = self.value(via_dicts)
            self.keys.pop()
        if via_dicts and _CHUNKED in out:
            return self.unchunk(out)
        return out

    def unchunk(self, d: dict[Any, Any]) -> Ref:
        """The Ref for a flax chunked-array map (as flax's ``_unchunk``)."""
        try:
            shape_d, chunks_d = d["shape"], d["chunks"]
            shape = tuple(shape_d[str(i)] for i in range(len(shape_d)))
            chunks = [chunks_d[str(i)] for i in range(len(chunks_d))]
        except (KeyError, TypeError, ValueError):
            raise self.fail("a chunked array lacks its shape or chunks") from None
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise self.fail(f"a chunked array's shape {shape!r:.80} is not a list of sizes")
        if not chunks or not all(isinstance(c, Ref) and len(c.shape) == 1 for c in chunks):
            raise self.fail("a chunked array's chunks are not 1-d arrays")
        dtype = chunks[0].dtype
        if any(c.dtype != dtype for c in chunks):
            raise self.fail("a chunked array's chunks differ in dtype")
        ref = Ref(tuple(c.source for c in chunks), shape, dtype)
        if sum(c.nbytes for c in chunks) != ref.nbytes:
            raise self.fail(f"a chunked array's chunks do not fill its shape {shape}")
        return ref

    def ext(self, code: int, n: int) -> Any:
        start = self.take(n)
        if code in (_EXT_NDARRAY, _EXT_NPSCALAR):
            shape, dtype, span = self.ndarray(start, n)
            # Reading the header mapped its pages, and the page cache may hold
            # the file in folios of up to 2 MiB, all mapped at once: drop them,
            # or a header-only pass over a big file keeps ~2 MiB per array.
            _dontneed(self.buf, max(0, start - _FOLIO), start + n)
            if code == _EXT_NDARRAY:
                return Ref(span, shape, dtype)
            off, size = span
            arr = np.frombuffer(bytes(self.buf[off : off + size]), dtype=dtype)
            return arr.reshape(shape)[()]
        data = bytes(self.buf[start : start + n])
        if code == _EXT_COMPLEX:
            try:
                real, imag = msgpack.unpackb(data)
                return complex(real, imag)
            except (ValueError, TypeError, msgpack.UnpackException):
                self.pos = start
                raise self.fail("a complex number record is malformed") from None
        if code == _EXT_TIMESTAMP:
            # msgpack's unpacker decodes this one before flax's ext hook.
            try:
                return msgpack.Timestamp.from_bytes(data)
            except ValueError:
                self.pos = start
                raise self.fail("a timestamp record is malformed") from None
        if code < 0:
            # Negative codes are reserved by msgpack; -1 (timestamp) is the only
            # one defined, and flax's reader fails on the others.
            self.pos = start
            raise self.fail(f"an ext record has the reserved type code {code}")
        return msgpack.ExtType(code, data)

    def ndarray(self, start: int, n: int) -> tuple[tuple[int, ...], np.dtype, tuple[int, int]]:
        """Parses ``[shape, dtype_name, raw]`` inside an ext payload."""
        outer_end, self.pos, self.end = self.end, start, start + n
        kind, count, _ = self.header()
        if kind != "array" or count != 3:
            raise self.fail("an array record is not [shape, dtype, data]")
        kind, ndim, _ = self.header()
        if kind != "array":
            raise self.fail("an array record has no shape")
        shape = []
        for _ in range(ndim):
            kind, dim, _ = self.header()
            if kind != "int" or dim < 0:
                raise self.fail("an array record has a bad shape")
            shape.append(dim)
        kind, length, _ = self.header()
        if kind not in ("str", "bin"):
            raise self.fail("an array record has no dtype name")
        name_at = self.take(length)
        name = bytes(self.buf[name_at : name_at + length]).decode("ascii", "replace")
        try:
            dtype = _dtype_from_name(name)
        except KeyError:
            self.pos = name_at
            raise self.fail(
                f"unknown dtype {name[:40]!r} (flax writes only numeric dtypes: "
                "bool, int8..uint64, float16..complex128 and ml_dtypes' bfloat16, float8_* ...)"
            ) from None
        kind, size, _ = self.header()
        if kind not in ("bin", "str"):
            raise self.fail("an array record has no data")
        data_at = self.take(size)
        if self.pos != self.end:
            raise self.fail("an array record has trailing bytes")
        if math.prod(shape) * dtype.itemsize != size:
            self.pos = data_at
            raise self.fail(
                f"an array of shape {tuple(shape)} and dtype {name} has {size} bytes of data"
            )
        self.end = outer_end
        return tuple(shape), dtype, (data_at, size)

    def root(self) -> Any:
        try:
            tree = self.value(True)
        except RecursionError:
            raise self.fail("the structure is nested too deeply") from None
        if self.pos != len(self.buf):
            raise self.fail(f"{len(self.buf) - self.pos} bytes follow the end of the data")
        return tree


_FIXED = {
    0xC4: ("bin", ">B", 1),
    0xC5: ("bin", ">H", 2),
    0xC6: ("bin", ">I", 4),
    0xCA: ("float", ">f", 4),
    0xCB: ("float", ">d", 8),
    0xCC: ("int", ">B", 1),
    0xCD: ("int", ">H", 2),
    0xCE: ("int", ">I", 4),
    0xCF: ("int", ">Q", 8),
    0xD0: ("int", ">b", 1),
    0xD1: ("int", ">h", 2),
    0xD2: ("int", ">i", 4),
    0xD3: ("int", ">q", 8),
    0xD9: ("str", ">B", 1),
    0xDA: ("str", ">H", 2),
    0xDB: ("str", ">I", 4),
    0xDC: ("array", ">H", 2),
    0xDD: ("array", ">I", 4),
    0xDE: ("map", ">H", 2),
    0xDF: ("map", ">I", 4),
}
_EXT_LEN = {0xC7: (">B", 1), 0xC8: (">H", 2), 0xC9: (">I", 4)}


_dontneed = byteplan.dontneed


def _open_mmap(path: str, keep_fd: bool = False) -> mmap.mmap:
    # keep_fd: a source of `write`, whose byte ranges the kernel may copy.
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise FormatError(f"{path}: {_INCOMPLETE}: the file is empty. {_ADVICE}")
            return byteplan.map_file(f, keep_fd)
    except FormatError:
        raise
    except OSError as e:
        raise FormatError(
            f"cannot read '{path}': {e.strerror or e}. Check the path and its permissions."
        ) from e


_close = byteplan.close_map


def read_lazy(path: str | os.PathLike[str]) -> Any:
    """Reads the structure of a Flax msgpack checkpoint without its array data.

    The file is memory-mapped and only the msgpack headers are touched.

    Args:
      path: a file written by ``flax.serialization.msgpack_serialize`` or
        ``to_bytes`` (e.g. a ``checkpoint_<step>`` file).

    Returns:
      The tree as ``msgpack_restore`` would give it, in the file's key order,
      except that every array (ext 1, including flax's chunked arrays) is a
      `ckptconv.lazy.Ref` whose ``source`` is its byte span(s) in the file
      (see the module docstring). Maps are dicts, msgpack arrays are lists,
      numpy scalars are numpy scalars, other values are Python values.

    Raises:
      FormatError: the file cannot be read or is not complete, valid msgpack.
    """
    path = os.fspath(path)
    mm = _open_mmap(path)
    try:
        return _Parser(mm, path).root()
    finally:
        _close(mm)


def is_msgpack(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file holding one complete msgpack value.

    This parses the whole structure (headers only), so it is exact, and costs
    about as much as `read_lazy`.
    """
    if not os.path.isfile(path):
        return False
    try:
        read_lazy(path)
    except FormatError:
        return False
    return True


def spans(ref: Ref) -> tuple[tuple[int, int], ...]:
    """The byte spans ``((offset, nbytes), ...)`` holding ``ref``'s data, in order.

    Raises:
      FormatError: ``ref`` does not come from a msgpack file.
    """
    src = ref.source
    try:
        if len(src) == 2 and all(isinstance(v, int) for v in src):
            return (src,)
        if all(len(s) == 2 and all(isinstance(v, int) for v in s) for s in src):
            return tuple(src)
    except TypeError:
        pass
    raise FormatError(
        f"array source {src!r} is not a byte span of a msgpack file; read the "
        "tree with ckptconv.formats.msgpack_stream.read_lazy."
    )


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


# --------------------------------------------------------------------------- writing


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x80 | n,))
    if n < 1 << 16:
        return struct.pack(">BH", 0xDE, n)
    return struct.pack(">BI", 0xDF, n)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return struct.pack(">BH", 0xDC, n)
    return struct.pack(">BI", 0xDD, n)


def _bin_header(n: int) -> bytes:
    if n < 1 << 8:
        return struct.pack(">BB", 0xC4, n)
    if n < 1 << 16:
        return struct.pack(">BH", 0xC5, n)
    return struct.pack(">BI", 0xC6, n)


_FIXEXT = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}


def _ext_header(code: int, n: int) -> bytes:
    # The same choice msgpack's packer makes: fixext for lengths 1..16 that
    # are powers of two, else the smallest ext8/16/32.
    if n in _FIXEXT:
        return struct.pack(">Bb", _FIXEXT[n], code)
    if n < 1 << 8:
        return struct.pack(">BBb", 0xC7, n, code)
    if n < 1 << 16:
        return struct.pack(">BHb", 0xC8, n, code)
    return struct.pack(">BIb", 0xC9, n, code)


def _ext_pack(x: Any) -> Any:
    """Flax's ``_msgpack_ext_pack`` for the values that reach it here."""
    if isinstance(x, np.generic):
        a = np.asarray(x)
        data = msgpack.packb((a.shape, a.dtype.name, a.tobytes("C")), use_bin_type=True)
        return msgpack.ExtType(_EXT_NPSCALAR, data)
    if isinstance(x, complex):
        return msgpack.ExtType(_EXT_COMPLEX, msgpack.packb((x.real, x.imag)))
    return x


def _pack(x: Any) -> bytes:
    # strict_types as flax: a bool is not an int, an np.float64 not a float.
    return msgpack.packb(x, default=_ext_pack, strict_types=True)


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

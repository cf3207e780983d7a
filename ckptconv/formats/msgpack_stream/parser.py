"""The msgpack structure of a Flax checkpoint, parsed over a memory map
(`_Parser`; `read_lazy`, `is_msgpack`): only the headers are read, and every
array becomes a `ckptconv.lazy.Ref` whose source is its byte span(s).

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
import struct
from typing import Any

import msgpack
import numpy as np

from ckptconv.errors import FormatError
from ckptconv.formats import byteplan
from ckptconv.formats.msgpack_stream.dtypes import _dtype_from_name
from ckptconv.lazy import Ref

_EXT_NDARRAY = 1
_EXT_COMPLEX = 2
_EXT_NPSCALAR = 3
_EXT_TIMESTAMP = -1
_CHUNKED = "__msgpack_chunked_array__"

# The page cache's largest folio (see `byteplan`): the pages dropped around
# each array header that the parser reads.
_FOLIO = byteplan.FOLIO

_INCOMPLETE = "not a complete msgpack checkpoint"
_ADVICE = (
    "The file may be truncated (an interrupted copy or save) or not a Flax msgpack "
    "checkpoint; copy or save it again."
)


def _keypath(path: list[Any]) -> str:
    return "/".join(str(k) for k in path) or "<root>"


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

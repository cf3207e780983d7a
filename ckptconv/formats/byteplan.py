"""The bytes of output arrays, gathered straight from memory maps of the inputs.

A streaming writer (msgpack, safetensors) turns each output leaf into its C-order
bytes without materialising it: a `Ref` is a copy of bytes in an input file, a
`Stack` interleaves rows of its parts, a `Slice` strides over its source. This
module plans such a leaf into a `Gather` (rows of `Strand` segments) and hands
its bytes out as zero-copy views of the input mappings where they are long and
contiguous, and as numpy-gathered blocks of at most ``block`` bytes otherwise.

Where the bytes of a `Ref` live is the format's business: a `Planner` asks its
``resolve(ref, path)`` for ``(buffer, spans)``, the mapped file (or None, when
only counting) and the ``((offset, nbytes), ...)`` spans whose concatenation is
the array. One output may so take bytes from many input files (the shards of a
Hugging Face directory).

`FileMaps` is the resolver's usual helper: files mapped on first use, by name,
all closed at the end.

Where an output segment is a byte range of an input file mapped with
`map_file` (``keep_fd=True``), `Out` does not read it at all: it asks the kernel
to copy the range from file to file (``copy_file_range``, else ``sendfile``),
so the bytes never pass through this process and the filesystem may share
extents instead of copying (btrfs, XFS). That is every copy of a leaf, every
stack and slice on axis 0 and every row of at least `SEG_MIN` bytes; short rows
are gathered as before. `KERNEL_COPY` turns it off.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import math
import mmap
import os
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ckptconv.errors import FormatError
from ckptconv.lazy import Cast, Deferred, Ref, Slice, Stack

Spans = tuple[tuple[int, int], ...]
Resolver = Callable[[Ref, list[Any]], tuple[Any, Spans]]

#: Data is cut into pieces of at most this many bytes: the size of one gathered
#: block (bounds memory) and of one write (paces progress).
BLOCK = 32 << 20
#: Output segments at least this long are written straight from the input
#: mapping; shorter ones (a layer axis deep inside small rows) are gathered into
#: blocks with numpy first, since one write per tiny segment would be slow.
SEG_MIN = 64 << 10
#: The largest page-cache folio the kernel may map at once (x86-64 PMD size).
FOLIO = 2 << 20
# Writes shorter than this are collected and written together.
_SMALL = 64 << 10
_FLUSH = 1 << 20

#: Copy input byte ranges file to file in the kernel where the layout allows
#: (see the module docstring). Read when an `Out` is made; the environment
#: variable ``CKPTCONV_KERNEL_COPY=0`` sets it False, forcing the Python
#: write of mapped bytes (same output, byte for byte).
KERNEL_COPY = os.environ.get("CKPTCONV_KERNEL_COPY", "1").strip().lower() not in ("0", "false", "no", "off")
# What the kernel answers when it cannot copy between these two files (another
# filesystem, a file type or kernel without the call): fall back, not fail.
_REFUSED = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}
_LINUX = sys.platform.startswith("linux")

_MADV = getattr(mmap, "MADV_DONTNEED", None)


def dontneed(buf: Any, start: int, stop: int) -> None:
    """Unmaps bytes ``[start, stop)`` of a file mapping from this process.

    The data stays in the page cache and is mapped again if touched; this only
    keeps the process's resident size from growing with what it has read.
    """
    if isinstance(buf, mmap.mmap) and _MADV is not None:
        start -= start % mmap.PAGESIZE
        stop = min(stop, len(buf))
        if stop > start:
            buf.madvise(_MADV, start, stop - start)


class FileMap(mmap.mmap):
    """A read-only map of a file that also keeps the file open (``fd``), so its
    bytes can be copied file to file by the kernel (`Out`)."""

    fd: int


def map_file(f: Any, keep_fd: bool = False) -> mmap.mmap:
    """A read-only mapping of the whole open file ``f``.

    With ``keep_fd`` it is a `FileMap` holding its own descriptor of the file
    (an mmap keeps one too, but does not show it), closed by `close_map` or
    when the mapping is freed. Only writers' sources need it.
    """
    if not keep_fd:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    mm = FileMap(f.fileno(), 0, access=mmap.ACCESS_READ)
    mm.fd = os.dup(f.fileno())
    mm._close_fd = weakref.finalize(mm, os.close, mm.fd)
    return mm


def close_map(mm: mmap.mmap) -> None:
    """Close a mapping unless views handed out still use it (it then closes
    itself when the last one goes); a `FileMap`'s descriptor is closed now."""
    try:
        mm.close()
    except BufferError:
        pass
    close_fd = getattr(mm, "_close_fd", None)
    if close_fd is not None:
        close_fd()


class FileMaps:
    """Read-only memory maps of input files, opened on first use and kept.

    Args:
      opener: ``opener(name) -> mmap.mmap``; raises the format's own error for
        a file that is missing or unreadable.
    """

    def __init__(self, opener: Callable[[str], mmap.mmap]) -> None:
        self.opener = opener
        self.maps: dict[str, mmap.mmap] = {}

    def get(self, name: str) -> mmap.mmap:
        mm = self.maps.get(name)
        if mm is None:
            mm = self.maps[name] = self.opener(name)
        return mm

    def close(self) -> None:
        for mm in self.maps.values():
            close_map(mm)
        self.maps.clear()

    def __enter__(self) -> FileMaps:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Strand:
    """One input's share of an output array.

    The input is the concatenation of ``spans`` of ``buf``; output row ``p``
    takes ``seg`` bytes from input offset ``offset + p * stride``.
    """

    def __init__(
        self, buf: Any, sp: Spans, stride: int, offset: int, block: int = BLOCK
    ) -> None:
        self.buf = buf
        self.spans = sp
        self.starts = []
        total = 0
        for _, n in sp:
            self.starts.append(total)
            total += n
        self.stride = stride
        self.offset = offset
        self.block = block
        self.view = memoryview(buf).cast("B") if buf is not None else None

    def pieces(self, a: int, n: int) -> Iterator[memoryview]:
        """Zero-copy views of input bytes ``[a, a + n)``."""
        while n > 0:
            i = bisect.bisect_right(self.starts, a) - 1
            off, size = self.spans[i]
            within = a - self.starts[i]
            k = min(n, size - within, self.block)
            start = off + within
            yield self.view[start : start + k]
            self.release(start, start + k)
            a += k
            n -= k

    def ranges(self, a: int, n: int) -> Iterator[tuple[int, int]]:
        """``(file offset, nbytes)`` of input bytes ``[a, a + n)``, in order."""
        while n > 0:
            i = bisect.bisect_right(self.starts, a) - 1
            off, size = self.spans[i]
            within = a - self.starts[i]
            k = min(n, size - within)
            yield off + within, k
            a += k
            n -= k

    def gather(self, a: int, b: int) -> np.ndarray:
        """Input bytes ``[a, b)`` as a uint8 array (a view when in one span)."""
        parts = [np.frombuffer(p, dtype=np.uint8) for p in self._spans_of(a, b)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _spans_of(self, a: int, b: int) -> Iterator[memoryview]:
        while a < b:
            i = bisect.bisect_right(self.starts, a) - 1
            off, size = self.spans[i]
            within = a - self.starts[i]
            k = min(b - a, size - within)
            yield self.view[off + within : off + within + k]
            a += k

    def release_range(self, a: int, b: int) -> None:
        """`release` for input bytes ``[a, b)``."""
        while a < b:
            i = bisect.bisect_right(self.starts, a) - 1
            off, size = self.spans[i]
            within = a - self.starts[i]
            k = min(b - a, size - within)
            self.release(off + within, off + within + k)
            a += k

    def release(self, start: int, stop: int) -> None:
        """Unmaps mapped bytes ``[start, stop)`` and one folio either side.

        Pages of the input mapping already written out are dropped from this
        process (they stay in the page cache), so resident memory stays near
        one block instead of growing to the size of the input file. The page
        cache may map up to a whole folio around what was touched, and over
        many strands (layers) such leftovers would add up; the next piece
        maps its folio again, cheaply.
        """
        dontneed(self.buf, max(0, start - FOLIO), stop + FOLIO)


class Gather:
    """The C-order bytes of one output array, as ``rows`` rows of strand segments.

    Row ``p`` of the output is ``seg`` bytes of each strand in turn. A copy is
    one row and one strand; a stack on axis ``k`` has one strand per part and
    ``prod(shape[:k])`` rows; a slice on axis ``k`` has one strand striding over
    the source.
    """

    def __init__(
        self,
        rows: int,
        seg: int,
        strands: list[Strand],
        block: int = BLOCK,
        seg_min: int = SEG_MIN,
    ) -> None:
        self.rows = rows
        self.seg = seg
        self.strands = strands
        self.block = block
        self.seg_min = seg_min
        self.nbytes = rows * seg * len(strands)

    def file_ranges(self) -> bool:
        """Whether `ranges` applies: every segment is long (or the one row) and
        every strand is a file mapped with its descriptor kept."""
        return (self.seg >= self.seg_min or self.rows == 1) and all(
            isinstance(getattr(st.buf, "fd", None), int) for st in self.strands
        )

    def ranges(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[Strand, int, int]]:
        """Output bytes ``[start, stop)`` as ``(strand, file offset, nbytes)``
        ranges of the inputs, in order; only where `file_ranges` holds."""
        stop = self.nbytes if stop is None else stop
        seg = self.seg
        rowbytes = seg * len(self.strands)
        off = start
        while off < stop:
            p, r = divmod(off, rowbytes)
            j, s = divmod(r, seg)
            n = min(seg - s, stop - off)
            strand = self.strands[j]
            for at, k in strand.ranges(strand.offset + p * strand.stride + s, n):
                yield strand, at, k
            off += n

    def pieces(self, start: int = 0, stop: int | None = None) -> Iterator[Any]:
        """Output bytes ``[start, stop)`` as a sequence of buffers."""
        stop = self.nbytes if stop is None else stop
        if start >= stop:  # nothing, e.g. a zero-size array (rowbytes may be 0)
            return
        seg = self.seg
        rowbytes = seg * len(self.strands)
        off = start
        if seg >= self.seg_min or self.rows == 1:
            while off < stop:
                p, r = divmod(off, rowbytes)
                j, s = divmod(r, seg)
                n = min(seg - s, stop - off)
                strand = self.strands[j]
                yield from strand.pieces(strand.offset + p * strand.stride + s, n)
                off += n
            return
        per_row = rowbytes + sum(st.stride for st in self.strands)
        block_rows = max(1, self.block // per_row)
        while off < stop:
            p0 = off // rowbytes
            p1 = min(self.rows, p0 + block_rows, -(-stop // rowbytes))
            block = self._rows(p0, p1)
            lo = off - p0 * rowbytes
            hi = min(stop - p0 * rowbytes, block.size)
            yield memoryview(block[lo:hi])
            off = p0 * rowbytes + hi

    def _rows(self, p0: int, p1: int) -> np.ndarray:
        block = np.empty((p1 - p0, len(self.strands), self.seg), np.uint8)
        for j, st in enumerate(self.strands):
            a = st.offset + p0 * st.stride
            b = a + (p1 - p0 - 1) * st.stride + self.seg
            raw = st.gather(a, b)
            block[:, j, :] = np.lib.stride_tricks.as_strided(
                raw, shape=(p1 - p0, self.seg), strides=(st.stride, 1), writeable=False
            )
            del raw
            # Each input as soon as it is copied: one strand mapped at a time.
            st.release_range(a, b)
        return block.reshape(-1)


class CastGather:
    """The bytes of ``gather`` (an array of ``src`` dtype) cast to ``dst``, one
    block of at most ``block`` input bytes at a time: a cast leaf is never
    whole in memory (`ckptconv.lazy.Cast`)."""

    def __init__(self, gather: Gather, src: np.dtype, dst: np.dtype, block: int = BLOCK) -> None:
        self.inner = gather
        self.src = np.dtype(src)
        self.dst = np.dtype(dst)
        self.block = max(self.src.itemsize, block - block % self.src.itemsize)
        self.nbytes = gather.nbytes // self.src.itemsize * self.dst.itemsize

    def pieces(self, start: int = 0, stop: int | None = None) -> Iterator[Any]:
        """Output bytes ``[start, stop)``; both must fall on element boundaries."""
        stop = self.nbytes if stop is None else stop
        out_size, in_size = self.dst.itemsize, self.src.itemsize
        if start % out_size or stop % out_size:
            raise ValueError(f"cast bytes [{start}, {stop}) do not fall on {self.dst} elements")
        a, b = start // out_size * in_size, stop // out_size * in_size
        pending = bytearray()
        for piece in self.inner.pieces(a, b):
            view = memoryview(piece).cast("B")
            while len(view):
                take = min(len(view), self.block - len(pending))
                if not pending and take == self.block:
                    yield self._cast(view[:take])
                else:
                    pending += view[:take]
                    if len(pending) == self.block:
                        yield self._cast(pending)
                        pending = bytearray()
                view = view[take:]
        if pending:
            yield self._cast(pending)

    def _cast(self, raw: Any) -> memoryview:
        values = np.frombuffer(raw, dtype=self.src)
        return memoryview(values.astype(self.dst).reshape(-1).view(np.uint8))


@contextlib.contextmanager
def output_file(path: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Iterator[Any]:
    """Open the new file ``path`` for writing; on success rename it to ``dst``.

    On any failure or interrupt ``path`` is removed, and an ``OSError`` (a full
    or read-only disk) becomes one `FormatError` naming ``dst``. ``path`` may be
    ``dst`` itself when the caller renames into place on its own.
    """
    try:
        with open(path, "xb") as f:
            yield f
        if os.fspath(path) != os.fspath(dst):
            os.replace(path, dst)
    except BaseException as e:
        try:
            os.unlink(path)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, FormatError):
            raise FormatError(
                f"cannot write '{dst}': {e.strerror or e}. Check that its folder exists, "
                "is writable and has free space."
            ) from e
        raise


class Out:
    """An output file: small writes are batched; reports progress.

    Payloads that are byte ranges of input files (`Gather.file_ranges`) are
    copied by the kernel where it can (`KERNEL_COPY`); ``kernel_bytes`` and
    ``python_bytes`` count the payload bytes that went each way, and
    ``kernel`` names the call in use (None once the kernel refused both).
    """

    def __init__(self, f: Any, progress: Callable[[int], Any] | None, block: int = BLOCK) -> None:
        self.f = f
        self.progress = progress
        self.buf = bytearray()
        self.block = block
        self.kernel: str | None = None
        if KERNEL_COPY and _LINUX:
            self.kernel = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile"
        self.kernel_bytes = 0
        self.python_bytes = 0

    def put(self, data: Any) -> None:
        n = len(data)
        if n < _SMALL:
            self.buf += data
            if len(self.buf) >= _FLUSH:
                self.flush()
            return
        self.flush()
        self.f.write(data)
        if self.progress is not None:
            self.progress(n)

    def payload(self, gather: Gather | CastGather, start: int, stop: int) -> None:
        if self.kernel is not None and isinstance(gather, Gather) and gather.file_ranges():
            start = self._copy(gather, start, stop)
        self.python_bytes += max(0, stop - start)
        for piece in gather.pieces(start, stop):
            self.put(piece)

    def _copy(self, gather: Gather, start: int, stop: int) -> int:
        """Copies output bytes ``[start, stop)`` file to file in the kernel;
        returns how far it got (``stop``, or where the kernel refused)."""
        self.flush()
        self.f.flush()
        out_fd = self.f.fileno()
        pos = self.f.tell()
        done = start
        try:
            for strand, at, n in gather.ranges(start, stop):
                while n > 0:
                    k = self._copy_range(strand, at, out_fd, pos, min(n, self.block))
                    if k is None:  # refused: the rest goes through Python
                        return done
                    at, pos, n, done = at + k, pos + k, n - k, done + k
                    self.kernel_bytes += k
                    if self.progress is not None:
                        self.progress(k)
            return done
        finally:
            self.f.seek(pos)

    def _copy_range(self, strand: Strand, at: int, out_fd: int, pos: int, n: int) -> int | None:
        in_fd = strand.buf.fd
        while self.kernel is not None:
            try:
                if self.kernel == "copy_file_range":
                    k = os.copy_file_range(in_fd, out_fd, n, at, pos)
                else:
                    os.lseek(out_fd, pos, os.SEEK_SET)
                    k = os.sendfile(out_fd, in_fd, at, n)
            except OSError as e:
                if e.errno not in _REFUSED:
                    raise
                self.kernel = "sendfile" if self.kernel == "copy_file_range" else None
                continue
            if k <= 0:
                # The mapped size promised these bytes: the input shrank.
                raise FormatError(
                    f"an input file ended at byte {at} while its data was being copied: "
                    "it changed during the conversion; convert it again."
                )
            return k
        return None

    def flush(self) -> None:
        if self.buf:
            self.f.write(self.buf)
            if self.progress is not None:
                self.progress(len(self.buf))
            self.buf = bytearray()


class Count:
    """A sink that only counts bytes (for sizing an output without writing it)."""

    def __init__(self) -> None:
        self.n = 0

    def put(self, data: Any) -> None:
        self.n += len(data)

    def payload(self, gather: Gather, start: int, stop: int) -> None:
        self.n += stop - start


def _jax_array_type() -> type | None:
    # No jax.Array can exist before JAX is imported, and importing it here
    # would cost file-to-file conversions a second or more.
    return getattr(sys.modules.get("jax"), "Array", None)


class Planner:
    """Plans output leaves into `Gather`s.

    Args:
      resolve: ``resolve(ref, path) -> (buffer, spans)`` for a `Ref` of the
        input; ``buffer`` may be None when the plan is only sized (`Count`).
      fail: ``fail(path, what) -> Exception``, the format's error for a leaf.
      writer: the name used in "which <writer> cannot serialize" messages.
      block, seg_min: see `BLOCK` and `SEG_MIN`.
    """

    def __init__(
        self,
        resolve: Resolver,
        fail: Callable[[list[Any], str], Exception],
        writer: str,
        block: int = BLOCK,
        seg_min: int = SEG_MIN,
    ) -> None:
        self.resolve = resolve
        self.fail = fail
        self.writer = writer
        self.block = block
        self.seg_min = seg_min
        self.jax_array = _jax_array_type()

    def is_array(self, x: Any) -> bool:
        """Whether ``x`` is a leaf `plan` takes (lazy, Deferred, numpy or jax)."""
        return isinstance(x, (Ref, Stack, Slice, Cast, Deferred, np.ndarray)) or (
            self.jax_array is not None and isinstance(x, self.jax_array)
        )

    def gather(self, rows: int, seg: int, strands: list[Strand]) -> Gather:
        return Gather(rows, seg, strands, self.block, self.seg_min)

    def strand(self, ref: Ref, stride: int, offset: int, path: list[Any]) -> Strand:
        buf, sp = self.resolve(ref, path)
        return Strand(buf, sp, stride, offset, self.block)

    def plan(self, x: Any, path: list[Any]) -> tuple[tuple[int, ...], np.dtype, Gather]:
        """Shape, dtype and byte layout of one output array.

        A `Deferred` is read here (one leaf of another format, freed once its
        bytes are written); everything else is planned without reading data.
        """
        if isinstance(x, Cast):
            shape, dtype, gather = self.plan(x.value, path)
            return shape, np.dtype(x.dtype), CastGather(gather, dtype, x.dtype, self.block)
        if isinstance(x, Ref):
            dtype = np.dtype(x.dtype)
            shape = tuple(int(d) for d in x.shape)
            return shape, dtype, self.gather(1, x.nbytes, [self.strand(x, 0, 0, path)])
        if isinstance(x, Stack):
            return self.plan_stack(x, path)
        if isinstance(x, Slice):
            return self.plan_slice(x, path)
        if isinstance(x, Deferred):
            x = x.read()
        a = np.asarray(x)
        if not a.flags.c_contiguous:
            # Not np.ascontiguousarray: it turns a 0-d array into a 1-d one.
            a = a.copy(order="C")
        if a.dtype.hasobject or a.dtype.isalignedstruct:
            raise self.fail(path, f"has dtype {a.dtype}, which {self.writer} cannot serialize")
        flat = a.reshape(-1).view(np.uint8)
        return a.shape, a.dtype, self.gather(1, a.nbytes, [Strand(flat, ((0, a.nbytes),), 0, 0, self.block)])

    def plan_stack(self, x: Stack, path: list[Any]) -> tuple[tuple[int, ...], np.dtype, Gather]:
        parts = x.parts
        if not parts or not all(isinstance(p, Ref) for p in parts):
            raise self.fail(path, "is a Stack whose parts are not all Refs")
        first = parts[0]
        dtype = np.dtype(first.dtype)
        inner = tuple(int(d) for d in first.shape)
        for i, p in enumerate(parts):
            if tuple(p.shape) != inner or np.dtype(p.dtype) != dtype:
                raise self.fail(
                    path,
                    f"stacks layer {i} of shape {tuple(p.shape)} {np.dtype(p.dtype)} with "
                    f"layer 0 of shape {inner} {dtype}",
                )
        axis = x.axis + len(inner) + 1 if x.axis < 0 else x.axis
        if not 0 <= axis <= len(inner):
            raise self.fail(path, f"stacks on axis {x.axis}, out of range for {inner}")
        shape = inner[:axis] + (len(parts),) + inner[axis:]
        self.check(x, shape, dtype, path)
        seg = math.prod(inner[axis:]) * dtype.itemsize
        strands = [self.strand(p, seg, 0, path) for p in parts]
        return shape, dtype, self.gather(math.prod(inner[:axis]), seg, strands)

    def plan_slice(self, x: Slice, path: list[Any]) -> tuple[tuple[int, ...], np.dtype, Gather]:
        src = x.source
        if not isinstance(src, Ref):
            raise self.fail(path, "is a Slice of something other than a Ref")
        dtype = np.dtype(src.dtype)
        full = tuple(int(d) for d in src.shape)
        axis = x.axis + len(full) if x.axis < 0 else x.axis
        if not 0 <= axis < len(full):
            raise self.fail(path, f"slices axis {x.axis}, out of range for {full}")
        n = full[axis]
        index = x.index + n if x.index < 0 else x.index
        if not 0 <= index < n:
            raise self.fail(path, f"takes index {x.index} of axis {axis}, which has length {n}")
        shape = full[:axis] + full[axis + 1 :]
        self.check(x, shape, dtype, path)
        seg = math.prod(full[axis + 1 :]) * dtype.itemsize
        strand = self.strand(src, n * seg, index * seg, path)
        return shape, dtype, self.gather(math.prod(full[:axis]), seg, [strand])

    def check(self, x: Any, shape: tuple[int, ...], dtype: np.dtype, path: list[Any]) -> None:
        if tuple(x.shape) != shape or np.dtype(x.dtype) != dtype:
            raise self.fail(
                path,
                f"says {tuple(x.shape)} {np.dtype(x.dtype)} but its inputs give {shape} {dtype}",
            )


def check_spans(sp: Spans, size: int, name: str, where: str) -> None:
    """Raise `FormatError` unless every span lies within ``size`` bytes."""
    for off, n in sp:
        if off < 0 or n < 0 or off + n > size:
            raise FormatError(
                f"array {where} lies at bytes {off}..{off + n} but '{name}' has {size} "
                "bytes: the tree was read from another file, or the file changed since; "
                "read it again with read_lazy."
            )

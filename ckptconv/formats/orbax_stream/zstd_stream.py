"""Streaming zstd decode of one stored value, read by byte ranges.

A stacked array saved as one chunk (what a scanned training run writes, or
``np.stack`` + save) is one zstd frame (or a few) of the whole leaf. Decoding
it through TensorStore holds the compressed chunk and the decoded leaf at
once, and the written layers on top: 1.5-3x the largest leaf. The frame's
output is the leaf in C order, so on layer axis 0 layer 0's bytes come first:
`Stream` hands them out as they are decoded, into a buffer of one layer,
while `RangeSource` reads the compressed value a block at a time (the next
block is read while this one decodes). Memory stays near one layer plus two
compressed blocks, whatever the leaf's size.

Why not TensorStore's own reader: it decodes a chunk whole, never in parts.
The decoder here is zstandard's (python-zstandard, libzstd's streaming API),
and what is written by hand is only the plumbing around it: the byte-range
source, the exact-size reads and the end-of-stream checks that turn libzstd's
short reads into damage reports. tests/test_zstd_stream.py checks it against
TensorStore's reads of the same chunks, and tests/test_fuzz.py fuzzes it.

Runs in a worker thread (`Stream` blocks on the kvstore reads and on libzstd,
which releases the GIL): a decode job's event-loop side only awaits it.

What it handles: one or several concatenated frames (``read_across_frames``),
frames with or without a declared content size, skippable frames, content
checksums (libzstd verifies them: a mismatch is damage). What it reports as
`Damage`: bytes that are not zstd, a stream that ends early (fewer bytes than
the metadata implies), one that holds more, trailing bytes after the last
frame. libzstd's streaming API does not say whether the input ended inside a frame
once all of its data is out (a value cut inside the last frame's 4-byte
checksum decodes in full), so `Frames` walks the frame structure (RFC 8878:
frame headers, block headers, checksums, skippable frames) over the same
bytes as they pass, a few header bytes per 128 KiB block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["BLOCK", "Damage", "Frames", "RangeSource", "Stream", "value_size"]

#: Compressed bytes read per kvstore read (and handed to libzstd per call).
BLOCK = 4 << 20


class Damage(Exception):
    """The value cannot be what its metadata says: the message says why, as
    a phrase that follows ``chunk <key> of leaf <name>``."""


def value_size(read: Callable[[int, int], bytes], start: int, hint: int) -> int:
    """The size of a value whose bytes ``read(a, b)`` returns (raising
    ValueError for a range past its end), knowing that ``start`` bytes exist:
    a binary search of one-byte reads, from ``start`` up to ``hint``
    (doubled until a read fails). TensorStore's kvstore API has no call for
    a value's size; this takes about log2(size) tiny reads."""
    lo, hi = start, max(hint, start + 1)
    while _exists(read, hi):
        lo, hi = hi, hi * 2
    # Bytes [0, lo) exist, byte hi - 1 does not.
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _exists(read, mid):
            lo = mid
        else:
            hi = mid
    return lo


def _exists(read: Callable[[int, int], bytes], end: int) -> bool:
    """Whether byte ``end - 1`` exists (``end`` 0: trivially)."""
    if end <= 0:
        return True
    try:
        return len(read(end - 1, end)) == 1
    except ValueError:
        return False


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class Frames:
    """The frame structure of a zstd stream, fed its bytes in order (RFC 8878,
    3.1): says whether the bytes so far end exactly after a frame.

    Only sizes are read (headers, block headers); block contents are skipped.
    `feed` raises `Damage` at bytes that cannot start a frame or a block.
    """

    def __init__(self) -> None:
        self.frames = 0
        self.skip = 0  # bytes to pass over before the next field
        self.field = "magic"  # the field awaited next
        self.need = 4  # its size
        self.carry = b""  # its bytes so far
        self.checksum = False
        self.offset = 0  # bytes fed

    def complete(self) -> bool:
        """The bytes so far are whole frames (one at least)."""
        return self.frames > 0 and self.field == "magic" and not self.skip and not self.carry

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self.skip:
                k = min(self.skip, n - i)
                i += k
                self.skip -= k
                continue
            k = min(self.need - len(self.carry), n - i)
            self.carry += data[i : i + k]
            i += k
            if len(self.carry) < self.need:
                break
            value, self.carry = self.carry, b""
            self._field(value, self.offset + i - self.need)
        self.offset += n

    def _field(self, b: bytes, at: int) -> None:
        if self.field == "magic":
            if b == _ZSTD_MAGIC:
                self.field, self.need = "descriptor", 1
            elif b[0] & 0xF0 == 0x50 and b[1:] == b"\x2a\x4d\x18":
                self.field, self.need = "skippable", 4
            else:
                raise Damage(f"holds bytes that are not a zstd frame at offset {at}")
        elif self.field == "skippable":
            self.frames += 1
            self.skip = int.from_bytes(b, "little")
            self.field, self.need = "magic", 4
        elif self.field == "descriptor":
            d = b[0]
            if d & 0x08:
                raise Damage(f"has a zstd frame header with its reserved bit set at offset {at}")
            single = (d >> 5) & 1
            self.checksum = bool((d >> 2) & 1)
            rest = (0 if single else 1) + (0, 1, 2, 4)[d & 3] + (single, 2, 4, 8)[d >> 6]
            self.field, self.need = "block", 3
            self.skip = rest
        elif self.field == "block":
            h = int.from_bytes(b, "little")
            last, kind, size = h & 1, (h >> 1) & 3, h >> 3
            if kind == 3:
                raise Damage(f"has a zstd block of the reserved type at offset {at}")
            self.skip = 1 if kind == 1 else size  # RLE: one byte
            if last:
                self.frames += 1
                self.skip += 4 * self.checksum
                self.field, self.need = "magic", 4


class RangeSource:
    """A file-like ``read(n)`` over bytes [start, start + size) of a value,
    for zstandard's `stream_reader`: one block is read ahead.

    ``fetch(a, b)`` starts a read of bytes [a, b) and returns something with
    a blocking ``result()`` (a TensorStore future of a ``ReadResult``, or
    of bytes).
    """

    def __init__(
        self, fetch: Callable[[int, int], Any], start: int, size: int, block: int = BLOCK
    ) -> None:
        self.fetch = fetch
        self.pos = start
        self.end = start + size
        self.block = block
        self.ahead: tuple[int, int, Any] | None = None
        self.frames = Frames()

    def _start(self, a: int, n: int) -> tuple[int, int, Any]:
        return a, n, self.fetch(a, a + n)

    def read(self, n: int = -1) -> bytes:
        n = self.end - self.pos if n is None or n < 0 else min(n, self.end - self.pos)
        if n <= 0:
            return b""
        a, m, future = self.ahead if self.ahead is not None else self._start(self.pos, n)
        self.ahead = None
        if a != self.pos or m != n:
            future = self._start(self.pos, n)[2]
        try:
            got = _value(future.result())
        except Damage:
            raise
        except Exception as e:  # TensorStore's: a range past the value's end, an I/O error
            raise Damage(f"cannot be read at bytes {self.pos}..{self.pos + n}: {e}") from e
        if len(got) != n:
            raise Damage(f"is shorter than it should be (read {len(got)} of {n} bytes at {self.pos})")
        self.frames.feed(got)
        self.pos += n
        if self.pos < self.end:
            self.ahead = self._start(self.pos, min(self.block, self.end - self.pos))
        return got


def _value(res: Any) -> bytes:
    if isinstance(res, (bytes, bytearray, memoryview)):
        return bytes(res)
    if getattr(res, "state", "value") != "value":
        raise Damage("is missing part of its bytes")
    return res.value


class Stream:
    """Decoded bytes of a zstd stream (frames one after another), read in
    exact sizes.

    ``total``: the decoded size the metadata implies; `finish` checks that the
    stream holds exactly that and ends with its last frame.
    """

    def __init__(self, source: RangeSource, total: int, *, what: str = "its metadata") -> None:
        import zstandard  # here, not at import: ckptconv's start stays lean

        self._zstd = zstandard
        self.source = source
        self.total = total
        self.what = what
        self.done = 0
        self.reader = zstandard.ZstdDecompressor().stream_reader(
            source, read_size=source.block, read_across_frames=True
        )

    def readinto(self, buf: Any) -> None:
        """Fills ``buf`` (a writable buffer) with the next ``len(buf)`` bytes."""
        view = memoryview(buf).cast("B")
        n, want = 0, len(view)
        while n < want:
            got = self._call(self.reader.readinto, view[n:])
            if got == 0:
                self._short(self.done + n)
            n += got
        self.done += want

    def skip(self, nbytes: int, scratch: Any) -> None:
        """Decodes and drops ``nbytes`` bytes (through ``scratch``, a buffer)."""
        view = memoryview(scratch).cast("B")
        while nbytes > 0:
            k = min(nbytes, len(view))
            self.readinto(view[:k])
            nbytes -= k

    def finish(self) -> None:
        """Checks that nothing follows: no more decoded bytes, no bytes past
        the last frame."""
        extra = 0
        while True:
            got = self._call(self.reader.read, 1 << 20)
            if not got:
                break
            extra += len(got)
        if extra:
            raise Damage(
                f"holds {self.total + extra} bytes, but {self.what} says {self.total}: "
                "the metadata does not describe the data"
            )
        if self.source.pos != self.source.end:
            raise Damage("has bytes after its last zstd frame")
        if not self.source.frames.complete():
            raise Damage("ends inside a zstd frame: the chunk is truncated")

    def _short(self, got: int) -> None:
        if self.source.pos < self.source.end:
            raise Damage("stops decoding before its end")
        raise Damage(
            f"holds {got} bytes, but {self.what} says {self.total}: the zstd stream ends early "
            "(the chunk is truncated, or the metadata does not describe the data)"
        )

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except self._zstd.ZstdError as e:
            raise Damage(f"is not a valid zstd stream: {e}") from e

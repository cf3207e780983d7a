"""The bytes of msgpack records: map, array, bin and ext headers as msgpack's
packer writes them, and scalars packed as flax packs them (`_pack`, with
flax's ext hook `_ext_pack`)."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np

from ckptconv.formats.msgpack_stream.parser import _EXT_COMPLEX, _EXT_NPSCALAR


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

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

This package parses that structure itself over a memory map, so reading the
layout of a checkpoint of any size touches only the headers, and writes a new
checkpoint leaf by leaf, straight from views of the input.

One job a file:

* ``parser.py``: the structure parsed, arrays recorded as byte spans
  (`read_lazy`, `is_msgpack`; what a span is, `spans`);
* ``reader.py``: array data read from those spans (`read_array`, `load`);
* ``dtypes.py``: the dtype names a checkpoint may hold (`FLAX_DTYPES`,
  `DtypeTable`);
* ``encoder.py``: msgpack record headers and scalars, as msgpack and flax
  write them;
* ``writer.py``: `write`, `save`, `encoded_size`: the tree serialized as flax
  would (`_Emitter`), flax's chunk size, the block sizes (`_BLOCK`,
  `_SEG_MIN`).

Names with a leading underscore are private to this package (not to their
file); a setting is changed on the module that reads it (the tests shrink
``writer._BLOCK``).
"""

from __future__ import annotations

from ckptconv.formats.msgpack_stream.dtypes import FLAX_DTYPES, DtypeTable
from ckptconv.formats.msgpack_stream.parser import is_msgpack, read_lazy, spans
from ckptconv.formats.msgpack_stream.reader import load, read_array
from ckptconv.formats.msgpack_stream.writer import encoded_size, save, write

__all__ = [
    "FLAX_DTYPES",
    "DtypeTable",
    "encoded_size",
    "is_msgpack",
    "load",
    "read_array",
    "read_lazy",
    "save",
    "spans",
    "write",
]

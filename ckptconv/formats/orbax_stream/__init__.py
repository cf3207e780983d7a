"""Streaming reader and writer for one Orbax PyTree checkpoint item directory.

An item directory is what ``ocp.StandardCheckpointer().save(path, tree)`` or
``ocp.PyTreeCheckpointer().save(path, tree)`` writes: ``_METADATA`` (the tree),
an OCDBT key-value store (``manifest.ocdbt``, ``d/``, ``ocdbt.process_*/``) that
holds every array as a zarr array, and for ``jax.Array`` leaves ``_sharding``
and ``array_metadatas/``. The zarr arrays are one of:

* zarr v2 (Orbax's default): ``<name>/.zarray`` plus one key per chunk, e.g.
  ``params.layer_0.attn.q.kernel/0.0``, each chunk compressed with zstd;
* zarr v3 (``use_zarr3=True`` in ``_METADATA``; Orbax's ``use_zarr3`` option,
  MaxText's checkpoints): ``<name>/zarr.json`` plus one key per chunk in its
  ``chunk_key_encoding`` (``default``: ``<name>/c/0/0``, ``c`` alone for 0-d;
  ``v2``: ``<name>/0.0``). Orbax (0.11.26 to 0.12.8, and MaxText 0.2.5 through
  orbax 0.12.4) writes one codec, ``sharding_indexed``, whose inner chunk is
  the whole outer chunk: each chunk key holds a shard file of one zstd frame
  (inner codecs ``bytes`` little-endian + ``zstd`` level 3) followed by its
  index (offset and size, uint64 little-endian, then a crc32c).

`read_lazy` describes such a directory without reading array data, `read_array`
reads one array, and `write` builds a new item directory from a tree of lazy
leaves (`ckptconv.lazy.Ref`, `Stack`, `Slice`) that refer to arrays of a source
item directory. The output keeps the source's zarr version: a zarr3 source
gives a zarr3 output (``use_zarr3`` true, ``zarr.json`` metadata), whether its
leaves are moved as chunks or decoded.

One job a file:

* ``reader.py``: `read_lazy`, `read_lazy_with_orbax`, `read_array`;
* ``writer.py``: `write` (a temporary directory, renamed once complete);
* ``source.py``: the input item directory opened (`_Source`), `BYTE_RANGES`;
* ``files.py``: file names (``_METADATA``, ``_sharding``, the commit marker,
  `TMP_DIR_SUFFIX`, ...) and the helpers that read, write and fsync files;
* ``metadata_read.py``: ``_METADATA`` entries and zarr metadata, checked
  (dtypes, shapes, chunks, chunk keys);
* ``metadata_write.py``: zarr metadata for output arrays, shardings;
* ``leaves.py``: the output tree flattened into leaves (`_Leaf`);
* ``plan.py``: what to write for an output tree (`_Plan`): the leaves sorted
  into chunk moves and decode jobs, the clone or copy engine, Orbax's
  metadata files; what bounds memory;
* ``chunk_ops.py``: chunk moves (`Ref`, `Stack`, `Slice` without decoding);
* ``decode.py``: the decode path (`_DecodeJob`; the stream decode of a stack
  saved as one zstd chunk, `_StreamPlan`; the decode budget);
* ``destination.py``: the output OCDBT store (`_Destination`): chunk copies,
  decode jobs written, commits;
* ``damage.py``: damage checks of a source chunk, without decoding it;
* ``clone.py``: the clone engine: IN's database cloned, keys renamed;
* ``zstd_stream.py``: streaming zstd decode of one value read by byte ranges;
* ``runner.py``: running the async code (asyncio, SIGTERM).

Names with a leading underscore are private to this package (not to their
file). The settings re-exported here (`ZSTD_STREAM`, `BYTE_RANGES`) are
copies, for reading: to change one (as tests do), set it on the module that
looks it up (e.g. ``decode.ZSTD_STREAM``).
"""

from __future__ import annotations

from ckptconv.formats.orbax_stream.decode import ZSTD_STREAM
from ckptconv.formats.orbax_stream.files import (
    ARRAY_METADATAS_DIR,
    CHECKPOINT_METADATA_FILE,
    COMMIT_SUCCESS_FILE,
    METADATA_FILE,
    OCDBT_MANIFEST,
    SHARDING_FILE,
    STRINGS_FILE,
    TMP_DIR_SUFFIX,
    ZARR2_FILE,
    ZARR3_FILE,
)
from ckptconv.formats.orbax_stream.reader import read_array, read_lazy, read_lazy_with_orbax
from ckptconv.formats.orbax_stream.source import BYTE_RANGES
from ckptconv.formats.orbax_stream.writer import write

__all__ = [
    "ARRAY_METADATAS_DIR",
    "BYTE_RANGES",
    "CHECKPOINT_METADATA_FILE",
    "COMMIT_SUCCESS_FILE",
    "METADATA_FILE",
    "OCDBT_MANIFEST",
    "SHARDING_FILE",
    "STRINGS_FILE",
    "TMP_DIR_SUFFIX",
    "ZARR2_FILE",
    "ZARR3_FILE",
    "ZSTD_STREAM",
    "read_array",
    "read_lazy",
    "read_lazy_with_orbax",
    "write",
]

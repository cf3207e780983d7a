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
gives a zarr3 output (``use_zarr3`` true, ``zarr.json`` metadata), on every
path below.

`write` moves compressed chunk bytes whenever the layout allows it, through
TensorStore's kvstore API, without decoding anything:

* a `Ref` is always copied chunk for chunk, ``.zarray`` / ``zarr.json``
  included (any codecs);
* a `Stack` of parts that share one zarr layout (same chunks, dtype,
  compressor or codecs, ...) becomes an array whose chunks are one layer
  thick: chunk ``(i.., l, j..)`` of the stack *is* chunk ``(i.., j..)`` of
  part ``l``, byte for byte, because a length-1 axis does not change a
  chunk's memory layout. In zarr3 the same holds for a shard file: the inner
  chunk shape gets the same length-1 axis, so the inner chunk grid, the
  index (offsets and sizes in C order of that grid) and its checksum stay
  what they were;
* a `Slice` at ``index`` of a source whose chunks are one layer thick on the
  slice axis is the inverse: chunk ``(i.., j..)`` of the slice is chunk
  ``(i.., index, j..)`` of the source.

A zarr3 chunk move needs a codec chain that does not depend on the chunk's
shape: ``bytes``, ``sharding_indexed`` (whose inner codecs qualify too),
``zstd``, ``gzip``, ``blosc``, ``crc32c``. An array-to-array codec
(``transpose``: its ``order`` names axes) or a storage transformer sends that
Stack or Slice to the decode path; Orbax writes neither.

Everything else (a stacked source saved as one chunk and sliced, parts with
differing layouts, a `Cast` (``--dtype``), plain values in the tree) is
decoded with TensorStore one source leaf (or one layer-thick slab of it) at a
time and encoded again. Stacks written that way get layer-thick chunks too, so
that unstacking ckptconv's own output is always a chunk copy. For a zarr3
source, arrays written this way are zarr3 with the source array's codecs
(its chunk key encoding, codec chain and their settings; a cast leaf in the
cast dtype), every shard holding one inner chunk as Orbax writes them;
in-memory values get Orbax's own zarr3 codecs.

Damage is looked for without decoding: a missing chunk where the source says
it stores every chunk (``store_array_data_equal_to_fill_value``), a zstd frame
whose declared size differs from the chunk size the metadata implies, and in
zarr3 a shard file too short for its index, whose index checksum (crc32c)
does not match, or whose index points outside the file (a truncated copy).
Other codec chains (``gzip``, ``blosc``, a compressed shard file) are copied
unchecked: their sizes cannot be read without decoding.

A stacked source saved as one zstd chunk and unstacked (to-loop of what a
scanned training run writes) is not decoded through TensorStore: its chunk's
compressed bytes are read by byte ranges from the kvstore and stream-decoded
(`zstd_stream`, see `_StreamPlan`), each layer written as soon as its bytes
are out; two such leaves decode at once, in worker threads.
``CKPTCONV_ZSTD_STREAM=0`` (`ZSTD_STREAM`) forces TensorStore's decode.

Memory is bounded by `_BATCH_BYTES` of chunk data per transaction (two
transactions are in flight: one reading, one committing) plus, on the decode
path, one source leaf (TensorStore holds a chunk compressed and decoded while
it reads it, so a leaf saved as one chunk costs about 3x its size at peak);
a streamed leaf holds one layer on axis 0 (at most `_SCATTER_BYTES` of
layers on other axes) and two 4 MiB compressed blocks.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from ckptconv.errors import FormatError, OutputExistsError, Terminated
from ckptconv.formats import orbax_clone, zstd_stream
from ckptconv.formats.msgpack_stream import FLAX_DTYPES
from ckptconv.lazy import LAZY, Cast, Deferred, Ref, Slice, Stack

__all__ = ["read_array", "read_lazy", "write"]

METADATA_FILE = "_METADATA"
SHARDING_FILE = "_sharding"
STRINGS_FILE = "_strings.json"
ARRAY_METADATAS_DIR = "array_metadatas"
CHECKPOINT_METADATA_FILE = "_CHECKPOINT_METADATA"
COMMIT_SUCCESS_FILE = "commit_success.txt"
OCDBT_MANIFEST = "manifest.ocdbt"
# Each array's metadata key: zarr v2 and v3.
ZARR2_FILE = ".zarray"
ZARR3_FILE = "zarr.json"
# Orbax treats a directory whose name contains this as an unfinished save
# (`orbax.checkpoint._src.path.atomicity_types.TMP_DIR_SUFFIX`).
TMP_DIR_SUFFIX = ".orbax-checkpoint-tmp"

# Orbax's pytree key types (`orbax.checkpoint._src.metadata.tree.KeyType`).
_SEQUENCE = 1
_DICT = 2

# Upper bound of (uncompressed) chunk bytes per kvstore transaction. Peak RSS
# grows by about 6x this (each value is held by the read, by Python, by the
# transaction and by the OCDBT data-file writer, for two pipelined batches);
# on a 1.6 GB checkpoint 32, 64 and 256 MiB copied at the same speed.
_BATCH_BYTES = 32 << 20
# Also bound the number of chunk operations per batch (small chunks).
_BATCH_OPS = 4096
# Decode-path commits in flight at once (each holds up to `_BATCH_BYTES`).
_INFLIGHT = 2
# Decoded bytes that concurrent decode jobs may hold together (one job
# always runs, whatever its size). Each job's bytes are held about 2.5 times
# at peak (decoded source, cast or encoded copy, the uncommitted
# transaction): measured with bench/export_bench.py, 256 MB gave 625 MB of
# RSS and 64 MB 265 MB, at the same speed within 3%.
_DECODE_BUDGET = 64 << 20
# Chunks written on the decode path are at most this big, as Orbax's default
# OCDBT target data file size (`tensorstore_utils._DEFAULT_OCDBT_TARGET_DATA_FILE_SIZE`)
# caps the chunks it writes.
_MAX_CHUNK_BYTES = 2**31
#: Stream-decode stacks saved as one zstd chunk (see `_StreamPlan`); the
#: environment variable ``CKPTCONV_ZSTD_STREAM=0`` sets it False, forcing
#: TensorStore's whole-leaf decode (same output, bit for bit).
ZSTD_STREAM = os.environ.get("CKPTCONV_ZSTD_STREAM", "1") != "0"
#: Whether this TensorStore's ``KvStore.read`` reads byte ranges
#: (``byte_range=``): 0.1.86 does, 0.1.77 (the lowest tested) does not. Without
#: it the stream decode is off (TensorStore decodes such leaves whole) and the
#: clone's damage checks read each chunk whole. pybind11 functions have no
#: signature to inspect; their docstring lists the keywords.
BYTE_RANGES = "byte_range" in (getattr(ts.KvStore.read, "__doc__", None) or "")
# Streamed decode jobs at once: one per core of the 2-core machines this was
# measured on (libzstd releases the GIL; TensorStore encodes in its own threads).
_STREAM_JOBS = 2
# Decoded layers a streamed decode on a layer axis > 0 keeps per pass over
# the stream (there every layer's bytes are spread over the whole leaf).
_SCATTER_BYTES = 128 << 20
# The clone engine (`orbax_clone`) is used only where OUT references all but
# this fraction of the source's chunk bytes: the rest would stay alive in
# OUT's shared data files after IN is deleted (see `_Plan._clone_refusal`).
_MAX_DEAD_FRACTION = 0.01

_EMPTY_TYPES = {"None", "Dict", "List", "Tuple", "NamedTuple"}

Progress = Callable[[int], Any]


# --------------------------------------------------------------------------
# Reading


def read_lazy(item_dir: str | os.PathLike) -> Any:
    """Describes an Orbax item directory's tree without reading array data.

    The tree comes from ``_METADATA`` (Orbax's tree metadata: keys, key types,
    value types) and each array's zarr metadata (``.zarray`` or, zarr3,
    ``zarr.json``: shape, dtype), read concurrently from the OCDBT store;
    never from chunks. This is what Orbax's own
    ``PyTreeCheckpointHandler().metadata`` reads, without importing Orbax and
    JAX (about 0.8 s here, half of a small conversion). Layouts this reader
    does not know (pre-OCDBT, unknown value types) go through Orbax's API
    (`read_lazy_with_orbax`); tests check that both agree.

    Args:
      item_dir: a directory written by ``StandardCheckpointer`` /
        ``PyTreeCheckpointer`` (it holds ``_METADATA``).

    Returns:
      Nested dicts (string keys, in ``_METADATA``'s order) and lists (where
      Orbax says SEQUENCE; non-empty tuples come back as lists, as Orbax
      restores them). Array leaves, including python scalars saved by Orbax
      (0-d arrays of type "scalar"), are `Ref(source=<orbax param name>, shape,
      dtype)`. ``None``, ``{}``, ``[]`` and ``()`` are kept. Strings (saved by
      ``PyTreeCheckpointer`` in ``_strings.json``) are returned as their value.

    Raises:
      FormatError: the directory is not a readable Orbax PyTree item, or a leaf
        has a type this module cannot represent.
    """
    path = Path(item_dir).absolute()
    src = _Source(path)
    known = {"jax.Array", "np.ndarray", "scalar", "string"} | _EMPTY_TYPES
    if (
        not src.use_ocdbt
        or any(m.get("value_type") not in known for m in src.entries.values())
    ):
        return read_lazy_with_orbax(path)
    return _run(_read_lazy_fast(src))


_EMPTY_VALUES: dict[str, Any] = {
    "None": None,
    "Dict": {},
    "List": [],
    "Tuple": (),
    "NamedTuple": (),
}


async def _read_lazy_fast(src: _Source) -> Any:
    entries = [(None, keys, meta) for keys, meta in src.parsed]
    arrays = [
        ".".join(k for k, _ in keys)
        for _, keys, meta in entries
        if meta.get("value_type") in ("jax.Array", "np.ndarray", "scalar")
    ]
    zarrays = await asyncio.gather(*(src.zarr_meta(name) for name in arrays))
    specs = dict(zip(arrays, zarrays))
    strings: dict[str, Any] | None = None
    root: Any = None
    for keypath, keys, meta in entries:
        name = ".".join(k for k, _ in keys)
        vtype = meta.get("value_type")
        if name in specs:
            z = specs[name]
            dtype = _zarr_dtype(_meta_dtype(z), src.path, name)
            value: Any = Ref(source=name, shape=tuple(z["shape"]), dtype=dtype)
        elif vtype == "string":
            if strings is None:
                strings = _read_json(src.path / STRINGS_FILE, what="strings file")
            if not isinstance(strings, dict) or name not in strings:
                raise FormatError(f"{src.path / STRINGS_FILE}: no value for string leaf {name!r}")
            value = strings[name]
        else:
            value = _EMPTY_VALUES[vtype]
            value = type(value)() if isinstance(value, (dict, list)) else value
        if not keys:
            if len(entries) > 1:
                raise FormatError(
                    f"{src.path / METADATA_FILE}: an entry with no keys (the root) beside "
                    f"{len(entries) - 1} others; the metadata is damaged"
                )
            return value
        try:
            root = _place(root, keys, value)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            raise FormatError(
                f"{src.path / METADATA_FILE}: leaf {name!r} does not fit the tree the other "
                "entries make (a key is both a leaf and a container, or a list and a dict); "
                "the metadata is damaged"
            ) from None
        del keypath
    return {} if root is None else root


def _place(root: Any, keys: list[tuple[str, int]], value: Any) -> Any:
    """Puts ``value`` at ``keys`` in the tree ``root`` (made if None); returns root."""

    def container(key_type: int) -> Any:
        return {} if key_type == _DICT else []

    if root is None:
        root = container(keys[0][1])
    node = root
    for depth, (key, _) in enumerate(keys):
        last = depth == len(keys) - 1
        child_type = None if last else keys[depth + 1][1]
        if isinstance(node, list):
            # `_parse_entry` bounds the index by the number of entries.
            idx = int(key)
            while len(node) <= idx:
                node.append(None)
            if last:
                node[idx] = value
            else:
                if node[idx] is None:
                    node[idx] = container(child_type)
                node = node[idx]
        elif not isinstance(node, dict):
            raise TypeError(f"{type(node).__name__} is not a container")
        elif last:
            node[key] = value
        else:
            node = node.setdefault(key, container(child_type))
    return root


def _parse_entry(
    file: Path, keypath: str, entry: Any, count: int
) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The keys ``[(key, key type)]`` and value metadata of one ``tree_metadata`` entry.

    ``count`` (the number of entries) bounds a sequence index: a list of n
    items has at least n entries.
    """

    def bad(what: str) -> FormatError:
        return FormatError(
            f"{file}: entry {keypath[:80]!r} {what}; the metadata is damaged (a partial copy?), "
            "copy the checkpoint again"
        )

    if not isinstance(entry, dict):
        raise bad("is not a JSON object")
    key_metadata, value_metadata = entry.get("key_metadata"), entry.get("value_metadata")
    if not isinstance(key_metadata, list):
        raise bad("has no key_metadata list")
    if not isinstance(value_metadata, dict):
        raise bad("has no value_metadata object")
    if not isinstance(value_metadata.get("value_type", ""), str):
        raise bad("has a value_type that is not a string")
    keys = []
    for k in key_metadata:
        if not isinstance(k, dict) or not isinstance(k.get("key"), (str, int)) or isinstance(
            k.get("key"), bool
        ):
            raise bad("has a key that is not a string")
        key, key_type = str(k["key"]), k.get("key_type", _DICT)
        if key_type not in (_SEQUENCE, _DICT) or isinstance(key_type, bool):
            raise bad(f"has key_type {key_type!r:.40} (Orbax writes {_SEQUENCE} or {_DICT})")
        if key_type == _SEQUENCE and not (key.isdecimal() and key.isascii() and int(key) < count):
            raise bad(f"has the sequence index {key[:40]!r}, not one of 0..{count - 1}")
        # Keys name files in layouts without OCDBT: none may leave the item.
        if key in ("", ".", "..") or key.startswith("/") or "\x00" in key or "/../" in f"/{key}/":
            raise bad(f"has the key {key[:40]!r}, which would name a file outside the checkpoint")
        keys.append((key, key_type))
    return keys, value_metadata


def _zarr_dtype(name: Any, path: Path, leaf: str) -> np.dtype:
    """A zarr v2 dtype (``"<f4"``, ``"bfloat16"``, ``"float8_e4m3fn"``) as numpy's.

    Only numeric dtypes (`FLAX_DTYPES`) are accepted, and a name from the file
    never reaches ``np.dtype``'s parser (which takes "|O", structured and comma
    dtypes): ``<f4``-style names are matched here first.
    """
    dtype = None
    if isinstance(name, str):
        m = re.fullmatch(r"([<>|=])([biufc])([1-9][0-9]?)", name)
        if m:
            dtype = np.dtype(f"{m[1]}{m[2]}{m[3]}") if m[3] in ("1", "2", "4", "8", "16") else None
        elif name.isidentifier():
            try:
                dtype = ts.dtype(name).numpy_dtype
            except Exception:  # TensorStore's own message says no more.
                dtype = None
    if dtype is None or FLAX_DTYPES.get(dtype.name) != dtype.newbyteorder("="):
        raise FormatError(
            f"{path}: leaf {leaf!r} has a dtype ckptconv cannot read ({name!r:.60}); the "
            "checkpoint is damaged, or holds a non-numeric array"
        )
    return dtype


def _check_zarray(z: Any, path: Path, key: str) -> dict[str, Any]:
    """Checks the fields of a ``.zarray`` (or zarr3 ``zarr.json``) that the
    reader and the writer use (it is returned unchanged: the writer copies it
    verbatim)."""

    def bad(what: str) -> FormatError:
        return FormatError(
            f"{path}: {key} {what}; the checkpoint is damaged, copy it again"
        )

    if not isinstance(z, dict):
        raise bad("is not a JSON object")
    v3 = key.endswith(f"/{ZARR3_FILE}")
    if v3:
        if z.get("zarr_format") != 3 or z.get("node_type") != "array":
            raise bad(f"has zarr_format {z.get('zarr_format')!r:.20} and node_type "
                      f"{z.get('node_type')!r:.20}, not a zarr v3 array")
        grid, encoding = z.get("chunk_grid"), z.get("chunk_key_encoding")
        conf = grid.get("configuration") if isinstance(grid, dict) else None
        if not isinstance(conf, dict) or grid.get("name") != "regular":
            raise bad(f"has chunk_grid {grid!r:.80}, not a regular grid (the only one TensorStore reads)")
        enc_conf = encoding.get("configuration", {}) if isinstance(encoding, dict) else None
        if (
            not isinstance(enc_conf, dict)
            or encoding.get("name") not in ("default", "v2")
            or enc_conf.get("separator", "/") not in ("/", ".")
        ):
            raise bad(f"has chunk_key_encoding {encoding!r:.80}, not 'default' or 'v2' with "
                      "separator '/' or '.'")
        codecs = z.get("codecs")
        if not isinstance(codecs, list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) for c in codecs
        ):
            raise bad(f"has codecs {codecs!r:.80}, not a list of named codecs")
        shape, chunks = z.get("shape"), conf.get("chunk_shape")
    else:
        if z.get("zarr_format", 2) != 2:
            raise bad(f"has zarr_format {z.get('zarr_format')!r:.20}, not 2")
        shape, chunks = z.get("shape"), z.get("chunks")
    sizes = (isinstance(shape, list) and isinstance(chunks, list)
             and all(isinstance(d, int) and not isinstance(d, bool) for d in shape + chunks))
    if not sizes or len(shape) != len(chunks) or min(shape, default=0) < 0 or min(chunks, default=1) < 1:
        raise bad(f"has shape {shape!r:.60} and chunks {chunks!r:.60}, not sizes of one rank")
    dtype = _zarr_dtype(z.get("data_type" if v3 else "dtype"), path, key.rsplit("/", 1)[0])
    # A chunk is decoded whole: one far bigger than its array (or than any
    # chunk Orbax writes) is refused before TensorStore tries to allocate it.
    limit = max(math.prod(shape) * dtype.itemsize, _MAX_CHUNK_BYTES)
    if math.prod(chunks) * dtype.itemsize > limit:
        raise bad(f"has chunks {chunks} of {math.prod(chunks) * dtype.itemsize} bytes, "
                  f"more than the array (shape {shape}) or Orbax's chunk limit")
    return z


def read_lazy_with_orbax(item_dir: str | os.PathLike) -> Any:
    """`read_lazy` through Orbax's own metadata API (slower: imports Orbax and JAX)."""
    import orbax.checkpoint as ocp  # Heavy (imports jax); only needed here.
    from etils import epath

    path = Path(item_dir).absolute()
    _check_item_dir(path)
    try:
        tree_metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))
    except Exception as e:  # Orbax raises many kinds; all mean "unreadable".
        raise FormatError(
            f"{path}: Orbax could not read the checkpoint's metadata: {e}. "
            "The checkpoint looks incomplete or damaged: check that its save finished and that it was copied whole."
        ) from e
    strings: dict[str, Any] | None = None

    def convert(node: Any, keys: tuple[str, ...]) -> Any:
        nonlocal strings
        if isinstance(node, Mapping):
            return {str(k): convert(v, (*keys, str(k))) for k, v in node.items()}
        if isinstance(node, tuple) and not node:
            return ()
        if isinstance(node, (list, tuple)):
            return [convert(v, (*keys, str(i))) for i, v in enumerate(node)]
        if node is None:
            return None
        if isinstance(node, ocp.metadata.ArrayMetadata):  # ScalarMetadata too.
            return Ref(
                source=node.name,
                shape=tuple(int(d) for d in node.shape),
                dtype=np.dtype(node.dtype),
            )
        if isinstance(node, ocp.metadata.StringMetadata):
            if strings is None:
                strings = _read_json(path / STRINGS_FILE, what="strings file")
            if node.name not in strings:
                raise FormatError(f"{path / STRINGS_FILE}: no value for string leaf {node.name!r}")
            return strings[node.name]
        raise FormatError(
            f"{path}: leaf {'.'.join(keys)!r} has a type ckptconv cannot read ({type(node).__name__}); "
            "only arrays, scalars, strings, None and empty containers are supported"
        )

    return convert(tree_metadata.tree, ())


def read_array(
    item_dir: str | os.PathLike, source: str, index: tuple[Any, ...] | None = None
) -> np.ndarray:
    """Reads one array of an Orbax item directory, or the region ``index`` of it.

    Args:
      item_dir: the item directory.
      source: the array's Orbax param name, as in `Ref.source` from `read_lazy`.
      index: a tuple of ints and slices: only the chunks it touches are read
        (one layer of a stack saved layer-thick).

    Returns:
      The array (0-d for scalars), with its stored dtype.

    Raises:
      FormatError: the directory or the array cannot be read.
    """
    src = _opened(Path(item_dir))
    if index is None:
        return _run(_read_whole(src, source))
    src.value_metadata(source)
    return _run(src.read_region(source, index))


_OPENED: dict[Path, _Source] = {}


def _opened(path: Path) -> _Source:
    """An item directory's `_Source`, parsed once per process for a run of
    reads (another format's writer reads every leaf of one input); the last
    few are kept."""
    key = path.absolute()
    src = _OPENED.get(key)
    if src is None:
        src = _Source(key)
        if len(_OPENED) >= 4:
            _OPENED.pop(next(iter(_OPENED)))
        _OPENED[key] = src
    return src


async def _read_whole(src: _Source, name: str) -> np.ndarray:
    src.value_metadata(name)
    # TensorStore aborts the process when an allocation fails: metadata
    # claiming more than this machine holds is refused first.
    z = await src.zarr_meta(name)
    need = math.prod(z["shape"]) * _zarr_dtype(_meta_dtype(z), src.path, name).itemsize
    if need > _physical_memory():
        raise FormatError(
            f"{src.path}: array {name!r} claims shape {tuple(z['shape'])} ({need} bytes), "
            f"more than this machine's memory; its {_meta_file(z)} is damaged, or read it in "
            "parts (convert streams it)"
        )
    return await src.read_region(name, ())


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 62


# --------------------------------------------------------------------------
# Writing


def write(
    src_dir: str | os.PathLike,
    out_tree: Any,
    dst_dir: str | os.PathLike,
    *,
    progress: Progress | None = None,
    sync: bool = True,
    share: bool = False,
) -> str:
    """Writes a complete Orbax item directory holding `out_tree`.

    The output is built in ``<dst_dir>.orbax-checkpoint-tmp-<pid>-<ns>`` beside
    `dst_dir` (a name Orbax treats as unfinished), its ``commit_success.txt``
    is written last, and only then is it renamed to `dst_dir`. On any error the
    temporary directory is removed.

    Args:
      src_dir: the item directory that `out_tree`'s lazy leaves refer to;
        None when it has none (another format's `lazy.Deferred` leaves, read
        one at a time as the writer reaches them, and in-memory values).
      out_tree: nested dicts (any Mapping; keys are written as ``str(key)``),
        lists and tuples whose leaves are `Ref` (copied unchanged), `Stack`
        (``np.stack`` of its parts), `Slice` (``np.take``), ``None``, empty
        containers, strings (into ``_strings.json``), python scalars (as Orbax
        "scalar" leaves) or array values (numpy, jax: written as
        ``np.ndarray`` leaves).
      dst_dir: the directory to create; it must not exist. Missing parents are
        created.
      progress: called with a number of bytes (uncompressed output bytes)
        each time output data has been committed to disk.
      sync: fsync every output file before the commit marker is written (as
        Orbax's saves do), so that a finished output survives a power loss.
        False leaves write-back to the OS: faster where the disk is slower
        than the page cache.
      share: where the output is `src_dir`'s arrays moved by chunk (to-scan
        of layers, to-loop of layer-thick stacks, copies), clone `src_dir`'s
        OCDBT database and rename its keys (`orbax_clone`): OUT shares the
        source's data files (hard links, or whole-file copies across
        filesystems) and costs the metadata, whatever the checkpoint's size.
        Deleting either side is safe, and nothing ever writes into a data
        file. False (``--copy``): the chunk-copy engine, OUT's files its own.

    Returns:
      The engine used: ``"clone"`` or ``"copy"``.

    Raises:
      OutputExistsError: `dst_dir` exists.
      FormatError: `src_dir` is unreadable, a lazy leaf refers to an array it
        does not hold (or with another shape), or a leaf cannot be written.
    """
    dst = Path(dst_dir).absolute()
    if dst.exists() or dst.is_symlink():
        raise OutputExistsError(f"{dst}: output already exists; remove it or choose another path")
    src = _Source(Path(src_dir)) if src_dir is not None else _NoSource()
    plan = _Plan(src, out_tree)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}{TMP_DIR_SUFFIX}-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir()
    try:
        _run(plan.write_data(tmp, progress, sync=sync, share=share))
        plan.write_files(tmp, dst, sync=sync)
        os.rename(tmp, dst)
        if sync:
            _fsync(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return plan.engine


# --------------------------------------------------------------------------
# The source item directory


def _context() -> ts.Context:
    return ts.Context(
        {
            "file_io_concurrency": {"limit": 128},
            # No fsync per OCDBT commit: `write` fsyncs every output file
            # once at the end instead, so the disk writes back in the
            # background while chunks are still being copied.
            "file_io_sync": False,
            # Caches OCDBT B-tree nodes, as Orbax does; array chunks are not cached.
            "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000},
        }
    )


class _NoSource:
    """The source of an output with no Orbax input (msgpack or safetensors in):
    its leaves are `Deferred` reads or values; a `Ref` is an error."""

    path = None
    metadata: dict[str, Any] = {}
    use_zarr3 = False
    use_ocdbt = False
    raise_missing = False

    def __init__(self) -> None:
        self.context = _context()

    def value_metadata(self, name: str) -> dict[str, Any]:
        raise FormatError(
            f"output leaf refers to Orbax array {name!r}, but no Orbax source was given"
        )


class _Source:
    """An Orbax item directory opened for reading (metadata parsed lazily)."""

    def __init__(self, path: Path) -> None:
        self.path = path.absolute()
        _check_item_dir(self.path)
        self.metadata = _read_json(self.path / METADATA_FILE, what="Orbax metadata file")
        if not isinstance(self.metadata, dict) or not isinstance(
            self.metadata.get("tree_metadata"), dict
        ):
            raise FormatError(
                f"{self.path / METADATA_FILE}: not an Orbax PyTree metadata file (no tree_metadata)"
            )
        self.use_zarr3 = bool(self.metadata.get("use_zarr3", False))
        # `use_ocdbt` may be missing in old metadata; Orbax then looks for the
        # manifest (`format_utils.is_ocdbt_checkpoint`).
        self.use_ocdbt = (self.path / OCDBT_MANIFEST).exists()
        self.raise_missing = bool(self.metadata.get("store_array_data_equal_to_fill_value", False))
        self.entries: dict[str, dict[str, Any]] = {}
        #: (keys [(key, key type)], value metadata) of every entry, in order.
        self.parsed: list[tuple[list[tuple[str, int]], dict[str, Any]]] = []
        tree = self.metadata["tree_metadata"]
        for keypath, entry in tree.items():
            keys, value_metadata = _parse_entry(self.path / METADATA_FILE, keypath, entry, len(tree))
            self.entries[".".join(k for k, _ in keys)] = value_metadata
            self.parsed.append((keys, value_metadata))
        self.context = _context()
        base = {"driver": "file", "path": str(self.path) + "/"}
        if self.use_ocdbt:
            self.kvstore_spec: dict[str, Any] = {
                "driver": "ocdbt",
                "base": base,
                "cache_pool": "cache_pool#ocdbt",
            }
        else:
            # Pre-OCDBT Orbax: one directory per param, same key layout.
            self.kvstore_spec = base
        self._kvstore: ts.KvStore | None = None
        self._shardings: dict[str, str] | None = None
        self._array_metadatas: dict[str, dict[str, Any]] | None = None

    async def kvstore(self) -> ts.KvStore:
        if self._kvstore is None:
            try:
                self._kvstore = await ts.KvStore.open(self.kvstore_spec, context=self.context)
            except Exception as e:
                raise FormatError(
                    f"{self.path}: cannot open the checkpoint's key-value store: {e}"
                ) from e
        return self._kvstore

    def value_metadata(self, name: str) -> dict[str, Any]:
        if name not in self.entries:
            raise FormatError(
                f"{self.path / METADATA_FILE}: the checkpoint has no leaf named {name!r}"
            )
        return self.entries[name]

    def sharding(self, name: str) -> str | None:
        """The serialized sharding of a jax.Array leaf, from ``_sharding``."""
        if self._shardings is None:
            file = self.path / SHARDING_FILE
            self._shardings = _read_json(file, what="sharding file") if file.exists() else {}
        return self._shardings.get(_b64(name))

    def array_metadata(self, name: str) -> dict[str, Any] | None:
        """The ``array_metadatas/process_*`` entry of a leaf, if any."""
        if self._array_metadatas is None:
            self._array_metadatas = {}
            for file in sorted((self.path / ARRAY_METADATAS_DIR).glob("process_*")):
                data = _read_json(file, what="array metadata file")
                for item in data.get("array_metadatas", []):
                    meta = item.get("array_metadata", {})
                    self._array_metadatas.setdefault(meta.get("param_name"), meta)
        return self._array_metadatas.get(name)

    async def zarr_meta(self, name: str) -> dict[str, Any]:
        """The zarr metadata of an array, parsed: ``.zarray`` (v2) or
        ``zarr.json`` (v3, where ``_METADATA`` says ``use_zarr3``)."""
        kv = await self.kvstore()
        key = f"{name}/{ZARR3_FILE if self.use_zarr3 else ZARR2_FILE}"
        try:
            res = await kv.read(key)
        except Exception as e:
            raise FormatError(
                f"{self.path}: cannot read {key}: {e}. "
                "The checkpoint looks incomplete or damaged: check that its save finished and that it was copied whole."
            ) from e
        if res.state != "value":
            raise FormatError(
                f"{self.path}: array {name!r} has no zarr metadata ({key} is missing)"
            )
        try:
            z = json.loads(bytes(res.value))
        except (ValueError, RecursionError) as e:
            raise FormatError(f"{self.path}: {key} is not valid JSON: {e}") from e
        return _check_zarray(z, self.path, key)

    def array_spec(self, name: str) -> dict[str, Any]:
        """TensorStore spec to read one array, as Orbax's `ArrayReadSpec`."""
        if self.use_ocdbt:
            kvstore = {**self.kvstore_spec, "path": f"{name}/"}
        else:
            kvstore = {**self.kvstore_spec, "path": f"{self.kvstore_spec['path']}{name}/"}
        return {
            "driver": "zarr3" if self.use_zarr3 else "zarr",
            "kvstore": kvstore,
            "recheck_cached_data": False,
            "recheck_cached_metadata": False,
            "fill_missing_data_reads": not self.raise_missing,
        }

    async def open_array(self, name: str) -> ts.TensorStore:
        self.value_metadata(name)
        try:
            return await ts.open(self.array_spec(name), open=True, read=True, context=self.context)
        except Exception as e:
            raise FormatError(
                f"{self.path}: cannot open array {name!r}: {e}. "
                "The checkpoint looks incomplete or damaged: check that its save finished and that it was copied whole."
            ) from e

    async def read_region(self, name: str, index: tuple[Any, ...]) -> np.ndarray:
        """Reads ``array[index]`` of one array (decodes the chunks it touches)."""
        arr = await self.open_array(name)
        try:
            return np.asarray(await arr[index].read())
        except Exception as e:
            raise FormatError(
                f"{self.path}: cannot read array {name!r}: {e}. "
                "The checkpoint looks incomplete or damaged: check that its save finished and that it was copied whole."
            ) from e


# --------------------------------------------------------------------------
# Planning


@dataclass
class _Leaf:
    """One output leaf: its place in the tree and its Orbax metadata."""

    keys: tuple[tuple[str, int], ...]
    value: Any
    value_type: str = "np.ndarray"
    skip_deserialize: bool = False
    write_shape: list[int] | None = None
    sharding: str | None = None
    ext_metadata: Any = None
    chunks: list[int] | None = None
    #: The dtype a `Cast` leaf is written in (its value is then the Cast's source).
    cast: np.dtype | None = None
    #: zarr3 sources: the ``zarr.json`` of the leaf's (first) source array,
    #: whose codecs the decode path writes the leaf with.
    template: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return ".".join(k for k, _ in self.keys)

    def metadata_entry(self) -> dict[str, Any]:
        value = {"value_type": self.value_type, "skip_deserialize": self.skip_deserialize}
        if self.write_shape is not None:
            value["write_shape"] = list(self.write_shape)
        return {
            "key_metadata": [{"key": k, "key_type": t} for k, t in self.keys],
            "value_metadata": value,
        }


@dataclass
class _ChunkOp:
    """Copy one compressed chunk (or ``.zarray``) from source to output."""

    src_key: str
    dst_key: str
    # Uncompressed size of the chunk: bounds a batch's memory.
    cost: int
    # Output bytes this op completes, for `progress`.
    done: int
    leaf: str
    # The source array's zarr metadata (the chunk's layout, for damage checks).
    meta: dict[str, Any] | None = None


@dataclass
class _DecodeJob:
    """Output leaves computed by decoding (and re-encoding) array data.

    kind "stack": `leaves` is one Stack output; "slices": every Slice output of
    one source (decoded one layer-thick slab at a time); "ref": a Ref copied by
    decoding (a cast); "value": an in-memory array value.
    """

    kind: str
    leaves: list[_Leaf] = field(default_factory=list)
    #: "slices" of a source saved as one zstd chunk: how to stream it.
    stream: _StreamPlan | None = None

    @property
    def nbytes(self) -> int:
        """Decoded bytes the job holds at once: its source leaf (slices) or one part."""
        value = self.leaves[0].value
        if isinstance(value, Slice):
            return value.source.nbytes
        if isinstance(value, Stack):
            return value.parts[0].nbytes
        if isinstance(value, Deferred) and value.parts:
            return value.nbytes // len(value.parts)
        return int(getattr(value, "nbytes", 0))


@dataclass
class _StreamPlan:
    """How to stream-decode a source saved as one zstd chunk (`zstd_stream`).

    The chunk is the whole array, so its decoded bytes are the array in C
    order. On layer axis 0 layer ``l`` is bytes ``[l * layer, (l + 1) * layer)``:
    each layer is decoded straight into a buffer of its own and written, and
    memory holds about one layer. On an axis ``k > 0`` the layers interleave
    (each of the ``prod(shape[:k])`` rows holds a piece of every layer), so no
    layer is complete before the stream's end: each pass over the stream keeps
    the layers of one group of at most `_SCATTER_BYTES` (one layer at least)
    and scatters rows into them; a leaf larger than that is decoded once per
    group (time traded for memory).
    """

    #: The chunk's key in the source's kvstore.
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    #: zarr3 ``sharding_indexed``: the frame's byte range comes from the shard
    #: index (``index_crc``: the index ends with its crc32c).
    sharded: bool
    index_crc: bool
    #: The metadata file's name and what it says, for damage messages.
    what: str
    #: Decoded bytes the job holds at once.
    held: int = 0


def _stream_plan(job: _DecodeJob, z: dict[str, Any] | None) -> _StreamPlan | None:
    """A `_StreamPlan` for a "slices" job whose source is one zstd chunk of a
    little-endian dtype in C order (zarr2 ``zstd`` compressor and no filters;
    zarr3 ``bytes`` + ``zstd``, alone or inside one ``sharding_indexed`` whose
    inner chunk is the whole array), else None (TensorStore decodes it)."""
    if not ZSTD_STREAM or not BYTE_RANGES or z is None:
        return None
    first: Slice = job.leaves[0].value
    ref, axis = first.source, first.axis
    shape = tuple(int(d) for d in z.get("shape", ()))
    if not shape or list(shape) != _meta_chunks(z) or shape != tuple(ref.shape) or 0 in shape:
        return None
    try:
        dtype = _zarr_dtype(_meta_dtype(z), Path(), ref.source)
    except FormatError:
        return None
    if dtype.itemsize > 1 and dtype.byteorder == ">" or dtype.newbyteorder("=") != np.dtype(ref.dtype):
        return None
    dtype = dtype.newbyteorder("=")
    sharded = crc = False
    if _is_zarr3(z):
        chain = z.get("codecs") or []
        if z.get("storage_transformers") or not isinstance(chain, list) or not chain:
            return None
        if chain[0].get("name") == "sharding_indexed":
            conf = chain[0].get("configuration") or {}
            index = [c.get("name") for c in conf.get("index_codecs") or [{"name": "bytes"}, {"name": "crc32c"}]]
            index_endian = ((conf.get("index_codecs") or [{}])[0].get("configuration") or {}).get("endian", "little")
            if (
                len(chain) != 1 or list(conf.get("chunk_shape") or []) != list(shape)
                or index not in (["bytes"], ["bytes", "crc32c"]) or index_endian != "little"
                or conf.get("index_location", "end") != "end"
            ):
                return None
            chain, sharded, crc = conf.get("codecs") or [], True, index[-1] == "crc32c"
        if [c.get("name") for c in chain] != ["bytes", "zstd"]:
            return None
        endian = (chain[0].get("configuration") or {}).get("endian", "little")
        if dtype.itemsize > 1 and endian != "little":
            return None
        what = "its zarr.json (shape, chunks, data_type)"
    else:
        if (
            (z.get("compressor") or {}).get("id") != "zstd" or z.get("filters")
            or z.get("order", "C") != "C"
        ):
            return None
        what = "its .zarray (shape, chunks, dtype)"
    nbytes = math.prod(shape) * dtype.itemsize
    layer = nbytes // shape[axis]
    held = layer if axis == 0 else min(nbytes, max(layer, _SCATTER_BYTES // layer * layer))
    key = f"{ref.source}/{_chunk_key((0,) * len(shape), z)}"
    return _StreamPlan(key, shape, dtype, sharded, crc, what, held + 2 * zstd_stream.BLOCK)


@dataclass
class _Work:
    """The array leaves sorted: chunk moves, metadata to write, decode jobs."""

    ops: list[_ChunkOp]
    #: ``<name>/.zarray`` (or ``zarr.json``) -> its bytes, for every moved leaf.
    meta_values: dict[str, bytes]
    jobs: list[_DecodeJob]
    #: The zarr metadata of every source array a lazy leaf refers to.
    zarrays: dict[str, dict[str, Any]]
    #: Every source array's zarr metadata (the clone engine reads them).
    source_arrays: dict[str, dict[str, Any]] = field(default_factory=dict)

    def kept(self) -> set[str]:
        """Source arrays that stay where they are: a leaf moved whole under
        its own name (an unchanged `Ref`)."""
        moved: dict[str, bool] = {}
        for op in self.ops:
            name = op.dst_key[: len(op.leaf)]
            same = op.src_key == op.dst_key and name == op.leaf
            moved[op.leaf] = moved.get(op.leaf, True) and same
        return {name for name, same in moved.items() if same}


class _Plan:
    """What to write for an out_tree: chunk copies, decode jobs, metadata."""

    def __init__(self, src: _Source, out_tree: Any) -> None:
        self.src = src
        if isinstance(out_tree, LAZY) or not isinstance(out_tree, (Mapping, list, tuple)):
            raise FormatError(
                "an Orbax checkpoint's tree must be a dict or a list at the top, not a single leaf"
            )
        self.leaves = [_Leaf(keys, value) for keys, value in _flatten(out_tree, ())]
        #: "clone" or "copy": the engine `write_data` used.
        self.engine = ""
        self.shared = orbax_clone.Shared()
        for leaf in self.leaves:
            if isinstance(leaf.value, Cast):
                if isinstance(leaf.value.value, Cast):
                    raise FormatError(f"output leaf {leaf.name!r}: a cast of a cast")
                leaf.cast, leaf.value = np.dtype(leaf.value.dtype), leaf.value.value
        seen: set[str] = set()
        for leaf in self.leaves:
            if leaf.name in seen:
                raise FormatError(
                    f"two leaves of the output tree have the same Orbax name {leaf.name!r}"
                )
            seen.add(leaf.name)
        self.strings: dict[str, str] = {}
        for leaf in self.leaves:
            self._describe(leaf)

    def _describe(self, leaf: _Leaf) -> None:
        """Fills a leaf's Orbax value metadata (everything but chunk shapes)."""
        value = leaf.value
        if isinstance(value, LAZY):
            self._describe_lazy(leaf)
        elif isinstance(value, Deferred):
            # Another format's leaf: read when its job runs, one at a time.
            leaf.value_type = "np.ndarray"
        elif value is None or (isinstance(value, (Mapping, list, tuple)) and not value):
            # Orbax's empty-value type names (`metadata.empty_values`).
            leaf.value_type = (
                "None" if value is None
                else "List" if isinstance(value, list)
                else "Tuple" if isinstance(value, tuple)
                else "Dict"
            )  # fmt: skip
            leaf.skip_deserialize = True
        elif isinstance(value, str):
            leaf.value_type = "string"
            self.strings[leaf.name] = value
        elif isinstance(value, (bool, int, float)) and not isinstance(value, np.generic):
            # Orbax's ScalarHandler: a 0-d array restored with `.item()`.
            leaf.value_type = "scalar"
            leaf.value = np.asarray(value)
        else:
            try:
                array = np.asarray(value)
            except Exception as e:
                raise FormatError(
                    f"output leaf {leaf.name!r}: cannot write a {type(value).__name__}: {e}"
                ) from e
            # ml_dtypes (bfloat16, float8) have kind "V" too, but not type np.void.
            if array.dtype.kind in "OUS" or array.dtype.type is np.void:
                raise FormatError(
                    f"output leaf {leaf.name!r}: cannot write a {type(value).__name__} as an array"
                )
            leaf.value = array

    def _describe_lazy(self, leaf: _Leaf) -> None:
        value = leaf.value
        if isinstance(value, Ref):
            meta = self.src.value_metadata(value.source)
            leaf.value_type = meta.get("value_type", "np.ndarray")
            leaf.write_shape = meta.get("write_shape")
            if leaf.value_type == "jax.Array":
                leaf.sharding = self.src.sharding(value.source)
                leaf.ext_metadata = (self.src.array_metadata(value.source) or {}).get(
                    "ext_metadata"
                )
            return
        if isinstance(value, Stack):
            if not value.parts:
                raise FormatError(f"output leaf {leaf.name!r}: a stack of no arrays")
            for part in value.parts:
                if not isinstance(part, Ref):
                    raise FormatError(
                        f"output leaf {leaf.name!r}: stack parts must be Refs, not {type(part).__name__}"
                    )
                if part.shape != value.parts[0].shape:
                    raise FormatError(
                        f"output leaf {leaf.name!r}: cannot stack {part.source!r} of shape {part.shape} "
                        f"with {value.parts[0].source!r} of shape {value.parts[0].shape}"
                    )
            source, axis = value.parts[0].source, value.axis
            if not 0 <= axis <= len(value.parts[0].shape):
                raise FormatError(f"output leaf {leaf.name!r}: stack axis {axis} is out of range")
        else:
            if not isinstance(value.source, Ref):
                raise FormatError(f"output leaf {leaf.name!r}: a slice must be of a Ref")
            source, axis = value.source.source, value.axis
            if not 0 <= axis < len(value.source.shape):
                raise FormatError(
                    f"output leaf {leaf.name!r}: slice axis {axis} is out of range for {source!r} of shape "
                    f"{value.source.shape}"
                )
            if not 0 <= value.index < value.source.shape[axis]:
                raise FormatError(
                    f"output leaf {leaf.name!r}: index {value.index} is out of range for {source!r} "
                    f"(length {value.source.shape[axis]} on axis {axis})"
                )
        meta = self.src.value_metadata(source)
        value_type = meta.get("value_type", "np.ndarray")
        # A stack of python scalars is an array; other types keep their kind.
        leaf.value_type = "np.ndarray" if value_type == "scalar" else value_type
        if leaf.value_type != "jax.Array":
            return
        write_shape = meta.get("write_shape")
        sharding = self.src.sharding(source)
        if isinstance(value, Stack):
            if write_shape is not None:
                write_shape = [*write_shape[:axis], len(value.parts), *write_shape[axis:]]
            sharding = _edit_partition_spec(sharding, axis, insert=True)
        else:
            if write_shape is not None:
                write_shape = [*write_shape[:axis], *write_shape[axis + 1 :]]
            sharding = _edit_partition_spec(sharding, axis, insert=False)
        if sharding is None:
            # Orbax cannot restore a jax.Array without a sharding when no
            # target is given; a numpy leaf restores everywhere.
            leaf.value_type = "np.ndarray"
            return
        leaf.write_shape = write_shape
        leaf.sharding = sharding
        leaf.ext_metadata = (self.src.array_metadata(source) or {}).get("ext_metadata")

    # -- data ---------------------------------------------------------------

    async def write_data(
        self, tmp: Path, progress: Progress | None, *, sync: bool, share: bool = False
    ) -> None:
        """Writes every array's chunks into an OCDBT store under `tmp`: a clone
        of the source's database whose keys are renamed (``share``, where
        `_clone_refusal` allows it), else a new store the chunks are copied into."""
        work = await self._work()
        self.engine = "copy"
        if share and await self._clone_refusal(work) is None:
            self.engine = "clone"
            self.shared = orbax_clone.share_database(self.src.path, tmp)
        dst = _Destination(
            tmp, self.src.context, sync=sync, zarr3=self.src.use_zarr3,
            existing=self.engine == "clone",
        )
        await dst.open()
        try:
            if self.engine == "clone":
                await self._rename(dst, work, progress)
            else:
                await self._copy(dst, work, progress)
            await self._decode(dst, work, progress)
        finally:
            await dst.close()

    async def _work(self) -> _Work:
        """Sorts the array leaves into chunk moves and decode jobs (reads the
        source arrays' zarr metadata, no chunk)."""
        array_leaves = [
            leaf for leaf in self.leaves if isinstance(leaf.value, (*LAZY, Deferred, np.ndarray))
        ]
        lazy_sources = sorted(
            {
                ref.source
                for leaf in array_leaves
                if isinstance(leaf.value, LAZY)
                for ref in _refs(leaf.value)
            }
        )
        zarrays: dict[str, dict[str, Any]] = {}
        if lazy_sources:
            got = await asyncio.gather(*(self.src.zarr_meta(name) for name in lazy_sources))
            zarrays = dict(zip(lazy_sources, got))
        ops: list[_ChunkOp] = []
        jobs: list[_DecodeJob] = []
        slices: dict[tuple[str, int], _DecodeJob] = {}
        zarray_writes: list[tuple[str, dict[str, Any]]] = []

        def decode_slice(leaf: _Leaf, value: Slice) -> None:
            slices.setdefault((value.source.source, value.axis), _DecodeJob("slices")).leaves.append(leaf)

        for leaf in array_leaves:
            value = leaf.value
            if isinstance(value, LAZY):
                for ref in _refs(value):
                    self._check_ref(leaf, ref, zarrays.get(ref.source))
                # The decode path writes zarr3 arrays with their source's codecs.
                leaf.template = zarrays[_refs(value)[0].source] if self.src.use_zarr3 else None
            if isinstance(value, (np.ndarray, Deferred)):
                jobs.append(_DecodeJob("value", [leaf]))
            elif leaf.cast is not None:
                # Decoded: a cast changes every chunk's bytes.
                if isinstance(value, Slice):
                    decode_slice(leaf, value)
                else:
                    jobs.append(_DecodeJob("ref" if isinstance(value, Ref) else "stack", [leaf]))
            elif isinstance(value, Ref):
                zarray = zarrays[value.source]
                leaf.chunks = _meta_chunks(zarray)
                zarray_writes.append((leaf.name, zarray))
                ops.extend(_copy_ops(leaf, value.source, zarray, value.nbytes))
            elif isinstance(value, Stack):
                got = _stack_ops(leaf, value, [zarrays[p.source] for p in value.parts])
                if got is None:
                    jobs.append(_DecodeJob("stack", [leaf]))
                else:
                    zarray, stack_ops = got
                    leaf.chunks = _meta_chunks(zarray)
                    zarray_writes.append((leaf.name, zarray))
                    ops.extend(stack_ops)
            else:
                got = _slice_ops(leaf, value, zarrays[value.source.source])
                if got is None:
                    decode_slice(leaf, value)
                else:
                    zarray, slice_ops = got
                    leaf.chunks = _meta_chunks(zarray)
                    zarray_writes.append((leaf.name, zarray))
                    ops.extend(slice_ops)
        jobs.extend(slices.values())
        meta_values = {f"{name}/{_meta_file(z)}": _zarray_bytes(z) for name, z in zarray_writes}
        return _Work(ops, meta_values, jobs, zarrays)

    async def _copy(self, dst: _Destination, work: _Work, progress: Progress | None) -> None:
        """The chunk-copy engine: reads every compressed chunk and writes it
        into the new store, checking it for damage on the way."""
        # Metadata files are tiny: write them in the first batch of chunk copies.
        meta_ops = [_ChunkOp("", key, 0, 0, key.rsplit("/", 1)[0]) for key in work.meta_values]
        if meta_ops or work.ops:
            await dst.copy_chunks(
                await self.src.kvstore(), self.src.path, meta_ops + work.ops, work.meta_values,
                progress, missing_is_damage=self.src.raise_missing,
            )

    async def _decode(self, dst: _Destination, work: _Work, progress: Progress | None) -> None:
        # Jobs run concurrently within a budget of decoded bytes: one decodes
        # its source while another's layers are encoded and written, so both
        # cores work on small leaves; a leaf bigger than the budget runs alone,
        # so memory stays near one leaf, never the checkpoint.
        # A stack saved as one zstd chunk is streamed (`_StreamPlan`): it holds
        # about one layer, so such jobs run side by side, one per core.
        budget = _Budget(_DECODE_BUDGET)
        streams = asyncio.Semaphore(_STREAM_JOBS)

        async def run(job: _DecodeJob) -> None:
            if job.kind == "slices":
                job.stream = _stream_plan(job, work.zarrays.get(job.leaves[0].value.source.source))
            if job.stream is None:
                async with budget.hold(job.nbytes):
                    await dst.decode_job(self.src, job, progress)
                return
            async with streams, budget.hold(job.stream.held):
                await dst.decode_job(self.src, job, progress)

        await asyncio.gather(*(run(job) for job in work.jobs))
        await dst.drain()

    # -- the clone engine -----------------------------------------------------

    async def _source_arrays(self) -> dict[str, dict[str, Any]]:
        """The zarr metadata of every array the source holds."""
        names = [
            name for name, meta in self.src.entries.items()
            if meta.get("value_type") in ("jax.Array", "np.ndarray", "scalar")
            and not meta.get("skip_deserialize")
        ]
        got = await asyncio.gather(*(self.src.zarr_meta(name) for name in names))
        return dict(zip(names, got))

    async def _clone_refusal(self, work: _Work) -> str | None:
        """Why this output cannot be a clone of the source's database with
        renamed keys; None when it can.

        Refused: a source without OCDBT (pre-OCDBT Orbax); an output array
        whose name the source uses for another array (the rename would have
        to delete and write one key range in one transaction); and an output
        that leaves more than `_MAX_DEAD_FRACTION` of the source's chunk bytes
        unreferenced (casts, ``--only`` of a small part, unstacking a stack
        saved as one chunk): a clone would keep those bytes alive in OUT's
        shared data files once IN is deleted, so such an output is written
        by the copy engine, whose files hold only what OUT holds.
        """
        if not self.src.use_ocdbt or self.src.path is None:
            return "the source is not an OCDBT database"
        sources = await self._source_arrays()
        work.source_arrays = sources
        kept = work.kept()
        clash = sorted(
            leaf.name for leaf in self.leaves
            if leaf.name in sources and leaf.name not in kept
            and isinstance(leaf.value, (*LAZY, Deferred, np.ndarray))
        )
        if clash:
            return f"output array {clash[0]!r} has the name of another source array"
        total = 0
        for name, z in sources.items():
            chunks = _meta_chunks(z)
            count = math.prod(math.ceil(s / c) for s, c in zip(z["shape"], chunks))
            total += count * math.prod(chunks) * _zarr_dtype(_meta_dtype(z), self.src.path, name).itemsize
        referenced = {op.src_key: op.cost for op in work.ops}
        dead = total - sum(referenced.values())
        if dead > _MAX_DEAD_FRACTION * total:
            return (
                f"{dead} of the source's {total} chunk bytes would be unreferenced "
                f"(more than {_MAX_DEAD_FRACTION:.0%})"
            )
        return None

    async def _rename(self, dst: _Destination, work: _Work, progress: Progress | None) -> None:
        """The clone engine: in OUT's clone of the source database, every
        chunk move becomes a key copied by reference, the new arrays'
        metadata is written, and the source arrays OUT does not keep are
        deleted (one transaction)."""
        assert dst.kv is not None
        kept = work.kept()
        moves = [(op.src_key, op.dst_key) for op in work.ops if op.src_key != op.dst_key]
        if self.src.raise_missing and moves:
            # The source says it stores every chunk: a missing one is damage
            # (Orbax refuses the array), found from the B-tree's keys alone.
            present = {k.decode() for k in await dst.kv.list()}
            for op in work.ops:
                if op.src_key not in present:
                    raise FormatError(
                        f"{self.src.path}: chunk {op.src_key} of leaf {op.leaf!r} is missing, so "
                        "Orbax cannot read this array either. The checkpoint is incomplete: "
                        "check that its save finished and that it was copied whole."
                    )
        # Damage is looked for as the copy engine does, reading only the few
        # bytes each check needs (`_peek_damage`).
        src_kv = await self.src.kvstore()
        damages = await asyncio.gather(*(_peek_damage(src_kv, op) for op in work.ops))
        for op, damage in zip(work.ops, damages):
            if damage is not None:
                raise FormatError(
                    f"{self.src.path}: chunk {op.src_key} of leaf {op.leaf!r} {damage}. "
                    "Copy the checkpoint again."
                )
        writes = {k: v for k, v in work.meta_values.items() if k.rsplit("/", 1)[0] not in kept}
        drops = [f"{name}/" for name in work.source_arrays if name not in kept]
        try:
            await orbax_clone.rename_keys(dst.kv, moves, writes, drops)
        except FormatError:
            raise
        except Exception as e:
            raise FormatError(f"{dst.path}: renaming the cloned database's keys failed: {e}") from e
        if progress is not None:
            done = sum(op.done for op in work.ops)
            if done:
                progress(done)

    def _check_ref(self, leaf: _Leaf, ref: Ref, zarray: dict[str, Any] | None) -> None:
        meta = self.src.value_metadata(ref.source)
        if meta.get("skip_deserialize") or meta.get("value_type") in _EMPTY_TYPES | {"string"}:
            raise FormatError(
                f"output leaf {leaf.name!r}: {self.src.path} holds no array named {ref.source!r} "
                f"(it is a {meta.get('value_type')} leaf)"
            )
        if zarray is not None and list(zarray.get("shape", [])) != list(ref.shape):
            raise FormatError(
                f"output leaf {leaf.name!r}: array {ref.source!r} in {self.src.path} has shape "
                f"{tuple(zarray.get('shape', []))}, not {tuple(ref.shape)} as the tree says; re-read the checkpoint"
            )

    # -- metadata files -------------------------------------------------------

    def write_files(self, tmp: Path, dst: Path, *, sync: bool) -> None:
        """Writes Orbax's metadata files into `tmp`; the commit marker last."""
        if self.strings:
            _write_file(tmp / STRINGS_FILE, json.dumps(self.strings).encode())
        jax_leaves = [leaf for leaf in self.leaves if leaf.value_type == "jax.Array"]
        if jax_leaves:
            entries = []
            for leaf in jax_leaves:
                shape = list(leaf.value.shape)
                entries.append(
                    {
                        "array_metadata": {
                            "param_name": leaf.name,
                            "write_shape": leaf.write_shape
                            if leaf.write_shape is not None
                            else shape,
                            "chunk_shape": leaf.chunks,
                            "ext_metadata": leaf.ext_metadata,
                        }
                    }
                )
            (tmp / ARRAY_METADATAS_DIR).mkdir()
            data = json.dumps({"array_metadatas": entries}).encode()
            _write_file(tmp / ARRAY_METADATAS_DIR / "process_0", data)
            shardings = {
                _b64(leaf.name): leaf.sharding for leaf in jax_leaves if leaf.sharding is not None
            }
            _write_file(tmp / SHARDING_FILE, json.dumps(shardings).encode())
        metadata = {
            k: v
            for k, v in self.src.metadata.items()
            if k not in ("tree_metadata", "value_metadata_tree")
        }
        tree_metadata = {
            str(tuple(k for k, _ in leaf.keys)): leaf.metadata_entry() for leaf in self.leaves
        }
        metadata = {
            "tree_metadata": tree_metadata,
            **metadata,
            "use_ocdbt": True,
            # Every array keeps the source's zarr version (Orbax reads all of
            # an item's arrays with one driver).
            "use_zarr3": self.src.use_zarr3,
            # Chunks are copied as they are: a source that left out
            # fill-value chunks (older Orbax) gives an output that does too,
            # so the output must say so, or Orbax refuses the missing chunks.
            "store_array_data_equal_to_fill_value": self.src.raise_missing,
            "custom_metadata": self.src.metadata.get("custom_metadata"),
        }
        _write_file(tmp / METADATA_FILE, json.dumps(metadata).encode())
        checkpoint_metadata = (
            self.src.path / CHECKPOINT_METADATA_FILE if self.src.path is not None else None
        )
        if checkpoint_metadata is not None and checkpoint_metadata.exists():
            _write_file(tmp / CHECKPOINT_METADATA_FILE, checkpoint_metadata.read_bytes())
        if sync:
            _fsync_tree(tmp)
        # Last: Orbax's commit marker (`CommitFileTemporaryPath`); the rename
        # that follows is the marker for `AtomicRenameTemporaryPath`.
        _write_file(
            tmp / COMMIT_SUCCESS_FILE, f"Checkpoint commit was successful to {dst}".encode()
        )
        if sync:
            _fsync(tmp / COMMIT_SUCCESS_FILE)
            _fsync(tmp)


# --------------------------------------------------------------------------
# Chunk moving


def _copy_ops(leaf: _Leaf, source: str, zarray: dict[str, Any], nbytes: int) -> list[_ChunkOp]:
    """Ops that copy every chunk of `source` verbatim under `leaf`'s name."""
    keys = [_chunk_key(idx, zarray) for idx in _grid(zarray["shape"], _meta_chunks(zarray))]
    return _ops(leaf, [(f"{source}/{key}", key) for key in keys], zarray, zarray, nbytes)


def _stack_ops(
    leaf: _Leaf, value: Stack, zarrays: list[dict[str, Any]]
) -> tuple[dict[str, Any], list[_ChunkOp]] | None:
    """Chunk copies for a Stack, or None when the parts' layouts differ (or,
    zarr3, a codec depends on the chunk's shape)."""
    first = zarrays[0]
    if any(z != first for z in zarrays[1:]):
        return None
    axis = value.axis
    chunks = _meta_chunks(first)
    out = _reshaped(first, list(value.shape), lambda c: [*c[:axis], 1, *c[axis:]], axis, insert=True)
    if out is None:
        return None
    pairs = []
    for layer, part in enumerate(value.parts):
        for idx in _grid(first["shape"], chunks):
            out_idx = (*idx[:axis], layer, *idx[axis:])
            pairs.append((f"{part.source}/{_chunk_key(idx, first)}", _chunk_key(out_idx, out)))
    return out, _ops(leaf, pairs, out, first, value.nbytes)


def _slice_ops(
    leaf: _Leaf, value: Slice, zarray: dict[str, Any]
) -> tuple[dict[str, Any], list[_ChunkOp]] | None:
    """Chunk copies for a Slice, or None unless chunks are one layer thick (and,
    zarr3, no codec depends on the chunk's shape)."""
    axis = value.axis
    if _meta_chunks(zarray)[axis] != 1:
        return None
    shape = list(zarray["shape"])
    out = _reshaped(
        zarray, shape[:axis] + shape[axis + 1 :], lambda c: c[:axis] + c[axis + 1 :], axis,
        insert=False,
    )
    if out is None:
        return None
    pairs = []
    for idx in _grid(out["shape"], _meta_chunks(out)):
        src_idx = (*idx[:axis], value.index, *idx[axis:])
        pairs.append((f"{value.source.source}/{_chunk_key(src_idx, zarray)}", _chunk_key(idx, out)))
    return out, _ops(leaf, pairs, out, zarray, value.nbytes)


def _ops(
    leaf: _Leaf,
    pairs: list[tuple[str, str]],
    out_zarray: dict[str, Any],
    src_zarray: dict[str, Any],
    nbytes: int,
) -> list[_ChunkOp]:
    """`_ChunkOp`s for (source key, output chunk key) pairs of one leaf."""
    itemsize = np.dtype(_leaf_dtype(leaf.value)).itemsize
    cost = math.prod(_meta_chunks(out_zarray)) * itemsize
    n = len(pairs)
    # Split the leaf's bytes over its chunks so that progress sums exactly.
    return [
        _ChunkOp(
            src, f"{leaf.name}/{dst}", cost, nbytes * (i + 1) // n - nbytes * i // n, leaf.name,
            src_zarray,
        )
        for i, (src, dst) in enumerate(pairs)
    ]


def _grid(shape: list[int], chunks: list[int]) -> Iterator[tuple[int, ...]]:
    """Indices of all chunks of a zarr array, in C order."""
    counts = [math.ceil(s / c) if c else 0 for s, c in zip(shape, chunks)]
    return itertools.product(*(range(n) for n in counts))


def _is_zarr3(z: dict[str, Any]) -> bool:
    return z.get("zarr_format") == 3


def _meta_file(z: dict[str, Any]) -> str:
    """The metadata key of an array, under its name: ``.zarray`` or ``zarr.json``."""
    return ZARR3_FILE if _is_zarr3(z) else ZARR2_FILE


def _meta_chunks(z: dict[str, Any]) -> list[int]:
    """An array's chunk shape (zarr3: the outer chunks, i.e. shards)."""
    if _is_zarr3(z):
        return list(z["chunk_grid"]["configuration"]["chunk_shape"])
    return list(z["chunks"])


def _meta_dtype(z: dict[str, Any]) -> Any:
    """An array's dtype name as its metadata spells it."""
    return z.get("data_type") if _is_zarr3(z) else z.get("dtype")


def _chunk_key(idx: tuple[int, ...], zarray: dict[str, Any]) -> str:
    """Key of a chunk under its array's name.

    Zarr v2: indices joined by the separator; "0" if 0-d. Zarr v3, in the
    array's ``chunk_key_encoding``: "default" is ``c`` then the indices,
    joined by the separator ("/" unless said; ``c`` alone if 0-d); "v2" is
    zarr v2's ("." unless said).
    """
    if _is_zarr3(zarray):
        encoding = zarray["chunk_key_encoding"]
        conf = encoding.get("configuration") or {}
        if encoding["name"] == "v2":
            return conf.get("separator", ".").join(str(i) for i in idx) if idx else "0"
        return conf.get("separator", "/").join(["c", *(str(i) for i in idx)])
    if not idx:
        return "0"
    return zarray.get("dimension_separator", ".").join(str(i) for i in idx)


# zarr3 codecs whose encoding of a chunk does not depend on the chunk's shape
# (bytes-to-bytes codecs; "bytes" lays elements out in C order): a chunk
# moved under a shape with a length-1 axis more or less decodes to the same
# elements. "sharding_indexed" qualifies when its inner codecs do.
_SHAPELESS_CODECS = {"bytes", "zstd", "gzip", "blosc", "crc32c"}


def _reshaped(
    z: dict[str, Any],
    shape: list[int],
    edit: Callable[[list[int]], list[int]],
    axis: int,
    *,
    insert: bool,
) -> dict[str, Any] | None:
    """The metadata of `z` with a layer axis inserted or removed.

    ``edit`` maps a chunk shape to the output's (it inserts or removes the
    length-1 layer axis). Zarr v2: ``shape`` and ``chunks``. Zarr v3 also the
    chunk shape of every ``sharding_indexed`` codec (the inner chunk, which
    is one layer thick too) and ``dimension_names`` (unnamed for a new
    axis); None where a codec or a storage transformer might depend on the
    chunk's shape, so that the chunks cannot move as they are.
    """
    if not _is_zarr3(z):
        return dict(z, shape=shape, chunks=edit(list(z["chunks"])))

    def codecs(chain: Any) -> list[dict[str, Any]] | None:
        if not isinstance(chain, list):
            return None
        out = []
        for codec in chain:
            if not isinstance(codec, dict):
                return None
            name, conf = codec.get("name"), codec.get("configuration")
            if name == "sharding_indexed":
                if not isinstance(conf, dict) or not isinstance(conf.get("chunk_shape"), list):
                    return None
                inner = codecs(conf.get("codecs", []))
                index = codecs(conf.get("index_codecs", []))
                chunk = list(conf["chunk_shape"])
                if inner is None or index is None or (not insert and chunk[axis] != 1):
                    return None
                codec = {**codec, "configuration": {**conf, "chunk_shape": edit(chunk), "codecs": inner}}
            elif name not in _SHAPELESS_CODECS:
                return None
            out.append(codec)
        return out

    chain = codecs(z.get("codecs"))
    if chain is None or z.get("storage_transformers"):
        return None
    grid = z["chunk_grid"]
    out = dict(
        z,
        shape=shape,
        chunk_grid={**grid, "configuration": {**grid["configuration"], "chunk_shape": edit(_meta_chunks(z))}},
        codecs=chain,
    )
    names = z.get("dimension_names")
    if isinstance(names, list):
        out["dimension_names"] = [*names[:axis], None, *names[axis:]] if insert else (
            names[:axis] + names[axis + 1 :]
        )
    return out


def _batches(ops: Iterable[_ChunkOp]) -> Iterator[list[_ChunkOp]]:
    batch: list[_ChunkOp] = []
    size = 0
    for op in ops:
        if batch and (size + op.cost > _BATCH_BYTES or len(batch) >= _BATCH_OPS):
            yield batch
            batch, size = [], 0
        batch.append(op)
        size += op.cost
    if batch:
        yield batch


# --------------------------------------------------------------------------
# The output OCDBT store


class _Budget:
    """Admits jobs while the bytes they hold stay within a limit (one always)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> Any:
        async with self.cond:
            await self.cond.wait_for(lambda: self.used == 0 or self.used + nbytes <= self.limit)
            self.used += nbytes
        try:
            yield
        finally:
            async with self.cond:
                self.used -= nbytes
                self.cond.notify_all()


@dataclass
class _Lane:
    """One decode job's open transaction and the bytes it holds."""

    txn: ts.Transaction | None = None
    nbytes: int = 0

    def transaction(self) -> ts.Transaction:
        if self.txn is None:
            self.txn = ts.Transaction()
        return self.txn


class _Destination:
    """A new OCDBT store at an item directory's root, as Orbax configures it."""

    def __init__(
        self, path: Path, context: ts.Context, *, sync: bool, zarr3: bool = False,
        existing: bool = False,
    ) -> None:
        self.path = path
        self.context = context
        #: Decoded arrays are written as zarr v3 (the source's version).
        self.zarr3 = zarr3
        base = {"driver": "file", "path": str(path) + "/"}
        if existing:
            # A clone of the source's database (`orbax_clone`): its
            # configuration is the manifest's, and its data files are shared
            # with the source, so new files are written by the file kvstore's
            # default write-to-temporary-then-rename, never opened in place.
            self.spec: dict[str, Any] = {
                "driver": "ocdbt", "base": base, "cache_pool": "cache_pool#ocdbt",
            }
            self._init_rest(sync)
            return
        # Orbax's write spec (`tensorstore_utils._build_ocdbt_kvstore_tspec` +
        # `_add_ocdbt_write_options`): non-atomic data files, small values
        # inline in the B-tree, a single root node, a single-file manifest.
        self.spec = {
            "driver": "ocdbt",
            "base": {**base, "file_io_locking": {"mode": "non_atomic"}},
            "manifest": base,
            "config": {
                "max_inline_value_bytes": 1024,
                "max_decoded_node_bytes": 100_000_000,
                "manifest_kind": "single",
            },
            "assume_config": True,
            "target_data_file_size": 2**31,
            "cache_pool": "cache_pool#ocdbt",
        }
        self._init_rest(sync)

    def _init_rest(self, sync: bool) -> None:
        self.kv: ts.KvStore | None = None
        # Commits (zstd encoding, data file writes) run while the next slab is
        # decoded and sliced: at most `_INFLIGHT` at once, to bound memory.
        self.inflight: list[asyncio.Future[Any]] = []
        self.read_lock = asyncio.Lock()
        # With `sync`, data files finished by a commit are fsynced in a thread
        # while copying goes on: the OS would otherwise start writing them
        # back only when the final fsync asks for it, and wait there.
        self.sync_pool = concurrent.futures.ThreadPoolExecutor(1) if sync else None
        self.syncing: dict[str, concurrent.futures.Future[None]] = {}

    async def open(self) -> None:
        self.kv = await ts.KvStore.open(self.spec, context=self.context)

    def _start_writeback(self) -> None:
        """fsyncs, in the background, the data files of past commits."""
        data_dir = self.path / "d"
        if self.sync_pool is None or not data_dir.is_dir():
            return
        # No commit is in flight here, so every file in d/ is complete (OCDBT
        # never rewrites a data file).
        for entry in os.scandir(data_dir):
            if entry.name not in self.syncing:
                self.syncing[entry.name] = self.sync_pool.submit(_fsync, Path(entry.path))

    async def close(self) -> None:
        """Waits for commits still in flight (after an error or an interrupt:
        TensorStore's threads write files under the output whatever asyncio
        does, and the caller's clean-up needs a quiet folder), then for
        background fsyncs."""
        for future in self.inflight:
            await _settle(future)
        self.inflight.clear()
        if self.sync_pool is None:
            return
        try:
            for future in self.syncing.values():
                await asyncio.wrap_future(future)
        finally:
            self.sync_pool.shutdown(wait=True)

    async def copy_chunks(
        self,
        src_kv: ts.KvStore,
        src_path: Path,
        ops: list[_ChunkOp],
        values: dict[str, bytes],
        progress: Progress | None,
        *,
        missing_is_damage: bool = True,
    ) -> None:
        """Copies compressed chunks, one bounded transaction per batch.

        ``missing_is_damage``: the source stores every chunk (Orbax's
        ``store_array_data_equal_to_fill_value``), so a missing one is an error;
        otherwise a missing chunk is the fill value and stays missing.

        Reads of a batch run concurrently; the next batch is read while the
        previous one commits, so reading and writing overlap.
        """
        assert self.kv is not None
        pending: asyncio.Future[Any] | None = None
        pending_done = 0
        try:
            for batch in _batches(ops):
                txn = ts.Transaction()
                kv = self.kv.with_transaction(txn)

                async def copy(op: _ChunkOp, kv: ts.KvStore = kv) -> None:
                    if not op.src_key:
                        await kv.write(op.dst_key, values[op.dst_key])
                        return
                    try:
                        res = await src_kv.read(op.src_key)
                    except Exception as e:
                        raise FormatError(
                            f"{src_path}: cannot read chunk {op.src_key} (for leaf {op.leaf!r}): {e}. "
                            "The checkpoint looks incomplete or damaged: check that its save finished and that it was copied whole."
                        ) from e
                    # Orbax that stores every chunk (fill values included) refuses
                    # to read an array with one missing: it is damage, not zeros.
                    # Older Orbax left out all-fill chunks: a hole stays a hole.
                    if res.state != "value" and not missing_is_damage:
                        return
                    if res.state != "value":
                        raise FormatError(
                            f"{src_path}: chunk {op.src_key} of leaf {op.leaf!r} is missing, so "
                            "Orbax cannot read this array either. The checkpoint is incomplete: "
                            "check that its save finished and that it was copied whole."
                        )
                    damage = _chunk_damage(res.value, op)
                    if damage is not None:
                        raise FormatError(
                            f"{src_path}: chunk {op.src_key} of leaf {op.leaf!r} {damage}. "
                            "Copy the checkpoint again."
                        )
                    await kv.write(op.dst_key, res.value)

                await asyncio.gather(*(copy(op) for op in batch))
                if pending is not None:
                    await self._commit(pending, progress, pending_done)
                pending = asyncio.ensure_future(_await(txn.commit_async()))
                pending_done = sum(op.done for op in batch)
            if pending is not None:
                await self._commit(pending, progress, pending_done)
                pending = None
        finally:
            if pending is not None:
                await _settle(pending)  # see `close`

    async def _commit(self, future: Any, progress: Progress | None, done: int) -> None:
        try:
            await future
        except Exception as e:
            raise FormatError(f"{self.path}: writing the output failed: {e}") from e
        self._start_writeback()
        if progress is not None and done:
            progress(done)

    # -- decode path -----------------------------------------------------------

    async def create(
        self,
        lane: _Lane,
        leaf: _Leaf,
        shape: tuple[int, ...],
        dtype: np.dtype,
        layer_axis: int | None,
        chunks: list[int] | None = None,
    ) -> ts.TensorStore:
        """Creates an output zarr array (its .zarray or zarr.json goes in the
        transaction), in the leaf's cast dtype if it has one; ``chunks`` (the
        source's) where given, else whole (one layer thick on ``layer_axis``).
        zarr3 arrays take the codecs of the leaf's `template` (Orbax's own
        without one)."""
        assert self.kv is not None
        if leaf.cast is not None:
            dtype = leaf.cast
        if chunks is None or math.prod(chunks) * np.dtype(dtype).itemsize > _MAX_CHUNK_BYTES:
            chunks = _choose_chunks(shape, dtype, layer_axis)
        if self.zarr3:
            zarray = await _zarr3_metadata(
                leaf.template, list(shape), np.dtype(dtype), chunks, cast=leaf.cast is not None
            )
        else:
            zarray = dict(_zarr_template(dtype), shape=list(shape), chunks=chunks)
        leaf.chunks = chunks
        kv = self.kv.copy()
        kv.path = f"{leaf.name}/"
        await self.kv.with_transaction(lane.transaction()).write(
            f"{leaf.name}/{_meta_file(zarray)}", _zarray_bytes(zarray)
        )
        # assume_metadata: the array's metadata is the one written just above.
        spec = {
            "driver": "zarr3" if self.zarr3 else "zarr",
            "metadata": zarray,
            "store_data_equal_to_fill_value": True,
            "recheck_cached_data": False,
            "recheck_cached_metadata": False,
        }
        return await ts.open(
            spec, kvstore=kv, open=True, assume_metadata=True, context=self.context
        )

    async def put(
        self,
        lane: _Lane,
        leaf: _Leaf,
        arr: ts.TensorStore,
        index: tuple[Any, ...],
        data: np.ndarray,
        progress: Progress | None,
    ) -> None:
        """Writes ``arr[index] = data`` in the current transaction (cast to
        the leaf's dtype first, if it has one)."""
        if leaf.cast is not None:
            data = data.astype(leaf.cast)
        try:
            await arr.with_transaction(lane.transaction())[index].write(data)
        except Exception as e:
            raise FormatError(f"{self.path}: cannot write output leaf {leaf.name!r}: {e}") from e
        lane.nbytes += data.nbytes
        if lane.nbytes >= _BATCH_BYTES:
            await self.flush(lane, progress)

    async def flush(self, lane: _Lane, progress: Progress | None) -> None:
        """Starts committing the lane's transaction once fewer than `_INFLIGHT`
        commits are in flight. The wait comes first, and the caller holds its
        share of the decode budget through it: jobs whose data waits
        uncommitted are bounded by the budget, not by the number of leaves."""
        if lane.txn is None:
            return
        txn, done = lane.txn, lane.nbytes
        lane.txn, lane.nbytes = None, 0
        while len(self.inflight) >= _INFLIGHT:
            await self.inflight.pop(0)
        self.inflight.append(
            asyncio.ensure_future(self._commit(_await(txn.commit_async()), progress, done))
        )

    async def drain(self) -> None:
        """Waits for every commit."""
        try:
            while self.inflight:
                await self.inflight.pop(0)
        finally:
            for f in self.inflight:
                f.cancel()

    async def decode_job(self, src: _Source, job: _DecodeJob, progress: Progress | None) -> None:
        """Computes a job's output leaves by decoding source arrays, in a
        transaction lane of its own (jobs run concurrently)."""
        lane = _Lane()
        await self._decode_job(lane, src, job, progress)
        await self.flush(lane, progress)

    async def _decode_job(
        self, lane: _Lane, src: _Source, job: _DecodeJob, progress: Progress | None
    ) -> None:
        if job.kind == "value":
            leaf = job.leaves[0]
            value = leaf.value
            if isinstance(value, Deferred) and value.parts is not None:
                # Another format's stack: one layer in memory at a time, and
                # layer-thick chunks, so that unstacking it is a chunk copy.
                arr = await self.create(lane, leaf, value.shape, value.dtype, value.axis)
                lead = (slice(None),) * value.axis
                for layer, part in enumerate(value.parts):
                    data = np.asarray(part()).astype(value.dtype, copy=False)
                    await self.put(lane, leaf, arr, (*lead, layer), data, progress)
                    del data
                return
            data = np.asarray(value.read() if isinstance(value, Deferred) else value)
            arr = await self.create(lane, leaf, data.shape, data.dtype, None)
            await self.put(lane, leaf, arr, (), data, progress)
        elif job.kind == "ref":
            await self._decode_ref(lane, src, job.leaves[0], progress)
        elif job.kind == "stack":
            leaf = job.leaves[0]
            value: Stack = leaf.value
            arr = await self.create(lane, leaf, value.shape, value.dtype, value.axis)
            lead = (slice(None),) * value.axis
            for layer, part in enumerate(value.parts):
                # One part in memory at a time.
                data = (await src.read_region(part.source, ())).astype(value.dtype, copy=False)
                await self.put(lane, leaf, arr, (*lead, layer), data, progress)
        else:
            await self._decode_slices(lane, src, job, progress)

    async def _decode_ref(
        self, lane: _Lane, src: _Source, leaf: _Leaf, progress: Progress | None
    ) -> None:
        """Writes a Ref by decoding it one chunk-thick slab (on axis 0) at a
        time, in the source's chunk shape: memory holds one slab (the whole
        leaf only when it was saved as one chunk), and a cast leaf is cast
        slab by slab."""
        ref: Ref = leaf.value
        src_arr = await src.open_array(ref.source)
        shape = tuple(int(d) for d in src_arr.shape)
        # The stored chunks (zarr3: shards; zarr2 has read chunk = write chunk).
        read_chunk = src_arr.chunk_layout.write_chunk.shape
        chunks = (
            [int(c) for c in read_chunk]
            if read_chunk is not None and len(read_chunk) == len(shape) and all(read_chunk)
            else None
        )
        arr = await self.create(lane, leaf, shape, ref.dtype, None, chunks)
        if not shape or chunks is None or chunks[0] >= shape[0]:
            whole = await self._read(src, src_arr, ref.source, (), lock=False)
            await self.put(lane, leaf, arr, (), whole, progress)
            return
        for start in range(0, shape[0], chunks[0]):
            index = (slice(start, min(shape[0], start + chunks[0])),)
            slab = await self._read(src, src_arr, ref.source, index)
            await self.put(lane, leaf, arr, index, slab, progress)
            del slab

    async def _read(
        self, src: _Source, src_arr: ts.TensorStore, name: str, index: tuple[Any, ...],
        *, lock: bool = True,
    ) -> np.ndarray:
        """``src_arr[index]``; with ``lock``, one such slab decodes at a time."""
        try:
            async with self.read_lock if lock else contextlib.nullcontext():
                return np.asarray(await src_arr[index].read())
        except Exception as e:
            raise FormatError(
                f"{src.path}: cannot read array {name!r}: {e}. "
                "The checkpoint looks incomplete or damaged: check that its save finished and that it was copied whole."
            ) from e

    async def _stream_slices(
        self, lane: _Lane, src: _Source, job: _DecodeJob, progress: Progress | None
    ) -> bool:
        """`_decode_slices` by streaming a source saved as one zstd chunk
        (`_StreamPlan`); False where the chunk is absent and the source's fill
        value is what it holds (TensorStore then reads it, for nothing)."""
        plan = job.stream
        assert plan is not None
        first: Slice = job.leaves[0].value
        name, axis = first.source.source, first.axis
        by_index: dict[int, list[_Leaf]] = {}
        for leaf in job.leaves:
            by_index.setdefault(leaf.value.index, []).append(leaf)
        kv = await src.kvstore()

        def damage(what: str) -> FormatError:
            return FormatError(
                f"{src.path}: chunk {plan.key} of leaf {name!r} {what}. "
                "The checkpoint looks incomplete or damaged: check that its save finished and that it was copied whole."
            )

        try:
            found = await kv.read(plan.key, byte_range=slice(0, 0))
        except Exception as e:
            raise damage(f"cannot be read: {e}") from e
        if found.state != "value":
            if src.raise_missing:
                raise damage("is missing, so Orbax cannot read this array either")
            return False
        try:
            span = await self._stream_span(kv, plan)
        except zstd_stream.Damage as e:
            raise damage(str(e)) from e
        if span is None:
            return False  # a shard whose inner chunk is left out: the fill value
        start, size = span

        def fetch(a: int, b: int) -> Any:
            return kv.read(plan.key, byte_range=slice(a, b))

        shape, dtype, total = plan.shape, plan.dtype, math.prod(plan.shape) * plan.dtype.itemsize
        n = shape[axis]
        wanted = sorted(by_index)
        part_shape = shape[:axis] + shape[axis + 1 :]
        rows = math.prod(shape[:axis])
        piece = math.prod(shape[axis + 1 :])
        layer_bytes = rows * piece * dtype.itemsize
        per_pass = max(1, (plan.held - 2 * zstd_stream.BLOCK) // layer_bytes) if axis else n
        for g in range(0, len(wanted), per_pass):
            group = wanted[g : g + per_pass]
            stream = zstd_stream.Stream(
                zstd_stream.RangeSource(fetch, start, size), total, what=plan.what
            )
            try:
                if axis == 0:
                    scratch = None
                    for i in range(n):
                        if i not in by_index:
                            scratch = scratch if scratch is not None else np.empty(
                                min(layer_bytes, zstd_stream.BLOCK), np.uint8
                            )
                            await asyncio.to_thread(stream.skip, layer_bytes, scratch)
                            continue
                        part = np.empty(part_shape, dtype)
                        await asyncio.to_thread(stream.readinto, _raw(part))
                        for leaf in by_index[i]:
                            arr = await self.create(lane, leaf, part.shape, part.dtype, None)
                            await self.put(lane, leaf, arr, (), part, progress)
                        del part
                    await asyncio.to_thread(stream.finish)
                    continue
                outs = await asyncio.to_thread(_scatter_pass, stream, rows, n, piece, dtype, group)
            except zstd_stream.Damage as e:
                raise damage(str(e)) from e
            for i in group:
                part = outs.pop(i).reshape(part_shape)
                for leaf in by_index[i]:
                    arr = await self.create(lane, leaf, part.shape, part.dtype, None)
                    await self.put(lane, leaf, arr, (), part, progress)
                del part
        return True

    @staticmethod
    async def _stream_span(kv: ts.KvStore, plan: _StreamPlan) -> tuple[int, int] | None:
        """Where the zstd frames lie in the chunk's value: (start, size); None
        for a shard whose only inner chunk is left out."""
        if not plan.sharded:
            def read(a: int, b: int) -> bytes:
                return kv.read(plan.key, byte_range=slice(a, b)).result().value

            hint = math.prod(plan.shape) * plan.dtype.itemsize
            return 0, await asyncio.to_thread(zstd_stream.value_size, read, 0, hint)
        size = 16 + 4 * plan.index_crc
        try:
            index = (await kv.read(plan.key, byte_range=slice(-size, None))).value
        except ValueError as e:
            raise zstd_stream.Damage(
                f"is shorter than its shard index ({size} bytes): the file is truncated"
            ) from e
        if plan.index_crc and _crc32c(index[:16]) != int.from_bytes(index[16:], "little"):
            raise zstd_stream.Damage(
                "has a shard index whose checksum (crc32c) does not match: the file is truncated "
                "or overwritten"
            )
        offset, nbytes = (int(x) for x in np.frombuffer(index[:16], dtype="<u8"))
        if offset == _NO_CHUNK and nbytes == _NO_CHUNK:
            return None
        return offset, nbytes

    async def _decode_slices(
        self, lane: _Lane, src: _Source, job: _DecodeJob, progress: Progress | None
    ) -> None:
        """Writes Slices of one source, reading it one chunk-thick slab at a time.

        A slab is as thick as the source's chunks along the slice axis, so each
        source chunk is decoded once and memory holds one slab (the whole leaf
        when it was saved as one chunk), not the checkpoint.
        """
        if job.stream is not None and await self._stream_slices(lane, src, job, progress):
            return
        first: Slice = job.leaves[0].value
        name, axis = first.source.source, first.axis
        src_arr = await src.open_array(name)
        n = src_arr.shape[axis]
        thick = max(1, int(src_arr.chunk_layout.read_chunk.shape[axis] or 1))
        by_index: dict[int, list[_Leaf]] = {}
        for leaf in job.leaves:
            index = leaf.value.index
            if not 0 <= index < n:
                raise FormatError(
                    f"output leaf {leaf.name!r}: index {index} is out of range for {name!r} (length {n})"
                )
            by_index.setdefault(index, []).append(leaf)
        lead = (slice(None),) * axis
        for start in range(0, n, thick):
            wanted = [i for i in range(start, min(n, start + thick)) if i in by_index]
            if not wanted:
                continue
            try:
                # One slab decodes at a time (a decode briefly holds the
                # compressed and the decoded chunk); another job's layers are
                # encoded and written meanwhile.
                async with self.read_lock:
                    slab = np.asarray(
                        await src_arr[(*lead, slice(start, min(n, start + thick)))].read()
                    )
            except Exception as e:
                raise FormatError(f"{src.path}: cannot read array {name!r}: {e}") from e
            for i in wanted:
                part = np.take(slab, i - start, axis=axis)
                for leaf in by_index[i]:
                    arr = await self.create(lane, leaf, part.shape, part.dtype, None)
                    await self.put(lane, leaf, arr, (), part, progress)
            del slab


def _raw(a: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array, as a writable uint8 view (ml_dtypes'
    bfloat16 and float8 arrays export no buffer of their own)."""
    return a.reshape(-1).view(np.uint8)


def _scatter_pass(
    stream: zstd_stream.Stream, rows: int, n: int, piece: int, dtype: np.dtype, group: list[int]
) -> dict[int, np.ndarray]:
    """One pass over a stream of an array ``(rows, n, piece)`` (C order; the
    layer axis in the middle): layers ``group`` as ``(rows, piece)`` arrays.
    Rows are decoded a block of them at a time (one row's pieces one by one
    where a row is larger than a block)."""
    outs = {i: np.empty((rows, piece), dtype) for i in group}
    row_bytes = n * piece * dtype.itemsize
    if row_bytes <= zstd_stream.BLOCK:
        step = max(1, zstd_stream.BLOCK // row_bytes)
        buf = np.empty((min(step, rows), n, piece), dtype)
        for r in range(0, rows, step):
            k = min(step, rows - r)
            stream.readinto(_raw(buf[:k]))
            for i in group:
                outs[i][r : r + k] = buf[:k, i]
    else:
        scratch = np.empty(min(piece * dtype.itemsize, zstd_stream.BLOCK), np.uint8)
        for r in range(rows):
            for i in range(n):
                if i in outs:
                    stream.readinto(_raw(outs[i][r]))
                else:
                    stream.skip(piece * dtype.itemsize, scratch)
    stream.finish()
    return outs


# --------------------------------------------------------------------------
# Helpers


def _flatten(
    node: Any, keys: tuple[tuple[str, int], ...]
) -> Iterator[tuple[tuple[tuple[str, int], ...], Any]]:
    """(Orbax key path, leaf) pairs; empty containers and None are leaves."""
    if isinstance(node, LAZY):
        yield keys, node
    elif isinstance(node, Mapping):
        if not node:
            yield keys, node
        for k, v in node.items():
            yield from _flatten(v, (*keys, (str(k), _DICT)))
    elif isinstance(node, (list, tuple)):
        if not node:
            yield keys, node
        for i, v in enumerate(node):
            yield from _flatten(v, (*keys, (str(i), _SEQUENCE)))
    else:
        yield keys, node


def _refs(value: Any) -> list[Ref]:
    if isinstance(value, Ref):
        return [value]
    if isinstance(value, Stack):
        return list(value.parts)
    return [value.source]


def _leaf_dtype(value: Any) -> np.dtype:
    return np.dtype(value.dtype)


def _choose_chunks(shape: tuple[int, ...], dtype: np.dtype, layer_axis: int | None) -> list[int]:
    """Chunks for a decoded output: whole (one layer thick on `layer_axis`).

    Split further, like Orbax's `subchunking.choose_chunk_shape`, only where a
    chunk would exceed `_MAX_CHUNK_BYTES`: the largest dimension is divided by
    its smallest prime factor until it fits.
    """
    chunks = [max(1, int(d)) for d in shape]
    if layer_axis is not None:
        chunks[layer_axis] = 1
    itemsize = np.dtype(dtype).itemsize
    while math.prod(chunks) * itemsize > _MAX_CHUNK_BYTES:
        i = max(range(len(chunks)), key=lambda j: chunks[j])
        d = chunks[i]
        factor = next((f for f in range(2, math.isqrt(d) + 1) if d % f == 0), d)
        chunks[i] = d // factor if factor < d else math.ceil(d / 2)
    return chunks


_TEMPLATES: dict[str, dict[str, Any]] = {}


def _zarr_template(dtype: np.dtype) -> dict[str, Any]:
    """Zarr v2 metadata as Orbax writes it (zstd level 1), for one dtype.

    TensorStore itself encodes the dtype (e.g. "<f4", "bfloat16", "|i1") by
    creating a throwaway array in memory.
    """
    name = np.dtype(dtype).name
    if name not in _TEMPLATES:
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "memory"},
            "dtype": name,
            "metadata": {
                "shape": [1],
                "chunks": [1],
                "compressor": {"id": "zstd", "level": 1},
                "dimension_separator": ".",
            },
        }
        try:
            arr = ts.open(spec, create=True).result()
        except Exception as e:
            raise FormatError(
                f"cannot write arrays of dtype {name} to an Orbax checkpoint: {e}"
            ) from e
        _TEMPLATES[name] = arr.spec().to_json()["metadata"]
    return dict(_TEMPLATES[name])


# Orbax's zarr3 codecs (`tensorstore_utils._build_zarr3_metadata`, with
# compression): one inner chunk per shard, zstd at TensorStore's level 3.
_ORBAX_ZARR3_CODECS: list[dict[str, Any]] = [
    {
        "name": "sharding_indexed",
        "configuration": {
            "chunk_shape": [],
            "codecs": [
                {"name": "bytes", "configuration": {"endian": "little"}},
                {"name": "zstd", "configuration": {"level": 3, "checksum": False}},
            ],
            "index_codecs": [
                {"name": "bytes", "configuration": {"endian": "little"}},
                {"name": "crc32c"},
            ],
            "index_location": "end",
        },
    }
]


async def _zarr3_metadata(
    template: dict[str, Any] | None,
    shape: list[int],
    dtype: np.dtype,
    chunks: list[int],
    *,
    cast: bool,
) -> dict[str, Any]:
    """zarr3 metadata for a decoded output array, with `template`'s chunk key
    encoding and codecs (Orbax's without one).

    Every ``sharding_indexed`` codec gets ``chunks`` as its inner chunk shape
    (one inner chunk per shard, as Orbax writes them); an array-to-array codec
    (``transpose``) is kept only where the rank is the template's. The fill
    value is the template's unless the leaf is cast (then TensorStore's zero:
    every chunk is written, so it never shows). TensorStore itself completes
    and checks the result by creating the array in memory (it adds or drops
    the ``bytes`` codec's endianness for the dtype: a cast from float32 to
    int8 or back changes it).
    """
    source = template if template is not None else {
        "chunk_key_encoding": {"name": "default"}, "codecs": _ORBAX_ZARR3_CODECS
    }
    rank = len(template["shape"]) if template is not None else len(shape)

    def codecs(chain: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for codec in chain:
            name, conf = codec.get("name"), codec.get("configuration") or {}
            if name == "sharding_indexed":
                codec = {
                    **codec,
                    "configuration": {**conf, "chunk_shape": list(chunks), "codecs": codecs(conf.get("codecs", []))},
                }
            elif name not in _SHAPELESS_CODECS and rank != len(shape):
                continue
            out.append(codec)
        return out

    metadata: dict[str, Any] = {
        "zarr_format": 3,
        "node_type": "array",
        "shape": shape,
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": source.get("chunk_key_encoding", {"name": "default"}),
        "codecs": codecs(source["codecs"]),
    }
    if template is not None and not cast and "fill_value" in template:
        metadata["fill_value"] = template["fill_value"]
    try:
        arr = await ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "memory"}, "metadata": metadata}, create=True
        )
    except Exception as e:
        raise FormatError(
            f"cannot write a zarr3 array of dtype {dtype.name} with codecs "
            f"{json.dumps(metadata['codecs'])[:200]}: {e}"
        ) from e
    return arr.spec().to_json()["metadata"]


def _zarray_bytes(zarray: dict[str, Any]) -> bytes:
    # TensorStore's own formatting: compact, sorted keys.
    return json.dumps(zarray, sort_keys=True, separators=(",", ":")).encode()


def _edit_partition_spec(sharding: str | None, axis: int, *, insert: bool) -> str | None:
    """Adapts a serialized sharding to an added (or removed) layer axis.

    A NamedSharding's partition spec gets ``None`` (replicated) inserted at the
    layer axis for a stack, as ``nn.scan`` does, or loses that axis for a slice.
    Other shardings (SingleDeviceSharding) do not depend on the shape.
    """
    if sharding is None:
        return None
    try:
        data = json.loads(sharding)
    except ValueError:
        return None
    spec = data.get("partition_spec")
    if isinstance(spec, list):
        if insert and axis <= len(spec):
            spec.insert(axis, None)
        elif not insert and axis < len(spec):
            spec.pop(axis)
        return json.dumps(data)
    return sharding


def _b64(name: str) -> str:
    # Orbax's key in `_sharding` (`tensorstore_utils.get_sharding_tensorstore_spec`).
    return base64.urlsafe_b64encode(name.encode()).decode("utf-8")


def _check_item_dir(path: Path) -> None:
    if not path.is_dir():
        raise FormatError(f"{path}: not a directory; expected an Orbax checkpoint item directory")
    if not (path / METADATA_FILE).exists():
        raise FormatError(
            f"{path}: no {METADATA_FILE} file; not an Orbax PyTree checkpoint item "
            "(for a CheckpointManager step, pass its item directory, e.g. <step>/default)"
        )


def _read_json(path: Path, *, what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise FormatError(f"{path}: cannot read the {what}: {e}") from e


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _fsync(path: Path) -> None:
    """fsyncs one file or directory (a directory: its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsyncs every file and directory under `path`, TensorStore's files too."""
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def _chunk_damage(value: bytes, op: _ChunkOp) -> str | None:
    """What is wrong with a source chunk, from its bytes and its array's
    metadata, without decoding it; None if nothing can be seen."""
    z = op.meta
    if z is None:
        return None
    if not _is_zarr3(z):
        size = _zstd_content_size(value)
        if size is not None and size != op.cost:
            return (
                f"holds {size} bytes, but its .zarray (shape, chunks, dtype) says {op.cost}: "
                "the metadata does not describe the data"
            )
        return None
    itemsize = _zarr_dtype(z["data_type"], Path(), op.leaf).itemsize
    try:
        return _zarr3_damage(memoryview(value), z["codecs"], _meta_chunks(z), itemsize)
    except (KeyError, TypeError, ValueError, AttributeError):
        # A codec configuration this check does not know: TensorStore judges
        # it when the output is read, as it would the source.
        return None


async def _peek_damage(kv: ts.KvStore, op: _ChunkOp) -> str | None:
    """`_chunk_damage` for the clone engine, which never reads a chunk whole:
    the parts that the checks look at are read (a zstd frame's header, a
    shard's index and its last data byte), and only a chunk they find
    suspect is read whole, for `_chunk_damage`'s exact words. Layouts
    other than Orbax's (zarr2 + zstd, zarr3 one ``sharding_indexed`` codec of
    ``bytes`` + ``zstd`` with its index at the end) are not checked."""
    z = op.meta
    if z is None:
        return None
    try:
        suspect = await _peek_suspect(kv, op, z) if BYTE_RANGES else True
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        suspect = True  # a byte range outside the value: too short for what it says
    if not suspect:
        return None
    res = await kv.read(op.src_key)
    return _chunk_damage(res.value, op) if res.state == "value" else None


_ZSTD_HEADER = 18  # the longest frame header that still holds the content size


async def _peek_suspect(kv: ts.KvStore, op: _ChunkOp, z: dict[str, Any]) -> bool:
    async def head(start: int, nbytes: int) -> int | None:
        res = await kv.read(op.src_key, byte_range=slice(start, start + min(nbytes, _ZSTD_HEADER)))
        return _zstd_content_size(res.value)

    if not _is_zarr3(z):
        if (z.get("compressor") or {}).get("id") != "zstd":
            return False
        size = await head(0, _ZSTD_HEADER)
        return size is not None and size != op.cost
    codecs = z["codecs"]
    if [c["name"] for c in codecs] != ["sharding_indexed"]:
        return False
    conf = codecs[0].get("configuration", {})
    inner, shape = list(conf["chunk_shape"]), _meta_chunks(z)
    index_codecs = conf.get("index_codecs") or [{"name": "bytes"}, {"name": "crc32c"}]
    kinds = [c["name"] for c in index_codecs]
    inner_kinds = [c["name"] for c in conf.get("codecs", [])]
    if (
        kinds not in (["bytes"], ["bytes", "crc32c"])
        or (index_codecs[0].get("configuration") or {}).get("endian", "little") != "little"
        or conf.get("index_location", "end") != "end"
        or len(inner) != len(shape)
    ):
        return False
    n = math.prod(math.ceil(s / c) for s, c in zip(shape, inner))
    crc = kinds[-1] == "crc32c"
    size = 16 * n + 4 * crc
    index = (await kv.read(op.src_key, byte_range=slice(-size, None))).value
    if len(index) != size or (
        crc and _crc32c(index[: 16 * n]) != int.from_bytes(index[16 * n :], "little")
    ):
        return True
    entries = [
        (o, b) for o, b in np.frombuffer(index[: 16 * n], dtype="<u8").reshape(n, 2).tolist()
        if not (o == _NO_CHUNK and b == _NO_CHUNK)
    ]
    if not entries:
        return False
    end = max(o + b for o, b in entries) + size
    # The value holds its data and index: its byte end - 1 exists.
    await kv.read(op.src_key, byte_range=slice(end - 1, end))
    if inner_kinds != ["bytes", "zstd"]:
        return False
    itemsize = _zarr_dtype(z["data_type"], Path(), op.leaf).itemsize
    want = math.prod(inner) * itemsize
    for offset, nbytes in entries:
        got = await head(offset, nbytes)
        if got is not None and got != want:
            return True
    return False


def _zarr3_damage(
    value: memoryview, codecs: list[dict[str, Any]], shape: list[int], itemsize: int
) -> str | None:
    """`_chunk_damage` for one zarr3 chunk (or inner chunk of a shard) of
    ``shape``, encoded by ``codecs``.

    Checked: ``bytes`` alone (the size), ``bytes`` + ``zstd`` (the size the
    zstd frame declares, where the writer put it there), and
    ``sharding_indexed`` with Orbax's index codecs (``bytes`` little-endian,
    ``crc32c`` or not): the file holds its index, the index's checksum
    matches, every inner chunk it names lies inside the file (a truncated
    shard fails one of these) and is checked in turn. Anything else
    (``gzip``, ``blosc``, codecs after the sharding codec, big-endian
    indices) cannot be judged without decoding: None.
    """
    names = [c["name"] for c in codecs]
    if "sharding_indexed" in names:
        i = names.index("sharding_indexed")
        if i != len(names) - 1:
            return None  # the shard file is itself encoded again
        return _shard_damage(value, codecs[i].get("configuration", {}), shape, itemsize)
    if "bytes" not in names:
        return None
    rest = names[names.index("bytes") + 1 :]
    nbytes = math.prod(shape) * itemsize
    if not rest and len(value) != nbytes:
        return f"holds {len(value)} bytes, but its zarr.json (shape, chunks, data_type) says {nbytes}"
    if rest == ["zstd"]:
        size = _zstd_content_size(value)
        if size is not None and size != nbytes:
            return (
                f"holds {size} bytes, but its zarr.json (shape, chunks, data_type) says {nbytes}: "
                "the metadata does not describe the data"
            )
    return None


_NO_CHUNK = 2**64 - 1


def _shard_damage(
    value: memoryview, conf: dict[str, Any], shape: list[int], itemsize: int
) -> str | None:
    """`_zarr3_damage` of one ``sharding_indexed`` shard file (zarr v3 spec,
    sharding codec: an index of (offset, nbytes) uint64 pairs per inner chunk
    in C order, (2^64-1, 2^64-1) for an absent one, at the file's end unless
    ``index_location`` says "start")."""
    inner = list(conf["chunk_shape"])
    if len(inner) != len(shape) or min(inner, default=1) < 1:
        return f"is a shard of inner chunks {inner}, which do not fit its chunk shape {shape}"
    n = math.prod(math.ceil(s / c) for s, c in zip(shape, inner))
    index_codecs = conf.get("index_codecs") or [
        {"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}
    ]
    kinds = [c["name"] for c in index_codecs]
    endian = (index_codecs[0].get("configuration") or {}).get("endian", "little")
    if kinds not in (["bytes"], ["bytes", "crc32c"]) or endian != "little":
        return None
    crc = kinds[-1] == "crc32c"
    size = 16 * n + 4 * crc
    if len(value) < size:
        return (
            f"is {len(value)} bytes, shorter than its shard index ({size} bytes): the file is "
            "truncated"
        )
    at_end = conf.get("index_location", "end") != "start"
    index = value[len(value) - size :] if at_end else value[:size]
    if crc and _crc32c(index[: 16 * n]) != int.from_bytes(index[16 * n :], "little"):
        return (
            "has a shard index whose checksum (crc32c) does not match: the file is truncated "
            "or overwritten"
        )
    data_start, data_end = (0, len(value) - size) if at_end else (size, len(value))
    entries = np.frombuffer(index[: 16 * n], dtype="<u8").reshape(n, 2)
    for offset, nbytes in entries.tolist():
        if offset == _NO_CHUNK and nbytes == _NO_CHUNK:
            continue  # an inner chunk of fill values, left out
        if offset < data_start or offset + nbytes > data_end:
            return (
                f"has a shard index naming bytes {offset}..{offset + nbytes} of a "
                f"{len(value)}-byte file, outside its data: the file is truncated or overwritten"
            )
        damage = _zarr3_damage(value[offset : offset + nbytes], conf["codecs"], inner, itemsize)
        if damage is not None:
            return damage
    return None


_CRC32C_TABLE: list[int] = []


def _crc32c(data: memoryview | bytes) -> int:
    """CRC-32C (Castagnoli), as zarr3's ``crc32c`` codec computes it; for shard
    indices (16 bytes per inner chunk), so a table in Python is fast enough."""
    if not _CRC32C_TABLE:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            _CRC32C_TABLE.append(c)
    crc = 0xFFFFFFFF
    for b in bytes(data):
        crc = _CRC32C_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _zstd_content_size(frame: bytes) -> int | None:
    """The decompressed size a zstd frame's header declares, or None (no zstd
    frame, or a header without it). Checking it against the chunk size the
    ``.zarray`` implies catches metadata that lies, without decoding.

    Frame header (RFC 8878, 3.1.1): magic, descriptor (FCS flag bits 7-6,
    single-segment bit 5, dictionary-id flag bits 1-0), window byte unless
    single-segment, dictionary id (0/1/2/4 bytes), content size (0/1/2/4/8 bytes;
    the 2-byte form is offset by 256).
    """
    if len(frame) < 6 or frame[:4] != b"\x28\xb5\x2f\xfd":
        return None
    desc = frame[4]
    fcs_flag, single = desc >> 6, (desc >> 5) & 1
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[desc & 3]
    n = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if n == 0 or len(frame) < pos + n:
        return None
    size = int.from_bytes(frame[pos : pos + n], "little")
    return size + 256 if n == 2 else size


async def _settle(future: Any) -> None:
    """Wait for ``future`` to finish, whatever its outcome (clean-up paths)."""
    try:
        await asyncio.shield(future)
    except BaseException:  # its own failure, or this task cancelled again: done waiting
        pass


async def _await(future: Any) -> Any:
    return await future


def _run_here(coro: Any) -> Any:
    """`asyncio.run`, with SIGTERM (the CLI's handler raises `Terminated`)
    turned into a cancellation of the main task while the loop runs.

    A handler that raises lands wherever the loop happens to be: inside one
    task's step, that task ends with the exception while its siblings, the
    TensorStore futures they await and asyncio's clean-up are left to sort
    it out (seen: "Task exception was never retrieved" on stderr, and a
    process that hung instead of exiting 143). Cancelling the main task lets
    every ``finally`` and TensorStore future unwind in order, as asyncio's own
    SIGINT handling does; `Terminated` is raised once the loop has stopped.
    """
    terminated = False
    main: list[asyncio.Task] = []

    async def guarded() -> Any:
        main.append(asyncio.current_task())
        return await coro

    def on_term() -> None:
        nonlocal terminated
        terminated = True
        if main:
            main[0].cancel()

    own = threading.current_thread() is threading.main_thread() and callable(
        signal.getsignal(signal.SIGTERM))
    previous = signal.getsignal(signal.SIGTERM) if own else None
    with asyncio.Runner() as runner:
        if own:
            runner.get_loop().add_signal_handler(signal.SIGTERM, on_term)
        try:
            return runner.run(guarded())
        except asyncio.CancelledError:
            # Nothing here cancels the main task but SIGTERM (above) and
            # asyncio's own SIGINT handler; when Ctrl-C lands while tasks are
            # being cancelled, asyncio re-raises the CancelledError instead of
            # KeyboardInterrupt (asyncio.Runner checks task.uncancel() == 0).
            if terminated:
                raise Terminated() from None
            raise KeyboardInterrupt from None
        except KeyboardInterrupt:
            if terminated:
                raise Terminated() from None
            raise
        finally:
            if own:
                runner.get_loop().remove_signal_handler(signal.SIGTERM)
                signal.signal(signal.SIGTERM, previous)  # remove_ sets SIG_DFL


def _run(coro: Any) -> Any:
    """Runs a coroutine to completion, also from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_here(coro)
    # Called from async code (e.g. a notebook): use a private loop in a thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()

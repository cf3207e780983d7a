"""What the input's metadata says, checked: ``_METADATA``'s tree entries
(keys, key types, value types) and each array's zarr metadata (``.zarray``,
or zarr3 ``zarr.json``: dtype, shape, chunks, chunk keys). Nothing here reads
a file; the callers hand over what they read."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from ckptconv.errors import FormatError
from ckptconv.formats.msgpack_stream.dtypes import FLAX_DTYPES
from ckptconv.formats.orbax_stream.files import ZARR2_FILE, ZARR3_FILE

# Orbax's pytree key types (`orbax.checkpoint._src.metadata.tree.KeyType`).
_SEQUENCE = 1
_DICT = 2

# Chunks written on the decode path are at most this big, as Orbax's default
# OCDBT target data file size (`tensorstore_utils._DEFAULT_OCDBT_TARGET_DATA_FILE_SIZE`)
# caps the chunks it writes.
_MAX_CHUNK_BYTES = 2**31

_EMPTY_TYPES = {"None", "Dict", "List", "Tuple", "NamedTuple"}


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

"""Zarr metadata for the output's arrays: a moved array's, with a layer axis
inserted or removed (`_reshaped`); a decoded array's chunks (`_choose_chunks`)
and metadata (zarr2 as Orbax writes it, `_zarr_template`; zarr3 with the
source's codecs, `_zarr3_metadata`); the bytes TensorStore would write for it;
and a jax.Array's sharding adapted to the layer axis."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorstore as ts

from ckptconv.errors import FormatError
from ckptconv.formats.orbax_stream.metadata_read import _MAX_CHUNK_BYTES, _is_zarr3, _meta_chunks

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

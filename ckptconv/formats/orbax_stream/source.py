"""The input item directory, opened for reading (`_Source`; `_NoSource` for
an output with no Orbax input): its ``_METADATA`` parsed, its key-value store
(OCDBT, or pre-OCDBT directories), each array's zarr metadata, sharding and
TensorStore read spec; the TensorStore context every store is opened in; and
whether this TensorStore's kvstore reads byte ranges (`BYTE_RANGES`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from ckptconv import storage
from ckptconv.errors import FormatError
from ckptconv.formats.orbax_stream.files import (
    ARRAY_METADATAS_DIR,
    METADATA_FILE,
    OCDBT_MANIFEST,
    SHARDING_FILE,
    ZARR2_FILE,
    ZARR3_FILE,
    _b64,
    _check_item_dir,
    _read_json,
)
from ckptconv.formats.orbax_stream.metadata_read import _check_zarray, _parse_entry

#: Whether this TensorStore's ``KvStore.read`` reads byte ranges
#: (``byte_range=``): 0.1.86 does, 0.1.77 (the lowest tested) does not. Without
#: it the stream decode is off (TensorStore decodes such leaves whole) and the
#: clone's damage checks read each chunk whole. pybind11 functions have no
#: signature to inspect; their docstring lists the keywords.
BYTE_RANGES = "byte_range" in (getattr(ts.KvStore.read, "__doc__", None) or "")


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


def _base_spec(path: Any) -> dict[str, Any]:
    """The kvstore spec of a directory: TensorStore's ``file`` driver, or
    its ``gcs`` / ``s3`` driver for a bucket prefix (`ckptconv.storage`)."""
    if storage.is_bucket(path):
        return path.kvstore_spec()
    return {"driver": "file", "path": str(path) + "/"}


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
        base = _base_spec(self.path)
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

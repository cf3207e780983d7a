"""The read API: `read_lazy` (an item directory's tree as lazy leaves, from
its metadata alone), `read_lazy_with_orbax` (the same through Orbax's own
API, for layouts the fast reader does not know) and `read_array` (one array,
or a region of it)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ckptconv import storage
from ckptconv.errors import FormatError
from ckptconv.formats.orbax_stream.files import (
    METADATA_FILE,
    STRINGS_FILE,
    _check_item_dir,
    _read_json,
)
from ckptconv.formats.orbax_stream.metadata_read import (
    _DICT,
    _EMPTY_TYPES,
    _meta_dtype,
    _meta_file,
    _zarr_dtype,
)
from ckptconv.formats.orbax_stream.runner import _gather, _run
from ckptconv.formats.orbax_stream.source import _Source
from ckptconv.lazy import Ref


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
    path = storage.as_path(item_dir).absolute()
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
    zarrays = await _gather(*(src.zarr_meta(name) for name in arrays))
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


def read_lazy_with_orbax(item_dir: str | os.PathLike) -> Any:
    """`read_lazy` through Orbax's own metadata API (slower: imports Orbax and JAX)."""
    import orbax.checkpoint as ocp  # Heavy (imports jax); only needed here.
    from etils import epath

    if storage.is_bucket(item_dir):
        raise FormatError(
            f"{item_dir}: this checkpoint needs Orbax's own reader (it is not an OCDBT "
            "checkpoint, or holds leaf types ckptconv's reader does not know), and Orbax cannot "
            "read from buckets without gcsfs/s3fs. Copy it to local disk first "
            "(gcloud storage cp -r / aws s3 cp --recursive) and pass the local path."
        )
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
    src = _opened(storage.as_path(item_dir))
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

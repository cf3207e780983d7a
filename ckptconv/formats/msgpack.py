"""Flax msgpack checkpoints: ``flax.serialization.to_bytes`` files, including
``flax.training.checkpoints``' ``checkpoint_<step>`` files (recognised by
content), and Hugging Face sharded directories (``flax_model-0000K-of-0000N.msgpack``
shards with ``flax_model.msgpack.index.json``, recognised by the index).

A sharded directory reads as ONE tree, the shards' trees merged (as
``FlaxPreTrainedModel.from_pretrained`` merges them), and is written back in
the same layout; see `hf_index`. Its `Ref` sources are ``(shard file name,
spans)``, so one output shard may take bytes from several input shards.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptconv import lazy
from ckptconv.errors import FormatError
from ckptconv.formats import byteplan, hf_index, msgpack_stream
from ckptconv.formats.layout import Layout
from ckptconv.formats.msgpack_stream.parser import _open_mmap

NAME = "msgpack"
#: An OUT path with this suffix is written in this format unless told otherwise.
SUFFIX = ".msgpack"
STREAMS = True

# msgpack map headers (fixmap, map16, map32): flax writes a map at the top;
# array headers (fixarray, array16, array32) for msgpack_serialize of a list.
_MAP_HEADERS = set(range(0x80, 0xA0)) | {0xDC, 0xDD, 0xDE, 0xDF}


def _index(path: Path) -> Path | None:
    return hf_index.find_index(path, ".msgpack")


def _looks_safetensors(path: Path) -> bool:
    # A safetensors file starts with its header's length (8 bytes, little
    # endian), whose low byte may well be a msgpack map header: tell them apart
    # by the '{' that opens the header, after a length below 4 GiB (zero high
    # bytes, which no flax file has there: they would be inside its first key).
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and head[4:8] == b"\0\0\0\0"


def sniff(path: Path) -> str | None:
    if path.is_dir():
        if _index(path) is not None:
            return None
        return "a directory without flax_model.msgpack.index.json (not a Hugging Face sharded msgpack checkpoint)"
    if not path.is_file():
        return "not a file"
    with open(path, "rb") as f:
        head = f.read(1)
    if not head or head[0] not in _MAP_HEADERS:
        return "does not start with a msgpack map or array"
    if _looks_safetensors(path):
        return "starts with a safetensors header"
    return None


def describe(path: Path, step: int | None = None) -> Layout:
    if step is not None:
        raise FormatError(
            f"{path}: --step applies to Orbax CheckpointManager directories, "
            "not to a msgpack file."
        )
    return Layout(NAME, "item" if path.is_dir() else "file", path, items={"": path})


# --------------------------------------------------------------------------- sharded


def _flatten(tree: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """``flatten_dict``'s leaves: every non-mapping value (and empty mappings,
    which flatten_dict would drop, so that they survive), with their key paths."""
    if isinstance(tree, Mapping) and tree:
        out = []
        for k, v in tree.items():
            out.extend(_flatten(v, path + (k,)))
        return out
    return [(path, tree)]


def _key(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def _unflatten(items: list[tuple[tuple, Any]]) -> dict:
    root: dict = {}
    for path, value in items:
        node = root
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return root


def _with_shard(tree: Any, shard: str) -> Any:
    def wrap(ref: lazy.Ref) -> lazy.Ref:
        return lazy.Ref((shard, msgpack_stream.spans(ref)), ref.shape, ref.dtype)

    return lazy._map_lazy(tree, wrap)


def _read_sharded(item: Path) -> tuple[hf_index.Index, dict]:
    index = hf_index.read_index(_index(item))
    merged: dict = {}
    owner: dict[tuple, str] = {}
    for shard in index.shards:
        tree = _with_shard(msgpack_stream.read_lazy(item / shard), shard)
        if not isinstance(tree, Mapping):
            raise FormatError(f"{item / shard}: holds a {type(tree).__name__}, not a map of params.")
        have = set()
        for path, value in _flatten(tree):
            if path in owner:
                raise FormatError(
                    f"{item}: leaf '{_key(path)}' is in both '{owner[path]}' and '{shard}'; "
                    "the shards overlap, copy the checkpoint again."
                )
            owner[path] = shard
            have.add(_key(path))
            node = merged
            for k in path[:-1]:
                node = node.setdefault(k, {})
                if not isinstance(node, dict):
                    raise FormatError(
                        f"{item}: '{_key(path)}' in '{shard}' lies below a leaf of another shard."
                    )
            node[path[-1]] = value
        for key in index.keys_of(shard):
            if key not in have:
                raise hf_index.missing_leaf(index, shard, key)
    return index, merged


def _resolver(item: Path, maps: byteplan.FileMaps) -> byteplan.Resolver:
    def resolve(ref: lazy.Ref, path: list[Any]) -> tuple[Any, byteplan.Spans]:
        shard, sp = _sharded_source(ref)
        mm = maps.get(shard)
        byteplan.check_spans(sp, len(mm), str(item / shard), f"at '{_key(tuple(path))}'")
        return mm, sp

    return resolve


def _sharded_source(ref: lazy.Ref) -> tuple[str, byteplan.Spans]:
    src = ref.source
    if isinstance(src, tuple) and len(src) == 2 and isinstance(src[0], str):
        return src[0], src[1]
    raise FormatError(
        f"array source {src!r} is not a shard and byte spans; read the tree with "
        "ckptconv.formats.msgpack.read_lazy of the directory."
    )


def _write_sharded(item: Path, out_tree: Any, dst: Path, progress: Any, single: bool = False) -> None:
    index, in_tree = _read_sharded(item)
    sizes = {_key(p): getattr(v, "nbytes", 0) for p, v in _flatten(in_tree)}
    max_size = hf_index.largest_shard(index, sizes)
    if not isinstance(out_tree, Mapping):
        raise FormatError(f"cannot write '{dst}': a sharded checkpoint needs a map at the top.")
    flat = _flatten(out_tree)
    entries = [(_key(p), v, int(getattr(v, "nbytes", 0))) for p, v in flat]

    with byteplan.FileMaps(lambda name: _open_mmap(str(item / name), keep_fd=True)) as maps:
        resolve = _resolver(item, maps)

        def write_shard(members: list[int], file: Path) -> None:
            # As save_pretrained: to_bytes(unflatten_dict(shard, sep="/")), in order.
            shard_tree = _unflatten([flat[i] for i in members])
            msgpack_stream.write(
                None, shard_tree, file, progress=progress, sort_keys=False, resolve=resolve
            )

        if single:
            # OUT named as a file (flax_model.msgpack): the shards merged into
            # one, as save_pretrained writes a model under its max_shard_size.
            write_shard(list(range(len(flat))), dst)
            return
        hf_index.write_sharded(index, entries, dst, max_size, write_shard)


# --------------------------------------------------------------------------- protocol


def read_lazy(item: Path) -> Any:
    if Path(item).is_dir():
        return _read_sharded(Path(item))[1]
    return msgpack_stream.read_lazy(item)


def read_array(item: Path, ref: Any) -> Any:
    if Path(item).is_dir():
        shard, sp = _sharded_source(ref)
        mm = _open_mmap(os.fspath(Path(item) / shard))
        return msgpack_stream.read_array(mm, lazy.Ref(sp, ref.shape, ref.dtype))
    return msgpack_stream.read_array(item, ref)


def write(
    item: Path | None, out_tree: Any, dst: Path, progress: Any = None, fsync: bool = False,
    single: bool = False,
) -> None:
    """Write ``out_tree`` as msgpack at ``dst``, streaming from ``item``: a
    sharded directory ``item`` gives a sharded directory in its layout, or
    with ``single`` (OUT named ``*.msgpack``) one file."""
    if item is not None and Path(item).is_dir():
        _write_sharded(Path(item), out_tree, Path(dst), progress, single)
        return
    if item is None:  # another format's tree (Orbax, safetensors)
        out_tree = _flax_state(out_tree)
    # Keep the input file's key order (as to_bytes writes it), so round trips
    # give the input back byte for byte.
    msgpack_stream.write(item, out_tree, dst, progress=progress, sort_keys=False)


def _flax_state(node: Any, in_sequence: bool = False) -> Any:
    """Another format's tree in the form ``flax.serialization.to_bytes``
    writes, so that ``from_bytes(target, ...)`` loads it: lists and tuples
    (an optax chain's state, as Orbax keeps it) become ``{"0": ..., "1": ...}``
    maps, and an empty node in a sequence (optax's ``EmptyState()``, which
    Orbax stores as None) becomes ``{}``. A None in a dict stays None, as
    flax keeps it."""
    if node is None:
        return {} if in_sequence else None
    if isinstance(node, Mapping):
        return {k: _flax_state(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return {str(i): _flax_state(v, True) for i, v in enumerate(node)}
    return node


def load(path: Path, step: int | None = None) -> Any:
    describe(path, step)
    if path.is_dir():
        return lazy.materialize(read_lazy(path), lambda ref: read_array(path, ref).copy())
    return msgpack_stream.load(path)


def save(tree: Any, path: Path) -> None:
    """Write ``tree`` as one msgpack file (``flax.serialization.msgpack_serialize``)."""
    from flax import serialization

    # Plain dicts are written as they are (lists stay msgpack arrays); objects
    # such as a TrainState go through their flax state dict, as to_bytes does.
    state = tree if isinstance(tree, dict) else serialization.to_state_dict(tree)
    data = serialization.msgpack_serialize(state)
    with open(path, "wb") as f:
        f.write(data)

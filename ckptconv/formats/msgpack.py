"""Flax msgpack checkpoints: ``flax.serialization.to_bytes`` files, including
``flax.training.checkpoints``' ``checkpoint_<step>`` files. Recognised by content."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptconv.errors import FormatError
from ckptconv.formats import msgpack_stream
from ckptconv.formats.layout import Layout

NAME = "msgpack"

# msgpack map headers (fixmap, map16, map32): flax writes a map at the top;
# array headers (fixarray, array16, array32) for msgpack_serialize of a list.
_MAP_HEADERS = set(range(0x80, 0xA0)) | {0xDC, 0xDD, 0xDE, 0xDF}


def sniff(path: Path) -> str | None:
    if not path.is_file():
        return "not a file"
    with open(path, "rb") as f:
        head = f.read(1)
    if not head or head[0] not in _MAP_HEADERS:
        return "does not start with a msgpack map or array"
    return None


def describe(path: Path, step: int | None = None) -> Layout:
    if step is not None:
        raise FormatError(
            f"{path}: --step applies to Orbax CheckpointManager directories, "
            "not to a msgpack file."
        )
    return Layout(NAME, "file", path, items={"": path})


def read_lazy(item: Path) -> Any:
    return msgpack_stream.read_lazy(item)


def read_array(item: Path, ref: Any) -> Any:
    return msgpack_stream.read_array(item, ref)


def write(item: Path, out_tree: Any, dst: Path, progress: Any = None, fsync: bool = False) -> None:
    # Keep the input file's key order (as to_bytes writes it), so round trips
    # give the input back byte for byte.
    msgpack_stream.write(item, out_tree, dst, progress=progress, sort_keys=False)


def load(path: Path, step: int | None = None) -> Any:
    describe(path, step)
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

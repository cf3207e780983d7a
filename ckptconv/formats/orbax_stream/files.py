"""The files of an Orbax item directory: their names (``_METADATA``,
``_sharding``, the commit marker, the zarr metadata keys, the unfinished-save
suffix), and the helpers that read, write and fsync files."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from ckptconv.errors import FormatError

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
# TensorStore's transient file lock beside a file it writes (file_io_locking).
LOCK_SUFFIX = ".__lock"


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
    if not isinstance(path, Path):  # a bucket object (`ckptconv.storage.BucketPath`)
        path.write_bytes(data)
        return
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
            if not name.endswith(LOCK_SUFFIX):  # transient, may vanish
                _fsync(Path(root) / name)
        _fsync(Path(root))

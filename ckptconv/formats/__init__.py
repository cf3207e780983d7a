"""Checkpoint formats, each a small module behind one protocol.

A format module provides:

- ``NAME``: its name on the command line (``msgpack``, ``orbax``, ``safetensors``);
- optionally ``SUFFIX``: an output path ending so is written in this format
  when no format is asked for (`for_output`);
- ``sniff(path) -> str | None``: ``None`` when it reads ``path``, else why not
  (shown when no format accepts a path);
- ``describe(path, step) -> Layout``: what is at ``path``, without reading data;
- ``load(path, step) -> tree`` and ``save(tree, path)``: in memory;
- ``read_lazy(item) -> tree``, ``read_array(item, ref)`` and
  ``write(item, out_tree, dst, progress, fsync)``: the streaming engine, on
  lazy leaves (`ckptconv.lazy`);
- optionally ``read_region(item, ref, index)``: ``array[index]`` reading only
  what the region touches (`ckptconv.restore` reads each device's part);
  without it, the part is sliced out of ``read_array`` (a memory-map view);
- ``STREAMS = True`` where ``write(None, tree, dst, progress)`` takes
  `ckptconv.lazy.Deferred` leaves (another format's, read one at a time).

A new format is one module and one line in `FORMATS`.

Only these modules import Orbax or ``flax.serialization``.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from ckptconv import storage
from ckptconv.errors import FormatError
from ckptconv.formats import msgpack, orbax, safetensors

FORMATS: dict[str, ModuleType] = {"msgpack": msgpack, "orbax": orbax, "safetensors": safetensors}


def get(name: str) -> ModuleType:
    """The format module called ``name``."""
    try:
        return FORMATS[name]
    except KeyError:
        raise FormatError(
            f"unknown format {name!r}; choose one of: {', '.join(FORMATS)}."
        ) from None


def for_output(path: str | Path) -> str | None:
    """The format an output path's name asks for (``model.msgpack``:
    ``msgpack``), or ``None`` when its name says nothing (a directory)."""
    name = str(path).rstrip("/")
    for fmt_name, module in FORMATS.items():
        suffix = getattr(module, "SUFFIX", None)
        if suffix and name.endswith(suffix):
            return fmt_name
    return None


def detect(path: str | Path) -> ModuleType:
    """The format module that reads ``path``, judged by content and layout.

    Raises:
      FormatError: ``path`` is missing, or no format reads it (the message
        says why each format refused it).
    """
    path = storage.as_path(path)
    if storage.is_bucket(path):
        return _detect_bucket(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or directory; check the path (relative paths start from {Path.cwd()}).")
    if path.is_file() and path.stat().st_size == 0:
        raise FormatError(
            f"{path}: an empty file (0 bytes), not a checkpoint; it may be a save that never "
            "finished: write it again."
        )
    if path.is_file():
        from ckptconv.formats import hf_index

        hf_index.refuse_part(path)
    reasons = []
    for name, module in FORMATS.items():
        why = module.sniff(path)
        if why is None:
            return module
        reasons.append(f"{name}: {why}")
    if path.is_dir():
        # An unsharded save_pretrained directory: its weights are one file.
        for weights in ("flax_model.msgpack", "model.safetensors"):
            if (path / weights).is_file():
                raise FormatError(
                    f"{path}: a Hugging Face model directory with one weights file; pass that "
                    f"file: {path / weights} (OUT is then one file: name it {weights} in a folder "
                    "holding a copy of config.json, for from_pretrained)."
                )
    raise FormatError(
        f"{path}: not a checkpoint ckptconv can read ("
        + "; ".join(reasons)
        + "). Pass a flax msgpack file, an Orbax checkpoint directory (or a CheckpointManager "
        "directory), a safetensors file, or a Hugging Face directory with "
        "flax_model.msgpack.index.json or model.safetensors.index.json."
    )


#: What to say about a file format on a bucket.
BUCKET_ONLY_ORBAX = (
    "bucket paths (gs://, s3://) are supported for Orbax checkpoints only; for a flax "
    "msgpack or safetensors file (or a Hugging Face directory of them), copy it to local "
    "disk first (gcloud storage cp / aws s3 cp) and pass the local path"
)


def _detect_bucket(path: storage.BucketPath) -> ModuleType:
    """On a bucket only Orbax checkpoints are read (`ckptconv.storage`)."""
    if not path.exists():
        raise FormatError(
            f"{path}: nothing is stored under this path in bucket {path.bucket} (no object "
            "has this key or starts with it); check the path."
        )
    if path.is_file() and not path.is_dir():
        raise FormatError(f"{path}: a single object, not an Orbax checkpoint directory: "
                          f"{BUCKET_ONLY_ORBAX}.")
    why = orbax.sniff(path)
    if why is None:
        return orbax
    names = [k.rsplit("/", 1)[-1] for k in path.keys()]
    if any(n.endswith((".msgpack", ".safetensors", ".index.json")) for n in names):
        raise FormatError(f"{path}: not an Orbax checkpoint (it holds msgpack or safetensors "
                          f"files): {BUCKET_ONLY_ORBAX}.")
    raise FormatError(f"{path}: not an Orbax checkpoint ({why}); {BUCKET_ONLY_ORBAX}.")

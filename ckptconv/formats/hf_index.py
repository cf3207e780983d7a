"""Hugging Face sharded checkpoint directories: the index and the shard plan.

``save_pretrained`` of a model above its ``max_shard_size`` writes shards named
``<stem>-0000K-of-0000N<ext>`` (``flax_model-00001-of-00003.msgpack``,
``model-00001-of-00003.safetensors``) and an index ``<stem><ext>.index.json``::

    {"metadata": {"total_size": <sum of the arrays' bytes>},
     "weight_map": {"<leaf path>": "<shard file>", ...}}

written with ``json.dumps(index, indent=2, sort_keys=True) + "\\n"``; leaf paths
are ``/``-joined for Flax msgpack and ``.``-joined for safetensors. Shards are
filled greedily in the order of the leaves (``flax_shard_checkpoint``): a leaf
that would take the current shard over the limit starts a new one, so a leaf
bigger than the limit sits alone in its own shard.

Both formats (`msgpack`, `safetensors`) read such a directory as one tree and
write one with `write_sharded`, keeping the layout: shards no larger than the
input's largest (counted as HF counts them: array bytes), the HF names, a new
index, and every other file (``config.json`` …) copied unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptconv.errors import FormatError

INDEX_SUFFIX = ".index.json"


@dataclass(frozen=True)
class Index:
    """A parsed ``*.index.json``.

    Attributes:
      file: the index file.
      weights_name: its name without ``.index.json`` (``flax_model.msgpack``):
        what shards are named after.
      weight_map: leaf path -> shard file name, in the file's order.
      metadata: the index's ``metadata`` (``total_size`` …).
      extra: any other top-level keys, kept on output.
    """

    file: Path
    weights_name: str
    weight_map: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return self.file.parent

    @property
    def shards(self) -> list[str]:
        """The shard files, in name order (``-00001-of-…`` first)."""
        return sorted(set(self.weight_map.values()))

    def keys_of(self, shard: str) -> list[str]:
        return [k for k, v in self.weight_map.items() if v == shard]


def find_index(path: Path, ext: str) -> Path | None:
    """The index for shards ending in ``ext`` in directory ``path``, if any.

    The standard name (``flax_model.msgpack.index.json``,
    ``model.safetensors.index.json``) first; else the only ``*<ext>.index.json``.
    """
    if not path.is_dir():
        return None
    standard = {".msgpack": "flax_model.msgpack", ".safetensors": "model.safetensors"}[ext]
    if (path / (standard + INDEX_SUFFIX)).is_file():
        return path / (standard + INDEX_SUFFIX)
    found = sorted(p for p in path.glob(f"*{ext}{INDEX_SUFFIX}") if p.is_file())
    return found[0] if len(found) == 1 else None


def read_index(file: Path) -> Index:
    """Read and check an index: every shard it names must exist beside it.

    Raises:
      FormatError: unreadable or malformed JSON, a shard name that is not a
        plain file name, or a shard missing from disk.
    """
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{file}: not a readable index ({e}); copy the checkpoint again.") from e
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in wm.items()
    ):
        raise FormatError(
            f"{file}: has no \"weight_map\" of leaf names to shard files; "
            "it is not a Hugging Face checkpoint index."
        )
    meta = data.get("metadata") or {}
    if not isinstance(meta, dict):
        raise FormatError(f"{file}: \"metadata\" is {type(meta).__name__}, not a JSON object.")
    index = Index(
        file,
        file.name[: -len(INDEX_SUFFIX)],
        wm,
        meta,
        {k: v for k, v in data.items() if k not in ("weight_map", "metadata")},
    )
    for shard in index.shards:
        if shard in ("", ".", "..") or "/" in shard or "\\" in shard:
            raise FormatError(
                f"{file}: shard {shard!r} is not a file name in {file.parent}; "
                "ckptconv reads shards beside the index only."
            )
        try:
            exists = (file.parent / shard).is_file()
        except (OSError, ValueError) as e:  # a name too long, a NUL byte ...
            raise FormatError(
                f"{file}: shard {shard[:80]!r} is not a usable file name "
                f"({getattr(e, 'strerror', None) or e}); the index is damaged, copy the checkpoint again."
            ) from None
        if not exists:
            keys = index.keys_of(shard)
            raise FormatError(
                f"{file.parent}: shard '{shard}' listed in {file.name} is missing "
                f"({len(keys)} leaves, e.g. '{keys[0]}'); copy the whole directory again."
            )
    return index


def missing_leaf(index: Index, shard: str, key: str) -> FormatError:
    """The error for a leaf the index maps to ``shard`` but the shard lacks."""
    return FormatError(
        f"{index.directory / shard}: leaf '{key}' is listed in {index.file.name} but "
        "missing from this shard; the shard and the index do not match (an interrupted "
        "copy or save?); copy the whole directory again."
    )


def shard_name(weights_name: str, k: int, n: int) -> str:
    """HF's name of shard ``k`` (from 1) of ``n``: ``flax_model-00001-of-00003.msgpack``."""
    stem, dot, ext = weights_name.rpartition(".")
    return f"{stem}-{k:05d}-of-{n:05d}{dot}{ext}"


def plan_shards(sizes: list[int], max_size: int) -> list[list[int]]:
    """Greedy shards of leaf indices, as ``flax_shard_checkpoint`` fills them.

    A leaf that would take the current shard over ``max_size`` starts a new
    one, so a leaf above ``max_size`` is alone in its shard. Unlike HF, no
    empty shard is made when the very first leaf is above the limit.
    """
    shards: list[list[int]] = [[]]
    current = 0
    for i, n in enumerate(sizes):
        if shards[-1] and current + n > max_size:
            shards.append([])
            current = 0
        shards[-1].append(i)
        current += n
    return shards


def largest_shard(index: Index, sizes: dict[str, int]) -> int:
    """The largest input shard, in array bytes (HF's measure for ``max_shard_size``)."""
    per: dict[str, int] = {}
    for key, shard in index.weight_map.items():
        per[shard] = per.get(shard, 0) + sizes.get(key, 0)
    return max(per.values(), default=0)


def parse_shard_name(name: str) -> tuple[str, int, int] | None:
    """``flax_model-00002-of-00011.msgpack`` -> ("flax_model.msgpack", 2, 11)
    (the inverse of `shard_name`), or None for another name."""
    m = re.fullmatch(r"(.+)-(\d{5})-of-(\d{5})(\.[^.]+)", name)
    return (m.group(1) + m.group(4), int(m.group(2)), int(m.group(3))) if m else None


def stale_shard(index: Index, name: str) -> bool:
    """Whether ``name`` looks like a shard of this checkpoint (listed or not)."""
    parsed = parse_shard_name(name)
    return parsed is not None and parsed[0] == index.weights_name


def refuse_part(path: Path) -> None:
    """Raise if the file ``path`` is a sharded directory's index, or one of its
    shards with the index beside it: the checkpoint is the folder (a trial's
    shard 3 of 11 was converted alone, exit 0, into a partial checkpoint; the
    index got "not a checkpoint")."""
    folder = path.absolute().parent
    if path.name.endswith(INDEX_SUFFIX):
        raise FormatError(
            f"{path}: the index of a Hugging Face sharded checkpoint; pass its folder: {folder}"
        )
    parsed = parse_shard_name(path.name)
    if parsed is not None and (folder / (parsed[0] + INDEX_SUFFIX)).is_file():
        weights, k, n = parsed
        raise FormatError(
            f"{path}: shard {k} of {n} of the Hugging Face sharded checkpoint in {folder} "
            f"({weights + INDEX_SUFFIX}); one shard holds a part of the model: pass the folder: "
            f"{folder}"
        )


def write_sharded(
    index: Index,
    entries: list[tuple[str, Any, int]],
    dst: Path,
    max_size: int,
    write_shard: Callable[[list[int], Path], None],
) -> dict[str, Any]:
    """Write a sharded directory at ``dst`` in ``index``'s layout.

    Args:
      index: the input's index (names, metadata, the files to copy).
      entries: ``(key, leaf, nbytes)`` of every output leaf, in order.
      dst: the directory to create.
      max_size: the largest a shard may grow (array bytes).
      write_shard: ``write_shard(entry indices, file)`` writes one shard.

    Returns:
      The index written.
    """
    keys = [k for k, _, _ in entries]
    seen: set[str] = set()
    for k in keys:
        if k in seen:
            raise FormatError(
                f"cannot write '{dst}': two leaves are both named '{k}' in the index; "
                "rename one of them."
            )
        seen.add(k)
    plan = plan_shards([n for _, _, n in entries], max_size)
    dst.mkdir()
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(plan, 1):
        name = shard_name(index.weights_name, k, len(plan))
        write_shard(shard, dst / name)
        weight_map.update((keys[i], name) for i in shard)
    out = dict(index.extra)
    out["metadata"] = {**index.metadata, "total_size": sum(n for _, _, n in entries)}
    out["weight_map"] = weight_map
    (dst / index.file.name).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    listed = set(index.weight_map.values())
    for p in sorted(index.directory.iterdir()):
        if p.name == index.file.name or p.name in listed or stale_shard(index, p.name):
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name, symlinks=True)
        else:
            shutil.copy2(p, dst / p.name, follow_symlinks=False)  # links stay links, as cp -r
    return out

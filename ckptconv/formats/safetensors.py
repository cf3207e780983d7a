"""safetensors files, and Hugging Face directories of them (``model.safetensors.index.json``).

A safetensors file is an 8-byte little-endian header length, a JSON header
(space-padded so the data starts 8-byte aligned), then the raw little-endian,
C-order bytes of every tensor; ``data_offsets`` are relative to the data start
and, sorted, cover the data exactly, without gaps or overlaps. The header maps
each tensor's flat name to ``{"dtype", "shape", "data_offsets"}``, plus an
optional ``__metadata__`` of strings, which is kept on output.

Flat names are split on ``.`` into a tree (``model.layers.0.mlp.kernel`` is
``{"model": {"layers": {"0": {"mlp": {"kernel": …}}}}}``), so HF's
``layers.{i}`` collections are digit-keyed lists that to-scan stacks in place;
output names are the tree's keys joined with ``.``. A name that is both a leaf
and a prefix of another (``a`` and ``a.b``) cannot be such a tree, and is an
error naming both.

Reading maps the file and parses the header only (`read_header`); writing
computes every output leaf's shape and dtype from the lazy tree, writes the
header, then each leaf's bytes through `byteplan` (zero-copy from the input
mappings where they are contiguous). A sharded directory reads as one tree and
is written in the same layout (see `hf_index`).
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ckptconv import lazy
from ckptconv.errors import FormatError
from ckptconv.formats import byteplan, hf_index
from ckptconv.formats.layout import Layout
from ckptconv.formats.msgpack_stream.dtypes import DtypeTable

NAME = "safetensors"
#: An OUT path with this suffix is written in this format unless told otherwise.
SUFFIX = ".safetensors"
STREAMS = True

# safetensors dtype names and their numpy types; a str names an ml_dtypes type.
_TYPES = [
    ("BOOL", np.bool_),
    ("U8", np.uint8),
    ("I8", np.int8),
    ("U16", np.uint16),
    ("I16", np.int16),
    ("U32", np.uint32),
    ("I32", np.int32),
    ("U64", np.uint64),
    ("I64", np.int64),
    ("F16", np.float16),
    ("BF16", "bfloat16"),
    ("F32", np.float32),
    ("F64", np.float64),
    ("C64", np.complex64),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),
]


def _dtypes(ml: Any) -> dict[str, np.dtype]:
    return {
        name: np.dtype(getattr(ml, t) if isinstance(t, str) else t)
        for name, t in _TYPES
        if ml is not None or not isinstance(t, str)
    }


#: safetensors dtype names and their numpy dtypes (ml_dtypes' loaded on first
#: need, see `DtypeTable`). The packed sub-byte types (F4, F6_*) have no
#: byte-per-element numpy dtype and are refused.
DTYPES: Mapping[str, np.dtype] = DtypeTable(_dtypes)
_NAMES: Mapping[np.dtype, str] = DtypeTable(lambda ml: {v: k for k, v in _dtypes(ml).items()})
# The safetensors library refuses headers above this size; so does ckptconv,
# before reading (or allocating) any of it.
MAX_HEADER = 100_000_000
_META = "__metadata__"
_INDEX = ".safetensors"
_ADVICE = "The file may be truncated or damaged; copy or save it again."


@dataclass(frozen=True)
class Tensor:
    """One header entry: ``begin``/``end`` are absolute byte offsets in the file."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A checked safetensors header.

    Attributes:
      tensors: the entries in the header's order.
      metadata: ``__metadata__`` (None when absent).
      data_start: where the data begins (8 + the header length).
      size: the file's size.
    """

    tensors: list[Tensor]
    metadata: dict[str, str] | None
    data_start: int
    size: int


def _bad(path: Any, what: str) -> FormatError:
    return FormatError(f"{path}: not a valid safetensors file: {what}. {_ADVICE}")


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the name {k!r} appears twice")
        out[k] = v
    return out


def read_header(path: str | os.PathLike[str]) -> Header:
    """Reads and checks the header of a safetensors file, and nothing else.

    Hand-written rather than ``safetensors.safe_open``: the library does not
    give the byte offsets of the tensors, which the streaming writer needs to
    copy, stack and slice them straight from a memory map (across shards)
    without reading them, and its numpy reader cannot return BF16 or F8
    arrays. This reads 8 bytes plus the header, applies the library's checks
    (header size limit, known dtypes, shapes matching ``data_offsets``,
    offsets contiguous from 0 and covering the data exactly, no trailing
    bytes) and gives a precise message for each. A length field claiming
    more than the file holds is refused before anything is allocated.

    Raises:
      FormatError: the file cannot be read, or the header is not valid.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise _bad(path, f"the file is {size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                raise _bad(
                    path,
                    f"the header length field says {n} bytes but only {size - 8} bytes follow it",
                )
            if n > MAX_HEADER:
                raise _bad(path, f"the header is {n} bytes, more than safetensors allows ({MAX_HEADER})")
            raw = f.read(n)
    except FormatError:
        raise
    except OSError as e:
        raise FormatError(
            f"cannot read '{path}': {e.strerror or e}. Check the path and its permissions."
        ) from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _bad(path, f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object")
    meta = header.pop(_META, None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise _bad(path, "__metadata__ is not a map of strings to strings")
    start = 8 + n
    tensors = []
    for name, info in header.items():
        tensors.append(_entry(path, name, info, start))
    data = size - start
    for t in tensors:
        if t.end - start > data:
            raise _bad(
                path,
                f"tensor '{t.name}' lies at data bytes {t.begin - start}..{t.end - start} "
                f"but the data holds {data} bytes",
            )
    at, prev = start, None
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if t.begin < at:
            raise _bad(
                path,
                f"tensors '{prev.name}' and '{t.name}' overlap (data bytes "
                f"{prev.begin - start}..{prev.end - start} and {t.begin - start}..{t.end - start})",
            )
        if t.begin > at:
            raise _bad(
                path,
                f"{t.begin - at} bytes before tensor '{t.name}' belong to no tensor "
                "(data_offsets must be contiguous)",
            )
        at, prev = t.end, t
    if at != size:
        raise _bad(path, f"{size - at} bytes follow the last tensor's data")
    return Header(tensors, meta, start, size)


def _entry(path: Any, name: str, info: Any, start: int) -> Tensor:
    if not isinstance(info, dict):
        raise _bad(path, f"the entry of tensor '{name}' is not a JSON object")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise _bad(
            path,
            f"tensor '{name}' has dtype {dtype_name!r}, which ckptconv does not read "
            f"(it reads {', '.join(DTYPES)})",
        )
    if not isinstance(shape, list) or not all(_int(d) and d >= 0 for d in shape):
        raise _bad(path, f"tensor '{name}' has shape {shape!r}, not a list of sizes")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(_int(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise _bad(path, f"tensor '{name}' has data_offsets {offsets!r}, not [begin, end]")
    dtype = DTYPES[dtype_name]
    need = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != need:
        raise _bad(
            path,
            f"tensor '{name}' of shape {tuple(shape)} and dtype {dtype_name} needs {need} bytes "
            f"but its data_offsets {offsets} hold {offsets[1] - offsets[0]}",
        )
    return Tensor(name, dtype, tuple(shape), start + offsets[0], start + offsets[1])


def _tree(where: Any, flat: list[tuple[str, Any]]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    leaf_of: dict[int, str] = {}  # id(dict) -> a name below it, for messages
    for name, value in flat:
        parts = name.split(".")
        node = root
        for i, k in enumerate(parts[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            elif not isinstance(nxt, dict):
                raise _conflict(where, ".".join(parts[: i + 1]), name)
            leaf_of.setdefault(id(nxt), name)
            node = nxt
        last = parts[-1]
        if last in node:
            other = node[last]
            raise _conflict(where, name, leaf_of.get(id(other), name) if isinstance(other, dict) else name)
        node[last] = value
    return root


def _conflict(where: Any, leaf: str, below: str) -> FormatError:
    return FormatError(
        f"{where}: tensor '{leaf}' is also a prefix of tensor '{below}'; ckptconv splits "
        "names on '.' into a tree, which cannot hold both. Rename one of them."
    )


# --------------------------------------------------------------------------- detection


def _index(path: Path) -> Path | None:
    return hf_index.find_index(path, _INDEX)


def sniff(path: Path) -> str | None:
    if path.is_dir():
        if _index(path) is not None:
            return None
        return "a directory without model.safetensors.index.json"
    if not path.is_file():
        return "not a file"
    with open(path, "rb") as f:
        head = f.read(9)
    # The header opens with '{' after its 8-byte length; whether the rest
    # holds up is read_lazy's to say, with a precise message.
    if len(head) < 9 or head[8:9] != b"{":
        return "does not start with a safetensors header (8-byte length, then '{')"
    return None


def describe(path: Path, step: int | None = None) -> Layout:
    if step is not None:
        raise FormatError(
            f"{path}: --step applies to Orbax CheckpointManager directories, "
            "not to safetensors."
        )
    return Layout(NAME, "item" if path.is_dir() else "file", path, items={"": path})


# --------------------------------------------------------------------------- reading


def _refs(header: Header, shard: str) -> list[tuple[str, lazy.Ref]]:
    return [
        (t.name, lazy.Ref((shard, ((t.begin, t.end - t.begin),)), t.shape, t.dtype))
        for t in header.tensors
    ]


def _read_dir(item: Path) -> tuple[hf_index.Index, list[tuple[str, lazy.Ref]], dict | None]:
    index = hf_index.read_index(_index(item))
    flat: list[tuple[str, lazy.Ref]] = []
    owner: dict[str, str] = {}
    meta = None
    for k, shard in enumerate(index.shards):
        header = read_header(item / shard)
        if k == 0:
            meta = header.metadata
        for name, ref in _refs(header, shard):
            if name in owner:
                raise FormatError(
                    f"{item}: tensor '{name}' is in both '{owner[name]}' and '{shard}'; "
                    "the shards overlap, copy the checkpoint again."
                )
            owner[name] = shard
            flat.append((name, ref))
        for key in index.keys_of(shard):
            if owner.get(key) != shard:
                raise hf_index.missing_leaf(index, shard, key)
    return index, flat, meta


def read_lazy(item: Path) -> Any:
    """The tree of a safetensors file or sharded directory, with `Ref` leaves
    whose source is ``(shard file name or "", ((offset, nbytes),))``."""
    item = Path(item)
    if item.is_dir():
        _, flat, _ = _read_dir(item)
    else:
        flat = _refs(read_header(item), "")
    return _tree(item, flat)


def _file(item: Path, shard: str) -> Path:
    return item / shard if shard else item


def _open(path: Path, keep_fd: bool = False) -> mmap.mmap:
    # keep_fd: a source of `write`, whose byte ranges the kernel may copy.
    try:
        with open(path, "rb") as f:
            return byteplan.map_file(f, keep_fd)
    except (OSError, ValueError) as e:
        raise FormatError(f"cannot read '{path}': {getattr(e, 'strerror', None) or e}.") from e


def _source(ref: lazy.Ref) -> tuple[str, byteplan.Spans]:
    src = ref.source
    if isinstance(src, tuple) and len(src) == 2 and isinstance(src[0], str):
        return src
    raise FormatError(
        f"array source {src!r} is not a safetensors file and span; read the tree with "
        "ckptconv.formats.safetensors.read_lazy."
    )


def read_array(item: Path, ref: lazy.Ref) -> np.ndarray:
    """One tensor: a read-only view on a memory map of its file."""
    shard, ((off, n),) = _source(ref)
    path = _file(Path(item), shard)
    mm = _open(path)
    byteplan.check_spans(((off, n),), len(mm), str(path), f"of shape {ref.shape}")
    dtype = np.dtype(ref.dtype)
    count = n // dtype.itemsize
    return np.frombuffer(mm, dtype=dtype, count=count, offset=off).reshape(ref.shape)


# --------------------------------------------------------------------------- writing


def _flatten(tree: Any, dst: Any, is_array: Callable[[Any], bool]) -> list[tuple[list, str, Any]]:
    """``(path, flat name, leaf)`` of every leaf, in tree order; leaves that
    safetensors cannot store are errors naming them."""
    out: list[tuple[list, str, Any]] = []

    def fail(path: list, what: str) -> FormatError:
        where = "/".join(map(str, path)) or "<root>"
        # A train state's optimizer holds such leaves; serving wants its params.
        keep = ("keep the params only (--only params, or --root params), or "
                if path and str(path[0]) != "params" and isinstance(tree, Mapping)
                and "params" in tree else "")
        return FormatError(
            f"cannot write '{dst}': leaf '{where}' {what}, which safetensors cannot store; "
            f"{keep}write msgpack or orbax instead (--format)."
        )

    def walk(x: Any, path: list) -> None:
        if is_array(x):
            out.append((list(path), ".".join(map(str, path)), x))
        elif isinstance(x, Mapping):
            if not x:
                raise fail(path, "is an empty node")
            for k, v in x.items():
                walk(v, [*path, k])
        elif isinstance(x, (list, tuple)):
            if not x:
                raise fail(path, "is an empty list")
            for i, v in enumerate(x):
                walk(v, [*path, i])
        elif isinstance(x, (np.generic, bool, int, float, complex)):
            out.append((list(path), ".".join(map(str, path)), np.asarray(x)))
        else:
            raise fail(path, f"is {type(x).__name__} {x!r:.40}")

    walk(tree, [])
    names = set()
    for _, name, _ in out:
        if name in names:
            raise FormatError(f"cannot write '{dst}': two leaves are both named '{name}'; rename one.")
        names.add(name)
    for _, name, _ in out:
        parts = name.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[:i]) in names:
                raise FormatError(
                    f"cannot write '{dst}': leaf '{'.'.join(parts[:i])}' is also a prefix of "
                    f"leaf '{name}', which a safetensors reader splitting on '.' cannot tell "
                    "apart; rename one."
                )
    return out


def _write_file(
    entries: list[tuple[list, str, Any]],
    dst: Path,
    metadata: dict[str, str] | None,
    planner: byteplan.Planner,
    progress: Any,
) -> None:
    header: dict[str, Any] = {}
    if metadata:
        header[_META] = metadata
    described = []
    at = 0
    for path, name, x in entries:
        shape, dtype = tuple(int(d) for d in x.shape), np.dtype(x.dtype)
        if dtype not in _NAMES:
            raise planner.fail(path, f"has dtype {dtype}, which safetensors cannot store")
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [at, at + n]}
        described.append((shape, dtype, n))
        at += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    with byteplan.output_file(dst, dst) as f:
        out = byteplan.Out(f, progress)
        out.put(len(raw).to_bytes(8, "little") + raw)
        for (path, _, x), (shape, dtype, n) in zip(entries, described):
            got_shape, got_dtype, gather = planner.plan(x, path)
            if (tuple(got_shape), got_dtype) != (shape, dtype) or gather.nbytes != n:
                raise planner.fail(
                    path, f"was described as {shape} {dtype} but reads as {got_shape} {got_dtype}"
                )
            out.payload(gather, 0, gather.nbytes)
        out.flush()


def _planner(item: Path | None, maps: byteplan.FileMaps, dst: Path) -> byteplan.Planner:
    def fail(path: list, what: str) -> FormatError:
        return FormatError(f"cannot write '{dst}': leaf '{'/'.join(map(str, path)) or '<root>'}' {what}")

    def resolve(ref: lazy.Ref, path: list) -> tuple[Any, byteplan.Spans]:
        if item is None:
            raise fail(path, "refers to an input file, but no source file was given")
        shard, sp = _source(ref)
        mm = maps.get(shard)
        byteplan.check_spans(sp, len(mm), str(_file(item, shard)), f"at '{'/'.join(map(str, path))}'")
        return mm, sp

    return byteplan.Planner(resolve, fail, "safetensors")


#: ``__metadata__`` of a safetensors file written from another format: what
#: ``FlaxPreTrainedModel.save_pretrained(safe_serialization=True)`` writes.
DEFAULT_METADATA = {"format": "flax"}


#: `write` takes ``record=``: the conversion record goes into ``__metadata__``.
WRITES_RECORD = True
_RECORD = "ckptconv"


def write(
    item: Path | None,
    out_tree: Any,
    dst: Path,
    progress: Any = None,
    fsync: bool = False,
    record: dict | None = None,
    single: bool = False,
) -> None:
    """Write ``out_tree`` as safetensors at ``dst``, streaming from ``item``.

    ``item`` (a file or a sharded directory, as read by `read_lazy`) gives the
    bytes of the lazy leaves, the ``__metadata__`` kept and, for a directory,
    the layout; None (another format's `lazy.Deferred` leaves, or arrays)
    writes one file with `DEFAULT_METADATA`. ``record`` (`ckptconv.record`)
    is added to ``__metadata__`` as JSON under ``"ckptconv"`` (safetensors
    metadata values are strings), in every shard. ``single``: a sharded
    directory ``item`` gives one file (OUT named ``*.safetensors``).
    """
    dst = Path(dst)
    item = Path(item) if item is not None else None
    with byteplan.FileMaps(lambda shard: _open(_file(item, shard), keep_fd=True)) as maps:
        planner = _planner(item, maps, dst)
        if item is not None and item.is_dir():
            index, flat, meta = _read_dir(item)
            meta = _with_record(meta, record)
            sizes = {name: ref.nbytes for name, ref in flat}
            entries = _flatten(out_tree, dst, planner.is_array)
            hf_entries = [(name, x, _nbytes(x)) for _, name, x in entries]

            def write_shard(members: list[int], file: Path) -> None:
                _write_file([entries[i] for i in members], file, meta, planner, progress)

            if single:  # OUT named as a file (model.safetensors): the shards merged into one
                write_shard(list(range(len(entries))), dst)
                return
            hf_index.write_sharded(index, hf_entries, dst, hf_index.largest_shard(index, sizes), write_shard)
            return
        meta = read_header(item).metadata if item is not None else DEFAULT_METADATA
        meta = _with_record(meta, record)
        entries = _flatten(out_tree, dst, planner.is_array)
        _write_file(entries, dst, meta, planner, progress)


def _with_record(meta: dict | None, record: dict | None) -> dict | None:
    if record is None:
        return meta
    import json

    return {**(meta or {}), _RECORD: json.dumps(record, separators=(",", ":"))}


def read_record(item: Path) -> dict | None:
    """The ckptconv record in a file's (or first shard's) ``__metadata__``."""
    import json

    item = Path(item)
    try:
        if item.is_dir():
            meta = _read_dir(item)[2]
        else:
            meta = read_header(item).metadata
        text = (meta or {}).get(_RECORD)
        rec = json.loads(text) if isinstance(text, str) else None
    except (FormatError, OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _nbytes(x: Any) -> int:
    return math.prod(int(d) for d in x.shape) * np.dtype(x.dtype).itemsize


def load(path: Path, step: int | None = None) -> Any:
    describe(path, step)
    return lazy.materialize(read_lazy(path), lambda ref: read_array(path, ref).copy())


def save(tree: Any, path: Path) -> None:
    """Write an in-memory tree (numpy/jax arrays) as one safetensors file."""
    write(None, tree, Path(path))

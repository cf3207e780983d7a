"""Fuzzing every reader ckptconv wrote by hand, on mutated copies of small valid inputs.

Readers: the msgpack parser (through ``ckptconv.load``, so format detection
too), the streaming zstd decoder's plumbing (``formats/orbax_stream/zstd_stream.py``: range
reads, exact-size reads, the frame walker; whatever it decodes must equal
zstandard's one-shot decode of the same bytes), the safetensors header reader, the Hugging Face index reader (msgpack and
safetensors directories), and the Orbax metadata reader (``_METADATA``, the
``.zarray`` of an array inside the OCDBT store, ``manifest.ocdbt``,
``_CHECKPOINT_METADATA``; then ``read_array`` of each small leaf).

Mutations: bit flips, byte inserts and deletes, truncation, splicing with
another seed, "interesting" integers (2^32, 2^63 ...) written over 1-8 bytes,
JSON edits (a value replaced by a huge number, a wrong type, a deep nest)
and, per format, length fields set to 2^32-1 / 2^32 / 2^63.

Every input must either read or raise `ckptconv.CkptconvError`; each must
finish within ``CKPTCONV_FUZZ_TIMEOUT`` seconds (``signal.setitimer``); the
inputs whose length fields claim 2^32 bytes or items run under ``tracemalloc``
and must stay under `_MAX_PEAK` bytes, and no input may grow the process's
peak RSS by more than `_MAX_RSS_STEP`.

Environment:
  CKPTCONV_FUZZ_SECONDS: time budget per reader (default 3).
  CKPTCONV_FUZZ_INPUTS: at most this many mutants per reader (default 100, so
    that CI tries the same inputs on every machine; 0: no limit).
  CKPTCONV_FUZZ_SEED: the random seed (default 0); inputs are a deterministic
    sequence for a seed, so an escape is found again by rerunning with it.
  CKPTCONV_FUZZ_TIMEOUT: the per-input limit in seconds (default 10).
  CKPTCONV_FUZZ_REPORT: a JSON file to which each reader's count is added.
  CKPTCONV_FUZZ_SAVE: a directory where escaping inputs are saved.
  CKPTCONV_FUZZ_LAST: a file that holds each input while it runs (set by the
    Orbax tests for the child process they run in, so that the input a crash
    died on is known).

The Orbax readers hand damaged data to TensorStore, whose C++ may die by a
signal rather than raise; each Orbax run is its own child process, so that a
crash is a named failure with its input, not the end of the suite. A crash is
rerun once: one that does not come again (TensorStore's background threads,
seen once in CI as a SIGSEGV while the next input was copied) is reported on
stdout, one that does fails the test.

Long run: ``CKPTCONV_FUZZ_SECONDS=60 .venv/bin/python -m pytest tests/test_fuzz.py -s``.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import struct
import time
import traceback
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
import pytest

import ckptconv
from ckptconv.formats import msgpack_stream, orbax_stream, safetensors
from ckptconv.formats.msgpack_stream import dtypes as msgpack_dtypes
from ckptconv.formats.msgpack_stream import writer as msgpack_writer
from ckptconv.lazy import Ref

BUDGET = float(os.environ.get("CKPTCONV_FUZZ_SECONDS", "3"))
MAX_INPUTS = int(os.environ.get("CKPTCONV_FUZZ_INPUTS", "100"))
SEED = int(os.environ.get("CKPTCONV_FUZZ_SEED", "0"))
PER_INPUT = float(os.environ.get("CKPTCONV_FUZZ_TIMEOUT", "10"))
_MAX_PEAK = 32 << 20  # traced bytes for one "huge length" input
_MAX_RSS_STEP = 256 << 20  # peak-RSS growth in one input

_HUGE = (2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1, 2**63, 2**64 - 1)
_INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 2**31 - 1, 2**31, *_HUGE)


class _Hang(BaseException):
    """Raised by the per-input alarm (a BaseException: readers catch Exception)."""


def _alarm(signum, frame):
    raise _Hang()


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------- mutations


def _json_values(rng: random.Random) -> object:
    return rng.choice(
        [
            2**32, 2**63, 2**64, -1, -(2**63), 0, 1.5, 1e308, float("nan"),
            "", "../../etc/passwd", "/abs", "O", "<f4,<i4", "|O", "float32", "bfloat16",
            None, True, [], {}, [2**32, 2**32], [0, 2**63], {"key": 1}, "x" * 300,
        ]
    )


def _json_mutate(data: bytes, rng: random.Random) -> bytes | None:
    """Replace one value (or key) of a JSON document; None if it is not JSON."""
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    nodes: list[tuple[object, object]] = []  # (container, key)

    def walk(x: object) -> None:
        if isinstance(x, dict):
            for k in list(x):
                nodes.append((x, k))
                walk(x[k])
        elif isinstance(x, list):
            for i in range(len(x)):
                nodes.append((x, i))
                walk(x[i])

    walk(doc)
    if not nodes:
        return None
    parent, key = rng.choice(nodes)
    r = rng.random()
    if r < 0.6:
        parent[key] = _json_values(rng)
    elif r < 0.7:
        parent[key] = _deep()
    elif r < 0.85 and isinstance(parent, dict):
        parent[rng.choice(["..", "a/b", "", "0", "-1", str(2**32), "__metadata__"])] = parent.pop(key)
    elif isinstance(parent, dict):
        del parent[key]
    else:
        parent.pop(key)
    try:
        return json.dumps(doc, allow_nan=True).encode()
    except (ValueError, RecursionError):
        return None


def _deep() -> object:
    # Deeper than Python's recursion limit for json.loads, written without recursion.
    return _Raw("[" * 50_000 + "]" * 50_000)


class _Raw(float):
    """A value json.dumps writes verbatim (via float.__repr__)."""

    def __new__(cls, text: str):
        self = super().__new__(cls, 0.0)
        self.text = text
        return self

    def __repr__(self) -> str:
        return self.text


class Mutator:
    def __init__(self, name: str, seeds: list[bytes], lengths: Callable[[bytes, random.Random], bytes] | None,
                 is_json: bool = False, fix: Callable[[bytes], bytes] | None = None) -> None:
        self.rng = random.Random(f"{SEED}:{name}")
        self.seeds = seeds
        self.lengths = lengths
        self.is_json = is_json
        self.fix = fix  # e.g. recompute safetensors' header length after a JSON edit

    def one(self, data: bytes) -> tuple[str, bytes]:
        rng = self.rng
        ops = ["flip", "insert", "delete", "truncate", "splice", "int"]
        if self.lengths is not None:
            ops.append("length")
        if self.is_json:
            ops += ["json", "json"]
        op = rng.choice(ops)
        n = len(data)
        if op == "flip" and n:
            b = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(n)
                b[i] ^= 1 << rng.randrange(8)
            return op, bytes(b)
        if op == "insert":
            i = rng.randint(0, n)
            ins = bytes(rng.choice([rng.randrange(256), 0, 0xFF, 0xC6, 0xC9, 0xDD, 0xDF, 0xD7, 0xC7,
                                    ord('"'), ord("["), ord("{"), ord(","), ord("-")])
                        for _ in range(rng.randint(1, 8)))
            return op, data[:i] + ins + data[i:]
        if op == "delete" and n:
            i = rng.randrange(n)
            return op, data[:i] + data[i + rng.randint(1, 16):]
        if op == "truncate":
            return op, data[: rng.randrange(n + 1)]
        if op == "splice":
            other = rng.choice(self.seeds)
            i, j = rng.randint(0, n), rng.randint(0, len(other))
            return op, data[:i] + other[j:]
        if op == "int" and n:
            v = rng.choice(_INTERESTING)
            width = rng.choice([1, 2, 4, 8])
            v &= (1 << (8 * width)) - 1
            raw = v.to_bytes(width, rng.choice(["big", "little"]))
            i = rng.randrange(n)
            return op, data[:i] + raw + data[i + width:]
        if op == "length":
            return op, self.lengths(data, rng)
        if op == "json":
            out = _json_mutate(data, rng)
            if out is not None:
                return op, out
        return "flip0", data[:-1]

    def havoc(self) -> tuple[str, bytes]:
        data = self.rng.choice(self.seeds)
        kinds = []
        for _ in range(self.rng.choice([1, 1, 1, 2, 3])):
            kind, data = self.one(data)
            kinds.append(kind)
        if self.fix is not None and self.rng.random() < 0.5:
            data = self.fix(data)
        return "+".join(kinds), data


# --------------------------------------------------------------------------- the loop


def _fuzz(name: str, mutator: Mutator, run: Callable[[bytes], None], huge: list[bytes],
          record_property: Callable[[str, object], None]) -> None:
    """Runs seeds, the "huge length" inputs (under tracemalloc), then mutants for BUDGET s."""
    escapes: dict[str, str] = {}
    counts = {"inputs": 0, "read": 0, "refused": 0}
    save = os.environ.get("CKPTCONV_FUZZ_SAVE")

    last = os.environ.get("CKPTCONV_FUZZ_LAST")

    def check(kind: str, data: bytes, traced: bool) -> None:
        counts["inputs"] += 1
        if last:
            Path(last).write_bytes(data)
            Path(last + ".what").write_text(f"input #{counts['inputs']} ({kind}, {len(data)} bytes)")
        rss = _maxrss()
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, PER_INPUT)
        problem = None
        try:
            if traced:
                tracemalloc.start()
            try:
                run(data)
                counts["read"] += 1
            finally:
                if traced:
                    _, peak = tracemalloc.get_traced_memory()
                    tracemalloc.stop()
                    if peak > _MAX_PEAK:
                        problem = f"allocated {peak} bytes (traced) for a huge length field"
        except ckptconv.CkptconvError:
            counts["refused"] += 1
        except _Hang:
            problem = f"took more than {PER_INPUT} s"
        except BaseException as e:  # noqa: BLE001 -- that is what is looked for
            tb = traceback.extract_tb(e.__traceback__)[-1]
            problem = f"{type(e).__name__}: {str(e)[:200]} (at {Path(tb.filename).name}:{tb.lineno})"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        grew = _maxrss() - rss
        if problem is None and grew > _MAX_RSS_STEP:
            problem = f"peak RSS grew by {grew >> 20} MiB"
        if problem is not None:
            # One report per kind of escape: exception type and where it was raised.
            key = problem.split(": ")[0] + problem[problem.index(" (at "):] if " (at " in problem else problem[:40]
            if key not in escapes:
                escapes[key] = f"{problem}\n    input #{counts['inputs']} ({kind}, {len(data)} bytes): {data[:300]!r}"
                if save:
                    Path(save).mkdir(parents=True, exist_ok=True)
                    (Path(save) / f"{name}-{counts['inputs']}.bin").write_bytes(data)

    for data in mutator.seeds:
        check("seed", data, False)
    for data in huge:
        check("huge length", data, True)
    deadline = time.monotonic() + BUDGET
    mutants = 0
    while time.monotonic() < deadline and (not MAX_INPUTS or mutants < MAX_INPUTS):
        mutants += 1
        kind, data = mutator.havoc()
        check(kind, data, False)
    line = f"fuzz {name}: {counts['inputs']} inputs in {BUDGET:g} s (seed {SEED}): " \
           f"{counts['read']} read, {counts['refused']} refused, {len(escapes)} escapes"
    print(line)
    record_property("fuzz_inputs", counts["inputs"])
    report = os.environ.get("CKPTCONV_FUZZ_REPORT")
    if report:
        p = Path(report)
        got = json.loads(p.read_text()) if p.exists() else {}
        got[name] = {**counts, "escapes": len(escapes), "seconds": BUDGET, "seed": SEED}
        p.write_text(json.dumps(got, indent=1))
    assert not escapes, line + "\n" + "\n".join(escapes.values())


# --------------------------------------------------------------------------- msgpack


def _msgpack_seeds(tmp: Path, monkeypatch) -> list[bytes]:
    rng = np.random.default_rng(0)
    tree = {
        "params": {
            "layer_0": {"w": rng.standard_normal((3, 4), dtype=np.float32),
                        "b": np.arange(4, dtype=np.float16)},
            "layer_1": {"q": rng.integers(-128, 127, (2, 5), dtype=np.int8),
                        "m": np.array([True, False])},
        },
        "scalar0d": np.array(2.5, np.float64),
        "npscalar": np.int32(7),
        "empty": np.zeros((0, 3), np.uint16),
        "lst": [np.ones(2, np.int64), {"x": 1.5}, None, "text", b"raw", True, -3, 2**40],
        "cplx": 1 + 2j,
    }
    import ml_dtypes

    tree["params"]["layer_0"]["bf"] = np.arange(5).astype(ml_dtypes.bfloat16)
    out = []
    msgpack_stream.save(tree, tmp / "a.msgpack")
    out.append((tmp / "a.msgpack").read_bytes())
    # A chunked array (flax's __msgpack_chunked_array__ map), with tiny chunks.
    monkeypatch.setattr(msgpack_writer, "_max_chunk_size", lambda: 16)
    msgpack_stream.save({"big": np.arange(20, dtype=np.float32).reshape(4, 5), "s": np.int8(1)}, tmp / "c.msgpack")
    monkeypatch.undo()
    out.append((tmp / "c.msgpack").read_bytes())
    # A timestamp and an unknown (application) ext type.
    out.append(msgpack.packb({"t": msgpack.Timestamp(5, 6), "e": msgpack.ExtType(42, b"abc"), "f": 0.5}))
    return out


def _ndarray_ext(shape: list[int], dtype: str, data: bytes, code: int = 1) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb([shape, dtype, data], use_bin_type=True))


def _msgpack_huge() -> list[bytes]:
    """Valid-looking files whose length fields claim 2^32-1 .. 2^64-1 bytes or items."""
    body = msgpack.packb({"w": _ndarray_ext([2], "float32", b"\0" * 8)}, use_bin_type=True)
    out = []
    for header in (b"\xdd", b"\xdf", b"\xc6", b"\xdb"):  # array32, map32, bin32, str32
        out.append(b"\x81\xa1k" + header + b"\xff\xff\xff\xff" + b"\x00" * 8)
    out.append(b"\x81\xa1k\xc9\xff\xff\xff\xff\x01" + b"\x00" * 8)  # ext32
    for dims in ([2**32], [2**32, 2**32], [2**63], [2**64 - 1], [2**32, 0]):
        out.append(msgpack.packb({"w": _ndarray_ext(dims, "float32", b"\0" * 8)}, use_bin_type=True))
        out.append(msgpack.packb({"w": _ndarray_ext(dims, "int8", b"", code=3)}, use_bin_type=True))
    # Chunked arrays claiming a huge shape or a huge number of chunks.
    chunk = _ndarray_ext([2], "float32", b"\0" * 8)
    for shape in ({"0": 2**32}, {"0": 2**63}, {"0": 2**32, "1": 2**32}):
        out.append(msgpack.packb({"a": {"__msgpack_chunked_array__": True, "shape": shape,
                                        "chunks": {"0": chunk}}}, use_bin_type=True))
    out.append(b"\x81\xa1a\x83" + msgpack.packb("__msgpack_chunked_array__") + b"\xc3"
               + msgpack.packb("shape") + msgpack.packb({"0": 2}) + msgpack.packb("chunks")
               + b"\xdf\xff\xff\xff\xff" + msgpack.packb("0") + msgpack.packb(chunk, use_bin_type=True))
    return [body, *out]


def _msgpack_lengths(data: bytes, rng: random.Random) -> bytes:
    """Overwrite a random byte with a 32-bit length header claiming 2^32-1."""
    i = rng.randrange(max(1, len(data)))
    header = rng.choice([b"\xdd", b"\xdf", b"\xc6", b"\xdb", b"\xc9", b"\xce", b"\xcf"])
    value = b"\xff\xff\xff\xff" if header != b"\xcf" else rng.choice([2**63, 2**64 - 1, 2**32]).to_bytes(8, "big")
    return data[:i] + header + value + data[i + 1:]


def test_fuzz_msgpack(tmp_path, monkeypatch, record_property):
    seeds = _msgpack_seeds(tmp_path, monkeypatch)
    seeds.append((Path(__file__).parent.parent / "fixtures" / "seed0_loop.msgpack").read_bytes())
    target = tmp_path / "fuzz.msgpack"

    def run(data: bytes) -> None:
        target.write_bytes(data)
        ckptconv.load(target)
        msgpack_stream.read_lazy(target)

    _fuzz("msgpack", Mutator("msgpack", seeds, _msgpack_lengths), run, _msgpack_huge(), record_property)


def test_msgpack_dtype_names_come_from_an_allow_list(tmp_path):
    """np.dtype's parser is never given a name from a file: "O", comma strings, structs."""
    for name in ("O", "|O", "object", "<f4,<i4", "f4, (2,)i4", "[('a', '<f4')]", "V8", "S4", "U2",
                 "float128", "datetime64", "m8", "float32 ", " int8", "p"):
        target = tmp_path / "x.msgpack"
        target.write_bytes(msgpack.packb({"w": _ndarray_ext([1], name, b"\0" * 8)}, use_bin_type=True))
        with pytest.raises(ckptconv.FormatError, match="unknown dtype"):
            msgpack_stream.read_lazy(target)
    for name in ("bool", "int8", "uint64", "float16", "float64", "complex128", "bfloat16", "float8_e4m3fn"):
        dt = msgpack_dtypes._dtype_from_name(name)
        assert dt.name == name


def test_msgpack_reserved_ext_codes(tmp_path):
    target = tmp_path / "x.msgpack"
    for code in (-128, -2, -100):
        target.write_bytes(b"\x81\xa1k" + struct.pack(">Bb", 0xD4, code) + b"\x00")
        with pytest.raises(ckptconv.FormatError, match="reserved type code"):
            ckptconv.load(target)


# --------------------------------------------------------------------------- safetensors


def _st_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw + data


def _st_fix(data: bytes) -> bytes:
    """Set the header length to what the JSON says, so a JSON edit reaches the checks behind it."""
    if len(data) < 9:
        return data
    n = int.from_bytes(data[:8], "little")
    end = data.find(b"}", 8, min(len(data), 8 + n + 64)) if n <= len(data) else -1
    end = data.rfind(b"}", 8, len(data)) if end < 0 else end
    return (end - 7).to_bytes(8, "little") + data[8:] if end > 8 else data


def _st_seeds(tmp: Path) -> list[bytes]:
    import ml_dtypes

    safetensors.save({"model": {"layers": {"0": {"w": np.ones((2, 3), np.float32),
                                                  "b": np.arange(3).astype(ml_dtypes.bfloat16)},
                                            "1": {"w": np.zeros((2, 3), np.float32),
                                                  "b": np.arange(3).astype(ml_dtypes.bfloat16)}}},
                      "q": np.arange(4, dtype=np.int8), "m": np.array([True]), "e": np.zeros((0,), np.int64),
                      "s": np.float32(1.0)}, tmp / "a.safetensors")
    return [(tmp / "a.safetensors").read_bytes(),
            _st_bytes({"__metadata__": {"format": "pt"}, "x": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}},
                      b"\1\2\3\4")]


def _st_huge() -> list[bytes]:
    out = []
    for n in _HUGE:
        out.append((n & (2**64 - 1)).to_bytes(8, "little") + b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}' + b"\0" * 4)
    for shape, offs in (([2**32], [0, 2**34]), ([2**63], [0, 2**65]), ([2**32, 2**32], [0, 2**64]),
                        ([1], [2**63, 2**63 + 4]), ([1], [0, 2**32])):
        out.append(_st_bytes({"x": {"dtype": "F32", "shape": shape, "data_offsets": offs}}, b"\0" * 4))
    return out


def _st_lengths(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return rng.choice(_HUGE).to_bytes(8, "little") + data[8:]
    return data.replace(b"[", b"[%d, " % rng.choice(_HUGE), 1) if rng.random() < 0.5 else \
        data.replace(b"]", b", %d]" % rng.choice(_HUGE), 1)


def test_fuzz_safetensors(tmp_path, record_property):
    seeds = _st_seeds(tmp_path)
    target = tmp_path / "fuzz.safetensors"

    def run(data: bytes) -> None:
        target.write_bytes(data)
        safetensors.read_header(target)
        ckptconv.load(target)

    mut = Mutator("safetensors", seeds, _st_lengths, fix=_st_fix)
    _fuzz("safetensors", mut, run, _st_huge(), record_property)


# --------------------------------------------------------------------------- HF index


def _hf_dirs(tmp: Path) -> list[tuple[Path, str, bytes]]:
    """A sharded safetensors and a sharded msgpack directory: (dir, index name, index bytes)."""
    out = []
    st = tmp / "st"
    st.mkdir()
    safetensors.save({"a": {"w": np.ones(3, np.float32)}}, st / "model-00001-of-00002.safetensors")
    safetensors.save({"a": {"b": np.zeros(2, np.int8)}}, st / "model-00002-of-00002.safetensors")
    index = {"metadata": {"total_size": 14}, "weight_map": {"a.w": "model-00001-of-00002.safetensors",
                                                            "a.b": "model-00002-of-00002.safetensors"}}
    (st / "config.json").write_text("{}")
    out.append((st, "model.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True).encode()))
    mp = tmp / "mp"
    mp.mkdir()
    msgpack_stream.save({"a": {"w": np.ones(3, np.float32)}}, mp / "flax_model-00001-of-00002.msgpack")
    msgpack_stream.save({"a": {"b": np.zeros(2, np.int8)}}, mp / "flax_model-00002-of-00002.msgpack")
    index = {"metadata": {"total_size": 14}, "weight_map": {"a/w": "flax_model-00001-of-00002.msgpack",
                                                            "a/b": "flax_model-00002-of-00002.msgpack"}}
    out.append((mp, "flax_model.msgpack.index.json", json.dumps(index, indent=2, sort_keys=True).encode()))
    return out


def test_fuzz_hf_index(tmp_path, record_property):
    dirs = _hf_dirs(tmp_path)
    seeds = [b for _, _, b in dirs]
    huge = [json.dumps({"metadata": {"total_size": n}, "weight_map": {"a.w": "model-00001-of-00002.safetensors"}}).encode()
            for n in (2**32, 2**63)]
    for d, name, data in dirs:
        (d / name).write_bytes(data)
        before = ckptconv.load(d)
        assert before

    def run(data: bytes) -> None:
        # Each input is tried as the index of both directories.
        for d, name, _ in dirs:
            (d / name).write_bytes(data)
            ckptconv.load(d)

    _fuzz("hf_index", Mutator("hf_index", seeds, None, is_json=True), run, huge, record_property)


# --------------------------------------------------------------------------- Orbax


@pytest.fixture(scope="module")
def orbax_item(tmp_path_factory) -> Path:
    import ml_dtypes
    import orbax.checkpoint as ocp

    path = tmp_path_factory.mktemp("orbax") / "item"
    with ocp.StandardCheckpointer() as ckptr:  # Orbax itself, not ckptconv.save
        ckptr.save(path, {"params": {"layer_0": {"w": np.ones((2, 3), np.float32), "b": np.arange(3).astype(ml_dtypes.bfloat16)},
                              "layer_1": {"w": np.zeros((2, 3), np.float32), "b": np.arange(3).astype(ml_dtypes.bfloat16)}},
                   "q": np.arange(4, dtype=np.int8), "lst": [np.ones(2, np.int32), None], "empty": {},
                   "step": np.int64(3)})
    return path


def _ocdbt_write(item: Path, key: str, value: bytes) -> None:
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": str(item) + "/"}}).result()
    kv.write(key, value).result()


def _ocdbt_read(item: Path, key: str) -> bytes:
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": str(item) + "/"}}).result()
    return bytes(kv.read(key).result().value)


def _orbax_run(item: Path) -> None:
    lazy = orbax_stream.read_lazy(item)

    def walk(x):
        if isinstance(x, Ref):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from walk(v)
        elif isinstance(x, list):
            for v in x:
                yield from walk(v)

    for ref in walk(lazy):
        # A .zarray's shape is the only record of an array's shape: reading a
        # (claimed) huge array would allocate it, so only small ones are read.
        if ref.nbytes <= 1 << 20:
            arr = orbax_stream.read_array(item, ref.source)
            assert arr.shape == ref.shape and arr.dtype == ref.dtype, (arr.shape, ref)


_IN_CHILD = "CKPTCONV_FUZZ_IN_CHILD"


def _in_child(test_id: str, tmp: Path) -> tuple[int, str, str]:
    """Runs one test of this module in a child pytest: (exit status, output, last input)."""
    import subprocess
    import sys

    last = tmp / "last.bin"
    env = {**os.environ, _IN_CHILD: "1", "CKPTCONV_FUZZ_LAST": str(last)}
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         f"{__file__}::{test_id}"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    what = Path(str(last) + ".what")
    seen = f"{what.read_text()}: {last.read_bytes()[:300]!r}" if what.exists() else "before the first input"
    return p.returncode, p.stdout + p.stderr, seen


@pytest.mark.parametrize("target", ["_METADATA", "zarray", "manifest.ocdbt", "_CHECKPOINT_METADATA"])
def test_fuzz_orbax(orbax_item, tmp_path, target, record_property):
    if not os.environ.get(_IN_CHILD):
        test_id = f"test_fuzz_orbax[{target}]"
        rc, out, seen = _in_child(test_id, tmp_path)
        if rc < 0:
            first = f"TensorStore died by signal {-rc} at {seen}"
            rc, out, seen = _in_child(test_id, tmp_path)
            if rc < 0:
                pytest.fail(f"{first}; and again on rerun, by signal {-rc} at {seen}")
            print(f"fuzz orbax {target}: {first}; not again on rerun (a race, not that input)")
            record_property("fuzz_crash_not_repeated", first)
        fuzz_line = [ln for ln in out.splitlines() if ln.startswith("fuzz orbax")]
        print("\n".join(fuzz_line))
        assert rc == 0, out[-4000:]
        return
    work = tmp_path / "work"
    zkey = "params.layer_0.w/.zarray"
    if target == "zarray":
        seeds = [_ocdbt_read(orbax_item, zkey), _ocdbt_read(orbax_item, "params.layer_0.b/.zarray")]
    else:
        seeds = [(orbax_item / target).read_bytes()] if (orbax_item / target).exists() else [b"{}"]

    done: list[Path] = []

    def run(data: bytes) -> None:
        # A fresh copy per input, never removed during the run (pytest's
        # tmp_path goes later): a TensorStore thread still finishing with an
        # old copy segfaulted when it vanished under it.
        nonlocal work
        work = tmp_path / f"work{len(done)}"
        done.append(work)
        shutil.copytree(orbax_item, work)
        if target == "zarray":
            _ocdbt_write(work, zkey, data)
        else:
            (work / target).write_bytes(data)
        _orbax_run(work)

    huge = []
    if target == "zarray":
        z = json.loads(seeds[0])
        for shape in ([2**32], [2**32, 2**32], [2**63, 1], [2, 2**32]):
            huge.append(json.dumps({**z, "shape": shape}).encode())
            huge.append(json.dumps({**z, "chunks": shape}).encode())
    elif target == "_METADATA":
        meta = json.loads(seeds[0])
        for idx in (2**32, 2**63):
            m = json.loads(json.dumps(meta))
            for entry in m["tree_metadata"].values():
                for k in entry["key_metadata"]:
                    if k.get("key_type") == 1:
                        k["key"] = str(idx)
            huge.append(json.dumps(m).encode())
    is_json = target != "manifest.ocdbt"
    mut = Mutator(f"orbax-{target}", seeds, None, is_json=is_json)
    _fuzz(f"orbax {target}", mut, run, huge, record_property)


# --------------------------------------------------------------------------- zstd stream


def _zstd_seeds() -> list[tuple[bytes, int]]:
    """(compressed value, decoded size) pairs: one frame with and without a
    content size and checksum, two frames, a skippable frame in front."""
    import zstandard

    rng = np.random.default_rng(0)
    data = (rng.integers(0, 4, 3000, dtype=np.uint8)).tobytes()  # compressible
    plain = zstandard.ZstdCompressor(level=1).compress(data)
    checked = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=False).compress(data)
    two = plain + zstandard.ZstdCompressor(level=1, write_checksum=True).compress(data[:700])
    skippable = b"\x50\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"12345" + plain
    return [(plain, len(data)), (checked, len(data)), (two, len(data) + 700), (skippable, len(data))]


def test_fuzz_zstd_stream(record_property):
    from ckptconv.errors import FormatError
    from ckptconv.formats.orbax_stream import zstd_stream

    pairs = _zstd_seeds()
    sizes = {data: total for data, total in pairs}

    class Done:
        def __init__(self, value: bytes) -> None:
            self.value = value

        def result(self) -> bytes:
            return self.value

    def run(data: bytes) -> None:
        total = sizes.get(data, 3000)
        src = zstd_stream.RangeSource(lambda a, b: Done(data[a:b]), 0, len(data), block=257)
        try:
            stream = zstd_stream.Stream(src, total)
            out = bytearray(total)
            for at in range(0, total, 1000):  # exact-size reads, as a layer at a time
                stream.readinto(memoryview(out)[at:at + 1000])
            stream.finish()
        except zstd_stream.Damage as e:
            raise FormatError(f"chunk of leaf: {e}") from None
        # Read: the library's own decode of the same bytes must agree.
        got = b"".join(_frames_of(data))
        assert bytes(out) == got, (len(out), len(got))

    _fuzz("zstd_stream", Mutator("zstd", [d for d, _ in pairs], None), run, [], record_property)


def _frames_of(data: bytes) -> list[bytes]:
    """zstandard's one-shot decode, frame after frame (skippable frames dropped)."""
    import zstandard

    out, rest = [], data
    while rest:
        if rest[:4] in {bytes([0x50 + i, 0x2A, 0x4D, 0x18]) for i in range(16)}:
            n = int.from_bytes(rest[4:8], "little")
            rest = rest[8 + n:]
            continue
        d = zstandard.ZstdDecompressor().decompressobj()
        out.append(d.decompress(rest))
        rest = d.unused_data
    return out

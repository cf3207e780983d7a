"""Array bytes copied file to file by the kernel (``copy_file_range``) give the
same output, byte for byte, as the Python write of mapped bytes, in every layout."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import digest
from flax.serialization import to_bytes
from test_hf_sharded import gpt2_params, save_pretrained
from test_safetensors import lib_save, llama, shard_safetensors

import ckptconv
from ckptconv.errors import FormatError
from ckptconv.formats import byteplan

pytestmark = pytest.mark.skipif(
    not hasattr(os, "copy_file_range"), reason="os.copy_file_range is Linux-only"
)


def files(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself) -> its bytes."""
    path = Path(path)
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def mtimes(path: Path) -> dict[str, int]:
    path = Path(path)
    found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): p.stat().st_mtime_ns for p in found}


@pytest.fixture
def kernel(monkeypatch):
    """Counts the bytes ``os.copy_file_range`` moved (``kernel.bytes``)."""

    class Counter:
        bytes = 0
        calls = 0

    real = os.copy_file_range

    def counted(*args):
        n = real(*args)
        Counter.bytes += n
        Counter.calls += 1
        return n

    monkeypatch.setattr(os, "copy_file_range", counted)
    return Counter


def convert_both(monkeypatch, src: Path, out: Path, **kw) -> dict[str, bytes]:
    """Convert with the kernel copy and with it off; the outputs must agree."""
    before, times = digest(src), mtimes(src)
    python = out.parent / "python" / out.name
    python.parent.mkdir(exist_ok=True)
    monkeypatch.setattr(byteplan, "KERNEL_COPY", False)
    ckptconv.convert(src, python, **kw)
    monkeypatch.setattr(byteplan, "KERNEL_COPY", True)
    ckptconv.convert(src, out, **kw)
    got, want = files(out), files(python)
    assert got.keys() == want.keys()
    assert [k for k in got if got[k] != want[k]] == []
    assert digest(src) == before and mtimes(src) == times
    return got


def layers_tree(n: int = 4, rows: int = 300, cols: int = 40, zero_d: bool = True) -> dict:
    rng = np.random.default_rng(0)

    def layer(i: int) -> dict:
        out = {
            "w": rng.standard_normal((rows, cols), dtype=np.float32),
            "b": rng.standard_normal(cols).astype(np.float16),
            "none": np.zeros((0, 3), np.int8),  # empty
        }
        if zero_d:  # no room for a layer axis at 1
            out["g"] = np.array(i, np.float32)
        return out

    params = {f"layer_{i}": layer(i) for i in range(n)}
    params["embed"] = rng.standard_normal((64, 8), dtype=np.float32)
    return {"params": params, "step": 7}


@pytest.mark.parametrize("axis", [0, 1])
def test_msgpack_file_both_ways(tmp_path, monkeypatch, kernel, axis):
    src = tmp_path / "loop.msgpack"
    src.write_bytes(to_bytes(layers_tree(zero_d=axis == 0)))
    scan = tmp_path / "scan.msgpack"
    convert_both(monkeypatch, src, scan, to="scan", axis=axis)
    moved = kernel.bytes
    # On axis 0 every array is one range of the input; on axis 1 the rows of
    # w (160 bytes) are too short and are gathered, the rest is still copied.
    w = 4 * 300 * 40 * 4
    assert moved >= (w + 4 * 40 * 2 + 64 * 8 * 4 if axis == 0 else 64 * 8 * 4)
    back = tmp_path / "back.msgpack"
    convert_both(monkeypatch, scan, back, to="loop", axis=axis)
    assert kernel.bytes - moved >= (w if axis == 0 else 64 * 8 * 4)
    assert back.read_bytes() == src.read_bytes()


def test_long_rows_off_axis_are_copied_too(tmp_path, monkeypatch, kernel):
    # Rows of at least SEG_MIN bytes are written a row at a time, so each is
    # one kernel copy, whatever the axis.
    src = tmp_path / "loop.msgpack"
    src.write_bytes(to_bytes(layers_tree(n=3, rows=2, cols=byteplan.SEG_MIN // 4, zero_d=False)))
    convert_both(monkeypatch, src, tmp_path / "scan.msgpack", to="scan", axis=1)
    assert kernel.bytes >= 3 * 2 * byteplan.SEG_MIN


def test_chunked_arrays(tmp_path, monkeypatch, kernel):
    # flax chunks arrays above MAX_CHUNK_SIZE; a chunked input is many spans
    # and a chunked output many records: both are still byte ranges.
    import flax.serialization as fs

    monkeypatch.setattr(fs, "MAX_CHUNK_SIZE", 5000)
    src = tmp_path / "loop.msgpack"
    src.write_bytes(to_bytes(layers_tree()))
    scan = tmp_path / "scan.msgpack"
    convert_both(monkeypatch, src, scan, to="scan")
    assert kernel.bytes >= 4 * 300 * 40 * 4
    convert_both(monkeypatch, scan, tmp_path / "back.msgpack", to="loop")
    assert (tmp_path / "back.msgpack").read_bytes() == src.read_bytes()


@pytest.mark.parametrize("axis", [0, 1])
def test_hf_sharded_msgpack(tmp_path, monkeypatch, kernel, axis):
    src = save_pretrained(gpt2_params(), tmp_path / "gpt2", max_shard_size=6000)
    scan = tmp_path / "scan"
    convert_both(monkeypatch, src, scan, to="scan", axis=axis)
    assert kernel.bytes > 0
    back = tmp_path / "back"
    convert_both(monkeypatch, scan, back, to="loop", axis=axis, source="h", pattern="{i}")


@pytest.mark.parametrize("sharded", [False, True])
def test_safetensors(tmp_path, monkeypatch, kernel, sharded):
    flat = llama()
    if sharded:
        src = shard_safetensors(flat, tmp_path / "llama", max_shard_size=1500)
    else:
        src = lib_save(flat, tmp_path / "model.safetensors", metadata={"format": "flax"})
    scan = tmp_path / ("scan" if sharded else "scan.safetensors")
    convert_both(monkeypatch, src, scan, to="scan")
    assert kernel.bytes >= sum(v.nbytes for v in flat.values())
    back = tmp_path / ("back" if sharded else "back.safetensors")
    convert_both(monkeypatch, scan, back, to="loop", source="layers", pattern="{i}")


def refuse(code: int, after: int = 0):
    """An ``os`` call that works ``after`` times, then fails with ``code``."""

    def make(real):
        calls = []

        def call(*args):
            calls.append(args)
            if len(calls) > after:
                raise OSError(code, os.strerror(code))
            return real(*args)

        return call

    return make


@pytest.mark.parametrize(
    "cfr, sendfile",
    [
        (refuse(errno.EXDEV), None),  # another filesystem: sendfile
        (refuse(errno.ENOSYS), refuse(errno.EINVAL)),  # neither: Python writes
        (refuse(errno.EXDEV, after=3), refuse(errno.EINVAL, after=2)),  # refused half-way
    ],
    ids=["sendfile", "python", "half-way"],
)
def test_refusals_fall_back_to_the_same_bytes(tmp_path, monkeypatch, cfr, sendfile):
    src = tmp_path / "loop.msgpack"
    src.write_bytes(to_bytes(layers_tree()))
    monkeypatch.setattr(byteplan, "KERNEL_COPY", False)
    ckptconv.convert(src, tmp_path / "want.msgpack", to="scan")
    monkeypatch.setattr(byteplan, "KERNEL_COPY", True)
    monkeypatch.setattr(os, "copy_file_range", cfr(os.copy_file_range))
    if sendfile is not None:
        monkeypatch.setattr(os, "sendfile", sendfile(os.sendfile))
    ckptconv.convert(src, tmp_path / "got.msgpack", to="scan")
    assert (tmp_path / "got.msgpack").read_bytes() == (tmp_path / "want.msgpack").read_bytes()


def test_short_copies_are_resumed(tmp_path, monkeypatch):
    # The kernel may copy less than asked (it caps one call near 2 GiB).
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda i, o, n, a, b: real(i, o, min(n, 1000), a, b))
    src = tmp_path / "loop.msgpack"
    src.write_bytes(to_bytes(layers_tree()))
    seen = []
    ckptconv.convert(src, tmp_path / "got.msgpack", to="scan", progress=lambda n, total: seen.append(n))
    monkeypatch.setattr(byteplan, "KERNEL_COPY", False)
    ckptconv.convert(src, tmp_path / "want.msgpack", to="scan")
    assert (tmp_path / "got.msgpack").read_bytes() == (tmp_path / "want.msgpack").read_bytes()
    assert seen and seen[-1] > 0


def test_input_that_shrank_is_a_clear_error(tmp_path, monkeypatch):
    src = tmp_path / "loop.msgpack"
    src.write_bytes(to_bytes(layers_tree()))
    before, times = digest(src), mtimes(src)
    monkeypatch.setattr(os, "copy_file_range", lambda *args: 0)  # end of file
    with pytest.raises(FormatError, match=r"an input file ended at byte \d+ while its data was being copied"):
        ckptconv.convert(src, tmp_path / "out.msgpack", to="scan")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop.msgpack"]
    assert digest(src) == before and mtimes(src) == times


def test_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    src = tmp_path / "loop.msgpack"
    src.write_bytes(to_bytes(layers_tree()))
    before = digest(src)

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "copy_file_range", full)
    with pytest.raises(FormatError, match="No space left on device.*free space"):
        ckptconv.convert(src, tmp_path / "out.msgpack", to="scan")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop.msgpack"]
    assert digest(src) == before


def test_environment_switch_turns_it_off(tmp_path):
    import subprocess

    src = tmp_path / "loop.msgpack"
    src.write_bytes(to_bytes(layers_tree()))
    code = "from ckptconv.formats import byteplan; print(byteplan.KERNEL_COPY)"
    env = {**os.environ, "CKPTCONV_KERNEL_COPY": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dtype_tables_import_ml_dtypes_only_when_asked():
    # Importing ml_dtypes costs most of a conversion's start: numpy dtypes are
    # looked up without it, its own types (and listing the table) bring it in.
    import ml_dtypes

    from ckptconv.formats import msgpack_stream as ms
    from ckptconv.formats import safetensors as st

    seen = []

    def make(ml):
        seen.append(ml)
        out = {"float32": np.dtype(np.float32)}
        if ml is not None:
            out["bfloat16"] = np.dtype(ml.bfloat16)
        return out

    table = ms.DtypeTable(make)
    assert table["float32"] == np.float32 and table.get("float8") is None and seen == [None, ml_dtypes]
    assert table["bfloat16"] == ml_dtypes.bfloat16 and list(table) == ["float32", "bfloat16"]
    assert ms.FLAX_DTYPES["bfloat16"] == ml_dtypes.bfloat16 and ms.FLAX_DTYPES["int8"] == np.int8
    assert st.DTYPES["F8_E4M3"] == ml_dtypes.float8_e4m3fn and st._NAMES[np.dtype(ml_dtypes.bfloat16)] == "BF16"
    assert list(st.DTYPES)[9:12] == ["F16", "BF16", "F32"]

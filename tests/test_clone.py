"""The clone engine (IN's OCDBT database cloned, keys renamed; with
``copy=True`` its data files copied whole) against the chunk-copy engine
(``CKPTCONV_CLONE=0``, `_by_chunks`): same restored values, IN untouched, OUT
independent of IN."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import ckptconv
from ckptconv.errors import CkptconvError
from ckptconv.formats.orbax_stream import clone
from tests.conftest import digest

N = 4


def _layer(rng: np.random.Generator) -> dict:
    return {
        "attn": {"q": rng.standard_normal((6, 5), dtype=np.float32), "b": rng.standard_normal(5).astype(np.float16)},
        "mlp": {"w": rng.integers(-100, 100, (3, 6, 2), dtype=np.int8)},
    }


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {**{f"layer_{i}": _layer(rng) for i in range(N)}, "embed": rng.standard_normal((7, 6), dtype=np.float32)}


def _save(tree: dict, path: Path) -> Path:
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path.absolute(), tree)
    return path


def _restore(path: Path) -> dict:
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path.absolute())


def _same(a: dict, b: dict) -> None:
    """Bit for bit: structure, dtypes, shapes, bytes."""
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), path
        assert x.tobytes() == y.tobytes(), path


def _data_files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file() and p.parent.name == "d"]


def _links(path: Path) -> list[int]:
    return sorted(p.stat().st_nlink for p in _data_files(path))


def _state(path: Path) -> dict[str, tuple[str, int, int]]:
    """Every file of ``path``: (sha256, mtime_ns, size)."""
    sums = digest(path)
    return {
        rel: (sums[rel], (path.parent / rel).stat().st_mtime_ns, (path.parent / rel).stat().st_size)
        for rel in sums
    }


def _by_chunks(src: Path, dst: Path, **kw) -> None:
    """``ckptconv.convert`` by the chunk-copy engine (``CKPTCONV_CLONE=0``):
    every chunk read and written into new files, the clone's reference."""
    from ckptconv.formats.orbax_stream import plan

    saved, plan.CLONE = plan.CLONE, False
    try:
        ckptconv.convert(src, dst, **kw)
    finally:
        plan.CLONE = saved


def _data_hashes(path: Path) -> set[str]:
    sums = digest(path)
    return {sums[str(p.relative_to(path.parent))] for p in _data_files(path)}


@pytest.fixture
def loop(tmp_path) -> Path:
    return _save({"params": _params()}, tmp_path / "loop")


@pytest.mark.parametrize("axis", [0, 1])
def test_to_scan_and_back_equal_the_copy_engine(tmp_path, loop, axis):
    before = _state(loop)
    scan = tmp_path / "scan"
    ckptconv.convert(loop, scan, to="scan", axis=axis)
    _by_chunks(loop, tmp_path / "scan_copy", to="scan", axis=axis)
    _same(_restore(scan), _restore(tmp_path / "scan_copy"))
    ckptconv.convert(loop, tmp_path / "scan_own", to="scan", axis=axis, copy=True)
    _same(_restore(tmp_path / "scan_own"), _restore(tmp_path / "scan_copy"))
    stacked = _restore(scan)["params"]["blocks"]
    assert stacked["attn"]["q"].shape == ((N, 6, 5) if axis == 0 else (6, N, 5))
    np.testing.assert_array_equal(
        np.take(stacked["mlp"]["w"], 2, axis=axis), _params()["layer_2"]["mlp"]["w"]
    )
    # OUT shares IN's data files; the copy engine's are its own, and so are
    # --copy's: IN's files copied whole (same bytes), not chunks rewritten.
    assert max(_links(scan)) >= 2 and _links(tmp_path / "scan_copy") == [1] * len(_data_files(tmp_path / "scan_copy"))
    assert _links(tmp_path / "scan_own") == [1] * len(_data_files(tmp_path / "scan_own"))
    assert _data_hashes(loop) <= _data_hashes(tmp_path / "scan_own")
    assert not _data_hashes(loop) & _data_hashes(tmp_path / "scan_copy")
    back = tmp_path / "back"
    ckptconv.convert(scan, back, to="loop")  # from the record: axis and names
    _by_chunks(tmp_path / "scan_copy", tmp_path / "back_copy", to="loop")
    _same(_restore(back), _restore(tmp_path / "back_copy"))
    ckptconv.convert(tmp_path / "scan_own", tmp_path / "back_own", to="loop", copy=True)
    _same(_restore(tmp_path / "back_own"), _restore(tmp_path / "back_copy"))
    assert _links(tmp_path / "back_own") == [1] * len(_data_files(tmp_path / "back_own"))
    _same(_restore(back), {"params": _params()})
    assert max(_links(back)) >= 3  # IN, scan and back share the layers' files
    assert _state(loop) == before


def test_out_reads_after_in_is_deleted(tmp_path, loop):
    scan = tmp_path / "scan"
    ckptconv.convert(loop, scan, to="scan")
    expected = _restore(tmp_path / "loop")
    shutil.rmtree(loop)
    assert _links(scan) == [1] * len(_data_files(scan))
    got = _restore(scan)["params"]
    for i in range(N):
        np.testing.assert_array_equal(got["blocks"]["attn"]["q"][i], expected["params"][f"layer_{i}"]["attn"]["q"])
    np.testing.assert_array_equal(got["embed"], expected["params"]["embed"])
    # ... and IN is still readable when OUT is deleted first.
    back = tmp_path / "back"
    ckptconv.convert(scan, back, to="loop")
    shutil.rmtree(scan)
    _same(_restore(back), expected)


def test_copy_shares_nothing(tmp_path, loop, cli):
    r = cli("to-scan", loop, tmp_path / "scan", "--copy")
    assert r.exit_code == 0, r.output
    assert _links(loop) == [1] * len(_data_files(loop))
    assert _links(tmp_path / "scan") == [1] * len(_data_files(tmp_path / "scan"))
    assert _data_hashes(loop) <= _data_hashes(tmp_path / "scan")  # the clone, its files copied whole
    r = cli("to-scan", loop, tmp_path / "shared")
    assert r.exit_code == 0, r.output
    _same(_restore(tmp_path / "scan"), _restore(tmp_path / "shared"))
    assert max(_links(loop)) == 2


def test_extract_without_options_shares_and_with_only_copies(tmp_path, loop, cli):
    assert cli("extract", loop, tmp_path / "same").exit_code == 0
    _same(_restore(tmp_path / "same"), _restore(loop))
    assert min(_links(tmp_path / "same")) >= 2 or not _data_files(tmp_path / "same")
    # --only keeps a small part: the copy engine, so that OUT does not keep
    # IN's other arrays alive in shared files.
    r = cli("extract", loop, tmp_path / "embed", "--only", "params/embed")
    assert r.exit_code == 0, r.output
    assert _links(tmp_path / "embed") == [1] * len(_data_files(tmp_path / "embed"))
    np.testing.assert_array_equal(_restore(tmp_path / "embed")["params"]["embed"], _params()["embed"])


def test_cast_uses_the_copy_engine(tmp_path, loop):
    ckptconv.convert(loop, tmp_path / "bf16", to="scan", dtype="bfloat16")
    assert _links(tmp_path / "bf16") == [1] * len(_data_files(tmp_path / "bf16"))
    assert str(_restore(tmp_path / "bf16")["params"]["blocks"]["attn"]["q"].dtype) == "bfloat16"


def test_train_state_with_opt_state(tmp_path):
    params = _params(1)
    zeros = jax.tree_util.tree_map(np.zeros_like, params)
    state = {
        "step": np.int32(3),
        "params": params,
        "opt_state": [{"count": np.int32(3), "mu": zeros, "nu": jax.tree_util.tree_map(np.ones_like, params)}, {}],
    }
    src = _save(state, tmp_path / "state")
    before = _state(src)
    ckptconv.convert(src, tmp_path / "scan", to="scan")
    _by_chunks(src, tmp_path / "scan_copy", to="scan")
    got = _restore(tmp_path / "scan")
    _same(got, _restore(tmp_path / "scan_copy"))
    assert got["opt_state"][0]["nu"]["blocks"]["attn"]["q"].shape == (N, 6, 5)
    assert max(_links(tmp_path / "scan")) >= 2
    assert _state(src) == before


def test_manager_root(tmp_path):
    root = (tmp_path / "run").absolute()
    with ocp.CheckpointManager(root) as mngr:
        for step in (1, 2):
            mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": _params(step)})))
        mngr.wait_until_finished()
    before = _state(root)
    ckptconv.convert(root, tmp_path / "scan", to="scan")
    _by_chunks(root, tmp_path / "scan_copy", to="scan")

    def restored(path: Path) -> dict:
        with ocp.CheckpointManager(path.absolute()) as m:
            assert m.latest_step() == 2
            return m.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]

    _same(restored(tmp_path / "scan"), restored(tmp_path / "scan_copy"))
    np.testing.assert_array_equal(
        restored(tmp_path / "scan")["params"]["blocks"]["attn"]["q"][3], _params(2)["layer_3"]["attn"]["q"]
    )
    assert max(_links(tmp_path / "scan")) >= 2
    ckptconv.convert(tmp_path / "scan", tmp_path / "back", to="loop")
    _same(restored(tmp_path / "back"), {"params": _params(2)})
    assert _state(root) == before


@pytest.mark.parametrize("where", ["sharing", "renaming", "metadata"])
def test_failure_half_way_leaves_in_unchanged_and_no_out(tmp_path, loop, monkeypatch, where):
    from ckptconv.formats.orbax_stream import plan

    before = _state(loop)
    if where == "sharing":
        real_share = clone.share_file
        count = iter(range(10**6))

        def share_file(src, dst, shared):
            if next(count) == 2:
                raise OSError(28, "No space left on device")
            real_share(src, dst, shared)

        monkeypatch.setattr(clone, "share_file", share_file)
    elif where == "renaming":
        real_rename = clone.rename_keys

        async def rename_keys(kv, moves, writes, drops):
            await real_rename(kv, moves[: len(moves) // 2], {}, [])  # half committed ...
            raise RuntimeError("boom")  # ... then a failure

        monkeypatch.setattr(clone, "rename_keys", rename_keys)
    else:
        def write_files(self, tmp, dst, *, sync):
            raise KeyboardInterrupt

        monkeypatch.setattr(plan._Plan, "write_files", write_files)
    with pytest.raises((CkptconvError, KeyboardInterrupt)):
        ckptconv.convert(loop, tmp_path / "scan", to="scan")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop"]
    assert _state(loop) == before
    assert _links(loop) == [1] * len(_data_files(loop))


def test_different_filesystem_copies_whole_files(tmp_path, loop, monkeypatch):
    def no_link(src, dst, *, follow_symlinks=True):
        raise OSError(18, "Invalid cross-device link")  # EXDEV

    monkeypatch.setattr(os, "link", no_link)
    ckptconv.convert(loop, tmp_path / "scan", to="scan")
    _by_chunks(loop, tmp_path / "scan_copy", to="scan")
    _same(_restore(tmp_path / "scan"), _restore(tmp_path / "scan_copy"))
    assert _links(tmp_path / "scan") == [1] * len(_data_files(tmp_path / "scan"))
    assert _data_hashes(loop) <= _data_hashes(tmp_path / "scan")  # whole-file copies


def test_prefix_range():
    r = clone.prefix_range("params.layer_1/")
    # tensorstore 0.1.86 gives the bounds as bytes, 0.1.77 as str.
    got = tuple(x.encode() if isinstance(x, str) else x for x in (r.inclusive_min, r.exclusive_max))
    assert got == (b"params.layer_1/", b"params.layer_10")


@pytest.mark.parametrize("value, on", [("0", False), ("false", False), (" Off ", False), ("no", False), ("1", True), ("", True)])
def test_clone_switch_values(value, on):
    import subprocess
    import sys

    code = "from ckptconv.formats.orbax_stream import plan; print(plan.CLONE)"
    env = {**os.environ, "CKPTCONV_CLONE": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout == f"{on}\n"

"""safetensors files and model.safetensors.index.json directories."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
from conftest import digest
from safetensors.numpy import load_file, save_file

import ckptconv
from ckptconv.errors import CkptconvError
from ckptconv.formats import safetensors as st

LAYERS = 3
HIDDEN = 16
BF16 = np.dtype(ml_dtypes.bfloat16)
F8 = np.dtype(ml_dtypes.float8_e4m3fn)
META = {"format": "flax", "note": "tiny llama"}


def llama(seed: int = 0) -> dict[str, np.ndarray]:
    """HF Llama's flat names, tiny, with BF16 and F8 tensors."""
    rng = np.random.default_rng(seed)
    flat = {"model.embed_tokens.embedding": rng.standard_normal((40, HIDDEN), dtype=np.float32)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        flat[f"{p}.self_attn.q_proj.kernel"] = rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32)
        flat[f"{p}.self_attn.k_proj.kernel"] = rng.standard_normal((HIDDEN, 8)).astype(BF16)
        flat[f"{p}.mlp.down_proj.kernel"] = rng.standard_normal((32, HIDDEN)).astype(F8)
        flat[f"{p}.mlp.down_proj.qscale"] = rng.integers(-9, 9, (HIDDEN,)).astype(np.int8)
        flat[f"{p}.input_layernorm.weight"] = rng.standard_normal(HIDDEN).astype(np.float16)
    flat["model.norm.weight"] = rng.standard_normal(HIDDEN, dtype=np.float32)
    flat["lm_head.kernel"] = rng.standard_normal((HIDDEN, 40), dtype=np.float32)
    return flat


def lib_save(flat: dict[str, np.ndarray], path: Path, metadata=None) -> Path:
    """The safetensors library's writer (its TensorSpec path takes BF16 and F8)."""
    specs = {
        k: safetensors.TensorSpec(
            dtype=v.dtype.name, shape=list(v.shape), data_ptr=v.ctypes.data, data_len=v.nbytes
        )
        for k, v in flat.items()
    }
    Path(path).write_bytes(bytes(safetensors.serialize(specs, metadata=metadata)))
    return Path(path)


def lib_load(path: Path) -> tuple[dict[str, np.ndarray], dict | None]:
    """The library's reader: raw bytes per tensor, dtypes by safetensors name."""
    data = Path(path).read_bytes()
    out = {
        name: np.frombuffer(bytes(t["data"]), dtype=st.DTYPES[t["dtype"]]).reshape(t["shape"])
        for name, t in safetensors.deserialize(data)
    }
    with safetensors.safe_open(path, framework="np") as f:
        meta = f.metadata()
    return out, meta


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a
    )


def scan_of(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: v for k, v in flat.items() if ".layers." not in k}
    names = {k.split(".", 3)[3] for k in flat if ".layers." in k}
    for n in names:
        out[f"model.layers.{n}"] = np.stack([flat[f"model.layers.{i}.{n}"] for i in range(LAYERS)])
    return out


def aligned(path: Path) -> bool:
    n = struct.unpack("<Q", Path(path).read_bytes()[:8])[0]
    return (8 + n) % 8 == 0


def test_header_reader_agrees_with_the_library(tmp_path):
    flat = llama()
    path = lib_save(flat, tmp_path / "m.safetensors", metadata=META)
    header = st.read_header(path)
    assert header.metadata == META
    data = path.read_bytes()
    lib = dict(safetensors.deserialize(data))
    assert sorted(t.name for t in header.tensors) == sorted(lib)
    for t in header.tensors:
        assert (st.DTYPES[lib[t.name]["dtype"]], list(t.shape)) == (t.dtype, lib[t.name]["shape"])
        assert data[t.begin : t.end] == bytes(lib[t.name]["data"])
    # numpy's own loader, for the dtypes it knows
    plain = {k: v for k, v in flat.items() if v.dtype not in (BF16, F8)}
    save_file(plain, tmp_path / "plain.safetensors")
    assert same(_flat(ckptconv.load(tmp_path / "plain.safetensors")), load_file(tmp_path / "plain.safetensors"))
    # and the library reads what ckptconv writes
    ckptconv.save({"a": {"b": plain["model.norm.weight"]}}, tmp_path / "w.safetensors", format="safetensors")
    assert same(load_file(tmp_path / "w.safetensors"), {"a.b": plain["model.norm.weight"]})


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _kept(meta: dict, command: str) -> dict:
    """The input's metadata, with ckptconv's record beside it (a JSON string)."""
    meta = dict(meta)
    rec = json.loads(meta.pop("ckptconv"))
    assert rec["command"] == command, rec
    return meta


def test_to_scan_and_back_bit_for_bit(tmp_path):
    flat = llama()
    src = lib_save(flat, tmp_path / "model.safetensors", metadata=META)
    before = digest(src)
    res = ckptconv.convert(src, tmp_path / "scan.safetensors", to="scan")
    assert [(g.path, g.into, g.num_layers) for g in res.groups] == [(("model",), "layers", LAYERS)]
    got, meta = lib_load(tmp_path / "scan.safetensors")
    assert same(got, scan_of(flat)) and _kept(meta, "to-scan") == META and aligned(tmp_path / "scan.safetensors")
    ckptconv.convert(
        tmp_path / "scan.safetensors", tmp_path / "loop.safetensors", to="loop", source="layers", pattern="{i}"
    )
    back, meta = lib_load(tmp_path / "loop.safetensors")
    assert same(back, flat) and _kept(meta, "to-loop") == META
    assert digest(src) == before


def shard_safetensors(flat: dict, folder: Path, max_shard_size: int) -> Path:
    """HF's sharded safetensors layout (model-0000K-of-0000N.safetensors + index)."""
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    blocks, current = [{}], 0
    for k, v in flat.items():
        if blocks[-1] and current + v.nbytes > max_shard_size:
            blocks.append({})
            current = 0
        blocks[-1][k] = v
        current += v.nbytes
    wm = {}
    for i, b in enumerate(blocks):
        name = f"model-{i + 1:05d}-of-{len(blocks):05d}.safetensors"
        lib_save(b, folder / name, metadata={"format": "pt"})
        wm.update(dict.fromkeys(b, name))
    index = {"metadata": {"total_size": sum(v.nbytes for v in flat.values())}, "weight_map": wm}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def read_sharded(folder: Path, command: str | None = None) -> tuple[dict, dict, dict]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    merged, sizes = {}, {}
    for name in sorted(set(index["weight_map"].values())):
        part, meta = lib_load(folder / name)
        if command is not None:
            meta = _kept(meta, command)
        assert meta == {"format": "pt"} and aligned(folder / name)
        assert all(index["weight_map"][k] == name for k in part)
        merged.update(part)
        sizes[name] = sum(v.nbytes for v in part.values())
    assert set(merged) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in merged.values())
    return merged, index, sizes


def test_sharded_directory_keeps_its_layout(tmp_path):
    flat = llama()
    src = shard_safetensors(flat, tmp_path / "llama", max_shard_size=1500)
    _, _, in_sizes = read_sharded(src)
    assert len(in_sizes) >= 3
    ckptconv.convert(src, tmp_path / "scan", to="scan")
    got, index, sizes = read_sharded(tmp_path / "scan", "to-scan")
    assert same(got, scan_of(flat))
    for name, size in sizes.items():
        assert size <= max(in_sizes.values()) or list(index["weight_map"].values()).count(name) == 1
    assert (tmp_path / "scan" / "config.json").read_text() == '{"model_type": "llama"}'
    ckptconv.convert(tmp_path / "scan", tmp_path / "loop", to="loop", source="layers", pattern="{i}")
    assert same(read_sharded(tmp_path / "loop", "to-loop")[0], flat)


def test_a_sharded_directory_into_an_out_named_as_a_file(tmp_path):
    """OUT named *.safetensors from a sharded directory: one file, the shards
    merged (the directory's __metadata__ kept), not a folder of that name."""
    flat = llama()
    src = shard_safetensors(flat, tmp_path / "llama", max_shard_size=1500)
    ckptconv.convert(src, tmp_path / "scan.safetensors", to="scan")
    assert (tmp_path / "scan.safetensors").is_file() and aligned(tmp_path / "scan.safetensors")
    got, meta = lib_load(tmp_path / "scan.safetensors")
    assert same(got, scan_of(flat)) and _kept(meta, "to-scan") == {"format": "pt"}
    ckptconv.extract(src, tmp_path / "copy.safetensors")
    got, meta = lib_load(tmp_path / "copy.safetensors")
    assert same(got, flat) and _kept(meta, "extract") == {"format": "pt"}


def test_cross_format(tmp_path):
    from flax.serialization import msgpack_restore

    flat = llama()
    src = lib_save(flat, tmp_path / "m.safetensors", metadata=META)
    ckptconv.convert(src, tmp_path / "scan.msgpack", to="scan", format="msgpack")
    tree = msgpack_restore((tmp_path / "scan.msgpack").read_bytes())
    assert same(_flat(tree), scan_of(flat))
    # msgpack and orbax in, safetensors out (the metadata HF Flax writes)
    ckptconv.convert(tmp_path / "scan.msgpack", tmp_path / "loop.safetensors", to="loop",
                     format="safetensors", source="layers", pattern="{i}")
    got, meta = lib_load(tmp_path / "loop.safetensors")
    assert same(got, flat) and _kept(meta, "to-loop") == {"format": "flax"}
    ckptconv.save(tree, tmp_path / "orbax", format="orbax")
    ckptconv.convert(tmp_path / "orbax", tmp_path / "o.safetensors", to="loop", format="safetensors",
                     source="layers", pattern="{i}")
    assert same(lib_load(tmp_path / "o.safetensors")[0], flat)


def test_unstorable_leaves_are_errors(tmp_path):
    with pytest.raises(CkptconvError, match=r"leaf 'a/b' is NoneType None, which safetensors cannot store"):
        ckptconv.save({"a": {"b": None}}, tmp_path / "x.safetensors", format="safetensors")
    with pytest.raises(CkptconvError, match=r"leaf 'a' is also a prefix of leaf 'a.b'"):
        ckptconv.save({"a": np.zeros(2), "a.b": np.ones(1)}, tmp_path / "y.safetensors", format="safetensors")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
    # A train state: the way out is its params.
    state = {"params": {"w": np.ones(2, np.float32)}, "opt_state": [{"count": np.int32(1)}, None]}
    with pytest.raises(CkptconvError) as e:
        ckptconv.save(state, tmp_path / "s.safetensors")
    assert str(e.value) == (
        f"cannot write '{tmp_path / 's.safetensors'}': leaf 'opt_state/1' is NoneType None, which "
        "safetensors cannot store; keep the params only (--only params, or --root params), or write "
        "msgpack or orbax instead (--format)."
    )


# --------------------------------------------------------------------------- lying headers


def raw_file(path: Path, header: dict, data: bytes, length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def entry(offsets, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def layers_header(**override):
    h = {f"model.layers.{i}.w": entry((8 * i, 8 * i + 8)) for i in range(2)}
    h.update(override)
    return h


BAD = {
    "beyond": (
        layers_header(**{"model.layers.1.w": entry((8, 24), shape=(4,))}),
        "tensor 'model.layers.1.w' lies at data bytes 8..24 but the data holds 16 bytes",
    ),
    "overlap": (
        layers_header(**{"model.layers.1.w": entry((4, 12))}),
        "tensors 'model.layers.0.w' and 'model.layers.1.w' overlap (data bytes 0..8 and 4..12)",
    ),
    "gap": (
        {"model.layers.0.w": entry((0, 8)), "model.layers.1.w": entry((12, 16), shape=(1,))},
        "4 bytes before tensor 'model.layers.1.w' belong to no tensor (data_offsets must be contiguous)",
    ),
    "shape": (
        layers_header(**{"model.layers.1.w": entry((8, 16), shape=(3,))}),
        "tensor 'model.layers.1.w' of shape (3,) and dtype F32 needs 12 bytes but its data_offsets [8, 16] hold 8",
    ),
    "prefix": (
        {"model.layers.0": entry((0, 8)), "model.layers.0.w": entry((8, 16))},
        None,
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_lying_headers_exit_2_and_leave_nothing(tmp_path, cli, case):
    header, what = BAD[case]
    src = raw_file(tmp_path / "in.safetensors", header, bytes(16))
    before = digest(src)
    out = tmp_path / "out.safetensors"
    r = cli("to-scan", src, out)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    if what is None:
        want = (f"Error: {src}: tensor 'model.layers.0' is also a prefix of tensor 'model.layers.0.w'; "
                "ckptconv splits names on '.' into a tree, which cannot hold both. Rename one of them.")
    else:
        want = f"Error: {src}: not a valid safetensors file: {what}. {st._ADVICE}"
    assert lines[0] == want
    assert digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_length_field_larger_than_the_file(tmp_path, cli):
    src = raw_file(tmp_path / "in.safetensors", layers_header(), bytes(16), length=1 << 62)
    r = cli("to-scan", src, tmp_path / "out")
    assert r.exit_code == 2
    size = src.stat().st_size
    assert r.output.strip() == (
        f"Error: {src}: not a valid safetensors file: the header length field says {1 << 62} bytes "
        f"but only {size - 8} bytes follow it. {st._ADVICE}"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_fuzzed_headers_raise_only_ckptconv_errors(tmp_path):
    good = lib_save(llama(), tmp_path / "good.safetensors", metadata=META).read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    rng = np.random.default_rng(7)
    path = tmp_path / "f.safetensors"
    outcomes = set()
    for _ in range(300):
        data = bytearray(good)
        kind = rng.integers(4)
        if kind == 0:  # flip bytes in the header
            for at in rng.integers(8, 8 + n, rng.integers(1, 4)):
                data[at] = int(rng.integers(256))
        elif kind == 1:  # a wrong length field
            data[:8] = struct.pack("<Q", int(rng.integers(0, 2**63)) if rng.random() < 0.5 else n + int(rng.integers(-9, 9)))
        elif kind == 2:  # truncated
            data = data[: int(rng.integers(0, len(data)))]
        else:  # digits changed (shapes, offsets)
            digits = [i for i in range(8, 8 + n) if chr(data[i]).isdigit()]
            for at in rng.choice(digits, 2):
                data[at] = ord(str(rng.integers(10)))
        path.write_bytes(bytes(data))
        try:
            st.read_lazy(path)
            outcomes.add("ok")
        except CkptconvError:
            outcomes.add("error")
    assert outcomes == {"ok", "error"}

"""Hugging Face sharded Flax msgpack directories, written as ``save_pretrained`` writes them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import digest
from flax.serialization import msgpack_restore, to_bytes
from flax.traverse_util import flatten_dict, unflatten_dict

import ckptconv

LAYERS = 4
HIDDEN = 16
INDEX = "flax_model.msgpack.index.json"
SHARD_RE = re.compile(r"^flax_model-(\d{5})-of-(\d{5})\.msgpack$")


def gpt2_params(seed: int = 0) -> dict:
    """GPT-2's Flax parameter names and shapes, tiny."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    h = {
        str(i): {
            "ln_1": {"scale": w(HIDDEN), "bias": w(HIDDEN)},
            "attn": {
                "c_attn": {"kernel": w(HIDDEN, 3 * HIDDEN), "bias": w(3 * HIDDEN)},
                "c_proj": {"kernel": w(HIDDEN, HIDDEN), "bias": w(HIDDEN)},
            },
            "ln_2": {"scale": w(HIDDEN), "bias": w(HIDDEN)},
            "mlp": {
                "c_fc": {"kernel": w(HIDDEN, 4 * HIDDEN), "bias": w(4 * HIDDEN)},
                "c_proj": {"kernel": w(4 * HIDDEN, HIDDEN), "bias": w(HIDDEN)},
            },
        }
        for i in range(LAYERS)
    }
    return {
        "transformer": {
            "wte": {"embedding": w(64, HIDDEN)},
            "wpe": {"embedding": w(32, HIDDEN)},
            "h": h,
            "ln_f": {"scale": w(HIDDEN), "bias": w(HIDDEN)},
        }
    }


def save_pretrained(params: dict, folder: Path, max_shard_size: int) -> Path:
    """What ``FlaxPreTrainedModel.save_pretrained`` writes above its shard size
    (``flax_shard_checkpoint``, then ``to_bytes(unflatten_dict(shard, sep="/"))``)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": LAYERS}))
    (folder / "generation_config.json").write_text("{}\n")
    blocks, current, total = [{}], 0, 0
    for key, value in flatten_dict(params, sep="/").items():
        size = value.size * value.dtype.itemsize
        if current + size > max_shard_size:
            blocks.append({})
            current = 0
        blocks[-1][key] = value
        current += size
        total += size
    weight_map = {}
    for i, block in enumerate(blocks):
        name = f"flax_model-{i + 1:05d}-of-{len(blocks):05d}.msgpack"
        (folder / name).write_bytes(to_bytes(unflatten_dict(block, sep="/")))
        weight_map.update(dict.fromkeys(block, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def read_dir(folder: Path) -> tuple[dict, dict, dict]:
    """(merged flat tree from flax's own reader, index, per-shard array bytes)."""
    index = json.loads((folder / INDEX).read_text())
    merged, per_shard = {}, {}
    shards = sorted(p.name for p in folder.iterdir() if SHARD_RE.match(p.name))
    for name in shards:
        flat = flatten_dict(msgpack_restore((folder / name).read_bytes()), sep="/")
        assert not set(flat) & set(merged)
        merged.update(flat)
        per_shard[name] = sum(v.nbytes for v in flat.values())
        for key in flat:
            assert index["weight_map"][key] == name
    assert set(index["weight_map"]) == set(merged)
    assert set(index["weight_map"].values()) == set(shards)
    assert {int(SHARD_RE.match(s).group(2)) for s in shards} == {len(shards)}
    assert [int(SHARD_RE.match(s).group(1)) for s in shards] == list(range(1, len(shards) + 1))
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in merged.values())
    return merged, index, per_shard


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k])
        for k in a
    )


@pytest.fixture
def hf_dir(tmp_path):
    params = gpt2_params()
    return params, save_pretrained(params, tmp_path / "gpt2", max_shard_size=6000)


def test_to_scan_stacks_across_shards_and_keeps_the_layout(tmp_path, hf_dir):
    params, src = hf_dir
    _, _, in_shards = read_dir(src)
    assert len(in_shards) >= 3
    largest = max(in_shards.values())
    before = digest(src)

    ckptconv.convert(src, tmp_path / "scan", to="scan")

    got, index, out_shards = read_dir(tmp_path / "scan")
    h = params["transformer"]["h"]
    want = flatten_dict({k: v for k, v in params["transformer"].items() if k != "h"}, sep="/")
    want = {f"transformer/{k}": v for k, v in want.items()}
    for key in flatten_dict(h["0"], sep="/"):
        path = tuple(key.split("/"))
        want[f"transformer/h/{key}"] = np.stack(
            [flatten_dict(h[str(i)])[path] for i in range(LAYERS)]
        )
    assert same(got, want)
    # Shards no larger than the input's largest, unless one leaf alone is bigger.
    for name, size in out_shards.items():
        keys = [k for k, v in index["weight_map"].items() if v == name]
        assert size <= largest or len(keys) == 1, (name, size, largest)
    assert any(got[k].nbytes > largest for k in got)  # the stacked c_fc kernel is alone
    assert (tmp_path / "scan" / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (tmp_path / "scan" / "generation_config.json").exists()
    text = (tmp_path / "scan" / INDEX).read_text()
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert digest(src) == before

    # And back: the input tree, bit for bit.
    ckptconv.convert(tmp_path / "scan", tmp_path / "loop", to="loop", source="h", pattern="{i}")
    back, _, _ = read_dir(tmp_path / "loop")
    assert same(back, flatten_dict(params, sep="/"))
    assert same(
        flatten_dict(ckptconv.load(tmp_path / "loop"), sep="/"), flatten_dict(params, sep="/")
    )


def test_cross_format_to_safetensors_and_orbax(tmp_path, hf_dir):
    from safetensors.numpy import load_file

    params, src = hf_dir
    ckptconv.convert(src, tmp_path / "scan.safetensors", to="scan", format="safetensors")
    got = load_file(tmp_path / "scan.safetensors")
    scan = flatten_dict(ckptconv.to_scan(params), sep=".")
    assert same(got, scan)

    ckptconv.convert(src, tmp_path / "scan_orbax", to="scan", format="orbax")
    assert same(flatten_dict(ckptconv.load(tmp_path / "scan_orbax"), sep="."), scan)


def test_cli_converts_a_sharded_directory(tmp_path, hf_dir, cli):
    _, src = hf_dir
    r = cli("to-scan", src, tmp_path / "scan")
    assert r.exit_code == 0, r.output
    assert "transformer/h" in r.output
    n = len(list((tmp_path / "scan").glob("flax_model-*-of-*.msgpack")))
    assert n >= 2 and f"wrote {tmp_path / 'scan'} (msgpack in {n} shards, " in r.output


def test_an_out_named_as_a_file_gets_one_file(tmp_path, hf_dir, cli):
    """A trial: to-loop of a sharded directory into hf/flax_model.msgpack made
    a folder of that name, which from_pretrained does not read. OUT named as a
    file of the format is one file, the shards merged: what
    to_bytes(params) writes, byte for byte; OUT/ (or no suffix) stays sharded."""
    params, src = hf_dir
    (tmp_path / "hf").mkdir()
    r = cli("extract", src, tmp_path / "hf" / "flax_model.msgpack")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "hf" / "flax_model.msgpack").read_bytes() == to_bytes(params)
    r = cli("to-scan", src, tmp_path / "scan.msgpack")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "scan.msgpack").is_file()
    assert same(flatten_dict(msgpack_restore((tmp_path / "scan.msgpack").read_bytes()), sep="/"),
                flatten_dict(ckptconv.to_scan(params), sep="/"))
    r = cli("to-scan", src, f"{tmp_path / 'scan_dir'}/")  # a folder: sharded as IN
    assert r.exit_code == 0, r.output
    assert (tmp_path / "scan_dir" / INDEX).is_file()
    assert len(list((tmp_path / "scan_dir").glob("flax_model-*.msgpack"))) >= 2
    r = cli("to-scan", src, f"{tmp_path / 'named.msgpack'}/")  # the '/' wins over the suffix
    assert r.exit_code == 0, r.output
    assert (tmp_path / "named.msgpack" / INDEX).is_file()


def _error_line(r) -> str:
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    return lines[0]


def _nothing_beside(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def test_missing_shard_is_an_error(tmp_path, hf_dir, cli):
    _, src = hf_dir
    second = sorted(set(json.loads((src / INDEX).read_text())["weight_map"].values()))[1]
    (src / second).unlink()
    before = digest(src)
    out = tmp_path / "scan"
    line = _error_line(cli("to-scan", src, out))
    assert line.startswith(f"Error: {src}: shard '{second}' listed in {INDEX} is missing (")
    assert line.endswith("); copy the whole directory again.")
    assert digest(src) == before
    _nothing_beside(out)


def test_leaf_missing_from_its_shard_is_an_error(tmp_path, hf_dir, cli):
    _, src = hf_dir
    index = json.loads((src / INDEX).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["transformer/extra/kernel"] = first
    (src / INDEX).write_text(json.dumps(index))
    before = digest(src)
    out = tmp_path / "scan"
    line = _error_line(cli("to-scan", src, out))
    assert line == (
        f"Error: {src / first}: leaf 'transformer/extra/kernel' is "
        f"listed in {INDEX} but missing from this shard; the shard and the index do not match "
        "(an interrupted copy or save?); copy the whole directory again."
    )
    assert digest(src) == before
    _nothing_beside(out)


def test_the_index_or_one_shard_given_as_in_names_the_folder(tmp_path, hf_dir, cli):
    """A trial pointed at the index ("not a checkpoint ckptconv can read"), and
    at one shard, which was converted alone into a partial checkpoint (exit 0)."""
    _, src = hf_dir
    n = len(list(src.glob("flax_model-*.msgpack")))
    shard = src / f"flax_model-00002-of-{n:05d}.msgpack"
    for cmd in (("to-scan",), ("extract",), ("inspect",)):
        out = [tmp_path / "out"] if cmd[0] != "inspect" else []
        assert _error_line(cli(*cmd, src / INDEX, *out)) == (
            f"Error: {src / INDEX}: the index of a Hugging Face sharded checkpoint; pass its "
            f"folder: {src}")
        assert _error_line(cli(*cmd, shard, *out)) == (
            f"Error: {shard}: shard 2 of {n} of the Hugging Face sharded checkpoint in {src} "
            f"({INDEX}); one shard holds a part of the model: pass the folder: {src}")
        _nothing_beside(tmp_path / "out")
    # Without its index beside it, a file so named is just a msgpack file.
    lone = tmp_path / shard.name
    lone.write_bytes(shard.read_bytes())
    assert cli("inspect", lone).exit_code == 0

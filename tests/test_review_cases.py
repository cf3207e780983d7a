"""Edge cases found in review: each once converted wrongly or crashed."""

from __future__ import annotations

import json

import flax.linen as nn
import flax.serialization
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

import ckptconv
from ckptconv.verify.intermediates import _compare


def test_orbax_source_without_fill_value_chunks(tmp_path):
    """Older Orbax left out all-zero chunks and said so in _METADATA."""
    tree = {"params": {f"layer_{i}": {"b": np.zeros(3, np.float32), "w": np.full((2, 3), i + 1.0, np.float32)} for i in range(2)}}
    src = tmp_path / "old"
    with ocp.StandardCheckpointer() as c:
        c.save(src.absolute(), tree)
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{src.absolute()}/"}).result()
    for i in range(2):
        kv.delete_range(ts.KvStore.KeyRange(f"params.layer_{i}.b/0", f"params.layer_{i}.b/0\x00")).result()
    meta = json.loads((src / "_METADATA").read_text())
    meta["store_array_data_equal_to_fill_value"] = False
    (src / "_METADATA").write_text(json.dumps(meta))
    ckptconv.convert(src, tmp_path / "scan", to="scan")
    with ocp.PyTreeCheckpointer() as c:
        got = c.restore((tmp_path / "scan").absolute())
    np.testing.assert_array_equal(got["params"]["blocks"]["b"], np.zeros((2, 3), np.float32))
    np.testing.assert_array_equal(got["params"]["blocks"]["w"][1], np.full((2, 3), 2.0, np.float32))


class _Loop(nn.Module):
    def setup(self):
        self.layers = [nn.Dense(4) for _ in range(3)]
        self.head = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_sgd_train_state_and_sequential_head(tmp_path, cli):
    from flax.training.train_state import TrainState

    model = _Loop()
    params = model.init(jax.random.PRNGKey(0), np.ones((1, 4), np.float32))["params"]
    assert sorted(params["head"]) == ["layers_0", "layers_2"]  # nn.Sequential's own numbering
    state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))
    src = tmp_path / "sgd.msgpack"
    src.write_bytes(flax.serialization.to_bytes(state))
    r = cli("to-scan", src, tmp_path / "out.msgpack")
    assert r.exit_code == 0, r.output
    assert [line for line in r.output.splitlines() if "->" in line] == ["params/layers_{i}: 3 layers -> params/blocks"]
    raw = flax.serialization.msgpack_restore((tmp_path / "out.msgpack").read_bytes())
    assert raw["opt_state"] == {"0": {}, "1": {}}
    assert sorted(raw["params"]["head"]) == ["layers_0", "layers_2"]
    assert raw["params"]["blocks"]["kernel"].shape == (3, 4, 4)


def test_alike_layers_with_a_gap_are_still_an_error():
    t = {f"layers_{i}": {"w": np.zeros((2, 2), np.float32)} for i in (0, 2)}
    with pytest.raises(ckptconv.GroupError, match="missing layers_1"):
        ckptconv.to_scan(t)


def test_nested_nnx_lists_with_int_keys():
    w = lambda: {"w": np.ones((2, 2), np.float32)}  # noqa: E731
    t = {"stages": {0: {0: w(), 1: w()}, 1: {0: w(), 1: w(), 2: w()}}}
    s = ckptconv.to_scan(t)
    assert s["stages"][0]["w"].shape == (2, 2, 2) and s["stages"][1]["w"].shape == (3, 2, 2)


def test_verify_compare_infinities():
    assert not _compare("x", 0, np.array([-np.inf]), np.array([0.0]), None, None).passed
    assert not _compare("x", 0, np.array([np.inf]), np.array([-np.inf]), None, None).passed
    assert _compare("x", 0, np.array([np.inf, 1.0]), np.array([np.inf, 1.0]), None, None).passed
    assert not _compare("x", 0, np.array([1.0]), np.array([np.nan]), None, None).passed


def test_python_scalars_and_non_arrays():
    t = {f"layer_{i}": {"scale": 1.0, "w": np.zeros((2, 2))} for i in range(2)}
    with pytest.raises(ckptconv.GroupError, match=r"^layer_0/scale: shape \(\) has no room for a layer axis at position 1"):
        ckptconv.to_scan(t, axis=1)
    with pytest.raises(ckptconv.GroupError, match=r"^blocks/c: float 1\.0 is not an array, so it has no layer axis"):
        ckptconv.to_loop({"blocks": {"w": np.zeros((2, 1)), "c": 1.0}})
    with pytest.raises(ckptconv.GroupError, match=r"^blocks: the layer axis 0 has length 0: no layers\."):
        ckptconv.to_loop({"blocks": {"w": np.zeros((0, 3))}})


def test_pattern_with_literal_braces():
    t = {f"a{{x}}_{i}": {"w": np.full(2, i, np.float32)} for i in range(2)}
    s = ckptconv.to_scan(t, pattern="a{x}_{i}")
    assert ckptconv.to_loop(s, pattern="a{x}_{i}").keys() == t.keys()


def test_inspect_reports_inconsistent_layers_and_folds_nnx(tmp_path, cli):
    t = {"params": {"layer_0": {"w": np.zeros((2, 3), np.float32)}, "layer_1": {"w": np.zeros((4, 3), np.float32)}},
         "nnx": {"layers": {str(i): {"k": np.zeros((2, 2), np.float32)} for i in range(5)}}}
    ckptconv.save(t, tmp_path / "ck", format="orbax")
    r = cli("inspect", tmp_path / "ck")
    assert r.exit_code == 0, r.output
    assert "to-scan: cannot: params: the layers to stack differ (1 mismatch):" in r.output
    assert "to-scan would stack" not in r.output
    assert "  nnx/layers/{i}/k" in r.output and r.output.count("nnx/layers/") == 1

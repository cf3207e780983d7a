"""ckptconv.find_groups / to_scan / to_loop on in-memory trees."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

import ckptconv


def _layer(rng, dtype=np.float32, width=4):
    return {
        "Dense_0": {
            "kernel": rng.standard_normal((width, width)).astype(dtype),
            "bias": rng.standard_normal(width).astype(dtype),
        },
        "RMSNorm_0": {"scale": rng.standard_normal(width).astype(dtype)},
        "RMSNorm_1": {"scale": rng.standard_normal(width).astype(dtype)},
    }


def _loop(n=3, dtype=np.float32, prefix="layer", seed=0):
    rng = np.random.default_rng(seed)
    return {f"{prefix}_{i}": _layer(rng, dtype) for i in range(n)}


def assert_trees_equal(a, b):
    """Same structure, same leaf types' dtypes and bits."""
    la, ta = jax.tree_util.tree_flatten(a, is_leaf=lambda x: x is None)
    lb, tb = jax.tree_util.tree_flatten(b, is_leaf=lambda x: x is None)
    assert ta == tb
    for x, y in zip(la, lb):
        if x is None:
            assert y is None
            continue
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_default_groups_keep_auto_numbered_submodules_apart():
    params = {"params": {**_loop(3), "Dense_0": {"kernel": np.zeros(2)}, "Dense_1": {"kernel": np.zeros(2)}}}
    groups = ckptconv.find_groups(params)
    assert [(g.path, g.keys, g.template, g.into) for g in groups] == [
        (("params",), ("layer_0", "layer_1", "layer_2"), "layer_{i}", "blocks")
    ]
    out = ckptconv.to_scan(params)
    assert sorted(out["params"]) == ["Dense_0", "Dense_1", "blocks"]
    assert sorted(out["params"]["blocks"]) == ["Dense_0", "RMSNorm_0", "RMSNorm_1"]
    np.testing.assert_array_equal(
        out["params"]["blocks"]["RMSNorm_1"]["scale"],
        np.stack([params["params"][f"layer_{i}"]["RMSNorm_1"]["scale"] for i in range(3)]),
    )


@pytest.mark.parametrize("prefix", ["layer", "layers", "block", "blocks", "h"])
def test_every_default_prefix(prefix):
    t = {"model": {"deep": _loop(2, prefix=prefix)}}
    (g,) = ckptconv.find_groups(t)
    assert g.path == ("model", "deep") and g.keys == (f"{prefix}_0", f"{prefix}_1")


def test_layers_sorted_numerically_not_lexically():
    t = _loop(12)
    shuffled = {k: t[k] for k in sorted(t)}  # layer_0, layer_1, layer_10, layer_11, layer_2 …
    out = ckptconv.to_scan(shuffled)
    for i in range(12):
        np.testing.assert_array_equal(out["blocks"]["Dense_0"]["kernel"][i], t[f"layer_{i}"]["Dense_0"]["kernel"])


@pytest.mark.parametrize("axis", [0, 1])
def test_stack_values_on_axis(axis):
    t = _loop(3)
    out = ckptconv.to_scan(t, axis=axis)
    kernel = out["blocks"]["Dense_0"]["kernel"]
    assert kernel.shape == ((3, 4, 4) if axis == 0 else (4, 3, 4))
    for i in range(3):
        np.testing.assert_array_equal(np.take(kernel, i, axis=axis), t[f"layer_{i}"]["Dense_0"]["kernel"])
    assert out["blocks"]["RMSNorm_0"]["scale"].shape == ((3, 4) if axis == 0 else (4, 3))


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.int8])
def test_round_trip_bit_exact(axis, dtype):
    rng = np.random.default_rng(1)
    t = {
        "params": {
            **{
                f"layer_{i}": {
                    "w": (rng.standard_normal((3, 5)) * 50).astype(dtype),
                    "v": (rng.standard_normal((2, 3)) * 50).astype(dtype),
                    "empty": {},
                    "nothing": None,
                }
                for i in range(4)
            },
            "step": np.array(7, np.int32),
            "scalar": np.float32(0.5),
            "empty": {},
            "none": None,
            "lst": [np.int8(3), np.zeros(2, jnp.bfloat16)],
        }
    }
    s = ckptconv.to_scan(t, axis=axis)
    assert s["params"]["blocks"]["empty"] == {} and s["params"]["blocks"]["nothing"] is None
    assert s["params"]["blocks"]["w"].dtype == np.dtype(dtype)
    assert_trees_equal(ckptconv.to_loop(s, axis=axis), t)
    assert_trees_equal(ckptconv.to_scan(ckptconv.to_loop(s, axis=axis), axis=axis), s)


def test_stacking_layers_with_0d_leaves():
    t = {f"layer_{i}": {"gate": np.float32(i)} for i in range(3)}
    out = ckptconv.to_scan(t, axis=0)
    np.testing.assert_array_equal(out["blocks"]["gate"], np.array([0, 1, 2], np.float32))


def test_0d_leaf_cannot_take_axis_1():
    t = {f"layer_{i}": {"gate": np.float32(i), "w": np.zeros((2, 2))} for i in range(2)}
    with pytest.raises(ckptconv.GroupError, match=r"^layer_0/gate: shape \(\) has no room for a layer axis at position 1\. Use a smaller --axis"):
        ckptconv.to_scan(t, axis=1)


def test_digit_keyed_nnx_list_stacks_in_place_and_back():
    t = {"model": {"layers": {str(i): _layer(np.random.default_rng(i)) for i in range(3)}, "head": {"w": np.ones(2)}}}
    (g,) = ckptconv.find_groups(t)
    assert (g.path, g.keys, g.template, g.target) == (("model",), ("0", "1", "2"), "{i}", ("model", "layers"))
    s = ckptconv.to_scan(t)
    assert sorted(s["model"]) == ["head", "layers"]
    assert s["model"]["layers"]["Dense_0"]["kernel"].shape == (3, 4, 4)
    back = ckptconv.to_loop(s, source="layers", pattern="{i}")
    assert_trees_equal(back, t)


def test_digit_keyed_tuple_of_unlike_states_is_not_a_group():
    # flax's state dict of an optax tuple: keys '0', '1', '2' holding unlike states.
    t = {"opt_state": {"0": {"count": np.int32(0), "mu": _loop(2)}, "1": {}, "2": {}}}
    groups = ckptconv.find_groups(t)
    assert [(g.path, g.keys) for g in groups] == [(("opt_state", "0", "mu"), ("layer_0", "layer_1"))]


def test_encoder_and_decoder_stacks_both_convert():
    t = {"params": {"encoder": _loop(2, seed=1), "decoder": _loop(3, seed=2)}}
    s = ckptconv.to_scan(t)
    assert s["params"]["encoder"]["blocks"]["Dense_0"]["kernel"].shape == (2, 4, 4)
    assert s["params"]["decoder"]["blocks"]["Dense_0"]["kernel"].shape == (3, 4, 4)
    assert_trees_equal(ckptconv.to_loop(s), t)


def test_pattern_selects_exactly_those_keys():
    t = {"encoder_layer_0": {"w": np.zeros(2)}, "encoder_layer_1": {"w": np.ones(2)}, "layer_0": {"w": np.ones(3)}}
    s = ckptconv.to_scan(t, pattern="encoder_layer_{i}", into="encoder")
    assert sorted(s) == ["encoder", "layer_0"]
    np.testing.assert_array_equal(s["encoder"]["w"], [[0, 0], [1, 1]])
    back = ckptconv.to_loop(s, source="encoder", pattern="encoder_layer_{i}")
    assert_trees_equal(back, t)


def test_whole_adamw_train_state_converts_in_one_call():
    params = {"params": {**_loop(3), "embed": {"embedding": np.ones((5, 4), np.float32)}}}
    tx = optax.adamw(1e-2)
    opt = tx.init(params)
    grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.1, params)
    _, opt = tx.update(grads, opt, params)
    state = {"params": params, "opt_state": opt}
    s = ckptconv.to_scan(state)
    adam = s["opt_state"][0]
    assert type(adam).__name__ == "ScaleByAdamState"
    for moment, src in ((adam.mu, opt[0].mu), (adam.nu, opt[0].nu)):
        for i in range(3):
            np.testing.assert_array_equal(
                moment["params"]["blocks"]["Dense_0"]["kernel"][i],
                src["params"][f"layer_{i}"]["Dense_0"]["kernel"],
            )
        assert sorted(moment["params"]) == ["blocks", "embed"]
    assert int(adam.count) == 1 and adam.count is opt[0].count
    assert_trees_equal(ckptconv.to_loop(s), state)


def test_raw_orbax_style_train_state_lists_and_dicts():
    # What Orbax restores without a target: the optax tuple as a list of dicts.
    params = _loop(2)
    state = {
        "params": params,
        "opt_state": [{"count": np.int32(4), "mu": _loop(2, seed=5), "nu": _loop(2, seed=6)}, None, None],
    }
    s = ckptconv.to_scan(state)
    assert isinstance(s["opt_state"], list) and s["opt_state"][1] is None
    assert s["opt_state"][0]["count"] is state["opt_state"][0]["count"]
    np.testing.assert_array_equal(s["opt_state"][0]["nu"]["blocks"]["RMSNorm_0"]["scale"][1], state["opt_state"][0]["nu"]["layer_1"]["RMSNorm_0"]["scale"])


def test_frozen_dict_stays_frozen():
    out = ckptconv.to_scan(FrozenDict({"params": _loop(2)}))
    assert isinstance(out, FrozenDict) and isinstance(out["params"], FrozenDict)


@pytest.mark.parametrize("axis", [0, 1])
def test_boxed_partitioned_leaves_get_axis_name(axis):
    t = {
        f"layer_{i}": {
            "w": nn.Partitioned(jnp.full((2, 3), i, jnp.float32), names=("embed", "mlp")),
            "l": nn.LogicallyPartitioned(jnp.full((3,), i, jnp.float32), names=("mlp",), rules=()),
        }
        for i in range(2)
    }
    s = ckptconv.to_scan(t, axis=axis, axis_name="layers")
    w = s["blocks"]["w"]
    assert w.names == (("layers", "embed", "mlp") if axis == 0 else ("embed", "layers", "mlp"))
    assert w.value.shape == ((2, 2, 3) if axis == 0 else (2, 2, 3))
    assert isinstance(s["blocks"]["l"], nn.LogicallyPartitioned)
    back = ckptconv.to_loop(s, axis=axis)
    assert back["layer_1"]["w"].names == ("embed", "mlp")
    np.testing.assert_array_equal(back["layer_1"]["w"].value, np.ones((2, 3)))


def test_nnx_state_with_variables():
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(3)])

    state = nnx.state(Model(nnx.Rngs(0)))
    s = ckptconv.to_scan(state)
    assert isinstance(s, nnx.State)
    kernel = s["layers"]["kernel"]
    assert isinstance(kernel, nnx.Param) and kernel.get_value().shape == (3, 4, 4)
    np.testing.assert_array_equal(kernel.get_value()[2], state["layers"][2]["kernel"].get_value())
    back = ckptconv.to_loop(s, source="layers", pattern="{i}")
    assert list(back["layers"].keys()) == [0, 1, 2]
    for i in range(3):
        assert np.array_equal(back["layers"][i]["kernel"].get_value(), state["layers"][i]["kernel"].get_value())


# -- errors -----------------------------------------------------------------


def test_gap_in_indices():
    t = {"params": {"layer_0": _layer(np.random.default_rng(0)), "layer_2": _layer(np.random.default_rng(0))}}
    with pytest.raises(ckptconv.GroupError, match=r"^params: layers layer_\{i\} must be numbered 0 … N-1, but found 0, 2; missing layer_1\."):
        ckptconv.to_scan(t)


def test_layer_with_different_shape_names_layer_and_leaf():
    t = {"params": _loop(3)}
    t["params"]["layer_2"]["Dense_0"]["kernel"] = np.zeros((4, 5), np.float32)
    with pytest.raises(ckptconv.GroupError) as e:
        ckptconv.to_scan(t)
    assert str(e.value).splitlines()[:2] == [
        "params: the layers to stack differ (1 mismatch):",
        "  layer 2: params/layer_2/Dense_0/kernel: expected shape (4, 4) (as in layer 0), found (4, 5)",
    ]


def test_layer_with_different_dtype_and_structure():
    t = _loop(3)
    t["layer_1"]["Dense_0"]["bias"] = t["layer_1"]["Dense_0"]["bias"].astype(np.float16)
    del t["layer_2"]["RMSNorm_1"]
    with pytest.raises(ckptconv.GroupError) as e:
        ckptconv.to_scan(t)
    lines = str(e.value).splitlines()
    assert lines[0] == "<root>: the layers to stack differ (2 mismatches):"
    assert lines[1] == "  layer 1: layer_1/Dense_0/bias: expected dtype float32 (as in layer 0), found float16"
    assert lines[2] == "  layer 2 (layer_2) has a different tree structure from layer 0 (layer_0): it lacks RMSNorm_1/scale"


def test_odd_layer_0_is_named_not_the_others():
    t = _loop(4)
    t["layer_0"]["extra"] = {"w": np.zeros(2, np.float32)}
    t["layer_3"]["Dense_0"]["bias"] = np.zeros(5, np.float32)
    with pytest.raises(ckptconv.GroupError) as e:
        ckptconv.to_scan(t)
    assert str(e.value).splitlines() == [
        "<root>: the layers to stack differ (2 mismatches):",
        "  layer 0 (layer_0) has a different tree structure from layer 1 (layer_1): it has extra extra/w",
        "  layer 3: layer_3/Dense_0/bias: expected shape (4,) (as in layer 1), found (5,)",
        "Every layer must have the same leaves, shapes and dtypes: fix the checkpoint, or select other layer keys with --pattern.",
    ]


def test_into_collision():
    t = {"params": {**_loop(2), "blocks": {"w": np.zeros(1)}}}
    with pytest.raises(ckptconv.GroupError, match=r"^params: cannot put the stacked layers under 'blocks': params/blocks already exists\. Choose another name with --into\.$"):
        ckptconv.to_scan(t)
    assert "stack" in ckptconv.to_scan(t, into="stack")["params"]


def test_no_group_found():
    with pytest.raises(ckptconv.NothingToConvertError, match=r"^no layer groups found .* the top-level keys are params\. If the layers have another name, pass --pattern"):
        ckptconv.to_scan({"params": {"Dense_0": {"kernel": np.zeros(2)}, "Dense_1": {"kernel": np.zeros(2)}}})


def test_pattern_must_have_i():
    with pytest.raises(ckptconv.GroupError, match=r"pattern 'layers' must contain '\{i\}' exactly once"):
        ckptconv.to_scan(_loop(2), pattern="layers")


def test_to_loop_errors():
    with pytest.raises(ckptconv.NothingToConvertError, match=r"^no subtree named 'blocks' to unstack; the top-level keys are layer_0, layer_1\."):
        ckptconv.to_loop(_loop(2))
    bad = {"blocks": {"a": np.zeros((3, 2)), "b": np.zeros((4, 2))}}
    with pytest.raises(ckptconv.GroupError, match=r"^blocks: leaves disagree on the layer count on axis 0: blocks/a has 3, blocks/b has 4\."):
        ckptconv.to_loop(bad)
    with pytest.raises(ckptconv.GroupError, match=r"^blocks/a: shape \(3, 2\) has no layer axis 2\."):
        ckptconv.to_loop(bad, axis=2)
    clash = {"blocks": {"a": np.zeros((2, 2))}, "layer_1": {}}
    with pytest.raises(ckptconv.GroupError, match=r"cannot unstack 'blocks' into 'layer_\{i\}': layer_1 already exists"):
        ckptconv.to_loop(clash)


def test_sharded_arrays_stay_sharded():
    code = textwrap.dedent(
        """
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import ckptconv
        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
        sh = NamedSharding(mesh, P(None, "model"))
        t = {f"layer_{i}": {"w": jax.device_put(np.full((4, 8), i, np.float32), sh)} for i in range(3)}
        s = ckptconv.to_scan(t, axis=1)
        w = s["blocks"]["w"]
        print(w.shape, tuple(w.sharding.spec), len(w.sharding.device_set))
        print(sorted({tuple(x.data.shape) for x in w.addressable_shards}))
        back = ckptconv.to_loop(s, axis=1)
        b = back["layer_2"]["w"]
        print(tuple(b.sharding.spec), np.array_equal(np.asarray(b), np.full((4, 8), 2, np.float32)))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        "(4, 3, 8) (None, None, 'model') 8",
        "[(4, 3, 2)]",
        "(None, 'model') True",
    ]

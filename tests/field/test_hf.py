"""ckptconv against Hugging Face transformers 4.57.6 Flax models (issue 14: train state ->
serving): an Orbax train state's params, extracted by ckptconv, load with from_pretrained
and give the trained model's logits exactly; a GPT-2 checkpoint goes to scan form and back
and still loads.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.serialization import msgpack_restore
from transformers import FlaxGPT2LMHeadModel, GPT2Config

LAYERS = 3
IDS = (np.arange(24, dtype=np.int32).reshape(2, 12) * 7) % 64


def ckptconv(*args) -> str:
    exe = Path(sys.executable).with_name("ckptconv")
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"ckptconv {' '.join(map(str, args))} exited {proc.returncode}:\n{out}"
    return out


def logits(model, params=None) -> np.ndarray:
    return np.asarray(model(IDS, params=params if params is not None else model.params).logits)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GPT-2 after one Adam step, its logits, and its Orbax train state on disk.

    One step moves every weight away from what from_pretrained would draw for a missing
    one (its seed is 0 too), so identical logits mean the weights were read.
    """
    config = GPT2Config(n_layer=LAYERS, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    model = FlaxGPT2LMHeadModel(config, seed=0)
    tx = optax.adam(1e-2)
    opt_state = tx.init(model.params)

    def loss(params):
        out = model(IDS[:, :-1], params=params).logits
        return optax.softmax_cross_entropy_with_integer_labels(out, IDS[:, 1:]).mean()

    grads = jax.jit(jax.grad(loss))(model.params)
    updates, opt_state = tx.update(grads, opt_state, model.params)
    params = jax.tree_util.tree_map(np.asarray, optax.apply_updates(model.params, updates))
    opt_state = jax.tree_util.tree_map(np.asarray, opt_state)
    expected = logits(model, params)
    assert not np.array_equal(expected, logits(model))  # the step changed the model

    tmp = tmp_path_factory.mktemp("hf")
    state = tmp / "state"
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(state.absolute(), {"params": params, "opt_state": opt_state, "step": np.int32(3)})
    config.save_pretrained(tmp / "config")
    return {"config": config, "params": params, "logits": expected, "state": state, "tmp": tmp}


def serving_dir(trained, name: str, weights: Path, filename: str) -> Path:
    out = trained["tmp"] / name
    out.mkdir()
    weights.rename(out / filename)
    (out / "config.json").write_bytes((trained["tmp"] / "config" / "config.json").read_bytes())
    return out


def test_extract_root_params_msgpack_loads_with_from_pretrained(trained):
    out = trained["tmp"] / "params.msgpack"
    ckptconv("extract", trained["state"], out, "--root", "params", "--format", "msgpack")
    tree = msgpack_restore(out.read_bytes())
    assert sorted(tree) == sorted(trained["params"]) == ["transformer"]  # lm_head is tied to wte
    got = jax.tree_util.tree_leaves_with_path(tree)
    want = dict(jax.tree_util.tree_leaves_with_path(trained["params"]))
    assert len(got) == len(want)
    for path, leaf in got:
        np.testing.assert_array_equal(leaf, want[path], err_msg=jax.tree_util.keystr(path))
        assert leaf.dtype == want[path].dtype
    model = FlaxGPT2LMHeadModel.from_pretrained(serving_dir(trained, "hf_msgpack", out, "flax_model.msgpack"))
    np.testing.assert_array_equal(logits(model), trained["logits"])


def test_extract_root_params_safetensors_loads_with_from_pretrained(trained):
    """transformers 4.57.6's Flax from_pretrained reads model.safetensors (tried first)."""
    out = trained["tmp"] / "params.safetensors"
    ckptconv("extract", trained["state"], out, "--root", "params", "--format", "safetensors")
    model = FlaxGPT2LMHeadModel.from_pretrained(serving_dir(trained, "hf_st", out, "model.safetensors"))
    np.testing.assert_array_equal(logits(model), trained["logits"])


def test_gpt2_to_scan_and_back_loads_with_from_pretrained(trained):
    model = FlaxGPT2LMHeadModel(trained["config"], seed=0)
    model.params = trained["params"]
    src = trained["tmp"] / "hf_src"
    model.save_pretrained(src)
    original = src / "flax_model.msgpack"

    scan = trained["tmp"] / "scan.msgpack"
    ckptconv("to-scan", original, scan)
    stacked = msgpack_restore(scan.read_bytes())["transformer"]["h"]
    layers = msgpack_restore(original.read_bytes())["transformer"]["h"]
    assert sorted(layers) == [str(i) for i in range(LAYERS)]
    kernel = stacked["attn"]["c_attn"]["kernel"]  # the digit-keyed list, stacked in place
    assert kernel.shape == (LAYERS, *layers["0"]["attn"]["c_attn"]["kernel"].shape)
    for i in range(LAYERS):
        np.testing.assert_array_equal(kernel[i], layers[str(i)]["attn"]["c_attn"]["kernel"])

    back = trained["tmp"] / "back.msgpack"
    ckptconv("to-loop", scan, back, "--from", "h", "--pattern", "{i}")
    assert back.read_bytes() == original.read_bytes()  # bit for bit, key order kept
    loaded = FlaxGPT2LMHeadModel.from_pretrained(serving_dir(trained, "hf_back", back, "flax_model.msgpack"))
    np.testing.assert_array_equal(logits(loaded), trained["logits"])

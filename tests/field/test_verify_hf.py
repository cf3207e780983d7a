"""verify on Hugging Face transformers 4.57.6 Flax models (issue 13, must-show 3):
GPT-2, BERT and Llama, tiny configs built from config objects (no downloads).

The loop form is HF's own module; its layers sit in a layer collection (``h``,
``encoder/layer``, ``model/layers``: children ``0 … N-1``) that with
``capture_intermediates`` also records its own call beside them. The scan form is
written as a user writes it: ``nn.scan`` over HF's own block class
(`ckptconv.models.scan_blocks`), called like the collection it replaces, put in place
of the collection with `ckptconv.models.replace_submodule`, so its params are the
collection's, stacked in place (``h/attn/c_attn/kernel`` with a layer axis), which is
what ``ckptconv to-scan`` makes of HF's checkpoint.

Each model: HF's ``save_pretrained`` checkpoint (flax_model.msgpack), converted by the
ckptconv command; verify passes; one element changed in SCAN and two layers swapped
fail (exit 1) naming the layers; the plot of the perturbed run marks exactly the
layers whose values differ.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import matplotlib.image as mpimg
import numpy as np
import pytest
from click.testing import CliRunner
from flax.serialization import msgpack_restore, msgpack_serialize
from transformers import (
    BertConfig,
    FlaxBertModel,
    FlaxGPT2LMHeadModel,
    FlaxLlamaForCausalLM,
    GPT2Config,
    LlamaConfig,
)
from transformers.modeling_flax_outputs import FlaxBaseModelOutputWithPastAndCrossAttentions
from transformers.models.bert import modeling_flax_bert as bert
from transformers.models.gpt2 import modeling_flax_gpt2 as gpt2_hf
from transformers.models.llama import modeling_flax_llama as llama_hf

import ckptconv
from ckptconv import models
from ckptconv import plot as plotlib
from ckptconv.cli import main

LAYERS = 3
IDS = (np.arange(16, dtype=np.int32).reshape(2, 8) * 7) % 64
MASK = np.ones_like(IDS)
POSITIONS = np.broadcast_to(np.arange(8, dtype=np.int32), IDS.shape).copy()


# --------------------------------------------------------------------------
# The --model factories, as a user writes them: (loop_module, scan_module, inputs)


def gpt2() -> tuple[nn.Module, nn.Module, dict]:
    config = GPT2Config(n_layer=LAYERS, n_embd=16, n_head=2, vocab_size=64, n_positions=32)

    class ScanH(models.scan_blocks(gpt2_hf.FlaxGPT2Block, LAYERS)):
        """FlaxGPT2BlockCollection's call, on the scanned blocks."""

        def __call__(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                     encoder_attention_mask=None, deterministic=True, **_):
            x, _ = super().__call__(hidden_states, attention_mask, None, None, deterministic)
            return x, None, None, None

    body = models.replace_submodule(gpt2_hf.FlaxGPT2Module, "h", lambda h: ScanH(h.config, dtype=h.dtype))
    scan = models.replace_submodule(
        gpt2_hf.FlaxGPT2LMHeadModule, "transformer", lambda t: body(t.config, dtype=t.dtype)
    )
    inputs = {"input_ids": IDS, "attention_mask": MASK, "position_ids": POSITIONS}
    return gpt2_hf.FlaxGPT2LMHeadModule(config), scan(config), inputs


def bert_model() -> tuple[nn.Module, nn.Module, dict]:
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)

    class ScanLayer(models.scan_blocks(bert.FlaxBertLayer, LAYERS)):
        """FlaxBertLayerCollection's call, on the scanned layers."""

        def __call__(self, hidden_states, attention_mask, head_mask=None, encoder_hidden_states=None,
                     encoder_attention_mask=None, init_cache=False, deterministic=True, **_):
            x, _ = super().__call__(hidden_states, attention_mask, None, None, None, False, deterministic)
            return FlaxBaseModelOutputWithPastAndCrossAttentions(last_hidden_state=x)

    encoder = models.replace_submodule(
        bert.FlaxBertEncoder, "layer", lambda c: ScanLayer(c.config, dtype=c.dtype)
    )
    scan = models.replace_submodule(
        bert.FlaxBertModule, "encoder", lambda e: encoder(e.config, dtype=e.dtype)
    )
    inputs = {"input_ids": IDS, "attention_mask": MASK, "token_type_ids": np.zeros_like(IDS),
              "position_ids": POSITIONS, "head_mask": None}
    return bert.FlaxBertModule(config), scan(config), inputs


def llama() -> tuple[nn.Module, nn.Module, dict]:
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)

    class ScanLayers(models.scan_blocks(llama_hf.FlaxLlamaDecoderLayer, LAYERS)):
        """FlaxLlamaLayerCollection's call, on the scanned decoder layers."""

        def __call__(self, hidden_states, attention_mask=None, position_ids=None, deterministic=True, **_):
            x, _ = super().__call__(hidden_states, attention_mask, position_ids, deterministic)
            return x, None, None

    body = models.replace_submodule(
        llama_hf.FlaxLlamaModule, "layers", lambda c: ScanLayers(c.config, dtype=c.dtype)
    )
    scan = models.replace_submodule(
        llama_hf.FlaxLlamaForCausalLMModule, "model", lambda m: body(m.config, dtype=m.dtype)
    )
    inputs = {"input_ids": IDS, "attention_mask": MASK, "position_ids": POSITIONS}
    return llama_hf.FlaxLlamaForCausalLMModule(config), scan(config), inputs


#: name -> (factory, HF model class, the stacked list's path in the params)
CASES = {
    "gpt2": (gpt2, FlaxGPT2LMHeadModel, ("transformer", "h")),
    "bert": (bert_model, FlaxBertModel, ("encoder", "layer")),
    "llama": (llama, FlaxLlamaForCausalLM, ("model", "layers")),
}


def run_cli(*args) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


def ckptconv_cmd(*args) -> str:
    exe = Path(sys.executable).with_name("ckptconv")
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"ckptconv {' '.join(map(str, args))} exited {proc.returncode}:\n{out}"
    return out


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """HF's checkpoint of the model (save_pretrained), and ckptconv's scan form of it."""
    factory, hf_class, stacked = CASES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    loop_module = factory()[0]
    hf_class(loop_module.config, seed=0).save_pretrained(d / "hf")
    loop = d / "hf" / "flax_model.msgpack"
    scan = d / "scan.msgpack"
    ckptconv_cmd("to-scan", loop, scan)
    # to-scan's defaults stacked the digit-keyed list in place; verify takes the same
    # defaults (a msgpack file has no conversion record). Said explicitly, they are:
    opts = ("--pattern", "{i}", "--into", stacked[-1])
    return {"name": request.param, "factory": factory, "loop": loop, "scan": scan, "dir": d,
            "stacked": stacked, "target": f"{__name__}:{factory.__name__}", "opts": opts}


def _changed(case, name: str, change) -> Path:
    out = case["dir"] / f"{name}.msgpack"
    if not out.exists():
        tree = msgpack_restore(case["scan"].read_bytes())
        node = tree
        for k in case["stacked"]:
            node = node[k]
        change(node)
        out.write_bytes(msgpack_serialize(tree))
    return out


def _leaves(node: dict) -> list[tuple[dict, str]]:
    out = []
    for k, v in node.items():
        out += _leaves(v) if isinstance(v, dict) else [(node, k)]
    return out


def _bump_last_layer(stack: dict) -> None:
    parent, key = max(_leaves(stack), key=lambda pk: pk[0][pk[1]].size)  # the largest kernel
    value = np.array(parent[key])
    value[(LAYERS - 1,) + (1,) * (value.ndim - 1)] += 1e-3
    parent[key] = value


def _swap_0_1(stack: dict) -> None:
    for parent, key in _leaves(stack):
        parent[key] = np.asarray(parent[key])[[1, 0, 2]]


def test_correct_conversion_passes(case, tmp_path):
    # The library with no options: to_scan's defaults (the list stacked in place).
    lib = ckptconv.verify(case["loop"], case["scan"])
    assert lib.passed and lib.options == {"axis": 0}, lib.table()
    r = run_cli("verify", case["loop"], case["scan"], "--model", case["target"], "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["passed"] and rep["structure_passed"] and rep["numeric_passed"]
    by_layer: dict = {}
    for row in rep["rows"]:
        by_layer.setdefault(row["layer"], set()).add(row["name"])
    assert sorted(k for k in by_layer if k is not None) == list(range(LAYERS))
    names = by_layer[0]
    assert all(by_layer[i] == names for i in range(LAYERS))
    assert "__call__[0][0]" in names  # each block's own output (HF blocks return tuples)
    assert len(names) >= 8  # and its submodules' (attention, norms, MLP)
    # The collection's own call: the scan form's records it after its layers'.
    holder = "/".join(case["stacked"])
    assert any(row["layer"] is None and row["name"].startswith(f"{holder}/__call__[1]") for row in rep["rows"])
    assert not rep["unmatched"] and not rep["skipped"]
    assert max(row["max_abs"] for row in rep["rows"]) <= 1e-5


def test_one_element_changed_fails_naming_the_layer(case, tmp_path):
    bad = _changed(case, "bumped", _bump_last_layer)
    png = tmp_path / "bumped.png"
    rep = ckptconv.verify(case["loop"], bad, model=case["factory"], repeats=0, plot=png)
    assert not rep.passed
    (leaf,) = [c for c in rep.leaves if not c.ok]
    assert leaf.layers == [LAYERS - 1] and leaf.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert rep.first_bad_layer == LAYERS - 1
    differ = {r.layer for r in rep.rows if not r.passed and r.layer is not None}
    assert differ == {LAYERS - 1}
    # The plot marks exactly that layer: read back from the PNG's pixels.
    again = tmp_path / "again.png"
    drawn = plotlib.render(rep, again)
    assert png.read_bytes() == again.read_bytes()
    img = mpimg.imread(png)
    marked = set()
    for i, layer in enumerate(drawn.layers):
        for j in range(len(drawn.names)):
            x, y = drawn.centres[i][j]
            beside = img[int(round(y)), int(round(x + 0.38 * drawn.cell_px[0])), :3]
            np.testing.assert_allclose(beside, plotlib.colour(drawn.worst[i, j])[:3], atol=2.5 / 255)
            if np.allclose(img[int(round(y)), int(round(x)), :3], 0, atol=0.05):
                marked.add(layer)
    assert marked == differ
    assert drawn.title.startswith(f"first failing layer: {LAYERS - 1}")

    text = rep.table()  # what the command prints; it exits 1 (not rep.passed)
    assert f"values differ in layer {LAYERS - 1} (max |Δ| 0.001)" in text
    assert f"first wrong layer: {LAYERS - 1}" in text and text.endswith("FAIL")


def test_wrongly_ordered_stack_fails_naming_the_layers(case, tmp_path):
    bad = _changed(case, "swapped", _swap_0_1)
    r = run_cli("verify", case["loop"], bad, "--model", case["target"], "--json", tmp_path / "r.json")
    assert r.exit_code == 1, r.output
    assert "values differ in layers 0, 1" in r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["first_bad_layer"] == 0
    assert all(c["layers"] == [0, 1] for c in rep["leaves"] if c["status"] != "equal")
    structure = ckptconv.verify(case["loop"], bad, pattern="{i}", into=case["stacked"][-1])
    assert structure.options_from == "given"  # the same, with to-scan's defaults said explicitly
    assert not structure.passed
    assert {tuple(c.layers) for c in structure.leaves if not c.ok} == {(0, 1)}

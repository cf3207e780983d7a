"""verify on the module structures the field uses (issue 13, must-show 3), MaxText-style:
layers named ``layers_{i}`` in loop form and one ``layers`` stack on param axis 1 in
scan form, a train state whose ``params`` holds the variables dict
(``params/params/decoder/…``), layers under ``nn.remat``, the decoder under
``nn.jit`` (as the gemma package wraps its transformer), and the same model with
NNX layers bridged into Linen (``flax.nnx.bridge.ToLinen``, as MaxText does).

The factories are written as a user writes them for ``--model``: they return
``(loop_module, scan_module, inputs)``; each module's params are the checkpoint's
``params/params`` subtree. A correct conversion passes; one element changed and two
layers swapped in SCAN fail (exit 1) naming the layers; the plot of the perturbed run
marks exactly the layers whose values differ (read back from the PNG's pixels).

The HF GPT-2/BERT/Llama versions run in the field venv: tests/field/test_verify_hf.py.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx
from flax.nnx import bridge

import ckptconv
from ckptconv import plot as plotlib

N, D, MLP, VOCAB = 3, 16, 32, 64
TOKENS = (np.arange(16, dtype=np.int32).reshape(2, 8) * 5) % VOCAB
OPTS = ("--pattern", "layers_{i}", "--into", "layers", "--axis", "1")
LIB_OPTS = {"pattern": "layers_{i}", "into": "layers", "axis": 1}


# --------------------------------------------------------------------------
# A MaxText-style decoder, Linen layers


class DecoderLayer(nn.Module):
    """Norm, attention, norm, MLP, residuals, MaxText's names; in scan form it
    returns ``(x, None)`` (MaxText's ``scan_layers`` contract)."""

    scan: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> Any:
        h = nn.RMSNorm(name="pre_self_attention_layer_norm")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="self_attention")(h)
        h = nn.RMSNorm(name="post_self_attention_layer_norm")(x)
        h = nn.Dense(MLP, name="wi")(h)
        x = x + nn.Dense(D, name="wo")(nn.gelu(h))
        return (x, None) if self.scan else x


class Decoder(nn.Module):
    scan: bool = False
    layer: Any = DecoderLayer  # a Linen layer class, called as layer(scan=...)(x)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.scan:
            layers = nn.scan(
                nn.remat(self.layer),
                variable_axes={"params": 1, "intermediates": 0},  # MaxText's param_scan_axis
                split_rngs={"params": True},
                length=N,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = layers(scan=True, name="layers")(x)
        else:
            for i in range(N):
                x = nn.remat(self.layer)(name=f"layers_{i}")(x)
        x = nn.RMSNorm(name="decoder_norm")(x)
        return nn.Dense(VOCAB, name="logits_dense")(x)


class Transformer(nn.Module):
    """Embedding, then the decoder under nn.jit (the gemma package jits its transformer)."""

    scan: bool = False
    layer: Any = DecoderLayer

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(VOCAB, D, name="token_embedder")(tokens)
        return nn.jit(Decoder)(scan=self.scan, layer=self.layer, name="decoder")(x)


def linen_forms() -> tuple[nn.Module, nn.Module, dict]:
    """``--model`` target: the Linen decoder in loop and scan form."""
    return Transformer(scan=False), Transformer(scan=True), {"tokens": TOKENS}


# --------------------------------------------------------------------------
# The same decoder with NNX layers bridged into Linen


class NnxDecoderLayer(nnx.Module):
    def __init__(self, scan: bool = False, *, rngs: nnx.Rngs) -> None:
        self.scan = scan
        self.pre_self_attention_layer_norm = nnx.RMSNorm(D, rngs=rngs)
        self.wi = nnx.Linear(D, MLP, rngs=rngs)
        self.wo = nnx.Linear(MLP, D, rngs=rngs)

    def __call__(self, x: jax.Array) -> Any:
        h = self.wi(self.pre_self_attention_layer_norm(x))
        self.sow(nnx.Intermediate, "mlp_hidden", h)  # NNX's own intermediates come through
        x = x + self.wo(nnx.gelu(h))
        return (x, None) if self.scan else x


class NnxDecoder(Decoder):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.scan:
            layers = nn.scan(
                nn.remat(bridge.ToLinen),
                variable_axes={"params": 1, "intermediates": 0},
                split_rngs={"params": True},
                length=N,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = layers(NnxDecoderLayer, args=(True,), name="layers")(x)
        else:
            for i in range(N):
                x = bridge.ToLinen(NnxDecoderLayer, name=f"layers_{i}")(x)
        x = nn.RMSNorm(name="decoder_norm")(x)
        return nn.Dense(VOCAB, name="logits_dense")(x)


class NnxTransformer(nn.Module):
    scan: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(VOCAB, D, name="token_embedder")(tokens)
        return NnxDecoder(scan=self.scan, name="decoder")(x)


def nnx_forms() -> tuple[nn.Module, nn.Module, tuple]:
    """``--model`` target: the NNX-layered decoder in loop and scan form."""
    return NnxTransformer(scan=False), NnxTransformer(scan=True), (TOKENS,)


# --------------------------------------------------------------------------
# Checkpoints: a MaxText-like train state, converted by ckptconv


def _state(loop_module: nn.Module, seed: int) -> dict:
    variables = jax.jit(loop_module.init)(jax.random.PRNGKey(seed), TOKENS)
    params = jax.tree.map(np.asarray, nn.meta.unbox(dict(variables))["params"])
    return {"params": {"params": params}, "step": np.int32(1)}


def _convert(kind: str, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp(f"{kind}_")
    factory = linen_forms if kind == "linen" else nnx_forms
    ckptconv.save(_state(factory()[0], seed=3), d / "loop")
    ckptconv.convert(d / "loop", d / "scan", to="scan", pattern="layers_{i}", into="layers", axis=1)
    target = f"{__name__}:{factory.__name__}"
    return {"dir": d, "loop": d / "loop", "scan": d / "scan", "factory": factory, "target": target}


@pytest.fixture(scope="module", params=["linen", "nnx"])
def converted(request, tmp_path_factory):
    return _convert(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def linen_converted(tmp_path_factory):
    """The Linen form only: for checks where one model is enough."""
    return _convert("linen", tmp_path_factory)


def _changed(converted, name: str, change) -> Any:
    """SCAN with ``change(layers)`` applied to its params/params/decoder/layers."""
    out = converted["dir"] / name
    if not out.exists():
        t = ckptconv.load(converted["scan"])
        change(t["params"]["params"]["decoder"]["layers"])
        ckptconv.save(t, out)
    return out


def _bump_last_layer(layers: dict) -> None:
    kernel = layers["wi"]["kernel"]  # (16, N, 32): the layer axis is 1
    kernel[3, N - 1, 5] += 1e-3


def _swap_0_1(layers: dict) -> None:
    for path, leaf in ckptconv.tree.leaves_with_paths(layers):
        node = layers
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = np.asarray(leaf)[:, [1, 0, 2]]


def test_correct_conversion_passes_with_options_from_the_record(converted):
    rep = ckptconv.verify(converted["loop"], converted["scan"], model=converted["factory"], repeats=0)
    assert rep.passed, rep.table()
    assert rep.options_from == "record"
    assert rep.options == {"pattern": "layers_{i}", "into": "layers", "axis": 1}
    text = rep.table()
    assert text.splitlines()[1] == (
        "options: from SCAN's conversion record: --pattern 'layers_{i}' --into layers --axis 1"
    )
    assert rep.structure_passed and all(c.path.startswith(("params/params/", "step")) for c in rep.leaves)
    by_layer: dict = {}
    for r in rep.rows:
        by_layer.setdefault(r.layer, set()).add(r.name)
    assert sorted(k for k in by_layer if k is not None) == list(range(N))
    names = by_layer[0]
    assert all(by_layer[i] == names for i in range(N))
    assert "__call__[0]" in names  # each layer's own output
    if converted["factory"] is linen_forms:
        # through nn.jit (decoder) and nn.remat (layers), every Linen submodule
        assert {"wi/__call__[0]", "wo/__call__[0]", "self_attention/__call__[0]",
                "pre_self_attention_layer_norm/__call__[0]"} <= names
    else:
        # NNX layers: the bridge's output and what the NNX module sows
        assert names == {"__call__[0]", "mlp_hidden[0]"}
    outside = {r.name for r in rep.rows if r.layer is None}
    assert {"__call__[0]", "token_embedder/__call__[0]", "decoder/__call__[0]",
            "decoder/decoder_norm/__call__[0]"} <= outside
    assert max(r.max_abs for r in rep.rows) <= 1e-5 and not rep.unmatched and not rep.skipped


def test_correct_conversion_passes_on_the_command_line(converted, cli, tmp_path):
    r = cli("verify", converted["loop"], converted["scan"], "--model", converted["target"],
            "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[1] == (
        "options: from SCAN's conversion record: --pattern 'layers_{i}' --into layers --axis 1"
    )
    assert r.output.splitlines()[-1] == "PASS"
    r = cli("verify", converted["loop"], converted["scan"], *OPTS, "--model", converted["target"])
    assert r.exit_code == 0 and "options: from" not in r.output, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["passed"] and rep["first_bad_layer"] is None and rep["options_from"] == "record"


def test_one_element_changed_fails_naming_the_layer(converted, cli, tmp_path):
    bad = _changed(converted, "bumped", _bump_last_layer)
    r = cli("verify", converted["loop"], bad, *OPTS, "--model", converted["target"], "--json", tmp_path / "r.json")
    assert r.exit_code == 1, r.output
    assert f"  params/params/decoder/layers/wi/kernel: values differ in layer {N - 1} (max |Δ| 0.001)" in r.output
    assert f"first wrong layer: {N - 1}" in r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["first_bad_layer"] == N - 1
    assert {row["layer"] for row in rep["rows"] if not row["passed"]} - {None} == {N - 1}


def test_wrongly_ordered_stack_fails_naming_the_layers(converted, cli, tmp_path):
    bad = _changed(converted, "swapped", _swap_0_1)
    r = cli("verify", converted["loop"], bad, *OPTS, "--model", converted["target"], "--json", tmp_path / "r.json")
    assert r.exit_code == 1, r.output
    assert "  params/params/decoder/layers/wi/kernel: values differ in layers 0, 1" in r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["first_bad_layer"] == 0
    assert all(c["layers"] == [0, 1] for c in rep["leaves"] if c["status"] != "equal")


# --------------------------------------------------------------------------
# --plot


def _pixels(png) -> np.ndarray:
    import matplotlib.image as mpimg

    return mpimg.imread(png)  # float RGBA in [0, 1], rows from the top


def _check_image(drawn: plotlib.Drawn, img: np.ndarray) -> set[int]:
    """Every cell's colour is its `Report.cells` value's; returns the layers marked."""
    assert img.shape[:2] == (drawn.size[1], drawn.size[0])
    w = drawn.cell_px[0]
    marked = set()
    for i, layer in enumerate(drawn.layers):
        for j in range(len(drawn.names)):
            x, y = drawn.centres[i][j]
            beside = img[int(round(y)), int(round(x + 0.38 * w)), :3]  # off the dot
            np.testing.assert_allclose(beside, plotlib.colour(drawn.worst[i, j])[:3], atol=2.5 / 255)
            centre = img[int(round(y)), int(round(x)), :3]
            if np.allclose(centre, 0, atol=0.05):
                marked.add(layer)
                assert drawn.worst[i, j] > 1
            else:
                assert not drawn.worst[i, j] > 1
                np.testing.assert_allclose(centre, beside, atol=2.5 / 255)
    return marked


def test_plot_of_perturbed_run_marks_exactly_the_layers_that_differ(converted, tmp_path):
    bad = _changed(converted, "bumped", _bump_last_layer)
    png = tmp_path / "bumped.png"
    rep = ckptconv.verify(converted["loop"], bad, model=converted["factory"], repeats=0, plot=png, **LIB_OPTS)
    assert rep.plot == str(png) and f"plot: {png}" in rep.table()
    layers, names, worst = rep.cells()
    assert layers == list(range(N)) and names == rep.names
    differ = {r.layer for r in rep.rows if not r.passed and r.layer is not None}
    assert differ == {N - 1}
    again = tmp_path / "again.png"
    drawn = plotlib.render(rep, again)
    assert png.read_bytes() == again.read_bytes()  # what verify wrote is what is checked
    assert drawn.title.startswith(f"first failing layer: {N - 1} (1 of {N} layers fail)")
    assert _check_image(drawn, _pixels(png)) == differ
    assert {i for i, _ in drawn.marked} == {N - 1}

    # The correct conversion: nothing marked, every cell at the bottom of the scale
    # (bit for bit here) or below the tolerance.
    ok = ckptconv.verify(converted["loop"], converted["scan"], model=converted["factory"], repeats=0)
    drawn = plotlib.render(ok, tmp_path / "ok.png")
    assert _check_image(drawn, _pixels(tmp_path / "ok.png")) == set()
    assert drawn.title.startswith(f"all {N} layers within tolerance")


def test_plot_svg_and_errors(converted, tmp_path, monkeypatch):
    bad = _changed(converted, "swapped", _swap_0_1)
    svg = tmp_path / "swapped.svg"
    rep = ckptconv.verify(converted["loop"], bad, model=converted["factory"], repeats=0, plot=svg, **LIB_OPTS)
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    assert "first failing layer: 0" in svg.read_text()
    assert rep.first_bad_layer == 0
    with pytest.raises(ckptconv.VerifyError, match=r"give a \.png or \.svg path"):
        ckptconv.verify(converted["loop"], bad, model=converted["factory"], plot=tmp_path / "x.jpg")
    with pytest.raises(ckptconv.VerifyError, match="--plot draws the layers' intermediates: give --block or --model"):
        ckptconv.verify(converted["loop"], bad, plot=tmp_path / "x.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ckptconv.VerifyError) as e:
        ckptconv.verify(converted["loop"], bad, model=converted["factory"], plot=tmp_path / "y.png")
    assert str(e.value) == (
        "--plot needs matplotlib, which is not installed: pip install 'ckptconv[plot]' "
        "(or pip install matplotlib)."
    )
    assert not (tmp_path / "y.png").exists()


# --------------------------------------------------------------------------
# Checked before anything runs


def test_scan_model_that_does_not_fit_names_the_paths(linen_converted):
    """A scan form whose stack is named otherwise than the checkpoint's fails
    before running (flax itself says only "InvalidRngError: … needs PRNG")."""

    class Renamed(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(VOCAB, D, name="token_embedder")(tokens)
            layers = nn.scan(DecoderLayer, variable_axes={"params": 1, "intermediates": 0},
                             split_rngs={"params": True}, length=N)
            x, _ = layers(scan=True, name="blocks")(x)  # not "layers"
            return x

    def forms():
        return Transformer(scan=False), Renamed(), {"tokens": TOKENS}

    with pytest.raises(ckptconv.VerifyError) as e:
        ckptconv.verify(linen_converted["loop"], linen_converted["scan"], model=forms)
    text = str(e.value)
    assert text.startswith(
        f"the scan model (Renamed) does not fit {linen_converted['scan']} (SCAN): 14 params missing "
        "from the checkpoint, 17 not in the model, 0 of another shape.\n"
        "  missing from the checkpoint (14):\n"
        "    params/blocks/post_self_attention_layer_norm/scale [16, 3]\n"
    )
    assert "  in the checkpoint, not in the model (17):\n    params/decoder/decoder_norm/scale [16]\n" in text
    assert "    params/decoder/layers/post_self_attention_layer_norm/scale [16, 3]\n" in text
    assert "    … and 12 more\n" in text
    assert "InvalidRngError" not in text


def test_loop_model_with_other_sizes_names_the_shapes(linen_converted):
    def forms():
        return Transformer(scan=False), Transformer(scan=True), {"tokens": TOKENS[:, :4]}

    # other token lengths fit the same params: the forms run and agree
    assert ckptconv.verify(linen_converted["loop"], linen_converted["scan"], model=forms, repeats=0).passed

    def other_vocab():
        class Small(Transformer):
            @nn.compact
            def __call__(self, tokens):
                return nn.Embed(VOCAB // 2, D, name="token_embedder")(tokens)

        return Small(), Transformer(scan=True), {"tokens": TOKENS % 8}

    with pytest.raises(ckptconv.VerifyError) as e:
        ckptconv.verify(linen_converted["loop"], linen_converted["scan"], model=other_vocab)
    text = str(e.value)
    assert text.startswith(f"the loop model (Small) does not fit {linen_converted['loop']} (LOOP): 0 params missing")
    assert "    params/token_embedder/embedding: the model's [32, 16], the checkpoint's [64, 16]" in text

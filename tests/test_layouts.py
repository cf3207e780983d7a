"""Layouts real trainers write: MaxText's blocks of K layers with a remainder
(Gemma-3, Llama-4), several stacks in one call (DeepSeek), layers alike except
one (HF T5), through the library and the command line."""

from __future__ import annotations

import json

import flax.serialization
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import digest

import ckptconv

EMB, HEADS, HEAD_DIM, MLP = 16, 2, 8, 32


def _maxtext_layer(rng, moe: bool = False) -> dict:
    """One MaxText decoder layer, with MaxText's names and shapes."""
    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    mlp = (
        {"gate": {"kernel": w(EMB, 4)}, "wi_0": w(4, EMB, MLP), "wi_1": w(4, EMB, MLP), "wo": w(4, MLP, EMB)}
        if moe
        else {"wi_0": {"kernel": w(EMB, MLP)}, "wi_1": {"kernel": w(EMB, MLP)}, "wo": {"kernel": w(MLP, EMB)}}
    )
    return {
        "mlp": mlp,
        "pre_self_attention_norm": {"scale": w(EMB)},
        "post_self_attention_norm": {"scale": w(EMB)},
        "self_attention": {
            "query": {"kernel": w(EMB, HEADS, HEAD_DIM)},
            "key": {"kernel": w(EMB, HEADS, HEAD_DIM)},
            "value": {"kernel": w(EMB, HEADS, HEAD_DIM)},
            "out": {"kernel": w(HEADS, HEAD_DIM, EMB)},
        },
    }


def _maxtext_state(n: int, seed: int = 0, moe_every: int | None = None) -> dict:
    """A MaxText-shaped train state: params/params/{token_embedder, decoder}, Adam mu/nu."""
    rng = np.random.default_rng(seed)
    decoder = {
        f"layers_{i}": _maxtext_layer(rng, moe=moe_every is not None and i % moe_every == moe_every - 1)
        for i in range(n)
    }
    decoder["decoder_norm"] = {"scale": rng.standard_normal(EMB).astype(np.float32)}
    params = {"params": {"decoder": decoder, "token_embedder": {"embedding": rng.standard_normal((64, EMB)).astype(np.float32)}}}
    mirror = lambda t: {k: mirror(v) for k, v in t.items()} if isinstance(t, dict) else t * 0.5  # noqa: E731
    return {
        "params": params,
        "opt_state": {"mu": mirror(params), "nu": mirror(params), "count": np.int32(3)},
        "step": np.int32(3),
    }


def _assert_bits(a, b, path="", ordered=True):
    """Equal bit for bit; ``ordered``: with the same key order (files saved by
    Orbax or msgpack_serialize come back with sorted keys)."""
    if isinstance(a, dict):
        assert isinstance(b, dict), path
        assert list(a) == list(b) if ordered else sorted(a) == sorted(b), (path, list(a), list(b))
        for k in a:
            _assert_bits(a[k], b[k], f"{path}/{k}", ordered)
        return
    x, y = np.asarray(a), np.asarray(b)
    assert (x.dtype, x.shape) == (y.dtype, y.shape), path
    assert x.tobytes() == y.tobytes(), path


def _leaves(t, path=()):
    if isinstance(t, dict):
        for k, v in t.items():
            yield from _leaves(v, path + (k,))
    else:
        yield path, t


def _get(t, path):
    for k in path:
        t = t[k]
    return t


# ---------------------------------------------------------------- Gemma-3: period 6, remainder


def test_gemma3_period_6_with_remainder_is_maxtexts_layout_and_round_trips():
    state = _maxtext_state(13)
    scan = ckptconv.to_scan(state, pattern="layers_{i}", into="layers", period=6, axis=1)
    for root in (("params", "params"), ("opt_state", "mu", "params"), ("opt_state", "nu", "params")):
        dec = _get(scan, root + ("decoder",))
        src = _get(state, root + ("decoder",))
        assert list(dec) == ["layers", "layers_remainder", "decoder_norm"]
        assert list(dec["layers"]) == [f"layers_{j}" for j in range(6)]
        assert list(dec["layers_remainder"]) == ["layers_0"]
        for j in range(6):
            for p, x in _leaves(dec["layers"][f"layers_{j}"]):
                want = np.stack([_get(src[f"layers_{6 * b + j}"], p) for b in range(2)], axis=1)
                assert x.shape == want.shape and x.tobytes() == want.tobytes()
        _assert_bits(dec["layers_remainder"]["layers_0"], src["layers_12"])
    assert scan["params"]["params"]["decoder"]["layers"]["layers_0"]["self_attention"]["query"]["kernel"].shape == (EMB, 2, HEADS, HEAD_DIM)
    back = ckptconv.to_loop(scan, source="layers", pattern="layers_{i}", period=6, axis=1)
    _assert_bits(back, state)


def test_period_remainder_extend_gives_the_first_stacks_one_more_layer():
    state = _maxtext_state(8)["params"]
    scan = ckptconv.to_scan(state, pattern="layers_{i}", into="stacked", period=3, remainder="extend")
    dec = scan["params"]["decoder"]
    assert "stacked_remainder" not in dec
    depth = {j: dec["stacked"][f"layers_{j}"]["pre_self_attention_norm"]["scale"].shape[0] for j in range(3)}
    assert depth == {0: 3, 1: 3, 2: 2}
    np.testing.assert_array_equal(
        dec["stacked"]["layers_1"]["mlp"]["wo"]["kernel"][2], state["params"]["decoder"]["layers_7"]["mlp"]["wo"]["kernel"]
    )
    _assert_bits(ckptconv.to_loop(scan, source="stacked", pattern="layers_{i}", period=3), state)


def test_llama4_inhomogeneous_block_stacks_each_position_alike():
    # every second layer is MoE: the layers differ, each block position is alike
    state = _maxtext_state(6, moe_every=2)["params"]
    with pytest.raises(ckptconv.GroupError, match=r"the layers to stack differ"):
        ckptconv.to_scan(state, pattern="layers_{i}", into="layers")
    scan = ckptconv.to_scan(state, pattern="layers_{i}", into="layers", period=2)
    blocks = scan["params"]["decoder"]["layers"]
    assert blocks["layers_0"]["mlp"]["wo"]["kernel"].shape == (3, MLP, EMB)
    assert blocks["layers_1"]["mlp"]["wo"].shape == (3, 4, MLP, EMB)
    _assert_bits(ckptconv.to_loop(scan, source="layers", pattern="layers_{i}", period=2), state)


@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
def test_gemma3_period_through_files_and_back(tmp_path, cli, fmt):
    state = _maxtext_state(13, seed=1)
    src = tmp_path / "loop"
    ckptconv.save(state, src, format=fmt)
    r = cli("to-scan", src, tmp_path / "scan", "--pattern", "layers_{i}", "--into", "layers", "--period", "6", "--axis", "1")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "params/params/decoder/layers_{i}: 13 layers -> params/params/decoder/layers/{layers_0 … layers_5} (2 deep, period 6) + params/params/decoder/layers_remainder/{layers_0} (unstacked)" in lines
    assert f"to undo: ckptconv to-loop {tmp_path / 'scan'} LOOP_OUT --from layers --pattern 'layers_{{i}}' --period 6 --axis 1" in lines
    want = ckptconv.to_scan(state, pattern="layers_{i}", into="layers", period=6, axis=1)
    _assert_bits(ckptconv.load(tmp_path / "scan"), want, ordered=False)
    r = cli("inspect", tmp_path / "scan", "--from", "layers", "--pattern", "layers_{i}", "--period", "6", "--axis", "1")
    assert r.exit_code == 0, r.output
    assert "  params/params/decoder/layers: 13 layers (blocks of 6, 2 deep, 1 in params/params/decoder/layers_remainder) -> params/params/decoder/layers_{i}" in r.output
    r = cli("to-loop", tmp_path / "scan", tmp_path / "back", "--from", "layers", "--pattern", "layers_{i}", "--period", "6", "--axis", "1")
    assert r.exit_code == 0, r.output
    _assert_bits(ckptconv.load(tmp_path / "back"), state, ordered=False)
    if fmt == "orbax":
        with ocp.StandardCheckpointer() as c:  # Orbax's own reader agrees
            restored = c.restore((tmp_path / "back").absolute())
        _assert_bits(jax_to_np(restored), state, ordered=False)


def jax_to_np(t):
    if isinstance(t, dict):
        return {k: jax_to_np(v) for k, v in t.items()}
    return np.asarray(t)


# ---------------------------------------------------------------- DeepSeek: two stacks in one call


def _deepseek(n_dense=3, n_moe=4):
    rng = np.random.default_rng(2)
    dec = {f"dense_layers_{i}": _maxtext_layer(rng) for i in range(n_dense)}
    dec.update({f"moe_layers_{i}": _maxtext_layer(rng, moe=True) for i in range(n_moe)})
    return {"params": {"params": {"decoder": dec}}}


def test_deepseek_dense_and_moe_stacks_in_one_call(tmp_path, cli):
    t = _deepseek()
    groups = [("dense_layers_{i}", "dense_layers"), ("moe_layers_{i}", "moe_layers")]
    scan = ckptconv.to_scan(t, groups=groups, axis=1)
    dec = scan["params"]["params"]["decoder"]
    assert list(dec) == ["dense_layers", "moe_layers"]
    np.testing.assert_array_equal(
        dec["moe_layers"]["mlp"]["wi_0"], np.stack([t["params"]["params"]["decoder"][f"moe_layers_{i}"]["mlp"]["wi_0"] for i in range(4)], 1)
    )
    _assert_bits(ckptconv.to_loop(scan, stacks=[("dense_layers", "dense_layers_{i}"), ("moe_layers", "moe_layers_{i}")], axis=1), t)

    src = tmp_path / "ds"
    ckptconv.save(t, src, format="orbax")
    r = cli("to-scan", src, tmp_path / "scan", "--axis", "1",
            "--pattern", "dense_layers_{i}", "--into", "dense_layers", "--pattern", "moe_layers_{i}", "--into", "moe_layers")
    assert r.exit_code == 0, r.output
    assert "params/params/decoder/dense_layers_{i}: 3 layers -> params/params/decoder/dense_layers" in r.output
    assert "params/params/decoder/moe_layers_{i}: 4 layers -> params/params/decoder/moe_layers" in r.output
    _assert_bits(ckptconv.load(tmp_path / "scan"), scan, ordered=False)
    undo = [x for x in r.output.splitlines() if x.startswith("to undo: ")][0]
    assert undo == (f"to undo: ckptconv to-loop {tmp_path / 'scan'} LOOP_OUT --from dense_layers --pattern "
                    "'dense_layers_{i}' --from moe_layers --pattern 'moe_layers_{i}' --axis 1")
    r = cli("to-loop", tmp_path / "scan", tmp_path / "back", "--axis", "1",
            "--from", "dense_layers", "--pattern", "dense_layers_{i}", "--from", "moe_layers", "--pattern", "moe_layers_{i}")
    assert r.exit_code == 0, r.output
    _assert_bits(ckptconv.load(tmp_path / "back"), t, ordered=False)


# ---------------------------------------------------------------- T5: alike except block 0


def _t5(n=4):
    rng = np.random.default_rng(3)

    def w(*s):
        return rng.standard_normal(s).astype(np.float32)

    def block(i, cross):
        attn = {k: {"kernel": w(EMB, EMB)} for k in "qkvo"}
        if i == 0:
            attn["relative_attention_bias"] = {"embedding": w(32, HEADS)}
        layers = {"0": {"SelfAttention": attn, "layer_norm": {"weight": w(EMB)}}}
        if cross:
            layers["1"] = {"EncDecAttention": {k: {"kernel": w(EMB, EMB)} for k in "qkvo"}, "layer_norm": {"weight": w(EMB)}}
        layers[str(len(layers))] = {"DenseReluDense": {"wi": {"kernel": w(EMB, MLP)}, "wo": {"kernel": w(MLP, EMB)}}, "layer_norm": {"weight": w(EMB)}}
        return {"layer": layers}

    return {
        "shared": {"embedding": w(64, EMB)},
        "encoder": {"block": {str(i): block(i, False) for i in range(n)}, "final_layer_norm": {"weight": w(EMB)}},
        "decoder": {"block": {str(i): block(i, True) for i in range(n)}, "final_layer_norm": {"weight": w(EMB)}},
    }


T5_MESSAGE = (
    "no layer group can be stacked as it is: encoder/block and decoder/block: layers 1 … 3 are "
    "alike, but layer 0 has extra layer/0/SelfAttention/relative_attention_bias/embedding. To stack "
    "the alike ones and keep the others as they are, pass --layers 1:."
)


def test_t5_odd_first_block_is_explained_not_no_groups(tmp_path, cli):
    t = _t5()
    with pytest.raises(ckptconv.NothingToConvertError) as e:
        ckptconv.to_scan(t)
    assert str(e.value) == T5_MESSAGE
    src = tmp_path / "t5.msgpack"
    src.write_bytes(flax.serialization.to_bytes(t))
    before = digest(src)
    r = cli("to-scan", src, tmp_path / "out")
    assert r.exit_code == 2 and r.output == f"Error: {src}: {T5_MESSAGE}\n"
    assert digest(src) == before and not (tmp_path / "out").exists()
    r = cli("inspect", src)
    assert r.exit_code == 0
    assert f"to-scan: cannot: {T5_MESSAGE}" in r.output


def test_t5_layers_1_stacks_the_rest_and_round_trips(tmp_path, cli):
    t = _t5()
    scan = ckptconv.to_scan(t, layers="1:")
    for side in ("encoder", "decoder"):
        assert list(scan[side]) == ["block", "blocks", "final_layer_norm"]
        assert list(scan[side]["block"]) == ["0"]
        _assert_bits(scan[side]["block"]["0"], t[side]["block"]["0"])
        q = scan[side]["blocks"]["layer"]["0"]["SelfAttention"]["q"]["kernel"]
        np.testing.assert_array_equal(q, np.stack([t[side]["block"][str(i)]["layer"]["0"]["SelfAttention"]["q"]["kernel"] for i in (1, 2, 3)]))
    _assert_bits(ckptconv.to_loop(scan, pattern="block/{i}", layers="1:"), t)

    src = tmp_path / "t5.msgpack"
    src.write_bytes(flax.serialization.to_bytes(t))
    r = cli("to-scan", src, tmp_path / "scan.msgpack", "--layers", "1:")
    assert r.exit_code == 0, r.output
    assert "encoder/block/{i}: 3 layers (layers 1 … 3 of 4) -> encoder/blocks" in r.output
    assert f"to undo: ckptconv to-loop {tmp_path / 'scan.msgpack'} LOOP_OUT --pattern 'block/{{i}}' --layers 1:" in r.output
    r = cli("to-loop", tmp_path / "scan.msgpack", tmp_path / "back.msgpack", "--pattern", "block/{i}", "--layers", "1:")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "back.msgpack").read_bytes() == src.read_bytes()


def test_layers_range_on_named_layers_keeps_the_others():
    t = _maxtext_state(5)["params"]
    scan = ckptconv.to_scan(t, pattern="layers_{i}", into="middle", layers="1:4")
    dec = scan["params"]["decoder"]
    assert list(dec) == ["layers_0", "middle", "layers_4", "decoder_norm"]
    assert dec["middle"]["mlp"]["wo"]["kernel"].shape == (3, MLP, EMB)
    _assert_bits(ckptconv.to_loop(scan, source="middle", pattern="layers_{i}", layers="1:4"), t)


def test_alike_except_one_named_layers_error_suggests_layers():
    t = _maxtext_state(4)["params"]
    t["params"]["decoder"]["layers_3"]["extra"] = {"w": np.zeros(2, np.float32)}
    with pytest.raises(ckptconv.GroupError) as e:
        ckptconv.to_scan(t)
    assert str(e.value).endswith(
        "Every layer must have the same leaves, shapes and dtypes: fix the checkpoint, or stack only "
        "the alike layers with --layers :3 (the others stay as they are)."
    )


# ---------------------------------------------------------------- errors: exit 2, IN unchanged, no OUT


def _expect_error(cli, tmp_path, src, args, message):
    before = digest(src)
    siblings = sorted(p.name for p in tmp_path.iterdir())
    r = cli(*args)
    assert r.exit_code == 2, r.output
    assert r.output == f"Error: {message}\n"
    assert digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == siblings  # no OUT, no temp left


@pytest.fixture
def gemma_files(tmp_path):
    state = _maxtext_state(13)["params"]
    loop = tmp_path / "loop"
    ckptconv.save(state, loop, format="orbax")
    scan = tmp_path / "scan"
    ckptconv.convert(loop, scan, to="scan", pattern="layers_{i}", into="layers", period=6, axis=1)
    return loop, scan


def test_error_period_larger_than_layers(tmp_path, cli, gemma_files):
    loop, _ = gemma_files
    _expect_error(cli, tmp_path, loop, ["to-scan", loop, tmp_path / "out", "--pattern", "layers_{i}", "--period", "14"],
                  f"{loop}: params/decoder/layers_{{i}}: --period 14 needs at least 14 layers, but there are 13. "
                  "Pass the period the scanned model uses (MaxText Gemma-3: 6, the attention pattern), or leave --period out.")


def test_error_to_loop_with_wrong_period_is_explained(tmp_path, cli, gemma_files):
    _, scan = gemma_files
    _expect_error(cli, tmp_path, scan, ["to-loop", scan, tmp_path / "out", "--from", "layers", "--pattern", "layers_{i}", "--period", "4", "--axis", "1"],
                  f"{scan}: params/decoder/layers: --period 4 expects the stacks layers_0 … layers_3 here (named by "
                  "--pattern 'layers_{i}'), but it holds layers_0, layers_1, layers_2, layers_3, layers_4, layers_5. "
                  "It holds 6 such stacks: pass --period 6.")


def test_error_to_loop_without_period_on_blocks_says_pass_period(tmp_path, cli, gemma_files):
    _, scan = gemma_files
    _expect_error(cli, tmp_path, scan, ["to-loop", scan, tmp_path / "out", "--from", "layers", "--axis", "1"],
                  f"{scan}: params/decoder/layers: beside it is params/decoder/layers_remainder, as in MaxText's "
                  "blocks of 6 layers (Gemma-3, Llama-4). Pass --period 6 and --pattern naming the layers "
                  "inside it (--pattern 'layers_{i}').")


def test_error_pattern_into_count_mismatch(tmp_path, cli, gemma_files):
    loop, _ = gemma_files
    _expect_error(cli, tmp_path, loop, ["to-scan", loop, tmp_path / "out", "--pattern", "layers_{i}", "--pattern", "x_{i}", "--into", "a"],
                  "2 --pattern and 1 --into given: with several groups, give each --pattern its own --into, in "
                  "order (--pattern 'dense_layers_{i}' --into dense_layers --pattern 'moe_layers_{i}' --into moe_layers).")


def test_error_overlapping_patterns(tmp_path, cli):
    t = {f"layer_{i}": {"w": np.full(3, i, np.float32)} for i in range(12)}
    src = tmp_path / "in.msgpack"
    src.write_bytes(flax.serialization.to_bytes(t))
    _expect_error(cli, tmp_path, src, ["to-scan", src, tmp_path / "out", "--pattern", "layer_{i}", "--into", "a", "--pattern", "layer_1{i}", "--into", "b"],
                  f"{src}: layer_10: matched by both --pattern 'layer_{{i}}' and --pattern 'layer_1{{i}}'; the patterns "
                  "overlap. Give patterns that select different layers.")


@pytest.mark.parametrize(("value", "message"), [
    ("5:20", "params/decoder: --layers 5:20 asks for layers 5 … 19, but layers_{i} has 13 layers (0 … 12). Pass a range within them."),
    ("3:1", "--layers 3:1: STOP must be greater than START."),
    ("one", "--layers 'one': expected START:STOP, START: or :STOP with layer numbers (for example 1: to leave layer 0 out)."),
])
def test_error_bad_layer_range(tmp_path, cli, gemma_files, value, message):
    loop, _ = gemma_files
    prefix = f"{loop}: " if value == "5:20" else ""
    _expect_error(cli, tmp_path, loop, ["to-scan", loop, tmp_path / "out", "--pattern", "layers_{i}", "--layers", value], prefix + message)


def test_moved_subtrees_are_new_containers_not_the_inputs():
    state = _maxtext_state(7)["params"]
    scan = ckptconv.to_scan(state, pattern="layers_{i}", into="layers", period=6)
    rest = scan["params"]["decoder"]["layers_remainder"]["layers_0"]
    assert rest is not state["params"]["decoder"]["layers_6"]
    rest["mlp"]["wo"]["kernel"] = None  # editing the output leaves the input alone
    assert state["params"]["decoder"]["layers_6"]["mlp"]["wo"]["kernel"] is not None
    back = ckptconv.to_loop(scan, source="layers", pattern="layers_{i}", period=6)
    assert back["params"]["decoder"]["layers_6"] is not rest


# ---------------------------------------------------------------- guidance on scanned checkpoints


def test_t5_scan_to_loop_default_refuses_and_names_the_list(tmp_path, cli):
    scan = ckptconv.to_scan(_t5(), layers="1:")
    with pytest.raises(ckptconv.GroupError) as e:
        ckptconv.to_loop(scan)
    assert str(e.value) == (
        "encoder/blocks: beside it is the list encoder/block of the same layers (0), so it was stacked "
        "from that list with --layers. Put the layers back into it with --pattern 'block/{i}' --layers 1:, "
        "or name them with --pattern."
    )
    named = ckptconv.to_loop(scan, pattern="layer_{i}")  # asked for by name: done as asked
    assert sorted(named["encoder"]) == ["block", "final_layer_norm", "layer_0", "layer_1", "layer_2"]
    assert ckptconv.find_groups(scan) == []  # block/0 alone is no group


def test_inspect_says_what_to_loop_says_of_a_t5_scan(tmp_path, cli):
    """inspect makes to-loop's own checks (not only finding the stacks), and
    takes --layers for to-loop too: the advice it prints works."""
    src = tmp_path / "t5s.msgpack"
    ckptconv.save(ckptconv.to_scan(_t5(), layers="1:"), src)
    r = cli("to-loop", src, tmp_path / "out", "--from", "blocks")
    assert r.exit_code == 2 and r.output.startswith(f"Error: {src}: ")
    refusal = r.output[len(f"Error: {src}: "):].rstrip("\n")
    assert "Put the layers back into it with --pattern 'block/{i}' --layers 1:" in refusal
    r = cli("inspect", src, "--from", "blocks")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1] == f"to-loop: cannot: {refusal}"
    advised = ["--from", "blocks", "--pattern", "block/{i}", "--layers", "1:"]
    r = cli("inspect", src, *advised)
    assert r.output.splitlines()[-3:] == [
        "to-loop would unstack:",
        "  decoder/blocks: 3 layers -> decoder/block/{i}, numbered from 1",
        "  encoder/blocks: 3 layers -> encoder/block/{i}, numbered from 1",
    ]
    r = cli("to-loop", src, tmp_path / "out", *advised)
    assert r.exit_code == 0, r.output
    _assert_bits(ckptconv.load(tmp_path / "out"), _t5(), ordered=False)


def test_inspect_names_the_stacks_it_sees(tmp_path, cli):
    t = {"transformer": {"h": {str(i): {"attn": {"kernel": np.full((4, 8), i, np.float32)}, "ln": {"scale": np.ones(4, np.float32)}} for i in range(3)},
                         "wte": {"embedding": np.zeros((16, 4), np.float32)}}}
    src = tmp_path / "gpt.safetensors"
    ckptconv.save(t, src, format="safetensors")
    assert cli("to-scan", src, tmp_path / "scan.safetensors").exit_code == 0
    # ckptconv's output: its record says how to-loop with no options undoes it.
    r = cli("inspect", tmp_path / "scan.safetensors")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[1] == ("record: written by ckptconv to-scan; to-loop with no options undoes it: "
                        "--from h --pattern '{i}'")
    assert lines[-3:-1] == ["to-loop would unstack:", "  transformer/h: 3 layers -> transformer/h/{i}"]
    # --from given: what is seen without the record.
    r = cli("inspect", tmp_path / "scan.safetensors", "--from", "blocks")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-2:] == [
        "to-loop: no subtree named 'blocks' to unstack. Stacks seen: transformer/h (3 layers on axis 0): "
        "--from h (a Hugging Face layer list: the layers come back as h/0, h/1 …). "
        "(For a ckptconv output, to-scan printed the exact command as 'to undo'.)",
        "known layout: transformer/h looks like a stacked Hugging Face layer list: ckptconv "
        "to-loop IN OUT --from h --pattern '{i}' (from_pretrained loads the result)",
    ]
    r = cli("to-loop", tmp_path / "scan.safetensors", tmp_path / "x", "--from", "h")
    assert r.exit_code == 0
    # No --pattern: a Hugging Face list comes back as the digit list HF loads, not layer_{i}.
    assert "transformer/h: 3 layers -> transformer/h/{i}" in r.output.splitlines()
    _assert_bits(ckptconv.load(tmp_path / "x"), ckptconv.load(src))
    r = cli("to-loop", src, tmp_path / "y", "--from", "h")
    assert r.exit_code == 2
    assert r.output == (f"Error: {src}: transformer/h: its keys are layer numbers (0, 1, 2 …): it is a list of "
                        "layers, already in loop form. Use to-scan to stack it.\n")


def test_inspect_lists_an_odd_layer_by_its_own_path(tmp_path, cli):
    """Layers to-scan refuses to stack (layer 0 unlike the rest) are not folded
    into one row with layer 0's shape: sizes and bytes stay true."""
    t = {"params": {"layer_0": {"w": np.zeros((4, 8), np.float32)},
                    **{f"layer_{i}": {"w": np.ones((8, 8), np.float32)} for i in range(1, 4)}}}
    src = tmp_path / "in.msgpack"
    src.write_bytes(flax.serialization.to_bytes(t))
    r = cli("inspect", src)
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[1:6] == [
        "4 leaves, 896 B",
        "  params/layer_0/w    (4, 8)             float32       128 B",
        "  params/layer_{i}/w  (8, 8)             float32       256 B  x3",
        "to-scan: cannot: params: the layers to stack differ (1 mismatch):",
        "  layer 0: params/layer_0/w: expected shape (8, 8) (as in layer 1), found (4, 8)",
    ]
    r = cli("inspect", src, "--json")
    rows = json.loads(r.output)["items"][0]["leaves"]
    assert [(x["path"], x["layers"]) for x in rows] == [("params/layer_0/w", 1), ("params/layer_{i}/w", 3)]


def test_inspect_of_maxtext_blocks_proposes_no_restack_and_the_period(tmp_path, cli, gemma_files):
    _, scan = gemma_files
    r = cli("inspect", scan)
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1] == (
        "  params/decoder/layers: 13 layers (blocks of 6, 2 deep, 1 in params/decoder/layers_remainder) "
        "-> params/decoder/layers_{i}"
    )
    r = cli("inspect", scan, "--from", "blocks")  # as if it had no record
    assert r.exit_code == 0, r.output
    assert "to-scan would stack" not in r.output
    assert r.output.splitlines()[-1] == (
        "to-loop: no subtree named 'blocks' to unstack. Stacks seen: params/decoder/layers (blocks of 6): "
        "--from layers --pattern 'layers_{i}' --period 6 --axis 1. (For a ckptconv output, to-scan printed the exact command as 'to undo'.)"
    )


def test_to_loop_of_a_maxtext_scan_suggests_its_loop_names(tmp_path, cli):
    """MaxText's scan form (layers on axis 1): the advice has the pattern MaxText's loop form uses."""
    layers = {"mlp": {"wi": {"kernel": np.ones((16, 3, 32), np.float32)}, "wo": {"kernel": np.ones((32, 3, 16), np.float32)}}}
    t = {"params": {"params": {"decoder": {"layers": layers, "decoder_norm": {"scale": np.ones(16, np.float32)}},
                               "token_embedder": {"embedding": np.ones((64, 16), np.float32)}}}}
    src = tmp_path / "mt_scan"
    ckptconv.save(t, src)
    r = cli("to-loop", src, tmp_path / "out")
    assert r.exit_code == 2
    assert r.output == (
        f"Error: {src}: no subtree named 'blocks' to unstack. Stacks seen: params/params/decoder/layers "
        "(3 layers on axis 1): --from layers --axis 1 --pattern 'layers_{i}' (MaxText's loop names). "
        "(For a ckptconv output, to-scan printed the exact command as 'to undo'.)\n"
    )
    r = cli("to-loop", src, tmp_path / "out", "--from", "layers", "--axis", "1", "--pattern", "layers_{i}")
    assert r.exit_code == 0, r.output
    got = ckptconv.load(tmp_path / "out")["params"]["params"]["decoder"]
    assert sorted(got) == ["decoder_norm", "layers_0", "layers_1", "layers_2"]
    np.testing.assert_array_equal(got["layers_2"]["mlp"]["wi"]["kernel"], np.ones((16, 32), np.float32))


def test_to_loop_advice_names_mirrored_stacks_once(tmp_path, cli):
    """params and Adam's mu/nu hold the same stack: one piece of advice naming all three."""
    p = {"embed": {"embedding": np.ones((16, 8), np.float32)},
         "layers": {"Dense_0": {"kernel": np.ones((3, 8, 8), np.float32), "bias": np.ones((3, 8), np.float32)}}}
    t = {"params": p, "opt_state": [{"count": np.int32(1), "mu": p, "nu": p}]}
    src = tmp_path / "scan"
    ckptconv.save(t, src)
    r = cli("to-loop", src, tmp_path / "out")
    assert r.exit_code == 2
    assert r.output == (
        f"Error: {src}: no subtree named 'blocks' to unstack. Stacks seen: opt_state/0/mu/layers, "
        "opt_state/0/nu/layers, params/layers (3 layers on axis 0): --from layers (and "
        "--pattern 'layers_{i}' for the names layers_0, layers_1 …, or --pattern '{i}' if it replaced "
        "a digit-keyed list, as for HF and NNX). (For a ckptconv output, to-scan printed the exact "
        "command as 'to undo'.)\n"
    )


def test_wrong_axis_message_names_the_axis(tmp_path, cli, gemma_files):
    _, scan = gemma_files
    r = cli("to-loop", scan, tmp_path / "out", "--from", "layers", "--pattern", "layers_{i}", "--period", "6")
    assert r.exit_code == 2
    assert r.output.startswith(f"Error: {scan}: params/decoder/layers/layers_0: leaves disagree on the layer count on axis 0: ")
    assert r.output.endswith("All of them have length 2 on axis 1: pass --axis 1.\n")


def test_undo_names_the_input_format(tmp_path, cli):
    t = {f"layer_{i}": {"w": np.full((2, 3), i, np.float32)} for i in range(3)}
    src = tmp_path / "in.msgpack"
    src.write_bytes(flax.serialization.to_bytes(t))
    r = cli("to-scan", src, tmp_path / "s.safetensors", "--format", "safetensors")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1] == f"to undo: ckptconv to-loop {tmp_path / 's.safetensors'} LOOP_OUT --format msgpack"
    assert cli("to-loop", tmp_path / "s.safetensors", tmp_path / "back.msgpack", "--format", "msgpack").exit_code == 0
    assert (tmp_path / "back.msgpack").read_bytes() == src.read_bytes()


def test_t5_loop_form_suggests_no_stacks_and_range_errors_name_the_list(tmp_path, cli):
    src = tmp_path / "t5.msgpack"
    src.write_bytes(flax.serialization.to_bytes(_t5()))
    r = cli("inspect", src, "--layers", "9:")
    assert r.exit_code == 0
    assert r.output.splitlines()[-2:] == [
        "to-scan: cannot: encoder/block: --layers 9: asks for layers from 9, but encoder/block has 4 "
        "layers (0 … 3). Pass a range within them.",
        "to-loop: no 'blocks' subtree",
    ]


def test_maxtext_known_layout_names_nnx_aux_only_where_it_is():
    """inspect's MaxText advice: the --only list for --like REF is there
    because MaxText's two forms keep different RNG state in nnx_aux; a train
    state without nnx_aux (a trial's) was told about it all the same."""
    from ckptconv import known

    layer = {"mlp": {"wi": np.zeros((4, 8), np.float32)}}
    params = {"params": {"decoder": {f"layers_{i}": layer for i in range(3)}}}
    state = {"params": params, "opt_state": {"mu": params}, "step": np.int32(1)}
    command = ("MaxText train state, loop form (3 layers): its scan form (scan_layers=true, "
               "param_scan_axis 1) is: ckptconv to-scan IN OUT --pattern 'layers_{i}' --into layers --axis 1")
    assert known.propose(state) == [
        command, "or give MaxText's own checkpoint of the same model in the other form as --like REF"]
    with_aux = {**state, "nnx_aux": {"model": {"decoder": {"layers_0": {"count": np.uint32(0)}}}}}
    assert known.propose(with_aux) == [
        command,
        "or give MaxText's own checkpoint of the same model in the other form as --like REF (with "
        "--only params --only opt_state --only step: the RNG state in nnx_aux differs between "
        "MaxText's two forms)",
    ]


def test_inspect_names_a_python_number_leaf(tmp_path, cli):
    """A msgpack train state's step is a Python int: inspect said '-' for its
    dtype, as for a leaf it could not read."""
    import flax.serialization

    tree = {"step": 3, "lr": 0.5, "params": {"w": np.zeros((2, 3), np.float32)}}
    (tmp_path / "s.msgpack").write_bytes(flax.serialization.to_bytes(tree))
    r = cli("inspect", tmp_path / "s.msgpack")
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line.split()[1:3] for line in r.output.splitlines()[2:5]}
    assert rows == {"step": ["-", "int"], "lr": ["-", "float"], "params/w": ["(2,", "3)"]}

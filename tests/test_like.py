"""--like REF: the options worked out from a checkpoint in the target layout
(metadata only), the output checked against REF's structure before writing."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from test_layouts import _assert_bits, _maxtext_state

import ckptconv
from ckptconv import like

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LOOP, SCAN = FIXTURES / "maxtext" / "llama2_loop", FIXTURES / "maxtext" / "llama2_scan"


def _first(r) -> str:
    return r.output.splitlines()[0]


def test_maxtext_params_and_optimizer_like_maxtexts_other_form(tmp_path, cli):
    out = tmp_path / "scan"
    keep = ("--only", "params", "--only", "opt_state", "--only", "step")
    r = cli("to-scan", LOOP, out, "--like", SCAN, *keep)
    assert r.exit_code == 0, r.output
    assert _first(r) == f"like {SCAN}: to-scan --pattern 'layers_{{i}}' --into layers --axis 1"
    want = ckptconv.convert(LOOP, tmp_path / "explicit", to="scan", pattern="layers_{i}",
                            into="layers", axis=1, only=["params", "opt_state", "step"])
    assert want.written
    a, b = ckptconv.load(out), ckptconv.load(tmp_path / "explicit")
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb] and len(la) == 39
    for (p, x), (_, y) in zip(la, lb):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), p
    back = tmp_path / "loop"
    r = cli("to-loop", SCAN, back, "--like", LOOP, *keep)
    assert r.exit_code == 0, r.output
    assert _first(r) == f"like {LOOP}: to-loop --from layers --pattern 'layers_{{i}}' --axis 1"


def test_whole_maxtext_state_is_refused_naming_what_differs_and_what_matches(tmp_path, cli):
    r = cli("to-loop", SCAN, tmp_path / "out", "--like", LOOP)
    assert r.exit_code == 2
    text = r.output
    assert "the output would not have REF's structure (24 in OUT but not in REF: " \
        "nnx_aux/model/decoder/layers_1/self_attention/rngs/aqt/count" in text
    assert text.strip().endswith(
        "Nothing was written; the parts that match are opt_state, params, step: keep only "
        "them with --only opt_state --only params --only step."
    )
    assert not (tmp_path / "out").exists()


def test_period_and_remainder_are_read_from_ref(tmp_path, cli):
    state = _maxtext_state(13)
    src, ref = tmp_path / "gemma", tmp_path / "ref"
    ckptconv.save(state, src, format="orbax")
    ckptconv.save(ckptconv.to_scan(state, pattern="layers_{i}", into="layers", period=6, axis=1),
                  ref, format="orbax")
    r = cli("to-scan", src, tmp_path / "out", "--like", ref)
    assert r.exit_code == 0, r.output
    assert _first(r) == (
        f"like {ref}: to-scan --pattern 'layers_{{i}}' --into layers --period 6 "
        "--remainder separate --axis 1"
    )
    _assert_bits(ckptconv.load(tmp_path / "out"), ckptconv.load(ref), ordered=False)


def test_hf_digit_lists_like_the_hf_file(tmp_path, cli):
    src = FIXTURES / "hf" / "gpt2" / "flax_model.msgpack"
    scan = tmp_path / "scan.msgpack"
    ckptconv.convert(src, scan, to="scan", into="blocks")
    r = cli("to-loop", scan, tmp_path / "back.msgpack", "--like", src)
    assert r.exit_code == 0, r.output
    assert _first(r) == f"like {src}: to-loop --from blocks --pattern 'h/{{i}}'"
    assert (tmp_path / "back.msgpack").read_bytes() == src.read_bytes()


def test_direction_and_unrelated_ref_errors(tmp_path, cli):
    r = cli("to-loop", LOOP, tmp_path / "out", "--like", SCAN, "--only", "params")
    assert r.exit_code == 2
    assert r.output.strip().endswith(
        f"REF is in scan form, so this is a to-scan, not a to-loop; run ckptconv to-scan IN "
        f"OUT --like {SCAN}."
    )
    gpt2 = FIXTURES / "hf" / "gpt2" / "flax_model.msgpack"
    r = cli("to-scan", gpt2, tmp_path / "out", "--like", SCAN)
    assert r.exit_code == 2
    assert "cannot see how IN becomes REF's layout: as to-scan: transformer: REF has no such " \
        "subtree" in r.output
    r = cli("to-scan", gpt2, tmp_path / "out", "--like", tmp_path / "nothing")
    assert r.exit_code == 2
    assert r.output.strip() == f"Error: --like {tmp_path / 'nothing'}: no such file or directory."
    assert not (tmp_path / "out").exists()


def test_differences_lists_each_kind():
    a = {"x": np.zeros((2, 3), np.float32), "y": np.zeros(2, np.int32), "z": np.zeros(1)}
    b = {"x": np.zeros((3, 2), np.float32), "y": np.zeros(2, np.int64), "w": np.zeros(1)}
    assert like.differences(a, b) == [
        "1 in REF but not in OUT: w",
        "1 in OUT but not in REF: z",
        "1 shapes differ: x (2, 3) vs REF (3, 2)",
        "1 dtypes differ: y int32 vs REF int64",
    ]


def test_dry_run_prints_the_plan_as_options(tmp_path, cli):
    r = cli("to-scan", LOOP, tmp_path / "out", "--like", SCAN, "--only", "params", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "plan: to-scan --pattern 'layers_{i}' --into layers --axis 1" in r.output.splitlines()
    assert not (tmp_path / "out").exists()


def test_the_same_layers_under_other_names_are_named_as_such(tmp_path, cli):
    """layer_{i} in IN, layers_{i} in REF (to-loop's default names against a flax
    model's): both loop form; the error says so and how to rename, for --like and restore."""
    lay = {"Dense_0": {"kernel": np.ones((8, 8), np.float32), "bias": np.ones(8, np.float32)}}
    emb = {"embed": {"embedding": np.ones((16, 8), np.float32)}}
    ckptconv.save({"params": {**emb, **{f"layer_{i}": lay for i in range(3)}}}, tmp_path / "loop")
    ref = {"params": {**emb, **{f"layers_{i}": lay for i in range(3)}}}
    ckptconv.save(ref, tmp_path / "ref")
    r = cli("to-scan", tmp_path / "loop", tmp_path / "out", "--like", tmp_path / "ref")
    assert r.exit_code == 2
    assert r.output == (
        f"Error: {tmp_path / 'loop'}: --like {tmp_path / 'ref'}: IN's layers params/layer_{{i}} (3) are "
        "REF's params/layers_{i} under another name: both are in loop form, and ckptconv converts "
        "between the two forms without renaming layers. Rename them in two steps: ckptconv to-scan "
        "--pattern 'layer_{i}', then ckptconv to-loop --pattern 'layers_{i}' of its output.\n"
    )
    with pytest.raises(ckptconv.CkptconvError) as e:
        ckptconv.restore(tmp_path / "loop", like=ref)
    assert str(e.value).startswith(
        f"{tmp_path / 'loop'}: cannot restore into like: The checkpoint's layers params/layer_{{i}} (3) "
        "are like's params/layers_{i} under another name: both are in loop form"
    )

"""Conversions describe themselves: to-loop OUT with no options undoes the
to-scan that wrote OUT, from the record in OUT's metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_layouts import _assert_bits, _deepseek, _maxtext_state, _t5

import ckptconv
from ckptconv import record

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _from_record_line(r) -> str:
    (line,) = [x for x in r.output.splitlines() if x.startswith("from ")]
    return line


def test_maxtext_fixture_round_trip_needs_no_options_back(tmp_path, cli):
    loop = FIXTURES / "maxtext" / "llama2_loop"
    scan, back = tmp_path / "scan", tmp_path / "back"
    r = cli("to-scan", loop, scan, "--pattern", "layers_{i}", "--into", "layers", "--axis", "1",
            "--only", "params")
    assert r.exit_code == 0, r.output
    r = cli("to-loop", scan, back)
    assert r.exit_code == 0, r.output
    assert _from_record_line(r) == (
        f"from {scan}'s record: to-loop --from layers --pattern 'layers_{{i}}' --axis 1"
    )
    want = ckptconv.load(loop)["items"]["params"]
    _assert_bits(ckptconv.load(back)["items"]["params"], want, ordered=False)


def test_period_remainder_and_several_stacks_come_back_from_the_record(tmp_path, cli):
    state = _maxtext_state(13)
    src = tmp_path / "gemma"
    ckptconv.save(state, src, format="orbax")
    scan = tmp_path / "scan"
    ckptconv.convert(src, scan, to="scan", pattern="layers_{i}", into="layers", period=6, axis=1)
    r = cli("to-loop", scan, tmp_path / "back")
    assert r.exit_code == 0, r.output
    assert _from_record_line(r) == (
        f"from {scan}'s record: to-loop --from layers --pattern 'layers_{{i}}' --period 6 --axis 1"
    )
    _assert_bits(ckptconv.load(tmp_path / "back"), state, ordered=False)

    ds = _deepseek()
    src = tmp_path / "ds"
    ckptconv.save(ds, src, format="orbax")
    scan = tmp_path / "ds_scan"
    ckptconv.convert(src, scan, to="scan", axis=1,
                     groups=[("dense_layers_{i}", "dense_layers"), ("moe_layers_{i}", "moe_layers")])
    r = cli("to-loop", scan, tmp_path / "ds_back")
    assert r.exit_code == 0, r.output
    assert _from_record_line(r) == (
        f"from {scan}'s record: to-loop --from dense_layers --pattern "
        "'dense_layers_{i}' --from moe_layers --pattern 'moe_layers_{i}' --axis 1"
    )
    _assert_bits(ckptconv.load(tmp_path / "ds_back"), ds, ordered=False)


def test_digit_lists_and_layer_ranges_come_back_under_their_own_names(tmp_path, cli):
    """HF-style digit lists stacked in place (h/0 … -> h), T5's block/1: beside block/0."""
    rng = np.random.default_rng(0)
    gpt = {"transformer": {"h": {str(i): {"attn": {"kernel": rng.standard_normal((4, 4)).astype(np.float32)}}
                                 for i in range(3)},
                           "wte": {"embedding": rng.standard_normal((8, 4)).astype(np.float32)}}}
    src = tmp_path / "gpt"
    ckptconv.save(gpt, src, format="orbax")
    scan = tmp_path / "gpt_scan"
    ckptconv.convert(src, scan, to="scan")
    assert ckptconv.load(scan)["transformer"]["h"]["attn"]["kernel"].shape == (3, 4, 4)
    r = cli("to-loop", scan, tmp_path / "gpt_back")
    assert r.exit_code == 0, r.output
    assert _from_record_line(r) == f"from {scan}'s record: to-loop --from h --pattern '{{i}}'"
    _assert_bits(ckptconv.load(tmp_path / "gpt_back"), gpt, ordered=False)

    t5 = _t5()
    src = tmp_path / "t5"
    ckptconv.save(t5, src, format="orbax")
    scan = tmp_path / "t5_scan"
    ckptconv.convert(src, scan, to="scan", layers="1:")
    r = cli("to-loop", scan, tmp_path / "t5_back")
    assert r.exit_code == 0, r.output
    assert _from_record_line(r) == (
        f"from {scan}'s record: to-loop --from blocks --pattern 'block/{{i}}' --layers 1:"
    )
    _assert_bits(ckptconv.load(tmp_path / "t5_back"), t5, ordered=False)


def test_given_options_win_over_the_record_and_no_record_means_blocks(tmp_path, cli):
    state = _maxtext_state(4)
    src = tmp_path / "s"
    ckptconv.save(state, src, format="orbax")
    scan = tmp_path / "scan"
    ckptconv.convert(src, scan, to="scan", pattern="layers_{i}", into="layers", axis=1)
    r = cli("to-loop", scan, tmp_path / "named", "--from", "layers", "--axis", "1")
    assert r.exit_code == 0, r.output
    assert not [x for x in r.output.splitlines() if x.startswith("from ")]
    assert "layer_0" in ckptconv.load(tmp_path / "named")["params"]["params"]["decoder"]
    # A checkpoint without a record (saved by Orbax itself): the default stack name.
    r = cli("to-loop", FIXTURES / "seed1_scan", tmp_path / "seed1")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == "params/blocks: 3 layers -> params/layer_{i}"


@pytest.mark.parametrize("rec, opts", [
    ({"command": "to-scan", "axis": 1, "groups": [
        {"into": "layers", "template": "layers_{i}", "period": 6, "start": 0}]},
     {"source": "layers", "pattern": "layers_{i}", "period": 6, "axis": 1}),
    ({"command": "to-scan", "axis": 0, "groups": [
        {"into": "h", "holder": "h", "template": "{i}"}]},
     {"source": "h", "pattern": "{i}", "axis": 0}),
])
def test_undo_options_of_a_record(rec, opts):
    assert record.undo_options(rec) == opts


def test_safetensors_outputs_carry_the_record_too(tmp_path, cli):
    src = FIXTURES / "hf" / "gpt2" / "flax_model.msgpack"
    scan = tmp_path / "scan.safetensors"
    assert cli("to-scan", src, scan, "--format", "safetensors").exit_code == 0
    rec = record.read(scan)
    assert rec["command"] == "to-scan" and rec["groups"][0]["keys"] == ["0", "1", "2"]
    r = cli("to-loop", scan, tmp_path / "back.msgpack", "--format", "msgpack")
    assert r.exit_code == 0, r.output
    assert _from_record_line(r) == f"from {scan}'s record: to-loop --from h --pattern '{{i}}'"
    assert (tmp_path / "back.msgpack").read_bytes() == src.read_bytes()


def test_to_scan_with_no_options_undoes_a_recorded_to_loop(tmp_path, cli):
    """Both directions read the record: scan -> loop -> scan needs options once."""
    scan = FIXTURES / "maxtext" / "llama2_scan"
    loop, back = tmp_path / "loop", tmp_path / "back"
    assert cli("to-loop", scan, loop, "--from", "layers", "--pattern", "layers_{i}", "--axis", "1").exit_code == 0
    r = cli("inspect", loop)  # shows the plan to-scan with no options runs
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[1] == (
        "record: written by ckptconv to-loop; to-scan with no options undoes it: "
        "--pattern 'layers_{i}' --into layers --axis 1"
    )
    assert "  params/params/decoder/layers_{i}: 4 layers -> params/params/decoder/layers" in r.output.splitlines()
    r = cli("to-scan", loop, back)
    assert r.exit_code == 0, r.output
    assert _from_record_line(r) == (
        f"from {loop}'s record: to-scan --pattern 'layers_{{i}}' --into layers --axis 1"
    )
    _assert_bits(ckptconv.load(back)["items"]["params"], ckptconv.load(scan)["items"]["params"],
                 ordered=False)

    t5 = _t5()
    src = tmp_path / "t5"
    ckptconv.save(ckptconv.to_scan(t5, layers="1:"), src, format="orbax")
    t5_loop = tmp_path / "t5_loop"
    assert cli("to-loop", src, t5_loop, "--pattern", "block/{i}", "--layers", "1:").exit_code == 0
    r = cli("to-scan", t5_loop, tmp_path / "t5_back")
    assert r.exit_code == 0, r.output
    assert _from_record_line(r) == (
        f"from {t5_loop}'s record: to-scan --pattern '{{i}}' --into blocks --layers 1:"
    )
    _assert_bits(ckptconv.load(tmp_path / "t5_back"), ckptconv.load(src), ordered=False)


def test_a_root_inside_the_stack_offers_no_undo(tmp_path, cli):
    """--root at the stack itself: OUT holds stacked leaves without the
    layers' names. No 'to undo' (a trial's printed undo failed), a note, and a
    record without groups (inspect proposes no undo either)."""
    t = {"params": {f"layer_{i}": {"w": np.full((2, 3), i, np.float32)} for i in range(3)},
         "opt_state": {"mu": {f"layer_{i}": {"w": np.zeros((2, 3), np.float32)} for i in range(3)}}}
    src = tmp_path / "state"
    ckptconv.save(t, src)
    r = cli("to-scan", src, tmp_path / "out", "--root", "params/blocks")
    assert r.exit_code == 0, r.output
    assert "to undo" not in r.output
    assert r.output.splitlines()[-1] == (
        "note: --root params/blocks is at or inside the stack params/blocks: OUT holds stacked "
        "leaves without the layers' names, and to-loop cannot undo it from OUT alone; a --root "
        "above the stack (--root params) keeps it undoable.")
    _assert_bits(ckptconv.load(tmp_path / "out"), {"w": np.stack([t["params"][f"layer_{i}"]["w"] for i in range(3)])})
    assert record.read(tmp_path / "out")["groups"] == []
    assert "record:" not in cli("inspect", tmp_path / "out").output
    # Above the stack: undoable, as before.
    r = cli("to-scan", src, tmp_path / "p", "--root", "params")
    assert r.output.splitlines()[:2] == ["root params", "params/layer_{i}: 3 layers -> params/blocks"]
    assert r.output.splitlines()[-1] == (
        f"to undo the stacking: ckptconv to-loop {tmp_path / 'p'} LOOP_OUT (it cannot undo "
        "--root params: OUT holds only what it kept)")


def test_stacks_outside_the_selection_are_not_reported_and_the_undo_says_what_stays(tmp_path, cli):
    """--root is taken after the conversion: the optimizer's stacks beside
    --root params are left out of OUT, so the report does not list them; the
    undo gives the layers back but not what --only/--root/--dtype dropped."""
    L = {f"layer_{i}": {"w": np.full((2, 3), i, np.float32)} for i in range(3)}
    t = {"params": L, "opt_state": {"mu": L, "nu": L}, "step": np.int32(7)}
    src = tmp_path / "state"
    ckptconv.save(t, src)
    r = cli("to-scan", src, tmp_path / "serve", "--only", "params", "--only", "step", "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[:2] == ["kept only params, step", "params/layer_{i}: 3 layers -> params/blocks"]
    assert lines[-1] == (
        f"to undo the stacking: ckptconv to-loop {tmp_path / 'serve'} LOOP_OUT (it cannot undo "
        "--only params --only step and --dtype bfloat16: OUT holds only what it kept, and its "
        "values stay as cast)")
    r = cli("to-scan", src, tmp_path / "cast", "--dtype", "float16")
    assert r.output.splitlines()[-1] == (
        f"to undo the stacking: ckptconv to-loop {tmp_path / 'cast'} LOOP_OUT (it cannot undo "
        "--dtype float16: its values stay as cast)")
    r = cli("to-scan", src, tmp_path / "full")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1] == f"to undo: ckptconv to-loop {tmp_path / 'full'} LOOP_OUT"
    # to-loop --root: the stacks outside it are not listed either
    r = cli("to-loop", tmp_path / "full", tmp_path / "loop_params", "--root", "params")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[1:3] == ["root params", "params/blocks: 3 layers -> params/layer_{i}"]
    assert sorted(ckptconv.load(tmp_path / "loop_params")) == ["layer_0", "layer_1", "layer_2"]


def test_a_root_inside_a_loop_layer_is_named_as_a_converted_path(tmp_path, cli):
    t = {"params": {f"layer_{i}": {"w": np.full((2, 3), i, np.float32)} for i in range(3)}}
    src = tmp_path / "in.msgpack"
    ckptconv.save(t, src)
    r = cli("to-scan", src, tmp_path / "out", "--root", "params/layer_0")
    assert (r.exit_code, r.output) == (2, (
        f"Error: {src}: --root params/layer_0: no 'layer_0' under 'params'; the keys there are "
        "blocks (--root names a path of the converted tree: it is taken after the layers are "
        "stacked or unstacked). Nothing was written.\n"))

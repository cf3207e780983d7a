"""Hugging Face Flax models written by transformers' own save_pretrained
(fixtures/hf, made by fixtures/hf/make.py): to-scan, then the undo command it
prints, run as printed, gives the input back byte for byte. (The field stage
loads the results with from_pretrained: tests/field/test_hf_fixtures.py.)"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from conftest import digest

HF = Path(__file__).resolve().parents[1] / "fixtures" / "hf"

CASES = {
    "gpt2": ((), ["transformer/h/{i}: 3 layers -> transformer/h"]),
    "bert": ((), ["bert/encoder/layer/{i}: 3 layers -> bert/encoder/layer"]),
    "llama": ((), ["model/layers/{i}: 3 layers -> model/layers"]),
    "t5": (("--layers", "1:"), [
        "encoder/block/{i}: 2 layers (layers 1 … 2 of 3) -> encoder/blocks",
        "decoder/block/{i}: 2 layers (layers 1 … 2 of 3) -> decoder/blocks",
    ]),
    "resnet": ((), [
        "params/resnet/encoder/stages/0/layers/{i}: 3 layers -> params/resnet/encoder/stages/0/layers",
        "batch_stats/resnet/encoder/stages/0/layers/{i}: 3 layers -> batch_stats/resnet/encoder/stages/0/layers",
    ]),
}


def _undo(output: str, out: Path) -> list[str]:
    (line,) = [x for x in output.splitlines() if x.startswith("to undo: ")]
    words = shlex.split(line[len("to undo: "):])
    assert words[:2] == ["ckptconv", "to-loop"]
    return [w if w != "LOOP_OUT" else str(out) for w in words[2:]]


@pytest.mark.parametrize("name", list(CASES))
def test_to_scan_and_the_printed_undo_give_the_file_back(tmp_path, cli, name):
    src = HF / name / "flax_model.msgpack"
    before = digest(src)
    opts, lines = CASES[name]
    scan = tmp_path / "scan.msgpack"
    r = cli("to-scan", src, scan, *opts)
    assert r.exit_code == 0, r.output
    assert [x for x in r.output.splitlines() if "->" in x] == lines
    back = tmp_path / "back.msgpack"
    r = cli("to-loop", *_undo(r.output, back))
    assert r.exit_code == 0, r.output
    assert back.read_bytes() == src.read_bytes()
    assert digest(src) == before


def test_into_is_honoured_for_digit_lists(tmp_path, cli):
    src = HF / "gpt2" / "flax_model.msgpack"
    r = cli("to-scan", src, tmp_path / "scan.msgpack", "--into", "blocks")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == "transformer/h/{i}: 3 layers -> transformer/blocks"
    assert _undo(r.output, tmp_path / "back.msgpack")[1:] == [
        str(tmp_path / "back.msgpack"), "--pattern", "h/{i}"]
    r = cli("to-loop", *_undo(r.output, tmp_path / "back.msgpack"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "back.msgpack").read_bytes() == src.read_bytes()


def test_resnet_conv_units_are_left_alone_with_a_note(tmp_path, cli):
    src = HF / "resnet" / "flax_model.msgpack"
    r = cli("inspect", src)
    assert r.exit_code == 0, r.output
    assert (
        "left alone: params/resnet/encoder/stages/1/layers/0/layer: its 3 members hold the "
        "same leaves in other shapes (convolution/kernel: (1, 1, 8, 4) in 0, (3, 3, 4, 4) "
        "in 1): different units, not layers of one stack; left as they are"
    ) in r.output.splitlines()
    # No layer count suggestion for different units (it would break the good stacks).
    assert "--layers" not in r.output


def test_t5_default_names_the_odd_block_and_the_option(tmp_path, cli):
    src = HF / "t5" / "flax_model.msgpack"
    r = cli("to-scan", src, tmp_path / "scan.msgpack")
    assert r.exit_code == 2
    assert "layer 0 has extra layer/0/SelfAttention/relative_attention_bias/embedding" in r.output
    assert "pass --layers 1:" in r.output
    assert not (tmp_path / "scan.msgpack").exists()


def test_inspect_recognises_the_layouts_and_its_proposals_work(tmp_path, cli):
    """The command inspect proposes for a known layout, run as proposed, converts."""
    cases = {
        HF / "gpt2" / "flax_model.msgpack": "Hugging Face layer list transformer/h (3 layers): "
        "ckptconv to-scan IN OUT stacks it in place; to-loop OUT LOOP --from h --pattern '{i}' "
        "gives it back",
        HF.parent / "maxtext" / "llama2_loop": "MaxText train state, loop form (4 layers): its "
        "scan form (scan_layers=true, param_scan_axis 1) is: ckptconv to-scan IN OUT --pattern "
        "'layers_{i}' --into layers --axis 1",
        HF.parent / "maxtext" / "llama2_scan": "MaxText train state, scan form: its loop form "
        "(scan_layers=false) is: ckptconv to-loop IN OUT --from layers --pattern 'layers_{i}' --axis 1",
    }
    for i, (src, line) in enumerate(cases.items()):
        r = cli("inspect", src)
        assert r.exit_code == 0, r.output
        assert f"known layout: {line}" in r.output.splitlines()
        cmd = shlex.split(line.split(": ", 1)[1] if "is: " not in line else line.split("is: ", 1)[1])
        if "stacks it in place" in line:
            cmd = ["ckptconv", "to-scan", "IN", "OUT"]
        out = tmp_path / f"out{i}"
        r = cli(*[str(src) if w == "IN" else str(out) if w == "OUT" else w for w in cmd[1:]])
        assert r.exit_code == 0, r.output
    # T5's blocks are not alike: no in-place proposal, the --layers advice instead.
    r = cli("inspect", HF / "t5" / "flax_model.msgpack")
    assert "known layout" not in r.output
    assert "pass --layers 1:" in r.output


def test_scan_form_of_an_hf_model_says_transformers_cannot_load_it(tmp_path, cli):
    """from_pretrained of the scan form would initialise every layer at random
    (no error from transformers): to-scan says so; to-loop --from h alone gives
    HF's digit list back, the file bit for bit."""
    src = HF / "gpt2" / "flax_model.msgpack"
    scan = tmp_path / "scan.msgpack"
    r = cli("to-scan", src, scan)
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1] == (
        f"note: {scan} holds Hugging Face layer lists in scan form (transformer/h): transformers' "
        "from_pretrained does not read stacked layers and would initialise them at random. Load it "
        "into a scan model (ckptconv.restore(..., like=...)), or to-loop it back for transformers."
    )
    back = tmp_path / "flax_model.msgpack"
    r = cli("to-loop", scan, back, "--from", "h")
    assert r.exit_code == 0, r.output
    assert "transformer/h: 3 layers -> transformer/h/{i}" in r.output.splitlines()
    assert back.read_bytes() == src.read_bytes()
    # Asked for, layer_{i} it is.
    r = cli("to-loop", scan, tmp_path / "named.msgpack", "--from", "h", "--pattern", "layer_{i}")
    assert "transformer/h: 3 layers -> transformer/layer_{i}" in r.output.splitlines()


def test_an_unsharded_save_pretrained_directory_names_its_weights_file(tmp_path, cli):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    for f in ("config.json", "flax_model.msgpack"):
        (folder / f).write_bytes((HF / "gpt2" / f).read_bytes())
    r = cli("to-scan", folder, tmp_path / "out")
    assert r.exit_code == 2
    assert r.output == (
        f"Error: {folder}: a Hugging Face model directory with one weights file; pass that file: "
        f"{folder / 'flax_model.msgpack'} (OUT is then one file: name it flax_model.msgpack in a "
        "folder holding a copy of config.json, for from_pretrained).\n"
    )
    assert not (tmp_path / "out").exists()


def test_a_pattern_that_renames_a_hf_layer_list_is_noted(tmp_path, cli):
    """An HF trial: --pattern 'h_{i}' wrote transformer/h_0 … with no word that
    from_pretrained reads transformer/h/0 … and would start those at random."""
    src = HF / "gpt2" / "flax_model.msgpack"
    r = cli("to-scan", src, tmp_path / "scan.msgpack")
    assert r.exit_code == 0, r.output
    r = cli("to-loop", tmp_path / "scan.msgpack", tmp_path / "h.msgpack", "--from", "h", "--pattern", "h_{i}")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[:2] == [
        "transformer/h: 3 layers -> transformer/h_{i}",
        "note: transformer/h looks like a Hugging Face layer list: if it is, transformers' "
        "from_pretrained reads its layers as transformer/h/0, transformer/h/1 …, and would "
        "initialise layers named otherwise at random; --pattern '{i}' (or none) gives that list.",
    ]
    r = cli("to-loop", tmp_path / "scan.msgpack", tmp_path / "back.msgpack", "--from", "h", "--pattern", "{i}")
    assert r.exit_code == 0 and "note:" not in r.output, r.output
    assert (tmp_path / "back.msgpack").read_bytes() == src.read_bytes()

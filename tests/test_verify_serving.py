"""verify of a serving checkpoint: a train state converted with --only params
(or --root params) and --dtype bfloat16 in one pass. LOOP is taken as the
conversion took it (its other subtrees left out, the root taken, the floating
leaves cast), and both forms run on the cast params."""

from __future__ import annotations

import json

import flax.linen as nn
import ml_dtypes
import numpy as np
import pytest

import ckptconv
from ckptconv import models, subset

KW = {"hidden_dim": 16, "num_heads": 2}
BLOCK = ["--block", "ckptconv.models:NormAttentionBlock", "--block-kwargs", json.dumps(KW),
         "--input-shape", "2,8,16"]
N = 3
BF16 = np.dtype(ml_dtypes.bfloat16)


def _cast(tree, dtype):
    """``tree``'s floating arrays cast as --dtype casts them."""
    return subset.cast(tree, dtype)[0]


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """A loop train state (params, an optimizer's mu, a step) as an Orbax item."""
    d = tmp_path_factory.mktemp("serving")
    loop, _, inputs = models.seed1(num_layers=N, **KW)
    params = models.init_loop_params(loop, inputs, seed=4)
    tree = {"params": params, "opt_state": {"mu": params}, "step": np.int32(7)}
    ckptconv.save(tree, d / "state")
    return d, tree


def test_a_serving_checkpoint_verifies_from_its_record(state, cli):
    d, tree = state
    serve = d / "serve"
    r = cli("to-scan", d / "state", serve, "--only", "params", "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    r = cli("verify", d / "state", serve, *BLOCK)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[1:3] == [
        "options: from SCAN's conversion record: --pattern 'layer_{i}' --into blocks --only params "
        "--dtype bfloat16",
        "structure: OK, 12 leaves equal to to_scan(LOOP) bit for bit",
    ]
    assert lines[-1] == "PASS"
    # Both forms ran on the bfloat16 params: the scan form's output is the
    # loop form's, on params cast as --dtype casts them.
    rep = ckptconv.verify(d / "state", serve, block=models.NormAttentionBlock, block_kwargs=KW,
                          input_shape=(2, 8, 16))
    assert rep.passed and rep.numeric and max(r.max_abs for r in rep.rows) <= 1e-6
    assert rep.options["dtype"] == "bfloat16" and rep.options["only"] == ["params"]


def test_a_wrong_layer_in_a_cast_checkpoint_is_named(state, cli, tmp_path):
    d, tree = state
    scan = ckptconv.to_scan({"params": tree["params"]})
    bad = _cast(scan, BF16)
    kernel = np.array(bad["params"]["blocks"]["Dense_0"]["kernel"])
    kernel[2] = kernel[1]  # layer 2 holds layer 1's weights
    bad["params"]["blocks"]["Dense_0"]["kernel"] = kernel
    ckptconv.save(bad, tmp_path / "bad")  # no record: the options are given
    r = cli("verify", d / "state", tmp_path / "bad", "--only", "params", "--dtype", "bfloat16")
    assert r.exit_code == 1, r.output
    assert r.output.splitlines()[1:] == [
        "structure: 1 of 12 leaves differ from to_scan(LOOP):",
        "  params/blocks/Dense_0/kernel: values differ in layer 2 (max |Δ| 0.957)",
        "FAIL",
    ]


def test_without_the_options_the_table_says_which_to_pass(state, cli, tmp_path):
    d, tree = state
    ckptconv.save(_cast(ckptconv.to_scan({"params": tree["params"]}), BF16), tmp_path / "s")
    r = cli("verify", d / "state", tmp_path / "s")
    assert r.exit_code == 1
    lines = r.output.splitlines()
    assert lines[1] == "structure: 25 of 25 leaves differ from to_scan(LOOP):"
    assert "  params/blocks/Dense_0/kernel: expected dtype float32, found bfloat16" in lines
    assert ("  SCAN's floating leaves are bfloat16: was it cast (to-scan --dtype bfloat16)? Pass "
            "--dtype bfloat16, and the --only / --root it was written with.") in lines


def test_root_and_dtype_from_the_record(state, cli):
    d, tree = state
    serve = d / "serve_root"
    r = cli("to-scan", d / "state", serve, "--root", "params", "--dtype", "float16")
    assert r.exit_code == 0, r.output
    assert list(ckptconv.load(serve)) == ["blocks"]
    r = cli("verify", d / "state", serve, *BLOCK)
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[1] == (
        "options: from SCAN's conversion record: --pattern 'layer_{i}' --into blocks --root params "
        "--dtype float16")
    assert r.output.splitlines()[-1] == "PASS"
    # A msgpack file holds no record: the same options, given.
    serve = d / "serve_root.msgpack"
    assert cli("to-scan", d / "state", serve, "--root", "params", "--dtype", "float16").exit_code == 0
    r = cli("verify", d / "state", serve, "--root", "params", "--dtype", "float16", *BLOCK)
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[1] == "structure: OK, 12 leaves equal to to_scan(LOOP) bit for bit"


def test_in_memory_trees(state):
    _, tree = state
    scan16 = _cast(ckptconv.to_scan({"params": tree["params"]}), BF16)
    rep = ckptconv.verify(tree, scan16, only="params", dtype="bfloat16",
                          block=models.NormAttentionBlock, block_kwargs=KW, input_shape=(2, 8, 16))
    assert rep.passed and rep.numeric and len(rep.leaves) == 12
    with pytest.raises(ckptconv.VerifyError, match=r"^--only opt: not in LOOP: no 'opt' at the top"):
        ckptconv.verify(tree, scan16, only="opt", dtype="bfloat16")


def test_a_scan_that_was_not_cast_fails_on_its_dtypes(state, cli):
    """--dtype says what SCAN must be: a float32 SCAN is not a bfloat16 one
    (a new user's trial got PASS here while SCAN was cast alongside LOOP)."""
    d, _ = state
    f32 = d / "serve_f32"
    assert cli("to-scan", d / "state", f32, "--only", "params").exit_code == 0
    r = cli("verify", d / "state", f32, "--dtype", "bfloat16")
    assert r.exit_code == 1
    lines = r.output.splitlines()
    assert lines[1:3] == [
        "options: from SCAN's conversion record: --pattern 'layer_{i}' --into blocks --only params "
        "--dtype bfloat16",
        "structure: 12 of 12 leaves differ from to_scan(LOOP):"]
    assert "  params/blocks/Dense_0/kernel: expected dtype bfloat16, found float32" in lines


def test_a_restated_option_keeps_the_records_others(state, cli):
    d, _ = state
    serve = d / "serve2"
    assert cli("to-scan", d / "state", serve, "--only", "params", "--dtype", "bfloat16").exit_code == 0
    r = cli("verify", d / "state", serve, "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    r = cli("verify", d / "state", serve, "--only", "params", "--pattern", "layer_{i}")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[1] == "options: from SCAN's conversion record: --dtype bfloat16"


def test_manager_roots_take_only_in_each_item(tmp_path, state, cli):
    import orbax.checkpoint as ocp

    _, tree = state
    with ocp.CheckpointManager((tmp_path / "run").absolute()) as m:
        m.save(1, args=ocp.args.StandardSave(tree))
        m.wait_until_finished()
    r = cli("to-scan", tmp_path / "run", tmp_path / "serve", "--only", "params", "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    for a, b in ((tmp_path / "run", tmp_path / "serve"), (tmp_path / "run" / "1", tmp_path / "serve" / "1")):
        r = cli("verify", a, b, *BLOCK)
        assert r.exit_code == 0, r.output
        assert r.output.splitlines()[2] == "structure: OK, 12 leaves equal to to_scan(LOOP) bit for bit"
    r = cli("to-scan", tmp_path / "run", tmp_path / "root", "--root", "params", "--dtype", "float16")
    assert r.exit_code == 0, r.output
    r = cli("verify", tmp_path / "run", tmp_path / "root", *BLOCK)
    assert r.exit_code == 0, r.output


def test_a_part_of_loop_checked_without_options_gets_the_option_named(state, cli):
    """msgpack outputs hold no record: checked without --root / --only, the
    report names the option from where SCAN's leaves sit in to_scan(LOOP)."""
    d, _ = state
    rooted, only = d / "hint_root.msgpack", d / "hint_only.msgpack"
    assert cli("to-scan", d / "state", rooted, "--root", "params", "--dtype", "bfloat16").exit_code == 0
    assert cli("to-scan", d / "state", only, "--only", "params").exit_code == 0
    r = cli("verify", d / "state", rooted)
    assert r.exit_code == 1
    assert r.output.splitlines()[-2:] == [
        "  SCAN's leaves are those of LOOP's params (or opt_state/mu): was it written with --root "
        "params? Pass --root params (and the --dtype it was cast to, if any).",
        "FAIL",
    ]
    r = cli("verify", d / "state", only)
    assert r.exit_code == 1
    assert r.output.splitlines()[-2:] == [
        "  SCAN holds only params of LOOP's top-level keys: was it written with --only params? "
        "Pass --only params.",
        "FAIL",
    ]
    # Following the advice passes.
    assert cli("verify", d / "state", rooted, "--root", "params", "--dtype", "bfloat16").exit_code == 0
    assert cli("verify", d / "state", only, "--only", "params").exit_code == 0


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(64)(nn.LayerNorm()(x)))
        return x + nn.Dense(32)(h)


class _ScanBlock(_Block):
    def __call__(self, x):
        return super().__call__(x), None


class _LoopLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(64, 32, name="embed")(tokens)
        for i in range(4):
            x = _Block(name=f"layer_{i}")(x)
        return nn.Dense(64, name="head")(x)


class _ScanLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(64, 32, name="embed")(tokens)
        scan = nn.scan(_ScanBlock, variable_axes={"params": 0, "intermediates": 0},
                       split_rngs={"params": True}, length=4)
        return nn.Dense(64, name="head")(scan(name="blocks")(x)[0])


def _lm():
    tokens = np.random.default_rng(99).integers(0, 64, (4, 8), dtype=np.int32)
    return _LoopLM(), _ScanLM(), {"tokens": tokens}


def test_bfloat16_forms_round_alike(tmp_path, cli):
    """A bfloat16 serving checkpoint of a small LM (a trial's): with XLA's
    excess precision on, the unrolled loop and the scan body kept bfloat16
    values in float32 across different fusions, and the logits differed by
    0.031 (outside bfloat16's 0.02: FAIL on a correct conversion). The compared
    runs round at every op (`COMPARED_COMPILE`): the two forms agree exactly."""
    import jax

    loop, _, inputs = _lm()
    params = loop.init(jax.random.key(0), inputs["tokens"])["params"]
    ckptconv.save({"params": params, "step": np.int32(2)}, tmp_path / "state")
    r = cli("to-scan", tmp_path / "state", tmp_path / "serve", "--only", "params", "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    rep = ckptconv.verify(tmp_path / "state", tmp_path / "serve", model=_lm, repeats=0)
    assert rep.passed, rep.table()
    assert {row.dtype for row in rep.rows} == {"bfloat16"}
    assert max(row.max_abs for row in rep.rows) == 0.0
    assert rep.table().splitlines()[4] == (
        "precision: highest (float32 matmuls in full in the compared runs; 16-bit floats rounded "
        "at every op in both (XLA's excess precision off))")

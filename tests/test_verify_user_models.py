"""verify on models written the way a new user writes them: plain flax.linen
layers `layers_{i}` in a Python loop, the standard `nn.scan(ScanBlock, ...)`
idiom (a subclass of the block returning ``(x, None)``), an embedding and a
head around the layers, msgpack checkpoints (no conversion record).

The factories below are `--model` targets: ``test_verify_user_models:...``
(conftest puts tests/ on sys.path)."""

from __future__ import annotations

import json

import flax.linen as nn
import numpy as np
import pytest

import ckptconv

N, D, VOCAB = 3, 16, 32


class Block(nn.Module):
    hidden: int = D

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        return x + nn.gelu(nn.Dense(self.hidden)(h))


class ScanBlock(Block):
    """nn.scan's (carry, ys) contract on the same block."""

    @nn.compact
    def __call__(self, x, _):
        return super().__call__(x), None


class ScanBlockWithYs(Block):
    """As ScanBlock, returning the layer's input as ys (nothing in the loop returns it)."""

    @nn.compact
    def __call__(self, x, _):
        return super().__call__(x), x


class Loop(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(N):
            x = Block(name=f"layers_{i}")(x)
        return x


class Scan(nn.Module):
    intermediates: bool = True
    body: type = ScanBlock

    @nn.compact
    def __call__(self, x):
        axes = {"params": 0, "intermediates": 0} if self.intermediates else {"params": 0}
        layers = nn.scan(self.body, variable_axes=axes, split_rngs={"params": True}, length=N)
        x, _ = layers(name="layers")(x, None)
        return x


def user_models(intermediates=True, ys=False):
    x = np.random.default_rng(0).standard_normal((2, 4, D)).astype(np.float32)
    scan = Scan(intermediates=intermediates, body=ScanBlockWithYs if ys else ScanBlock)
    return Loop(), scan, (x,)


class LM(nn.Module):
    """An embedding, the layers, a final norm and a head."""

    scan: bool = False

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, D, name="embed")(tokens)
        if self.scan:
            layers = nn.scan(ScanBlock, variable_axes={"params": 0, "intermediates": 0},
                             split_rngs={"params": True}, length=N)
            x, _ = layers(name="layers")(x, None)
        else:
            for i in range(N):
                x = Block(name=f"layers_{i}")(x)
        x = nn.LayerNorm(name="final_norm")(x)
        return nn.Dense(VOCAB, name="head")(x)


def lm_models():
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 5), dtype=np.int32)
    return LM(), LM(scan=True), (tokens,)


def _init(module, inputs):
    import flax
    import jax

    variables = jax.jit(module.init)(jax.random.PRNGKey(3), *inputs)
    return {"params": jax.tree.map(np.asarray, flax.core.unfreeze(variables["params"]))}


@pytest.fixture(scope="module")
def user_pair(tmp_path_factory):
    """Loop checkpoint and `to-scan --pattern 'layers_{i}' --into layers` of it, msgpack."""
    from click.testing import CliRunner

    from ckptconv.cli import main

    d = tmp_path_factory.mktemp("user")
    loop, _, inputs = user_models()
    params = _init(loop, inputs)
    ckptconv.save(params, d / "loop.msgpack", format="msgpack")
    r = CliRunner().invoke(main, ["to-scan", str(d / "loop.msgpack"), str(d / "scan.msgpack"),
                                  "--pattern", "layers_{i}", "--into", "layers"])
    assert r.exit_code == 0, r.output
    return d / "loop.msgpack", d / "scan.msgpack", params


OPTS = ("--pattern", "layers_{i}", "--into", "layers")
MODEL = ("--model", "test_verify_user_models:user_models")


# --------------------------------------------------------------------------
# 1. The standard nn.scan idiom verifies


def test_nn_scan_subclass_of_the_block_passes(user_pair, cli, tmp_path):
    loop, scan, _ = user_pair
    r = cli("verify", loop, scan, *OPTS, *MODEL, "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1] == "PASS"
    assert "intermediates: 13 compared over 3 layers, 0 outside atol + rtol·|loop|" in r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    by_layer: dict = {}
    for row in rep["rows"]:
        by_layer.setdefault(row["layer"], []).append(row["name"])
    # Per layer: the block's own output, the scanned subclass's carry
    # (compared with that same loop output), and the two submodules.
    assert {k: sorted(v) for k, v in by_layer.items()} == {
        None: ["__call__[0]"],
        **{i: ["Dense_0/__call__[0]", "LayerNorm_0/__call__[0]", "__call__[0]", "__call__[0]/carry"]
           for i in range(N)},
    }
    assert rep["unmatched"] == [] and rep["extra"] == []


def test_nn_scan_subclass_fails_on_a_changed_layer(user_pair, cli, tmp_path):
    loop, _, params = user_pair
    scan = ckptconv.to_scan(params, pattern="layers_{i}", into="layers")
    scan["params"]["layers"]["Dense_0"]["kernel"][1, 0, 0] += 0.5
    ckptconv.save(scan, tmp_path / "bad.msgpack", format="msgpack")
    r = cli("verify", loop, tmp_path / "bad.msgpack", *OPTS, *MODEL, "--json", tmp_path / "r.json")
    assert r.exit_code == 1, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["first_bad_layer"] == 1 and rep["structure_passed"] is False
    bad = {(row["name"], row["layer"]) for row in rep["rows"] if not row["passed"]}
    # layer 1's Dense and everything after it; the carry row fails with the output
    assert {("Dense_0/__call__[0]", 1), ("__call__[0]", 1), ("__call__[0]/carry", 1)} <= bad
    assert all(row["passed"] for row in rep["rows"] if row["layer"] == 0)


def test_ys_beside_the_carry_are_listed_not_compared(user_pair):
    loop, scan, _ = user_pair
    rep = ckptconv.verify(loop, scan, pattern="layers_{i}", into="layers",
                          model=lambda: user_models(ys=True), repeats=0)
    assert rep.passed, rep.table()
    assert rep.extra == ["layers/__call__/1/1"]
    assert (
        "not compared: 1 values the scanned layer returns beside its carry (nn.scan's ys), "
        "which the loop form's layer does not return:\n  layers/__call__/1/1\nPASS"
    ) in rep.table()


class PairBlock(Block):
    """A block returning (x, aux), itself a subclass: two records per call."""

    @nn.compact
    def __call__(self, x):
        y = super().__call__(x)
        return y, 2 * y


class ScanPairBlock(PairBlock):
    @nn.compact
    def __call__(self, x, _):
        return super().__call__(x)[0], None


class TwiceLoop(nn.Module):
    """Every layer called twice (two passes over the stack)."""

    @nn.compact
    def __call__(self, x):
        layers = [PairBlock(name=f"layers_{i}") for i in range(N)]
        for _ in range(2):
            for layer in layers:
                x = layer(x)[0]
        return x


class TwiceScan(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(ScanPairBlock, variable_axes={"params": 0, "intermediates": 0},
                         split_rngs={"params": True}, length=N)(name="layers")
        for _ in range(2):
            x, _ = layers(x, None)
        return x


def test_nn_scan_subclass_of_a_tuple_block_called_twice(user_pair):
    """Loop records per call: Block's x, PairBlock's (x, aux); scan: those,
    then ScanPairBlock's (x, None), whose carry is compared with x."""
    loop, scan, _ = user_pair
    rep = ckptconv.verify(loop, scan, pattern="layers_{i}", into="layers",
                          model=lambda: (TwiceLoop(), TwiceScan(), user_models()[2]), repeats=0)
    assert rep.passed, rep.table()
    names = {r.name for r in rep.rows if r.layer == 1}
    assert names == {
        "Dense_0/__call__[0]", "Dense_0/__call__[1]", "LayerNorm_0/__call__[0]",
        "LayerNorm_0/__call__[1]", "__call__[0]", "__call__[1][0]", "__call__[1][1]",
        "__call__[1]/carry", "__call__[2]", "__call__[3][0]", "__call__[3][1]", "__call__[3]/carry",
    }
    assert len(rep.rows) == 3 * 12 + 1 and not rep.unmatched and not rep.extra


def test_unstacked_intermediates_hint_then_no_repeat(user_pair):
    loop, scan, _ = user_pair
    hint = "variable_axes={'params': 0, 'intermediates': 0}"
    with pytest.raises(ckptconv.VerifyError) as e:
        ckptconv.verify(loop, scan, pattern="layers_{i}", into="layers",
                        model=lambda: user_models(intermediates=False))
    assert str(e.value).startswith(
        "the loop and scan models' intermediates do not correspond (3 in the loop form only, "
        "0 in the scan form only, 0 of another shape)"
    )
    assert hint in str(e.value)

    class Sows(Block):  # records a value the loop's block does not
        @nn.compact
        def __call__(self, x, _):
            self.sow("intermediates", "extra_norm", x.sum())
            return super().__call__(x), None

    with pytest.raises(ckptconv.VerifyError) as e:
        ckptconv.verify(loop, scan, pattern="layers_{i}", into="layers",
                        model=lambda: (Loop(), Scan(body=Sows), user_models()[2]))
    text = str(e.value)
    assert text.splitlines()[1:] == [
        "  scan form only (1):",
        "    layers/extra_norm/0",
        "  Do both forms name their modules alike (the layers' own names inside, the stacked "
        "key outside)?",
    ]
    assert hint not in text  # the scan form already stacks the intermediates


# --------------------------------------------------------------------------
# 2. --block on a checkpoint with params outside the layers


@pytest.fixture(scope="module")
def lm_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    loop, _, inputs = lm_models()
    params = _init(loop, inputs)
    ckptconv.save(params, d / "loop.msgpack", format="msgpack")
    ckptconv.save(ckptconv.to_scan(params, pattern="layers_{i}", into="layers"), d / "scan.msgpack",
                  format="msgpack")
    return d


def test_block_on_a_whole_model_says_it_runs_the_layers_only(lm_pair, cli, monkeypatch):
    monkeypatch.chdir(lm_pair)
    block = ("--block", "test_verify_user_models:Block", "--input-shape", "2,8,16")
    r = cli("verify", "loop.msgpack", "scan.msgpack", *OPTS, *block)
    assert r.exit_code == 2, r.output
    assert r.output.splitlines() == [
        "Error: --block runs only the layer stack (3 layers, params/layers_{i} in LOOP, "
        "params/layers in SCAN), but loop.msgpack (LOOP) also has 5 params outside those "
        "layers (params/embed/embedding, params/final_norm/bias, params/final_norm/scale, …), "
        "which it does not run: give --model MOD:FN, a function returning (loop_module, "
        "scan_module, inputs) of the whole model (README: \"The `--model` contract\"), or "
        "verify the layer stack alone.",
        "  outside the layers (5):",
        "    params/embed/embedding [32, 16]",
        "    params/final_norm/bias [16]",
        "    params/final_norm/scale [16]",
        "    params/head/bias [32]",
        "    params/head/kernel [16, 32]",
        "  The layer stack alone, as --block runs it:",
        "    ckptconv extract loop.msgpack loop_layers.msgpack --only params/layers_0 "
        "--only params/layers_1 --only params/layers_2",
        "    ckptconv extract scan.msgpack scan_layers.msgpack --only params/layers",
        "    ckptconv verify loop_layers.msgpack scan_layers.msgpack --pattern 'layers_{i}' "
        "--into layers --block test_verify_user_models:Block --input-shape 2,8,16",
    ]
    # The commands it gives work.
    for args in (
        ("extract", "loop.msgpack", "loop_layers.msgpack", "--only", "params/layers_0",
         "--only", "params/layers_1", "--only", "params/layers_2"),
        ("extract", "scan.msgpack", "scan_layers.msgpack", "--only", "params/layers"),
    ):
        assert cli(*args).exit_code == 0
    r = cli("verify", "loop_layers.msgpack", "scan_layers.msgpack", *OPTS, *block)
    assert r.exit_code == 0, r.output
    assert "intermediates: 10 compared over 3 layers, 0 outside" in r.output
    # and --model runs the whole model
    r = cli("verify", "loop.msgpack", "scan.msgpack", *OPTS, "--model", "test_verify_user_models:lm_models")
    assert r.exit_code == 0, r.output


def test_block_on_a_cast_whole_model_gives_commands_that_cast_the_loop_layers(lm_pair, cli, monkeypatch):
    """SCAN cast (to-scan --dtype bfloat16): the printed extract of LOOP's
    layers casts them alike, so the printed verify passes as printed."""
    monkeypatch.chdir(lm_pair)
    r = cli("to-scan", "loop.msgpack", "scan16", *OPTS, "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    block = ("--block", "test_verify_user_models:Block", "--input-shape", "2,8,16")
    r = cli("verify", "loop.msgpack", "scan16", *OPTS, "--dtype", "bfloat16", *block)  # msgpack: no record
    assert r.exit_code == 2, r.output
    lines = r.output.splitlines()
    assert lines[-3:] == [
        "    ckptconv extract loop.msgpack loop_layers.msgpack --only params/layers_0 "
        "--only params/layers_1 --only params/layers_2 --dtype bfloat16",
        "    ckptconv extract scan16 scan_layers.msgpack --only params/layers",
        "    ckptconv verify loop_layers.msgpack scan_layers.msgpack --pattern 'layers_{i}' "
        "--into layers --block test_verify_user_models:Block --input-shape 2,8,16",
    ]
    for name in ("loop_layers.msgpack", "scan_layers.msgpack"):  # the test above's, in this folder
        (lm_pair / name).unlink(missing_ok=True)
    for line in lines[-3:-1]:
        r = cli(*line.split()[1:])
        assert r.exit_code == 0, r.output
    r = cli("verify", "loop_layers.msgpack", "scan_layers.msgpack", *OPTS, *block)
    assert r.exit_code == 0, r.output
    assert "structure: OK, 4 leaves equal to to_scan(LOOP) bit for bit" in r.output.splitlines()


# --------------------------------------------------------------------------
# 3. A msgpack SCAN (no record) whose stack is not under to-scan's default key


def test_stack_under_another_key_is_found_and_named(user_pair, cli):
    loop, scan, _ = user_pair
    r = cli("verify", loop, scan)
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [
        f"verify {loop} (loop) against {scan} (scan)",
        "options: from SCAN's layout (it has no conversion record): --pattern 'layers_{i}' "
        "--into layers",
        "structure: OK, 4 leaves equal to to_scan(LOOP) bit for bit",
        "PASS",
    ]
    assert ckptconv.verify(loop, scan).options_from == "layout"
    # with the numbers too
    r = cli("verify", loop, scan, *MODEL)
    assert r.exit_code == 0 and "intermediates: 13 compared over 3 layers" in r.output


def test_stack_under_another_key_still_fails_on_values(user_pair, cli, tmp_path):
    loop, _, params = user_pair
    scan = ckptconv.to_scan(params, pattern="layers_{i}", into="layers")
    scan["params"]["layers"]["LayerNorm_0"]["scale"][2, 3] += 1e-3
    ckptconv.save(scan, tmp_path / "bad.msgpack", format="msgpack")
    r = cli("verify", loop, tmp_path / "bad.msgpack")
    assert r.exit_code == 1, r.output
    assert r.output.splitlines()[2:] == [
        "structure: 1 of 4 leaves differ from to_scan(LOOP):",
        "  params/layers/LayerNorm_0/scale: values differ in layer 2 (max |Δ| 0.001)",
        "FAIL",
    ]


def test_stack_under_another_key_of_other_shapes_or_ambiguous_is_a_usage_error(user_pair, cli, tmp_path):
    loop, _, params = user_pair
    ckptconv.save(ckptconv.to_scan(params, pattern="layers_{i}", into="layers", axis=1),
                  tmp_path / "axis1.msgpack", format="msgpack")
    r = cli("verify", loop, tmp_path / "axis1.msgpack")
    assert r.exit_code == 2
    assert r.output == (
        f"Error: {tmp_path / 'axis1.msgpack'} (SCAN) has no params/blocks stack (to-scan's "
        "default --into blocks, assumed because SCAN has no conversion record); it has "
        "params/layers, with the leaves of LOOP's params/layers_{i} in other shapes: pass "
        "--into layers and the --axis it was converted with (MaxText: 1).\n"
    )
    assert cli("verify", loop, tmp_path / "axis1.msgpack", "--into", "layers", "--axis", "1").exit_code == 0

    stack = ckptconv.to_scan(params, pattern="layers_{i}", into="layers")["params"]["layers"]
    ckptconv.save({"params": {"a": stack, "b": stack}}, tmp_path / "two.msgpack", format="msgpack")
    r = cli("verify", loop, tmp_path / "two.msgpack")
    assert r.exit_code == 2
    assert r.output == (
        f"Error: {tmp_path / 'two.msgpack'} (SCAN) has no params/blocks stack (to-scan's "
        "default --into blocks, assumed because SCAN has no conversion record); params/a and "
        "params/b each hold the leaves of LOOP's params/layers_{i} stacked: pass --into with "
        "the one SCAN was converted to.\n"
    )


def test_a_to_loop_output_checks_against_its_scan_by_its_own_record(tmp_path, cli):
    """A trial: MaxText-style SCAN (stack 'layers' on axis 1, saved by the
    trainer: no record) unstacked by ckptconv to-loop, then `verify LOOP SCAN`
    with no options took to-scan's defaults ('blocks', axis 0) and FAILed, 12
    leaves "missing from SCAN". LOOP's own record says how to stack it back."""
    rng = np.random.default_rng(3)
    scan = {"params": {"params": {
        "decoder": {"layers": {"mlp": {"wi": rng.standard_normal((8, 3, 16)).astype(np.float32)},
                               "norm": {"scale": rng.standard_normal((8, 3)).astype(np.float32)}},
                    "final_norm": {"scale": np.ones(8, np.float32)}},
        "token_embedder": {"embedding": rng.standard_normal((32, 8)).astype(np.float32)}}}}
    ckptconv.save(scan, tmp_path / "scan")
    r = cli("to-loop", tmp_path / "scan", tmp_path / "loop", "--from", "layers",
            "--pattern", "layers_{i}", "--axis", "1")
    assert r.exit_code == 0, r.output
    r = cli("verify", tmp_path / "loop", tmp_path / "scan")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [
        f"verify {tmp_path / 'loop'} (loop) against {tmp_path / 'scan'} (scan)",
        "options: from LOOP's conversion record (the to-scan that undoes its to-loop): "
        "--pattern 'layers_{i}' --into layers --axis 1",
        "structure: OK, 4 leaves equal to to_scan(LOOP) bit for bit",
        "PASS",
    ]
    assert ckptconv.verify(tmp_path / "loop", tmp_path / "scan").options_from == "loop record"
    # One layer changed in SCAN: still named, with the same options.
    scan["params"]["params"]["decoder"]["layers"]["mlp"]["wi"][:, 2] += 1
    ckptconv.save(scan, tmp_path / "scan_bad")
    r = cli("verify", tmp_path / "loop", tmp_path / "scan_bad")
    assert r.exit_code == 1, r.output
    assert "  params/params/decoder/layers/mlp/wi: values differ in layer 2 (max |Δ| 1)" in r.output.splitlines()


def test_a_cast_or_partial_to_loop_output_is_named_as_such(tmp_path, cli):
    """A review: LOOP made by to-loop --dtype bfloat16 (or --only) from SCAN.
    Without a record in SCAN, LOOP's record says so: an error (exit 2), not a
    FAIL whose hint said to cast to float32. With SCAN's own record, the FAIL's
    hint says the cast was LOOP's."""
    scan = {"params": {"layers": {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}}}
    ckptconv.save(scan, tmp_path / "scan")
    r = cli("to-loop", tmp_path / "scan", tmp_path / "loop", "--from", "layers", "--pattern",
            "layers_{i}", "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    r = cli("verify", tmp_path / "loop", tmp_path / "scan")
    assert r.exit_code == 2
    assert r.output == (
        f"Error: {tmp_path / 'loop'} (LOOP) is ckptconv's to-loop of a scan checkpoint with "
        "--dtype bfloat16 (its record): a part or a cast of that checkpoint, which is not its loop "
        "form bit for bit. Verify SCAN against a to-loop of it without those options, or give "
        "verify the conversion's options yourself.\n")
    loop = {"params": {f"layer_{i}": {"w": np.full(4, i, np.float32)} for i in range(3)}}
    ckptconv.save(loop, tmp_path / "loop2")
    assert cli("to-scan", tmp_path / "loop2", tmp_path / "scan2").exit_code == 0
    assert cli("to-loop", tmp_path / "scan2", tmp_path / "loop2_bf16", "--dtype", "bfloat16").exit_code == 0
    r = cli("verify", tmp_path / "loop2_bf16", tmp_path / "scan2")
    assert r.exit_code == 1
    assert r.output.splitlines()[-2] == (
        "  LOOP's floating leaves are bfloat16 and SCAN's float32: was LOOP cast (to-loop "
        "--dtype)? A cast LOOP is not SCAN's loop form bit for bit: verify SCAN against a to-loop "
        "of it without --dtype.")

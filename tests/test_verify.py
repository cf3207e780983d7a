"""ckptconv verify: structural check, numeric check, report."""

from __future__ import annotations

import json

import numpy as np
import pytest

import ckptconv
from ckptconv import models

KW = {"hidden_dim": 16, "num_heads": 2}
KW_JSON = json.dumps(KW)
N = 3


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A seed-1 loop checkpoint and its conversion, as Orbax directories."""
    d = tmp_path_factory.mktemp("verify")
    loop, _, inputs = models.seed1(num_layers=N, **KW)
    params = {"params": models.init_loop_params(loop, inputs, seed=4)}
    ckptconv.save(params, d / "loop")
    ckptconv.save(ckptconv.to_scan(params), d / "scan")
    return d / "loop", d / "scan", params


def _tampered(pair, tmp_path, change):
    _, _, params = pair
    scan = ckptconv.to_scan(params)
    change(scan["params"]["blocks"])
    ckptconv.save(scan, tmp_path / "bad")
    return tmp_path / "bad"


def test_correct_conversion_passes_structure_only(pair, cli):
    loop, scan, _ = pair
    r = cli("verify", loop, scan)
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [
        f"verify {loop} (loop) against {scan} (scan)",
        "structure: OK, 12 leaves equal to to_scan(LOOP) bit for bit",
        "PASS",
    ]


def test_correct_conversion_passes_with_block(pair, cli, tmp_path):
    loop, scan, _ = pair
    out = tmp_path / "report.json"
    r = cli("verify", loop, scan, "--block", "ckptconv.models:NormAttentionBlock",
            "--block-kwargs", KW_JSON, "--input-shape", "2,8,16", "--json", out)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[2] == "device: cpu:0 (cpu)"
    assert lines[3].startswith(" loop: compile ") and lines[4].startswith(" scan: compile ")
    assert lines[-1] == "PASS"
    rep = json.loads(out.read_text())
    assert rep["passed"] is True and rep["numeric_passed"] is True
    layer_rows = [r for r in rep["rows"] if r["layer"] is not None]
    assert sorted({r["layer"] for r in layer_rows}) == [0, 1, 2]
    names = {r["name"] for r in layer_rows}
    assert {"RMSNorm_0/__call__[0]", "RMSNorm_1/__call__[0]", "Dense_0/__call__[0]", "self_attention/__call__[0]"} <= names
    # float32 seed model: the two forms agree to 1e-6 (bit for bit on CPU here).
    assert max(r["max_abs"] for r in rep["rows"]) <= 1e-6
    assert set(rep["timings"]) == {"loop", "scan"} and rep["timings"]["scan"]["compile_s"] > 0


def test_one_element_off_by_1e3_is_named(pair, cli, tmp_path):
    loop, _, _ = pair

    def bump(blocks):
        blocks["RMSNorm_1"]["scale"][2, 5] += 1e-3

    bad = _tampered(pair, tmp_path, bump)
    r = cli("verify", loop, bad)
    assert r.exit_code == 1, r.output
    assert "structure: 1 of 12 leaves differ from to_scan(LOOP):" in r.output
    assert "  params/blocks/RMSNorm_1/scale: values differ in layer 2 (max |Δ| 0.001)" in r.output
    rep = ckptconv.verify(loop, bad)
    (leaf,) = [c for c in rep.leaves if not c.ok]
    assert (leaf.path, leaf.layers) == ("params/blocks/RMSNorm_1/scale", [2])
    assert leaf.max_abs == pytest.approx(1e-3, rel=1e-3)


def test_swapped_layers_fail_numerically_at_first_wrong_layer(pair, tmp_path):
    loop, _, _ = pair

    def swap(blocks):
        for sub in blocks["self_attention"].values():
            for name, leaf in sub.items():
                sub[name] = leaf[[0, 2, 1]]

    bad = _tampered(pair, tmp_path, swap)
    rep = ckptconv.verify(loop, bad, block=models.NormAttentionBlock, block_kwargs=KW, input_shape=(2, 8, 16))
    assert not rep.passed and not rep.numeric_passed
    assert rep.first_bad_layer == 1
    assert all(r.passed for r in rep.rows if r.layer == 0)
    assert not rep.rows[0].passed and rep.rows[0].worst > 1
    assert "first wrong layer: 1" in rep.table()


def test_swapped_layers_exit_1_on_cli(pair, cli, tmp_path):
    loop, _, _ = pair

    def swap(blocks):
        blocks["Dense_0"]["kernel"] = blocks["Dense_0"]["kernel"][[1, 0, 2]]

    bad = _tampered(pair, tmp_path, swap)
    r = cli("verify", loop, bad, "--block", "ckptconv.models:NormAttentionBlock", "--block-kwargs", KW_JSON, "--input-shape", "2,4,16", "--json", "-")
    assert r.exit_code == 1
    rep = json.loads(r.output)
    assert rep["passed"] is False and rep["first_bad_layer"] == 0
    assert [c["layers"] for c in rep["leaves"] if c["status"] != "equal"] == [[0, 1]]


def test_wrong_axis_is_caught(pair, cli, tmp_path):
    loop, _, params = pair
    ckptconv.save(ckptconv.to_scan(params, axis=1), tmp_path / "axis1")
    r = cli("verify", loop, tmp_path / "axis1")
    assert r.exit_code == 1
    assert "  params/blocks/Dense_0/kernel: expected shape (3, 16, 16), found (16, 3, 16)" in r.output
    r = cli("verify", loop, tmp_path / "axis1", "--axis", "1")
    assert r.exit_code == 0, r.output


def test_layer_left_at_random_init_is_caught(pair, tmp_path):
    loop, _, _ = pair
    _, scan_model, (x,) = models.seed1(num_layers=N, **KW)
    import jax

    fresh = scan_model.init(jax.random.PRNGKey(99), x)["params"]["blocks"]

    def reinit_layer_1(blocks):
        for path, leaf in ckptconv.tree.leaves_with_paths(blocks):
            src = fresh
            for k in path:
                src = src[k]
            leaf[1] = np.asarray(src)[1]

    bad = _tampered(pair, tmp_path, reinit_layer_1)
    rep = ckptconv.verify(loop, bad, block=models.NormAttentionBlock, block_kwargs=KW, input_shape=(2, 8, 16))
    assert not rep.passed and rep.first_bad_layer == 1
    # zero-initialised biases and unit norm scales are the same in a fresh init
    assert {c.path for c in rep.leaves if not c.ok} == {f"params/blocks/{p}" for p in (
        "Dense_0/kernel", "self_attention/key/kernel", "self_attention/out/kernel",
        "self_attention/query/kernel", "self_attention/value/kernel")}


def test_causal_lm_with_kv_cache_decodes_the_same(tmp_path, cli):
    cfg = {"num_layers": 3, "hidden_dim": 16, "num_heads": 2, "vocab_size": 32, "prompt_len": 5, "decode_steps": 3}
    loop, _, inputs = models.causal_lm(**cfg)
    params = {"params": models.init_loop_params(loop, inputs, seed=1)}
    ckptconv.save(params, tmp_path / "lm", format="msgpack")
    assert cli("to-scan", tmp_path / "lm", tmp_path / "lm_scan").exit_code == 0
    r = cli("verify", tmp_path / "lm", tmp_path / "lm_scan", "--model", "ckptconv.models:causal_lm",
            "--block-kwargs", json.dumps(cfg), "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    rows = {(row["name"], row["layer"]): row for row in rep["rows"]}
    for step in range(cfg["decode_steps"]):
        tok = rows[(f"step_tokens[{step}]", None)]
        assert tok["dtype"] == "int32" and tok["max_abs"] == 0 and tok["passed"]
    for step in range(cfg["decode_steps"] + 1):
        assert rows[(f"step_logits[{step}]", None)]["max_abs"] <= 1e-5
    # every layer's attention output at every decode step was compared
    assert all(("self_attention/__call__[%d]" % c, i) in rows for c in range(4) for i in range(3))


def test_bfloat16_model_passes_with_default_tolerance(tmp_path):
    kw = {**KW, "dtype": "bfloat16"}
    loop, _, inputs = models.seed0(num_layers=N, **kw)
    params = {"params": models.init_loop_params(loop, inputs)}
    rep = ckptconv.verify(params, ckptconv.to_scan(params), block=models.AttentionDenseBlock, block_kwargs=kw, input_shape=(2, 8, 16))
    assert rep.passed, rep.table()
    assert rep.tolerances["bfloat16"] == (2e-2, 2e-2)
    assert any(r.dtype == "bfloat16" for r in rep.rows)


def test_report_object_for_pipelines(pair):
    loop, scan, _ = pair
    rep = ckptconv.verify(loop, scan, block="ckptconv.models:NormAttentionBlock", block_kwargs=KW, input_shape=(1, 4, 16), atol=1e-6, rtol=0)
    assert isinstance(rep, ckptconv.Report) and rep.passed
    assert rep.rows == sorted(rep.rows, key=lambda r: (r.passed, -r.worst, r.layer if r.layer is not None else -1))
    assert {r.layer for r in rep.rows} == {None, 0, 1, 2}


def test_bad_targets_exit_2(pair, cli):
    loop, scan, _ = pair
    r = cli("verify", loop, scan, "--block", "ckptconv.models:Nope", "--input-shape", "1,4,16")
    assert r.exit_code == 2
    assert "Error: 'ckptconv.models:Nope': module 'ckptconv.models' has no attribute 'Nope'." in r.output
    r = cli("verify", loop, scan, "--block", "ckptconv.models:NormAttentionBlock")
    assert r.exit_code == 2 and "Error: --block needs --input-shape B,T,D or --input FILE.npy." in r.output
    r = cli("verify", loop, scan, "--block", "ckptconv.models:NormAttentionBlock", "--input-shape", "1,4,8",
            "--block-kwargs", KW_JSON)
    assert r.exit_code == 2 and "Error: running the models failed" in r.output and "Traceback" not in r.output


def test_checkpoint_manager_directories_verify(tmp_path, pair, cli):
    import orbax.checkpoint as ocp

    _, _, params = pair
    for name, tree in (("loop_run", params), ("scan_run", ckptconv.to_scan(params))):
        with ocp.CheckpointManager((tmp_path / name).absolute()) as m:
            m.save(5, args=ocp.args.StandardSave(tree))
            m.wait_until_finished()
    for a, b in ((tmp_path / "loop_run", tmp_path / "scan_run"), (tmp_path / "loop_run" / "5", tmp_path / "scan_run" / "5")):
        r = cli("verify", a, b, "--block", "ckptconv.models:NormAttentionBlock", "--block-kwargs", KW_JSON, "--input-shape", "1,4,16")
        assert r.exit_code == 0, r.output
        assert "intermediates: 43 compared over 3 layers, 0 outside" in r.output


def test_layers_compared_in_one_form_only_fail(pair):
    import flax.linen as nn

    loop_path, scan_path, _ = pair

    class ScanNoIntermediates(nn.Module):
        @nn.compact
        def __call__(self, x):
            body = nn.scan(
                models._scan_body(models.NormAttentionBlock),
                variable_axes={"params": 0},  # intermediates not stacked: flax drops them
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=N,
            )
            x, _ = body(name="blocks", **KW)(x)
            return x

    def model():
        loop, _, (x,) = models.seed1(num_layers=N, **KW)
        return loop, ScanNoIntermediates(), (x,)

    # Matched before anything runs: a VerifyError listing what is in one form only.
    with pytest.raises(ckptconv.VerifyError) as e:
        ckptconv.verify(loop_path, scan_path, model=model)
    text = str(e.value)
    assert text.startswith(
        "the loop and scan models' intermediates do not correspond (14 in the loop form only, "
        "0 in the scan form only, 0 of another shape), so not every layer could be compared. "
        "Nothing was run."
    )
    assert "  loop form only (after stacking its layers) (14):\n    blocks/Dense_0/__call__/0\n" in text
    assert "nn.scan(..., variable_axes={'params': 0, 'intermediates': 0})" in text


def test_swapped_arguments_are_named(pair, cli):
    loop, scan, _ = pair
    r = cli("verify", scan, loop)
    assert r.exit_code == 2
    assert f"Error: {scan} (LOOP): no layer groups found" in r.output
    assert "LOOP holds a stacked subtree: are LOOP and SCAN swapped? Give the loop form first." in r.output


def test_input_file(pair, cli, tmp_path):
    loop, scan, _ = pair
    x = np.random.default_rng(3).standard_normal((1, 5, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = cli("verify", loop, scan, "--block", "ckptconv.models:NormAttentionBlock", "--block-kwargs", KW_JSON,
            "--input", tmp_path / "x.npy", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert len([row for row in rep["rows"] if row["layer"] == 0]) == 14


# --------------------------------------------------------------------------
# --period: MaxText's scanned Gemma-3 layout (blocks of K layers + remainder)

PERIOD_OPTS = {"pattern": "layers_{i}", "into": "layers", "axis": 1}
PERIOD_CLI = ("--pattern", "layers_{i}", "--into", "layers", "--axis", "1", "--period", "6",
              "--model", "period_models:period_model")


@pytest.fixture(scope="module")
def period_pair(tmp_path_factory):
    """13 NormAttentionBlock layers (hidden 16), and their period-6 conversion on axis 1."""
    import flax
    import jax
    from period_models import period_model

    d = tmp_path_factory.mktemp("period")
    loop, _, inputs = period_model()
    variables = jax.jit(loop.init)(jax.random.PRNGKey(2), *inputs)  # jit: 3x faster than eager
    params = {"params": jax.tree.map(np.asarray, flax.core.unfreeze(variables["params"]))}
    ckptconv.save(params, d / "loop", format="orbax")
    ckptconv.convert(d / "loop", d / "scan", to="scan", period=6, **PERIOD_OPTS)
    return d / "loop", d / "scan", d


def test_period_6_conversion_verifies_every_layer(period_pair):
    from period_models import period_model

    loop, scan, _ = period_pair
    rep = ckptconv.verify(loop, scan, period=6, model=period_model, repeats=1, **PERIOD_OPTS)
    assert rep.passed, rep.table()
    assert rep.structure_passed and len(rep.leaves) == 7 * 12  # 6 stacks + 1 leftover layer
    by_layer: dict = {}
    for r in rep.rows:
        by_layer.setdefault(r.layer, set()).add(r.name)
    assert sorted(k for k in by_layer if k is not None) == list(range(13))  # 12 stacked + layer 12
    assert by_layer[None] == {"__call__[0]"}
    names = by_layer[0]
    assert {"RMSNorm_0/__call__[0]", "Dense_0/__call__[0]", "self_attention/__call__[0]"} <= names
    assert all(by_layer[i] == names for i in range(13))
    assert len(rep.rows) == 13 * len(names) + 1 and not rep.unmatched
    # float32: loop and period-scan forms agree to ~1e-6 here
    assert max(r.max_abs for r in rep.rows) <= 1e-5
    text = rep.table()
    assert "to_scan(LOOP, period=6) bit for bit" in text
    assert f"intermediates: {len(rep.rows)} compared over 13 layers, 0 outside" in text


def _swap_layers_1_and_7(src, dst):
    """layers/layers_1 holds layers 1 and 7 (index 0, 1 of axis 1): swap them."""
    t = ckptconv.load(src)
    sub = t["params"]["layers"]["layers_1"]
    for path, leaf in ckptconv.tree.leaves_with_paths(sub):
        node = sub
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = np.asarray(leaf)[:, [1, 0]]
    t["params"]["layers_remainder"]["layers_0"]["Dense_0"]["bias"] += 1.0
    ckptconv.save(t, dst, format="orbax")


def test_period_wrong_blocks_fail_with_real_layer_numbers(period_pair, cli):
    loop, scan, d = period_pair
    bad = d / "swapped"
    _swap_layers_1_and_7(scan, bad)
    r = cli("verify", loop, bad, *PERIOD_CLI, "--json", d / "swapped.json")
    assert r.exit_code == 1, r.output
    rep = json.loads((d / "swapped.json").read_text())
    assert rep["passed"] is False and rep["numeric_passed"] is False
    bad_leaves = {c["path"]: c["layers"] for c in rep["leaves"] if c["status"] != "equal"}
    assert bad_leaves["params/layers/layers_1/Dense_0/kernel"] == [1, 7]
    assert bad_leaves["params/layers_remainder/layers_0/Dense_0/bias"] == [12]
    assert "  params/layers/layers_1/Dense_0/kernel: values differ in layers 1, 7" in r.output
    # layer 1 is the first to compute differently; layer 0 is untouched
    assert rep["first_bad_layer"] == 1
    assert all(row["passed"] for row in rep["rows"] if row["layer"] == 0)
    assert {row["layer"] for row in rep["rows"] if not row["passed"]} >= {1, 7, 12}


def test_period_3_conversion_fails_verify_period_6(period_pair, cli):
    loop, _, d = period_pair
    ckptconv.convert(loop, d / "p3", to="scan", period=3, **PERIOD_OPTS)
    r = cli("verify", loop, d / "p3", *PERIOD_CLI)
    assert r.exit_code == 1, r.output
    assert "leaves differ from to_scan(LOOP, period=6):" in r.output
    assert "  params/layers/layers_0/Dense_0/kernel: expected shape (16, 2, 16), found (16, 4, 16)" in r.output
    assert "Stacks of another depth: was SCAN converted with another --period?" in r.output
    assert "intermediates: not compared: the scan model cannot run on SCAN" in r.output
    assert r.output.splitlines()[-1] == "FAIL"


def test_period_needs_model_not_block(period_pair, cli):
    loop, scan, _ = period_pair
    r = cli("verify", loop, scan, *PERIOD_CLI[:-2], "--block", "ckptconv.models:NormAttentionBlock",
            "--input-shape", "1,4,16")
    assert r.exit_code == 2 and "--block builds a scan model of one layer per step" in r.output


def test_period_hints_structure_only():
    p = {"params": {f"layers_{i}": {"w": np.full((3,), i, np.float32)} for i in range(13)}}
    s = ckptconv.to_scan(p, period=6, **PERIOD_OPTS)
    assert ckptconv.verify(p, s, period=6, **PERIOD_OPTS).passed
    # converted with --period 6, verified without it
    text = ckptconv.verify(p, s, **PERIOD_OPTS).table()
    assert "pass the --period it was converted with." in text and text.endswith("FAIL")
    with pytest.raises(ckptconv.errors.GroupError, match="are LOOP and SCAN swapped"):
        ckptconv.verify(s, p, period=6, **PERIOD_OPTS)
    # a changed leftover layer is named by its real number
    # (a new subtree: to_scan's leftover layers are LOOP's own subtrees, not copies)
    rest = s["params"]["layers_remainder"]
    rest["layers_0"] = {"w": rest["layers_0"]["w"] + np.float32([0, 1, 0])}
    rep = ckptconv.verify(p, s, period=6, **PERIOD_OPTS)
    assert [(c.path, c.layers) for c in rep.leaves if not c.ok] == [("params/layers_remainder/layers_0/w", [12])]


# --------------------------------------------------------------------------
# Streaming, and options from SCAN's conversion record


def test_structure_check_reads_one_leaf_pair_at_a_time(pair, monkeypatch):
    """Paths are read with the lazy readers: every LOOP read is one layer's leaf
    (never a stack), every SCAN read one leaf, each once."""
    from ckptconv.formats import orbax as orbax_fmt

    loop, scan, params = pair
    reads: list[tuple[str, tuple]] = []
    real = orbax_fmt.read_array

    def spy(item, ref):
        out = real(item, ref)
        reads.append((item.name, out.shape))
        return out

    monkeypatch.setattr(orbax_fmt, "read_array", spy)
    rep = ckptconv.verify(loop, scan)
    assert rep.passed and len(rep.leaves) == 12
    loop_reads = [s for name, s in reads if name == "loop"]
    scan_reads = [s for name, s in reads if name == "scan"]
    layer_shapes = {leaf.shape for _, leaf in ckptconv.tree.leaves_with_paths(params["params"]["layer_0"])}
    assert len(loop_reads) == 12 * N and set(loop_reads) == layer_shapes
    assert len(scan_reads) == 12 and all(s[0] == N for s in scan_reads)


def _save_converted(d, tree, **opts):
    d.mkdir(exist_ok=True)
    ckptconv.save(tree, d / "loop")
    ckptconv.convert(d / "loop", d / "scan", to="scan", **opts)
    return d / "loop", d / "scan"


def test_options_come_from_the_record(tmp_path):
    rng = np.random.default_rng(0)
    tree = {"params": {
        **{f"dense_layers_{i}": {"w": rng.standard_normal((2, 3)).astype(np.float32)} for i in range(2)},
        **{f"moe_layers_{i}": {"w": rng.standard_normal((4, 3)).astype(np.float32)} for i in range(2)},
    }}
    groups = [("dense_layers_{i}", "dense_layers"), ("moe_layers_{i}", "moe_layers")]
    loop, scan = _save_converted(tmp_path, tree, groups=groups, axis=1)
    rep = ckptconv.verify(loop, scan)
    assert rep.passed, rep.table()
    assert rep.options_from == "record" and rep.options == {"groups": groups, "axis": 1}
    assert rep.table().splitlines()[1] == (
        "options: from SCAN's conversion record: --pattern 'dense_layers_{i}' --into dense_layers "
        "--pattern 'moe_layers_{i}' --into moe_layers --axis 1"
    )
    # Options given: the record is not read; these are wrong for this SCAN.
    given = ckptconv.verify(loop, scan, groups=groups)
    assert given.options_from == "given" and not given.passed
    # The library's groups=, as to_scan's.
    assert ckptconv.verify(loop, scan, groups=groups, axis=1).passed


def test_period_and_layers_from_the_record(tmp_path):
    p = {"params": {f"layers_{i}": {"w": np.full((3,), i, np.float32)} for i in range(13)}}
    loop, scan = _save_converted(tmp_path / "a", p, pattern="layers_{i}", into="layers", period=6)
    rep = ckptconv.verify(loop, scan)
    assert rep.passed, rep.table()
    assert rep.options == {"pattern": "layers_{i}", "into": "layers", "period": 6, "remainder": "separate", "axis": 0}
    t5 = {"block": {str(i): {"w": np.full((2,), i, np.float32), **({"bias": np.ones(2, np.float32)} if i == 0 else {})}
                    for i in range(4)}}
    loop, scan = _save_converted(tmp_path / "b", t5, layers="1:")
    rep = ckptconv.verify(loop, scan)
    assert rep.passed, rep.table()
    assert rep.options["layers"] == "1:"

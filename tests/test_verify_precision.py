"""verify compares the two forms at full float32 matmul precision, whatever
the caller's JAX default (TF32 on GPUs, bfloat16 passes on TPUs would make a
good conversion fail), and leaves the caller's setting as it was.

CPU computes float32 matmuls in full at any setting, so these tests check what
verify lowers (the precision each dot_general carries), not GPU numbers.
"""

from __future__ import annotations

import json
import re

import jax
import pytest
import test_verify
from test_verify import KW, KW_JSON, N, _tampered

import ckptconv
from ckptconv import models
from ckptconv.errors import VerifyError
from ckptconv.verify import (
    ROUNDING_TOLERANCES,
    compare_intermediates,
    matmul_rounding,
    record_lowered,
)

seed1 = test_verify.pair  # the fixture: test_verify's loop and scan checkpoints (Orbax)
BLOCK = {"block": models.NormAttentionBlock, "block_kwargs": KW, "input_shape": (2, 8, 16)}
CLI_BLOCK = ("--block", "ckptconv.models:NormAttentionBlock", "--block-kwargs", KW_JSON, "--input-shape", "2,8,16")
# seed-1's block: query, key, value, the two attention einsums, out, Dense_0
DOTS_PER_LAYER = 7


def _setting() -> str | None:
    return jax.config.jax_default_matmul_precision


@pytest.fixture
def global_bf16():
    """The caller's global default set to bfloat16 (TPU-style), restored after."""
    before = _setting()
    jax.config.update("jax_default_matmul_precision", "bfloat16")
    yield
    jax.config.update("jax_default_matmul_precision", before)


def _dot_precisions(hlo: str) -> list[str]:
    """The ``precision = [...]`` of every dot_general in StableHLO text."""
    dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
    out = []
    for line in dots:
        m = re.search(r"precision = \[(\w+), (\w+)\]", line)
        out.append(f"{m.group(1)}, {m.group(2)}" if m else "none")
    return out


def test_global_bfloat16_default_still_compares_at_highest(seed1, global_bf16):
    loop, scan, _ = seed1
    with record_lowered() as hlo:
        rep = ckptconv.verify(loop, scan, **BLOCK)
    assert rep.passed, rep.table()
    assert (rep.precision, rep.caller_precision, rep.rounding) == ("highest", "bfloat16", "float32")
    assert sorted(hlo) == ["loop", "loop step", "scan", "scan step"]
    # every dot of both compared runs at HIGHEST (the loop unrolled: N times the layer's)
    assert _dot_precisions(hlo["loop"]) == ["HIGHEST, HIGHEST"] * (N * DOTS_PER_LAYER)
    assert _dot_precisions(hlo["scan"]) == ["HIGHEST, HIGHEST"] * DOTS_PER_LAYER
    # the timed runs keep the caller's bfloat16 (jax writes it as DEFAULT)
    assert _dot_precisions(hlo["loop step"]) == ["DEFAULT, DEFAULT"] * (N * DOTS_PER_LAYER)
    assert _dot_precisions(hlo["scan step"]) == ["DEFAULT, DEFAULT"] * DOTS_PER_LAYER
    assert _setting() == "bfloat16"  # not leaked
    assert rep.tolerances == {"float32": (1e-5, 1e-5)}
    assert (
        "precision: highest (float32 matmuls in full in the compared runs; timed at the "
        "caller's jax_default_matmul_precision=bfloat16)"
    ) in rep.table().splitlines()


def test_cli_reports_the_precision_in_text_and_json(seed1, cli, global_bf16, tmp_path):
    loop, scan, _ = seed1
    out = tmp_path / "r.json"
    r = cli("verify", loop, scan, *CLI_BLOCK, "--json", out)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[2] == "device: cpu:0 (cpu)"
    assert lines[5] == (
        "precision: highest (float32 matmuls in full in the compared runs; timed at the "
        "caller's jax_default_matmul_precision=bfloat16)"
    )
    rep = json.loads(out.read_text())
    assert (rep["precision"], rep["caller_precision"], rep["rounding"]) == ("highest", "bfloat16", "float32")

    r = cli("verify", loop, scan, *CLI_BLOCK, "--precision", "default", "--json", "-")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert (rep["precision"], rep["caller_precision"], rep["rounding"]) == ("default", "bfloat16", "float32")
    # CPU computes float32 matmuls in full: float32's tolerance stands
    assert rep["tolerances"] == {"float32": [1e-5, 1e-5]}
    assert _setting() == "bfloat16"


def test_precision_default_keeps_the_callers_and_no_cache_mixes_them(seed1):
    """Under an enclosing context manager: "default" lowers the caller's
    precision, "highest" HIGHEST, alternately in one process (no jit cache hands
    a computation traced at one precision to the other)."""
    loop, scan, _ = seed1
    want = {
        "default": "DEFAULT, DEFAULT", "highest": "HIGHEST, HIGHEST",
    }
    with jax.default_matmul_precision("bfloat16"):
        for precision in ("default", "highest", "default"):
            with record_lowered() as hlo:
                rep = ckptconv.verify(loop, scan, **BLOCK, precision=precision, repeats=0)
            assert rep.passed and rep.precision == precision
            assert sorted(hlo) == ["loop", "scan"]  # repeats=0: nothing timed
            assert set(_dot_precisions(hlo["loop"])) == {want[precision]}
            assert set(_dot_precisions(hlo["scan"])) == {want[precision]}
            assert _setting() == "bfloat16"
        assert rep.table().splitlines()[3] == (
            "precision: default (the caller's jax_default_matmul_precision=bfloat16: float32 "
            "matmuls in full on cpu)"
        )
    with jax.default_matmul_precision("tensorfloat32"), record_lowered() as hlo:
        rep = ckptconv.verify(loop, scan, **BLOCK, precision="default", repeats=0)
    assert set(_dot_precisions(hlo["scan"])) == {"HIGH, HIGH"}
    assert rep.caller_precision == "tensorfloat32"
    assert _setting() is None


def test_one_element_off_by_1e3_relative_fails_at_full_precision(seed1, cli, global_bf16, tmp_path):
    loop, _, params = seed1
    kernel = ckptconv.to_scan(params)["params"]["blocks"]["Dense_0"]["kernel"]
    delta = float(kernel[1, 3, 5]) * 1e-3

    def bump(blocks):
        blocks["Dense_0"]["kernel"][1, 3, 5] *= 1 + 1e-3

    bad = _tampered(seed1, tmp_path, bump)
    r = cli("verify", loop, bad, *CLI_BLOCK)
    assert r.exit_code == 1, r.output  # 1: a difference (2 is a bad command line)
    lines = r.output.splitlines()
    assert lines[:4] == [
        f"verify {loop} (loop) against {bad} (scan)",
        "structure: 1 of 12 leaves differ from to_scan(LOOP):",
        f"  params/blocks/Dense_0/kernel: values differ in layer 1 (max |Δ| {delta:.3g})",
        "device: cpu:0 (cpu)",
    ]
    assert lines[4].startswith(" loop: compile ") and lines[5].startswith(" scan: compile ")
    assert lines[6:10] == [
        "precision: highest (float32 matmuls in full in the compared runs; timed at the "
        "caller's jax_default_matmul_precision=bfloat16)",
        "intermediates: 43 compared over 3 layers, 18 outside atol + rtol·|loop| "
        "(float32: 1e-05, 1e-05); first wrong layer: 1",
        f"  {'layer':>5}  {'intermediate':<44} {'max|Δ|':>10} {'mean|Δ|':>10} {'max rel':>10}  ",
        f"  {'1':>5}  {'Dense_0/__call__[0]':<44} {0.000307:10.3g} {8.26e-06:10.3g} {0.00189:10.3g}  FAIL",
    ]
    assert lines[9:29] == sorted(lines[9:29], key=lambda row: "ok" in row)  # FAIL rows first
    assert lines[29] == "  … 23 more rows, each smaller against its tolerance than those above (rows go worst first; "\
        "--json for all)"
    assert lines[-1] == "FAIL"
    # the numbers alone fail too, from the changed layer on; layer 0 is untouched
    rep = ckptconv.verify(loop, bad, **BLOCK)
    assert rep.precision == "highest" and not rep.numeric_passed
    assert rep.first_bad_layer == 1
    assert all(row.passed and row.max_abs == 0.0 for row in rep.rows if row.layer == 0)
    assert _setting() == "bfloat16"


def test_callers_setting_is_restored_after_an_error(seed1, global_bf16):
    loop, scan, _ = seed1
    with pytest.raises(VerifyError, match="running the models failed"):
        ckptconv.verify(loop, scan, **{**BLOCK, "input_shape": (2, 8, 8)})
    assert _setting() == "bfloat16"
    with pytest.raises(VerifyError, match=r"^precision='tf32': expected one of 'highest', 'default'\.$"):
        ckptconv.verify(loop, scan, **BLOCK, precision="tf32")
    assert _setting() == "bfloat16"


def test_cli_refuses_an_unknown_precision(seed1, cli):
    loop, scan, _ = seed1
    r = cli("verify", loop, scan, *CLI_BLOCK, "--precision", "tf32")
    assert r.exit_code == 2
    assert "Invalid value for '--precision': 'tf32' is not one of 'highest', 'default'." in r.output


@pytest.mark.parametrize(
    ("platform", "setting", "rounding"),
    [
        ("cpu", None, "float32"), ("cpu", "bfloat16", "float32"),
        ("gpu", None, "tensorfloat32"), ("gpu", "bfloat16", "tensorfloat32"),
        ("gpu", "highest", "float32"), ("gpu", "BF16_BF16_F32", "bfloat16"),
        ("tpu", None, "bfloat16"), ("tpu", "default", "bfloat16"),
        ("tpu", "tensorfloat32", "tensorfloat32"), ("tpu", "float32", "float32"),
    ],
)
def test_matmul_rounding(platform, setting, rounding):
    assert matmul_rounding(platform, setting) == rounding


def test_default_tolerances_follow_the_rounding():
    assert ROUNDING_TOLERANCES == {
        "float32": (1e-5, 1e-5), "tensorfloat32": (3e-2, 3e-2), "bfloat16": (0.25, 0.25),
    }
    two = jax.numpy.full((4,), 2.0)
    loop = {"layer_0": {"y": (two,)}, "layer_1": {"y": (two,)}}

    def passed(found, **kw):
        scan = {"blocks": {"y": (jax.numpy.full((2, 4), found),)}}
        rows, unmatched = compare_intermediates(loop, scan, into="blocks", **kw)
        assert not unmatched and len(rows) == 2
        (verdict,) = {r.passed for r in rows}
        return verdict

    # |Δ| <= atol + rtol·|loop|: float32 1e-5 + 2e-5, TF32 0.03 + 0.06, bfloat16 0.25 + 0.5
    assert not passed(2.05)
    assert passed(2.05, rounding="tensorfloat32") and not passed(2.1, rounding="tensorfloat32")
    assert passed(2.7, rounding="bfloat16") and not passed(2.8, rounding="bfloat16")
    # explicit tolerances win over the rounding's
    assert not passed(2.05, rounding="bfloat16", atol=1e-5, rtol=1e-5)
    assert passed(2.05, atol=0.05, rtol=0)

"""The bundled fixtures are what the README says they are."""

from __future__ import annotations

import json
from pathlib import Path

import ckptconv

FIX = Path(__file__).resolve().parent.parent / "fixtures"


def test_scan_fixtures_are_the_conversion_of_the_loop_fixtures():
    pairs = (("seed0_loop.msgpack", "seed0_scan.msgpack", 10), ("seed1_loop", "seed1_scan", 12))
    for loop, scan, leaves in pairs:
        rep = ckptconv.verify(FIX / loop, FIX / scan)
        assert rep.passed and len(rep.leaves) == leaves, rep.table()


def test_train_state_fixture(cli):
    r = cli("inspect", FIX / "seed1_train", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert (rep["format"], rep["layout"], rep["step"]) == ("orbax", "root", 2)
    (state,) = [it for it in rep["items"] if it["name"] == "state"]
    assert [g["members"] for g in state["to_scan"]["groups"]] == [
        "opt_state/0/mu/layer_{i}", "opt_state/0/nu/layer_{i}", "params/layer_{i}"]


def test_lm_fixture_converts_and_decodes_alike(tmp_path):
    ckptconv.convert(FIX / "lm_loop", tmp_path / "lm_scan", to="scan")
    rep = ckptconv.verify(FIX / "lm_loop", tmp_path / "lm_scan", model="ckptconv.models:causal_lm",
                          block_kwargs={"num_layers": 4, "hidden_dim": 16, "num_heads": 2})
    assert rep.passed, rep.table()
    assert sum(r.name.startswith("step_tokens") for r in rep.rows) == 4

"""verify --step: CheckpointManager roots are compared at one step, never two."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_verify_refuses_two_different_latest_steps_and_takes_step(tmp_path, cli):
    train = FIXTURES / "seed1_train"  # steps 1 and 2
    scan = tmp_path / "scan"
    r = cli("to-scan", train, scan, "--step", "1")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in scan.iterdir() if p.is_dir()) == ["1"]

    r = cli("verify", train, scan)
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [
        f"Error: {train} is at step 2 and {scan} at step 1 (the latest of each): a "
        "conversion is of one step. Pass --step N to compare step N of both."
    ]
    r = cli("verify", train, scan, "--step", "1")
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output
    r = cli("verify", train, scan, "--step", "2")
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [
        f"Error: {scan}: no step 2; the steps here are 1. Pass one of them with --step."
    ]


def test_verify_step_2_against_a_conversion_of_step_1_fails(tmp_path, cli):
    """Step 2 of the loop run is not what step 1's conversion holds: the
    structural check finds the first leaf that differs."""
    train = FIXTURES / "seed1_train"
    scan1 = tmp_path / "scan1"
    assert cli("to-scan", train, scan1, "--step", "1").exit_code == 0
    # A root holding step 2 whose data is step 1's: rename the step folder.
    (scan1 / "1").rename(scan1 / "2")
    r = cli("verify", train, scan1, "--step", "2")
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output

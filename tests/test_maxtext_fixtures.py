"""MaxText's own train states (fixtures/maxtext: written by MaxText 0.2.5's
trainer, loop and scan form): whole-state conversions give MaxText's other-form
layout, with per-collection layer axes (params and Adam moments on axis 1,
nnx_aux RNG state on axis 0), bit for bit against numpy stacking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ckptconv import tree as treelib
from ckptconv.formats import orbax

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "maxtext"
LOOP, SCAN = FIXTURES / "llama2_loop", FIXTURES / "llama2_scan"
N = 4


def _item(root: Path) -> Path:
    return root / "0" / "items"


def _lazy(root: Path) -> dict[str, object]:
    return {treelib.format_path(p): x for p, x in treelib.leaves_with_paths(orbax.read_lazy(_item(root)))}


def _read(root: Path, leaves: dict, name: str) -> np.ndarray:
    return np.asarray(orbax.read_array(_item(root), leaves[name]))


def _layout(leaves: dict, keep=lambda p: True) -> dict[str, tuple]:
    return {p: (tuple(x.shape), np.dtype(x.dtype).name) for p, x in leaves.items() if keep(p)}


def _custom(root: Path) -> dict:
    return json.loads((root / "0" / "_CHECKPOINT_METADATA").read_text())["custom_metadata"]


def _not_rng(p: str) -> bool:
    return not p.startswith("nnx_aux/")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from click.testing import CliRunner

    from ckptconv.cli import main

    work = tmp_path_factory.mktemp("maxtext")
    runs = {
        "scan": ["to-scan", LOOP, work / "scan", "--pattern", "layers_{i}", "--into", "layers", "--axis", "1"],
        "loop": ["to-loop", SCAN, work / "loop", "--from", "layers", "--pattern", "layers_{i}", "--axis", "1"],
    }
    out = {}
    for name, args in runs.items():
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        out[name] = (work / name, r.output)
    return out


def test_loop_train_state_to_scan_is_maxtexts_scan_layout(converted):
    out, output = converted["scan"]
    got, want = _lazy(out), _lazy(SCAN)
    # params, Adam mu/nu, counts and step: exactly MaxText's own scan layout.
    assert _layout(got, _not_rng) == _layout(want, _not_rng)
    assert _custom(out)["scan_layers"] is True and _custom(SCAN)["scan_layers"] is True
    # The loop model's RNG streams, held once under layers_0, are not layer state.
    assert "left alone: nnx_aux/model/decoder/layers_0: only layers_0 holds it (the params " \
        "have 4 layers): not layer state (RNG streams kept once); it stays where it is" in output
    assert sorted(p for p in got if p.startswith("nnx_aux/")) == sorted(
        p for p in _lazy(LOOP) if p.startswith("nnx_aux/")
    )
    # Bit for bit: every stacked leaf is np.stack of the loop layers on axis 1.
    src = _lazy(LOOP)
    for prefix in ("params/params/decoder", "opt_state/0/mu/params/decoder", "opt_state/0/nu/params/decoder"):
        for leaf in [p for p in got if p.startswith(prefix + "/layers/")]:
            rel = leaf[len(prefix + "/layers/"):]
            want_arr = np.stack([_read(LOOP, src, f"{prefix}/layers_{i}/{rel}") for i in range(N)], axis=1)
            have = _read(out, got, leaf)
            assert have.dtype == want_arr.dtype and have.tobytes() == want_arr.tobytes(), leaf


def test_scan_train_state_to_loop_is_maxtexts_loop_layout(converted):
    out, output = converted["loop"]
    got, want = _lazy(out), _lazy(SCAN)
    assert _layout(got, _not_rng) == _layout(_lazy(LOOP), _not_rng)
    assert _custom(out)["scan_layers"] is False
    assert "[items] nnx_aux/model/decoder/layers: 4 layers -> nnx_aux/model/decoder/layers_{i}" in output
    # nnx_aux is stacked on axis 0 (nn.scan's variable_axes), params on 1.
    for i in range(N):
        count = _read(out, got, f"nnx_aux/model/decoder/layers_{i}/self_attention/rngs/params/count")
        key = _read(out, got, f"nnx_aux/model/decoder/layers_{i}/self_attention/rngs/params/key")
        stacked_count = _read(SCAN, want, "nnx_aux/model/decoder/layers/self_attention/rngs/params/count")
        stacked_key = _read(SCAN, want, "nnx_aux/model/decoder/layers/self_attention/rngs/params/key")
        assert count.shape == () and count.tobytes() == stacked_count[i].tobytes()
        assert key.shape == (4,) and key.tobytes() == stacked_key[i].tobytes()
    for prefix in ("params/params/decoder", "opt_state/0/mu/params/decoder"):
        for leaf in [p for p in want if p.startswith(prefix + "/layers/")]:
            rel = leaf[len(prefix + "/layers/"):]
            stacked = _read(SCAN, want, leaf)
            for i in range(N):
                have = _read(out, got, f"{prefix}/layers_{i}/{rel}")
                assert have.tobytes() == np.take(stacked, i, axis=1).tobytes(), (leaf, i)


def test_round_trips_give_maxtexts_own_checkpoints_back(converted, tmp_path, cli):
    for name, original in (("scan", LOOP), ("loop", SCAN)):
        out, _ = converted[name]
        back = tmp_path / f"back_{name}"
        r = cli("to-loop" if name == "scan" else "to-scan", out, back,
                *(() if name == "scan" else ("--pattern", "layers_{i}", "--into", "layers", "--axis", "1")))
        assert r.exit_code == 0, r.output
        a, b = _lazy(back), _lazy(original)
        keep = _not_rng if name == "loop" else (lambda p: True)
        assert _layout(a, keep) == _layout(b, keep)
        for p in [p for p in b if keep(p)]:
            assert _read(back, a, p).tobytes() == _read(original, b, p).tobytes(), p


def test_axis_for_overrides_the_collection_rule(tmp_path, cli):
    r = cli("to-loop", SCAN, tmp_path / "out", "--from", "layers", "--pattern", "layers_{i}",
            "--axis", "1", "--axis-for", "nnx_aux=1")
    assert r.exit_code == 2
    assert "nnx_aux/model/decoder/layers/self_attention/rngs/aqt/count: shape (4,) has no layer axis 1" in r.output
    r = cli("to-loop", SCAN, tmp_path / "out", "--axis-for", "nnx_aux")
    assert r.exit_code == 2
    assert r.output.strip() == (
        "Error: --axis-for 'nnx_aux': give NAME=N, a collection (or a path of keys separated "
        "by '/') and its layer axis, like --axis-for nnx_aux=0."
    )
    assert not (tmp_path / "out").exists()

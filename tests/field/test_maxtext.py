"""ckptconv against MaxText 0.2.5 itself (issue 14: train state -> serving).

The fixtures (fixtures/maxtext/, written by MaxText's trainer: fixtures/maxtext/make.py)
are one step of the same tiny Llama-2, loop form and scan form. A checkpoint converted by
ckptconv is handed back to MaxText's trainer, and the first training step's loss must be
the loss of the checkpoint it came from. The two fixtures start from different random
weights (MaxText draws each layer's weights differently in the two forms), so their losses
differ by far more than the tolerance: loading the wrong weights cannot pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import maxtext_run
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = Path(__file__).resolve().parents[2]
LOOP = REPO / "fixtures" / "maxtext" / "llama2_loop"
SCAN = REPO / "fixtures" / "maxtext" / "llama2_scan"
STEP = "0"  # the fixtures' one step
LAYERS = 4
TOL = 1e-6

# Measured on this CPU build (jax/jaxlib 0.11.1, float32, matmul_precision=highest): the
# loss of the fixtures' second step, i.e. of the weights each fixture holds. Each is also
# the value the fixture README records; a different value means MaxText, the fixtures or
# the pins changed, not ckptconv.
L_LOOP = 4.548715591430664
L_SCAN = 4.708171844482422


def ckptconv(*args) -> str:
    """Run the installed ckptconv CLI (as a user does); return its output, fail on rc != 0."""
    exe = Path(sys.executable).with_name("ckptconv")
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"ckptconv {' '.join(map(str, args))} exited {proc.returncode}:\n{out}"
    return out


def restore(items: Path) -> dict:
    """An Orbax item, read by Orbax (not by ckptconv), as numpy arrays."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sharding info not provided when restoring"
        tree = ocp.PyTreeCheckpointer().restore(Path(items).absolute())

    def to_numpy(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return np.asarray(jax.random.key_data(x))
        return np.asarray(x)

    return jax.tree_util.tree_map(to_numpy, tree)


def flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """'/'-joined paths -> leaves; Orbax restores a tuple or list node (opt_state) as a list."""
    out = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
        path = f"{prefix}{key}"
        if isinstance(value, (dict, list, tuple)):
            out.update(flat(value, path + "/"))
        else:
            out[path] = value
    return out


def custom_metadata(step_dir: Path) -> dict:
    return json.loads((Path(step_dir) / "_CHECKPOINT_METADATA").read_text())["custom_metadata"]


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("maxtext")


@pytest.fixture(scope="session")
def converted(work):
    """Each ckptconv command of the issue, run once: name -> CheckpointManager root."""
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            out = work / name
            if name == "scan_to_loop":
                ckptconv("to-loop", SCAN, out, "--only", "params", "--axis", "1",
                         "--pattern", "layers_{i}", "--from", "layers")
            elif name == "loop_to_scan":
                ckptconv("to-scan", LOOP, out, "--only", "params", "--axis", "1",
                         "--pattern", "layers_{i}", "--into", "layers")
            elif name == "loop_params":
                ckptconv("extract", LOOP, out, "--only", "params")
            elif name == "scan_params":
                ckptconv("extract", SCAN, out, "--only", "params")
            elif name == "loop_bf16":
                ckptconv("extract", LOOP, out, "--only", "params", "--dtype", "bfloat16")
            else:
                raise KeyError(name)
            made[name] = out
        return made[name]

    return get


@pytest.fixture(scope="session")
def loss(work):
    """loss(kind, items_dir, scan_layers): MaxText's first loss, each run once per session."""
    cache = {}

    def get(kind: str, items: Path, scan_layers: bool) -> float:
        key = (kind, str(items), scan_layers)
        if key not in cache:
            run_dir = work / f"run{len(cache)}"
            if kind == "full":
                cache[key] = maxtext_run.first_loss_full_state(items, scan_layers, run_dir)
            else:
                cache[key] = maxtext_run.first_loss(items, scan_layers, run_dir)
        return cache[key]

    return get


# a. Baseline facts (no ckptconv involved).


def test_fixtures_are_what_maxtext_wrote():
    for root, scan in ((LOOP, False), (SCAN, True)):
        assert sorted(p.name for p in root.iterdir()) == [STEP]
        assert custom_metadata(root / STEP) == {"scan_layers": scan}
    loop = flat(restore(LOOP / STEP / "items"))
    scan = flat(restore(SCAN / STEP / "items"))
    assert {k.split("/")[0] for k in loop} == {"params", "opt_state", "step", "nnx_aux"}
    assert int(loop["step"]) == int(scan["step"]) == 1
    kernel = "params/params/decoder/{}/mlp/wi_0/kernel"
    assert scan[kernel.format("layers")].shape == (16, LAYERS, 32)  # layer axis 1
    assert [loop[kernel.format(f"layers_{i}")].shape for i in range(LAYERS)] == [(16, 32)] * LAYERS
    # Adam's moments mirror the params in each form.
    assert scan["opt_state/0/mu/" + kernel.format("layers")[len("params/"):]].shape == (16, LAYERS, 32)
    # nnx_aux's per-layer RNG state is stacked on axis 0, not 1: a whole-state --axis 1
    # conversion cannot treat it like the params.
    assert scan["nnx_aux/model/decoder/layers/self_attention/rngs/params/count"].shape == (LAYERS,)


def test_full_state_first_losses(loss):
    l_loop = loss("full", LOOP / STEP / "items", False)
    l_scan = loss("full", SCAN / STEP / "items", True)
    assert l_loop == pytest.approx(L_LOOP, abs=TOL)
    assert l_scan == pytest.approx(L_SCAN, abs=TOL)
    assert abs(l_loop - l_scan) > 1000 * TOL  # the two fixtures are told apart


def test_params_only_in_own_form_equals_full_state(converted, loss):
    """A params-only checkpoint resumes to the full state's first loss (the issue: 4.0924… both)."""
    l_loop = loss("params", converted("loop_params") / STEP / "items", False)
    l_scan = loss("params", converted("scan_params") / STEP / "items", True)
    assert l_loop == pytest.approx(loss("full", LOOP / STEP / "items", False), abs=TOL)
    assert l_scan == pytest.approx(loss("full", SCAN / STEP / "items", True), abs=TOL)


# b. Issue 14, must-show 1: params converted by ckptconv, loaded by MaxText in the other form.


def test_scan_to_loop_params_load_in_loop_form(converted, loss):
    out = converted("scan_to_loop")
    tree = flat(restore(out / STEP / "items"))
    assert {k.split("/")[0] for k in tree} == {"params"}
    assert {k.split("/")[3] for k in tree if k.startswith("params/params/decoder/layers")} == {
        f"layers_{i}" for i in range(LAYERS)
    }
    assert loss("params", out / STEP / "items", False) == pytest.approx(
        loss("full", SCAN / STEP / "items", True), abs=TOL
    )


def test_loop_to_scan_params_load_in_scan_form(converted, loss):
    out = converted("loop_to_scan")
    tree = flat(restore(out / STEP / "items"))
    assert {k.split("/")[0] for k in tree} == {"params"}
    assert tree["params/params/decoder/layers/mlp/wi_0/kernel"].shape == (16, LAYERS, 32)
    assert loss("params", out / STEP / "items", True) == pytest.approx(
        loss("full", LOOP / STEP / "items", False), abs=TOL
    )


def test_converted_metadata_names_the_new_form(converted, work):
    """MaxText's from_pretrained path (decode, SFT, RL, to_huggingface) reads scan_layers
    from _CHECKPOINT_METADATA: with a stale flag it refuses the checkpoint when the run sets
    scan_layers, and builds the wrong form when it does not. Its own check decides here
    (in a subprocess: pyconfig sets process-wide JAX options)."""
    cases = {name: scan for name, scan in (("scan_to_loop", False), ("loop_to_scan", True))}
    items = {name: str((converted(name) / STEP / "items").absolute()) for name in cases}
    script = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import maxtext_run
from maxtext.configs import pyconfig
from maxtext.utils import model_creation_utils
result = {{}}
for name, items in {items!r}.items():
    argv = ["train", str(maxtext_run.BASE_YML), "run_name=meta", "base_output_directory={work / 'meta'}",
            *maxtext_run.TINY, "load_parameters_path=" + items]
    unset = model_creation_utils.verify_and_sync_scan_layers(pyconfig.initialize(argv)).scan_layers
    try:
        scan = {{"scan_to_loop": "false", "loop_to_scan": "true"}}[name]
        model_creation_utils.verify_and_sync_scan_layers(pyconfig.initialize([*argv, "scan_layers=" + scan]))
        explicit = "accepted"
    except ValueError as e:
        explicit = str(e)
    result[name] = [unset, explicit]
print("RESULT " + json.dumps(result))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, DECOUPLE_GCLOUD="TRUE", JAX_PLATFORMS="cpu"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result == {name: [scan, "accepted"] for name, scan in cases.items()}, (
        result, {name: custom_metadata(converted(name) / STEP) for name in cases})


# c. extract --only params --dtype bfloat16: the serving copy.


def test_extract_params_bfloat16_bit_for_bit(converted):
    out = converted("loop_bf16")
    assert sorted(p.name for p in out.iterdir()) == [STEP]
    assert sorted(p.name for p in (out / STEP).iterdir()) == sorted(
        p.name for p in (LOOP / STEP).iterdir()
    )
    meta = json.loads((out / STEP / "_CHECKPOINT_METADATA").read_text())
    source = json.loads((LOOP / STEP / "_CHECKPOINT_METADATA").read_text())
    assert meta["item_handlers"] == source["item_handlers"]
    # MaxText's own entries are kept (ckptconv may add its own beside them).
    kept = {k: meta["custom_metadata"].get(k) for k in source["custom_metadata"]}
    assert kept == source["custom_metadata"] == {"scan_layers": False}
    src = flat(restore(LOOP / STEP / "items"))
    got = flat(restore(out / STEP / "items"))
    want = {k: v for k, v in src.items() if k.startswith("params/")}
    assert sorted(got) == sorted(want)  # layout unchanged; opt_state, step, nnx_aux gone
    assert len(want) == 3 + 9 * LAYERS
    for key, value in want.items():
        assert value.dtype == np.float32, key
        expected = value.astype(ml_dtypes.bfloat16)
        assert got[key].dtype == ml_dtypes.bfloat16, key
        assert got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key].view(np.uint16), expected.view(np.uint16), err_msg=key)

"""MaxText 0.2.5 resumes training from whole train states converted by ckptconv (issue 13,
must-show 2).

Each fixture (fixtures/maxtext/, one step of MaxText's own trainer) is resumed by MaxText in
its own form for STEPS steps, and the same state converted by ckptconv in one command
(params, Adam's mu/nu, step, nnx_aux) is resumed in the other form for the same steps:
every step's loss must agree. Resuming is MaxText's own: a new run whose checkpoint
directory holds the step (maxtext_run.resume, via="run_dir"). A checkpoint saved at step 0
holds the state after one update, so the resumed runs train steps 1 .. STEPS.

Negative controls show that the comparison catches what a wrong conversion does: a wrongly
ordered stack, and Adam's moments left in the old form. MaxText takes both without a word:
it checks only that the weights it expects are there with its shapes. The last test records
what MaxText does with the RNG state (nnx_aux), whose layout differs between the two forms
beyond the layer axis.

Measured once and not rerun here (each MaxText run costs 10-20 s of the field stage):
- the unconverted loop state resumed by the scan model is refused: "ValueError: Checkpoint
  does not match the model: - 'decoder/layers/mlp/wi_0/kernel': missing (model expects
  (16, 4, 32) float32) …";
- a params-only conversion (--only params) loaded with load_parameters_path restarts Adam
  and its learning-rate schedule: its losses differ from the resumed run's by 1.66e-3 and
  3.33e-3 at the second and third steps (the old-form moments show the same failure with
  the schedule kept);
- load_full_state_path=<step>/items instead of the run directory gives the same losses, bit
  for bit, for every checkpoint here (both restore through Orbax's partial_load).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import maxtext_run
import numpy as np
import pytest
from test_maxtext import ckptconv, custom_metadata, flat, restore

import ckptconv as ckc

REPO = Path(__file__).resolve().parents[2]
LOOP = REPO / "fixtures" / "maxtext" / "llama2_loop"
SCAN = REPO / "fixtures" / "maxtext" / "llama2_scan"
STEP = "0"  # the fixtures' one step
LAYERS = 4
STEPS = 3  # steps each resumed run trains: 1, 2, 3

# The tolerance on each step's loss, converted vs unconverted. Measured on this CPU build
# (jax/jaxlib 0.11.1, float32, matmul_precision=highest): the losses of the two forms are
# bit for bit the same at all three steps, both directions (difference 0.0; the issue
# measured 2.4e-7 on another setup). 1e-5 is ~20 float32 ulps of these losses (an ulp in
# [4, 8) is 2**-21 = 4.8e-7): room for another XLA build to sum in another order. It cannot
# hide a wrong conversion: the smallest difference a wrong state gives here is 1.4e-3
# (Adam's moments lost, step 2: test_old_form_moments_...), 140 x TOL; a swapped pair of
# layers gives 0.106 at the first step, 10^4 x TOL.
TOL = 1e-5

# Step 1 of a resumed run is the loss of the weights each fixture holds (test_maxtext.py).
L_LOOP = 4.548715591430664
L_SCAN = 4.708171844482422

RNG = "nnx_aux/model/decoder"


def losses_differ(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    assert sorted(a) == sorted(b), (a, b)
    return {s: abs(a[s] - b[s]) for s in a}


def write_root(items: dict, like: Path, out: Path) -> Path:
    """A CheckpointManager root with step 0 holding `items`, written by ckptconv's library
    (ckptconv.save: an Orbax item), beside the step metadata of the root `like`."""
    step = out / STEP
    step.mkdir(parents=True)
    for name in ("_CHECKPOINT_METADATA", "commit_success.txt"):
        shutil.copy(like / STEP / name, step / name)
    ckc.save(items, step / "items", format="orbax")
    return out


def swap_layers(node, i: int, j: int, path=()):
    """The params and Adam moments with layers i and j of each stack (axis 1) swapped."""
    if isinstance(node, dict):
        return {k: swap_layers(v, i, j, (*path, k)) for k, v in node.items()}
    if isinstance(node, list):
        return [swap_layers(v, i, j, (*path, n)) for n, v in enumerate(node)]
    if node is not None and path[0] in ("params", "opt_state") and "layers" in path:
        order = list(range(node.shape[1]))
        order[i], order[j] = j, i
        return np.take(node, order, axis=1)
    return node


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("maxtext_resume")


@pytest.fixture(scope="session")
def converted(work):
    """Each checkpoint the tests resume, made once: name -> CheckpointManager root."""
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            (work / "ckpt").mkdir(exist_ok=True)
            out = work / "ckpt" / name
            if name == "loop_to_scan":
                ckptconv("to-scan", LOOP, out, "--pattern", "layers_{i}", "--into", "layers", "--axis", "1")
            elif name == "scan_to_loop":
                ckptconv("to-loop", SCAN, out, "--from", "layers", "--pattern", "layers_{i}", "--axis", "1")
            elif name == "loop_to_scan_to_loop":
                ckptconv("to-loop", get("loop_to_scan"), out)  # no options: undoes the record
            elif name == "scan_to_loop_to_scan":
                ckptconv("to-scan", get("scan_to_loop"), out,
                         "--pattern", "layers_{i}", "--into", "layers", "--axis", "1")
            elif name == "swapped":
                # A stack in the wrong order: layers 1 and 2 exchanged in the params and,
                # consistently, in Adam's moments (what a misordered conversion writes).
                tree = ckc.load(get("loop_to_scan"))["items"]
                write_root(swap_layers(tree, 1, 2), get("loop_to_scan"), out)
            elif name == "old_form_moments":
                # The params (and step, nnx_aux) converted, Adam's mu/nu left in loop form.
                tree = ckc.load(get("loop_to_scan"))["items"]
                tree["opt_state"] = ckc.load(LOOP)["items"]["opt_state"]
                write_root(tree, get("loop_to_scan"), out)
            else:
                raise KeyError(name)
            made[name] = out
        return made[name]

    return get


@pytest.fixture(scope="session")
def runs(work, converted):
    """name -> (losses {step: loss}, log text) of one MaxText run, each run once per session."""
    cases = {
        # name: (checkpoint, scan_layers, how)
        "loop": (lambda: LOOP, False, "resume"),
        "scan": (lambda: SCAN, True, "resume"),
        "loop_to_scan": (lambda: converted("loop_to_scan"), True, "resume_save"),
        "scan_to_loop": (lambda: converted("scan_to_loop"), False, "resume_save"),
        "swapped": (lambda: converted("swapped"), True, "resume"),
        "old_form_moments": (lambda: converted("old_form_moments"), True, "resume"),
    }
    cache = {}

    def get(name: str):
        if name not in cache:
            root, scan, how = cases[name]
            run_dir = work / "runs" / name
            run_name = f"resume_{name}"
            cache[name] = maxtext_run.resume(root(), scan, run_dir, STEPS, run_name,
                                             save_final=how == "resume_save")
        return cache[name]

    return get


def said_about_rng(log: str) -> list[str]:
    """The log lines of a MaxText run that name nnx_aux, less Orbax's echo of the step's
    metadata (which quotes ckptconv's record of the conversion)."""
    return [ln for ln in log.splitlines() if "nnx_aux" in ln and "Read Metadata=" not in ln]


def saved_final(work: Path, name: str) -> dict:
    """The state a `resume_save` run saved after its last step, read by Orbax."""
    return flat(restore(work / "runs" / name / "out" / f"resume_{name}" / "checkpoints" / str(STEPS) / "items"))


# a. Baselines: MaxText resumes its own checkpoints in their own form.


def test_maxtexts_own_checkpoints_resume(runs):
    loop, _ = runs("loop")
    scan, _ = runs("scan")
    assert sorted(loop) == sorted(scan) == list(range(1, STEPS + 1))
    assert loop[1] == pytest.approx(L_LOOP, abs=TOL)
    assert scan[1] == pytest.approx(L_SCAN, abs=TOL)
    # Training goes on: each step's loss is lower than the one before.
    assert all(d[s + 1] < d[s] for d in (loop, scan) for s in range(1, STEPS))
    # The two fixtures are told apart by far more than the tolerance at every step.
    assert min(losses_differ(loop, scan).values()) > 1000 * TOL


# b. The whole state converted by ckptconv, resumed in the other form.


def test_loop_to_scan_resumes_in_scan_model(converted, runs):
    out = converted("loop_to_scan")
    assert custom_metadata(out / STEP)["scan_layers"] is True
    tree = flat(restore(out / STEP / "items"))
    for prefix in ("params/params", "opt_state/0/mu/params", "opt_state/0/nu/params"):
        assert tree[f"{prefix}/decoder/layers/mlp/wi_0/kernel"].shape == (16, LAYERS, 32)
        assert not any(k.startswith(f"{prefix}/decoder/layers_") for k in tree)
    assert int(tree["step"]) == 1 and int(tree["opt_state/0/count"]) == 1
    want, _ = runs("loop")
    got, _ = runs("loop_to_scan")
    diff = losses_differ(got, want)
    assert max(diff.values()) <= TOL, (got, want, diff)


def test_scan_to_loop_resumes_in_loop_model(converted, runs):
    out = converted("scan_to_loop")
    assert custom_metadata(out / STEP)["scan_layers"] is False
    tree = flat(restore(out / STEP / "items"))
    for prefix in ("params/params", "opt_state/0/mu/params", "opt_state/0/nu/params"):
        assert [tree[f"{prefix}/decoder/layers_{i}/mlp/wi_0/kernel"].shape for i in range(LAYERS)] == [
            (16, 32)
        ] * LAYERS
        assert f"{prefix}/decoder/layers/mlp/wi_0/kernel" not in tree
    assert int(tree["step"]) == 1 and int(tree["opt_state/0/count"]) == 1
    want, _ = runs("scan")
    got, _ = runs("scan_to_loop")
    diff = losses_differ(got, want)
    assert max(diff.values()) <= TOL, (got, want, diff)


def test_round_trips_give_maxtexts_checkpoints_back_bit_for_bit(converted):
    """loop -> scan -> loop (the second command with no options: the recorded undo) and
    scan -> loop -> scan give back every leaf MaxText wrote, nnx_aux included."""
    for name, source, scan in (("loop_to_scan_to_loop", LOOP, False), ("scan_to_loop_to_scan", SCAN, True)):
        out = converted(name)
        assert custom_metadata(out / STEP)["scan_layers"] is scan
        want = flat(restore(source / STEP / "items"))
        got = flat(restore(out / STEP / "items"))
        assert sorted(got) == sorted(want), name
        for key, value in want.items():
            if value is None:  # opt_state/1, optax's empty state
                assert got[key] is None, (name, key)
                continue
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, (name, key)
            np.testing.assert_array_equal(got[key], value, err_msg=f"{name}: {key}")


# c. Negative controls: what a wrong conversion gives, against TOL.


def test_swapped_layers_fail_the_tolerance(converted, runs):
    """MaxText takes a stack in the wrong order without a word (the shapes are right); the
    loss shows it from the first step (measured 0.106 at each step)."""
    right = flat(restore(converted("loop_to_scan") / STEP / "items"))
    wrong = flat(restore(converted("swapped") / STEP / "items"))
    for key in ("params/params/decoder/layers/mlp/wo/kernel", "opt_state/0/nu/params/decoder/layers/mlp/wo/kernel"):
        np.testing.assert_array_equal(wrong[key][:, [0, 2, 1, 3]], right[key])
    want, _ = runs("loop")
    got, _ = runs("swapped")
    diff = losses_differ(got, want)
    assert min(diff.values()) > 1000 * TOL, diff


def test_old_form_moments_are_silently_reset_and_fail_the_tolerance(converted, runs):
    """Adam's mu/nu left in loop form beside scan-form params: MaxText resumes anyway (its
    partial restore gives the moments it finds no match for their fresh value, zeros, and
    says nothing; it checks only the weights). The first step uses the same weights, so its
    loss agrees; the next steps take different updates (measured 1.38e-3 and 1.72e-3)."""
    tree = flat(restore(converted("old_form_moments") / STEP / "items"))
    assert "params/params/decoder/layers/mlp/wo/kernel" in tree
    assert "opt_state/0/mu/params/decoder/layers_0/mlp/wo/kernel" in tree
    assert "opt_state/0/mu/params/decoder/layers/mlp/wo/kernel" not in tree
    want, _ = runs("loop")
    got, log = runs("old_form_moments")
    diff = losses_differ(got, want)
    assert diff[1] <= TOL, diff
    assert min(diff[s] for s in range(2, STEPS + 1)) > 100 * TOL, diff
    assert "does not match the model" not in log


# d. The RNG state (nnx_aux) across forms.


def test_rng_state_layouts_and_what_maxtext_keeps(converted, runs, work):
    """The two forms hold their RNG streams differently: the loop model holds one stream set
    (the decoder's, shared by all layers) once, under layers_0; the scan model holds one per
    layer, stacked on axis 0 under `layers`, and the decoder's own under `rngs`. ckptconv
    restacks the per-layer ones and leaves the loop's held-once set where it is. MaxText
    resumes from both outputs without a word (its log names no nnx_aux key): it keeps the
    entries its model has and gives the others their fresh value. With dropout_rate=0 and no
    quantization (the fixtures' config) no stream is drawn while training, so the state it
    saves after three steps is the state it resumed with."""
    loop = flat(restore(LOOP / STEP / "items"))
    scan = flat(restore(SCAN / STEP / "items"))

    def rng(tree: dict) -> dict:
        return {k: v for k, v in tree.items() if k.startswith(RNG + "/")}

    def subtrees(tree: dict) -> set[str]:
        return {k[len(RNG) + 1:].split("/")[0] for k in rng(tree)}

    assert subtrees(loop) == {"layers_0"}
    assert subtrees(scan) == {"layers", "rngs"}
    # The loop model's held-once streams are the decoder's: the scan model's `rngs` keys.
    for stream in ("aqt", "dropout", "params"):
        np.testing.assert_array_equal(loop[f"{RNG}/layers_0/self_attention/rngs/{stream}/key"],
                                      scan[f"{RNG}/rngs/{stream}/key"])

    # loop -> scan: nnx_aux/.../layers_0 stays; MaxText's scan layout has layers + rngs.
    l2s = flat(restore(converted("loop_to_scan") / STEP / "items"))
    assert sorted(rng(l2s)) == sorted(rng(loop))
    for key, value in rng(loop).items():
        np.testing.assert_array_equal(l2s[key], value, err_msg=key)
    _, log = runs("loop_to_scan")
    assert said_about_rng(log) == []
    saved = saved_final(work, "loop_to_scan")
    # It dropped layers_0 and holds the scan model's own fresh streams: llama2_scan's.
    assert subtrees(saved) == {"layers", "rngs"}
    assert sorted(rng(saved)) == sorted(rng(scan))
    for key, value in rng(scan).items():
        np.testing.assert_array_equal(saved[key], value, err_msg=key)

    # scan -> loop: layers_0..3 (the stacked streams, unstacked) and rngs; MaxText's loop
    # layout has layers_0 only.
    s2l = flat(restore(converted("scan_to_loop") / STEP / "items"))
    assert subtrees(s2l) == {f"layers_{i}" for i in range(LAYERS)} | {"rngs"}
    _, log = runs("scan_to_loop")
    assert said_about_rng(log) == []
    saved = saved_final(work, "scan_to_loop")
    # It kept layers_0 from the checkpoint (scan's layer-0 stream, not the loop model's own
    # decoder streams) and dropped layers_1..3 and rngs.
    assert subtrees(saved) == {"layers_0"}
    for key in rng(loop):
        np.testing.assert_array_equal(saved[key], s2l[key], err_msg=key)
    count = f"{RNG}/layers_0/self_attention/rngs/params/count"
    assert int(saved[count]) == int(scan[f"{RNG}/layers/self_attention/rngs/params/count"][0]) == 11
    assert int(loop[count]) == 48  # what a loop run of its own holds there

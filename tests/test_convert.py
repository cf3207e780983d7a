"""File-to-file conversion through the CLI and `ckptconv.convert`, on real models,
restored with plain Orbax and flax.serialization."""

from __future__ import annotations

import json
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import digest

import ckptconv
from ckptconv import models

HIDDEN, HEADS, LAYERS = 16, 2, 3


def save_plain(tree, path: Path, fmt: str) -> Path:
    """Save with the libraries' own API, as a user would."""
    if fmt == "msgpack":
        path.write_bytes(flax.serialization.to_bytes(tree))
    else:
        with ocp.StandardCheckpointer() as c:
            c.save(path.absolute(), tree)
    return path


def restore_plain(path: Path, fmt: str, target=None):
    if fmt == "msgpack":
        if target is None:
            return flax.serialization.msgpack_restore(path.read_bytes())
        return flax.serialization.from_bytes(target, path.read_bytes())
    with ocp.StandardCheckpointer() as c:
        return c.restore(path.absolute(), target)


def bits(tree):
    return jax.tree.map(lambda x: (np.asarray(x).dtype.str, np.asarray(x).shape, np.asarray(x).tobytes()), tree)


def _apply(module, params, x):
    return np.asarray(module.apply({"params": params}, x))


def assert_same_output(got, want, ulps=8):
    """Model outputs of the loop form and the scan form, float32.

    The converted arrays are compared bit for bit elsewhere; the outputs are not,
    because XLA compiles a scanned body and unrolled layers differently (other
    fusions, other summation orders), and differently from one XLA release to the
    next. Each float32 op rounds to half an ulp, so the two agree to a few ulp of the
    output's scale: measured 0 to 3.5 ulp (jax 0.7.1 to 0.10.2, 3 layers); allow 8.
    """
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=ulps * np.finfo(np.float32).eps * scale)


@pytest.mark.parametrize("fmt", ["msgpack", "orbax"])
@pytest.mark.parametrize("make", [models.seed0, models.seed1], ids=["seed0", "seed1"])
def test_loop_checkpoint_to_scan_model(tmp_path, cli, make, fmt):
    loop, scan, (x,) = make(num_layers=LAYERS, hidden_dim=HIDDEN, num_heads=HEADS, batch=2, seq=4)
    params = loop.init(jax.random.PRNGKey(0), x)["params"]
    src = save_plain({"params": params}, tmp_path / "loop", fmt)
    out = tmp_path / "scan"
    r = cli("to-scan", src, out)
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == f"params/layer_{{i}}: {LAYERS} layers -> params/blocks"
    target = jax.eval_shape(lambda: scan.init(jax.random.PRNGKey(1), x))
    restored = restore_plain(out, fmt, {"params": target["params"]})
    if make is models.seed1:  # RMSNorm_0 and RMSNorm_1 stay apart, each stacked
        assert sorted(restored["params"]["blocks"]) == ["Dense_0", "RMSNorm_0", "RMSNorm_1", "self_attention"]
        assert restored["params"]["blocks"]["RMSNorm_1"]["scale"].shape == (LAYERS, HIDDEN)
    assert_same_output(_apply(scan, restored["params"], x), _apply(loop, params, x))


@pytest.mark.parametrize("fmt", ["msgpack", "orbax"])
@pytest.mark.parametrize("axis", [0, 1])
def test_scan_checkpoint_to_loop_model(tmp_path, cli, fmt, axis):
    loop, scan, (x,) = models.seed1(num_layers=LAYERS, hidden_dim=HIDDEN, num_heads=HEADS, batch=2, seq=4, axis=axis)
    params = scan.init(jax.random.PRNGKey(0), x)["params"]
    src = save_plain({"params": params}, tmp_path / "scan", fmt)
    out = tmp_path / "loop"
    r = cli("to-loop", src, out, "--axis", axis)
    assert r.exit_code == 0, r.output
    target = jax.eval_shape(lambda: loop.init(jax.random.PRNGKey(1), x))
    restored = restore_plain(out, fmt, {"params": target["params"]})
    assert sorted(restored["params"]) == [f"layer_{i}" for i in range(LAYERS)]
    assert_same_output(_apply(loop, restored["params"], x), _apply(scan, params, x))


def _train_state():
    loop, _, (x,) = models.seed1(num_layers=LAYERS, hidden_dim=HIDDEN, num_heads=HEADS, batch=2, seq=4)
    params = loop.init(jax.random.PRNGKey(0), x)["params"]
    tx = optax.adamw(1e-2)
    opt = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25), params)
    _, opt = tx.update(grads, opt, params)
    return {"params": params, "opt_state": opt}


def test_adamw_train_state_converts_in_one_call(tmp_path, cli):
    state = _train_state()
    src = save_plain(state, tmp_path / "state", "orbax")
    r = cli("to-scan", src, tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[:3] == [  # in Orbax's (sorted) key order
        "opt_state/0/mu/layer_{i}: 3 layers -> opt_state/0/mu/blocks",
        "opt_state/0/nu/layer_{i}: 3 layers -> opt_state/0/nu/blocks",
        "params/layer_{i}: 3 layers -> params/blocks",
    ]
    raw = restore_plain(tmp_path / "out", "orbax")  # raw: lists and dicts
    adam = raw["opt_state"][0]
    assert raw["opt_state"][1:] == [None, None]
    assert int(adam["count"]) == 1 and np.asarray(adam["count"]).dtype == np.int32
    for name in ("mu", "nu"):
        kernel = adam[name]["blocks"]["Dense_0"]["kernel"]
        want = np.stack([np.asarray(getattr(state["opt_state"][0], name)[f"layer_{i}"]["Dense_0"]["kernel"]) for i in range(LAYERS)])
        assert kernel.dtype == want.dtype and np.array_equal(kernel, want)
        assert sorted(adam[name]) == ["blocks"]
    # ... and back, bit for bit, to what Orbax restores from the original.
    assert cli("to-loop", tmp_path / "out", tmp_path / "back").exit_code == 0
    assert bits(restore_plain(tmp_path / "back", "orbax")) == bits(restore_plain(src, "orbax"))


def _odd_tree(seed=0, axis=0):
    rng = np.random.default_rng(seed)
    layers = {
        f"layer_{i}": {
            "f32": rng.standard_normal((3, 4)).astype(np.float32),
            "bf16": rng.standard_normal((4, 2)).astype(jnp.bfloat16),
            "i8": rng.integers(-128, 127, (2, 3)).astype(np.int8),
            # a 0-d leaf has no axis 1 to stack on
            **({"scalar": np.float32(i)} if axis == 0 else {"vec": np.full(1, i, np.float32)}),
            "empty": {},
        }
        for i in range(4)
    }
    return {
        "params": {**layers, "step": np.int32(3), "none": None, "empty": {}},
        "nnx": {"layers": {str(i): {"w": rng.standard_normal((2, 2)).astype(np.float32)} for i in range(3)}},
        "encoder": {f"layer_{i}": {"w": rng.standard_normal(2).astype(np.float32)} for i in range(2)},
    }


@pytest.mark.parametrize("fmt", ["msgpack", "orbax"])
@pytest.mark.parametrize("axis", [0, 1])
def test_round_trip_is_bit_exact(tmp_path, fmt, axis):
    tree = _odd_tree(axis=axis)
    src = save_plain(tree, tmp_path / "in", fmt)
    before = digest(src)
    res = ckptconv.convert(src, tmp_path / "scan", to="scan", axis=axis)
    assert sorted(ckptconv.tree.format_path(g.target) for g in res.groups) == ["encoder/blocks", "nnx/layers", "params/blocks"]
    scan = restore_plain(tmp_path / "scan", fmt)
    want = ckptconv.to_scan(restore_plain(src, fmt), axis=axis)
    assert bits(scan) == bits(want)
    assert scan["params"]["blocks"]["bf16"].dtype == jnp.bfloat16
    assert scan["params"]["blocks"]["i8"].shape == ((4, 2, 3) if axis == 0 else (2, 4, 3))
    # NNX lists go back with pattern {i}; the rest with the default layer_{i}.
    ckptconv.convert(tmp_path / "scan", tmp_path / "mid", to="loop", axis=axis)
    ckptconv.convert(tmp_path / "mid", tmp_path / "loop", to="loop", axis=axis, source="layers", pattern="{i}")
    assert bits(restore_plain(tmp_path / "loop", fmt)) == bits(restore_plain(src, fmt))
    assert digest(src) == before


def test_format_option_switches_format(tmp_path):
    tree = _odd_tree()
    src = save_plain(tree, tmp_path / "in.msgpack", "msgpack")
    ckptconv.convert(src, tmp_path / "out", to="scan", format="orbax")
    assert (tmp_path / "out" / "_METADATA").is_file()
    assert bits(restore_plain(tmp_path / "out", "orbax")) == bits(ckptconv.to_scan(restore_plain(src, "msgpack")))


def test_output_suffix_chooses_the_format(tmp_path, cli):
    """Without --format, OUT's name decides (.msgpack, .safetensors); else IN's format."""
    tree = {"params": {f"layer_{i}": {"w": np.full((2, 3), i, np.float32)} for i in range(3)}}
    src = save_plain(tree, tmp_path / "in", "orbax")
    want = ckptconv.to_scan(tree)
    r = cli("to-scan", src, tmp_path / "scan.msgpack")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "scan.msgpack").is_file()
    assert bits(restore_plain(tmp_path / "scan.msgpack", "msgpack")) == bits(want)
    # The undo command names IN's format, since OUT's differs.
    assert f"ckptconv to-loop {tmp_path / 'scan.msgpack'} LOOP_OUT --format orbax" in r.output
    ckptconv.convert(src, tmp_path / "scan.safetensors", to="scan")
    got = ckptconv.load(tmp_path / "scan.safetensors")
    assert bits(got) == bits(want)
    # --format wins over the name; a name without a known suffix keeps IN's format.
    ckptconv.convert(src, tmp_path / "odd.msgpack", to="scan", format="orbax")
    assert (tmp_path / "odd.msgpack" / "_METADATA").is_file()
    ckptconv.convert(tmp_path / "scan.msgpack", tmp_path / "loop", to="loop")
    assert (tmp_path / "loop").is_file()
    # save() too.
    ckptconv.save(tree, tmp_path / "saved.msgpack")
    assert bits(restore_plain(tmp_path / "saved.msgpack", "msgpack")) == bits(tree)
    ckptconv.save(tree, tmp_path / "saved")
    assert (tmp_path / "saved" / "_METADATA").is_file()


def test_out_ending_in_a_slash_is_a_folder(tmp_path, cli):
    """``out/`` names a folder: a one-file output there is refused (pathlib
    would drop the slash and write a file named ``out``); an Orbax one is the
    folder itself."""
    tree = {"params": {f"layer_{i}": {"w": np.full((2, 3), i, np.float32)} for i in range(3)}}
    src = tmp_path / "in.msgpack"
    src.write_bytes(flax.serialization.to_bytes(tree))
    before = digest(src)
    out = tmp_path / "out"
    r = cli("to-scan", src, f"{out}/")
    assert (r.exit_code, r.output) == (2, (
        f"Error: {out}/: OUT ends in '/', a folder, but a msgpack output is one file; name the file "
        f"({out / 'flax_model.msgpack'}, or {out}.msgpack), or pass --format orbax for a folder. Nothing "
        "was written and the input is unchanged.\n"))
    with pytest.raises(ckptconv.CkptconvError, match="a safetensors output is one file"):
        ckptconv.convert(src, f"{out}/", to="scan", format="safetensors")
    with pytest.raises(ckptconv.CkptconvError, match=r"; name the file \(.*/out.safetensors without the '/'\)"):
        ckptconv.convert(src, f"{out}.safetensors/", to="scan")
    assert not out.exists() and digest(src) == before
    r = cli("to-scan", src, f"{out}/", "--format", "orbax")
    assert r.exit_code == 0, r.output
    assert f"wrote {out} (orbax" in r.output
    assert bits(restore_plain(out, "orbax")) == bits(ckptconv.to_scan(tree))
    # Without the slash, a msgpack IN still gives a file of that name.
    r = cli("to-loop", out, tmp_path / "loop", "--format", "msgpack")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "loop").is_file()


def test_flax_training_checkpoint_file(tmp_path, cli):
    from flax.training import checkpoints

    state = {"params": {f"layer_{i}": {"w": np.full((2,), i, np.float32)} for i in range(3)}}
    path = checkpoints.save_checkpoint(tmp_path / "ckpts", state, step=7)
    assert Path(path).name == "checkpoint_7"
    r = cli("to-scan", path, tmp_path / "checkpoint_7_scan")
    assert r.exit_code == 0, r.output
    out = checkpoints.restore_checkpoint(tmp_path / "checkpoint_7_scan", target=None)
    np.testing.assert_array_equal(out["params"]["blocks"]["w"], [[0, 0], [1, 1], [2, 2]])


def _manager(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    state = _train_state()
    with ocp.CheckpointManager(root.absolute(), item_names=("state", "metrics")) as m:
        for step in (10, 20):
            m.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), metrics=ocp.args.JsonSave({"loss": step / 10})))
        m.wait_until_finished()
    return root


def test_checkpoint_manager_root_latest_and_step(tmp_path, cli):
    root = _manager(tmp_path)
    r = cli("to-scan", root, tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "[state] params/layer_{i}: 3 layers -> params/blocks" in r.output.splitlines()
    with ocp.CheckpointManager((tmp_path / "out").absolute(), item_names=("state", "metrics")) as m:
        assert m.all_steps() == [20] and m.latest_step() == 20
        got = m.restore(20, args=ocp.args.Composite(state=ocp.args.StandardRestore(), metrics=ocp.args.JsonRestore()))
    assert got.metrics == {"loss": 2.0}
    assert got.state["params"]["blocks"]["Dense_0"]["kernel"].shape == (LAYERS, HIDDEN, HIDDEN)
    r = cli("to-scan", root, tmp_path / "out10", "--step", 10)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "out10").iterdir() if p.name[0].isdigit()) == ["10"]
    r = cli("to-scan", root, tmp_path / "out30", "--step", 30)
    assert r.exit_code == 2
    assert f"Error: {root}: no step 30; the steps here are 10, 20. Pass one of them with --step." in r.output


def test_load_of_a_manager_root_is_quiet(tmp_path, caplog):
    """Orbax warns for each manager item that it has no _CHECKPOINT_METADATA of its own (the step has it)."""
    import logging

    root = _manager(tmp_path)
    with caplog.at_level(logging.WARNING):
        got = ckptconv.load(root)
    assert sorted(got) == ["state"]
    assert [r.getMessage() for r in caplog.records if "Metadata file does not exist" in r.getMessage()] == []


def test_checkpoint_manager_step_directory(tmp_path, cli):
    root = _manager(tmp_path)
    r = cli("to-scan", root / "20", tmp_path / "step_out")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "step_out").iterdir()) == sorted(p.name for p in (root / "20").iterdir())
    assert json.loads((tmp_path / "step_out" / "metrics" / "metrics").read_text()) == {"loss": 2.0}


def test_manager_root_to_a_file_writes_its_lone_item_at_the_root(tmp_path, cli):
    """A step's one pytree item is the file's tree (no {"state": ...} level); its JSON items are named as left out."""
    root = _manager(tmp_path)
    out = tmp_path / "serve.msgpack"
    r = cli("to-scan", root, out)
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-2] == f"not in {out}: 20/metrics (not pytree items; a msgpack file holds arrays only)"
    assert r.output.splitlines()[-1] == (
        f"to undo: ckptconv to-loop {out} LOOP_OUT --format orbax (an Orbax item: OUT holds no "
        "CheckpointManager step)"
    )
    got, want = restore_plain(out, "msgpack"), ckptconv.to_scan(_train_state())
    assert sorted(got) == ["opt_state", "params"]
    assert bits(got["params"]) == bits(want["params"])
    assert bits(got["opt_state"]["0"]["mu"]) == bits(want["opt_state"][0].mu)  # flax's form of a tuple
    # A step with one `default` item (CheckpointManager's default name), to safetensors.
    with ocp.CheckpointManager((tmp_path / "one").absolute()) as m:
        m.save(3, args=ocp.args.StandardSave(_train_state()["params"]))
    r = cli("to-scan", tmp_path / "one", tmp_path / "p.safetensors")
    assert r.exit_code == 0, r.output
    assert "not in" not in r.output
    assert bits(ckptconv.load(tmp_path / "p.safetensors")) == bits(ckptconv.to_scan(_train_state()["params"]))


def test_dry_run_writes_nothing(tmp_path, cli):
    src = save_plain(_odd_tree(), tmp_path / "in", "orbax")
    r = cli("to-scan", src, tmp_path / "out", "--dry-run")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1].startswith(f"dry run: would write {tmp_path / 'out'} (orbax, ")
    assert not (tmp_path / "out").exists()


def test_force_replaces_only_a_checkpoint(tmp_path, cli):
    """A trial's `to-loop … hf_out --force`, hf_out/ holding the model's
    config.json, deleted the folder and wrote a msgpack file in its place.
    --force replaces a checkpoint (or an empty file or folder); anything else
    stays, and the error says what it holds."""
    src = save_plain(_odd_tree(), tmp_path / "in.msgpack", "msgpack")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("keep me")
    for dst, what in [(tmp_path / "hf", "a folder that no format reads as a checkpoint (it holds config.json)"),
                      (tmp_path / "notes.txt", "a file that no format reads as a checkpoint")]:
        for force in ([], ["--force"]):
            r = cli("to-scan", src, dst, *force)
            assert r.exit_code == 2
            inside = f" (one inside it: {dst}/<name>)" if dst.is_dir() else ""
            assert r.output == (
                f"Error: {dst} exists and is {what}; ckptconv replaces (with --force) only a "
                f"checkpoint, so nothing was written or deleted. Choose another path{inside}, or "
                "remove it yourself.\n")
    assert (tmp_path / "hf" / "config.json").read_text() == "{}"
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    with pytest.raises(ckptconv.OutputExistsError, match="only a checkpoint"):
        ckptconv.save({"w": np.zeros(2)}, tmp_path / "hf", force=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "zero").write_bytes(b"")
    for dst in (tmp_path / "empty", tmp_path / "zero"):
        assert cli("to-scan", src, dst, "--force").exit_code == 0
    r = cli("to-scan", src, tmp_path / "hf" / "flax_model.msgpack")
    assert r.exit_code == 0 and (tmp_path / "hf" / "flax_model.msgpack").is_file()
    # A review: a project folder holding an Orbax item beside its code looked
    # like a CheckpointManager step; a pickle passed msgpack's one-byte sniff.
    proj = tmp_path / "proj"
    proj.mkdir()
    ckptconv.save({"w": np.ones(3, np.float32)}, proj / "ckpt")
    (proj / "train.py").write_text("print(1)")
    (tmp_path / "state.pkl").write_bytes(b"\x80\x04\x95" + bytes(40))
    for dst, what in [(proj, "a folder holding an Orbax checkpoint beside other files (train.py)"),
                      (tmp_path / "state.pkl", "a file that no format reads as a checkpoint")]:
        r = cli("to-scan", src, dst, "--force")
        assert r.exit_code == 2 and f"Error: {dst} exists and is {what}; " in r.output, r.output
    assert (proj / "train.py").is_file() and (proj / "ckpt" / "_METADATA").is_file()
    # A CheckpointManager root and one of its steps are checkpoints: replaced.
    import orbax.checkpoint as ocp

    for name in ("root", "root2"):
        with ocp.CheckpointManager(tmp_path / name, item_names=("state",)) as m:
            m.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.ones(3)})))
            m.wait_until_finished()
    assert cli("to-scan", src, tmp_path / "root" / "1", "--force").exit_code == 0
    assert cli("to-scan", src, tmp_path / "root2", "--force").exit_code == 0


def test_force_replaces_and_inspect(tmp_path, cli):
    src = save_plain(_odd_tree(), tmp_path / "in.msgpack", "msgpack")
    save_plain({"old": np.zeros(3, np.float32)}, tmp_path / "out", "msgpack")  # a checkpoint
    assert cli("to-scan", src, tmp_path / "out", "--force").exit_code == 0
    assert flax.serialization.msgpack_restore((tmp_path / "out").read_bytes())["params"]["blocks"]["f32"].shape == (4, 3, 4)
    r = cli("inspect", src, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["format"] == "msgpack" and rep["layout"] == "file"
    (item,) = rep["items"]
    assert item["leaf_count"] == sum(row["layers"] for row in item["leaves"]) == 22
    assert item["to_scan"]["groups"][0] == {
        "path": "params", "members": "params/layer_{i}", "template": "layer_{i}", "layers": 4,
        "into": "params/blocks", "period": None, "first_layer": 0, "total_layers": 4,
        "remainder": None, "plan": "params/layer_{i}: 4 layers -> params/blocks",
    }
    rows = {row["path"]: row for row in item["leaves"]}
    assert rows["params/layer_{i}/bf16"] == {"path": "params/layer_{i}/bf16", "shape": [4, 2], "dtype": "bfloat16", "bytes": 16, "layers": 4}
    text = cli("inspect", tmp_path / "out")
    assert text.output.endswith("to-loop would unstack:\n  params/blocks: 4 layers -> params/layer_{i}\n  encoder/blocks: 2 layers -> encoder/layer_{i}\n")


# -- errors: exit 2, a clear message, IN unchanged, no OUT -----------------------


def _loop_tree():
    rng = np.random.default_rng(0)
    return {"params": {f"layer_{i}": {"w": rng.standard_normal((2, 3)).astype(np.float32)} for i in range(3)}}


def _expect_error(cli, tmp_path, src, args, message):
    before = digest(src)
    siblings = sorted(p.name for p in tmp_path.iterdir())
    r = cli(*args)
    assert r.exit_code == 2, r.output
    assert message in r.output, r.output
    assert "Traceback" not in r.output
    assert digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == siblings  # no OUT, no temp left
    return r


@pytest.mark.parametrize("fmt", ["msgpack", "orbax"])
def test_error_no_group(tmp_path, cli, fmt):
    src = save_plain({"params": {"Dense_0": {"w": np.zeros(2, np.float32)}, "Dense_1": {"w": np.zeros(2, np.float32)}}}, tmp_path / "in", fmt)
    _expect_error(cli, tmp_path, src, ["to-scan", src, tmp_path / "out"],
                  f"Error: {src}: no layer groups found (looked for layer_0, layer_1 …")


@pytest.mark.parametrize("fmt", ["msgpack", "orbax"])
def test_error_gap(tmp_path, cli, fmt):
    t = _loop_tree()
    del t["params"]["layer_1"]
    src = save_plain(t, tmp_path / "in", fmt)
    _expect_error(cli, tmp_path, src, ["to-scan", src, tmp_path / "out"],
                  f"Error: {src}: params: layers layer_{{i}} must be numbered 0 … N-1, but found 0, 2; missing layer_1.")


@pytest.mark.parametrize("fmt", ["msgpack", "orbax"])
def test_error_shape(tmp_path, cli, fmt):
    t = _loop_tree()
    t["params"]["layer_2"]["w"] = np.zeros((2, 4), np.float32)
    src = save_plain(t, tmp_path / "in", fmt)
    _expect_error(cli, tmp_path, src, ["to-scan", src, tmp_path / "out"],
                  "  layer 2: params/layer_2/w: expected shape (2, 3) (as in layer 0), found (2, 4)")


def test_error_into_collision(tmp_path, cli):
    t = _loop_tree()
    t["params"]["blocks"] = {"w": np.zeros(1, np.float32)}
    src = save_plain(t, tmp_path / "in", "orbax")
    _expect_error(cli, tmp_path, src, ["to-scan", src, tmp_path / "out"],
                  "params: cannot put the stacked layers under 'blocks': params/blocks already exists. Choose another name with --into.")


def test_a_pattern_that_matches_nothing_names_the_layers_it_sees(tmp_path, cli):
    tree = {"params": {"embed": np.ones((4, 2), np.float32),
                       **{f"layers_{i}": {"w": np.full((2, 2), i, np.float32)} for i in range(3)}}}
    src = save_plain(tree, tmp_path / "in", "orbax")
    _expect_error(cli, tmp_path, src, ["to-scan", src, tmp_path / "out", "--pattern", "layer_{i}"],
                  f"Error: {src}: no keys match the pattern 'layer_{{i}}'; the top-level keys are params. "
                  "If the layers have another name, pass --pattern (for example --pattern "
                  "'encoder_layer_{i}'); if the checkpoint is already stacked, use to-loop. Keys that look "
                  "like layers: params/layers_{i} (3): --pattern 'layers_{i}'.\n")


def test_error_unknown_format(tmp_path, cli):
    src = tmp_path / "notes.txt"
    src.write_text("hello")
    _expect_error(cli, tmp_path, src, ["to-scan", src, tmp_path / "out"],
                  f"Error: {src}: not a checkpoint ckptconv can read (msgpack: does not start with a msgpack map "
                  "or array; orbax: not a directory; safetensors: does not start with a safetensors header "
                  "(8-byte length, then '{')). Pass a flax msgpack file, an Orbax checkpoint directory (or a "
                  "CheckpointManager directory), a safetensors file, or a Hugging Face directory with "
                  "flax_model.msgpack.index.json or model.safetensors.index.json.\n")
    assert cli("inspect", src).output.count("\n") == 1  # one line
    blank = tmp_path / "blank.msgpack"
    blank.write_bytes(b"")
    _expect_error(cli, tmp_path, blank, ["to-scan", blank, tmp_path / "out"],
                  f"Error: {blank}: an empty file (0 bytes), not a checkpoint; it may be a save that never "
                  "finished: write it again.\n")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    _expect_error(cli, tmp_path, empty, ["inspect", empty], "orbax: a directory without _METADATA")
    r = cli("to-scan", src, tmp_path / "out", "--format", "zarr")
    assert r.exit_code == 2 and "Invalid value for '--format'" in r.output


def test_error_output_exists(tmp_path, cli):
    src = save_plain(_loop_tree(), tmp_path / "in", "msgpack")
    (tmp_path / "out").mkdir()
    _expect_error(cli, tmp_path, src, ["to-scan", src, tmp_path / "out"],
                  f"Error: {tmp_path / 'out'} already exists; pass --force to replace it, or choose another path.")


def test_error_to_loop_nothing_and_debug(tmp_path, cli):
    src = save_plain(_loop_tree(), tmp_path / "in", "orbax")
    _expect_error(cli, tmp_path, src, ["to-loop", src, tmp_path / "out"],
                  f"Error: {src}: no subtree named 'blocks' to unstack; the top-level keys are params.")
    r = cli("--debug", "to-loop", src, tmp_path / "out")
    assert r.exit_code != 0 and isinstance(r.exception, ckptconv.NothingToConvertError)


def test_error_corrupt_inputs(tmp_path, cli):
    src = save_plain(_loop_tree(), tmp_path / "in.msgpack", "msgpack")
    cut = tmp_path / "cut.msgpack"
    cut.write_bytes(src.read_bytes()[:-10])
    r = _expect_error(cli, tmp_path, cut, ["to-scan", cut, tmp_path / "out"], f"Error: {cut}")
    assert "msgpack" in r.output


def test_relative_paths(tmp_path, cli, monkeypatch):
    save_plain(_loop_tree(), tmp_path / "in", "orbax")
    monkeypatch.chdir(tmp_path)
    r = cli("to-scan", "in", "out")
    assert r.exit_code == 0, r.output
    r = cli("verify", "in", "out")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1] == "PASS"


def test_error_corrupt_orbax(tmp_path, cli):
    src = save_plain(_loop_tree(), tmp_path / "in", "orbax")
    for f in (src / "d").iterdir():
        f.write_bytes(f.read_bytes()[:100])
    r = _expect_error(cli, tmp_path, src, ["to-scan", src, tmp_path / "out"], f"Error: {src.absolute()}: cannot read")
    assert r.output.rstrip().endswith(
        "The checkpoint looks incomplete or damaged: check that its save finished and that it was copied whole."
    )
    assert "tensorstore_spec" not in r.output


def test_progress_bar_on_a_terminal(capsys):
    import time

    from ckptconv.cli import _Progress

    bar = _Progress("to-scan")
    bar(1024, 4096)
    time.sleep(0.2)  # tqdm redraws at most every 0.1 s
    bar(1024, 4096)
    bar.close()
    err = capsys.readouterr().err
    assert "to-scan" in err and "50%" in err and "2.00k/4.00k" in err


def test_quiet_when_piped(tmp_path, cli):
    src = save_plain(_loop_tree(), tmp_path / "in", "orbax")
    r = cli("to-scan", src, tmp_path / "out")
    assert r.exit_code == 0 and "\r" not in r.output and "%" not in r.output


def test_to_scan_prints_how_to_undo(tmp_path, cli):
    t = {"params": {f"layers_{i}": {"w": np.full(2, i, np.float32)} for i in range(2)},
         "nnx": {"stack": {str(i): {"w": np.full(2, i, np.float32)} for i in range(2)}}}
    src = save_plain(t, tmp_path / "in.msgpack", "msgpack")
    r = cli("to-scan", src, tmp_path / "out.msgpack", "--axis", "1")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "nnx/stack/{i}: 2 layers -> nnx/stack" in lines
    assert "params/layers_{i}: 2 layers -> params/blocks" in lines
    out = tmp_path / "out.msgpack"
    assert f"to undo: ckptconv to-loop {out} LOOP_OUT --from blocks --pattern 'layers_{{i}}' --from stack --pattern '{{i}}' --axis 1" in lines
    # following the hint gives the input back, byte for byte
    r = cli("to-loop", out, tmp_path / "b.msgpack", "--from", "blocks", "--pattern", "layers_{i}", "--from", "stack", "--pattern", "{i}", "--axis", "1")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b.msgpack").read_bytes() == src.read_bytes()


def test_error_output_folder_missing(tmp_path, cli):
    src = save_plain(_loop_tree(), tmp_path / "in", "msgpack")
    out = tmp_path / "nowhere" / "out"
    _expect_error(cli, tmp_path, src, ["to-scan", src, out],
                  f"Error: {out}: the folder {tmp_path / 'nowhere'} does not exist; create it first")


@pytest.mark.parametrize("fmt", ["msgpack", "orbax"])
def test_interrupt_leaves_no_output_and_keeps_old_one(tmp_path, cli, monkeypatch, fmt):
    from ckptconv import formats

    src = save_plain(_loop_tree(), tmp_path / "in", fmt)
    module = formats.get(fmt)
    real_write = module.write

    def write_then_interrupt(item, out_tree, dst, progress=None, fsync=False):
        real_write(item, out_tree, dst, progress, fsync)  # a complete temp output …
        raise KeyboardInterrupt  # … then Ctrl-C before the rename

    monkeypatch.setattr(module, "write", write_then_interrupt)
    before = digest(src)
    r = cli("to-scan", src, tmp_path / "out")
    assert r.exit_code == 130 and r.output == "Error: interrupted; nothing was written and the input is unchanged.\n"
    assert digest(src) == before and sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    old = save_plain({"old": np.arange(3, dtype=np.float32)}, tmp_path / "out", "msgpack")
    kept = old.read_bytes()
    r = cli("to-scan", src, tmp_path / "out", "--force")
    assert r.exit_code == 130 and old.read_bytes() == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_msgpack_file_with_a_list_at_the_top(tmp_path):
    tree = [{f"layer_{i}": {"w": np.full(2, i, np.float32)} for i in range(2)}, np.int32(7)]
    src = tmp_path / "list.msgpack"
    src.write_bytes(flax.serialization.msgpack_serialize(tree))
    ckptconv.convert(src, tmp_path / "out.msgpack", to="scan")
    got = flax.serialization.msgpack_restore((tmp_path / "out.msgpack").read_bytes())
    np.testing.assert_array_equal(got[0]["blocks"]["w"], [[0, 0], [1, 1]])
    assert got[1] == 7


def test_orbax_to_msgpack_streams_each_leaf(tmp_path, monkeypatch):
    from ckptconv.formats import orbax as orbax_fmt

    tree = _odd_tree()
    src = save_plain(tree, tmp_path / "in", "orbax")
    reads = []
    real = orbax_fmt.read_array
    monkeypatch.setattr(orbax_fmt, "read_array", lambda item, ref: reads.append(ref.source) or real(item, ref))
    ckptconv.convert(src, tmp_path / "out.msgpack", to="scan", format="msgpack")
    got = flax.serialization.msgpack_restore((tmp_path / "out.msgpack").read_bytes())
    assert bits(got) == bits(ckptconv.to_scan(restore_plain(src, "orbax")))
    assert len(reads) == len(set(reads))  # every input array read once, when written


def test_error_missing_input(tmp_path, cli):
    r = cli("to-scan", tmp_path / "nope", tmp_path / "out")
    assert r.exit_code == 2
    assert f"Error: {tmp_path / 'nope'}: no such file or directory; check the path" in r.output
    assert not (tmp_path / "out").exists()

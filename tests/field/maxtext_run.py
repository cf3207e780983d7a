"""Run MaxText's own trainer on CPU, on the tiny config the fixtures were written with.

Not a test: the harness `tests/field/test_maxtext.py` and `fixtures/maxtext/make.py` share.
Each run is a subprocess (`python -m maxtext.trainers.pre_train.train`), as a user runs it,
and takes 10-20 s here (mostly compilation). The loss comes from MaxText's `metrics_file`
(JSON lines, full float precision), not from its log line, which rounds to 3 digits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import maxtext

MAXTEXT_DIR = Path(maxtext.__file__).parent
BASE_YML = MAXTEXT_DIR / "configs" / "base.yml"

# Llama-2's architecture (RMSNorm, SwiGLU MLP, rotary attention) at toy size: 4 decoder
# layers, width 16, 2 heads of 8, vocabulary 64, sequences of 16, batch 1. float32 with
# matmul_precision=highest: at bfloat16 activations the loop and scan forms differ by ~2e-3
# in the loss, which would hide a wrong conversion.
TINY = [
    "model_name=llama2-7b",
    "override_model_config=true",
    "base_emb_dim=16",
    "base_mlp_dim=32",
    "base_num_query_heads=2",
    "base_num_kv_heads=2",
    "head_dim=8",
    "base_num_decoder_layers=4",
    "vocab_size=64",
    "max_target_length=16",
    "per_device_batch_size=1",
    "dataset_type=synthetic",
    "hardware=cpu",
    "attention=dot_product",
    "skip_jax_distributed_system=true",
    "enable_goodput_recording=false",
    "enable_tensorboard=false",
    "async_checkpointing=false",
    "dtype=float32",
    "matmul_precision=highest",
]

# (run name, seconds) of every MaxText run in this process, and each first loss measured;
# tests/field/conftest.py prints them.
RUNS: list[tuple[str, float]] = []
LOSSES: dict[str, float] = {}


class MaxTextError(RuntimeError):
    """The trainer exited non-zero; the message holds the tail of its output."""


def train(workdir: Path, run_name: str, scan_layers: bool, steps: int, *extra: str) -> list[dict]:
    """Run the trainer; return its metrics_file lines (one dict per step, in order)."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    metrics = workdir / f"{run_name}.metrics.jsonl"
    log = workdir / f"{run_name}.log"
    args = [
        sys.executable, "-m", "maxtext.trainers.pre_train.train", str(BASE_YML),
        f"run_name={run_name}",
        f"base_output_directory={workdir / 'out'}",
        f"scan_layers={'true' if scan_layers else 'false'}",
        f"steps={steps}",
        f"metrics_file={metrics}",
        *TINY,
        *extra,
    ]
    env = dict(os.environ, DECOUPLE_GCLOUD="TRUE", JAX_PLATFORMS="cpu")
    start = time.monotonic()
    with open(log, "w") as out:
        rc = subprocess.run(args, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - start
    RUNS.append((run_name, seconds))
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise MaxTextError(f"MaxText run {run_name!r} exited {rc} after {seconds:.1f} s:\n{tail}")
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def _one_step_loss(lines: list[dict], step: int, run_name: str) -> float:
    if len(lines) != 1 or lines[0]["step"] != step:
        raise MaxTextError(f"{run_name}: expected one training step, step {step}; got {lines}")
    LOSSES[run_name] = float(lines[0]["learning/loss"])
    return LOSSES[run_name]


def first_loss(params_items_dir: Path, scan_layers: bool, workdir: Path) -> float:
    """First step's training loss of a fresh run that loads a params-only checkpoint.

    `params_items_dir` is `<step>/items` holding `params/params/...`
    (MaxText's `load_parameters_path`); the optimizer starts fresh, at step 0.
    """
    name = f"params_{'scan' if scan_layers else 'loop'}_{Path(params_items_dir).parent.parent.name}"
    lines = train(
        workdir, name, scan_layers, 1,
        f"load_parameters_path={Path(params_items_dir).absolute()}",
        "enable_checkpointing=false",
    )
    return _one_step_loss(lines, 0, name)


def first_loss_full_state(items_dir: Path, scan_layers: bool, workdir: Path) -> float:
    """First step's training loss of a run resumed from a full train state.

    `items_dir` is `<step>/items` of a MaxText checkpoint (`load_full_state_path`). A
    checkpoint saved at step s holds the state after s + 1 updates, so the resumed run's
    first step is s + 1; it runs that one step and writes no checkpoint (MaxText insists
    on enable_checkpointing=true for a full-state load).
    """
    items_dir = Path(items_dir).absolute()
    first = int(items_dir.parent.name) + 1
    name = f"full_{'scan' if scan_layers else 'loop'}_{items_dir.parent.parent.name}"
    lines = train(
        workdir, name, scan_layers, first + 1,
        f"load_full_state_path={items_dir}",
        "enable_checkpointing=true",
        "save_checkpoint_on_start=false",
        "save_checkpoint_on_completion=false",
        "checkpoint_period=1000000",
    )
    return _one_step_loss(lines, first, name)


def _only_step(root: Path) -> int:
    """The one step directory of a CheckpointManager root."""
    steps = sorted(int(p.name) for p in Path(root).iterdir() if p.is_dir() and p.name.isdigit())
    if len(steps) != 1:
        raise MaxTextError(f"{root}: expected one step directory, got {steps}")
    return steps[0]


def _losses(lines: list[dict], first: int, count: int, run_name: str) -> dict[int, float]:
    """{step: loss} of a run that trained steps first .. first + count - 1, checked."""
    got = [line["step"] for line in lines]  # JSON numbers: 1.0, 2.0, …
    if got != list(range(first, first + count)):
        raise MaxTextError(f"{run_name}: expected steps {first}..{first + count - 1}; got {lines}")
    losses = {int(line["step"]): float(line["learning/loss"]) for line in lines}
    LOSSES[run_name] = losses[first]
    return losses


def resume(root: Path, scan_layers: bool, workdir: Path, count: int, run_name: str,
           via: str = "run_dir", save_final: bool = False) -> tuple[dict[int, float], str]:
    """Resume training from the one step of CheckpointManager root `root` for `count` steps.

    A checkpoint saved at step s holds the state after s + 1 updates (its `step` leaf is
    s + 1), so the resumed run trains steps s + 1 .. s + count and needs steps=s+count+1.
    `via`:
      "run_dir"     MaxText's own resume: `root` is copied to the new run's checkpoint
                    directory (`<base_output_directory>/<run_name>/checkpoints`), where the
                    trainer finds it as this run's latest step and restores the whole state.
      "full_state"  `load_full_state_path=<root>/<s>/items`.
    Both restore with Orbax's partial_load (MaxText 0.2.5, checkpointing.py): keys on disk
    the model lacks are dropped, and leaves the model has but the checkpoint lacks keep
    their fresh initial value, silently, except the weights (params), whose absence or
    wrong shape MaxText refuses ("Checkpoint does not match the model").
    With `save_final` the run saves its last step, s + count, under
    `<workdir>/out/<run_name>/checkpoints` (what the model held after training); else it
    writes no checkpoint. Returns ({step: loss}, the run's log text).
    """
    import shutil

    root = Path(root).absolute()
    workdir = Path(workdir).absolute()
    s = _only_step(root)
    extra = [
        "enable_checkpointing=true",  # MaxText insists on it for either resume
        "save_checkpoint_on_start=false",
        f"save_checkpoint_on_completion={'true' if save_final else 'false'}",
        "checkpoint_period=1000000",
    ]
    if via == "run_dir":
        ckpt_dir = workdir / "out" / run_name / "checkpoints"
        ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(root, ckpt_dir)
    elif via == "full_state":
        extra.append(f"load_full_state_path={root / str(s) / 'items'}")
    else:
        raise ValueError(f"via={via!r}")
    lines = train(workdir, run_name, scan_layers, s + count + 1, *extra)
    return _losses(lines, s + 1, count, run_name), (workdir / f"{run_name}.log").read_text(errors="replace")


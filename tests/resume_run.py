"""A training run resumed in the other model form with ``ckptconv.restore``.

Run as a script in its own process (``test_restore.py`` does), with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``::

    python tests/resume_run.py WORKDIR KIND [KIND ...]

KIND is ``loop-to-scan``, ``scan-to-loop``, ``period-to-scan`` or
``period-to-loop``. For each: the source form of a tiny model is trained
three steps with ``optax.adamw`` and saved with a ``CheckpointManager``,
then trained three more (the reference losses); ``ckptconv.restore`` reads
the checkpoint into the other form's abstract train state, sharded over a
2x4 mesh of the 8 host devices, and that state is trained three steps. One
JSON line per KIND on stdout says what was seen (losses, shardings, the
bytes of every addressable shard against the in-memory conversion, files
written); the test asserts on it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state

sys.path.insert(0, str(Path(__file__).parent))

from period_models import period_model  # noqa: E402

import ckptconv  # noqa: E402
from ckptconv import models  # noqa: E402
from ckptconv.formats import orbax as orbax_format  # noqa: E402

P = jax.sharding.PartitionSpec


def _models(kind: str):
    if kind.startswith("period"):
        loop, scan, (x,) = period_model(num_layers=7, period=3, axis=1)
        to_scan = {"pattern": "layers_{i}", "into": "layers", "period": 3, "axis": 1}
        to_loop = {"source": "layers", "pattern": "layers_{i}", "period": 3, "axis": 1}
    else:
        loop, scan, (x,) = models.seed1(num_layers=4, hidden_dim=16, num_heads=2)
        to_scan, to_loop = {}, {"source": "blocks", "pattern": "layer_{i}"}
    if kind.endswith("to-scan"):
        return loop, scan, x, "scan", to_scan
    return scan, loop, x, "loop", to_loop


def _state(module, x):
    params = module.init(jax.random.key(0), x)["params"]
    return train_state.TrainState.create(apply_fn=module.apply, params=params, tx=optax.adamw(1e-2))


def _step_fn(x, y):
    @jax.jit
    def step(state):
        def loss_fn(p):
            return jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    return step


def _sharded(mesh, s):
    """``s`` with a NamedSharding: the largest axis that divides by 4 on "b",
    the next one that divides by 2 on "a", the rest replicated."""
    dims = [None] * len(s.shape)
    for name, n in (("b", 4), ("a", 2)):
        for d in sorted(range(len(s.shape)), key=lambda d: -s.shape[d]):
            if dims[d] is None and s.shape[d] >= n and s.shape[d] % n == 0:
                dims[d] = name
                break
    return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=jax.sharding.NamedSharding(mesh, P(*dims)))


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def run(work: Path, kind: str) -> dict:
    src_mod, dst_mod, x, to, options = _models(kind)
    y = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    state = _state(src_mod, x)
    step = _step_fn(x, y)
    for _ in range(3):
        state, _ = step(state)
    ckpt = work / kind
    shutil.rmtree(ckpt, ignore_errors=True)
    with ocp.CheckpointManager(ckpt) as mgr:
        mgr.save(3, args=ocp.args.StandardSave(state))
        mgr.wait_until_finished()
    saved = jax.device_get(state)
    ref_losses = []
    for _ in range(3):
        state, loss = step(state)
        ref_losses.append(float(loss))

    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    abstract = jax.tree.map(lambda s: _sharded(mesh, s), jax.eval_shape(lambda: _state(dst_mod, x)))
    before = _files(work)
    tmp = work / f"tmp-{kind}"
    tmp.mkdir()
    os.environ["TMPDIR"] = str(tmp)
    plan = ckptconv.plan_restore(ckpt, like=abstract)
    reads: list[int] = []  # the elements of each region read from the checkpoint
    own = orbax_format.read_region

    def counted(item, ref, index):
        part = own(item, ref, index)
        reads.append(part.size)
        return part

    orbax_format.read_region = counted
    restore_mod = sys.modules["ckptconv.restore"]
    threshold = restore_mod._ON_DEVICE_BYTES
    if kind == "loop-to-scan":
        restore_mod._ON_DEVICE_BYTES = 0  # every stacked part assembled on its device
    try:
        restored = ckptconv.restore(ckpt, like=abstract)
        jax.block_until_ready(restored)
    finally:
        orbax_format.read_region = own
        restore_mod._ON_DEVICE_BYTES = threshold
    written = sorted(set(_files(work)) - set(before) - {tmp.name})
    changed = sorted(k for k, v in before.items() if _files(work).get(k) != v)

    # What every device holds, against the in-memory conversion of the saved state.
    convert = ckptconv.to_scan if to == "scan" else ckptconv.to_loop
    expected = {
        "params": convert(saved.params, **options),
        "mu": convert(saved.opt_state[0].mu, **options),
        "nu": convert(saved.opt_state[0].nu, **options),
    }
    got = {"params": restored.params, "mu": restored.opt_state[0].mu, "nu": restored.opt_state[0].nu}
    want = {"params": abstract.params, "mu": abstract.opt_state[0].mu, "nu": abstract.opt_state[0].nu}
    leaves = same_sharding = shards = equal_shards = 0
    for name in got:
        g = jax.tree_util.tree_leaves(got[name])
        e = jax.tree_util.tree_leaves(expected[name])
        w = jax.tree_util.tree_leaves(want[name])
        assert len(g) == len(e) == len(w)
        for a, b, s in zip(g, e, w):
            leaves += 1
            same_sharding += a.sharding.is_equivalent_to(s.sharding, a.ndim) and a.dtype == s.dtype
            for shard in a.addressable_shards:
                shards += 1
                equal_shards += np.array_equal(np.asarray(shard.data), np.asarray(b)[shard.index])
    partitioned = sum(
        any(p is not None for p in s.sharding.spec)
        for s in jax.tree_util.tree_leaves(want["params"])
    )
    sizes = [a.size for a in jax.tree_util.tree_leaves(restored)]
    losses = []
    step = _step_fn(x, y)
    resumed = restored
    for _ in range(3):
        resumed, loss = step(resumed)
        losses.append(float(loss))
    return {
        "kind": kind,
        "to": plan.to,
        "options": plan.options,
        "plan": plan.describe(),
        "step": int(restored.step),
        "count": int(restored.opt_state[0].count),
        "ref_losses": ref_losses,
        "losses": losses,
        "leaves": leaves,
        "same_sharding": int(same_sharding),
        "partitioned_params": int(partitioned),
        "shards": shards,
        "equal_shards": int(equal_shards),
        "devices": len(jax.devices()),
        "elements_read": sum(reads),
        "elements_restored": sum(sizes),
        "largest_read": max(reads),
        "largest_leaf": max(sizes),
        "written": written,
        "changed": changed,
        "tmp": sorted(os.listdir(tmp)),
    }


def main(argv: list[str]) -> None:
    work = Path(argv[0])
    for kind in argv[1:]:
        print(json.dumps(run(work, kind)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

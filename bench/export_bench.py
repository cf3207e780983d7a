"""Train state -> serving: params only, in bfloat16, against the naive way and `cp`.

    python bench/export_bench.py                  # the 1.6 GB train state (params + Adam mu/nu)
    python bench/export_bench.py --gb 3.2 --repeat 3

Builds an Orbax CheckpointManager root whose step holds a train state of the
given size (params of ``--layers`` layers, Adam ``mu`` and ``nu`` mirroring
them, a step counter: params are a third of the bytes), then runs, each in its
own process under ``/usr/bin/time -v``:

- ``cp -r`` of the input;
- the naive export: restore the whole train state with Orbax, keep
  ``params``, cast floating leaves to bfloat16, save with Orbax;
- ``ckptconv extract IN OUT --only params --dtype bfloat16``;
- ``ckptconv to-scan IN OUT --only params --dtype bfloat16`` (export and
  stack in the same pass).

and prints wall time, peak RSS and new disk of each, with ckptconv's wall as
a fraction of the naive one from the same run. The two extract outputs are
compared leaf by leaf (bit for bit).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
from convert_bench import build_tree, fresh, measure

HERE = Path(__file__).resolve().parent
PY = sys.executable
CKPTCONV = [PY, "-m", "ckptconv"]  # the console script's start

NAIVE = r"""
import sys, jax, numpy as np, ml_dtypes, orbax.checkpoint as ocp
src, dst = sys.argv[1], sys.argv[2]
with ocp.CheckpointManager(src, item_names=("state",)) as m:
    state = m.restore(m.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
params = jax.tree.map(
    lambda x: np.asarray(x).astype(ml_dtypes.bfloat16)
    if np.issubdtype(np.asarray(x).dtype, np.floating) else np.asarray(x),
    state["params"])
del state
with ocp.CheckpointManager(dst, item_names=("state",)) as m:
    m.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))
    m.wait_until_finished()
"""


def build_state(path: Path, gb: float, layers: int, leaves: int, width: int) -> None:
    import orbax.checkpoint as ocp

    params = build_tree(gb / 3, layers, leaves, width)["params"]
    rng = np.random.default_rng(1)
    moment = lambda x: rng.standard_normal(x.shape, dtype=np.float32)  # noqa: E731
    state = {
        "params": params,
        "opt_state": {
            "count": np.int32(2),
            "mu": {k: {n: moment(v) for n, v in layer.items()} if isinstance(layer, dict) else moment(layer)
                   for k, layer in params.items()},
            "nu": {k: {n: moment(v) for n, v in layer.items()} if isinstance(layer, dict) else moment(layer)
                   for k, layer in params.items()},
        },
        "step": np.int32(2),
    }
    with ocp.CheckpointManager(path.absolute(), item_names=("state",)) as m:
        m.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        m.wait_until_finished()


def disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def same(a: Path, b: Path) -> bool:
    """Every leaf of a and b equal, bit for bit (one leaf in memory at a time)."""
    from ckptconv import formats, tree

    fa, fb = formats.get("orbax"), formats.get("orbax")
    ia, ib = fa.describe(a).items["state"], fb.describe(b).items["state"]
    la = dict(tree.leaves_with_paths(fa.read_lazy(ia)))
    lb = dict(tree.leaves_with_paths(fb.read_lazy(ib)))
    if set(la) != set(lb):
        return False
    for k in la:
        x, y = np.asarray(fa.read_array(ia, la[k])), np.asarray(fb.read_array(ib, lb[k]))
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.6, help="size of the whole train state")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--leaves", type=int, default=7)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each case (min/median/max)")
    ap.add_argument("--workdir", type=Path, default=HERE / "out_export")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        state = work / "state"
        if not state.exists():
            build_state(state, args.gb, args.layers, args.leaves, args.width)
        print(f"train state {state}: {disk(state) / 1e9:.2f} GB on disk, {args.layers} layers "
              f"(params + Adam mu/nu), {args.repeat} run(s) per case")
        print(f"{'case':<44} {'wall (min/med/max)':>22} {'peak RSS':>10} {'new disk':>10}  of naive")
        cases = [
            ("copy of the input (cp -r)", lambda o: ["cp", "-r", str(state), str(o)]),
            ("naive: restore, keep params, cast, save", lambda o: [PY, "-c", NAIVE, str(state.absolute()), str(o.absolute())]),
            ("ckptconv extract --only params --dtype bf16", lambda o: [*CKPTCONV, "extract", str(state), str(o), "--only", "params", "--dtype", "bfloat16"]),
            ("ckptconv to-scan --only params --dtype bf16", lambda o: [*CKPTCONV, "to-scan", str(state), str(o), "--only", "params", "--dtype", "bfloat16"]),
        ]
        naive_med = None
        outs = {}
        for name, cmd in cases:
            walls, rsss = [], []
            for _ in range(args.repeat):
                out = fresh(work / re.sub(r"\W+", "_", name))
                wall, rss = measure(cmd(out))
                walls.append(wall)
                rsss.append(rss)
            med = statistics.median(walls)
            if name.startswith("naive"):
                naive_med = med
            ratio = f"{med / naive_med:6.0%}" if naive_med and not name.startswith(("naive", "copy")) else ""
            print(f"{name:<44} {min(walls):6.2f}/{med:6.2f}/{max(walls):6.2f} s "
                  f"{max(rsss):7.0f} MB {disk(out) / 1e6:7.0f} MB  {ratio}", flush=True)
            outs[name] = out
        print("ckptconv extract output equals the naive export bit for bit:",
              same(outs[cases[2][0]], outs[cases[1][0]]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""``ckptconv.restore(like=...)`` into the other form against the naive way, side by side.

    python bench/restore_bench.py --gb 1.6 --layers 48

Builds the convert bench's loop-form Orbax checkpoint (``layers`` layers of
``--leaves`` float32 leaves, random data) and its scan form, then runs each
case in its own process under ``/usr/bin/time -v`` (wall, peak RSS):

- ckptconv: ``restore(loop, like=<scan state>)`` and ``restore(scan, like=<loop state>)``;
- naive: Orbax restores the whole checkpoint as stored, ``to_scan`` /
  ``to_loop`` in memory (``np.stack`` / slices), ``jax.device_put``;
- as stored: ckptconv and Orbax (``StandardCheckpointer.restore`` into the
  same abstract state) restore the scan checkpoint with no conversion (what a
  run that needs none pays);
- import: the process that only imports JAX, Orbax and ckptconv and builds
  the abstract state (the RSS every case starts from).

Each case runs under `convert_bench.measure` (peak RSS of the process) and
writes its own wall time of the restore call, which excludes the imports.

Each case's result is checked (layers 0 and N-1 of one leaf, against the source) and prints
its peak RSS over the restored arrays' size, raw and above the import floor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from convert_bench import build_tree, fresh, measure  # noqa: E402


def _abstract(form: str, layers: int, leaves: int, width: int, cols: int) -> dict:
    import jax
    import jax.numpy as jnp

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def sds(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=one)

    layer = {f"w{j}": sds(width, cols) for j in range(leaves)}
    if form == "scan":
        params = {"blocks": {f"w{j}": sds(layers, width, cols) for j in range(leaves)}}
    else:
        params = {f"layer_{i}": dict(layer) for i in range(layers)}
    params["embed"] = sds(64, width)
    return {"params": params}


def child(case: str, src: str, form: str, shape: list[int]) -> None:
    """One case, in its own process: prints a JSON line (seconds, restored bytes)."""
    import jax

    import ckptconv

    like = _abstract(form, *shape)
    start = time.perf_counter()
    if case == "import":
        out = like
    elif case == "ckptconv":
        out = ckptconv.restore(src, like=like)
    elif case == "floor":
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as c:
            out = c.restore(Path(src).absolute(), like)
    else:  # naive
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as c:
            tree = c.restore(Path(src).absolute())
        tree = ckptconv.to_scan(tree) if form == "scan" else ckptconv.to_loop(tree)
        del c
        out = jax.device_put(tree)
        del tree
    jax.block_until_ready(out)
    seconds = time.perf_counter() - start
    nbytes = sum(x.size * 4 for x in jax.tree.leaves(out))
    if case != "import":
        # Layer 0 and the last of leaf w0, checked by the parent against the
        # source as Orbax reads it (a check here would raise this peak RSS).
        n = shape[0] - 1
        if form == "scan":
            w0 = out["params"]["blocks"]["w0"]
            first, last = np.asarray(w0[0]), np.asarray(w0[n])
        else:
            first = np.asarray(out["params"]["layer_0"]["w0"])
            last = np.asarray(out["params"][f"layer_{n}"]["w0"])
        np.savez(Path(src).parent / f"sample-{case}-{form}.npz", first=first, last=last)
    result = Path(src).parent / f"result-{case}-{form}.json"
    result.write_text(json.dumps({"seconds": seconds, "bytes": nbytes}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.6)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--leaves", type=int, default=7)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each case (min/median/max)")
    ap.add_argument("--workdir", type=Path, default=HERE / "out-restore")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--child", nargs=4, metavar=("CASE", "SRC", "FORM", "SHAPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        case, src, form, shape = args.child
        child(case, src, form, json.loads(shape))
        return
    import orbax.checkpoint as ocp

    import ckptconv

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; workdir {work}")
    try:
        tree = build_tree(args.gb, args.layers, args.leaves, args.width)
        cols = tree["params"]["layer_0"]["w0"].shape[1]
        loop, scan = fresh(work / "loop"), fresh(work / "scan")
        with ocp.StandardCheckpointer() as c:
            c.save(loop.absolute(), tree)
        n = args.layers - 1
        want = (tree["params"]["layer_0"]["w0"].copy(), tree["params"][f"layer_{n}"]["w0"].copy())
        del tree
        ckptconv.convert(loop, scan, to="scan")
        shape = json.dumps([args.layers, args.leaves, args.width, cols])
        gb = sum(f.stat().st_size for f in loop.rglob("*") if f.is_file()) / 1e9
        print(f"loop checkpoint: {args.layers} layers x {args.leaves} leaves ({args.width}, {cols}) "
              f"float32, {gb:.2f} GB on disk")
        cases = [
            ("import", str(loop), "scan"),
            ("ckptconv", str(loop), "scan"),
            ("naive", str(loop), "scan"),
            ("ckptconv", str(scan), "loop"),
            ("naive", str(scan), "loop"),
            ("ckptconv", str(scan), "scan"),
            ("floor", str(scan), "scan"),
        ]
        base = None
        print(f"{'case':34s} {'wall min/med/max s':>22s} {'peak RSS':>10s} {'restored':>9s} "
              f"{'RSS/restored':>12s} {'above import':>12s}")
        for case, src, form in cases:
            walls, rsss, info = [], [], None
            for _ in range(args.repeat):
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case, src, form, shape]
                _, rss = measure(cmd)  # peak RSS of the whole process
                info = json.loads((Path(src).parent / f"result-{case}-{form}.json").read_text())
                walls.append(info["seconds"])  # the restore call itself
                rsss.append(rss)
            rss = max(rsss)
            if case == "import":
                base = rss
            name = {"import": "import + abstract state",
                    "ckptconv": f"ckptconv restore {Path(src).name} -> {form}"
                    if Path(src).name != form else f"ckptconv restore {form} as stored",
                    "naive": f"naive {Path(src).name} -> {form}",
                    "floor": f"Orbax restore {Path(src).name} as stored"}[case]
            walls.sort()
            w = f"{walls[0]:6.2f}/{walls[len(walls) // 2]:6.2f}/{walls[-1]:6.2f}"
            restored = info["bytes"] / 2**20
            if case == "import":
                print(f"{name:34s} {w:>22s} {rss:8.0f} MB {'':>9s}")
                continue
            got = np.load(Path(src).parent / f"sample-{case}-{form}.npz")
            equal = np.array_equal(got["first"], want[0]) and np.array_equal(got["last"], want[1])
            ok = "" if equal else "  RESULT DIFFERS"
            print(f"{name:34s} {w:>22s} {rss:8.0f} MB {restored:6.0f} MB {rss / restored:11.2f}x "
                  f"{(rss - base) / restored:11.2f}x{ok}")
        print("wall: the restore call itself (import and checks excluded); peak RSS: the whole process")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Measures streaming msgpack conversion against flax's in-memory round trip.

Builds a ~1.7 GB flax msgpack checkpoint (48 layers x 7 float32 kernels of
1024x1024 and 1024x1536), then converts it to scan form (every layer leaf
stacked on axis 0, then on axis 1) and back to loop form, twice each way:

* naive: ``msgpack_restore`` -> ``np.stack`` / ``np.take`` -> ``msgpack_serialize``;
* stream: `read_lazy` -> `ckptconv.lazy` plan -> `msgpack_stream.write`.

Every run is its own process under ``/usr/bin/time -v`` (wall clock and maximum
resident set size, imports included); the in-process time of the conversion is
reported beside it. Both outputs must be byte-identical. The files go to a
temporary folder that is deleted at the end.

Usage::

    PYTHONPATH=. python bench/msgpack_probe.py [--layers 48] [--dir /tmp] [--repeat 2]
    PYTHONPATH=. python bench/msgpack_probe.py make SRC [--layers N]
    PYTHONPATH=. python bench/msgpack_probe.py {naive,stream} {scan,loop} SRC DST --axis A
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LEAVES = {
    ("attn", "query", "kernel"): (1024, 1024),
    ("attn", "key", "kernel"): (1024, 1024),
    ("attn", "value", "kernel"): (1024, 1024),
    ("attn", "out", "kernel"): (1024, 1024),
    ("mlp", "wi_0", "kernel"): (1024, 1536),
    ("mlp", "wi_1", "kernel"): (1024, 1536),
    ("mlp", "wo", "kernel"): (1536, 1024),
}


def make(src: str, layers: int) -> None:
    """Writes the loop-form checkpoint with flax."""
    from flax import serialization

    params: dict = {"embed": {"embedding": np.ones((512, 1024), np.float32)}}
    for i in range(layers):
        layer: dict = {}
        for j, (path, shape) in enumerate(LEAVES.items()):
            node = layer
            for key in path[:-1]:
                node = node.setdefault(key, {})
            # Distinct values per layer and leaf, so a misplaced layer shows.
            node[path[-1]] = np.full(shape, i * 10 + j, np.float32)
        params[f"layer_{i}"] = layer
    params["final_norm"] = {"scale": np.ones(1024, np.float32)}
    tree = {"params": params, "step": np.int64(100)}
    Path(src).write_bytes(serialization.msgpack_serialize(tree))


def _zip(fn, trees):
    if isinstance(trees[0], dict):
        return {k: _zip(fn, [t[k] for t in trees]) for k in trees[0]}
    return fn(trees)


def _to_scan(tree: dict, stack) -> dict:
    params = tree["params"]
    names = sorted((k for k in params if k.startswith("layer_")), key=lambda k: int(k[6:]))
    layers = [params.pop(k) for k in names]
    params["blocks"] = _zip(stack, layers)
    return tree


def _to_loop(tree: dict, unstack) -> dict:
    params = tree["params"]
    blocks = params.pop("blocks")
    per_leaf = _zip(lambda xs: unstack(xs[0]), [blocks])
    first = per_leaf
    while isinstance(first, dict):
        first = next(iter(first.values()))
    for i in range(len(first)):
        params[f"layer_{i}"] = _zip(lambda xs, i=i: xs[0][i], [per_leaf])
    return tree


def naive(direction: str, src: str, dst: str, axis: int) -> dict:
    from flax import serialization

    t0 = time.perf_counter()
    tree = serialization.msgpack_restore(Path(src).read_bytes())
    if direction == "scan":
        tree = _to_scan(tree, lambda xs: np.stack(xs, axis))
    else:
        n = lambda x: x.shape[axis]  # noqa: E731
        tree = _to_loop(tree, lambda x: [np.take(x, i, axis) for i in range(n(x))])
    Path(dst).write_bytes(serialization.msgpack_serialize(tree))
    return {"work_s": time.perf_counter() - t0}


def stream(direction: str, src: str, dst: str, axis: int) -> dict:
    from ckptconv import lazy
    from ckptconv.formats import msgpack_stream

    t0 = time.perf_counter()
    tree = msgpack_stream.read_lazy(src)
    t1 = time.perf_counter()
    if direction == "scan":
        tree = _to_scan(tree, lambda xs: lazy.stack(xs, axis))
    else:
        tree = _to_loop(tree, lambda x: lazy.unstack(x, axis))
    msgpack_stream.write(src, tree, dst)
    t2 = time.perf_counter()
    return {"work_s": t2 - t0, "read_lazy_s": t1 - t0, "write_s": t2 - t1}


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(64 << 20):
            h.update(block)
    return h.hexdigest()


def _timed(args: list[str], out: Path) -> dict:
    """Runs this script in a child under /usr/bin/time -v."""
    # Start every run with no dirty pages left by the one before, and no old
    # output to delete (this disk is mounted with online discard: deleting a
    # 1.7 GB file takes a second), so runs are comparable.
    out.unlink(missing_ok=True)
    os.sync()
    cmd = ["/usr/bin/time", "-v", sys.executable, __file__, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = re.search(r"Elapsed \(wall clock\) time .*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    h, m, s = wall.groups()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = int(h or 0) * 3600 + int(m) * 60 + float(s)
    out["max_rss_mb"] = int(rss.group(1)) / 1024
    return out


def _best(args: list[str], repeat: int) -> dict:
    """Fastest wall of ``repeat`` runs, with the highest peak RSS of them."""
    runs = [_timed(args, Path(args[3])) for _ in range(repeat)]
    best = min(runs, key=lambda r: r["wall_s"])
    return {**best, "max_rss_mb": max(r["max_rss_mb"] for r in runs)}


def run_all(layers: int, folder: str | None, repeat: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="msgpack_probe_", dir=folder))
    try:
        src = tmp / "loop.msgpack"
        t0 = time.perf_counter()
        _timed(["make", str(src), "--layers", str(layers)], src)
        size = src.stat().st_size
        print(
            f"source: {size / 1e9:.2f} GB, {layers} layers, made in {time.perf_counter() - t0:.1f}s"
        )
        print(f"{'case':<16}{'mode':<8}{'wall s':>8}{'work s':>8}{'max RSS MB':>12}  ratio")
        for axis in (0, 1):
            scan = {m: tmp / f"scan_{m}_{axis}" for m in ("naive", "stream")}
            back = {m: tmp / f"loop_{m}_{axis}" for m in ("naive", "stream")}
            for direction, ins, outs in (
                ("scan", {"naive": src, "stream": src}, scan),
                ("loop", scan, back),
            ):
                res = {}
                for mode in ("naive", "stream"):
                    res[mode] = _best(
                        [mode, direction, str(ins[mode]), str(outs[mode]), "--axis", str(axis)],
                        repeat,
                    )
                same = _sha(outs["naive"]) == _sha(outs["stream"])
                for mode in ("naive", "stream"):
                    r = res[mode]
                    ratio = r["wall_s"] / res["naive"]["wall_s"]
                    print(
                        f"{'to-' + direction + ' axis ' + str(axis):<16}{mode:<8}{r['wall_s']:>8.2f}"
                        f"{r['work_s']:>8.2f}{r['max_rss_mb']:>12.0f}  {ratio:.2f}"
                        + (
                            f"  (work {r['work_s'] / res['naive']['work_s']:.2f})"
                            if mode == "stream"
                            else ""
                        )
                    )
                print(f"  outputs identical: {same}")
                if direction == "loop":
                    print(f"  round trip equals source: {_sha(outs['stream']) == _sha(src)}")
            for p in (*scan.values(), *back.values()):
                p.unlink()
    finally:
        shutil.rmtree(tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", default="all", choices=["all", "make", "naive", "stream"])
    ap.add_argument("args", nargs="*")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--axis", type=int, default=0)
    ap.add_argument("--dir", default=None, help="where the temporary files go")
    ap.add_argument("--repeat", type=int, default=2, help="runs per case (best wall is shown)")
    a = ap.parse_args()
    if a.what == "all":
        run_all(a.layers, a.dir, a.repeat)
    elif a.what == "make":
        make(a.args[0], a.layers)
        print("{}")
    else:
        direction, src, dst = a.args
        fn = naive if a.what == "naive" else stream
        print(json.dumps(fn(direction, src, dst, a.axis)))


if __name__ == "__main__":
    main()

"""Cross-format conversion, msgpack -> Orbax and back, against the naive way.

    python bench/cross_format_bench.py                 # a 500 MB HF flax_model.msgpack
    python bench/cross_format_bench.py --mb 1000 --repeat 3

Builds one Hugging Face style ``flax_model.msgpack`` (``transformer/h/{i}/w{j}``,
random float32), then runs, each in its own process under ``/usr/bin/time -v``:

- ckptconv ``to-scan IN OUT --format orbax`` (each output leaf is read from the
  mapped msgpack file when the Orbax writer reaches it);
- the naive way: ``msgpack_restore`` the whole file, ``ckptconv.to_scan`` in
  memory, ``StandardCheckpointer().save``;
- ckptconv ``to-loop`` of that Orbax output back to msgpack, compared byte for
  byte with the input.

and prints wall time (min/median/max) and peak RSS of each, and ckptconv's
wall as a fraction of the naive one from the same run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
from convert_bench import CKPTCONV, PY, fresh, measure

HERE = Path(__file__).resolve().parent

NAIVE = r"""
import sys, flax.serialization as fs, orbax.checkpoint as ocp, ckptconv
src, dst = sys.argv[1], sys.argv[2]
tree = fs.msgpack_restore(open(src, "rb").read())
with ocp.StandardCheckpointer() as c:
    c.save(dst, ckptconv.to_scan(tree))
"""


def build(path: Path, mb: float, layers: int, leaves: int, width: int) -> None:
    import flax.serialization as fs

    cols = max(1, int(mb * 1e6 / (layers * leaves * width * 4)))
    rng = np.random.default_rng(0)
    tree = {"transformer": {
        "h": {str(i): {f"w{j}": rng.standard_normal((width, cols), dtype=np.float32)
                       for j in range(leaves)} for i in range(layers)},
        "wte": {"embedding": rng.standard_normal((64, width), dtype=np.float32)},
    }}
    path.write_bytes(fs.msgpack_serialize(tree))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=500)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--leaves", type=int, default=6)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=HERE / "out_cross")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = work / "flax_model.msgpack"
        if not src.exists():
            build(src, args.mb, args.layers, args.leaves, args.width)
        print(f"{src}: {src.stat().st_size / 1e6:.0f} MB, {args.layers} layers; {args.repeat} run(s) per case")
        print(f"{'case':<42} {'wall (min/med/max)':>22} {'peak RSS':>10}  of naive")
        orbax_out = work / "scan_orbax"
        cases = [
            ("naive: msgpack_restore, to_scan, save", lambda: [PY, "-c", NAIVE, str(src), str(fresh(work / "naive").absolute())]),
            ("ckptconv to-scan --format orbax", lambda: [*CKPTCONV, "to-scan", str(src), str(fresh(orbax_out)), "--format", "orbax"]),
            ("ckptconv to-loop (that Orbax) -> msgpack", lambda: [*CKPTCONV, "to-loop", str(orbax_out), str(fresh(work / "back.msgpack")), "--format", "msgpack", "--from", "h", "--pattern", "{i}"]),
        ]
        naive = None
        for name, cmd in cases:
            walls, rss = [], []
            for _ in range(args.repeat):
                w, r = measure(cmd())
                walls.append(w)
                rss.append(r)
            med = statistics.median(walls)
            naive = med if name.startswith("naive") else naive
            ratio = f"{med / naive:6.0%}" if naive and not name.startswith("naive") else ""
            print(f"{name:<42} {min(walls):6.2f}/{med:6.2f}/{max(walls):6.2f} s {max(rss):7.0f} MB  {ratio}", flush=True)
        import flax.serialization as fs
        import jax

        a = jax.tree_util.tree_leaves_with_path(fs.msgpack_restore((work / "back.msgpack").read_bytes()))
        b = jax.tree_util.tree_leaves_with_path(fs.msgpack_restore(src.read_bytes()))
        same = sorted((str(p), x.tobytes()) for p, x in a) == sorted((str(p), x.tobytes()) for p, x in b)
        print("msgpack -> Orbax -> msgpack gives every input leaf back bit for bit:", same)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

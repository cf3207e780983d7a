"""Memory of `verify`'s structural check on a checkpoint larger than a few leaves.

    python bench/verify_bench.py                 # 1.6 GB, 48 layers, as convert_bench.py builds it
    python bench/verify_bench.py --gb 3.2 --layers 96

Builds the loop checkpoint as ``bench/convert_bench.py`` does (``build_tree``: 48
layers of 7 float32 leaves 1024 wide, random data, saved with Orbax), converts it
with ``ckptconv to-scan``, then runs, each in its own process under
``/usr/bin/time -v`` (wall time and peak RSS):

- ``ckptconv verify LOOP SCAN``: both checkpoints read leaf by leaf (one SCAN leaf
  and one LOOP layer at a time);
- the same check on in-memory trees (``ckptconv.load`` of both, then
  ``ckptconv.verify(tree, tree)``): what verify did before it streamed;
- ``verify`` against a SCAN with one element changed in layer 47 (a copy of the
  scan checkpoint with one leaf rewritten): the FAIL names that layer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from convert_bench import PY, build_tree, fresh, measure  # noqa: E402

IN_MEMORY = """
import sys, ckptconv
rep = ckptconv.verify(ckptconv.load(sys.argv[1]), ckptconv.load(sys.argv[2]))
print(rep.table())
sys.exit(0 if rep.passed else 1)
"""


def run(cmd: list[str], expect: int) -> tuple[float, float]:
    """``measure`` for a command whose exit status is ``expect`` (verify's 1 is a FAIL).
    The wrapper's peak RSS is its child's: Linux reports the largest of a process
    and the children it waited for."""
    if expect != 0:
        check = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[2:]).returncode != int(sys.argv[1]))"
        cmd = [PY, "-c", check, str(expect), *cmd]
    return measure(cmd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.6)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--leaves", type=int, default=7)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--workdir", type=Path, default=HERE / "out" / "verify")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; workdir {work}")
    try:
        from ckptconv import io

        loop, scan, bad = work / "loop", work / "scan", work / "scan_bad"
        if not loop.exists():
            io.save(build_tree(args.gb, args.layers, args.leaves, args.width), loop, format="orbax")
        if not scan.exists():
            subprocess.run([PY, "-m", "ckptconv", "to-scan", str(loop), str(scan)], check=True,
                           capture_output=True)
        size = sum(p.stat().st_size for p in loop.rglob("*") if p.is_file())
        print(f"orbax: {loop} {size / 1e9:.2f} GB on disk, {args.layers} layers "
              f"({args.leaves} leaves of {args.width} x {int(args.gb * 1e9 / (args.layers * args.leaves * args.width * 4))} float32 each)")
        if not bad.exists():
            import numpy as np

            t = io.load(scan)
            t["params"]["blocks"]["w3"][args.layers - 1, 5, 7] += np.float32(1e-3)
            io.save(t, fresh(bad), format="orbax")
            del t
        print(f"{'case':<44} {'wall':>10} {'peak RSS':>12}")
        cases = [
            ("verify LOOP SCAN (streamed)", [PY, "-m", "ckptconv", "verify", str(loop), str(scan)], 0),
            ("verify of in-memory trees (load both)", [PY, "-c", IN_MEMORY, str(loop), str(scan)], 0),
            (f"verify LOOP SCAN, layer {args.layers - 1} changed (FAIL)",
             [PY, "-m", "ckptconv", "verify", str(loop), str(bad)], 1),
        ]
        for name, cmd, expect in cases:
            wall, rss = run(cmd, expect)
            print(f"{name:<44} {wall:8.2f} s {rss:9.0f} MB", flush=True)
        out = subprocess.run([PY, "-m", "ckptconv", "verify", str(loop), str(bad)],
                             capture_output=True, text=True).stdout
        print("the FAIL says:", next(line for line in out.splitlines() if "values differ" in line).strip())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

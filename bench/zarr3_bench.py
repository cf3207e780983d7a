"""Orbax zarr3 against zarr2: the same checkpoint, converted by ckptconv, side by side.

    python bench/zarr3_bench.py --gb 1.6 --layers 48 --repeat 3

Builds the checkpoint of ``bench/convert_bench.py`` (its `build_tree`: ``layers``
layers of ``--leaves`` random float32 leaves) once, and saves it twice with
Orbax's ``PyTreeCheckpointHandler``: ``use_zarr3=False`` (Orbax's default)
and ``use_zarr3=True`` (MaxText's). Then, ``--repeat`` times, runs
``ckptconv to-scan`` on each (and ``to-loop`` of that output) in its own
process under ``/usr/bin/time -v`` (convert_bench's `measure`), zarr2 and zarr3
back to back in alternating order, and prints wall time, CPU time (user +
system) and peak RSS with min / median / max over the repeats, and the
zarr3/zarr2 wall ratio of the runs of the same repeat; ``cp -r`` of the input,
once per repeat, shows the disk's pace. The outputs of the first repeat are compared leaf by
leaf (zarr3 against zarr2: the same arrays), and the zarr3 ones must say
``use_zarr3``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from convert_bench import CKPTCONV, build_tree, fresh, measure, same  # noqa: E402


def save(tree: dict, path: Path, zarr3: bool) -> None:
    import orbax.checkpoint as ocp

    handler = ocp.PyTreeCheckpointHandler(use_zarr3=zarr3)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(path.absolute(), args=ocp.args.PyTreeSave(tree))


def timed(cmd: list[str]) -> tuple[float, float, float]:
    """`measure` (wall s, peak RSS MB) plus the CPU seconds (user + system)
    the command's processes used: less swayed than wall time by other work
    on a busy machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, rss = measure(cmd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, rss, cpu


def spread(xs: list[float], fmt: str) -> str:
    return "/".join(format(x, fmt) for x in (min(xs), statistics.median(xs), max(xs)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.6)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--leaves", type=int, default=7)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    # Not under bench/out: other benches remove that folder when they finish.
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ckptconv-zarr3-bench")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    work = args.workdir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; workdir {work}")
    versions = ("zarr2", "zarr3")
    try:
        loops = {v: work / f"loop_{v}" for v in versions}
        if not all(p.exists() for p in loops.values()):
            tree = build_tree(args.gb, args.layers, args.leaves, args.width)
            for v, p in loops.items():
                fresh(p)
                save(tree, p, zarr3=v == "zarr3")
            del tree
        for v, p in loops.items():
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            print(f"{v}: {p} {size / 1e9:.2f} GB on disk, {args.layers} layers")
        cases = ("to-scan", "to-loop (ckptconv's scan)")
        walls = {(c, v): [] for c in cases for v in versions}
        rsss = {(c, v): [] for c in cases for v in versions}
        cpus = {(c, v): [] for c in cases for v in versions}
        ratios = {c: [] for c in cases}
        cp_walls: list[float] = []
        for r in range(args.repeat):
            order = versions if r % 2 == 0 else versions[::-1]
            # The disk's pace in this repeat: a plain copy of the zarr3 input.
            cp_out = fresh(work / "cp")
            cp_walls.append(measure(["cp", "-r", str(loops["zarr3"]), str(cp_out)])[0])
            fresh(cp_out)
            outs = {}
            for v in order:
                scan, back = fresh(work / f"scan_{v}"), fresh(work / f"back_{v}")
                for case, cmd in zip(cases, (["to-scan", loops[v], scan], ["to-loop", scan, back])):
                    wall, rss, cpu = timed([*CKPTCONV, *map(str, cmd)])
                    walls[case, v].append(wall)
                    rsss[case, v].append(rss)
                    cpus[case, v].append(cpu)
                outs[v] = scan, back
            for case in cases:
                ratios[case].append(walls[case, "zarr3"][-1] / walls[case, "zarr2"][-1])
            if r == 0:
                for i, case in enumerate(cases):
                    ok = same(outs["zarr2"][i], outs["zarr3"][i])
                    z3 = json.loads((outs["zarr3"][i] / "_METADATA").read_text())["use_zarr3"]
                    z2 = json.loads((outs["zarr2"][i] / "_METADATA").read_text())["use_zarr3"]
                    print(f"{case}: zarr3 output {'same arrays as' if ok else 'DIFFERS FROM'} zarr2's; "
                          f"use_zarr3 {z2} (zarr2 in), {z3} (zarr3 in)")
                    if not ok or z3 is not True or z2 is not False:
                        raise SystemExit("outputs are wrong")
            for v in versions:
                fresh(outs[v][0])
                fresh(outs[v][1])
        print(f"\n{args.repeat} runs each; min/median/max; cp -r of the input {spread(cp_walls, '.2f')} s")
        print(f"{'case':<27} {'zarr':<5} {'wall s':>17} {'cpu s':>17} {'peak RSS MB':>15}   "
              "zarr3/zarr2 wall, same run")
        for case in cases:
            for v in versions:
                ratio = spread(ratios[case], ".2f") if v == "zarr3" else ""
                print(f"{case:<27} {v[-1]:<5} {spread(walls[case, v], '.2f'):>17} "
                      f"{spread(cpus[case, v], '.2f'):>17} {spread(rsss[case, v], '.0f'):>15}   {ratio}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

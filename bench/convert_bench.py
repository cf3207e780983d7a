"""ckptconv against the naive restore-stack-save and `cp`, side by side.

    python bench/convert_bench.py --gb 1.6 --layers 48            # both formats
    python bench/convert_bench.py --gb 3.2 --layers 96 --formats orbax
    python bench/convert_bench.py --huge-gb 26 --layers 48        # larger than RAM, ckptconv only

Builds a loop-form checkpoint of the given size (``layers`` layers of
``--leaves`` float32 leaves, ``--width`` wide, random data so compression
cannot shrink it), then runs every case in its own process under
``/usr/bin/time -v`` and prints wall time and peak RSS:

- orbax to-scan; orbax to-loop of ckptconv's scan output (layer-thick chunks);
  orbax to-loop of a scan checkpoint saved the naive way (one chunk per array);
- msgpack to-scan and to-loop.

Each output is compared leaf by leaf with the naive one (one leaf in memory at
a time). ``--huge-gb`` builds the checkpoint by copying one random layer's
chunks (ckptconv's own Orbax writer), converts it both ways with ckptconv only
(the naive way cannot fit), and checks sampled layers of the result with
plain Orbax partial restores.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PY = sys.executable
CKPTCONV = [PY, "-m", "ckptconv"]  # the console script's start (ckptconv.cli would import everything twice: before and after the allocator re-exec)
NAIVE = [PY, str(HERE / "naive.py")]


def measure(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` under /usr/bin/time -v: (wall seconds, peak RSS in MB)."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stdout}\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return wall, rss / 1024


def fresh(path: Path) -> Path:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    return path


def build_tree(gb: float, layers: int, leaves: int, width: int, seed: int = 0) -> dict:
    cols = max(1, int(gb * 1e9 / (layers * leaves * width * 4)))
    rng = np.random.default_rng(seed)
    params = {
        f"layer_{i}": {f"w{j}": rng.standard_normal((width, cols), dtype=np.float32) for j in range(leaves)}
        for i in range(layers)
    }
    params["embed"] = rng.standard_normal((64, width), dtype=np.float32)
    return {"params": params}


def same(a: Path, b: Path) -> bool:
    """Leaf-by-leaf comparison of two checkpoints (one leaf in memory at a time)."""
    from ckptconv import formats, tree

    fa, fb = formats.detect(a), formats.detect(b)
    la = dict(tree.leaves_with_paths(fa.read_lazy(a)))
    lb = dict(tree.leaves_with_paths(fb.read_lazy(b)))
    if set(la) != set(lb):
        return False
    for p, ra in la.items():
        x, y = fa.read_array(a, ra), fb.read_array(b, lb[p])
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
            return False
    return True


def row(case: str, tool: str, wall: float, rss: float, naive: tuple[float, float] | None, ok: str = "") -> None:
    ratio = f"{wall / naive[0]:6.0%}" if naive else "      "
    print(f"{case:<34} {tool:<10} {wall:8.2f} s {rss:9.0f} MB  {ratio}  {ok}", flush=True)


def run_format(fmt: str, work: Path, args: argparse.Namespace) -> None:
    from ckptconv import io

    ext = ".msgpack" if fmt == "msgpack" else ""
    loop = work / f"loop{ext}"
    if not loop.exists():
        t = build_tree(args.gb, args.layers, args.leaves, args.width)
        io.save(t, loop, format=fmt)
        del t
    size = sum(p.stat().st_size for p in ([loop] if loop.is_file() else loop.rglob("*")) if p.is_file())
    print(f"\n{fmt}: {loop} {size / 1e9:.2f} GB on disk, {args.layers} layers, axis {args.axis}")
    print(f"{'case':<34} {'tool':<10} {'wall':>10} {'peak RSS':>12}  of naive")
    ax = ["--axis", str(args.axis)]

    def case(name: str, src: Path, direction: str) -> tuple[Path, Path]:
        slug = re.sub(r"\W+", "_", name)
        out_n = fresh(work / f"{slug}_naive{ext}")
        naive = measure([*NAIVE, fmt, direction, str(src), str(out_n), *ax]) if not args.skip_naive else None
        if naive:
            row(name, "naive", *naive, None)
        out_c = fresh(work / f"{slug}_ckptconv{ext}")
        wall, rss = measure([*CKPTCONV, direction, str(src), str(out_c), *ax])
        ok = ("same as naive" if same(out_c, out_n) else "DIFFERS FROM NAIVE") if naive else ""
        row(name, "ckptconv", wall, rss, naive, ok)
        return out_c, out_n

    cp_out = fresh(work / f"cp{ext}")
    row("copy of the input", "cp -r", *measure(["cp", "-r", str(loop), str(cp_out)]), None)
    fresh(cp_out)
    scan, naive_scan = case(f"{fmt} to-scan", loop, "to-scan")
    case(f"{fmt} to-loop (ckptconv's scan)", scan, "to-loop")
    if fmt == "orbax" and not args.skip_naive:
        case("orbax to-loop (single-chunk scan)", naive_scan, "to-loop")


def run_huge(work: Path, args: argparse.Namespace) -> None:
    """A checkpoint larger than RAM: built by chunk copies of one random layer."""
    import orbax.checkpoint as ocp

    from ckptconv import io, lazy
    from ckptconv.formats import orbax_stream

    one = work / "one_layer"
    if not one.exists():
        io.save(build_tree(args.huge_gb / args.layers, 1, args.leaves, args.width), one, format="orbax")
    src_tree = orbax_stream.read_lazy(one)
    layer0 = src_tree["params"]["layer_0"]
    big = fresh(work / "huge_loop")
    out = {"params": {f"layer_{i}": layer0 for i in range(args.layers)} | {"embed": src_tree["params"]["embed"]}}
    # By the chunk-copy engine: the clone would make the 48 layers 48 names
    # of one layer's chunks (OCDBT copies by reference), a checkpoint of one
    # layer's size on disk.
    from ckptconv.formats.orbax_stream import plan

    start = time.perf_counter()
    saved, plan.CLONE = plan.CLONE, False
    try:
        orbax_stream.write(one, out, big)
    finally:
        plan.CLONE = saved
    size = sum(p.stat().st_size for p in big.rglob("*") if p.is_file())
    print(f"\nhuge: built {big} ({size / 1e9:.1f} GB on disk, {args.layers} layers) in {time.perf_counter() - start:.0f} s")
    copied = fresh(work / "huge_cp")
    cp = measure(["cp", "-r", str(big), str(copied)])
    row("copy of the input (> RAM)", "cp -r", *cp, None)
    fresh(copied)
    scan = fresh(work / "huge_scan")
    wall, rss = measure([*CKPTCONV, "to-scan", str(big), str(scan)])
    row("orbax to-scan (> RAM)", "ckptconv", wall, rss, None, f"{wall / cp[0]:.2f}x cp -r")
    if args.copy:
        copy_scan = fresh(work / "huge_scan_copy")
        wall, rss = measure([*CKPTCONV, "to-scan", str(big), str(copy_scan), "--copy"])
        row("orbax to-scan --copy (> RAM)", "ckptconv", wall, rss, None, f"{wall / cp[0]:.2f}x cp -r")
        fresh(copy_scan)
        wall, rss = measure(["env", "CKPTCONV_CLONE=0", *CKPTCONV, "to-scan", str(big), str(copy_scan)])
        row("orbax to-scan, chunk engine (> RAM)", "ckptconv", wall, rss, None, f"{wall / cp[0]:.2f}x cp -r")
        fresh(copy_scan)
    # The clone shares IN's data files: keep IN until the to-loop is checked.
    back = fresh(work / "huge_back")
    wall, rss = measure([*CKPTCONV, "to-loop", str(scan), str(back)])
    row("orbax to-loop (> RAM)", "ckptconv", wall, rss, None, f"{wall / cp[0]:.2f}x cp -r")
    fresh(big)
    # The results restore with plain Orbax: partial restores of sampled layers.
    want = {k: orbax_stream.read_array(one, v.source) for k, v in layer0.items() if isinstance(v, lazy.Ref)}
    with ocp.PyTreeCheckpointer() as c:
        for i in (0, args.layers // 2, args.layers - 1):
            target = {"params": {f"layer_{i}": {k: np.zeros(v.shape, v.dtype) for k, v in want.items()}}}
            got = c.restore(back.absolute(), args=ocp.args.PyTreeRestore(item=target, partial_restore=True))
            assert all(np.array_equal(np.asarray(got["params"][f"layer_{i}"][k]), want[k]) for k in want)
        meta = c.metadata(scan.absolute())
        meta = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    blocks = meta["params"]["blocks"]
    print(f"restored layers 0, {args.layers // 2}, {args.layers - 1} of the to-loop output with Orbax: equal to the source;"
          f" scan output leaves {[tuple(blocks[k].shape) for k in sorted(blocks)][:2]} …")
    fresh(scan)
    fresh(back)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.6)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--leaves", type=int, default=7)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--axis", type=int, default=0)
    ap.add_argument("--formats", default="orbax,msgpack")
    ap.add_argument("--workdir", type=Path, default=HERE / "out")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--huge-gb", type=float, help="build and convert a checkpoint of this many GB (ckptconv only)")
    ap.add_argument("--copy", action="store_true", help="with --huge-gb: also to-scan with --copy (files copied whole) and by the chunk-copy engine (CKPTCONV_CLONE=0)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; workdir {args.workdir}")
    try:
        if args.huge_gb:
            run_huge(args.workdir, args)
        else:
            for fmt in args.formats.split(","):
                run_format(fmt, args.workdir, args)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

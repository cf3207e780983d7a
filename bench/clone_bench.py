"""Orbax conversion at the cost of the metadata: the clone engine against
``cp -r``, ``--copy`` (the clone with IN's data files copied whole), the
chunk-copy engine (``CKPTCONV_CLONE=0``) and naive, in one run.

    python bench/clone_bench.py --gb 1.6 --layers 48 --repeat 3
    python bench/clone_bench.py --gb 0.2 --layers 48 --skip-naive

Builds the loop-form Orbax checkpoint of bench/convert_bench.py (same
`build_tree`), then runs each case in its own process under /usr/bin/time -v
(wall time includes the process start; with ``--repeat N`` the cases take
turns N times and the walls are min/median/max, the ratios to ``cp -r`` are
of the medians) and prints wall, peak RSS (the largest), the time ckptconv
reports for the work itself (a second, quiet run) and the new disk the output
uses: the blocks of its files that no other checkpoint shares (files with one
link) and of its directories, i.e. what ``du`` of OUT gives once IN is
removed. Clone and ``--copy`` outputs are checked leaf by leaf against the
chunk-copy engine's.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from convert_bench import CKPTCONV, NAIVE, build_tree, fresh, measure, same  # noqa: E402


def ckptconv_time(cmd: list[str]) -> str:
    """The time ckptconv itself reports ("wrote OUT ... in X s": the work,
    without the process start), run once more quietly; "-" for other tools."""
    if not any(cmd[i : i + len(CKPTCONV)] == CKPTCONV for i in range(len(cmd))):
        return "-"
    out = Path(cmd[cmd.index("to-scan" if "to-scan" in cmd else "to-loop") + 2])
    fresh(out)
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    m = re.search(r" in ([0-9.]+) s", p.stdout)
    return f"{m.group(1)} s" if m else "?"


def new_disk(path: Path) -> int:
    """Bytes of ``path``'s blocks not shared with another checkpoint: files
    with one link, and directories."""
    total = 0
    for root, _dirs, files in os.walk(path):
        total += os.lstat(root).st_blocks * 512
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if st.st_nlink == 1:
                total += st.st_blocks * 512
    return total


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.1f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.6)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--leaves", type=int, default=7)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=1, help="run every case this many times, in turns")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip-check", action="store_true", help="do not compare outputs leaf by leaf")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ckptconv-clone-bench")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    work = args.workdir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; workdir {work}")
    try:
        run(work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, args: argparse.Namespace) -> None:
    from statistics import median

    from ckptconv import io

    loop = work / "loop"
    if not loop.exists():
        io.save(build_tree(args.gb, args.layers, args.leaves, args.width), loop, format="orbax")
    size = sum(p.stat().st_size for p in loop.rglob("*") if p.is_file())
    print(f"orbax: {size / 1e9:.2f} GB on disk, {args.layers} layers x {args.leaves} leaves; {args.repeat} run(s) per case")
    scan_chunks, loop_chunks = work / "scan_chunks", work / "loop_chunks"
    scan_copy, loop_copy = work / "scan_copy", work / "loop_copy"
    scan, back = work / "scan", work / "back"
    chunks = ["env", "CKPTCONV_CLONE=0", *CKPTCONV]
    # (case, command, output, output to check it against); a case's input is
    # an earlier case's output, so each turn runs them in this order.
    cases = [
        ("cp -r of IN", ["cp", "-r", str(loop), str(work / "cp")], work / "cp", None),
        ("chunk engine to-scan (CLONE=0)", [*chunks, "to-scan", str(loop), str(scan_chunks)], scan_chunks, None),
        ("chunk engine to-loop (of its scan)", [*chunks, "to-loop", str(scan_chunks), str(loop_chunks)], loop_chunks, None),
        ("--copy to-scan (clone, files copied)", [*CKPTCONV, "to-scan", str(loop), str(scan_copy), "--copy"], scan_copy, scan_chunks),
        ("--copy to-loop (of its scan)", [*CKPTCONV, "to-loop", str(scan_copy), str(loop_copy), "--copy"], loop_copy, loop_chunks),
        ("to-scan (clone engine)", [*CKPTCONV, "to-scan", str(loop), str(scan)], scan, scan_chunks),
        ("to-loop (clone, of its scan)", [*CKPTCONV, "to-loop", str(scan), str(back)], back, loop_chunks),
    ]
    if not args.skip_naive:
        cases += [
            ("naive to-scan", [*NAIVE, "orbax", "to-scan", str(loop), str(work / "naive_scan")], work / "naive_scan", None),
            ("naive to-loop", [*NAIVE, "orbax", "to-loop", str(work / "naive_scan"), str(work / "naive_loop")],
             work / "naive_loop", None),
        ]
    walls: dict[str, list[float]] = {c[0]: [] for c in cases}
    rsss: dict[str, float] = {c[0]: 0.0 for c in cases}
    for _turn in range(args.repeat):
        for case, cmd, out, _ in cases:
            fresh(out)
            wall, rss = measure(cmd)
            walls[case].append(wall)
            rsss[case] = max(rsss[case], rss)
    fresh(work / "cp")
    cp_wall = median(walls[cases[0][0]])
    print(f"{'case':<38} {'wall min/med/max':>20} {'peak RSS':>9} {'new disk':>10} {'of IN':>7} {'of cp -r':>9} {'work':>6}  check")
    for case, cmd, out, check in cases:
        w = walls[case]
        disk = new_disk(out) if out.exists() else 0
        ok = ""
        if check is not None and not args.skip_check:
            ok = "same as chunk engine" if same(out, check) else "DIFFERS FROM CHUNK ENGINE"
        work_time = ckptconv_time(cmd) if cmd[0] != "cp" else "-"
        print(
            f"{case:<38} {min(w):5.2f}/{median(w):5.2f}/{max(w):5.2f} s {rsss[case]:6.0f} MB {human(disk):>10} "
            f"{disk / size:7.2%} {median(w) / cp_wall:8.2f}x {work_time:>6}  {ok}",
            flush=True,
        )
    # Deleting IN leaves the clones readable: the shared files live on.
    shutil.rmtree(loop)
    if not args.skip_check:
        print(f"after rm -r IN: clone to-scan {'same' if same(scan, scan_chunks) else 'DIFFERS'} as the chunk engine")


if __name__ == "__main__":
    main()

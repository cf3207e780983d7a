"""One process against two (``jax.distributed`` on localhost), in one run.

    python bench/multihost_bench.py --gb 1.6 --layers 48 --repeat 2

Builds the loop-form Orbax checkpoint of bench/convert_bench.py (same
`build_tree`), then runs ``ckptconv to-scan`` as one process and as two
(``--coordinator 127.0.0.1:PORT --num-processes 2 --process-id I``), taking
turns ``--repeat`` times, each process under /usr/bin/time -v: wall of the
whole job (process start, JAX's import and ``jax.distributed``'s start
included) and every process's peak RSS. Both with the chunk-copy engine
(``CKPTCONV_CLONE=0``: the engine whose work is split between the processes)
and with the default clone engine (process 0's alone). Each two-process
output is compared leaf by leaf with the one-process output.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))

from convert_bench import CKPTCONV, build_tree, fresh, same  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(cmd: list[str], n: int, env: dict[str, str]) -> tuple[float, list[float]]:
    """Runs ``cmd`` as ``n`` processes (n > 1: with the process flags): the
    job's wall and each process's peak RSS (MB)."""
    subprocess.run(["sync"], check=True)
    flags = [[]] if n == 1 else [
        ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i)]
        for port in [_port()] for i in range(n)
    ]
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    start = time.perf_counter()
    procs = [
        subprocess.Popen(["/usr/bin/time", "-v", *cmd, *f], env=full_env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for f in flags
    ]
    outs = [p.communicate(timeout=1800) for p in procs]
    wall = time.perf_counter() - start
    rss = []
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{out}\n{err[-3000:]}")
        rss.append(int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) / 1024)
    return wall, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.6)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--leaves", type=int, default=7)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ckptconv-multihost-bench")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = args.workdir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; workdir {work}")
    try:
        from ckptconv import io

        loop = work / "loop"
        if not loop.exists():
            io.save(build_tree(args.gb, args.layers, args.leaves, args.width), loop, format="orbax")
        size = sum(p.stat().st_size for p in loop.rglob("*") if p.is_file())
        print(f"orbax: {size / 1e9:.2f} GB on disk, {args.layers} layers; to-scan, {args.repeat} turn(s)")
        cases = [
            ("chunk engine, 1 process", 1, {"CKPTCONV_CLONE": "0"}),
            ("chunk engine, 2 processes", 2, {"CKPTCONV_CLONE": "0"}),
            ("clone engine, 1 process", 1, {}),
            ("clone engine, 2 processes", 2, {}),
        ]
        walls: dict[str, list[float]] = {c[0]: [] for c in cases}
        peaks: dict[str, list[float]] = {c[0]: [] for c in cases}
        outs = {c[0]: work / re.sub(r"\W+", "_", c[0]) for c in cases}
        for _turn in range(args.repeat):
            for name, n, env in cases:
                fresh(outs[name])
                wall, rss = job([*CKPTCONV, "to-scan", str(loop), str(outs[name])], n, env)
                walls[name].append(wall)
                peaks[name] = [max(a, b) for a, b in zip(peaks[name], rss)] if peaks[name] else rss
        print(f"{'case':<28} {'wall min/med/max':>20}  peak RSS per process  check")
        for name, n, _env in cases:
            w = walls[name]
            ref = outs[cases[0][0]] if name.startswith("chunk") else outs[cases[2][0]]
            ok = "" if n == 1 else ("same as 1 process" if same(outs[name], ref) else "DIFFERS FROM 1 PROCESS")
            rss = " / ".join(f"{r:.0f} MB" for r in peaks[name])
            print(f"{name:<28} {min(w):5.2f}/{median(w):5.2f}/{max(w):5.2f} s  {rss:<21} {ok}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

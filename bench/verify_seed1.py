"""verify on the seed-1 configuration: compile and step time of both forms.

    python bench/verify_seed1.py [--layers 42] [--hidden 512] [--heads 4] [--batch 12] [--seq 32]

Builds seed-1's RMSNorm block model in loop form, converts its params with
ckptconv.to_scan, then runs ckptconv.verify with the block: both forms are
compiled and run on the default JAX device, every layer's intermediates diffed.
Prints the verify report (device, compile time, step time, worst rows).
"""

from __future__ import annotations

import argparse
import time

import jax

import ckptconv
from ckptconv import models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=42)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rows", type=int, default=8)
    args = ap.parse_args()
    kw = {"hidden_dim": args.hidden, "num_heads": args.heads, "dtype": args.dtype}
    loop, _, (x,) = models.seed1(
        num_layers=args.layers, batch=args.batch, seq=args.seq, **kw
    )
    start = time.perf_counter()
    params = {"params": models.init_loop_params(loop, (x[:1],))}
    print(f"init: {time.perf_counter() - start:.1f} s; jax {jax.__version__} on {jax.devices()[0]}")
    scan = ckptconv.to_scan(params)
    start = time.perf_counter()
    report = ckptconv.verify(
        params, scan, block=models.NormAttentionBlock, block_kwargs=kw, inputs=(x,)
    )
    print(report.table(max_rows=args.rows))
    print(f"verify wall: {time.perf_counter() - start:.1f} s")
    t_loop, t_scan = report.timings["loop"], report.timings["scan"]
    print(
        f"compile: loop {t_loop.compile_s:.2f} s, scan {t_scan.compile_s:.2f} s "
        f"({t_loop.compile_s / t_scan.compile_s:.1f}x); "
        f"step: loop {t_loop.step_s * 1e3:.1f} ms, scan {t_scan.step_s * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()

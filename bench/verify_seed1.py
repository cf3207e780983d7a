"""verify on the seed-1 configuration: compile and step time of both forms, at both precisions.

    python bench/verify_seed1.py [--layers 42] [--hidden 512] [--heads 4] [--batch 12] [--seq 32]
    python bench/verify_seed1.py --emulate     # CPU: the figures behind ROUNDING_TOLERANCES

Builds seed-1's RMSNorm block model in loop form, converts its params with
ckptconv.to_scan, then runs ckptconv.verify with the block: both forms are
compiled and run on the default JAX device, every layer's intermediates diffed.
Prints the verify report (device, compile time, step time, precision, worst
rows), then one line per ``precision`` ("highest", "default": the device's own
matmul precision) with the worst |Δ| between the forms and the tolerance.

``--emulate`` measures on CPU what a GPU's TF32 or a TPU's bfloat16 passes do
to the loop-vs-scan difference: every dot_general operand's float32 mantissa is
rounded (to nearest even, in integer bit operations XLA does not simplify away)
to 10 bits (TF32) or 7 (bfloat16) before a float32 dot. Both forms then round
alike on CPU (equal results), so the scan form also sums every contraction in
two halves, as a GPU's split-K may. For each rounding it prints the atol = rtol
that the two forms need (max |Δ| / (1 + |loop|)), each form's distance from the
full-precision run, the sum of those (the most two forms can differ), and the
worst |Δ| / tolerance of swapped layers 1 and 2 at the rounding's default
tolerance (> 1: caught).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

import ckptconv
from ckptconv import models
from ckptconv.verify import ROUNDING_TOLERANCES, compare_intermediates

MANTISSA = {"float32": None, "tensorfloat32": 10, "bfloat16": 7}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=42)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--emulate", action="store_true", help="CPU: reduced-precision matmuls emulated")
    args = ap.parse_args()
    kw = {"hidden_dim": args.hidden, "num_heads": args.heads, "dtype": args.dtype}
    loop, scan_model, (x,) = models.seed1(
        num_layers=args.layers, batch=args.batch, seq=args.seq, **kw
    )
    start = time.perf_counter()
    params = {"params": models.init_loop_params(loop, (x[:1],))}
    print(f"init: {time.perf_counter() - start:.1f} s; jax {jax.__version__} on {jax.devices()[0]}")
    scan = ckptconv.to_scan(params)
    if args.emulate:
        emulate(loop, scan_model, params, scan, x)
        return
    for precision in ("highest", "default"):
        start = time.perf_counter()
        report = ckptconv.verify(
            params, scan, block=models.NormAttentionBlock, block_kwargs=kw, inputs=(x,),
            precision=precision,
        )
        wall = time.perf_counter() - start
        if precision == "highest":
            print(report.table(max_rows=args.rows))
        t_loop, t_scan = report.timings["loop"], report.timings["scan"]
        worst = max(report.rows, key=lambda r: r.max_abs)
        print(
            f"precision {precision} (caller's {report.caller_precision}, matmul inputs "
            f"{report.rounding}, tolerance {report.tolerances}): worst |Δ| {worst.max_abs:.3g} "
            f"(layer {worst.layer}, {worst.name}), worst |Δ|/tol {report.rows[0].worst:.3g}, "
            f"{'PASS' if report.passed else 'FAIL'}; verify wall {wall:.1f} s"
        )
        print(
            f"  compile: loop {t_loop.compile_s:.2f} s, scan {t_scan.compile_s:.2f} s "
            f"({t_loop.compile_s / t_scan.compile_s:.1f}x); "
            f"step: loop {t_loop.step_s * 1e3:.1f} ms, scan {t_scan.step_s * 1e3:.1f} ms"
        )


# --------------------------------------------------------------------------
# Reduced-precision matmuls, emulated: a jaxpr interpreter that rounds every
# dot_general's operands (inside scan bodies, jit and custom_jvp calls too).


def _round(x: jax.Array, bits: int) -> jax.Array:
    if x.dtype != jnp.float32:
        return x
    drop = 23 - bits
    u = lax.bitcast_convert_type(x, jnp.uint32)
    u = u + jnp.uint32((1 << (drop - 1)) - 1) + ((u >> drop) & jnp.uint32(1))
    return lax.bitcast_convert_type(u & jnp.uint32(0xFFFFFFFF ^ ((1 << drop) - 1)), jnp.float32)


def _split_dot(lhs: jax.Array, rhs: jax.Array, params: dict) -> jax.Array:
    """The contraction summed in two halves (another float32 summation order)."""
    (lc, rc), _ = params["dimension_numbers"]
    n = lhs.shape[lc[0]]
    if n < 2:
        return lax.dot_general_p.bind(lhs, rhs, **params)
    h = n // 2
    parts = [
        lax.dot_general_p.bind(
            lax.slice_in_dim(lhs, a, b, axis=lc[0]), lax.slice_in_dim(rhs, a, b, axis=rc[0]), **params
        )
        for a, b in ((0, h), (h, n))
    ]
    return parts[0] + parts[1]


def _sub(p: object, bits: int | None, split: bool) -> object:
    if isinstance(p, jcore.ClosedJaxpr):
        avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in p.jaxpr.invars]
        return jax.make_jaxpr(lambda *a: _eval(p.jaxpr, p.consts, a, bits, split))(*avals)
    if isinstance(p, jcore.Jaxpr):
        return _sub(jcore.ClosedJaxpr(p, ()), bits, split).jaxpr
    if isinstance(p, tuple) and p and all(isinstance(q, (jcore.ClosedJaxpr, jcore.Jaxpr)) for q in p):
        return tuple(_sub(q, bits, split) for q in p)
    return p


def _eval(jaxpr: jcore.Jaxpr, consts: list, args: tuple, bits: int | None, split: bool) -> list:
    env: dict = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))

    def read(v: object) -> object:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if eqn.primitive.name == "dot_general":
            if bits is not None:
                ins = [_round(v, bits) for v in ins]
            params = {**eqn.params, "precision": None}
            out = _split_dot(*ins, params) if split else eqn.primitive.bind(*ins, **params)
        else:
            params = {k: _sub(p, bits, split) for k, p in eqn.params.items()}
            out = eqn.primitive.bind(*ins, **params)
        env.update(zip(eqn.outvars, out if eqn.primitive.multiple_results else [out]))
    return [read(v) for v in jaxpr.outvars]


def _intermediates(module: object, variables: dict, x: np.ndarray, bits: int | None, split: bool = False) -> dict:
    def f(v: dict, x: jax.Array) -> dict:
        return module.apply(v, x, capture_intermediates=True, mutable=True)[1]["intermediates"]

    flat, tree = jax.tree_util.tree_flatten((variables, x))
    closed, shape = jax.make_jaxpr(lambda *a: f(*jax.tree_util.tree_unflatten(tree, a)), return_shape=True)(*flat)
    out = jax.jit(lambda *a: _eval(closed.jaxpr, closed.consts, a, bits, split))(*flat)
    return jax.device_get(jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), out))


def _need(loop_inter: dict, scan_inter: dict) -> tuple[float, float]:
    """(max |Δ|, the atol = rtol the forms need): worst |Δ| / (1 + |loop|)."""
    rows, unmatched = compare_intermediates(loop_inter, scan_inter, into="blocks", atol=1.0, rtol=1.0)
    assert not unmatched, unmatched
    return max(r.max_abs for r in rows), max(r.worst for r in rows)


def _distance(a: dict, b: dict) -> float:
    """One form against itself at full precision: max |Δ| / (1 + |full|)."""
    return max(
        float(np.max(np.abs(np.float64(u) - v) / (1 + np.abs(np.float64(u)))))
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    )


def emulate(loop: object, scan_model: object, params: dict, scan: dict, x: np.ndarray) -> None:
    swapped = jax.tree_util.tree_map(lambda a: np.asarray(a)[[0, 2, 1, *range(3, len(a))]], scan)
    full = _intermediates(loop, params, x, None), _intermediates(scan_model, scan, x, None)
    for rounding, bits in MANTISSA.items():
        start = time.perf_counter()
        lo = _intermediates(loop, params, x, bits)
        same = _need(lo, _intermediates(scan_model, scan, x, bits))
        split_scan = _intermediates(scan_model, scan, x, bits, split=True)
        split = _need(lo, split_scan)
        d_loop, d_scan = _distance(full[0], lo), _distance(full[1], split_scan)
        rows, _ = compare_intermediates(
            lo, _intermediates(scan_model, swapped, x, bits), into="blocks", rounding=rounding
        )
        print(
            f"{rounding:>13}: same order max|Δ| {same[0]:.3g} needs {same[1]:.3g}; "
            f"scan split-K max|Δ| {split[0]:.3g} needs {split[1]:.3g}; from full precision: "
            f"loop {d_loop:.3g}, scan {d_scan:.3g}, sum {d_loop + d_scan:.3g}; "
            f"tolerance {ROUNDING_TOLERANCES[rounding][0]:g}: swapped layers 1, 2 worst "
            f"{max(r.worst for r in rows):.3g} ({time.perf_counter() - start:.0f} s)"
        )


if __name__ == "__main__":
    main()

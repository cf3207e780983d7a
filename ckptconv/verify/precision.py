"""Tolerances, and the matmul precision the compared runs use: `DEFAULT_TOLERANCES`,
`ROUNDING_TOLERANCES` and `matmul_rounding` (what a device rounds float32 matmul
inputs to), `PRECISIONS`, the precision scope of a run, and `record_lowered` (the
StableHLO of each compared run, kept for tests)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

#: Default (atol, rtol) by the dtype of the compared values.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-10),
    "float32": (1e-5, 1e-5),
    "bfloat16": (2e-2, 2e-2),
    "float16": (2e-3, 2e-3),
}


_EXACT = (0.0, 0.0)  # integers and booleans (tokens) must match exactly


#: ``precision=`` values: "highest" runs the compared forms with float32
#: matmuls at full precision; "default" at the caller's own default.
PRECISIONS = ("highest", "default")


#: Default (atol, rtol) of float32 values under ``precision="default"``, by what
#: the device rounds float32 matmul inputs to (see `matmul_rounding`); float16
#: and bfloat16 values take the larger of these and their own.
#:
#: Derived: one rounding of a matmul input costs a relative 2^-11 (TF32, 10-bit
#: mantissa) or 2^-8 (bfloat16, 7 bits); the tolerance is 64 of those, 3.1e-2
#: and 0.25, rounded. Measured on CPU (jax 0.10.2, bench/verify_seed1.py
#: ``--emulate``: every dot_general operand rounded to nearest even at that
#: mantissa width, the scan form also summing each contraction in two halves
#: as a GPU's split-K would): seed-1 at its seed size (42 layers, hidden 512,
#: batch 12, seq 32) needs atol = rtol of 7.2e-3 (TF32) and 7.2e-2 (bfloat16)
#: between the two forms; each form's own distance from the full-precision run
#: (the worst two forms can differ: their sum) is 2.3e-2 and 0.19, about 48
#: roundings. Without the rounding, the split sums alone need 1.2e-5 there:
#: float32's 1e-5 holds while both forms sum in the same order (CPU: equal).
#: At these tolerances the numbers still catch swapped layers 1 and 2 (worst
#: |Δ| / tolerance 196 under TF32, 24 under bfloat16, measured as above), not a
#: small change (one kernel element off by 1e-3 relative moves seed-1's
#: intermediates by 3e-4): the structural check, bit for bit, catches that.
ROUNDING_TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": DEFAULT_TOLERANCES["float32"],
    "tensorfloat32": (3e-2, 3e-2),
    "bfloat16": (2.5e-1, 2.5e-1),
}


# jax_default_matmul_precision values that keep float32 matmuls at float32.
_FULL = {"highest", "float32", "f32_f32_f32", "bf16_bf16_f32_x6", "bf16_bf16_f32_x9"}


# ... that round their inputs to TF32 or better (bf16_3x: about 16 bits).
_TF32 = {"high", "tensorfloat32", "tf32_tf32_f32", "tf32_tf32_f32_x3", "bf16_bf16_f32_x3"}


def matmul_rounding(platform: str, setting: str | None) -> str:
    """What float32 matmul inputs round to at ``jax_default_matmul_precision``
    ``setting`` (None: unset) on a device of ``platform``: ``"float32"``,
    ``"tensorfloat32"`` or ``"bfloat16"``.

    CPU computes float32 matmuls in full whatever the setting (measured, jax
    0.10.2: equal results under "bfloat16", "tensorfloat32" and the
    BF16_BF16_F32 algorithm). GPUs use TF32 at the default; TPUs one bfloat16
    pass. Unknown platforms are taken to round as a TPU does."""
    s = (setting or "default").lower()
    if s in _FULL or platform == "cpu":
        return "float32"
    if s == "bf16_bf16_f32":
        return "bfloat16"
    if s in _TF32 or platform in ("gpu", "cuda", "rocm"):
        return "tensorfloat32"
    return "bfloat16"


def _caller_precision() -> str | None:
    """The caller's jax_default_matmul_precision (its context manager's, if inside one)."""
    import jax  # only where the models run: the structural check needs no jax

    value = jax.config.jax_default_matmul_precision
    return None if value is None else str(value)


# Active `record_lowered` recorders, innermost last.
_RECORDERS: list[dict[str, str]] = []


@contextlib.contextmanager
def record_lowered() -> Iterator[dict[str, str]]:
    """Record the StableHLO text of every computation `verify` lowers inside.

    The dict it yields fills with ``"loop"`` and ``"scan"`` (the compared
    runs, capturing the intermediates) and ``"loop step"``, ``"scan step"``
    (the timed runs, with ``repeats`` > 0), each as verify lowered it: its
    ``dot_general`` operations carry the precision they ran at
    (``precision = [HIGHEST, HIGHEST]`` under ``precision="highest"``)::

        with record_lowered() as hlo:
            verify(loop, scan, block=Block, input_shape=(2, 8, 16))
        assert "precision = [DEFAULT" not in hlo["scan"]
    """
    got: dict[str, str] = {}
    _RECORDERS.append(got)
    try:
        yield got
    finally:
        _RECORDERS.remove(got)


def _keep(name: str, lowered: Any) -> None:
    if _RECORDERS:
        text = lowered.as_text()
        for got in _RECORDERS:
            got[name] = text


#: XLA options of the compared (capturing) runs, whatever the precision. By
#: default XLA may keep bfloat16/float16 values in float32 between the ops it
#: fuses ("excess precision"), and it fuses an unrolled loop and a scan body
#: differently, so the two forms of a correct conversion round differently: a
#: bfloat16 serving checkpoint (4 layers, hidden 32) differed by 0.031 at the
#: logits, outside bfloat16's 0.02, and by 0 with this off. Off, every op
#: rounds to its own dtype in both forms. float32 and wider are unaffected.
COMPARED_COMPILE = {"xla_allow_excess_precision": False}


def _precision_scope(precision: str) -> contextlib.AbstractContextManager[Any]:
    """Where the compared runs are traced, lowered, compiled and run."""
    import jax

    if precision == "highest":
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()


def _tolerance(
    dtype: np.dtype, atol: float | None, rtol: float | None, rounding: str = "float32"
) -> tuple[float, float]:
    if dtype.kind in "iub":
        return _EXACT
    da, dr = DEFAULT_TOLERANCES.get(dtype.name, DEFAULT_TOLERANCES["float32"])
    if dtype.itemsize <= 4:  # float64 matmuls are not rounded to a narrower input
        ra, rr = ROUNDING_TOLERANCES[rounding]
        da, dr = max(da, ra), max(dr, rr)
    return (da if atol is None else atol, dr if rtol is None else rtol)

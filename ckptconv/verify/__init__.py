"""Prove a conversion: structure bit for bit, then both model forms run and
every layer's intermediates are diffed.

1. Structure: SCAN must equal ``to_scan(LOOP)`` (same options) bit for bit;
   differences are reported per leaf and, inside stacked subtrees, per layer.
2. Numbers (with a block or a model): the loop and scan forms run on the
   default JAX device with ``capture_intermediates=True``; the loop form's
   intermediates are stacked with the same `to_scan` (layer axis 0, as
   ``nn.scan`` stacks them) and compared with the scan form's, layer by layer.

With ``period`` K (MaxText's scanned Gemma-3), layer ``K·b + j`` sits at index
``b`` of ``<into>/<name_j>`` and the leftovers under ``<into>_remainder``; every
per-layer figure (structure and numbers) still names the real layer number.

Checkpoint paths are read with the streaming readers, one leaf pair at a time
(SCAN's leaf and the LOOP leaves it stacks), so the structural check needs
memory for about one leaf, not the checkpoints. Without options, the options
come from SCAN's conversion record (`ckptconv.record`) when it has one.

Before a model runs, its params are checked against the checkpoint and the
two forms' intermediates are matched (``jax.eval_shape``: nothing is
computed); either mismatch is a `VerifyError` naming the paths.

Precision: GPUs (TF32) and TPUs (bfloat16 passes) compute float32 matmuls at
reduced precision by default, and where the two forms round differently they
differ by far more than float32's 1e-5 with a correct conversion. So the
compared runs are traced, lowered and run under
``jax.default_matmul_precision("highest")`` by default, whatever the caller's
``jax_default_matmul_precision``; ``precision="default"`` keeps the caller's
and loosens float32's default tolerance to what the device's matmuls round to
(`ROUNDING_TOLERANCES`). The timed runs always keep the caller's precision.
A module that passes its own ``precision=`` to a matmul keeps it either way.

One job a file:

* ``__init__.py``: `verify`, which runs the steps below and fills the report;
* ``sides.py``: the two checkpoints opened, SCAN's record read;
* ``structure.py``: the structural check (`check_structure`);
* ``run.py``: the block or model resolved and run, its params checked;
* ``intermediates.py``: the two forms' intermediates matched and compared;
* ``precision.py``: tolerances and matmul precision;
* ``hints.py``: advice when SCAN is not ``to_scan(LOOP)`` as asked;
* ``report.py``: `Report` and its rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ckptconv.errors import CkptconvError, GroupError, NothingToConvertError, VerifyError
from ckptconv.groups import find_groups
from ckptconv.verify.hints import _block_outside, _has_stacks, _stack_elsewhere
from ckptconv.verify.intermediates import (
    _inter_specs,
    _no_match_error,
    _plan,
    _rows,
    compare_intermediates,
)
from ckptconv.verify.precision import (
    DEFAULT_TOLERANCES,
    PRECISIONS,
    ROUNDING_TOLERANCES,
    _caller_precision,
    _tolerance,
    matmul_rounding,
    record_lowered,
)
from ckptconv.verify.report import Report
from ckptconv.verify.run import _Call, _check_params, _first_line, _run, _variables, resolve
from ckptconv.verify.sides import (
    _loop_record_options,
    _open,
    _record_options,
    _record_selection,
    _selection,
)
from ckptconv.verify.structure import _flat, _scan_opts, check_structure

__all__ = [
    "DEFAULT_TOLERANCES",
    "PRECISIONS",
    "ROUNDING_TOLERANCES",
    "Report",
    "check_structure",
    "compare_intermediates",
    "matmul_rounding",
    "record_lowered",
    "resolve",
    "verify",
]


def verify(
    loop: Any,
    scan: Any,
    *,
    pattern: str | None = None,
    into: str | None = None,
    axis: int | None = None,
    period: int | None = None,
    remainder: str | None = "separate",
    layers: Any = None,
    groups: Any = None,
    block: str | Any | None = None,
    block_kwargs: dict[str, Any] | None = None,
    model: str | Callable[..., Any] | None = None,
    inputs: Any = None,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    repeats: int = 5,
    step: int | None = None,
    plot: str | Path | None = None,
    precision: str = "highest",
    only: str | Sequence[str] | None = None,
    root: str | None = None,
    dtype: Any = None,
) -> Report:
    """Check that ``scan`` is the conversion of ``loop``, and that both compute alike.

    Args:
      loop, scan: checkpoint paths or in-memory trees. Paths are read leaf by
        leaf (one SCAN leaf and one LOOP layer in memory at a time).
      pattern, into, axis, layers, groups: the options the conversion used (as
        `to_scan`; ``groups`` for several stacks). With none of pattern, into,
        axis, period, layers and groups given, they come from SCAN's
        conversion record when it has one (ckptconv writes one into Orbax
        outputs), else to_scan's defaults (``into`` ``blocks``, or a digit
        list's own key; axis 0).
      period, remainder: with ``period`` K, SCAN holds blocks of K layers
        (``to_scan(..., period=K)``, MaxText's scanned Gemma-3: layer ``K·b + j``
        at index ``b`` of ``<into>/<name_j>``, leftovers under
        ``<into>_remainder``); the loop model's intermediates are stacked the
        same way. Needs ``model`` for the numbers (``block`` builds one layer
        per scan step). Rows and leaf checks name real layer numbers.
      block: ``"module:Class"`` or a Flax module class for ONE layer, called as
        ``block(x)``; the N-layer loop and scan models are built around it
        (N from the checkpoint).
      block_kwargs: keyword arguments for ``block`` (or for ``model``).
      model: ``"module:function"`` or a function returning
        ``(loop_module, scan_module, inputs)``: two Linen modules (NNX modules
        bridged with ``nnx.bridge.ToLinen`` included) whose params are the
        checkpoints' (``params`` at the top of LOOP and SCAN, else the whole
        tree), and their inputs: a tuple (positional), a dict (keywords) or one
        array. Arrays are traced; other values (``deterministic=True``) are
        passed as they are.
      inputs: inputs in place of the model's (``block``: default random
        normal of ``input_shape`` drawn with ``seed``).
      atol, rtol: tolerances (default by dtype: `DEFAULT_TOLERANCES`; integer
        outputs such as tokens must match exactly). Given, they hold at
        either ``precision``.
      precision: the float32 matmul precision of the compared runs.
        ``"highest"`` (default): full float32, whatever the caller's
        ``jax_default_matmul_precision`` (global or a context manager around
        the call), which is left as it was; the comparison is about the
        conversion, not about TF32 or bfloat16 rounding. ``"default"``: the
        caller's own, with float32's default tolerance widened to what the
        device's matmuls round to (`matmul_rounding`, `ROUNDING_TOLERANCES`:
        TF32 3e-2, bfloat16 passes 0.25; CPU keeps 1e-5). The timed runs use
        the caller's precision either way.
      repeats: step-time runs per form (0: no timing, one compile per form fewer).
      step: the step of CheckpointManager roots, on both sides (default: the
        latest of each, which must then be the same step).
      plot: write a heatmap of layers × intermediates here (``.png`` or
        ``.svg``; needs matplotlib: ``pip install 'ckptconv[plot]'``).
      only, root, dtype: SCAN was written with these (``to-scan --only params
        --dtype bfloat16``, a serving checkpoint from a train state): LOOP is
        taken the same way, and both forms run on params cast to ``dtype``, so
        the check is of the layout and the cast, not of bfloat16's rounding.
        Each one not given: what SCAN's conversion record says.

    Returns:
      A `Report`; ``report.passed`` is the verdict.

    Raises:
      VerifyError: bad targets or inputs; a model whose params do not fit its
        checkpoint; forms whose intermediates do not correspond.
      CkptconvError: unreadable checkpoints.
    """
    if precision not in PRECISIONS:
        raise VerifyError(
            f"precision={precision!r}: expected one of {', '.join(map(repr, PRECISIONS))}."
        )
    if block is not None and model is not None:
        raise VerifyError("give --block or --model, not both.")
    if period is not None and block is not None:
        raise VerifyError(
            "--block builds a scan model of one layer per step, not blocks of --period "
            "layers: give --model (a function returning (loop_module, scan_module, inputs)) "
            "whose scan module holds the K sub-layers."
        )
    if plot is not None:
        from ckptconv import plot as plotlib

        if block is None and model is None:
            raise VerifyError("--plot draws the layers' intermediates: give --block or --model.")
        plotlib.require(plot)
    L, S = _open(loop, step), _open(scan, step)
    if L.step is not None and S.step is not None and L.step != S.step:
        raise VerifyError(
            f"{L.name} is at step {L.step} and {S.name} at step {S.step} (the "
            "latest of each): a conversion is of one step. Pass --step N to compare step N "
            "of both."
        )
    given = any(v is not None for v in (pattern, into, axis, period, layers, groups))
    options_from = "given" if given else "default"
    if not given:
        rec = _record_options(S)
        if rec is not None:
            options_from = "record"
        else:
            rec = _loop_record_options(L)
            options_from = "loop record" if rec is not None else options_from
        if rec is not None:
            pattern, into, groups = rec.get("pattern"), rec.get("into"), rec.get("groups")
            axis, period, layers = rec.get("axis"), rec.get("period"), rec.get("layers")
            remainder = rec.get("remainder") or remainder
    axis = 0 if axis is None else axis
    remainder = remainder or "separate"
    # Each of --only / --root / --dtype not given is the record's: restating
    # one does not drop the others.
    recorded = _record_selection(S)
    selected = {"only": only, "root": root, "dtype": dtype}
    selection_from_record = [k for k, v in selected.items() if v is None and k in recorded]
    selected = {k: recorded[k] if k in selection_from_record else v for k, v in selected.items()}
    sel_only, sel_root, sel_dtype = _selection(selected)
    opts = _scan_opts(pattern, into, period, remainder, layers, groups)
    if options_from == "default":
        key = _stack_elsewhere(L, S, opts, axis)
        if key is not None:  # SCAN's layout says which key: use it, and say so
            options_from = "layout"
            (g,) = find_groups(L.tree, **opts)
            pattern, into = g.template, key
            opts = _scan_opts(pattern, into, period, remainder, layers, groups)
    try:
        leaves = check_structure(
            L.tree, S.tree, axis=axis, loop_read=L.read, scan_read=S.read, only=sel_only,
            root=sel_root, dtype=sel_dtype, items=L.items, **opts)
    except GroupError as e:
        swapped = ""
        if (isinstance(e, NothingToConvertError) or period) and _has_stacks(L.tree, into, axis, period, pattern):
            swapped = " LOOP holds a stacked subtree: are LOOP and SCAN swapped? Give the loop form first."
        how = {"record": " (options from SCAN's conversion record)",
               "loop record": " (options from LOOP's conversion record)"}.get(options_from, "")
        raise type(e)(f"{L.name} (LOOP): {e}{how}{swapped}") from e
    shown = {k: v for k, v in {**opts, "axis": axis}.items() if v is not None}
    if shown.get("remainder") == "separate" and not period:
        shown.pop("remainder")
    shown.update({k: v for k, v in selected.items() if v})
    if sel_dtype is not None:
        shown["dtype"] = sel_dtype.name
    report = Report(
        L.name, S.name, leaves, period=period, options=shown, options_from=options_from,
        precision=precision, selection_from_record=selection_from_record,
    )
    if block is None and model is None:
        return report
    report.caller_precision = _caller_precision()  # before verify sets its own

    loop_lazy, scan_lazy = _variables(L.tree, L.items), _variables(S.tree, S.items)
    param_groups = find_groups(loop_lazy.get("params", {}), **opts)
    if not param_groups:
        raise VerifyError(f"{L.name} (LOOP): its params hold no layer group to compare.")
    if model is not None:
        fn = resolve(model) if isinstance(model, str) else model
        try:
            loop_module, scan_module, model_inputs = fn(**(block_kwargs or {}))
        except TypeError as e:
            raise VerifyError(f"--model {model}: {e}. Check --block-kwargs.") from e
        call = _Call.of(model_inputs if inputs is None else inputs)
    else:
        from ckptconv import models

        g = param_groups[0]
        cls = resolve(block) if isinstance(block, str) else block
        outside = _block_outside(L, S, loop_lazy, scan_lazy, g, axis, block, block_kwargs, input_shape, inputs,
                                 sel_dtype)
        if outside is not None:
            raise outside
        kw = block_kwargs or {}
        loop_module = models.LoopModel(block=cls, num_layers=g.num_layers, block_kwargs=kw, pattern=g.template)
        scan_module = models.ScanModel(block=cls, num_layers=g.num_layers, block_kwargs=kw, into=g.into, axis=axis)
        if inputs is None:
            if input_shape is None:
                raise VerifyError("--block needs --input-shape B,T,D or --input FILE.npy.")
            rng = np.random.default_rng(seed)
            inputs = (rng.standard_normal(tuple(input_shape)).astype(np.float32),)
        call = _Call.of(inputs)
    loop_vars, scan_vars = L.materialize(loop_lazy), S.materialize(scan_lazy)
    if sel_dtype is not None:
        # LOOP's params cast as the conversion cast them: both forms run on
        # the serving checkpoint's numbers.
        from ckptconv import subset

        loop_vars, _ = subset.cast(loop_vars, sel_dtype)
    why = _check_params("loop", loop_module, loop_vars, call, f"{L.name} (LOOP)")
    if why:
        raise VerifyError(why)
    why = _check_params("scan", scan_module, scan_vars, call, f"{S.name} (SCAN)")
    if why and not report.structure_passed:
        # SCAN is not laid out as to_scan(LOOP) would lay it out (already a
        # FAIL), and the scan model cannot run on it: report the wrong
        # conversion (exit 1) rather than a bad command line (exit 2).
        report.not_run = (
            "the scan model cannot run on SCAN, whose structure differs from to_scan(LOOP) "
            "(above): " + why.splitlines()[0]
        )
        return report
    if why:
        raise VerifyError(why)
    specs = _inter_specs(param_groups)
    form = "scan"  # first: on a wrongly structured SCAN it may not run at all
    try:
        import jax

        def shapes(module: Any, v: Any) -> Any:
            def f(v: Any, dyn: Any) -> Any:
                return call(
                    lambda *a, **k: module.apply(v, *a, capture_intermediates=True, mutable=True, **k),
                    dyn,
                )[1].get("intermediates", {})

            return jax.eval_shape(f, v, call.dynamic())

        scan_shapes = shapes(scan_module, scan_vars)
        form = "loop"
        loop_shapes = shapes(loop_module, loop_vars)
        plan = _plan(loop_shapes, scan_shapes, specs)
        if any(plan.mismatch()):
            raise _no_match_error(plan)
        form = "scan"
        (_, scan_state), t_scan = _run(scan_module, scan_vars, call, repeats, "scan", precision)
        form = "loop"
        (_, loop_state), t_loop = _run(loop_module, loop_vars, call, repeats, "loop", precision)
    except CkptconvError:
        raise
    except Exception as e:  # a model that does not fit its checkpoint or inputs
        why = _first_line(e)
        if form == "scan" and not report.structure_passed:
            report.not_run = (
                f"the scan model cannot run on SCAN ({why}), whose structure differs from "
                "to_scan(LOOP) (above)"
            )
            return report
        raise VerifyError(
            f"running the models failed (the {form} model: {why}). "
            "Check that --block/--model and --block-kwargs match the checkpoints "
            "(hidden size, heads, layer count) and the input shape; --debug shows the traceback."
        ) from e
    loop_inter = loop_state.get("intermediates", {})
    plan = _plan(loop_inter, scan_state.get("intermediates", {}), specs)
    loop_only, scan_only, _ = plan.mismatch()
    dev = jax.devices()[0]
    setting = "highest" if precision == "highest" else report.caller_precision
    report.rounding = matmul_rounding(dev.platform, setting)
    report.numeric = True
    report.rows = _rows(plan, _flat(loop_inter), atol, rtol, report.rounding)
    report.unmatched = [f"loop: {p}" for p in loop_only] + [f"scan: {p}" for p in scan_only]
    report.skipped = plan.skipped
    report.extra = plan.extra
    report.unmatched_hint = plan.hint() if report.unmatched else None
    report.names = plan.names
    report.device = f"{dev.platform}:{dev.id} ({getattr(dev, 'device_kind', '')})"
    report.atol, report.rtol = atol, rtol
    report.tolerances = {
        r.dtype: _tolerance(jax.numpy.dtype(r.dtype), atol, rtol, report.rounding)
        for r in report.rows
    }
    report.timings = {k: t for k, t in (("loop", t_loop), ("scan", t_scan)) if t is not None}
    if plot is not None:
        plotlib.render(report, plot)
        report.plot = str(plot)
    return report

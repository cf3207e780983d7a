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
"""

from __future__ import annotations

import ast
import importlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ckptconv import tree as treelib
from ckptconv.errors import CkptconvError, GroupError, NothingToConvertError, VerifyError
from ckptconv.groups import Group, find_groups
from ckptconv.stack import to_scan
from ckptconv.unstack import find_stacks

#: Default (atol, rtol) by the dtype of the compared values.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-10),
    "float32": (1e-5, 1e-5),
    "bfloat16": (2e-2, 2e-2),
    "float16": (2e-3, 2e-3),
}
_EXACT = (0.0, 0.0)  # integers and booleans (tokens) must match exactly


@dataclass
class LeafCheck:
    """Structural check of one leaf of SCAN against ``to_scan(LOOP)``."""

    path: str
    status: str  # "equal", "differs", "shape", "dtype", "missing", "unexpected"
    expected: str = ""
    found: str = ""
    layers: list[int] = field(default_factory=list)  # layers that differ
    max_abs: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "equal"


@dataclass
class Row:
    """One intermediate of one layer (``layer`` None: outside the layers)."""

    layer: int | None
    name: str
    dtype: str
    max_abs: float
    mean_abs: float
    max_rel: float
    worst: float  # max |Δ| / (atol + rtol·|loop|): > 1 fails
    passed: bool


@dataclass
class Timing:
    compile_s: float
    step_s: float


@dataclass
class Report:
    """What `verify` found. ``passed`` is the verdict; ``rows`` the numeric diffs,
    worst first; ``leaves`` the structural check."""

    loop: str
    scan: str
    leaves: list[LeafCheck]
    rows: list[Row] = field(default_factory=list)
    numeric: bool = False
    device: str | None = None
    atol: float | None = None
    rtol: float | None = None
    timings: dict[str, Timing] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    tolerances: dict[str, tuple[float, float]] = field(default_factory=dict)
    period: int | None = None
    #: why the numbers were not compared although a model was given (the scan
    #: model could not run on a SCAN whose structure is already wrong)
    not_run: str | None = None

    @property
    def structure_passed(self) -> bool:
        return all(c.ok for c in self.leaves)

    @property
    def numeric_passed(self) -> bool:
        """Every row within tolerance, and nothing left uncompared."""
        return all(r.passed for r in self.rows) and not self.unmatched

    @property
    def passed(self) -> bool:
        return self.structure_passed and self.numeric_passed

    @property
    def first_bad_layer(self) -> int | None:
        bad = [r.layer for r in self.rows if not r.passed and r.layer is not None]
        return min(bad) if bad else None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            passed=self.passed,
            structure_passed=self.structure_passed,
            numeric_passed=self.numeric_passed if self.numeric else None,
            first_bad_layer=self.first_bad_layer,
        )
        return _finite(out)

    def table(self, max_rows: int | None = None) -> str:
        """A readable report for a terminal: the worst rows first (5 when all
        pass, 20 otherwise, unless ``max_rows`` says)."""
        if max_rows is None:
            max_rows = 5 if self.passed else 20
        lines = [f"verify {self.loop} (loop) against {self.scan} (scan)"]
        bad = [c for c in self.leaves if not c.ok]
        how = f"to_scan(LOOP, period={self.period})" if self.period else "to_scan(LOOP)"
        if not bad:
            lines.append(f"structure: OK, {len(self.leaves)} leaves equal to {how} bit for bit")
        else:
            lines.append(f"structure: {len(bad)} of {len(self.leaves)} leaves differ from {how}:")
            for c in bad[:max_rows]:
                lines.append("  " + _describe_leaf(c))
            if len(bad) > max_rows:
                lines.append(f"  … and {len(bad) - max_rows} more")
            shape_bad = [c for c in bad if c.status == "shape"]
            if self.period and any(_one_dim_differs(c) for c in shape_bad):
                lines.append(
                    "  Stacks of another depth: was SCAN converted with another --period? "
                    f"(--period {self.period} stacks N // {self.period} layers deep)"
                )
            elif shape_bad:
                lines.append(
                    "  Shapes differ: was SCAN stacked on another layer axis? Pass the --axis "
                    "it was converted with (MaxText: 1)."
                )
            if not self.period and any(
                c.status == "unexpected" and "_remainder/" in c.path for c in bad
            ):
                lines.append(
                    "  SCAN holds <into>_remainder, as a conversion with --period K does "
                    "(MaxText Gemma-3: 6): pass the --period it was converted with."
                )
        if self.not_run:
            lines.append(f"intermediates: not compared: {self.not_run}")
        if self.numeric:
            lines.append(f"device: {self.device}")
            for form, t in self.timings.items():
                lines.append(
                    f"{form:>5}: compile {t.compile_s:.3f} s, step {t.step_s * 1e3:.3f} ms"
                )
            nbad = sum(not r.passed for r in self.rows)
            layers = sorted({r.layer for r in self.rows if r.layer is not None})
            lines.append(
                f"intermediates: {len(self.rows)} compared"
                + (f" over {len(layers)} layers" if layers else "")
                + f", {nbad} outside atol + rtol·|loop| ("
                + ", ".join(f"{d}: {a:g}, {r:g}" for d, (a, r) in self.tolerances.items())
                + ")"
                + (f"; first wrong layer: {self.first_bad_layer}" if self.first_bad_layer is not None else "")
            )
            head = f"  {'layer':>5}  {'intermediate':<44} {'max|Δ|':>10} {'mean|Δ|':>10} {'max rel':>10}  "
            lines.append(head)
            for r in self.rows[:max_rows]:
                layer = "-" if r.layer is None else str(r.layer)
                lines.append(
                    f"  {layer:>5}  {r.name[-44:]:<44} {r.max_abs:10.3g} {r.mean_abs:10.3g} "
                    f"{r.max_rel:10.3g}  {'ok' if r.passed else 'FAIL'}"
                )
            if len(self.rows) > max_rows:
                lines.append(f"  … {len(self.rows) - max_rows} more rows (--json for all)")
            if self.unmatched:
                lines.append(
                    f"{len(self.unmatched)} intermediates exist in one form only, so they were "
                    "not compared (FAIL):"
                )
                for name in self.unmatched[:5]:
                    lines.append(f"  only in {name}")
                if len(self.unmatched) > 5:
                    lines.append(f"  … and {len(self.unmatched) - 5} more")
                lines.append(
                    "  Does the scan module stack the intermediates collection? "
                    "nn.scan(..., variable_axes={'params': 0, 'intermediates': 0})"
                )
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def _describe_leaf(c: LeafCheck) -> str:
    if c.status == "differs":
        where = ""
        if c.layers:
            where = f" in layer{'s' if len(c.layers) > 1 else ''} {_ranges(c.layers)}"
        return f"{c.path}: values differ{where} (max |Δ| {c.max_abs:.3g})"
    if c.status in ("shape", "dtype"):
        return f"{c.path}: expected {c.status} {c.expected}, found {c.found}"
    if c.status == "missing":
        return f"{c.path}: missing from SCAN (expected {c.expected})"
    return f"{c.path}: in SCAN but not in to_scan(LOOP) ({c.found})"


def _one_dim_differs(c: LeafCheck) -> bool:
    """Shapes that differ in one dimension only (a stack's depth), not by a moved axis."""
    try:
        a, b = ast.literal_eval(c.expected), ast.literal_eval(c.found)
    except (ValueError, SyntaxError):
        return False
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1


def _ranges(xs: Sequence[int]) -> str:
    return ", ".join(map(str, xs[:12])) + (f" … ({len(xs)} layers)" if len(xs) > 12 else "")


def _finite(x: Any) -> Any:
    """JSON has no inf/nan: write them as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


# --------------------------------------------------------------------------
# Structure


def _flat(t: Any) -> dict[tuple, Any]:
    return {p: x for p, x in treelib.leaves_with_paths(t)}


def _describe(x: Any) -> str:
    shape, dtype = treelib.leaf_shape(x), treelib.leaf_dtype(x)
    if shape is None:
        return repr(x)
    return f"{dtype}{list(shape)}"


def _layer_map(groups: Sequence[Group]) -> list[tuple[tuple, list[int], bool]]:
    """Where each layer went: ``(path, layer numbers, stacked)`` per subtree of
    the converted tree. A stacked subtree's ``layer numbers[b]`` is the layer at
    index ``b`` of its layer axis (with a period K, ``<into>/<name_j>`` holds
    layers ``j, K + j, 2K + j …``); an unstacked leftover (``<into>_remainder/
    <name_j>``) holds the one layer listed."""
    out: list[tuple[tuple, list[int], bool]] = []
    for g in groups:
        if not g.period:
            out.append((g.target, [g.start + i for i in range(g.num_layers)], True))
            continue
        stacks, rest = g.blocks()
        for j, positions in enumerate(stacks):
            out.append((g.target + (g.sub_name(j),), [g.start + p for p in positions], True))
        for j, p in enumerate(rest):
            assert g.remainder_target is not None
            out.append((g.remainder_target + (g.sub_name(j),), [g.start + p], False))
    return out


def _where(path: tuple, where: list[tuple[tuple, list[int], bool]]) -> tuple[tuple, list[int], bool] | None:
    return next((w for w in where if path[: len(w[0])] == w[0]), None)


def check_structure(
    loop: Any, scan: Any, *, pattern: str | None = None, into: str = "blocks", axis: int = 0,
    period: int | None = None, remainder: str = "separate",
) -> list[LeafCheck]:
    """Compare SCAN with ``to_scan(LOOP)`` (same options) leaf by leaf, layer by
    layer; ``LeafCheck.layers`` are real layer numbers (``K·b + j`` with a period)."""
    opts = {"pattern": pattern, "into": into, "period": period, "remainder": remainder}
    expected = to_scan(loop, axis=axis, **opts)
    where = _layer_map(find_groups(loop, **opts))
    want, got = _flat(expected), _flat(scan)
    checks = []
    for p, e in want.items():
        name = treelib.format_path(p)
        if p not in got:
            checks.append(LeafCheck(name, "missing", expected=_describe(e)))
            continue
        f = got[p]
        se, sf = treelib.leaf_shape(e), treelib.leaf_shape(f)
        if se != sf:
            checks.append(LeafCheck(name, "shape", str(se), str(sf)))
            continue
        de, df = treelib.leaf_dtype(e), treelib.leaf_dtype(f)
        if de != df:
            checks.append(LeafCheck(name, "dtype", str(de), str(df)))
            continue
        if se is None:
            same = e == f
            checks.append(LeafCheck(name, "equal" if same else "differs", repr(e), repr(f)))
            continue
        a = np.asarray(treelib._unbox(e))
        b = np.asarray(treelib._unbox(f))
        if a.tobytes() == b.tobytes():
            checks.append(LeafCheck(name, "equal"))
            continue
        w = _where(p, where)
        layers: list[int] = []
        if w is not None and not w[2]:
            layers = list(w[1])  # an unstacked leftover layer
        elif w is not None:
            for i in range(a.shape[axis]):
                if np.take(a, i, axis).tobytes() != np.take(b, i, axis).tobytes():
                    layers.append(w[1][i] if i < len(w[1]) else i)
        checks.append(LeafCheck(name, "differs", layers=layers, max_abs=_max_abs(a, b)))
    for p, f in got.items():
        if p not in want:
            checks.append(LeafCheck(treelib.format_path(p), "unexpected", found=_describe(f)))
    return checks


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.dtype.kind in "fciu" or a.dtype.name == "bfloat16":
        with np.errstate(invalid="ignore"):
            d = np.abs(a.astype(np.float64) - b.astype(np.float64))
        return float(np.nanmax(d)) if d.size else 0.0
    return float("nan")


# --------------------------------------------------------------------------
# Numbers


def resolve(target: str) -> Any:
    """``"package.module:attr"`` -> the object."""
    mod, sep, attr = target.partition(":")
    if not sep or not mod or not attr:
        raise VerifyError(
            f"{target!r}: expected MODULE:ATTR, for example ckptconv.models:NormAttentionBlock."
        )
    try:
        obj: Any = importlib.import_module(mod)
    except ImportError as e:
        raise VerifyError(f"{target!r}: cannot import {mod!r} ({e}). Is it on PYTHONPATH?") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise VerifyError(f"{target!r}: module {mod!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    return obj


def _variables(t: Any) -> dict[str, Any]:
    """The model variables in a checkpoint tree: its collections if it has
    ``params`` at the top (optimizer state and the rest left out); for a
    CheckpointManager step (``{item: tree}``), those of the one item that has
    ``params``; else the whole tree as params."""
    if isinstance(t, dict) and "params" in t:
        return {k: t[k] for k in ("params", "batch_stats", "cache") if k in t}
    if isinstance(t, dict):
        items = [v for v in t.values() if isinstance(v, dict) and "params" in v]
        if len(items) == 1:
            return _variables(items[0])
    return {"params": t}


def _run(module: Any, variables: Any, inputs: tuple, repeats: int) -> tuple[Any, Timing]:
    """Time the plain forward (compile, then steps), then run once capturing
    every intermediate. Timing the plain forward keeps the figures about the
    model, not about copying out its intermediates."""
    import jax

    def plain(v: Any, *a: Any) -> Any:
        return module.apply(v, *a, mutable=True)

    def captured(v: Any, *a: Any) -> Any:
        return module.apply(v, *a, capture_intermediates=True, mutable=True)

    start = time.perf_counter()
    compiled = jax.jit(plain).lower(variables, *inputs).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(variables, *inputs))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(compiled(variables, *inputs))
    step_s = (time.perf_counter() - start) / max(repeats, 1)
    out = jax.device_get(jax.jit(captured)(variables, *inputs))
    return out, Timing(compile_s, step_s)


def _tolerance(dtype: np.dtype, atol: float | None, rtol: float | None) -> tuple[float, float]:
    if dtype.kind in "iub":
        return _EXACT
    da, dr = DEFAULT_TOLERANCES.get(dtype.name, DEFAULT_TOLERANCES["float32"])
    return (da if atol is None else atol, dr if rtol is None else rtol)


def _compare(name: str, layer: int | None, a: np.ndarray, b: np.ndarray, atol: float | None, rtol: float | None) -> Row:
    dtype = np.dtype(a.dtype)
    at, rt = _tolerance(dtype, atol, rtol)
    x, y = a.astype(np.float64), b.astype(np.float64)
    if x.shape != y.shape:
        return Row(layer, name, dtype.name, math.inf, math.inf, math.inf, math.inf, False)
    with np.errstate(invalid="ignore"):
        d = np.abs(x - y)
    # Equal values (equal infinities included) and NaN in both forms agree;
    # any other NaN difference is infinitely wrong.
    d = np.where((x == y) | (np.isnan(x) & np.isnan(y)), 0.0, d)
    d = np.where(np.isnan(d), math.inf, d)
    if d.size == 0:
        return Row(layer, name, dtype.name, 0.0, 0.0, 0.0, 0.0, True)
    # Where the loop value is not finite, only an exact match passes.
    bound = np.where(np.isfinite(x), at + rt * np.abs(np.where(np.isfinite(x), x, 0.0)), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(d == 0, 0.0, d / np.abs(x))
        ratio = np.where(d == 0, 0.0, d / bound)
    worst = float(ratio.max())
    return Row(
        layer, name, dtype.name, float(d.max()), float(d.mean()), float(rel.max()), worst,
        bool((d <= bound).all()),
    )


def compare_intermediates(
    loop_inter: Any, scan_inter: Any, *, pattern: str | None, into: str,
    atol: float | None = None, rtol: float | None = None,
    period: int | None = None, remainder: str = "separate",
) -> tuple[list[Row], list[str]]:
    """Rows for every intermediate of every layer (worst first), and the names
    found in only one form. The loop form's intermediates are stacked as
    ``to_scan(..., axis=0, period=period)`` would; each row names the real
    layer number and the intermediate's path inside the layer."""
    opts = {"pattern": pattern, "into": into, "period": period, "remainder": remainder}
    expected = to_scan(loop_inter, axis=0, **opts)
    where = _layer_map(find_groups(loop_inter, **opts))
    want, got = _flat(expected), _flat(scan_inter)
    rows: list[Row] = []
    for p, e in want.items():
        if p not in got:
            continue
        a, b = np.asarray(e), np.asarray(got[p])
        w = _where(p, where)
        if w is None:
            rows.append(_compare(_inter_name(p), None, a, b, atol, rtol))
            continue
        prefix, layers, stacked = w
        name = _inter_name(p[len(prefix):])
        if not stacked:
            rows.append(_compare(name, layers[0], a, b, atol, rtol))
            continue
        if a.shape != b.shape or a.shape[0] != len(layers):
            rows.append(_compare(name, None, a, b, atol, rtol))
            continue
        for i, layer in enumerate(layers):
            rows.append(_compare(name, layer, a[i], b[i], atol, rtol))
    unmatched = [f"loop: {treelib.format_path(p)}" for p in want if p not in got]
    unmatched += [f"scan: {treelib.format_path(p)}" for p in got if p not in want]
    rows.sort(key=lambda r: (r.passed, -r.worst, r.layer if r.layer is not None else -1))
    return rows, unmatched


def _inter_name(path: Sequence[Any]) -> str:
    """``('self_attention', '__call__', 0)`` -> ``self_attention/__call__[0]``."""
    out = ""
    for k in path:
        out += f"[{k}]" if isinstance(k, int) else (f"/{k}" if out else str(k))
    return out


def _load(path: str | Path | Any, step: int | None = None) -> tuple[str, Any, int | None]:
    """(name, tree, step): a CheckpointManager root at ``step`` (default: its
    latest); ``step`` does not apply to other inputs."""
    if isinstance(path, (str, Path)):
        from ckptconv import formats
        from ckptconv.io import load

        fmt = formats.detect(Path(path))
        layout = fmt.describe(Path(path))
        if layout.kind == "root" and step is not None:
            layout = fmt.describe(Path(path), step)
        at = layout.step if layout.kind == "root" else None
        return str(path), load(path, step=at), at
    return "<tree>", path, None


def _has_stacks(t: Any, into: str, axis: int, period: int | None, pattern: str | None) -> bool:
    try:
        return bool(find_stacks(t, into, axis=axis, period=period, pattern=pattern or "layer_{i}"))
    except GroupError:
        return False


def verify(
    loop: Any,
    scan: Any,
    *,
    pattern: str | None = None,
    into: str = "blocks",
    axis: int = 0,
    period: int | None = None,
    remainder: str = "separate",
    block: str | Any | None = None,
    block_kwargs: dict[str, Any] | None = None,
    model: str | Callable[..., Any] | None = None,
    inputs: Sequence[Any] | None = None,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    repeats: int = 5,
    step: int | None = None,
) -> Report:
    """Check that ``scan`` is the conversion of ``loop``, and that both compute alike.

    Args:
      loop, scan: checkpoint paths or in-memory trees.
      pattern, into, axis: the options the conversion used (as `to_scan`).
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
        ``(loop_module, scan_module, inputs)``.
      inputs: positional inputs for ``block`` models (default: random normal
        of ``input_shape`` drawn with ``seed``).
      atol, rtol: tolerances (default by dtype: `DEFAULT_TOLERANCES`; integer
        outputs such as tokens must match exactly).
      repeats: step-time runs per form.
      step: the step of CheckpointManager roots, on both sides (default: the
        latest of each, which must then be the same step).

    Returns:
      A `Report`; ``report.passed`` is the verdict.

    Raises:
      VerifyError: bad targets or inputs; CkptconvError: unreadable checkpoints.
    """
    if block is not None and model is not None:
        raise VerifyError("give --block or --model, not both.")
    if period is not None and block is not None:
        raise VerifyError(
            "--block builds a scan model of one layer per step, not blocks of --period "
            "layers: give --model (a function returning (loop_module, scan_module, inputs)) "
            "whose scan module holds the K sub-layers."
        )
    loop_name, loop_tree, loop_step = _load(loop, step)
    scan_name, scan_tree, scan_step = _load(scan, step)
    if loop_step is not None and scan_step is not None and loop_step != scan_step:
        raise VerifyError(
            f"{loop_name} is at step {loop_step} and {scan_name} at step {scan_step} (the "
            "latest of each): a conversion is of one step. Pass --step N to compare step N "
            "of both."
        )
    try:
        leaves = check_structure(
            loop_tree, scan_tree, pattern=pattern, into=into, axis=axis, period=period,
            remainder=remainder,
        )
    except GroupError as e:
        swapped = ""
        if (isinstance(e, NothingToConvertError) or period) and _has_stacks(loop_tree, into, axis, period, pattern):
            swapped = " LOOP holds a stacked subtree: are LOOP and SCAN swapped? Give the loop form first."
        raise type(e)(f"{loop_name} (LOOP): {e}{swapped}") from e
    report = Report(loop_name, scan_name, leaves, period=period)
    if block is None and model is None:
        return report
    groups = find_groups(loop_tree, pattern, into=into, period=period, remainder=remainder)
    template = groups[0].template
    if model is not None:
        fn = resolve(model) if isinstance(model, str) else model
        try:
            loop_module, scan_module, model_inputs = fn(**(block_kwargs or {}))
        except TypeError as e:
            raise VerifyError(f"--model {model}: {e}. Check --block-kwargs.") from e
        model_inputs = tuple(model_inputs) if isinstance(model_inputs, (tuple, list)) else (model_inputs,)
        if inputs is not None:
            model_inputs = tuple(inputs)
    else:
        from ckptconv import models

        cls = resolve(block) if isinstance(block, str) else block
        n = groups[0].num_layers
        loop_module = models.LoopModel(block=cls, num_layers=n, block_kwargs=block_kwargs or {}, pattern=template)
        scan_module = models.ScanModel(block=cls, num_layers=n, block_kwargs=block_kwargs or {}, into=into, axis=axis)
        if inputs is None:
            if input_shape is None:
                raise VerifyError("--block needs --input-shape B,T,D or --input FILE.npy.")
            rng = np.random.default_rng(seed)
            inputs = (rng.standard_normal(tuple(input_shape)).astype(np.float32),)
        model_inputs = tuple(inputs)
    form = "scan"  # first: on a wrongly structured SCAN it may not run at all
    try:
        (_, scan_state), t_scan = _run(scan_module, _variables(scan_tree), model_inputs, repeats)
        form = "loop"
        (_, loop_state), t_loop = _run(loop_module, _variables(loop_tree), model_inputs, repeats)
    except CkptconvError:
        raise
    except Exception as e:  # a model that does not fit its checkpoint
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}" if str(e) else type(e).__name__
        if form == "scan" and not report.structure_passed:
            # SCAN is not laid out as to_scan(LOOP) would lay it out (already a
            # FAIL), and the scan model cannot run on it: report the wrong
            # conversion (exit 1) rather than a bad command line (exit 2).
            report.not_run = (
                f"the scan model cannot run on SCAN ({why}), whose structure differs from "
                "to_scan(LOOP) (above)"
            )
            return report
        raise VerifyError(
            f"running the models failed ({why}). "
            "Check that --block/--model and --block-kwargs match the checkpoints "
            "(hidden size, heads, layer count) and the input shape; --debug shows the traceback."
        ) from e
    rows, unmatched = compare_intermediates(
        loop_state.get("intermediates", {}), scan_state.get("intermediates", {}),
        pattern=template, into=into, atol=atol, rtol=rtol, period=period, remainder=remainder,
    )
    import jax

    dev = jax.devices()[0]
    report.numeric = True
    report.rows = rows
    report.unmatched = unmatched
    report.device = f"{dev.platform}:{dev.id} ({getattr(dev, 'device_kind', '')})"
    report.atol, report.rtol = atol, rtol
    report.tolerances = {
        r.dtype: _tolerance(jax.numpy.dtype(r.dtype), atol, rtol) for r in rows
    }
    report.timings = {"loop": t_loop, "scan": t_scan}
    return report

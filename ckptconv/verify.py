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
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ckptconv import lazy, storage
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
    #: the conversion options used, and where they came from ("given",
    #: "record": SCAN's conversion record, "layout": to-scan's defaults but the
    #: stacked key SCAN has, "default")
    options: dict[str, Any] = field(default_factory=dict)
    options_from: str = "default"
    #: the --only / --root / --dtype taken from SCAN's record (not given)
    selection_from_record: list[str] = field(default_factory=list)
    #: per-layer intermediate names in the loop model's order (the plot's columns)
    names: list[str] = field(default_factory=list)
    #: loop-form intermediates not compared, and why (a layer collection's own
    #: output, which the scan form, being the scanned layers, does not record)
    skipped: list[str] = field(default_factory=list)
    #: scan-form outputs with no loop counterpart, not compared (the ``ys`` a
    #: scanned subclass of the block returns beside its carry)
    extra: list[str] = field(default_factory=list)
    #: what to check about `unmatched` (not a hint the scan form already follows)
    unmatched_hint: str | None = None
    #: where `verify` wrote the plot (``plot=PATH``)
    plot: str | None = None
    #: the matmul precision of the compared runs: "highest" (float32 in full)
    #: or "default" (``caller_precision``; the timed runs always use that)
    precision: str = "highest"
    #: the caller's jax_default_matmul_precision (None: unset, the device's default)
    caller_precision: str | None = None
    #: what the compared runs' float32 matmul inputs round to on the device
    #: ("float32", "tensorfloat32", "bfloat16"): the default tolerances follow it
    rounding: str | None = None

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

    def cells(self) -> tuple[list[int], list[str], np.ndarray]:
        """The plot's matrix: ``(layers, names, worst)``, ``worst[i, j]`` the
        worst ``|Δ| / (atol + rtol·|loop|)`` of intermediate ``names[j]`` in
        layer ``layers[i]`` over its calls (> 1 fails; NaN where that layer has
        no such intermediate). Rows outside the layers are not in it."""
        layers = sorted({r.layer for r in self.rows if r.layer is not None})
        names = [n for n in self.names if any(r.name == n for r in self.rows if r.layer is not None)]
        names += sorted({r.name for r in self.rows if r.layer is not None} - set(names))
        li = {v: i for i, v in enumerate(layers)}
        ni = {v: j for j, v in enumerate(names)}
        worst = np.full((len(layers), len(names)), np.nan)
        for r in self.rows:
            if r.layer is None:
                continue
            i, j = li[r.layer], ni[r.name]
            w = r.worst if r.passed or r.worst > 1 else math.inf  # failed: never below 1
            worst[i, j] = w if np.isnan(worst[i, j]) else max(worst[i, j], w)
        return layers, names, worst

    def _precision_line(self) -> str:
        caller = (f"jax_default_matmul_precision={self.caller_precision}"
                  if self.caller_precision is not None
                  else "default (jax_default_matmul_precision unset)")
        if self.precision == "highest":
            timed = f"; timed at the caller's {caller}" if self.timings else ""
            return f"precision: highest (float32 matmuls in full in the compared runs{timed})"
        if self.rounding == "float32":
            how = f"float32 matmuls in full on {(self.device or '').split(':')[0]}"
        else:
            how = f"float32 matmul inputs round to {self.rounding}"
        return f"precision: default (the caller's {caller}: {how})"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            passed=self.passed,
            structure_passed=self.structure_passed,
            numeric_passed=self.numeric_passed if self.numeric else None,
            first_bad_layer=self.first_bad_layer,
        )
        return _finite(out)

    def _selection_hint(self, bad: list[LeafCheck]) -> list[str]:
        """Where SCAN is a part of to_scan(LOOP): the --root or --only that
        would say so (a serving checkpoint checked without its options)."""
        missing = {c.path for c in bad if c.status == "missing"}
        unexpected = {c.path for c in bad if c.status == "unexpected"}
        if not missing:
            return []
        if unexpected and len(unexpected) == sum(c.status != "missing" for c in self.leaves) \
                and "root" not in self.options:
            # Nothing of SCAN at LOOP's paths: is SCAN one subtree of it?
            prefixes = None
            for u in unexpected:
                here = {m[: -len(u) - 1] for m in missing if m.endswith("/" + u)}
                prefixes = here if prefixes is None else prefixes & here
            if not prefixes:
                return []
            # An optimizer's moments have the params' shape too: params first.
            root, *others = sorted(prefixes, key=lambda p: (p.split("/")[-1] != "params", len(p), p))
            also = f" (or {', '.join(others)})" if others else ""
            return [f"  SCAN's leaves are those of LOOP's {root}{also}: was it written with --root "
                    f"{root}? Pass --root {root} (and the --dtype it was cast to, if any)."]
        if unexpected or "only" in self.options:
            return []
        kept = {c.path.split("/")[0] for c in self.leaves if c.status != "missing"}
        gone = {m.split("/")[0] for m in missing}
        if kept and not kept & gone:
            only = " ".join(f"--only {k}" for k in sorted(kept))
            return [f"  SCAN holds only {', '.join(sorted(kept))} of LOOP's top-level keys: was it "
                    f"written with {only}? Pass {only}."]
        return []

    def table(self, max_rows: int | None = None) -> str:
        """A readable report for a terminal: the worst rows first (5 when all
        pass, 20 otherwise, unless ``max_rows`` says)."""
        if max_rows is None:
            max_rows = 5 if self.passed else 20
        lines = [f"verify {self.loop} (loop) against {self.scan} (scan)"]
        if self.options_from in ("record", "layout"):
            from ckptconv.record import options_text

            text = options_text(self.options) or "(defaults)"
            source = {
                "record": "from SCAN's conversion record",
                "layout": "from SCAN's layout (it has no conversion record)",
            }[self.options_from]
            lines.append(f"options: {source}: {text}")
        elif self.selection_from_record:
            from ckptconv.record import options_text

            text = options_text({k: self.options[k] for k in self.selection_from_record})
            lines.append(f"options: from SCAN's conversion record: {text}")
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
            found = {c.found for c in bad if c.status == "dtype"}
            if len(found) == 1 and all(c.status in ("dtype", "missing") for c in bad) and "dtype" not in self.options:
                (d,) = found
                lines.append(
                    f"  SCAN's floating leaves are {d}: was it cast (to-scan --dtype {d})? "
                    f"Pass --dtype {d}, and the --only / --root it was written with."
                )
            lines += self._selection_hint(bad)
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
            lines.append(self._precision_line())
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
            if self.skipped:
                lines.append(
                    f"not compared: {len(self.skipped)} outputs of a layer collection as a "
                    "whole, which the scan form (the scanned layers) does not record; every "
                    "layer and all that follows the collection are compared:"
                )
                for name in self.skipped[:3]:
                    lines.append(f"  {name}")
                if len(self.skipped) > 3:
                    lines.append(f"  … and {len(self.skipped) - 3} more")
            if self.extra:
                lines.append(
                    f"not compared: {len(self.extra)} values the scanned layer returns beside "
                    "its carry (nn.scan's ys), which the loop form's layer does not return:"
                )
                for name in self.extra[:3]:
                    lines.append(f"  {name}")
                if len(self.extra) > 3:
                    lines.append(f"  … and {len(self.extra) - 3} more")
            if self.unmatched:
                lines.append(
                    f"{len(self.unmatched)} intermediates exist in one form only, so they were "
                    "not compared (FAIL):"
                )
                for name in self.unmatched[:5]:
                    lines.append(f"  only in {name}")
                if len(self.unmatched) > 5:
                    lines.append(f"  … and {len(self.unmatched) - 5} more")
                if self.unmatched_hint:
                    lines.append(f"  {self.unmatched_hint}")
        if self.plot:
            lines.append(f"plot: {self.plot}")
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
# Reading the checkpoints


@dataclass
class _Side:
    """One checkpoint: its name in messages, its tree (lazy `Ref` leaves for a
    path, read with ``read``; the tree itself for an in-memory input), its
    CheckpointManager step."""

    name: str
    tree: Any
    read: Callable[[Any], np.ndarray] | None = None
    step: int | None = None
    path: Path | None = None
    items: bool = False  # the tree's top keys are a manager step's items

    def value(self, leaf: Any) -> np.ndarray:
        """A leaf's values as numpy (lazy leaves read now)."""
        if isinstance(leaf, lazy.LAZY):
            assert self.read is not None
            return np.asarray(lazy._value(leaf, self.read))
        return np.asarray(treelib._unbox(leaf))

    def materialize(self, tree: Any) -> Any:
        return tree if self.read is None else lazy.materialize(tree, self.read)


def _open(x: str | Path | Any, step: int | None = None) -> _Side:
    """A checkpoint path (a CheckpointManager root at ``step``, default its
    latest; ``step`` does not apply to other inputs), described, not read."""
    if not isinstance(x, (str, Path, storage.BucketPath)):
        return _Side("<tree>", x)
    from ckptconv import formats

    path = storage.as_path(x)
    fmt = formats.detect(path)
    layout = fmt.describe(path)
    if layout.kind == "root" and step is not None:
        layout = fmt.describe(path, step)
    at = layout.step if layout.kind == "root" else None
    items = dict(layout.items)
    if list(items) == [""]:
        item = items[""]
        return _Side(str(x), fmt.read_lazy(item), lambda ref: fmt.read_array(item, ref), at, path)
    # Several items ({item: tree}, as `load` gives them): each Ref names its item.
    tree = {}
    for name, item in items.items():
        tree[name] = lazy._map_lazy(
            fmt.read_lazy(item), lambda r, n=name: lazy.Ref((n, r), r.shape, r.dtype)
        )

    def read(ref: Any) -> np.ndarray:
        name, inner = ref.source
        return fmt.read_array(items[name], inner)

    return _Side(str(x), tree, read, at, path, items=True)


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


_CHUNK = 1 << 22  # elements compared at a time: bounded temporaries on large leaves


def _flat_view(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a).reshape(-1)
    return a.view(np.uint8) if a.dtype.itemsize and a.dtype.kind != "O" else a


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    x, y = _flat_view(a), _flat_view(b)
    step = _CHUNK * 4
    return all(np.array_equal(x[i : i + step], y[i : i + step]) for i in range(0, x.size, step))


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if not (a.dtype.kind in "fciu" or a.dtype.name == "bfloat16"):
        return float("nan")
    x, y = a.reshape(-1), b.reshape(-1)
    best = 0.0
    for i in range(0, x.size, _CHUNK):
        with np.errstate(invalid="ignore"):
            d = np.abs(x[i : i + _CHUNK].astype(np.float64) - y[i : i + _CHUNK].astype(np.float64))
        if d.size:
            m = np.nanmax(d) if not np.isnan(d).all() else math.nan
            best = m if math.isnan(m) or math.isnan(best) else max(best, float(m))
    return float(best)


def _scan_opts(
    pattern: str | None, into: str | None, period: int | None, remainder: str,
    layers: Any, groups: Any,
) -> dict[str, Any]:
    opts: dict[str, Any] = {"period": period, "remainder": remainder, "layers": layers}
    if groups is not None:
        opts["groups"] = groups
    else:
        opts.update(pattern=pattern, into=into)
    return opts


def check_structure(
    loop: Any, scan: Any, *, pattern: str | None = None, into: str | None = None, axis: int = 0,
    period: int | None = None, remainder: str = "separate", layers: Any = None,
    groups: Any = None, loop_read: Callable[[Any], np.ndarray] | None = None,
    scan_read: Callable[[Any], np.ndarray] | None = None,
    only: Sequence[tuple[str, ...]] | None = None,
    root: tuple[str, ...] | None = None,
    dtype: np.dtype | None = None,
    items: bool = False,
) -> list[LeafCheck]:
    """Compare SCAN with ``to_scan(LOOP)`` (same options) leaf by leaf, layer by
    layer; ``LeafCheck.layers`` are real layer numbers (``K·b + j`` with a period).

    ``only``, ``root``, ``dtype``: SCAN was written with ``--only``, ``--root``,
    ``--dtype`` (a train state's params, cast for serving): LOOP is taken as
    the conversion takes it (subtrees kept before to_scan, the root taken and
    the floating leaves cast after it); SCAN is compared as it is, so a SCAN
    that was not cast fails on its dtypes. ``items``: the trees' top keys are
    a CheckpointManager step's items, and ``only`` / ``root`` apply in each
    (as the conversion applies them).

    Trees may have lazy leaves (`ckptconv.lazy.Ref`, as the formats'
    ``read_lazy`` gives them), read with ``loop_read``/``scan_read``: then one
    SCAN leaf and one LOOP layer are in memory at a time."""
    opts = _scan_opts(pattern, into, period, remainder, layers, groups)
    from ckptconv import subset

    parts = dict(loop) if items else {None: loop}  # item name -> its tree
    if only:
        for q in only:
            whys = [why for _, why in (subset.find(t, q) for t in parts.values()) if why is not None]
            if len(whys) == len(parts):
                raise VerifyError(f"--only {'/'.join(q)}: not in LOOP: {whys[0]}.")
        kept = {n: subset.keep_only(t, list(only)) for n, t in parts.items()}
        parts = {n: t for n, t in kept.items() if t is not None}  # an item with none is left out
    loop = parts if items else parts[None]
    expected = to_scan(loop, axis=axis, **opts)
    where = _layer_map(find_groups(loop, **opts))
    if root:
        roots, whys = {}, []
        for n, t in (expected.items() if items else [(None, expected)]):
            sub, why = subset.find(t, tuple(root))
            if why is None:
                roots[n] = sub
            else:
                whys.append(why)
        if not roots:
            raise VerifyError(f"--root {'/'.join(root)}: not in to_scan(LOOP): {whys[0]}.")
        expected = roots if items else roots[None]
        head = 1 if items else 0
        n = len(root)
        where = [(p[:head] + p[head + n:], ls, st) for p, ls, st in where
                 if tuple(map(str, p[head:head + n])) == tuple(root)]
    if dtype is not None:
        expected, _ = subset.cast(expected, dtype)
    lside, sside = _Side("LOOP", loop, loop_read), _Side("SCAN", scan, scan_read)
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
        checks.append(_check_leaf(name, p, e, f, lside, sside, where, axis))
        del f
    for p, f in got.items():
        if p not in want:
            checks.append(LeafCheck(treelib.format_path(p), "unexpected", found=_describe(f)))
    return checks


def _check_leaf(
    name: str, p: tuple, e: Any, f: Any, lside: _Side, sside: _Side,
    where: list[tuple[tuple, list[int], bool]], axis: int,
) -> LeafCheck:
    """One leaf pair. A stacked leaf of a lazy LOOP is compared layer by layer
    (SCAN's leaf, then each LOOP layer in turn), never stacked in memory."""
    b = sside.value(f)
    w = _where(p, where)
    cast_to = None
    if isinstance(e, lazy.Cast) and isinstance(e.value, lazy.Stack):
        cast_to, e = e.dtype, e.value  # cast layer by layer, as the writers do
    if isinstance(e, lazy.Stack):
        layers, worst = [], 0.0
        for i, part in enumerate(e.parts):
            a = lside.value(part)
            if cast_to is not None:
                a = a.astype(cast_to)
            bi = np.take(b, i, axis=e.axis)
            if not _same_bits(a, bi):
                layers.append(w[1][i] if w is not None and i < len(w[1]) else i)
                worst = _nanmax(worst, _max_abs(a, bi))
        if not layers:
            return LeafCheck(name, "equal")
        return LeafCheck(name, "differs", layers=layers, max_abs=worst)
    a = lside.value(e)
    if _same_bits(a, b):
        return LeafCheck(name, "equal")
    layers: list[int] = []
    if w is not None and not w[2]:
        layers = list(w[1])  # an unstacked leftover layer
    elif w is not None and a.ndim > axis:
        for i in range(a.shape[axis]):
            if not _same_bits(np.take(a, i, axis), np.take(b, i, axis)):
                layers.append(w[1][i] if i < len(w[1]) else i)
    return LeafCheck(name, "differs", layers=layers, max_abs=_max_abs(a, b))


def _nanmax(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return max(a, b)


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


#: Collections a variables dict holds (MaxText's train state keeps one under ``params``).
_COLLECTIONS = {"params", "batch_stats", "cache", "params_axes"}


def _variables(t: Any, items: bool = False) -> dict[str, Any]:
    """The model variables in a checkpoint tree: its collections if it has
    ``params`` at the top (optimizer state and the rest left out; MaxText's
    ``params/params/…``: the variables dict under ``params``); for a
    CheckpointManager step (``{item: tree}``), those of the one item that has
    ``params``, or its lone item (``items``: a step's items at the top, one
    converted with ``--root params``); else the whole tree as params."""
    if items and isinstance(t, Mapping) and len(t) == 1:
        return _variables(next(iter(t.values())))
    if isinstance(t, Mapping) and "params" in t:
        inner = t["params"]
        if isinstance(inner, Mapping) and "params" in inner and set(inner) <= _COLLECTIONS:
            return {k: inner[k] for k in ("params", "batch_stats", "cache") if k in inner}
        return {k: t[k] for k in ("params", "batch_stats", "cache") if k in t}
    if isinstance(t, Mapping):
        items = [v for v in t.values() if isinstance(v, Mapping) and "params" in v]
        if len(items) == 1:
            return _variables(items[0])
    return {"params": t}


def _is_array(x: Any) -> bool:
    import jax

    leaves = jax.tree_util.tree_leaves(x)
    return bool(leaves) and all(isinstance(v, (np.ndarray, np.generic, jax.Array)) for v in leaves)


@dataclass
class _Call:
    """How the models are called: positional and keyword inputs. Arrays (and
    pytrees of arrays) are traced; anything else (``deterministic=True``, a
    mode string) is passed as it is, a static argument."""

    args: tuple
    kwargs: dict[str, Any]

    @classmethod
    def of(cls, inputs: Any) -> _Call:
        if isinstance(inputs, Mapping):
            return cls((), dict(inputs))
        if isinstance(inputs, (tuple, list)):
            return cls(tuple(inputs), {})
        return cls((inputs,), {})

    def dynamic(self) -> tuple[list, dict]:
        return (
            [a for a in self.args if _is_array(a)],
            {k: v for k, v in self.kwargs.items() if _is_array(v)},
        )

    def __call__(self, fn: Callable[..., Any], dyn: tuple[list, dict]) -> Any:
        pos, kw = iter(dyn[0]), dyn[1]
        args = [next(pos) if _is_array(a) else a for a in self.args]
        return fn(*args, **{**self.kwargs, **kw})


def _precision_scope(precision: str) -> contextlib.AbstractContextManager[Any]:
    """Where the compared runs are traced, lowered, compiled and run."""
    import jax

    if precision == "highest":
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()


def _run(
    module: Any, variables: Any, call: _Call, repeats: int, form: str, precision: str
) -> tuple[Any, Timing | None]:
    """Time the plain forward (compile, then steps) at the caller's precision,
    then run once capturing every intermediate at ``precision``. Timing the
    plain forward keeps the figures about the model, not about copying out its
    intermediates.

    The capturing run is lowered and compiled explicitly inside the precision
    scope (the setting acts when a function is traced), from a function made
    for this call, so no jit cache hands back one traced at another precision."""
    import jax

    def plain(v: Any, dyn: Any) -> Any:
        return call(lambda *a, **k: module.apply(v, *a, mutable=True, **k), dyn)

    def captured(v: Any, dyn: Any) -> Any:
        return call(
            lambda *a, **k: module.apply(v, *a, capture_intermediates=True, mutable=True, **k), dyn
        )

    dyn = call.dynamic()
    timing = None
    if repeats > 0:  # else no timing: one compile (of the capturing run) instead of two
        start = time.perf_counter()
        lowered = jax.jit(plain).lower(variables, dyn)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(variables, dyn))
        start = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(compiled(variables, dyn))
        timing = Timing(compile_s, (time.perf_counter() - start) / repeats)
        _keep(f"{form} step", lowered)
    with _precision_scope(precision):
        lowered = jax.jit(captured).lower(variables, dyn)
        _keep(form, lowered)
        out = jax.device_get(lowered.compile()(variables, dyn))
    return out, timing


def _first_line(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def _listed(title: str, items: list[str], n: int = 5) -> list[str]:
    if not items:
        return []
    out = [f"  {title} ({len(items)}):"]
    out += [f"    {x}" for x in items[:n]]
    if len(items) > n:
        out.append(f"    … and {len(items) - n} more")
    return out


def _shapes(tree: Any) -> dict[tuple, tuple]:
    """path -> shape of every array leaf (boxed leaves unboxed)."""
    return {
        p: tuple(s) for p, x in treelib.leaves_with_paths(tree)
        if (s := treelib.leaf_shape(x)) is not None
    }


def _check_params(form: str, module: Any, variables: dict[str, Any], call: _Call, ckpt: str) -> str | None:
    """Why ``module`` cannot run on ``variables`` (the checkpoint's), or None:
    the paths its ``init`` creates against those the checkpoint holds
    (``jax.eval_shape``: nothing is computed). None too when ``init`` itself
    cannot be traced: running will say what is wrong."""
    import jax
    from flax.core import meta

    def init(key: Any, dyn: Any) -> Any:
        rngs = {"params": key, "dropout": key}
        return call(lambda *a, **k: module.init(rngs, *a, **k), dyn)

    try:
        made = jax.eval_shape(init, jax.random.PRNGKey(0), call.dynamic())
    except Exception:  # noqa: BLE001 - the run reports it, with its own message
        return None
    made = meta.unbox(dict(made))
    missing, unexpected, shape = [], [], []
    for coll in ("params", "batch_stats"):
        if coll not in made and coll not in variables:
            continue
        want = _shapes(made.get(coll, {}))
        have = _shapes(variables.get(coll, {}))
        for p, s in want.items():
            name = treelib.format_path((coll, *p))
            if p not in have:
                missing.append(f"{name} {list(s)}")
            elif have[p] != s:
                shape.append(f"{name}: the model's {list(s)}, the checkpoint's {list(have[p])}")
        unexpected += [f"{treelib.format_path((coll, *p))} {list(s)}" for p, s in have.items() if p not in want]
    if not (missing or unexpected or shape):
        return None
    lines = [
        f"the {form} model ({type(module).__name__}) does not fit {ckpt}: "
        f"{len(missing)} params missing from the checkpoint, {len(unexpected)} not in the "
        f"model, {len(shape)} of another shape."
    ]
    lines += _listed("missing from the checkpoint", missing)
    lines += _listed("in the checkpoint, not in the model", unexpected)
    lines += _listed("shape", shape)
    lines.append(
        "  Does --model/--block build this checkpoint's form (layer names, stacked key, "
        "layer axis, --period, sizes in --block-kwargs)?"
    )
    return "\n".join(lines)


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


def _compare(
    name: str, layer: int | None, a: np.ndarray, b: np.ndarray, atol: float | None,
    rtol: float | None, rounding: str = "float32",
) -> Row:
    dtype = np.dtype(a.dtype)
    at, rt = _tolerance(dtype, atol, rtol, rounding)
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


# --------------------------------------------------------------------------
# Matching the two forms' intermediates
#
# The loop form's intermediates are stacked as its params were (the same
# groups, layer axis 0, as nn.scan stacks them), on `Ref` leaves that name the
# loop value's path, so the same plan serves the check before running (on
# jax.eval_shape's shapes) and the comparison after (on the values).


def _refs(tree: Any, path: tuple = ()) -> Any:
    """``tree`` with every array leaf replaced by ``Ref(source=its path)``."""
    if tree is None or (not treelib.is_leaf(tree) and treelib._is_container(tree)):
        if tree is None:
            return None
        return treelib._map_children(tree, lambda v, p: _refs(v, p), path)
    shape = getattr(tree, "shape", None)
    try:
        dtype = np.dtype(tree.dtype)
    except (AttributeError, TypeError):
        return tree
    return tree if shape is None else lazy.Ref(path, tuple(shape), dtype)


def _is_digit(k: Any) -> bool:
    return isinstance(k, int) or (isinstance(k, str) and k.isdigit())


def _get(tree: Any, path: tuple) -> Any:
    node = tree
    for k in path:
        if isinstance(node, Mapping) and k in node:
            node = node[k]
        elif isinstance(node, (tuple, list)) and isinstance(k, int) and k < len(node):
            node = node[k]
        else:
            return None
    return node


def _inter_specs(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """to_scan options that stack the loop form's intermediates as ``groups``
    (the params' groups) were stacked."""
    specs: list[dict[str, Any]] = []
    for g in groups:
        in_place = g.holder is not None and g.into == g.holder
        partial = g.start != 0 or (g.total and g.num_layers != g.total)
        spec = {
            "pattern": g.template, "into": None if in_place else g.into, "period": g.period,
            "remainder": g.remainder,
            "layers": (g.start, g.start + g.num_layers) if partial else None,
        }
        if spec not in specs:
            specs.append(spec)
    return specs


@dataclass
class _Plan:
    """Which loop value(s) each scan intermediate is compared with."""

    want: dict[tuple, Any]  # scan path -> Ref (a loop path) or Stack (one Ref per layer)
    got: dict[tuple, Any]  # scan path -> scan value
    where: list[tuple[tuple, list[int], bool]]
    skipped: list[str]
    names: list[str]
    #: scan path -> the path rows are named by, where it is not the scan path
    labels: dict[tuple, tuple] = field(default_factory=dict)
    #: scan-form values with no loop counterpart, not compared (`_wrapper_calls`)
    extra: list[str] = field(default_factory=list)

    def stacked(self) -> bool:
        """Whether the scan form recorded anything of its stacked layers
        (else its nn.scan does not stack the intermediates collection)."""
        return any(_where(p, self.where) is not None for p in self.got)

    def hint(self) -> str:
        """What to check where the forms' intermediates do not correspond."""
        names = (
            "Do both forms name their modules alike (the layers' own names inside, the "
            "stacked key outside)?"
        )
        if self.stacked():  # the collection is stacked: not that hint again
            return names
        return (
            "Does the scan module stack the intermediates collection? nn.scan(..., "
            f"variable_axes={{'params': 0, 'intermediates': 0}}). {names}"
        )

    def mismatch(self) -> tuple[list[str], list[str], list[str]]:
        loop_only = [treelib.format_path(p) for p in self.want if p not in self.got]
        scan_only = [treelib.format_path(p) for p in self.got if p not in self.want]
        scan_only = [p for p in scan_only if p not in self.extra]
        shape = []
        for p, e in self.want.items():
            if p in self.got:
                se, sg = treelib.leaf_shape(e), treelib.leaf_shape(self.got[p])
                if se != sg:
                    shape.append(
                        f"{treelib.format_path(p)}: loop form {list(se) if se is not None else se} "
                        f"(stacked), scan form {list(sg) if sg is not None else sg}"
                    )
        return loop_only, scan_only, shape


def _same_leaves(a: Any, b: Any) -> bool:
    """Whether two records hold leaves at the same paths with the same shapes."""
    return _shapes(a) == _shapes(b) and bool(_shapes(a))


def _wrapper_calls(
    tree: Any, scan_inter: Any, want: dict[tuple, Any], labels: dict[tuple, tuple],
    where: list[tuple[tuple, list[int], bool]],
) -> tuple[dict[tuple, Any], list[str]]:
    """A scanned subclass of the loop's block (``class ScanBlock(Block)``
    whose ``__call__`` returns ``(super().__call__(x), None)``, the usual
    ``nn.scan`` idiom) records one more call per layer call than the loop's
    block: after the block's own records (the loop's ``m`` per call, compared
    with them) its ``(carry, ys)``, whose carry is compared with the block's
    last record of that call (or with its first item, for a block returning
    ``(x, …)``), in rows named ``__call__[c]/carry`` (``c`` the loop's index
    of that record). ``ys`` has no loop counterpart: its paths are returned,
    not compared. Returns ``want`` so remapped (in its order) and those
    paths; ``labels`` is updated in place."""
    records = {
        p[: i + 1] for p in _flat(scan_inter)
        for i, k in enumerate(p) if k == "__call__" and _where(p, where) is not None
    }
    moved: dict[tuple, list[tuple[tuple, Any]]] = {}
    extra: list[str] = []
    for rec in sorted(records, key=treelib.format_path):
        loop_calls, scan_calls = _get(tree, rec), _get(scan_inter, rec)
        if not (isinstance(loop_calls, (tuple, list)) and isinstance(scan_calls, (tuple, list))):
            continue
        calls = len(scan_calls) - len(loop_calls)  # one (carry, ys) per call
        if calls <= 0 or len(loop_calls) % calls:
            continue
        m = len(loop_calls) // calls  # the block's records per call
        pairs: list[tuple[int, int, Any]] = []  # (loop index, scan index, loop record)
        carries: list[tuple[int, int, Any]] = []  # (loop index of the last record, scan index, its carry)
        for g in range(calls):
            for j in range(m):
                pairs.append((g * m + j, g * (m + 1) + j, loop_calls[g * m + j]))
            last, outer = loop_calls[g * m + m - 1], scan_calls[g * (m + 1) + m]
            if not (isinstance(outer, (tuple, list)) and outer):
                break
            if _same_leaves(outer[0], last):
                carries.append((g * m + m - 1, g * (m + 1) + m, last))
            elif isinstance(last, (tuple, list)) and last and _same_leaves(outer[0], last[0]):
                carries.append((g * m + m - 1, g * (m + 1) + m, last[0]))
            else:
                break
        if len(carries) != calls or not all(_same_leaves(scan_calls[s], r) for _, s, r in pairs):
            continue
        first: tuple | None = None
        for c, s, record in pairs:
            for sub, leaf in treelib.leaves_with_paths(record):
                moved.setdefault(rec + (c,) + sub, [])
                first = first or rec + (c,) + sub
                moved[first].append((rec + (s,) + sub, leaf))
                labels[rec + (s,) + sub] = rec + (c,) + sub
            carry = next((x for x in carries if x[0] == c), None)
            if carry is None:
                continue
            _, s, value = carry
            for sub, leaf in treelib.leaves_with_paths(value):
                moved[first].append((rec + (s, 0) + sub, leaf))
                labels[rec + (s, 0) + sub] = rec + (c, "carry") + sub
            for sub, _ in treelib.leaves_with_paths(tuple(scan_calls[s][1:])):
                extra.append(treelib.format_path(rec + (s, 1 + sub[0]) + sub[1:]))
    if not moved:
        return want, extra
    out: dict[tuple, Any] = {}
    for p, leaf in want.items():
        out.update(moved.pop(p) if p in moved else {p: leaf})
    for pairs_of in moved.values():  # records the stacked loop tree did not list
        out.update(pairs_of)
    return out, extra


def _plan(loop_inter: Any, scan_inter: Any, specs: list[dict[str, Any]]) -> _Plan:
    tree = _refs(loop_inter)
    # A layer collection (Hugging Face's FlaxGPT2BlockCollection: children
    # 0 … N-1) records its own calls beside its layers: set them aside.
    own: dict[tuple, dict[Any, Any]] = {}

    def strip(node: Any, path: tuple) -> None:
        if not isinstance(node, dict):
            return
        digits = [k for k in node if _is_digit(k)]
        others = [k for k in node if not _is_digit(k)]
        if len(digits) >= 1 and others and all(isinstance(node[k], dict) for k in digits):
            own[path] = {k: node.pop(k) for k in others}
        for k, v in node.items():
            strip(v, path + (k,))

    has_list = any(s["pattern"] == "{i}" for s in specs)
    if has_list:
        strip(tree, ())
    where: list[tuple[tuple, list[int], bool]] = []
    for spec in specs:
        try:
            found = find_groups(tree, **spec)
            tree = to_scan(tree, axis=0, **spec)
        except NothingToConvertError:
            continue
        except GroupError as e:
            raise VerifyError(
                f"the loop model's layers do not record the same intermediates, so they cannot "
                f"be stacked to compare with the scan form's: {e}"
            ) from e
        where += _layer_map(found)
    want = _flat(tree)
    got = _flat(scan_inter)
    skipped: list[str] = []
    for path, records in own.items():
        for k, value in records.items():
            here = _get(tree, path + (k,))
            n_stacked = len(here) if isinstance(here, (tuple, list)) else 0
            there = _get(scan_inter, path + (k,))
            n_scan = len(there) if isinstance(there, (tuple, list)) else None
            calls = value if isinstance(value, (tuple, list)) else None
            if calls is not None and n_scan == n_stacked + len(calls):
                # The scan form's module records the collection's call after its layers'.
                for j, c in enumerate(calls):
                    for sub, leaf in treelib.leaves_with_paths(c):
                        want[path + (k, n_stacked + j) + sub] = leaf
            elif calls is not None and (n_scan == n_stacked or (n_scan is None and n_stacked == 0)):
                skipped.append(treelib.format_path(path + (k,)))
            else:
                for sub, leaf in treelib.leaves_with_paths(value):
                    want[path + (k,) + sub] = leaf
    labels: dict[tuple, tuple] = {}
    want, extra = _wrapper_calls(tree, scan_inter, want, labels, where)
    # nn.scan's contract: a scanned layer returns (carry, ys), the loop's layer
    # the carry alone (MaxText's `(x, None) if scan_layers else x`): the scan
    # form's record of the call then holds the carry at index 0 and nothing else.
    for p in [p for p in want if p not in got and p + (0,) in got]:
        if not any(q[: len(p)] == p and q[len(p)] != 0 for q in got if len(q) > len(p)):
            want[p + (0,)] = want.pop(p)
            labels[p + (0,)] = p
    names: list[str] = []
    for p in want:
        w = _where(p, where)
        if w is not None and (w[2] is False or isinstance(want[p], lazy.Stack)):
            n = _inter_name(labels.get(p, p)[len(w[0]):])
            if n not in names:
                names.append(n)
    return _Plan(want, got, where, skipped, names, labels, extra)


def _no_match_error(plan: _Plan) -> VerifyError:
    loop_only, scan_only, shape = plan.mismatch()
    lines = [
        f"the loop and scan models' intermediates do not correspond ({len(loop_only)} in the "
        f"loop form only, {len(scan_only)} in the scan form only, {len(shape)} of another "
        "shape), so not every layer could be compared. Nothing was run."
    ]
    lines += _listed("loop form only (after stacking its layers)", loop_only)
    lines += _listed("scan form only", scan_only)
    lines += _listed("shape", shape)
    lines.append(f"  {plan.hint()}")
    return VerifyError("\n".join(lines))


def _rows(
    plan: _Plan, values: dict[tuple, Any], atol: float | None, rtol: float | None,
    rounding: str = "float32",
) -> list[Row]:
    def row(*args: Any) -> Row:
        return _compare(*args, atol, rtol, rounding)

    rows: list[Row] = []
    for p, e in plan.want.items():
        if p not in plan.got:
            continue
        b = np.asarray(plan.got[p])
        w = _where(p, plan.where)
        label = plan.labels.get(p, p)
        if isinstance(e, lazy.Stack) and w is not None:
            prefix, layers, _ = w
            name = _inter_name(label[len(prefix):])
            if b.shape[:1] != (len(e.parts),):
                a = np.stack([np.asarray(values[r.source]) for r in e.parts])
                rows.append(row(name, None, a, b))
                continue
            for i, part in enumerate(e.parts):
                layer = layers[i] if i < len(layers) else i
                rows.append(row(name, layer, np.asarray(values[part.source]), b[i]))
            continue
        if isinstance(e, lazy.Stack):
            a = np.stack([np.asarray(values[r.source]) for r in e.parts])
        elif isinstance(e, lazy.Ref):
            a = np.asarray(values[e.source])
        else:
            a = np.asarray(e)
        if w is not None and not w[2]:
            rows.append(row(_inter_name(label[len(w[0]):]), w[1][0], a, b))
        else:
            rows.append(row(_inter_name(label), None, a, b))
    rows.sort(key=lambda r: (r.passed, -r.worst, r.layer if r.layer is not None else -1))
    return rows


def compare_intermediates(
    loop_inter: Any, scan_inter: Any, *, pattern: str | None = None, into: str | None = None,
    atol: float | None = None, rtol: float | None = None,
    period: int | None = None, remainder: str = "separate", groups: Sequence[Group] | None = None,
    rounding: str = "float32",
) -> tuple[list[Row], list[str]]:
    """Rows for every intermediate of every layer (worst first), and the names
    found in only one form. The loop form's intermediates are stacked as the
    params ``groups`` were (or as ``to_scan(..., pattern, into, period)``
    would), on axis 0; each row names the real layer number and the
    intermediate's path inside the layer. ``rounding`` (what float32 matmul
    inputs were rounded to, `matmul_rounding`) picks the default tolerances."""
    if groups is not None:
        specs = _inter_specs(groups)
    else:
        specs = [{"pattern": pattern, "into": into, "period": period, "remainder": remainder, "layers": None}]
    plan = _plan(loop_inter, scan_inter, specs)
    values = _flat(loop_inter)
    loop_only, scan_only, _ = plan.mismatch()
    unmatched = [f"loop: {p}" for p in loop_only] + [f"scan: {p}" for p in scan_only]
    return _rows(plan, values, atol, rtol, rounding), unmatched


def _inter_name(path: Sequence[Any]) -> str:
    """``('self_attention', '__call__', 0)`` -> ``self_attention/__call__[0]``."""
    out = ""
    for k in path:
        out += f"[{k}]" if isinstance(k, int) else (f"/{k}" if out else str(k))
    return out


def _has_stacks(t: Any, into: str | None, axis: int, period: int | None, pattern: str | None) -> bool:
    try:
        return bool(find_stacks(t, into or "blocks", axis=axis, period=period, pattern=pattern or "layer_{i}"))
    except GroupError:
        return False


def _stack_elsewhere(L: _Side, S: _Side, opts: dict[str, Any], axis: int) -> str | None:
    """With to-scan's defaults assumed (no options, no record), SCAN holding
    LOOP's one layer group stacked under another key than the default: that
    key, if it is the only such key and its leaves are those of to_scan(LOOP)
    (same paths and shapes). Raises `VerifyError` where such a key is there
    but ambiguous or of other shapes (a usage error, not a wrong conversion);
    None where there is none (check_structure reports what differs)."""
    try:
        groups = find_groups(L.tree, **opts)
        if len(groups) != 1 or groups[0].period or _get(S.tree, groups[0].target) is not None:
            return None
        expected = to_scan(L.tree, axis=axis, **opts)  # lazy: nothing is read
    except GroupError:
        return None
    g = groups[0]
    stack = _shapes(_get(expected, g.target))
    here, there = _get(S.tree, g.path), _get(expected, g.path)
    if not (stack and isinstance(here, Mapping) and isinstance(there, Mapping)):
        return None
    same_leaves = [k for k, v in here.items() if k not in there and set(_shapes(v)) == set(stack)]
    if not same_leaves:
        return None
    at = " and ".join(treelib.format_path(g.path + (k,)) for k in same_leaves)
    head = (
        f"{S.name} (SCAN) has no {treelib.format_path(g.target)} stack (to-scan's default "
        f"--into {g.into}, assumed because SCAN has no conversion record)"
    )
    members = treelib.format_path(g.members_path)
    if len(same_leaves) > 1:
        raise VerifyError(
            f"{head}; {at} each hold the leaves of LOOP's {members} stacked: pass --into "
            "with the one SCAN was converted to."
        )
    (key,) = same_leaves
    if _shapes(here[key]) != stack:
        raise VerifyError(
            f"{head}; it has {at}, with the leaves of LOOP's {members} in other shapes: "
            f"pass --into {key} and the --axis it was converted with (MaxText: 1)."
        )
    return key


def _path_to(tree: Any, node: Any, depth: int = 2) -> tuple | None:
    """The keys from ``tree`` to ``node`` (the same object), ``depth`` at most."""
    if tree is node:
        return ()
    if depth and isinstance(tree, Mapping):
        for k, v in tree.items():
            p = _path_to(v, node, depth - 1)
            if p is not None:
                return (k, *p)
    return None


def _block_outside(
    L: _Side, S: _Side, variables: dict[str, Any], scan_vars: dict[str, Any], g: Group,
    axis: int, block: Any, block_kwargs: dict[str, Any] | None,
    input_shape: Sequence[int] | None, inputs: Any, dtype: np.dtype | None = None,
) -> VerifyError | None:
    """``--block`` builds the layer stack only: where LOOP's variables hold
    more than ``g``'s layers (an embedding, a head), the error that says so,
    with the commands that verify the stack alone where they can be written."""
    import json
    import shlex

    layer_keys = [g.path + ((g.holder, k) if g.template == "{i}" else (k,)) for k in g.keys]
    outside = [
        f"{treelib.format_path((coll, *p))} {list(shape)}"
        for coll in ("params", "batch_stats")
        for p, shape in _shapes(variables.get(coll, {})).items()
        if not any(p[: len(k)] == k for k in layer_keys)
    ]
    if not outside:
        return None
    few = ", ".join(x.split(" ")[0] for x in outside[:3]) + (", …" if len(outside) > 3 else "")
    lines = [
        f"--block runs only the layer stack ({g.num_layers} layers, "
        f"{treelib.format_path(('params', *g.members_path))} in LOOP, "
        f"{treelib.format_path(('params', *g.target))} in SCAN), but {L.name} (LOOP) also "
        f"has {len(outside)} params outside those layers ({few}), which it does not run: give "
        "--model MOD:FN, a function returning (loop_module, scan_module, inputs) of the whole "
        "model (README: \"The `--model` contract\"), or verify the layer stack alone."
    ]
    lines += _listed("outside the layers", outside)
    lp = _path_to(L.tree, variables.get("params"))
    sp = _path_to(S.tree, scan_vars.get("params"))
    if (
        L.path is not None and S.path is not None and g.template != "{i}" and lp == sp
        and lp in ((), ("params",), ("params", "params"))
    ):
        root = lp + g.path
        tail = ["--root", "/".join(map(str, root))] if g.path else []
        loop_cmd = ["ckptconv", "extract", str(L.path), "loop_layers.msgpack"]
        for k in g.keys:
            loop_cmd += ["--only", "/".join(map(str, root + (k,)))]
        if dtype is not None:  # SCAN was cast: the loop layers are cast alike
            loop_cmd += ["--dtype", dtype.name]
        scan_cmd = ["ckptconv", "extract", str(S.path), "scan_layers.msgpack",
                    "--only", "/".join(map(str, lp + g.target))]
        target = block if isinstance(block, str) else f"{block.__module__}:{block.__qualname__}"
        run = ["ckptconv", "verify", "loop_layers.msgpack", "scan_layers.msgpack",
               "--pattern", g.template, "--into", str(g.into)]
        run += ["--axis", str(axis)] if axis else []
        run += ["--block", target]
        run += ["--block-kwargs", json.dumps(block_kwargs)] if block_kwargs else []
        if inputs is not None:
            run += ["--input", "FILE.npy"]
        elif input_shape is not None:
            run += ["--input-shape", ",".join(map(str, input_shape))]
        lines.append("  The layer stack alone, as --block runs it:")
        for cmd in (loop_cmd + tail, scan_cmd + tail, run):
            lines.append("    " + " ".join(shlex.quote(w) for w in cmd))
    return VerifyError("\n".join(lines))


def _record_options(side: _Side) -> dict[str, Any] | None:
    """The to-scan options SCAN's conversion record names, if it has one."""
    if side.path is None:
        return None
    from ckptconv import record

    rec = record.read(side.path, side.step)
    if not rec or rec.get("command") != "to-scan" or not rec.get("groups"):
        return None
    opts = record.scan_options(rec)
    start = max(int(g.get("start") or 0) for g in rec["groups"])
    if start:
        opts["layers"] = f"{start}:"
    return opts


def _selection(selected: dict[str, Any]) -> tuple[list | None, tuple | None, np.dtype | None]:
    """``only``, ``root``, ``dtype`` as check_structure takes them."""
    from ckptconv import subset

    only = selected.get("only")
    if isinstance(only, str):
        only = [only]
    paths = [subset.parse_path(p, "--only") for p in only] if only else None
    root = selected.get("root")
    root = subset.parse_path(root, "--root") if root else None
    dtype = selected.get("dtype")
    return paths, root, (subset.parse_dtype(dtype) if dtype is not None else None)


def _record_selection(side: _Side) -> dict[str, Any]:
    """The ``--only`` / ``--root`` / ``--dtype`` SCAN's conversion record names."""
    if side.path is None:
        return {}
    from ckptconv import record

    rec = record.read(side.path, side.step) or {}
    return {k: rec[k] for k in ("only", "root", "dtype") if rec.get(k)}


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
        how = " (options from SCAN's conversion record)" if options_from == "record" else ""
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

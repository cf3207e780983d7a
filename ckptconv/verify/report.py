"""What verify returns: `Report` (its rows, text, JSON and exit code) and the per-leaf
(`LeafCheck`), per-layer (`Row`) and timing (`Timing`) records it holds."""

from __future__ import annotations

import ast
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: Bytes of the floating dtypes --dtype casts between (which way a cast went).
_WIDTH = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


def _first(names: list[str], n: int, prefix: str = "") -> list[str]:
    """The first ``n`` names as indented lines, then how many more there are."""
    more = [f"  … and {len(names) - n} more"] if len(names) > n else []
    return [f"  {prefix}{name}" for name in names[:n]] + more


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
    #: "record": SCAN's conversion record, "loop record": the to-scan that undoes
    #: LOOP's own to-loop (SCAN has no record), "layout": to-scan's defaults but the
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
        # (`COMPARED_COMPILE`: said where it matters, for 16-bit values)
        half = any(r.dtype in ("bfloat16", "float16") for r in self.rows)
        ops = "; 16-bit floats rounded at every op in both (XLA's excess precision off)" if half else ""
        if self.precision == "highest":
            timed = f"; timed at the caller's {caller}" if self.timings else ""
            return f"precision: highest (float32 matmuls in full in the compared runs{ops}{timed})"
        if self.rounding == "float32":
            how = f"float32 matmuls in full on {(self.device or '').split(':')[0]}"
        else:
            how = f"float32 matmul inputs round to {self.rounding}"
        return f"precision: default (the caller's {caller}: {how}{ops})"

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
        if self.options_from in ("record", "loop record", "layout"):
            from ckptconv.record import options_text

            text = options_text(self.options) or "(defaults)"
            source = {
                "record": "from SCAN's conversion record",
                "loop record": "from LOOP's conversion record (the to-scan that undoes its to-loop)",
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
            expected = {c.expected for c in bad if c.status == "dtype"}
            wider = len(found) == 1 and all(_WIDTH.get(next(iter(found)), 0) > _WIDTH.get(e, 9) for e in expected)
            if wider and all(c.status in ("dtype", "missing") for c in bad):
                # SCAN wider than LOOP: the cast was LOOP's (to-loop --dtype), not SCAN's.
                (d,) = found
                lines.append(
                    f"  LOOP's floating leaves are {', '.join(sorted(expected))} and SCAN's {d}: was "
                    "LOOP cast (to-loop --dtype)? A cast LOOP is not SCAN's loop form bit for bit: "
                    "verify SCAN against a to-loop of it without --dtype."
                )
            elif len(found) == 1 and all(c.status in ("dtype", "missing") for c in bad) and "dtype" not in self.options:
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
                lines.append(
                    f"  … {len(self.rows) - max_rows} more rows, each smaller against its tolerance "
                    "than those above (rows go worst first; --json for all)"
                )
            if self.skipped:
                lines.append(
                    f"not compared: {len(self.skipped)} outputs of a layer collection as a "
                    "whole, which the scan form (the scanned layers) does not record; every "
                    "layer and all that follows the collection are compared:"
                )
                lines += _first(self.skipped, 3, "")
            if self.extra:
                lines.append(
                    f"not compared: {len(self.extra)} values the scanned layer returns beside "
                    "its carry (nn.scan's ys), which the loop form's layer does not return:"
                )
                lines += _first(self.extra, 3, "")
            if self.unmatched:
                lines.append(
                    f"{len(self.unmatched)} intermediates exist in one form only, so they were "
                    "not compared (FAIL):"
                )
                lines += _first(self.unmatched, 5, "only in ")
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

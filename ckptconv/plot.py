"""``verify --plot PATH``: a heatmap of layers × intermediates.

Each cell is one intermediate of one layer, coloured by its worst
``|Δ| / (atol + rtol·|loop|)`` over its calls (`Report.cells`) on a log
scale from 1e-3 to 1e3 of the tolerance: blue well within it, white at it,
red beyond. A cell that fails (above 1) carries a black dot; the title
names the first failing layer. Grey: that layer has no such intermediate.
Rows outside the layers (the model's output, tokens) are summed up under
the title. PNG or SVG by the file's suffix.

matplotlib is an optional dependency (``pip install 'ckptconv[plot]'``); it
is imported only here, with the non-interactive Agg backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ckptconv.errors import VerifyError

#: The colour scale: worst/tolerance from VMIN to VMAX (log), 1 in the middle.
VMIN, VMAX = 1e-3, 1e3
CMAP = "coolwarm"
BAD = (0.8, 0.8, 0.8, 1.0)  # no such intermediate in that layer
SUFFIXES = (".png", ".svg")


@dataclass
class Drawn:
    """Where `render` put each cell, for checks on the written image.

    Attributes:
      layers, names, worst: `Report.cells`.
      centres: ``centres[i][j]`` the pixel ``(x, y)`` of cell ``(i, j)``'s
        centre in the PNG (origin top left).
      cell_px: a cell's width and height in pixels.
      size: the image's width and height in pixels.
      marked: ``(i, j)`` of every cell carrying the failure dot.
      title: the title.
    """

    layers: list[int]
    names: list[str]
    worst: np.ndarray
    centres: list[list[tuple[float, float]]] = field(default_factory=list)
    cell_px: tuple[float, float] = (0.0, 0.0)
    size: tuple[int, int] = (0, 0)
    marked: list[tuple[int, int]] = field(default_factory=list)
    title: str = ""


def require(path: str | Path | None = None) -> Any:
    """matplotlib (Agg backend), or a VerifyError saying how to get it; checks
    the suffix of ``path`` too (before anything runs)."""
    if path is not None and Path(path).suffix.lower() not in SUFFIXES:
        raise VerifyError(
            f"--plot {path}: the file's suffix says the format; give a .png or .svg path."
        )
    try:
        import matplotlib
    except ImportError:
        raise VerifyError(
            "--plot needs matplotlib, which is not installed: pip install 'ckptconv[plot]' "
            "(or pip install matplotlib)."
        ) from None
    matplotlib.use("Agg", force=True)
    return matplotlib


def colour(worst: float) -> tuple[float, float, float, float]:
    """The RGBA a cell of this worst/tolerance is painted with."""
    import matplotlib
    from matplotlib import colors

    if np.isnan(worst):
        return BAD
    norm = colors.LogNorm(VMIN, VMAX, clip=True)
    return tuple(float(c) for c in matplotlib.colormaps[CMAP](norm(float(_clip(worst)))))


def _clip(worst: Any) -> Any:
    """Worst/tolerance on the colour scale: 0 (bit for bit) at its bottom, inf
    at its top, NaN (no such intermediate) kept."""
    w = np.asarray(worst, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(w), np.nan, np.clip(np.where(w > 0, w, VMIN), VMIN, VMAX))


def title(report: Any) -> str:
    """``first failing layer: 2 (3 of 48 layers fail)`` or ``all 48 layers within tolerance``."""
    layers, _, worst = report.cells()
    failing = [layers[i] for i in range(len(layers)) if np.nanmax(worst[i], initial=0) > 1]
    if failing:
        head = f"first failing layer: {failing[0]} ({len(failing)} of {len(layers)} layers fail)"
    else:
        head = f"all {len(layers)} layers within tolerance"
    return head


def render(report: Any, path: str | Path, *, dpi: int = 100) -> Drawn:
    """Draw ``report`` (`ckptconv.verify.Report` with numbers) to ``path``."""
    require(path)
    import matplotlib.pyplot as plt
    from matplotlib import colors

    path = Path(path)
    layers, names, worst = report.cells()
    if not layers:
        raise VerifyError("--plot: no per-layer intermediates were compared; nothing to draw.")
    n_l, n_n = len(layers), len(names)
    cell = 0.42  # inches
    labels = 0.3 + 0.047 * max(len(n) for n in names)  # rotated column names
    left, right, top = 0.9, 1.5, 0.9
    width = max(5.0, left + cell * n_n + right)
    height = top + cell * n_l + labels + 0.1
    fig = plt.figure(figsize=(width, height), dpi=dpi)
    ax = fig.add_axes((left / width, (labels + 0.1) / height, cell * n_n / width, cell * n_l / height))
    cmap = plt.get_cmap(CMAP).with_extremes(bad=BAD)
    shown = np.ma.masked_invalid(_clip(worst))
    im = ax.imshow(
        shown, cmap=cmap, norm=colors.LogNorm(VMIN, VMAX, clip=True), aspect="auto",
        interpolation="nearest", origin="upper",
    )
    ax.set_yticks(range(n_l), [str(v) for v in layers])
    ax.set_xticks(range(n_n), names, rotation=90, fontsize=7)
    ax.set_ylabel("layer")
    fail = np.nan_to_num(worst, nan=0.0) > 1
    marked = [(int(i), int(j)) for i, j in zip(*np.nonzero(fail))]
    if marked:
        ys, xs = zip(*marked)
        ax.scatter(xs, ys, s=(cell * 72 * 0.38) ** 2, c="black", marker="o", linewidths=0)
    text = title(report)
    outside = [r for r in report.rows if r.layer is None]
    if outside:
        bad = sum(not r.passed for r in outside)
        text += f"\n{len(outside)} values outside the layers: {bad} fail"
    if report.unmatched:
        text += f"; {len(report.unmatched)} in one form only"
    fig.suptitle(text, fontsize=10, y=1 - 0.15 / height, va="top")
    bar = fig.colorbar(im, cax=fig.add_axes(((left + cell * n_n + 0.15) / width, (labels + 0.1) / height,
                                             0.15 / width, max(cell * n_l, 1.2) / height)))
    bar.set_label("worst |Δ| / (atol + rtol·|loop|)")
    drawn = Drawn(layers, names, worst, marked=marked, title=text)
    fig.canvas.draw()
    w_px, h_px = fig.canvas.get_width_height()
    drawn.size = (int(w_px), int(h_px))
    to_px = ax.transData.transform
    drawn.centres = [
        [(float(x), float(h_px - y)) for x, y in (to_px((j, i)) for j in range(n_n))] for i in range(n_l)
    ]
    (x0, y0), (x1, y1) = to_px((0, 0)), to_px((1, 1))
    drawn.cell_px = (abs(x1 - x0), abs(y1 - y0))
    fmt = path.suffix.lower().lstrip(".")
    try:
        fig.savefig(path, format=fmt, dpi=dpi)
    except OSError as e:
        raise VerifyError(f"--plot {path}: cannot write it ({e.strerror or e}).") from e
    finally:
        plt.close(fig)
    return drawn

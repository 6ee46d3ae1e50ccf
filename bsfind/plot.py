"""``bsfind recommend --plot``: predicted time and cost vs batch size.

matplotlib is optional (``pip install 'bsfind[plot]'``) and imported only
here, lazily, through the object-oriented API with the Agg canvas: no pyplot,
no global backend switch, no window, safe on a headless CI runner.

    .venv/bin/python -m pytest tests/test_plot.py -q
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

from bsfind.cache import atomic_write_bytes
from bsfind.results import Candidate

FORMATS = {".png": "png", ".svg": "svg"}
MISSING = "--plot needs matplotlib: pip install 'bsfind[plot]'"
DPI = 120


def plot_candidates(candidates: Sequence[Candidate], path: Path, *, title: str) -> Path:
    """Plot the candidates' predicted time, cost and steps ratios (log x axis).

    The baseline and the recommendation are marked. Rows without a step-time
    prediction (NaN ratios) leave gaps; the steps ratio S(B)/S(B0) is always
    drawn. The file is written atomically.

    Args:
        candidates: the advisor's table.
        path: where to write; the suffix (.png or .svg) picks the format.
        title: the figure's title.

    Returns:
        ``path``.

    Raises:
        ValueError: unsupported suffix or no candidates.
        ImportError: matplotlib is not installed (the message says how to fix it).
    """
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"unsupported file type {path.suffix or '(none)'!r}; "
                         "use .png or .svg")
    if not candidates:
        raise ValueError("no candidates to plot")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError as exc:
        raise ImportError(MISSING) from exc

    rows = sorted(candidates, key=lambda c: c.batch_size)
    xs = [c.batch_size for c in rows]
    fig = Figure(figsize=(7.0, 4.2), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    same_cost = all(c.cost_ratio == c.time_ratio or not math.isfinite(c.time_ratio)
                    for c in rows)
    ax.plot(xs, [c.time_ratio for c in rows], "o-",
            label="wall-clock time = cost (predicted)" if same_cost
            else "wall-clock time (predicted)")
    if not same_cost:
        ax.plot(xs, [c.cost_ratio for c in rows], "s--", label="cost (predicted)", alpha=0.8)
    ax.plot(xs, [c.steps_ratio for c in rows], ":", color="grey",
            label="optimizer steps S(B)/S(B0)")
    ax.axhline(1.0, color="black", linewidth=0.6)
    for c in rows:
        y = c.time_ratio if math.isfinite(c.time_ratio) else c.steps_ratio
        if c.is_baseline:
            ax.axvline(c.batch_size, color="tab:grey", linestyle="--", linewidth=0.8)
            ax.annotate(f"baseline {c.batch_size}", (c.batch_size, y),
                        textcoords="offset points", xytext=(4, 8), fontsize=8)
        if c.is_recommended:
            ax.plot([c.batch_size], [y], marker="*", markersize=16, color="tab:red",
                    linestyle="none", label=f"recommended {c.batch_size}")
        if not c.fits:
            ax.plot([c.batch_size], [y], marker="x", color="tab:orange", linestyle="none")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.set_yscale("log")
    ax.set_xlabel("batch size (× marks gradient accumulation)")
    ax.set_ylabel("ratio to the baseline")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    atomic_write_bytes(path, buf.getvalue())
    return path

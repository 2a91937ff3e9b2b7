"""The pictures of ``factkeeper report``: audit figures against the number of edits applied.

Kept apart from the page itself so the HTML module reads as data → table → page and this one as
series → axes → PNG. It draws on ``matplotlib.figure.Figure`` objects with an explicit Agg canvas,
never through ``pyplot``: pyplot keeps a global figure registry and a current backend, and a
report may be rendered inside the long-running daemon. The look follows
``editing.bench_report.plot_curves`` (ratios on a 0-1 axis, light grid, "edits applied" on x,
110 dpi) so benchmark and audit plots read alike. Matplotlib is imported inside the functions, as
there, because it is slow to import and only this command needs it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 110
RATIO_LIMITS = (-0.02, 1.02)
RETENTION_COLOR = "tab:blue"
TOKEN_COLOR = "tab:cyan"
LOCALITY_COLOR = "tab:green"
DRIFT_COLOR = "tab:purple"
FAILED_COLOR = "tab:red"
PASS_COLOR = "#2e7d32"
FAIL_COLOR = "#c62828"
UNKNOWN_COLOR = "#757575"


@dataclass(frozen=True)
class AuditSeries:
    """One point per audit that says how many edits it covered, ordered by edits then time.

    Ordering by edits (not by time) makes the charts a curve of figures against edits: after a
    rollback the next audit sits at a smaller edit count again instead of drawing a line back.
    ``None`` marks a figure the audit did not report; the thresholds are the latest audit's.
    """

    edits: tuple[int, ...]
    retention: tuple[float | None, ...]
    token_accuracy: tuple[float | None, ...]
    ci_low: tuple[float | None, ...]
    ci_high: tuple[float | None, ...]
    locality: tuple[float | None, ...]
    drift: tuple[float | None, ...]
    failed: tuple[bool, ...]
    retention_floor: float | None = None
    locality_floor: float | None = None
    max_drift: float | None = None

    def __len__(self) -> int:
        return len(self.edits)


def chart_png(figure: Figure) -> bytes:
    """The figure as PNG bytes (Agg canvas, ``DPI``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def retention_figure(series: AuditSeries) -> Figure:
    """Chart 1: retention exact match with its 95% CI, and token accuracy, against edits."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.4), layout="constrained")
    draw_retention(figure.add_subplot(), series)
    return figure


def locality_figure(series: AuditSeries) -> Figure:
    """Chart 2: locality agreement and perplexity drift against edits, side by side.

    Two panels rather than a twin axis: agreement is a ratio and drift a signed relative change,
    and one shared plot would make either scale unreadable.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.4), layout="constrained")
    locality_ax, drift_ax = figure.subplots(1, 2, sharex=True)
    draw_locality(locality_ax, series)
    draw_drift(drift_ax, series)
    return figure


def summary_figure(
    series: AuditSeries, title: str, lines: Sequence[str], passed: bool | None
) -> Figure:
    """The page's headline and charts as one picture (for the README), or text only.

    Args:
        series: the audit points; with none, the figure holds the text and no axes.
        title: first line (model, versions).
        lines: further headline lines (latest audit figures, gate reasons).
        passed: the latest gate outcome, drawn as a coloured badge; ``None`` draws none.
    """
    from matplotlib.figure import Figure

    header_inches = 0.45 + 0.3 * (len(lines) + 1)
    height = header_inches + (3.6 if len(series) else 0.0)
    figure = Figure(figsize=(13, height))
    top = 1 - 0.25 / height
    # parse_math=False: model names and gate reasons may hold '$', which would start mathtext.
    figure.text(0.01, top, title, fontsize=13, weight="bold", va="top", parse_math=False)
    if passed is not None:
        figure.text(
            0.99,
            top,
            "GATE PASSED" if passed else "GATE FAILED",
            fontsize=12,
            weight="bold",
            color="white",
            ha="right",
            va="top",
            bbox={"facecolor": PASS_COLOR if passed else FAIL_COLOR, "edgecolor": "none"},
        )
    for i, line in enumerate(lines, start=1):
        y = top - 0.3 * i / height
        figure.text(0.01, y, line, fontsize=10, va="top", parse_math=False)
    if len(series):
        axes = figure.subplots(1, 3)
        draw_retention(axes[0], series)
        draw_locality(axes[1], series)
        draw_drift(axes[2], series)
        figure.subplots_adjust(
            left=0.05,
            right=0.99,
            bottom=0.5 / height,
            top=1 - (header_inches + 0.15) / height,
            wspace=0.22,
        )
    return figure


def write_summary_png(
    path: Path, series: AuditSeries, title: str, lines: Sequence[str], passed: bool | None
) -> Path:
    """Render ``summary_figure`` to ``path`` (parent folders are created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(chart_png(summary_figure(series, title, lines, passed)))
    return path


# -- panels --------------------------------------------------------------------------------------


def draw_retention(ax: Axes, series: AuditSeries) -> None:
    """Retention exact match (line, CI band), token accuracy, failed gates, the floor."""
    x = list(series.edits)
    ax.fill_between(
        x,
        _nan(series.ci_low),
        _nan(series.ci_high),
        color=RETENTION_COLOR,
        alpha=0.18,
        linewidth=0,
        label="retention 95% CI",
    )
    if len(series) == 1:  # a band of one point has no width: show the interval as a bar
        low, high = series.ci_low[0], series.ci_high[0]
        if low is not None and high is not None:
            ax.vlines(x, [low], [high], color=RETENTION_COLOR, alpha=0.4, linewidth=6)
    ax.plot(x, _nan(series.retention), marker="o", color=RETENTION_COLOR, label="exact match")
    ax.plot(
        x,
        _nan(series.token_accuracy),
        marker="s",
        markersize=3,
        linewidth=1,
        color=TOKEN_COLOR,
        label="token accuracy",
    )
    _mark_failed(ax, series, series.retention)
    _threshold(ax, series.retention_floor, "retention floor")
    _finish(ax, "retention: applied edits that still hold", ratio=True)


def draw_locality(ax: Axes, series: AuditSeries) -> None:
    """Locality agreement with the base model's answers, failed gates, the floor."""
    ax.plot(
        list(series.edits),
        _nan(series.locality),
        marker="o",
        color=LOCALITY_COLOR,
        label="agreement",
    )
    _mark_failed(ax, series, series.locality)
    _threshold(ax, series.locality_floor, "locality floor")
    _finish(ax, "locality: unrelated probes keep base answers", ratio=True)


def draw_drift(ax: Axes, series: AuditSeries) -> None:
    """Perplexity drift (relative change against the base), failed gates, the allowed maximum."""
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.plot(list(series.edits), _nan(series.drift), marker="o", color=DRIFT_COLOR, label="drift")
    _mark_failed(ax, series, series.drift)
    _threshold(ax, series.max_drift, "max drift")
    _finish(ax, "perplexity drift vs base (relative)", ratio=False)


def _nan(values: Sequence[float | None]) -> list[float]:
    """Missing figures become NaN, which matplotlib leaves as gaps."""
    return [math.nan if v is None else v for v in values]


def _mark_failed(ax: Axes, series: AuditSeries, values: Sequence[float | None]) -> None:
    points = [
        (x, y)
        for x, y, failed in zip(series.edits, values, series.failed, strict=True)
        if failed and y is not None
    ]
    if points:
        xs, ys = zip(*points, strict=True)
        ax.scatter(xs, ys, marker="X", s=70, color=FAILED_COLOR, zorder=5, label="gate failed")


def _threshold(ax: Axes, value: float | None, name: str) -> None:
    if value is not None:
        ax.axhline(value, linestyle="--", linewidth=1, color="grey", label=f"{name} {value:g}")


def _finish(ax: Axes, title: str, *, ratio: bool) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("edits applied")
    if ratio:
        ax.set_ylim(*RATIO_LIMITS)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")

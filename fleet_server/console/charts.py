"""Charts drawn on the server as inline SVG.

No charting library reaches the browser: a page's charts arrive with the page, already
downsampled, and the console's policy forbids scripts and styles from anywhere but the
server. Colours come from classes in console.css, never inline styles, which that policy
would block.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 640, 170
LEFT, RIGHT, TOP, BOTTOM = 48, 8, 10, 22


@dataclass(frozen=True)
class Series:
    name: str
    css: str  # the class that colours it: s1, s2, s3
    points: Sequence[tuple[float, float | None]]  # (unix seconds, value); None: no data


def _nice_top(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above `value`."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return float(step * power)
    return 10.0 * power


def _number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _time_label(seconds: float, span: float) -> str:
    moment = dt.datetime.fromtimestamp(seconds, dt.UTC)
    return moment.strftime("%H:%M" if span <= 86_400 else "%d %b %H:%M")


def line_chart(
    series: Sequence[Series],
    start: float,
    end: float,
    *,
    unit: str = "",
    y_max: float | None = None,
    title: str,
) -> Markup:
    """Lines over [start, end] (unix seconds), broken where a bucket has no data."""
    values = [v for s in series for _, v in s.points if v is not None and math.isfinite(v)]
    top = y_max if y_max is not None else _nice_top(max(values, default=0.0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    span = max(end - start, 1.0)

    def x(t: float) -> float:
        return LEFT + (t - start) / span * plot_w

    def y(v: float) -> float:
        return TOP + plot_h - min(max(v, 0.0), top) / top * plot_h

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>'
    ]
    for i in range(5):
        level = top * i / 4
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(level):.1f}" '
            f'y2="{y(level):.1f}"/><text class="axis" x="{LEFT - 4}" y="{y(level) + 4:.1f}" '
            f'text-anchor="end">{_number(level)}{escape(unit) if i == 4 else ""}</text>'
        )
    for i in range(5):
        t = start + span * i / 4
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        parts.append(
            f'<text class="axis" x="{x(t):.1f}" y="{HEIGHT - 6}" text-anchor="{anchor}">'
            f"{_time_label(t, span)}</text>"
        )
    for s in series:
        for run in _runs(s.points):
            if len(run) == 1:
                t, v = run[0]
                parts.append(f'<circle class="{s.css}" cx="{x(t):.1f}" cy="{y(v):.1f}" r="2"/>')
                continue
            coordinates = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in run)
            parts.append(f'<polyline class="line {s.css}" points="{coordinates}"/>')
    if not values:
        parts.append(
            f'<text class="empty" x="{LEFT + plot_w / 2}" y="{TOP + plot_h / 2}" '
            'text-anchor="middle">no data in this range</text>'
        )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key {s.css}">{escape(s.name)}</span>' for s in series if len(series) > 1
    )
    return Markup("".join(parts) + (f'<div class="legend">{legend}</div>' if legend else ""))


def _runs(points: Sequence[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    runs: list[list[tuple[float, float]]] = [[]]
    for t, v in points:
        if v is None or not math.isfinite(v):
            if runs[-1]:
                runs.append([])
            continue
        runs[-1].append((t, v))
    return [run for run in runs if run]


def gate_bar(measured: float | None, threshold: float, verdict: str, *, upper: bool) -> Markup:
    """A gate's measured value beside its threshold. `upper`: the threshold is a maximum
    (an error rate) rather than a minimum (an agreement)."""
    width, height, pad = 220, 18, 2
    top = _nice_top(max(abs(threshold), abs(measured or 0.0)) * 1.25 or 1.0)

    def x(v: float) -> float:
        return pad + min(max(v, 0.0), top) / top * (width - 2 * pad)

    parts = [
        f'<svg class="gate" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="measured {_number(measured) if measured is not None else "none"} '
        f'against {"at most" if upper else "at least"} {_number(threshold)}">',
        f'<rect class="track" x="0" y="0" width="{width}" height="{height}"/>',
    ]
    if measured is not None and math.isfinite(measured):
        parts.append(
            f'<rect class="bar {escape(verdict)}" x="{pad}" y="4" '
            f'width="{max(x(measured) - pad, 1):.1f}" height="{height - 8}"/>'
        )
    parts.append(
        f'<line class="limit" x1="{x(threshold):.1f}" x2="{x(threshold):.1f}" y1="0" '
        f'y2="{height}"/></svg>'
    )
    return Markup("".join(parts))


def share_bar(parts: Sequence[tuple[str, int, str]]) -> Markup:
    """One stacked bar: (label, count, css class) each taking its share of the width."""
    total = sum(count for _, count, _ in parts)
    width, height = 300, 14
    shapes = [f'<svg class="share" viewBox="0 0 {width} {height}" role="img">']
    offset = 0.0
    for label, count, css in parts:
        if total == 0 or count == 0:
            continue
        w = count / total * width
        shapes.append(
            f'<rect class="{escape(css)}" x="{offset:.1f}" y="0" width="{w:.1f}" '
            f'height="{height}"><title>{escape(label)}: {count}</title></rect>'
        )
        offset += w
    if total == 0:
        shapes.append(f'<rect class="track" x="0" y="0" width="{width}" height="{height}"/>')
    shapes.append("</svg>")
    return Markup("".join(shapes))

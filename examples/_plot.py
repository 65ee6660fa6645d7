"""The demo's curves: a PNG drawn by matplotlib (the ``examples`` extra), braille charts for the terminal.

``render_png`` needs matplotlib (``pip install 'hpcai_async[examples]'``; ``make demo`` installs it) and draws
on its Agg backend, so it needs no display. Without matplotlib it returns None and the demo shows only the
terminal charts (``braille_chart``, ``sparkline``), which need nothing but the standard library.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ("BLUE", "ORANGE", "Panel", "braille_chart", "ema", "have_matplotlib", "render_png", "sparkline")

BLUE = "#1f77b4"  # matplotlib's first two default colours ("tab:blue", "tab:orange")
ORANGE = "#e6781a"


@dataclass
class Panel:
    """One chart: a title, a series (x defaults to 1..n), and how to draw it."""

    title: str
    ys: Sequence[float]
    xs: Sequence[float] | None = None
    xlabel: str = "step"
    color: str = BLUE
    # A noisy series (per-step loss) is drawn pale, with its exponential moving average on top.
    smooth: float | None = None
    ylim: tuple[float, float] | None = None
    markers: bool = False
    extra: list[tuple[Sequence[float], str]] = field(default_factory=list)


def ema(values: Sequence[float], alpha: float) -> list[float]:
    """Exponential moving average, bias-corrected so that the first values are not pulled towards zero."""
    out: list[float] = []
    avg = 0.0
    for i, v in enumerate(values):
        avg = alpha * avg + (1 - alpha) * v
        out.append(avg / (1 - alpha ** (i + 1)))
    return out


# --------------------------------------------------------------------------------------------- PNG


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display), or None when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def have_matplotlib() -> bool:
    return _pyplot() is not None


def _draw(ax: Any, panel: Panel) -> None:
    xs = list(panel.xs) if panel.xs is not None else list(range(1, len(panel.ys) + 1))
    style = {"marker": "o", "markersize": 4} if panel.markers else {}
    if panel.smooth is not None:
        ax.plot(xs, panel.ys, color=panel.color, alpha=0.35, linewidth=1.2)
        ax.plot(xs, ema(panel.ys, panel.smooth), color=panel.color, linewidth=2.2, **style)
    else:
        ax.plot(xs, panel.ys, color=panel.color, linewidth=2.2, **style)
    for series, color in panel.extra:
        ax.plot(xs[: len(series)], series, color=color, linewidth=1.5)
    ax.set_title(panel.title)
    ax.set_xlabel(panel.xlabel)
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    ax.grid(True, color="#e4e4e4")
    ax.spines[["top", "right"]].set_visible(False)


def render_png(
    path: str | Path, panels: Sequence[Panel], panel_size: tuple[int, int] = (560, 380)
) -> Path | None:
    """Draw ``panels`` side by side into the PNG ``path`` (``panel_size`` pixels each); None without
    matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    dpi = 100
    width, height = panel_size
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels) / dpi, height / dpi), dpi=dpi)
    try:
        for ax, panel in zip([axes] if len(panels) == 1 else axes, panels, strict=True):
            _draw(ax, panel)
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)
    finally:
        plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------- terminal

_SPARKS = "▁▂▃▄▅▆▇█"
# Braille dot bits: (column, row) -> bit, for a 2-wide, 4-tall cell (Unicode U+2800 block).
_BRAILLE = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))


def _unicode_ok() -> bool:
    try:
        "⣿▁".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _resample(values: Sequence[float], n: int) -> list[float]:
    """Average ``values`` into ``n`` bins (or stretch them when there are fewer than ``n``)."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return []
    if len(vals) == 1:
        return vals * n
    if len(vals) <= n:
        # stretch by linear interpolation, so a short series still reads as a line, not as stairs
        out = []
        for i in range(n):
            t = i * (len(vals) - 1) / (n - 1)
            k = min(int(t), len(vals) - 2)
            out.append(vals[k] + (vals[k + 1] - vals[k]) * (t - k))
        return out
    out = []
    for i in range(n):
        a, b = i * len(vals) // n, max((i + 1) * len(vals) // n, i * len(vals) // n + 1)
        out.append(sum(vals[a:b]) / (b - a))
    return out


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """One line of block characters (``▁▂▃▄▅▆▇█``; ASCII digits where the terminal cannot show them)."""
    vals = _resample(values, min(width, len(values)))
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    chars = _SPARKS if _unicode_ok() else "_.-~=+*#"
    span = hi - lo or 1.0
    return "".join(chars[min(int((v - lo) / span * len(chars)), len(chars) - 1)] for v in vals)


def braille_chart(
    values: Sequence[float], title: str, width: int = 60, height: int = 8, xlabel: str = "step"
) -> str:
    """A small line chart in braille dots (2x4 dots per character) with its value range and length.

    Falls back to ``*`` characters when the terminal's encoding has no braille.
    """
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return f"{title}: (no data)"
    unicode = _unicode_ok()
    dots_x, dots_y = (width * 2, height * 4) if unicode else (width, height)
    pts = _resample(vals, dots_x)
    lo, hi = min(vals), max(vals)
    span = hi - lo or 1.0
    rows = [round((hi - v) / span * (dots_y - 1)) for v in pts]
    grid = [[0] * width for _ in range(height)]
    prev = rows[0]
    for x, r in enumerate(rows):
        # join consecutive points with a vertical run so steep drops stay connected
        for y in range(min(prev, r), max(prev, r) + 1) if x else (r,):
            if unicode:
                grid[y // 4][x // 2] |= _BRAILLE[y % 4][x % 2]
            else:
                grid[y][x] = 1
        prev = r
    hi_s, lo_s = _fmt_term(hi), _fmt_term(lo)
    pad = max(len(hi_s), len(lo_s))
    corner, vbar, hbar, tick = ("└", "│", "─", "┤") if unicode else ("+", "|", "-", "+")
    lines = [f"{' ' * pad}  {title}"]
    for i, row in enumerate(grid):
        label = hi_s if i == 0 else lo_s if i == height - 1 else ""
        edge = tick if label else vbar
        cells = "".join((chr(0x2800 + b) if unicode else "*") if b else " " for b in row)
        lines.append(f"{label:>{pad}} {edge}{cells}")
    footer = f"{len(vals)} {xlabel}s"
    lines.append(f"{' ' * pad} {corner}{hbar * (width - len(footer) - 1)} {footer}")
    return "\n".join(lines)


def _fmt_term(v: float) -> str:
    return f"{v:.3g}"

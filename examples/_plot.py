"""Curves without plotting libraries: a PNG (zlib + struct) and a braille chart for the terminal.

The demo ends with a loss curve and a reward curve. Pulling in matplotlib for two lines is not worth a
dependency, so this module rasterises them itself: nice axis ticks, a 5x7 bitmap font for the labels, thick
lines, and a hand-written PNG encoder (a PNG is a signature plus length/type/data/CRC chunks; the pixels are
zlib-compressed scanlines, each prefixed by a filter byte).
"""

from __future__ import annotations

import itertools
import math
import struct
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ("Panel", "braille_chart", "ema", "render_png", "sparkline", "write_png")

Color = tuple[int, int, int]

WHITE: Color = (255, 255, 255)
INK: Color = (40, 40, 40)
GRID: Color = (228, 228, 228)
AXIS: Color = (150, 150, 150)
BLUE: Color = (31, 119, 180)
ORANGE: Color = (230, 120, 20)
PALE_BLUE: Color = (170, 200, 230)
PALE_ORANGE: Color = (245, 200, 160)


@dataclass
class Panel:
    """One chart: a title, a series (x defaults to 1..n), and how to draw it."""

    title: str
    ys: Sequence[float]
    xs: Sequence[float] | None = None
    xlabel: str = "step"
    color: Color = BLUE
    # A noisy series (per-step loss) is drawn pale, with its exponential moving average on top.
    smooth: float | None = None
    pale: Color = PALE_BLUE
    ylim: tuple[float, float] | None = None
    markers: bool = False
    extra: list[tuple[Sequence[float], Color]] = field(default_factory=list)


def ema(values: Sequence[float], alpha: float) -> list[float]:
    """Exponential moving average, bias-corrected so that the first values are not pulled towards zero."""
    out: list[float] = []
    avg = 0.0
    for i, v in enumerate(values):
        avg = alpha * avg + (1 - alpha) * v
        out.append(avg / (1 - alpha ** (i + 1)))
    return out


# --------------------------------------------------------------------------------------------- PNG


def write_png(path: str | Path, width: int, height: int, rgb: bytes | bytearray) -> Path:
    """Write 8-bit RGB pixels (row-major, ``width * height * 3`` bytes) as a PNG file."""
    if len(rgb) != width * height * 3:
        raise ValueError(f"expected {width * height * 3} bytes of RGB, got {len(rgb)}")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    stride = width * 3
    # filter type 0 (None) on every scanline: the compressor does well enough on flat chart colours
    raw = b"".join(b"\x00" + bytes(rgb[y * stride : (y + 1) * stride]) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, colour type 2 (RGB)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
    png += chunk(b"IEND", b"")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(png)
    tmp.replace(out)
    return out


# 5x7 glyphs, one int per row, bit 4 = leftmost pixel. Lower case is drawn as upper case.
_FONT: dict[str, tuple[int, ...]] = {
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E),
    "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F),
    "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02),
    "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E),
    "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E),
    "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    "A": (0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11),
    "B": (0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E),
    "C": (0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E),
    "D": (0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C),
    "E": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F),
    "F": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10),
    "G": (0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F),
    "H": (0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "I": (0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "J": (0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C),
    "K": (0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11),
    "L": (0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F),
    "M": (0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11),
    "N": (0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11),
    "O": (0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E),
    "P": (0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10),
    "Q": (0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D),
    "R": (0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11),
    "S": (0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E),
    "T": (0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04),
    "U": (0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E),
    "V": (0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04),
    "W": (0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A),
    "X": (0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11),
    "Y": (0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04),
    "Z": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F),
    " ": (0, 0, 0, 0, 0, 0, 0),
    ".": (0, 0, 0, 0, 0, 0x0C, 0x0C),
    ",": (0, 0, 0, 0, 0x0C, 0x04, 0x08),
    ":": (0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0),
    "-": (0, 0, 0, 0x1F, 0, 0, 0),
    "+": (0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0),
    "=": (0, 0, 0x1F, 0, 0x1F, 0, 0),
    "/": (0, 0x01, 0x02, 0x04, 0x08, 0x10, 0),
    "(": (0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02),
    ")": (0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08),
    "%": (0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03),
    "_": (0, 0, 0, 0, 0, 0, 0x1F),
    "?": (0x0E, 0x11, 0x01, 0x02, 0x04, 0, 0x04),
}


class _Canvas:
    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.width, self.height = width, height
        self.px = bytearray(bytes(background) * (width * height))

    def dot(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.px[i : i + 3] = bytes(color)

    def fill(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        for y in range(max(y0, 0), min(y1, self.height)):
            row = (y * self.width) * 3
            for x in range(max(x0, 0), min(x1, self.width)):
                self.px[row + x * 3 : row + x * 3 + 3] = bytes(color)

    def line(self, x0: float, y0: float, x1: float, y1: float, color: Color, thickness: int = 1) -> None:
        steps = max(int(max(abs(x1 - x0), abs(y1 - y0))), 1)
        r0 = -(thickness // 2)
        for i in range(steps + 1):
            x = round(x0 + (x1 - x0) * i / steps)
            y = round(y0 + (y1 - y0) * i / steps)
            for dy in range(r0, r0 + thickness):
                for dx in range(r0, r0 + thickness):
                    self.dot(x + dx, y + dy, color)

    def text(self, x: int, y: int, s: str, color: Color = INK, scale: int = 2) -> None:
        for ch in s.upper():
            glyph = _FONT.get(ch, _FONT["?"])
            for row, bits in enumerate(glyph):
                for col in range(5):
                    if bits & (0x10 >> col):
                        self.fill(
                            x + col * scale,
                            y + row * scale,
                            x + (col + 1) * scale,
                            y + (row + 1) * scale,
                            color,
                        )
            x += 6 * scale

    @staticmethod
    def text_width(s: str, scale: int = 2) -> int:
        return len(s) * 6 * scale - scale


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks: list[float] = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:.2f}".rstrip("0").rstrip(".") if abs(v) < 10 else f"{v:.0f}"


def _bounds(values: Sequence[float], ylim: tuple[float, float] | None) -> tuple[float, float]:
    if ylim is not None:
        return ylim
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _draw_panel(canvas: _Canvas, ox: int, oy: int, w: int, h: int, panel: Panel) -> None:
    left, right, top, bottom = 78, 22, 44, 56
    px0, py0, px1, py1 = ox + left, oy + top, ox + w - right, oy + h - bottom
    canvas.text(ox + (w - _Canvas.text_width(panel.title)) // 2, oy + 12, panel.title)

    ys = list(panel.ys)
    xs = list(panel.xs) if panel.xs is not None else [float(i + 1) for i in range(len(ys))]
    ylo, yhi = _bounds(ys + [v for series, _ in panel.extra for v in series], panel.ylim)
    xlo, xhi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if xhi <= xlo:
        xlo, xhi = xlo - 0.5, xhi + 0.5

    def sx(x: float) -> float:
        return px0 + (x - xlo) / (xhi - xlo) * (px1 - px0)

    def sy(y: float) -> float:
        return py1 - (y - ylo) / (yhi - ylo) * (py1 - py0)

    for t in nice_ticks(ylo, yhi):
        y = round(sy(t))
        canvas.line(px0, y, px1, y, GRID)
        label = _fmt(t)
        canvas.text(px0 - 8 - _Canvas.text_width(label), y - 7, label)
    for t in nice_ticks(xlo, xhi, 6):
        x = round(sx(t))
        canvas.line(x, py1, x, py1 + 5, AXIS)
        label = _fmt(t)
        canvas.text(x - _Canvas.text_width(label) // 2, py1 + 10, label)
    canvas.text((px0 + px1 - _Canvas.text_width(panel.xlabel)) // 2, py1 + 32, panel.xlabel, AXIS)
    canvas.line(px0, py0, px0, py1, AXIS)
    canvas.line(px0, py1, px1, py1, AXIS)

    def polyline(series: Sequence[float], color: Color, thickness: int) -> None:
        pts = [(sx(x), sy(y)) for x, y in zip(xs, series, strict=False) if math.isfinite(y)]
        for (xa, ya), (xb, yb) in itertools.pairwise(pts):
            canvas.line(xa, ya, xb, yb, color, thickness)
        if panel.markers or len(pts) == 1:
            for x, y in pts:
                canvas.fill(round(x) - 3, round(y) - 3, round(x) + 4, round(y) + 4, color)

    for series, color in panel.extra:
        polyline(series, color, 2)
    if panel.smooth is not None and len(ys) > 2:
        polyline(ys, panel.pale, 1)
        polyline(ema(ys, panel.smooth), panel.color, 3)
    else:
        polyline(ys, panel.color, 3)


def render_png(path: str | Path, panels: Sequence[Panel], panel_size: tuple[int, int] = (560, 380)) -> Path:
    """Draw the panels side by side and write them as one PNG; returns the path written."""
    w, h = panel_size
    canvas = _Canvas(w * len(panels), h)
    for i, panel in enumerate(panels):
        _draw_panel(canvas, i * w, 0, w, h, panel)
    return write_png(path, canvas.width, canvas.height, canvas.px)


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

"""The progress bar of downloads: ``name [#####.......]  3.1/5.2 MB  1.2 MB/s``, redrawn in place.

One bar for the CLI (``hpcai-async checkpoints download``) and ``RestClient.download_checkpoint_archive(...,
show_progress=True)``. It is the download's progress callback, ``bar(bytes_so_far, total_or_None)``.
"""

from __future__ import annotations

import time
from typing import IO

__all__ = ("ProgressBar",)

_REDRAW_S = 0.1  # at most ten redraws a second: a fast download must not spend its time drawing
_WIDTH = 24


class ProgressBar:
    """Draws on ``stream`` when ``enabled`` (and, with ``tty_only``, only when the stream is a terminal)."""

    def __init__(self, label: str, stream: IO[str], enabled: bool = True, *, tty_only: bool = False) -> None:
        self.label, self.stream = label, stream
        self.enabled = enabled and (stream.isatty() or not tty_only)
        self.written = 0
        self.total: int | None = None
        self.start = time.monotonic()
        self._drawn = 0.0

    def __call__(self, written: int, total: int | None) -> None:
        """Bytes written so far, and the total if the server said it."""
        self.written, self.total = written, total
        now = time.monotonic()
        if self.enabled and (now - self._drawn >= _REDRAW_S or written == total):
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.written / max(now - self.start, 1e-6)
        size = _mb(self.written) + (f"/{_mb(self.total)}" if self.total else "") + " MB"
        bar = ""
        if self.total:
            filled = int(_WIDTH * min(self.written / self.total, 1.0))
            bar = "[" + "#" * filled + "." * (_WIDTH - filled) + "] "
        self.stream.write(f"\r{self.label} {bar}{size}  {_mb(rate)} MB/s ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._drawn:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"

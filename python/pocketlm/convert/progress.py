"""A one-line progress bar on stderr: tensors done/total, megabytes written, ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """Redraws at most every `interval` seconds on a terminal; elsewhere (a log file, CI) prints a
    plain line every 10% so the output stays readable."""

    def __init__(self, label: str, n_tensors: int, stream: TextIO | None = None, interval: float = 0.1,
                 width: int = 24):
        self.label = label
        self.n_tensors = n_tensors
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.tensors_done = 0
        self.bytes_done = 0
        self.bytes_total = 0
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1

    def tensor_started(self, index: int) -> None:
        self.tensors_done = index  # tensors before this one are fully written
        self._draw()

    def bytes_written(self, done: int, total: int) -> None:
        self.bytes_done, self.bytes_total = done, total
        self._draw()

    def finish(self) -> None:
        """Final line: 100% after a complete write; where it stopped after a failure."""
        if self.bytes_total and self.bytes_done >= self.bytes_total:
            self.tensors_done = self.n_tensors
        self._draw(force=True)
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()

    def _line(self) -> str:
        frac = self.bytes_done / self.bytes_total if self.bytes_total else 0.0
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.monotonic() - self.start
        if self.bytes_done >= self.bytes_total and self.bytes_total:
            eta = f"done in {_clock(elapsed)}"
        elif frac > 0.01:
            eta = f"ETA {_clock(elapsed * (1 - frac) / frac)}"
        else:
            eta = "ETA --:--"
        mb = 1024 * 1024
        return (f"{self.label} [{bar}] {frac * 100:5.1f}%  tensors {self.tensors_done}/{self.n_tensors}  "
                f"{self.bytes_done / mb:.1f}/{self.bytes_total / mb:.1f} MB  {eta}")

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            if force or now - self._last_draw >= self.interval:
                self._last_draw = now
                self.stream.write("\r" + self._line() + "\x1b[K")
                self.stream.flush()
            return
        # Deciles 0..9 while writing; the 100% line comes from finish(), with every tensor counted.
        decile = min(9, int(10 * self.bytes_done / self.bytes_total)) if self.bytes_total else 0
        if force or decile > self._last_decile:
            self._last_decile = decile
            self.stream.write(self._line() + "\n")
            self.stream.flush()

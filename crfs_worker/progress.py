"""A one-line progress bar on stderr, for long conversions.

Shown only when stdout is a terminal (a script reading our stdout wants no
noise, and a log file wants no carriage returns); otherwise every call is a no-op.
"""
from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

_REFRESH_S = 0.1  # redraw at most this often; the bar is for eyes, not for logs


@dataclass
class ProgressTask:
    """Progress of one unit of work (a layer) of `total` bytes (None if unknown)."""

    label: str
    total: int | None
    stream: TextIO | None          # None: disabled
    done: int = 0
    _started: float = field(default_factory=time.monotonic)
    _drawn: float = 0.0

    def advance(self, count: int) -> None:
        self.done += count
        if self.stream is not None and time.monotonic() - self._drawn >= _REFRESH_S:
            self._draw()

    def finish(self, note: str = "") -> None:
        if self.stream is None:
            return
        if self.total is not None:
            self.done = self.total
        self._draw(note)
        self.stream.write("\n")
        self.stream.flush()

    def _draw(self, note: str = "") -> None:
        assert self.stream is not None
        self._drawn = time.monotonic()
        elapsed = max(self._drawn - self._started, 1e-6)
        rate = f"{self.done / elapsed / 1e6:6.1f} MB/s"
        amount = f"{self.done / 1e6:8.1f}" + (f"/{self.total / 1e6:.1f} MB" if self.total else " MB")
        width = shutil.get_terminal_size((80, 20)).columns
        text = f"{self.label} {amount} {rate} {note}".rstrip()
        if self.total:
            # The bar keeps its width when a note appears at the end.
            bar_width = min(30, max(width - len(f"{self.label} {amount} {rate}") - 24, 0))
            filled = min(bar_width, bar_width * self.done // self.total)
            if bar_width >= 10:
                text = f"{self.label} [{'#' * filled}{'.' * (bar_width - filled)}] " \
                       f"{amount} {rate} {note}".rstrip()
        self.stream.write("\r" + text[: width - 1])
        self.stream.flush()


@dataclass(frozen=True)
class Progress:
    """Makes ProgressTasks; `Progress.for_terminal()` decides whether to draw."""

    stream: TextIO | None = None

    @classmethod
    def for_terminal(cls) -> "Progress":
        return cls(sys.stderr if sys.stdout.isatty() else None)

    @classmethod
    def disabled(cls) -> "Progress":
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self.stream is not None

    def task(self, label: str, total: int | None) -> ProgressTask:
        return ProgressTask(label, total, self.stream)

    def message(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(text + "\n")
            self.stream.flush()

"""A progress bar on stderr, with no dependency.

On a terminal it redraws one line (`[#####.....] 12/40  3m10s left  WAN N=20 websocket`);
elsewhere (CI logs, pipes) it prints one line per step. The estimate of the time left
is the mean time per finished step times the steps left.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """Call the object with a label when a step starts; `close()` at the end."""

    def __init__(
        self, total: int, *, stream: TextIO | None = None, enabled: bool = True, width: int = 24
    ) -> None:
        self.total = max(total, 1)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.width = width
        self.done = -1
        self.started = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def __call__(self, label: str) -> None:
        self.done = min(self.done + 1, self.total)
        if self.enabled:
            self._draw(label)

    def _draw(self, label: str) -> None:
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.monotonic() - self.started
        left = ""
        if 0 < self.done < self.total:
            left = f"  {_duration(elapsed / self.done * (self.total - self.done))} left"
        line = f"[{bar}] {self.done}/{self.total}{left}  {label}"
        if self.tty:
            self.stream.write("\r\x1b[2K" + line[:200])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A message on its own line (the bar is redrawn by the next step)."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[2K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.done = self.total
        self._draw(f"done in {_duration(time.monotonic() - self.started)}")
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()

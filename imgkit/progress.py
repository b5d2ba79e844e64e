"""Progress reporting for long work: a bar with rate and ETA on a terminal, JSON lines for scripts,
or nothing (see ../shared cli.md). Always on stderr, so stdout stays clean for --json."""
from __future__ import annotations

import json
import sys
import time

from .units import format_size


class Progress:
    def __init__(self, op: str, total: int, mode: str = "auto", stream=None):
        self.op, self.total, self.done = op, total, 0
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "none"
        self.mode = mode
        self.start = time.monotonic()
        self._last = 0.0
        self._finished = False

    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last < (0.2 if self.mode == "bar" else 1.0):
            return
        self._last = now
        self._emit()

    def _emit(self) -> None:
        if self.mode == "json":
            self.stream.write(json.dumps({"op": self.op, "done": self.done, "total": self.total,
                                          "rate": int(self.rate())}) + "\n")
            self.stream.flush()
        elif self.mode == "bar":
            frac = self.done / self.total if self.total else 1.0
            rate = self.rate()
            eta = (self.total - self.done) / rate if rate > 0 else 0
            width = 30
            bar = "#" * int(frac * width)
            self.stream.write(f"\r{self.op}: [{bar:<{width}}] {frac * 100:5.1f}% "
                              f"{format_size(self.done)} / {format_size(self.total)} "
                              f"{format_size(int(rate))}/s ETA {int(eta) // 60}:{int(eta) % 60:02d} ")
            self.stream.flush()

    def finish(self, **extra) -> None:
        """The final `done` event (once: a restore that verifies after writing ends once)."""
        if self._finished:
            return
        self._finished = True
        if self.mode == "json":
            doc = {"op": self.op, "event": "done", "done": self.done, "total": self.total,
                   "rate": int(self.rate()), "seconds": round(time.monotonic() - self.start, 3)}
            doc.update(extra)
            self.stream.write(json.dumps(doc) + "\n")
            self.stream.flush()
        elif self.mode == "bar":
            self._emit()
            self.stream.write("\n")
            self.stream.flush()


class NullProgress(Progress):
    def __init__(self, op: str = "", total: int = 0):
        super().__init__(op, total, mode="none")

"""A small progress bar on stderr for `dtl-fast train` (no tqdm dependency).

On a terminal it redraws one line in place:

    epoch 3/20 |########------------| 640/1600 loss 0.4312 1834 samples/s 00:02<00:03

When stderr is not a terminal (a log file, CI, a pipe) every printed update is its own line,
throttled to one line per `line_interval` seconds plus the final line, so logs stay readable.
`enabled=False` (`--no-progress`) prints nothing.
"""
from __future__ import annotations

import math
import sys
import time


def format_seconds(seconds: float) -> str:
    """00:42, 12:03 or 1:02:03 (h:mm:ss past an hour); '--:--' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Items done out of `total`, the latest loss, items per second, elapsed and ETA.

    Args:
        total: items expected (samples, for training); > 0.
        desc: the line's prefix, e.g. "epoch 3/20".
        unit: what the items are ("samples").
        enabled: False prints nothing (`--no-progress`, or ranks other than 0 under DDP).
        stream: where to write (default sys.stderr, looked up when the bar is made).
        width: characters of the bar itself (terminal mode).
        min_interval: seconds between redraws on a terminal.
        line_interval: seconds between lines when the stream is not a terminal.
    """

    def __init__(self, total: int, desc: str = "", *, unit: str = "samples", enabled: bool = True,
                 stream=None, width: int = 24, min_interval: float = 0.1,
                 line_interval: float = 10.0):
        if total < 0:
            raise ValueError(f"Progress: total must be >= 0, got {total}")
        self.total = int(total)
        self.desc = desc
        self.unit = unit
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.min_interval = min_interval
        self.line_interval = line_interval
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.done = 0
        self.loss: float | None = None
        self.start = time.perf_counter()
        self._last_draw = -math.inf
        self._closed = False
        self._last_len = 0

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def render(self) -> str:
        """The current line, without newline or carriage return."""
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        parts = [self.desc] if self.desc else []
        if self.tty:
            filled = int(round(frac * self.width))
            parts.append("|" + "#" * filled + "-" * (self.width - filled) + "|")
        parts.append(f"{self.done}/{self.total}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        parts.append(f"{rate:.1f} {self.unit}/s")
        parts.append(f"{format_seconds(elapsed)}<{format_seconds(eta)}")
        return " ".join(parts)

    def update(self, n: int, loss: float | None = None) -> None:
        """Adds n finished items and, if given, the latest loss; redraws when it is time."""
        self.done += int(n)
        if loss is not None:
            self.loss = float(loss)
        if not self.enabled or self._closed:
            return
        now = time.perf_counter()
        interval = self.min_interval if self.tty else self.line_interval
        if now - self._last_draw >= interval and self.done < self.total:
            self._draw()
            self._last_draw = now

    def _draw(self, final: bool = False) -> None:
        line = self.render()
        if self.tty:
            pad = " " * max(0, self._last_len - len(line))
            self.stream.write("\r" + line + pad + ("\n" if final else ""))
            self._last_len = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draws the final state once (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self._draw(final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

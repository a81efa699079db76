"""Progress bars for dtl_fast: tqdm, set up the same way for every bar (training epochs, data set
checks, `data prepare`), so that they read well wherever stderr goes.

- On a terminal tqdm redraws one line in place, resized with the window.
- In Jupyter it is tqdm's notebook widget (tqdm.autonotebook), when ipywidgets is installed.
- Anywhere else (a log file, CI, a pipe) tqdm would write every redraw as a carriage return and
  a whole run would be one line of `\\r`-separated states. There each redraw becomes its own
  line, at most one per `LOG_INTERVAL` seconds, plus the first and the final line:

      epoch 3/20:  40%|####      | 640/1600 [00:30<00:45, 21.33 samples/s, loss 0.4312]

`progress_bar(..., enabled=False)` is a bar that prints nothing (`--no-progress`).
"""
from __future__ import annotations

import sys
import warnings

from tqdm.std import TqdmExperimentalWarning, tqdm

with warnings.catch_warnings():  # as tqdm.auto does: no "notebook mode" warning in Jupyter
    warnings.simplefilter("ignore", category=TqdmExperimentalWarning)
    from tqdm.autonotebook import tqdm as notebook_or_std_tqdm  # std tqdm outside Jupyter

# seconds between lines when the stream is not a terminal: a readable log, not a line per batch
LOG_INTERVAL = 30.0
# tqdm's default layout, but always items per second: tqdm turns a rate under 1/s into seconds
# per item ("1.10s/ samples"), which reads like another quantity in a log of samples/s lines
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"


def _isatty(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class LogLines:
    """A text stream for tqdm on a non-terminal: each redraw (written as "\\r" + line + padding)
    becomes its own line, and tqdm's closing newline (the line already has one) is dropped."""

    def __init__(self, stream):
        self._stream = stream
        self.encoding = getattr(stream, "encoding", None)

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self._stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        flush = getattr(self._stream, "flush", None)
        if flush is not None:
            flush()


def progress_bar(total: int | None = None, desc: str = "", *, unit: str = " samples",
                 enabled: bool = True, stream=None, log_interval: float | None = None,
                 **kwargs) -> tqdm:
    """A tqdm bar of `total` items (None: unknown) on `stream` (default: sys.stderr as it is
    now), set up for a terminal, a notebook or a log (see the module's docstring).

    unit: shown after the rate, e.g. " samples" gives "21.33 samples/s". enabled: False gives a
    disabled bar (prints nothing, `update` is a no-op). log_interval: seconds between lines when
    `stream` is not a terminal (>= 0; None: LOG_INTERVAL). kwargs: other tqdm arguments
    (initial, leave, postfix, ...).
    Raises ValueError for a negative log_interval."""
    log_interval = LOG_INTERVAL if log_interval is None else log_interval
    if not log_interval >= 0:
        raise ValueError(f"log_interval must be >= 0 seconds, got {log_interval!r}")
    layout = {} if total is None else {"bar_format": BAR_FORMAT}  # unknown total: tqdm's own
    common = dict(total=total, desc=desc, unit=unit, disable=not enabled, **dict(layout, **kwargs))
    if stream is None and notebook_or_std_tqdm is not tqdm:
        return notebook_or_std_tqdm(**common)  # Jupyter: the widget draws in the cell
    stream = sys.stderr if stream is None else stream
    if _isatty(stream):
        return tqdm(file=stream, dynamic_ncols=True, **common)
    # miniters=1: no adaptive skipping, so the interval alone sets the pace; maxinterval: tqdm's
    # monitor thread would otherwise force a redraw every 10 s
    return tqdm(file=LogLines(stream), ascii=True, mininterval=log_interval,
                maxinterval=max(log_interval, 1.0), miniters=1, **common)

"""Progress bars: every bar LLMasOS shows comes from `progress_bar`, which takes tqdm's arguments.

On a terminal it is tqdm as it is, redrawn in place. Elsewhere (a CI log, `| tee`, a file) each redraw
would be one more carriage-return line in the log, thousands of them; there the bar prints a plain line
instead, each time another `LINE_EVERY` of the total is done (every `LINE_SECONDS` when the total is not
known), and a last one when it closes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

LINE_EVERY = 0.05  # off a terminal: a line per 5% of the total, so at most 21 lines and the last
LINE_SECONDS = 30.0  # off a terminal, with no total: a line every 30 seconds


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on a terminal; a `LineBar` when the stream (tqdm's `file`, stderr by default) is not one."""
    stream = kwargs.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return tqdm(iterable, **kwargs)
    return LineBar(iterable, **kwargs)


class LineBar(tqdm):
    """tqdm for logs: plain lines ending in a newline, one per `LINE_EVERY` of the total (or `LINE_SECONDS`
    without a total) and one at the end, never a carriage return, whatever redraws its callers ask for."""

    monitor_interval = 0  # no monitor thread: it would lower miniters to 1 on a slow bar

    def __init__(self, iterable: Iterable | None = None, **kwargs: Any):
        total = kwargs.get("total")
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self._line_step = max(1, math.ceil(total * LINE_EVERY)) if total else None
        self._last_line: tuple[float, float] | None = None  # (n, time) when the last line was printed
        if self._line_step:
            kwargs.setdefault(
                "bar_format", "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
            )
            kwargs.update(miniters=self._line_step, mininterval=0)
        else:
            kwargs.update(miniters=1, mininterval=LINE_SECONDS)
        super().__init__(iterable, **kwargs)

    def _due(self) -> bool:
        if self._last_line is None:
            return True
        n, t = self._last_line
        if self._line_step:
            return self.n - n >= self._line_step
        return self._time() - t >= LINE_SECONDS

    def _print_line(self) -> None:
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
        self._last_line = (self.n, self._time())

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None or not self._due():  # msg: tqdm clearing the bar, which a log does not need
            return False
        self._print_line()
        return True

    def close(self) -> None:
        if not self.disable and self._last_line is not None and self._last_line[0] != self.n:
            self._print_line()  # where it ended
        self.leave = False  # tqdm would redraw the last line and end it with a newline of its own
        super().close()

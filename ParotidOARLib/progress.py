"""Progress reporting for long commands.

A progress callback is any ``callable(pct: float, step: str)`` with ``pct`` in 0..100.
:class:`Progress` is the CLI's implementation:

* ``lines=True`` — machine-readable ``PROGRESS <0-100> <step>`` lines on stdout,
  flushed immediately (the Slicer module parses them); repeated identical
  lines are suppressed;
* else, on a terminal (stderr is a TTY) — a one-line progress bar on stderr, with the time
  spent and an estimate of the time left;
* else — silent.

Whatever the mode, each new step is also logged (``ParotidOARLib.progress`` logger, INFO: seen
with ``-v`` or in ``--log-file``). tqdm is not used: it is not a dependency.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)

#: cascade steps and the share of the 0..100 range each one covers (start, end)
STEPS = {
    "read": (0, 5),
    "preprocess": (5, 10),
    "stage1": (10, 45),
    "roi": (45, 50),
    "stage2": (50, 85),
    "resample": (85, 90),
    "write": (90, 100),
}


def scaled(progress, step: str):
    """Callback ``f(fraction)`` reporting ``fraction`` (0..1) of ``step`` on ``progress``'s 0..100 scale."""
    if progress is None:
        return None
    lo, hi = STEPS.get(step, (0, 100))

    def f(fraction: float):
        progress(lo + (hi - lo) * min(max(float(fraction), 0.0), 1.0), step)
    return f


class Progress:
    def __init__(self, lines: bool = False, stream_out=None, stream_err=None, bar: bool | None = None,
                 width: int = 30):
        self.lines = lines
        self.out = stream_out or sys.stdout
        self.err = stream_err or sys.stderr
        if bar is None:
            bar = not lines and hasattr(self.err, "isatty") and self.err.isatty()
        self.bar = bar
        self.width = width
        self._last = None
        self._t0 = time.perf_counter()

    def __call__(self, pct: float, step: str) -> None:
        pct_i = int(max(0.0, min(100.0, float(pct))))
        key = (pct_i, step)
        if key == self._last:
            return
        if self._last is None or self._last[1] != step:
            log.info("%s (%d%%, %.1f s)", step, pct_i, time.perf_counter() - self._t0)
        self._last = key
        if self.lines:
            self.out.write(f"PROGRESS {pct_i} {step}\n")
            self.out.flush()
        elif self.bar:
            filled = int(self.width * pct_i / 100)
            elapsed = time.perf_counter() - self._t0
            left = f" ~{elapsed * (100 - pct_i) / pct_i:5.0f}s left" if 0 < pct_i < 100 else " " * 13
            self.err.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {pct_i:3d}% {step:<12s} "
                           f"{elapsed:5.1f}s{left}")
            if pct_i >= 100:
                self.err.write("\n")
            self.err.flush()

    def close(self):
        if self.bar and self._last and self._last[0] < 100:
            self.err.write("\n")
            self.err.flush()

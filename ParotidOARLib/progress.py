"""Progress reporting for long commands.

A progress callback is any ``callable(pct: float, step: str)`` with ``pct`` in 0..100.
:class:`Progress` is the CLI's implementation:

* ``lines=True`` — machine-readable ``PROGRESS <0-100> <step>`` lines on stdout,
  flushed immediately (the Slicer module parses them); repeated identical
  lines are suppressed;
* else, on a terminal (stderr is a TTY) or with ``bar=True`` — a tqdm bar on stderr, with the
  time spent and an estimate of the time left (tqdm is imported only then);
* else — silent.

``progress(pct, step)`` reports a percentage (``segment``); :meth:`Progress.advance` reports a
count (``batch``: cases, ``train``: iterations of an epoch) — the same line protocol, the
percentage being ``100 * done / total``. :meth:`Progress.write` prints a line on stdout above
the bar.

Whatever the mode, each new step is also logged (``ParotidOARLib.progress`` logger, INFO: seen
with ``-v`` or in ``--log-file``).
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
                 unit: str = "case"):
        self.lines = lines
        self.out = stream_out or sys.stdout
        self.err = stream_err or sys.stderr
        if bar is None:
            bar = not lines and hasattr(self.err, "isatty") and self.err.isatty()
        self.bar = bar
        self.unit = unit
        self._last = None
        self._tqdm = None
        self._t0 = time.perf_counter()

    def _bar(self, total, fmt):
        if self._tqdm is None:
            try:
                from tqdm import tqdm
            except ImportError:  # a runtime dependency, but never worth stopping a segmentation for
                log.debug("tqdm is not installed: no progress bar")
                self.bar = False
                return None
            self._tqdm = tqdm(total=total, file=self.err, bar_format=fmt, leave=True, mininterval=0.2)
        return self._tqdm

    def __call__(self, pct: float, step: str) -> None:
        pct_i = int(max(0.0, min(100.0, float(pct))))
        key = (pct_i, step)
        if key == self._last:
            return
        new_step = self._last is None or self._last[1] != step
        if new_step:
            log.info("%s (%d%%, %.1f s)", step, pct_i, time.perf_counter() - self._t0)
        self._last = key
        if self.lines:
            self.out.write(f"PROGRESS {pct_i} {step}\n")
            self.out.flush()
        elif self.bar:
            bar = self._bar(100, "{desc:<11} {percentage:3.0f}%|{bar}| {elapsed} elapsed, ~{remaining} left")
            if bar is not None:
                bar.set_description_str(step, refresh=False)
                bar.update(pct_i - bar.n)
                if new_step:  # a new step is always shown, however soon it comes
                    bar.refresh()

    def advance(self, done: int, total: int, label: str = "") -> None:
        """``done`` of ``total`` items finished (the last one ``label``)."""
        if self.lines:
            self(100.0 * done / max(total, 1), label.replace(" ", "_") or self.unit)
        elif self.bar:
            bar = self._bar(total, "{n_fmt}/{total_fmt} " + self.unit + "s |{bar}| {elapsed} elapsed, "
                                   "~{remaining} left {postfix}")
            if bar is not None:
                bar.set_postfix_str(label, refresh=False)
                bar.update(done - bar.n)

    def write(self, message: str) -> None:
        """A line on stdout; the bar (on stderr) is cleared and redrawn below it."""
        if self._tqdm is not None:
            self._tqdm.write(message, file=self.out)
        else:
            print(message, file=self.out, flush=True)

    def close(self):
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

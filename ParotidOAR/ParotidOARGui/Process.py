"""Run the engine CLI in a separate process without blocking Slicer.

:class:`ProcessRunner` starts a command in its own session / process group,
a reader thread collects its merged stdout+stderr line by line, and the
owner calls :meth:`ProcessRunner.poll` from a ``qt.QTimer`` (in the GUI) or
in a loop (:meth:`ProcessRunner.wait`, headless and in tests). ``PROGRESS
<pct> <step>`` lines become :attr:`progress` events; when the process has
ended and its output is drained, :attr:`finished` fires once.

:meth:`ProcessRunner.cancel` kills the whole process tree: with psutil when
available, else ``os.killpg`` on the new session (POSIX) or ``taskkill /T /F``
(Windows). Nothing here imports Qt or Slicer, so the logic can be driven and
tested without a GUI; the logic takes the runner as an injectable object.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

try:  # Slicer imports this file as ParotidOARGui.Process; tests import it the same way
    from .Signal import Signal
except ImportError:  # pragma: no cover - run as a loose script
    from Signal import Signal

PROGRESS_RE = re.compile(r"^PROGRESS\s+([0-9]+(?:\.[0-9]*)?)\s*(.*)$")


def parse_progress(line: str):
    """``"PROGRESS 42.5 stage 2"`` → ``(42.5, "stage 2")``; anything else → None."""
    match = PROGRESS_RE.match(line.strip())
    if not match:
        return None
    return min(100.0, max(0.0, float(match.group(1)))), match.group(2).strip()


def kill_process_tree(pid: int, timeout: float = 3.0) -> None:
    """Terminate ``pid`` and all its descendants (then kill what is left after ``timeout``)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            parent = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return
        procs = parent.children(recursive=True) + [parent]
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _gone, alive = psutil.wait_procs(procs, timeout=timeout)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=timeout)
        return
    if sys.platform == "win32":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True, check=False)
        return
    # POSIX without psutil: the child leads its own session, so its group id is its pid
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class ProcessRunner:
    """One external command at a time; poll-driven, cancellable, Qt-free.

    Events (see :class:`Signal`): ``progress(pct, step)``, ``line(text)``,
    ``finished(returncode, cancelled)``. After ``finished``, ``output``
    holds every line the process printed.
    """

    def __init__(self):
        self.progress = Signal("pct: float, step: str")
        self.line = Signal("text: str")
        self.finished = Signal("returncode: int, cancelled: bool")
        self._proc = None
        self._queue: queue.Queue = queue.Queue()
        self._reader = None
        self._done = True
        self.output: list[str] = []
        self.returncode: int | None = None
        self.cancelled = False
        self.last_progress = (0.0, "")

    # ---------------------------------------------------------------- control
    @property
    def is_running(self) -> bool:
        return not self._done

    def start(self, args, env=None, cwd=None) -> None:
        if self.is_running:
            raise RuntimeError("A ParotidOAR process is already running; cancel it first.")
        self.output, self.returncode, self.cancelled = [], None, False
        self.last_progress = (0.0, "")
        self._queue = queue.Queue()
        kwargs = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # setsid: its own process group, killable as a tree
        self._proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env, cwd=cwd, text=True,
                                      encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        self._done = False
        self._reader = threading.Thread(target=self._read, args=(self._proc, self._queue), daemon=True)
        self._reader.start()

    @staticmethod
    def _read(proc, q) -> None:
        for text in proc.stdout:
            q.put(text.rstrip("\r\n"))
        proc.stdout.close()
        q.put(None)  # end of output

    def cancel(self) -> None:
        """Kill the process tree; ``finished`` fires from the next :meth:`poll` with ``cancelled=True``."""
        if self._proc is None or self._done:
            return
        self.cancelled = True
        kill_process_tree(self._proc.pid)

    # ---------------------------------------------------------------- polling
    def poll(self) -> bool:
        """Handle pending output; return True while the process is still running."""
        if self._done:
            return False
        ended = False
        while True:
            try:
                text = self._queue.get_nowait()
            except queue.Empty:
                break
            if text is None:
                ended = True
                break
            self._handle_line(text)
        if ended:
            self.returncode = self._proc.wait()
            self._done = True
            self.finished.emit(self.returncode, self.cancelled)
            return False
        return True

    def _handle_line(self, text: str) -> None:
        parsed = parse_progress(text)
        if parsed is not None:
            self.last_progress = parsed
            self.progress.emit(*parsed)
            return
        self.output.append(text)
        self.line.emit(text)

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> int | None:
        """Poll until the process ends (or ``timeout`` s pass: then cancel it). Returns the exit code."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                deadline = None
            time.sleep(interval)
        return self.returncode

    def error_text(self, max_lines: int = 15) -> str:
        """The most useful part of the output for an error message (``error: ...`` lines first)."""
        errors = [t for t in self.output if t.startswith("error:")]
        if errors:
            return "\n".join(errors[-max_lines:])
        tail = [t for t in self.output if t.strip()]
        return "\n".join(tail[-max_lines:]) or f"The process exited with code {self.returncode}."

"""Run the engine CLI in a separate process without blocking Slicer.

:class:`ProcessRunner` starts a command in its own session / process group,
a reader thread collects its merged stdout+stderr line by line, and the
owner calls :meth:`ProcessRunner.poll` from a ``qt.QTimer`` (in the GUI) or
in a loop (:meth:`ProcessRunner.wait`, headless and in tests). ``PROGRESS
<pct> <step>`` lines become :attr:`progress` events; when the process has
ended and its output is drained, :attr:`finished` fires once.

:meth:`ProcessRunner.cancel` stops the whole process tree without blocking:
SIGTERM at once (psutil when available, else ``os.killpg`` on the new session
on POSIX, ``taskkill /T /F`` on Windows), SIGKILL from :meth:`ProcessRunner.poll`
after ``terminate_grace`` seconds, and the run is given up ``drain_grace``
seconds later even if the output pipe stays open. :meth:`ProcessRunner.wait`
with a timeout is therefore a hard bound.

Nothing here imports Qt or Slicer, so the logic can be driven and tested
without a GUI; the logic takes the runner as an injectable object.
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


#: seconds between SIGTERM and SIGKILL when a run is cancelled
TERMINATE_GRACE_S = 3.0
#: seconds, after SIGKILL, to wait for the output pipe to close before the run is given up as finished
DRAIN_GRACE_S = 2.0


def terminate_process_tree(pid: int):
    """Ask ``pid`` and its descendants to stop (SIGTERM, or ``taskkill /T /F`` on Windows). Never blocks.

    Returns a handle for :func:`force_kill_process_tree` (the psutil processes found now, or None).
    """
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            parent = psutil.Process(pid)
            procs = parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        return procs
    if sys.platform == "win32":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True, check=False)
        return None
    # POSIX without psutil: the child leads its own session, so its group id is its pid
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    return None


def force_kill_process_tree(pid: int, handle=None) -> None:
    """SIGKILL ``pid``'s tree (the processes in ``handle`` and any descendant still found). Never blocks."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        procs = list(handle or [])
        try:
            parent = psutil.Process(pid)
            procs += parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            pass
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        return
    if sys.platform == "win32":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True, check=False)
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_process_tree(pid: int, timeout: float = TERMINATE_GRACE_S) -> None:
    """Blocking helper: terminate ``pid``'s tree, then kill what is left after ``timeout`` s."""
    handle = terminate_process_tree(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError, OSError):
            break
        time.sleep(0.05)
    force_kill_process_tree(pid, handle)


class ProcessRunner:
    """One external command at a time; poll-driven, cancellable, Qt-free.

    Events (see :class:`Signal`): ``progress(pct, step)``, ``line(text)``,
    ``finished(returncode, cancelled)``. After ``finished``, ``output``
    holds every line the process printed.
    """

    def __init__(self, terminate_grace: float = TERMINATE_GRACE_S, drain_grace: float = DRAIN_GRACE_S):
        self.terminate_grace = float(terminate_grace)
        self.drain_grace = float(drain_grace)
        self._kill_handle = None
        self._kill_at: float | None = None
        self._give_up_at: float | None = None
        self.abandoned = False  # True when the run was ended without the output pipe closing (see poll)
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
        self._kill_handle, self._kill_at, self._give_up_at, self.abandoned = None, None, None, False
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
        """Stop the process tree without blocking: SIGTERM now, SIGKILL from :meth:`poll` after
        ``terminate_grace`` s. ``finished`` fires from a later :meth:`poll` with ``cancelled=True``."""
        if self._proc is None or self._done or self.cancelled:
            return
        self.cancelled = True
        self._kill_handle = terminate_process_tree(self._proc.pid)
        self._kill_at = time.monotonic() + self.terminate_grace

    # ---------------------------------------------------------------- polling
    def poll(self) -> bool:
        """Handle pending output; return True while the process is still running.

        After a cancel it also enforces the bounds: SIGKILL once ``terminate_grace`` s have passed, and
        ``drain_grace`` s later the run ends even if the output pipe never closes (a descendant that
        escaped the process group may hold it open); :attr:`abandoned` is then True.
        """
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
            self._finish(self._proc.wait())
            return False
        if self.cancelled:
            now = time.monotonic()
            if self._give_up_at is None and now >= self._kill_at:
                force_kill_process_tree(self._proc.pid, self._kill_handle)
                self._give_up_at = now + self.drain_grace
            elif self._give_up_at is not None and now >= self._give_up_at:
                self.abandoned = True
                code = self._proc.poll()
                self._finish(code if code is not None else -9)
                return False
        return True

    def _finish(self, returncode) -> None:
        self.returncode = returncode
        self._done = True
        self.finished.emit(self.returncode, self.cancelled)

    def _handle_line(self, text: str) -> None:
        parsed = parse_progress(text)
        if parsed is not None:
            self.last_progress = parsed
            self.progress.emit(*parsed)
            return
        self.output.append(text)
        self.line.emit(text)

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> int | None:
        """Poll until the process ends. After ``timeout`` s it is cancelled, and the wait is bounded:
        it returns at most ``timeout + terminate_grace + drain_grace`` s (plus one ``interval``) after
        it began, whatever the process does. Returns the exit code."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and not self.cancelled and time.monotonic() > deadline:
                self.cancel()
            time.sleep(interval)
        return self.returncode

    def error_text(self, max_lines: int = 15) -> str:
        """The most useful part of the output for an error message (``error: ...`` lines first)."""
        errors = [t for t in self.output if t.startswith("error:")]
        if errors:
            return "\n".join(errors[-max_lines:])
        tail = [t for t in self.output if t.strip()]
        return "\n".join(tail[-max_lines:]) or f"The process exited with code {self.returncode}."

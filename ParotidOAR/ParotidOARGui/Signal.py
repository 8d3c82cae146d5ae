"""A tiny callback list used instead of Qt signals.

Qt signals declared on Python classes crash in Slicer (PythonQt cannot
declare new signals), so the logic and the process runner announce events
through this class. It has no Qt or Slicer dependency and works in pytest.
"""

from __future__ import annotations


class Signal:
    """``sig.connect(callback)``; ``sig.emit(*args)`` calls every callback in order.

    ``signature`` is documentation only (e.g. ``"pct, step"``).
    """

    def __init__(self, signature: str = ""):
        self.signature = signature
        self._callbacks = []

    def connect(self, callback) -> None:
        if callback not in self._callbacks:
            self._callbacks.append(callback)

    def disconnect(self, callback=None) -> None:
        """Remove one callback, or all when ``callback`` is None."""
        if callback is None:
            self._callbacks.clear()
        elif callback in self._callbacks:
            self._callbacks.remove(callback)

    def emit(self, *args) -> None:
        for callback in list(self._callbacks):
            callback(*args)

    def __len__(self) -> int:
        return len(self._callbacks)

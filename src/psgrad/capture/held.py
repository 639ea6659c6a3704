"""A process-wide setting changed while any of several callers need it, in any thread, and put back by the last."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class Held:
    """``hold()`` runs ``change()`` the first time (keeping what it returns), ``release()`` runs ``restore(kept)``
    when the last holder lets go: callers in several threads, ending in any order, leave the setting as it was."""

    def __init__(self, change: Callable[[], Any], restore: Callable[[Any], None]) -> None:
        self._change, self._restore = change, restore
        self._lock = threading.Lock()
        self._holders = 0
        self._kept: Any = None

    def hold(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._kept = self._change()
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                self._restore(self._kept)
                self._kept = None

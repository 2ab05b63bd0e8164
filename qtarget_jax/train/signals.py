"""SIGTERM (TPU preemption notice) and SIGINT (Ctrl-C) become a stop request the loop polls.

The loop finishes the current step, saves a checkpoint and exits cleanly. A second Ctrl-C while
stopping raises KeyboardInterrupt at once.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional


class StopRequest:
    """Installs handlers on enter, restores the previous ones on exit (main thread only)."""

    def __init__(self):
        self.signal: Optional[str] = None
        self._old: dict = {}

    def __bool__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {name} while stopping after {self.signal}")
        self.signal = name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

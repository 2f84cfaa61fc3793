"""Graceful stop: SIGTERM/SIGINT set a flag that the training loop polls between steps.

The handler only records the request: the loop finishes its step, saves a checkpoint and exits 0
(a preempted job then resumes from that checkpoint). A second signal of the same kind restores the
default behaviour, so a user pressing Ctrl-C twice still gets an immediate stop.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Callable, Iterable


class StopRequest:
    """Install with :meth:`install`; poll :attr:`requested`; :meth:`uninstall` restores old handlers."""

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self._signals = tuple(signals)
        self._event = threading.Event()
        self._signum: int | None = None
        self._previous: dict[int, Callable | int | None] = {}

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived (or :meth:`request` was called)."""
        return self._event.is_set()

    @property
    def signal_name(self) -> str | None:
        """Name of the signal that asked to stop (``SIGTERM``...), or None."""
        return signal.Signals(self._signum).name if self._signum is not None else None

    def request(self, signum: int | None = None) -> None:
        """Ask the loop to stop, as a signal would (also usable from a watchdog thread)."""
        self._signum = signum
        self._event.set()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._event.is_set():
            # Second signal: the user insists; fall back to the default action right away.
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.request(signum)

    def install(self) -> "StopRequest":
        """Install the handlers (main thread only, as Python requires); returns self."""
        for sig in self._signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Put the handlers that were there before :meth:`install` back."""
        for sig, old in self._previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

"""Ctrl-C and SIGTERM without losing work: long loops stop at a safe point, save, and say how to go on.

Inside `graceful_stop()` the first SIGINT or SIGTERM only sets `stop.requested`, so the loop
finishes what it is writing, saves, and raises `Interrupted` with a one-line message. Work
that is cheap to redo (a distillation iteration in progress, an evaluation, an expert group
still training) runs inside `stop.abandonable()`, where the signal raises KeyboardInterrupt at
once and the loop drops that work instead of waiting for it. A second signal raises too (an
escape from code that hangs), except while the stop saves (`stop.finish()`, and after a
KeyboardInterrupt raised here): repeated Ctrl-C must not cut the save that ends the run.
Outside the main thread (where Python cannot install handlers) nothing changes.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT/SIGTERM after saving its work; the message says how to continue."""

    exit_code = 130  # what shells report for a process ended by Ctrl-C


class GracefulStop:
    def __init__(self) -> None:
        self.requested = False
        self._abandonable = 0
        self._finishing = False

    def _handle(self, signum: int, frame: object) -> None:
        if self._finishing:
            return  # the stop's save runs to its end: a signal now would leave no checkpoint
        already = self.requested
        self.requested = True
        if already or self._abandonable:
            self._finishing = True
            raise KeyboardInterrupt

    def finish(self) -> None:
        """The loop stops and saves now: signals from here on are ignored until the run has ended."""
        self._finishing = True

    @contextmanager
    def abandonable(self) -> Iterator[None]:
        """A signal arriving inside this block (or before it, unhandled) raises KeyboardInterrupt."""
        if self.requested:
            self._finishing = True
            raise KeyboardInterrupt
        self._abandonable += 1
        try:
            yield
        finally:
            self._abandonable -= 1


@contextmanager
def graceful_stop() -> Iterator[GracefulStop]:
    stop = GracefulStop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.signal(s, stop._handle) for s in SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

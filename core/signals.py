"""SIGTERM and SIGINT as a request to stop, the same for every long-running process."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[list[int]]:
    """Call ``stop`` on SIGTERM/SIGINT while inside; the previous handlers come back afterwards. Yields the
    list of the signals received, for a command to say it was interrupted rather than finished.

    Only the main thread may install handlers; elsewhere (a server started inside a test) this does
    nothing and the owner stops the process its own way."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def on_signal(signum: int, frame: object) -> None:
        caught.append(signum)
        stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

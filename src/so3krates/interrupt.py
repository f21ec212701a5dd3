"""Turning Ctrl-C and SIGTERM into a clean stop at the next safe point of a long loop."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def stop_requests(on_request: Callable[[str], None]) -> Iterator[None]:
    """While active, SIGINT and SIGTERM call ``on_request("stopped by signal SIGINT")`` instead of raising.

    The loop checks the flag its callback sets and stops after the current step, so that a checkpoint or
    restart file written then is consistent. Previous handlers are restored on exit. Outside the main
    thread (where handlers cannot be installed) this does nothing.
    """

    def handler(signum: int, frame: object) -> None:
        on_request(f"stopped by signal {signal.Signals(signum).name}")

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not in the main thread
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

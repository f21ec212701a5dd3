"""SIGINT/SIGTERM become stop requests inside long loops, and the old handlers come back afterwards."""

import os
import signal

from so3krates.interrupt import stop_requests


def test_signals_become_stop_requests_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    reasons = []
    with stop_requests(reasons.append):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
    assert reasons == ["stopped by signal SIGTERM", "stopped by signal SIGINT"]
    assert signal.getsignal(signal.SIGTERM) is before

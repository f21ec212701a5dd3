"""Test-session settings: one torch thread (the suite evaluates many small systems, where a second thread
only adds wake-up latency, and results stay bit-for-bit reproducible), and the record of which execution
paths the tests ran (``paths.py``), printed at the end of the session."""

import pytest
import torch

import paths

torch.set_num_threads(1)
paths.install()


@pytest.fixture(autouse=True)
def _name_the_current_test(request):
    paths.CURRENT_TEST["id"] = request.node.nodeid
    yield
    paths.CURRENT_TEST["id"] = "outside a test"


def pytest_terminal_summary(terminalreporter):
    paths.report(terminalreporter.write_line)

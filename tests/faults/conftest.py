"""The fault-injection suite: each test breaks something on purpose and reports what it cost."""

from __future__ import annotations

import os
from pathlib import Path

from tests.faults.harness import REPORTS, write_reports


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not REPORTS:
        return
    terminalreporter.section("fault injection: executions lost and duplicated")
    for report in REPORTS:
        terminalreporter.write_line(report.line())
    target = os.environ.get("RUNYARD_FAULT_REPORT")
    if target:
        write_reports(Path(target))

"""pytest plug-in of the conformance suite: collects every trajectory and identity result
(also from xdist workers, through the reports' user_properties) and prints the backend x rule
table at the end of the run."""

from __future__ import annotations

import json

_ROWS: list[dict] = []


def pytest_runtest_logreport(report):
    if report.when != "call":
        return
    for name, value in report.user_properties:
        if name == "conformance":
            _ROWS.append(json.loads(value))


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    from conformance.runner import render

    terminalreporter.write_sep("=", "gradnorm conformance: backend x rule (PASS passed/total, largest relative deviation)")
    terminalreporter.write_line(render(_ROWS, title="gradnorm conformance"))

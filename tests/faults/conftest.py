"""Fault-injection fixtures: the stages' tiny inputs, built once, and the kill table printed at the end of
the session (and written to `$HISTODISTILL_FAULT_TABLE`, default `<pytest basetemp>/fault_table.md`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.faults.harness import StageResult, table
from tests.faults.stages import build_inputs

RESULTS: list[StageResult] = []


@pytest.fixture(scope="session")
def fault_inputs(tmp_path_factory, demo_store, demo_cache) -> Path:
    return build_inputs(tmp_path_factory.mktemp("fault_inputs"), demo_store, demo_cache)


@pytest.fixture(scope="session")
def fault_results() -> list[StageResult]:
    return RESULTS


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    text = table(RESULTS)
    total = sum(r.seconds for r in RESULTS)
    text += (
        f"\n\nfault injection: {sum(r.landed for r in RESULTS)} kills in {len(RESULTS)} stages, {total:.0f} s"
    )
    terminalreporter.write_sep("=", "fault injection: SIGKILL, rerun, compare with an uninterrupted run")
    terminalreporter.write_line(text)
    out = os.environ.get("HISTODISTILL_FAULT_TABLE")
    path = Path(out) if out else Path(config._tmp_path_factory.getbasetemp()) / "fault_table.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    terminalreporter.write_line(f"kill table written to {path}")

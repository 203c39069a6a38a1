"""The kernel matrix's runner on the running kernel (in place, no VM): a test that hangs past its
timeout is recorded as failed and the tests after it still run, and the time budget stops a run
between tests. Both paths are what keeps a VM run bounded, and both are hard to see there."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "kernel_matrix.py"

pytestmark = pytest.mark.timeout(120)

HANGING = """\
import time

import pytest


def test_before() -> None:
    pass


@pytest.mark.timeout(2)
def test_hangs() -> None:
    time.sleep(600)


def test_after() -> None:
    pass
"""

SLOW = """\
import time


def test_first() -> None:
    time.sleep(8)


def test_second() -> None:
    pass
"""


def _run(tmp_path: Path, source: str, *extra: str) -> dict[str, Any]:
    tests = tmp_path / "test_cases.py"
    tests.write_text(source)
    out = tmp_path / "out.json"
    command = [sys.executable, str(SCRIPT), "run", "--kernel", "host", "--tests", str(tests)]
    done = subprocess.run(
        [*command, "--json", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
        cwd=ROOT,
    )
    assert out.exists(), done.stderr
    result: dict[str, Any] = json.loads(out.read_text())["kernels"][0]
    result["exit"] = done.returncode
    return result


def _outcomes(result: dict[str, Any]) -> dict[str, str]:
    return {t["nodeid"].rpartition("::")[2]: t["outcome"] for t in result["tests"]}


def test_a_hung_test_is_recorded_and_the_run_resumes_after_it(tmp_path: Path) -> None:
    started = time.monotonic()
    result = _run(tmp_path, HANGING, "--budget", "90")
    assert _outcomes(result) == {
        "test_before": "passed",
        "test_hangs": "failed",
        "test_after": "passed",
    }
    hung = next(t for t in result["tests"] if t["nodeid"].endswith("::test_hangs"))
    assert hung["reason"].startswith("did not end"), hung
    assert result["status"] == "failed" and result["exit"] == 1
    assert time.monotonic() - started < 60  # ended by the test's timeout, not the budget
    # Each test ran once: the resumed pytest ran only what was left.
    assert len(result["tests"]) == 3


def test_the_budget_stops_the_run_between_tests(tmp_path: Path) -> None:
    # The guest script keeps the last SHUTDOWN_SLACK (20 s) of the budget for stopping: with 26 s
    # no test may start after about 6 s, so the first (8 s) starts in time and the second would
    # start after it.
    result = _run(tmp_path, SLOW, "--budget", "26")
    assert _outcomes(result) == {"test_first": "passed"}
    assert result["status"] == "budget", result
    assert result["exit"] == 3

"""pytest plugin of scripts/kernel_matrix.py: every test's outcome as it happens, a deadline, and
resuming after a test that hung.

Loaded with ``-p km_results`` (this directory on PYTHONPATH); does nothing without ``KM_STATE``,
a directory that gets:

- ``tests.jsonl``: one JSON line per finished test, ``{"nodeid", "outcome", "reason",
  "duration"}``, ``outcome`` one of passed, failed, skipped, error. Written as each test ends, so
  a run cut short still reports everything it got to.
- ``current``: the test running now. A test blocked in a page fault nobody serves cannot be
  interrupted by a signal; the runner uses pytest-timeout's thread method, which ends the whole
  process, and starts pytest again: this plugin then records the test named in ``current`` as
  failed (hung), and deselects it and every test already recorded, so the run resumes after it.

``KM_DEADLINE`` (seconds since the epoch) stops the session before a test that would start after
it; the tests not run are then absent from ``tests.jsonl``. ``KM_TIMEOUT_SCALE`` multiplies every
test's own timeout (an emulated VM is many times slower than the machine the timeouts were set
on; the ini default is scaled by the runner with ``-o timeout=``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

_STATE = Path(os.environ["KM_STATE"]) if os.environ.get("KM_STATE") else None
_DEADLINE = float(os.environ.get("KM_DEADLINE") or 0)
_SCALE = float(os.environ.get("KM_TIMEOUT_SCALE") or 1)
#: Per test: the report that decides its outcome (the first failing phase, else the call).
_pending: dict[str, dict[str, Any]] = {}


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, line, reason)
        return str(longrepr[2]).removeprefix("Skipped: ")
    if longrepr is None:
        return ""
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message).splitlines()[0][:400] if crash.message else ""
    text = str(longrepr).strip()
    return text.splitlines()[-1][:400] if text else ""


def _append(entry: dict[str, Any]) -> None:
    assert _STATE is not None
    with open(_STATE / "tests.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _recorded() -> set[str]:
    assert _STATE is not None
    try:
        lines = (_STATE / "tests.jsonl").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return set()
    return {json.loads(line)["nodeid"] for line in lines if line.strip()}


def pytest_sessionstart(session: pytest.Session) -> None:
    if _STATE is None:
        return
    current = _STATE / "current"
    if current.exists():
        nodeid = current.read_text(encoding="utf-8").strip()
        current.unlink()
        if nodeid and nodeid not in _recorded():
            _append(
                {
                    "nodeid": nodeid,
                    "outcome": "failed",
                    "reason": "did not end: still running at its timeout (a hang, or too slow "
                    "here), which ends pytest, or pytest crashed; the tests after it ran in a "
                    "new pytest",
                    "duration": None,
                }
            )


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    if _SCALE != 1:
        for item in items:
            marker = item.get_closest_marker("timeout")
            seconds = marker.args[0] if marker and marker.args else None
            if marker and seconds is None:
                seconds = marker.kwargs.get("timeout")
            if isinstance(seconds, int | float) and seconds > 0:
                item.add_marker(pytest.mark.timeout(seconds * _SCALE), append=False)
    if _STATE is None:
        return
    done = _recorded()
    if not done:
        return
    kept = [item for item in items if item.nodeid not in done]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid in done])
        items[:] = kept


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    if _STATE is not None:
        (_STATE / "current").write_text(nodeid, encoding="utf-8")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _STATE is None:
        return
    entry = _pending.setdefault(
        report.nodeid,
        {"nodeid": report.nodeid, "outcome": "passed", "reason": "", "duration": 0.0},
    )
    entry["duration"] = round(entry["duration"] + report.duration, 3)
    if entry["outcome"] == "passed":
        if report.skipped:
            entry["outcome"], entry["reason"] = "skipped", _reason(report)
        elif report.failed:
            entry["outcome"] = "failed" if report.when == "call" else "error"
            entry["reason"] = _reason(report)
    if report.when == "teardown":
        _append(_pending.pop(report.nodeid))
        (_STATE / "current").unlink(missing_ok=True)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if _DEADLINE and time.time() > _DEADLINE:
        # Not run at all; pytest stops the session after this item.
        item.session.shouldstop = "the kernel matrix's time budget is spent"
        return True
    return None

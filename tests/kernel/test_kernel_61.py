"""Debian 12's 6.1 kernel in a VM: the kernel matrix's subset (the probe, one attach per mode, the
fallbacks), through ``scripts/kernel_matrix.py --kernel debian-6.1 --subset``.

Part of every ``make test`` (and so of CI). The runner installs what it lacks: qemu-system-x86
and busybox-static with apt, virtme-ng from PyPI into its own virtualenv, and Debian's 6.1 kernel
package, downloaded and unpacked into its cache, never installed. Skipped, naming what is
missing, only where that cannot work: not root, no apt, no qemu, no way to the package
registries, no Debian 12 package lists, not x86_64. ``SHMFAULT_KERNEL_SUBSET=0`` opts out.

``SHMFAULT_KERNEL_SUBSET_BUDGET`` (seconds, default 300) bounds the whole run, installs included.
A run that does not finish within it fails, saying so: the runner stops the VM at the budget,
and this module stops the runner (SIGTERM, then SIGKILL) if it is still running a little later.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "kernel_matrix.py"
OPT_OUT = "SHMFAULT_KERNEL_SUBSET"
BUDGET = float(os.environ.get("SHMFAULT_KERNEL_SUBSET_BUDGET") or 300)
#: How long after the budget the runner may take to stop its VM and report.
GRACE = 30.0

pytestmark = [pytest.mark.root, pytest.mark.timeout(BUDGET + GRACE + 60)]

#: The matrix cases the subset must run, by test id.
CASES = [
    "test_probe_verdict",
    "test_missing_features_are_refused_by_name",
    *(
        f"test_attach_mode[{m}]"
        for m in ("shared-copy", "shared-continue", "private-copy", "eager")
    ),
    *(f"test_fallback[{c}]" for c in ("nobody", "seccomp-syscall", "seccomp-all")),
]
#: What Debian 12's 6.1 reports: every feature up to WP_HUGETLBFS_SHMEM (5.19); not
#: WP_UNPOPULATED (6.4), POISON (6.6), WP_ASYNC (6.7), MOVE (6.8).
FEATURES_61 = 0x1FFF


def _unavailable() -> str:
    """Why the subset cannot run on this machine at all, or ''."""
    if os.environ.get("SHMFAULT_KERNEL_VM") == "1":
        return "already inside a kernel matrix VM"
    if os.environ.get(OPT_OUT) == "0":
        return f"{OPT_OUT}=0 opts out of booting Debian's 6.1 in a VM"
    if platform.machine() != "x86_64":
        return "the matrix boots Debian's amd64 kernel: x86_64 only"
    if os.geteuid() != 0:
        return "not root: the runner installs qemu with apt and boots the VM as root"
    return ""


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM lets the runner kill its VM and remove its files; SIGKILL if it does not."""
    process.terminate()
    try:
        process.wait(timeout=GRACE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    why = _unavailable()
    if why:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("kernel-61")
    out, log = work / "matrix.json", work / "runner.log"
    command = [sys.executable, str(SCRIPT), "run", "--kernel", "debian-6.1", "--subset"]
    command += ["--budget", f"{BUDGET:g}", "--json", str(out)]
    started = time.monotonic()
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command,
            stdout=output,
            stderr=output,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            status: int | None = process.wait(timeout=BUDGET + GRACE)
        except subprocess.TimeoutExpired:
            _stop(process)
            status = None
        except BaseException:
            _stop(process)
            raise
    elapsed = time.monotonic() - started
    tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-20:])
    if status is None:
        pytest.fail(
            f"the 6.1 subset overran its budget: still running {elapsed:.0f} s after it started "
            f"(budget {BUDGET:g} s, {OPT_OUT}_BUDGET), so it was stopped. The runner said:\n{tail}"
        )
    if not out.exists():
        pytest.fail(f"the runner wrote no results (status {status}):\n{tail}")
    result: dict[str, Any] = json.loads(out.read_text())["kernels"][0]
    result["elapsed"] = round(elapsed, 1)
    if result["status"] == "setup-failed" and result.get("missing"):
        pytest.skip(f"cannot run Debian's 6.1 kernel here, no {result['missing']}")
    if result["status"] in ("setup-failed", "boot-failed"):
        pytest.fail(f"the 6.1 VM did not run ({result['status']}): {result['reason']}\n{tail}")
    return result


def test_the_subset_finished_within_its_budget(kernel: dict[str, Any]) -> None:
    assert kernel["status"] != "budget", (
        f"the 6.1 subset did not finish within its budget of {BUDGET:g} s ({OPT_OUT}_BUDGET): "
        f"{kernel['reason']}; times {kernel['timings']}"
    )
    assert kernel["status"] in ("ok", "failed"), (kernel["status"], kernel["reason"])


def test_the_vm_ran_debian_61(kernel: dict[str, Any]) -> None:
    assert kernel["release"].startswith("6.1."), kernel["release"]
    assert kernel["how"].startswith("VM"), kernel["how"]


def test_the_probe_reports_what_61_has(kernel: dict[str, Any]) -> None:
    probe = kernel["probe"]
    if probe is None:
        pytest.fail(f"the probe failed in the VM: {kernel['probe_error']}")
    assert probe["kernel"]["release"] == kernel["release"]
    assert probe["api"]["features_mask"] == FEATURES_61
    for name in ("wp_unpopulated", "poison", "wp_async", "move"):
        assert name not in probe["api"]["features"]
    memfd = probe["memory"]["memfd"]["register"]
    assert memfd["missing"]["ioctls"] == ["wake", "copy", "zeropage"]
    assert "continue" in memfd["minor"]["ioctls"]
    assert probe["access"]["paths"]["dev_userfaultfd"]["ok"]  # /dev/userfaultfd came in 6.1
    assert probe["modes"]["best"] == "shared-copy"
    assert all(mode["available"] for mode in probe["modes"]["chain"]), probe["modes"]


@pytest.mark.parametrize("case", CASES)
def test_matrix_case(kernel: dict[str, Any], case: str) -> None:
    test = next((t for t in kernel["tests"] if t["nodeid"].endswith(f"::{case}")), None)
    assert test is not None, (
        f"{case} did not run in the VM ({kernel['status']}: {kernel['reason']}; "
        f"times {kernel['timings']})"
    )
    # Every case runs on 6.1: a skip there would hide a fallback that was never exercised.
    assert test["outcome"] == "passed", f"{test['outcome']} in the VM: {test['reason']}"

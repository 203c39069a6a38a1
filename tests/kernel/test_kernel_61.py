"""Debian 12's 6.1 kernel in a VM: the kernel matrix's subset (the probe, one attach per mode, the
fallbacks), through ``scripts/kernel_matrix.py --kernel debian-6.1 --subset``.

Off unless ``SHMFAULT_KERNEL_SUBSET=1``: it boots a VM, emulated where KVM does not work, which
takes about two minutes (more the first time, when the runner installs qemu and virtme-ng and
unpacks the kernel). ``SHMFAULT_KERNEL_SUBSET_BUDGET`` (seconds, default 600) bounds the whole
run; a case the budget did not reach is skipped as not run. Skips, saying why, when the tools
cannot be installed or the VM cannot boot here.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "kernel_matrix.py"
ENABLE = "SHMFAULT_KERNEL_SUBSET"
BUDGET = float(os.environ.get("SHMFAULT_KERNEL_SUBSET_BUDGET") or 600)

pytestmark = [pytest.mark.root, pytest.mark.timeout(BUDGET + 120)]

#: The matrix cases the subset must pass (or skip with a reason), by test id.
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


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if os.environ.get("SHMFAULT_KERNEL_VM") == "1":
        pytest.skip("already inside a kernel matrix VM")
    if os.environ.get(ENABLE) != "1":
        pytest.skip(f"boots a VM for about two minutes: set {ENABLE}=1 (make kernel-subset)")
    if platform.machine() != "x86_64":
        pytest.skip("the matrix boots Debian's amd64 kernel: x86_64 only")
    out = tmp_path_factory.mktemp("kernel-61") / "matrix.json"
    command = [sys.executable, str(SCRIPT), "run", "--kernel", "debian-6.1", "--subset"]
    command += ["--budget", f"{BUDGET:g}", "--json", str(out)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=BUDGET + 60, check=False, cwd=ROOT
    )
    if not out.exists():
        pytest.fail(f"the runner wrote no results (status {done.returncode}):\n{done.stderr}")
    result: dict[str, Any] = json.loads(out.read_text())["kernels"][0]
    if result["status"] in ("setup-failed", "boot-failed"):
        pytest.skip(f"cannot run Debian's 6.1 kernel here ({result['status']}): {result['reason']}")
    if result["probe"] is None and not result["tests"]:
        pytest.skip(f"the VM did not get to the probe: {result['status']}: {result['reason']}")
    return result


def test_the_vm_ran_debian_61(kernel: dict[str, Any]) -> None:
    assert kernel["release"].startswith("6.1."), kernel["release"]


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
    if test is None:
        pytest.skip(f"not run in the VM within the budget ({kernel['status']}: {kernel['reason']})")
    if test["outcome"] == "skipped":
        pytest.skip(f"skipped in the VM: {test['reason']}")
    assert test["outcome"] == "passed", f"{test['outcome']} in the VM: {test['reason']}"

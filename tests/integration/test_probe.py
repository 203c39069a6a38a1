"""`shmfault probe` against the real kernel, as root, as nobody, and behind seccomp filters."""

from __future__ import annotations

import contextlib
import gettext  # noqa: F401  (argparse needs it; a child that dropped to nobody cannot import it)
import io
import json
import locale  # noqa: F401  (same)
import os
import stat
import subprocess
import sys
from typing import Any

import pytest

from shmfault import cli, probe
from shmfault._abi import Feature
from shmfault.uffd import Uffd
from tests import worlds

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def _kernel_features() -> Feature:
    with Uffd.open() as uffd:
        return uffd.available_features


def _sysctl_unprivileged() -> int:
    with open("/proc/sys/vm/unprivileged_userfaultfd", "rb") as handle:
        return int(handle.read())


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmfault", "probe", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _cli_in_process(*args: str) -> tuple[int, str, str]:
    """cli.main in this process (for worlds where python cannot be exec'ed), output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["probe", *args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def root_report() -> dict[str, Any]:
    result = _run_cli("--json")
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_reports_every_feature_the_kernel_offers(root_report: dict[str, Any]) -> None:
    offered = _kernel_features()
    api = root_report["api"]
    assert api["ok"]
    assert api["features_mask"] == int(offered)
    assert sorted(api["features"]) == sorted(f.name.lower() for f in Feature if f & offered)
    assert api["unknown_features"] == []
    assert {"register", "unregister", "api"} <= set(api["ioctls"])


def test_root_round_trips_pass_where_the_kernel_has_the_feature(
    root_report: dict[str, Any],
) -> None:
    offered = _kernel_features()
    memory = root_report["memory"]
    expected = {
        ("anonymous", "missing-copy"): Feature(0),
        ("anonymous", "missing-zeropage"): Feature(0),
        ("anonymous", "kernel-fault"): Feature(0),
        ("anonymous", "wp"): Feature.PAGEFAULT_FLAG_WP,
        ("memfd", "missing-copy"): Feature.MISSING_SHMEM,
        ("memfd", "missing-zeropage"): Feature.MISSING_SHMEM,
        ("memfd", "minor-continue"): Feature.MINOR_SHMEM,
        ("posix_shm", "missing-copy"): Feature.MISSING_SHMEM,
        ("posix_shm", "minor-continue"): Feature.MINOR_SHMEM,
    }
    checked = 0
    for (kind, trip), needed in expected.items():
        result = memory[kind]["round_trips"][trip]
        if needed & ~offered:
            assert not result["ok"] and result["reason"]
            continue
        assert result["ok"], f"{kind}.{trip}: {result['reason']}"
        assert result["elapsed_ms"] > 0
        checked += 1
    assert checked > 0
    assert root_report["access"]["kernel_faults"]["ok"]
    assert root_report["modes"]["best"] == "shared-copy"


def test_hugetlb_reports_why_round_trips_did_not_run(root_report: dict[str, Any]) -> None:
    hugetlb = root_report["memory"]["hugetlb"]
    pools = {pool["size"]: pool for pool in root_report["kernel"]["huge_pages"]}
    pool = pools.get(root_report["kernel"]["huge_page_size"])
    if pool is None or pool["free"] >= 2:
        pytest.skip("this machine has free huge pages: the refusal path is not reachable")
    for result in hugetlb["round_trips"].values():
        assert not result["ok"]
        assert "huge pages" in result["reason"]


def test_table_is_printed_for_people() -> None:
    result = _run_cli()
    assert result.returncode == 0, result.stderr
    assert "best mode" in result.stdout
    assert "shared-copy" in result.stdout


def test_require_exit_codes() -> None:
    assert _run_cli("--require", "userfaultfd", "eager", "--no-round-trips").returncode == 0
    missing = _run_cli("--require", "memfd.missing-copy", "--no-round-trips")
    assert missing.returncode == 1
    assert "memfd.missing-copy" in missing.stderr and "not run" in missing.stderr
    unknown = _run_cli("--require", "no-such-thing")
    assert unknown.returncode == 2
    assert "no-such-thing" in unknown.stderr


def _device_allows_others() -> bool:
    try:
        return bool(os.stat("/dev/userfaultfd").st_mode & stat.S_IROTH)
    except FileNotFoundError:
        return False


def test_unprivileged_user_gets_user_mode_only() -> None:
    if _sysctl_unprivileged() != 0:
        pytest.skip("vm.unprivileged_userfaultfd=1 lets nobody use the full syscall")
    report = worlds.run_in_child(lambda: probe.probe(timeout=5).to_dict(), user="nobody")
    paths = report["access"]["paths"]
    assert report["process"]["uid"] != 0
    assert not paths["syscall"]["ok"]
    assert paths["syscall"]["errno"] == "EPERM"
    assert "unprivileged_userfaultfd" in paths["syscall"]["reason"]
    if not _device_allows_others():
        assert not paths["dev_userfaultfd"]["ok"]
        assert paths["dev_userfaultfd"]["reason"]
    assert paths["user_mode_only"]["ok"]
    assert report["api"]["user_mode_only"] is True
    assert not report["access"]["kernel_faults"]["ok"]
    assert "EFAULT" in report["access"]["kernel_faults"]["reason"]
    kernel_fault = report["memory"]["anonymous"]["round_trips"]["kernel-fault"]
    assert not kernel_fault["ok"]
    assert "Bad address" in kernel_fault["reason"]
    # User-mode faults are still served: every lazy mode works for nobody.
    assert report["memory"]["memfd"]["round_trips"]["missing-copy"]["ok"]
    assert report["modes"]["best"] == "shared-copy"


def test_unprivileged_cli_exits_zero_and_require_says_what_is_missing() -> None:
    if _sysctl_unprivileged() != 0:
        pytest.skip("vm.unprivileged_userfaultfd=1 lets nobody use the full syscall")
    code, out, _ = worlds.run_in_child(_cli_in_process, "--json", user="nobody")
    assert code == 0
    assert json.loads(out)["access"]["paths"]["user_mode_only"]["ok"]
    code, _, err = worlds.run_in_child(_cli_in_process, "--require", "kernel-faults", user="nobody")
    assert code == 1
    assert "kernel-faults" in err and "EFAULT" in err


def test_seccomp_denying_the_syscall_falls_back_to_the_device() -> None:
    reason = worlds.seccomp_unavailable()
    if reason:
        pytest.skip(reason)
    if not os.path.exists("/dev/userfaultfd"):
        pytest.skip("no /dev/userfaultfd on this machine")
    report = worlds.run_in_child(lambda: probe.probe(timeout=5).to_dict(), deny_userfaultfd=True)
    paths = report["access"]["paths"]
    assert report["process"]["seccomp"] == "filter"
    assert not paths["syscall"]["ok"] and "seccomp" in paths["syscall"]["reason"]
    assert not paths["user_mode_only"]["ok"]
    assert paths["dev_userfaultfd"]["ok"]
    assert report["api"]["path"] == "dev_userfaultfd"
    assert report["access"]["kernel_faults"]["ok"]
    assert report["memory"]["anonymous"]["round_trips"]["kernel-fault"]["ok"]
    assert report["modes"]["best"] == "shared-copy"


@pytest.mark.parametrize("user", [None, "nobody"])
def test_no_userfaultfd_at_all_still_gives_a_full_report(user: str | None) -> None:
    reason = worlds.seccomp_unavailable()
    if reason:
        pytest.skip(reason)
    code, out, _ = worlds.run_in_child(
        _cli_in_process, "--json", user=user, deny_userfaultfd=True, deny_dev_userfaultfd=True
    )
    assert code == 0
    report = json.loads(out)
    assert not report["access"]["userfaultfd"]["ok"]
    for name in ("syscall", "dev_userfaultfd", "user_mode_only"):
        check = report["access"]["paths"][name]
        assert not check["ok"] and check["reason"], name
    assert "seccomp" in report["access"]["paths"]["syscall"]["reason"]
    assert not report["api"]["ok"] and report["api"]["reason"]
    for kind, memory in report["memory"].items():
        for mode, registration in memory["register"].items():
            assert not registration["ok"] and registration["reason"], (kind, mode)
        for trip, result in memory["round_trips"].items():
            assert not result["ok"] and result["reason"], (kind, trip)
    chain = report["modes"]["chain"]
    assert report["modes"]["best"] == "eager"
    assert all(m["reason"] for m in chain if not m["available"])
    code, _, err = worlds.run_in_child(
        _cli_in_process,
        "--require",
        "userfaultfd",
        user=user,
        deny_userfaultfd=True,
        deny_dev_userfaultfd=True,
    )
    assert code == 1 and "userfaultfd" in err

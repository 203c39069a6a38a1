"""Pure helpers of the multi-process benchmarks (benchmarks/clients.py, benchmarks/report.py):
no service, no timing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks import report

ROOT = Path(__file__).resolve().parents[2]


def test_the_client_module_does_not_import_grpc() -> None:
    # The fork server preloads it: gRPC state must never be forked into a client process.
    code = "import sys, benchmarks.clients; print(any('grpc' in m for m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False"


def _share(rep: int, processes: int, filled: int, subject: str = "shmfault") -> dict[str, Any]:
    return {
        "workload": "share",
        "subject": subject,
        "mode": "shared-copy" if subject == "shmfault" else "file-first-touch",
        "processes": processes,
        "fault_around": 16,
        "rep": rep,
        "pages": 100,
        "faults": 10,
        "pages_filled": filled,
        "fills_per_page": filled / 100,
        "filled_once": filled == 100,
        "elapsed_ns": 1000 * processes,
        "verified": True,
    }


def test_share_target_fails_when_any_repetition_fills_twice() -> None:
    records = [
        _share(0, 1, 100),
        _share(1, 1, 100),
        _share(0, 2, 100),
        _share(1, 2, 101),
        _share(0, 2, 0, subject="kernel"),
    ]
    summary = report.summarise_multi(records)
    verdicts = {t["target"].split(":")[0]: t["met"] for t in summary["targets"]}
    assert verdicts == {"share shared-copy x1": True, "share shared-copy x2": False}
    two = next(r for r in summary["share"] if r["processes"] == 2)
    assert two["vs_one"] == 2.0
    assert two["fills_per_page_range"] == [1.0, 1.01]


def _cores(rep: int, clients: int, rate: float, subject: str = "shmfault") -> dict[str, Any]:
    return {
        "workload": "cores",
        "subject": subject,
        "mode": "shared-copy" if subject == "shmfault" else "file-first-touch",
        "clients": clients,
        "fault_around": 1,
        "rep": rep,
        "faults_per_s": rate,
        "verified": True,
    }


def test_cores_ratio_is_paired_by_repetition() -> None:
    records = [
        _cores(0, 1, 100.0),
        _cores(0, 2, 150.0),
        _cores(1, 1, 200.0),
        _cores(1, 2, 340.0),
        _cores(0, 1, 1000.0, "kernel"),
        _cores(0, 2, 2000.0, "kernel"),
    ]
    summary = report.summarise_multi(records)
    (row,) = summary["cores"]
    assert row["two_vs_one_range"] == [1.5, 1.7]
    assert row["kernel_two_vs_one"] == 2.0
    (target,) = summary["targets"]
    assert target["met"] == (row["two_vs_one"] >= report.TARGET_CORES)


def test_memory_target_is_reported_in_kib() -> None:
    record = {
        "workload": "scale",
        "subject": "attachments",
        "mode": "shared-copy",
        "rep": 0,
        "attachments": 1000,
        "processes": 50,
        "region_size": 65536,
        "rss_per_attachment": 70 * 1024.0,
        "p99_loaded_vs_alone": 1.5,
        "verified": True,
    }
    summary = report.summarise_multi([record])
    by_name = {t["target"]: t for t in summary["targets"]}
    memory = next(t for name, t in by_name.items() if "KiB" in name)
    assert memory["unit"] == "KiB"
    assert memory["value"] == 70.0
    assert not memory["met"]
    assert "70.0 KiB" in report.format_tables({"rand": [], "seq": [], "baselines": [], **summary})


def _file(rep: int, subject: str, state: str, gbps: float, mode: str = "") -> dict[str, Any]:
    return {
        "workload": "file",
        "subject": subject,
        "mode": mode or ("mmap-private-first-touch" if subject == "kernel" else "shared-copy"),
        "state": state,
        "cached_before": 0.0 if state == "cold" else 1.0,
        "rep": rep,
        "gbps": gbps,
        "faults": 10,
        "cpu_ns_per_fault": 1000.0,
        "user_ns_per_fault": 0.0,
        "sys_ns_per_fault": 1000.0,
        "verified": True,
    }


def test_file_rows_are_paired_with_the_kernel_in_the_same_state_and_repetition() -> None:
    records = [
        _file(0, "kernel", "cold", 1.0),
        _file(1, "kernel", "cold", 2.0),
        _file(0, "shmfault", "cold", 1.5),
        _file(1, "shmfault", "cold", 2.0),
        _file(0, "kernel", "warm", 4.0),
        _file(0, "shmfault", "warm", 2.0),
    ]
    rows = {(r["mode"], r["state"]): r for r in report.summarise_file(records)}
    assert set(rows) == {
        ("kernel: mmap of the file", "cold"),
        ("shared-copy", "cold"),
        ("kernel: mmap of the file", "warm"),
        ("shared-copy", "warm"),
    }
    assert rows[("shared-copy", "cold")]["vs_kernel_range"] == [1.0, 1.5]
    assert rows[("shared-copy", "cold")]["vs_kernel"] == 1.25
    assert rows[("shared-copy", "warm")]["vs_kernel"] == 0.5
    assert rows[("kernel: mmap of the file", "warm")]["vs_kernel"] is None

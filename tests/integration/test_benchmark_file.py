"""The ``file`` benchmark end to end, small: it must run every mode and state against a real
service and verify every byte it touched (figures are not looked at: tests never time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import filesource

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(180)


def test_the_file_benchmark_touches_every_mode_cold_and_warm_and_verifies_the_bytes(
    tmp_path: Path,
) -> None:
    output = tmp_path / "file.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "file",
            "--repeat",
            "1",
            "--file-size",
            "8M",
            "--file-dir",
            str(tmp_path),
            "--output",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    records = json.loads(output.read_text())["records"]
    states = ["cold", "warm"] if filesource.can_be_cold(tmp_path) else ["warm"]
    seen = {(r["subject"], r["mode"], r["state"]) for r in records}
    assert seen == {
        (subject, mode, state)
        for state in states
        for subject, mode in [
            ("kernel", "mmap-private-first-touch"),
            ("shmfault", "shared-copy"),
            ("shmfault", "shared-continue"),
            ("shmfault", "private-copy"),
        ]
    }
    assert all(r["verified"] and r["bad_pages"] == 0 for r in records)
    for record in records:
        if record["state"] == "warm":
            assert record["cached_before"] == 1.0, record
        else:
            assert record["cached_before"] < 0.5, record  # dropped: nothing else reads it
        if record["subject"] == "shmfault":
            assert record["faults"] > 0, record
    assert "First touch of a region filled from a file on disk" in done.stdout
    assert not list(tmp_path.glob("sfbench-*")), "the file is removed"


def test_a_file_on_tmpfs_cannot_be_cold() -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    assert filesource._file_system(shm) == "tmpfs"
    assert not filesource.can_be_cold(shm / "anything")

"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import posix_ipc
import pytest

HUGEPAGES_2M = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")


@pytest.fixture
def shm_prefix() -> Iterator[str]:
    """A POSIX shm name prefix of this test alone; every object under it is unlinked after."""
    prefix = f"shmfault-test-{secrets.token_hex(4)}"
    yield prefix
    for entry in os.listdir("/dev/shm"):
        if entry.startswith(prefix + "."):
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_shared_memory("/" + entry)


@pytest.fixture
def huge_pages() -> Iterator[int]:
    """Reserve 4 huge pages of 2 MiB for the test (root only), restoring the old count after.
    Skips where that is impossible."""
    try:
        old = int(HUGEPAGES_2M.read_text())
    except (OSError, ValueError):
        pytest.skip("no 2 MiB hugetlb pool on this kernel")
    if os.geteuid() != 0:
        pytest.skip("reserving huge pages needs root (writes nr_hugepages)")
    try:
        HUGEPAGES_2M.write_text(str(old + 4))
    except OSError as exc:
        pytest.skip(f"cannot reserve huge pages: {exc}")
    try:
        free = int((HUGEPAGES_2M.parent / "free_hugepages").read_text())
        if free < 4:
            pytest.skip(f"the kernel gave only {free} free huge pages")
        yield 4
    finally:
        HUGEPAGES_2M.write_text(str(old))


def no_free_huge_pages() -> bool:
    """True when the default hugetlb pool has no free page (the refusal can be tested)."""
    try:
        free = int((HUGEPAGES_2M.parent / "free_hugepages").read_text())
        reserved = int((HUGEPAGES_2M.parent / "resv_hugepages").read_text())
    except (OSError, ValueError):
        return False
    return free - reserved == 0

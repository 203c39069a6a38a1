"""10,000 attach and exit cycles leave the service's file descriptors and memory flat
(docs/reliability.md, "Nothing leaks").

Clients end every way they can: a DETACH, the connection's end without one (what a process
exit looks like to the service), and a real process that exits while attached (the pidfd).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shmfault.attach import attach
from shmfault.client import Client
from shmfault.engine import FINISHED_KEPT
from shmfault.store import Source
from tests.integration.attach_helpers import (
    PAGE,
    ChildMessages,
    child_pool,
    fd_count,
    random_file,
    settle,
)
from tests.integration.conftest import Service

CYCLES = 10_000
#: Cycles before the baseline: the service keeps the last FINISHED_KEPT ended attachments for
#: GetStats, so its memory grows until that many have ended, by design.
WARM_UP = FINISHED_KEPT + 200
#: Every this many cycles, a real process attaches and exits.
PROCESS_EVERY = 100
#: What "flat" allows: allocator noise, not a leak (a leak of even 1 KiB per cycle is 10 MiB).
RSS_SLACK = 4 << 20


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _attach_and_exit(messages: ChildMessages, handoff: str, region_id: str, token: str) -> None:
    attached = attach(handoff, region_id, token, mode="private-copy")
    attached.read(0, 1)
    os._exit(0)  # while attached: the service sees the process go


def _cycle(client: Client, region_id: str, index: int, spawn: object) -> None:
    if index % PROCESS_EVERY == PROCESS_EVERY - 1:
        _region, token, handoff = client.issue_attach_token(region_id)
        child = spawn(_attach_and_exit, handoff, region_id, token)  # type: ignore[operator]
        child.wait()
        return
    attached = client.attach(region_id, mode=("private-copy", "shared-copy")[index % 2])
    attached.read((index % 64) * PAGE, 1)
    if index % 3:
        attached.detach()
    else:
        attached.close()  # no DETACH: the connection just ends


@pytest.mark.timeout(600)
def test_ten_thousand_attach_and_exit_cycles_leave_fds_and_memory_flat(
    service: Service, client: Client, tmp_path: Path
) -> None:
    assert service.process is not None
    pid = service.process.pid
    path, _data = random_file(tmp_path, 64 * PAGE)
    region_id = client.create_region(64 * PAGE, source=Source.of_file(path)).id
    pool = child_pool()
    spawn = next(pool)

    def quiet() -> bool:
        return client.get_region(region_id).attachments == 0

    try:
        for index in range(WARM_UP):
            _cycle(client, region_id, index, spawn)
        settle(quiet, "every warm-up attachment ended")
        fds_before, rss_before = fd_count(pid), rss(pid)
        for index in range(CYCLES):
            _cycle(client, region_id, index, spawn)
        settle(quiet, "every attachment ended")
        settle(lambda: fd_count(pid) <= fds_before, f"fd count back to {fds_before}")
    finally:
        for _ in pool:
            pass
    grown = rss(pid) - rss_before
    assert grown <= RSS_SLACK, f"service RSS grew {grown} bytes over {CYCLES} cycles"
    assert fd_count(pid) == fds_before

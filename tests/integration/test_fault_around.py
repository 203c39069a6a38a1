"""Adaptive fault-around (``--fault-around-max``) against the real service and kernel: sequential
access takes fewer, larger fills and random access keeps the block, with the same bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from shmfault.store import Source
from tests.integration.attach_helpers import (
    FAULT_AROUND,
    LAZY_MODES,
    PAGE,
    Memory,
    entry_of,
    random_file,
    shuffled,
)
from tests.integration.conftest import Service

pytestmark = pytest.mark.timeout(60)

PAGES = 1024


@pytest.mark.parametrize("mode", LAZY_MODES)
def test_sequential_access_grows_the_window_random_access_does_not(
    service_dir: Path, shm_prefix: str, tmp_path: Path, mode: str
) -> None:
    running = Service(service_dir, shm_prefix, extra_args=["--fault-around-max", "256"])
    running.start()
    try:
        with running.client() as client:
            path, data = random_file(tmp_path, 2 * PAGES * PAGE)
            region = client.create_region(2 * PAGES * PAGE, source=Source.of_file(path)).id
            with client.attach(region, mode=mode) as attached:
                memory = Memory.of(attached)
                # The first half in order: 16, 32, 64, 128, 256, 256, 256... pages per fault.
                assert memory.wrong_pages(data, range(PAGES)) == []
                sequential = entry_of(client, attached.attachment_id)["counters"]["faults"]
                assert sequential <= 8, f"{sequential} faults for {PAGES} pages in order"
                # The second half at random: one block per fault, as without growth.
                assert memory.wrong_pages(data, shuffled(range(PAGES, 2 * PAGES), 3)) == []
                counters = entry_of(client, attached.attachment_id)["counters"]
                # One fault per block the sequential run's last window (up to 256 pages past
                # the first half) did not fill: never a window larger than the block.
                random_faults = counters["faults"] - sequential
                assert (PAGES - 256) // FAULT_AROUND <= random_faults <= PAGES // FAULT_AROUND
                # Every page filled exactly once, growing or not.
                assert counters["pages_filled"] == 2 * PAGES
    finally:
        running.stop()

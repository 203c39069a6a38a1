"""The spin after activity (``--spin-us``) against the real service and kernel: a client that
faults again within the window is served by the spinning engine (its polls find the fault), a
client that pauses longer than the window gets only a short probe; the bytes are the same."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from shmfault.store import Source
from tests.integration.attach_helpers import PAGE, Memory, random_file, shuffled
from tests.integration.conftest import Service

pytestmark = pytest.mark.timeout(60)

PAGES = 512


def engine_stats(service: Service) -> dict[str, int]:
    """The engine_stats line the service logs when it stops."""
    line = next(line for line in service.logs().splitlines() if "event=engine_stats" in line)
    return {key: int(value) for key, value in re.findall(r"(spin_\w+)=(\d+)", line)}


def test_rapid_faults_are_caught_by_the_spin(
    service_dir: Path, shm_prefix: str, tmp_path: Path
) -> None:
    spinning = Service(service_dir, shm_prefix, ["--spin-us", "200", "--fault-around", "1"])
    spinning.start()
    try:
        with spinning.client() as client:
            path, data = random_file(tmp_path, PAGES * PAGE)
            region = client.create_region(PAGES * PAGE, source=Source.of_file(path))
            with client.attach(region, mode="private-copy") as attached:
                memory = Memory.of(attached)
                # Back to back: each fault comes well within 200 us of the last one served.
                assert memory.wrong_pages(data, shuffled(range(PAGES), 1)) == []
    finally:
        assert spinning.stop() == 0
    stats = engine_stats(spinning)
    assert stats["spin_us"] == 200
    # Most faults come within the window; under a loaded machine fewer, never none.
    assert stats["spin_hits"] >= PAGES // 16, stats
    assert stats["spin_polls"] >= stats["spin_hits"]


def test_faults_further_apart_than_the_window_get_only_a_probe(
    service_dir: Path, shm_prefix: str, tmp_path: Path
) -> None:
    spinning = Service(
        service_dir,
        shm_prefix,
        ["--spin-us", "2000", "--fault-around", "1", "--fault-around-max", "0"],
    )
    spinning.start()
    try:
        with spinning.client() as client:
            path, data = random_file(tmp_path, 16 * PAGE)
            region = client.create_region(16 * PAGE, source=Source.of_file(path))
            with client.attach(region, mode="private-copy") as attached:
                memory = Memory.of(attached)
                for page in range(16):
                    time.sleep(0.02)  # ten windows apart
                    assert memory.wrong_pages(data, [page]) == []
    finally:
        assert spinning.stop() == 0
    stats = engine_stats(spinning)
    # Every window after a 20 ms pause was a 125 us probe: the 16 faults cost 2 ms of spinning
    # (and the handshake, the detach and the stop, which come quickly after each other, a few
    # whole windows), not 16 whole windows (32 ms) and more.
    assert stats["spin_probes"] >= 16, stats
    assert stats["spin_time_ns"] < 24_000_000, stats

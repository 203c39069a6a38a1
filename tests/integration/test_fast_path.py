"""The C fast path (``shmfault/_fastpath.c``) against the real service and kernel.

Each test runs the same client work on a service with the fast path and on one without
(``--no-fast-path``): the bytes and the counters must be the same; only who served the faults
differs, which the engine_stats line logged at stop says (``native_faults``, the faults served
in C, and ``native_handoffs``, the readinesses handed to Python). The cases the C side hands
to Python (events, a region with written pages, a source of another region) are checked to
actually go there.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shmfault import _libc, fastpath, recording
from shmfault.client import Client
from shmfault.store import Source
from tests.integration.attach_helpers import (
    LAZY_MODES,
    PAGE,
    Memory,
    entry_of,
    fd_count,
    make_region,
    random_file,
    settle,
    shuffled,
)
from tests.integration.conftest import Service

pytestmark = pytest.mark.timeout(120)

PAGES = 256
#: one page per fault, so that faults, pages filled and touches are the same number
ONE_PAGE = ["--fault-around", "1", "--fault-around-max", "0"]
PATHS = ("c", "python")


def engine_stats(service: Service) -> dict[str, int]:
    """The engine_stats line the service logs when it stops."""
    line = next(line for line in service.logs().splitlines() if "event=engine_stats" in line)
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)\b", line)}


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest) -> str:
    """Which engine path the service runs: "c" (the default) or "python"."""
    if request.param == "c" and fastpath.library() is None:
        pytest.skip(f"the C fast path is not loaded: {fastpath.unavailable_reason()}")
    return str(request.param)


@pytest.fixture
def started(service_dir: Path, shm_prefix: str, path: str) -> Iterator[Service]:
    """A service with one page per fault, with or without the fast path."""
    running = Service(
        service_dir, shm_prefix, [*ONE_PAGE, *(["--no-fast-path"] if path == "python" else [])]
    )
    running.start()
    try:
        yield running
    finally:
        if running.process is not None:
            running.stop()


def stop(service: Service) -> dict[str, int]:
    assert service.stop() == 0
    return engine_stats(service)


@pytest.mark.parametrize("source", ["zero", "file"])
@pytest.mark.parametrize("mode", LAZY_MODES)
def test_random_faults_read_right_and_are_counted_on_either_path(
    started: Service, tmp_path: Path, path: str, mode: str, source: str
) -> None:
    with started.client() as client:
        region, data = make_region(client, tmp_path, source, PAGES * PAGE)
        touched = shuffled(range(PAGES), 7)[: PAGES // 2]
        with client.attach(region.id, mode=mode) as attached:
            assert Memory.of(attached).wrong_pages(data, touched) == []
        # Read once it ended: the latency histogram of a live attachment may be a fault
        # behind (measured after the ioctl that woke the client; docs/architecture.md).
        entry = entry_of(client, attached.attachment_id)
        counters = entry["counters"]
        # One fault and one page per page touched, counted whoever served it; every fault's
        # latency is in the histogram.
        assert counters["faults"] == len(touched), counters
        assert counters["pages_filled"] == len(touched), counters
        assert counters["bytes_filled"] == len(touched) * PAGE, counters
        assert counters["zero_pages"] == (len(touched) if source == "zero" else 0), counters
        assert sum(bucket["count"] for bucket in entry["latency"]) == len(touched)
        # The region holds what the client saw (shared modes filled it; private-copy did not).
        assert client.read(region.id, 0, PAGES * PAGE) == data
    stats = stop(started)
    if path == "c":
        assert stats["fast_path"] == 1
        assert stats["native_faults"] == len(touched), stats
    else:
        assert stats["fast_path"] == 0
        assert "native_faults" not in stats


@pytest.mark.parametrize("mode", LAZY_MODES)
def test_sequential_faults_grow_the_window_on_either_path(
    service_dir: Path, shm_prefix: str, tmp_path: Path, path: str, mode: str
) -> None:
    running = Service(
        service_dir,
        shm_prefix,
        ["--fault-around-max", "256", *(["--no-fast-path"] if path == "python" else [])],
    )
    running.start()
    try:
        with running.client() as client:
            # 2 MiB: windows of 16, 32, 64, 128 and 256 pages, the last two split in halves
            # done at once (PARALLEL_COPY_BYTES) on a machine with two CPUs.
            region, data = make_region(client, tmp_path, "file", 2048 * PAGE)
            with client.attach(region.id, mode=mode) as attached:
                assert Memory.of(attached).wrong_pages(data, range(2048)) == []
            counters = entry_of(client, attached.attachment_id)["counters"]  # ended: final
            assert counters["faults"] <= 12, counters
            assert counters["pages_filled"] == 2048, counters
    finally:
        stats = stop(running)
    if path == "c":
        assert stats["native_faults"] == counters["faults"], stats


@pytest.mark.parametrize("mode", LAZY_MODES)
def test_a_region_of_another_region_and_written_pages_are_served_by_python(
    started: Service, tmp_path: Path, path: str, mode: str
) -> None:
    """Pages whose bytes are not simply the source's: the C side hands them over."""
    with started.client() as client:
        clone, clone_data = make_region(client, tmp_path, "clone", 32 * PAGE)
        written, written_data = make_region(client, tmp_path, "bytes", 32 * PAGE)
        for region, data in ((clone, clone_data), (written, written_data)):
            with client.attach(region.id, mode=mode) as attached:
                assert Memory.of(attached).wrong_pages(data, shuffled(range(32), 3)) == []
    stats = stop(started)
    if path == "c":
        # The clone is never registered with the C side; the written region's faults on
        # written pages go to Python (private-copy: the region has data there; shared modes:
        # the page exists, EEXIST), the others are served in C.
        assert 0 < stats["native_faults"] < 64, stats
        assert stats["native_handoffs"] > 0, stats


def test_events_go_to_python_before_the_faults_after_them(
    started: Service, tmp_path: Path, path: str
) -> None:
    with started.client() as client:
        region, data = make_region(client, tmp_path, "file", 64 * PAGE)
        with client.attach(region.id, mode="private-copy") as attached:
            memory = Memory.of(attached)
            assert memory.wrong_pages(data, range(64)) == []
            memory.write(0, b"private" * 100)
            _libc.madvise(attached.address, 8 * PAGE, _libc.MADV_DONTNEED)  # EVENT_REMOVE
            # The dropped pages read the region again, the private write is gone.
            assert memory.wrong_pages(data, range(64)) == []
        counters = entry_of(client, attached.attachment_id)["counters"]  # ended: final
        assert counters["events_remove"] == 1, counters
        assert counters["pages_filled"] == 64 + 8, counters
    stats = stop(started)
    if path == "c":
        assert stats["native_handoffs"] >= 1, stats


def test_region_writes_racing_faults_are_never_lost(
    started: Service, tmp_path: Path, path: str
) -> None:
    """WriteRegion takes the region lock that the C side fills under: a page written through
    gRPC while a client faults on it ends with the written bytes, whichever came first."""
    pages = 512
    with started.client() as client:
        source, _ = random_file(tmp_path, pages * PAGE)
        region = client.create_region(pages * PAGE, source=Source.of_file(source))
        written = {page: bytes([page % 251 + 1]) * PAGE for page in range(0, pages, 2)}
        with client.attach(region.id, mode="shared-copy") as attached:
            memory = Memory.of(attached)
            writer_client = Client(started.socket)
            failures: list[BaseException] = []

            def write_all() -> None:
                try:
                    for page, data in written.items():
                        writer_client.write(region.id, page * PAGE, data)
                except BaseException as exc:
                    failures.append(exc)

            writer = threading.Thread(target=write_all)
            writer.start()
            memory.read()  # every page faulted while the writes go on
            writer.join()
            writer_client.close()
            assert failures == []
            for page, data in written.items():
                assert memory.page(page) == data, page
                assert client.read(region.id, page * PAGE, PAGE) == data, page
    stop(started)


def test_a_recording_longer_than_the_c_sides_buffer_keeps_every_fault_in_order(
    started: Service, tmp_path: Path, path: str
) -> None:
    """The C side keeps 4,096 recorded faults; past that the engine takes them before it
    serves more, so the recording is whole and in fault order on either path."""
    pages = fastpath.RECORD_CAPACITY + 1000
    with started.client() as client:
        region, data = make_region(client, tmp_path, "file", pages * PAGE)
        order = shuffled(range(pages), 9)
        with client.attach(region.id, mode="shared-copy", record=True) as attached:
            assert Memory.of(attached).wrong_pages(data, order) == []
            attachment_id = attached.attachment_id
        settle(lambda: entry_of(client, attachment_id)["recording_id"] != "", "recording saved")
        recording_id = entry_of(client, attachment_id)["recording_id"]
        settle(
            lambda: any(r["recording_id"] == recording_id for r in client.list_recordings()),
            "recording written",
        )
        _info, encoded = client.get_recording(recording_id)
        assert recording.decode(encoded).pages() == order
    stats = stop(started)
    if path == "c":
        # Each time the buffer was full, one fault went to Python with it.
        assert stats["native_faults"] >= pages - pages // fastpath.RECORD_CAPACITY, stats


def two_cpus() -> list[int]:
    """Two CPUs this process may run on (the service, started from it, may too)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip(f"needs two CPUs to place lanes on; this process may use {cpus}")
    if fastpath.library() is None:
        pytest.skip(f"the C fast path is not loaded: {fastpath.unavailable_reason()}")
    return cpus[:2]


@contextlib.contextmanager
def running_on(cpu: int) -> Iterator[None]:
    """This thread, and the threads it starts meanwhile (Memory touches on one), on ``cpu``."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def lanes_of(stats_line: str) -> tuple[list[int], list[int]]:
    """The lanes' CPUs and the faults each served, from the engine_stats line."""
    cpus = re.search(r"lane_cpus=([\d,-]*)", stats_line)
    faults = re.search(r"lane_faults_each=([\d,]*)", stats_line)
    assert cpus is not None and faults is not None, stats_line
    return (
        [int(c) for c in cpus.group(1).split(",") if c],
        [int(f) for f in faults.group(1).split(",") if f],
    )


def stats_line(service: Service) -> str:
    return next(line for line in service.logs().splitlines() if "event=engine_stats" in line)


def test_lanes_are_pinned_and_serve_the_client_on_their_cpu_handing_back_what_they_cannot(
    service_dir: Path, shm_prefix: str, tmp_path: Path
) -> None:
    """Two fault threads: two lanes pinned to the first two CPUs. Both attachments of a client
    running on the second CPU are lent to that CPU's lane; their events and faults on written
    pages go back to the engine thread and the lane serves them on afterwards; bytes and
    counters are those of one thread."""
    first_cpu, second_cpu = two_cpus()
    running = Service(service_dir, shm_prefix, [*ONE_PAGE, "--fault-threads", "2"])
    running.start()
    try:
        with running.client() as client, running_on(second_cpu):
            first, first_data = make_region(client, tmp_path, "file", 64 * PAGE)
            region, data = make_region(client, tmp_path, "file", 64 * PAGE)
            written = bytes(range(256)) * (PAGE // 256)
            client.write(region.id, 40 * PAGE, written)
            expected = data[: 40 * PAGE] + written + data[41 * PAGE :]
            with (
                client.attach(first.id, mode="private-copy") as other,
                client.attach(region.id, mode="private-copy") as attached,
            ):
                assert entry_of(client, attached.attachment_id)["fault_thread_cpu"] == second_cpu
                memory = Memory.of(attached)
                assert memory.wrong_pages(expected, shuffled(range(64), 4)) == []
                _libc.madvise(attached.address, 8 * PAGE, _libc.MADV_DONTNEED)  # EVENT_REMOVE
                assert memory.wrong_pages(expected, shuffled(range(64), 5)) == []
                assert Memory.of(other).wrong_pages(first_data, range(64)) == []
            counters = entry_of(client, attached.attachment_id)["counters"]  # ended: final
            assert counters["faults"] == 64 + 8, counters
            assert counters["pages_filled"] == 64 + 8, counters
            assert counters["events_remove"] == 1, counters
    finally:
        stats = stop(running)
    assert stats["lanes"] == 2, stats
    # Two pages read from the written region went to Python (twice page 40: before and
    # after the REMOVE, if it was among the 8), the REMOVE too; the rest was served in C,
    # all of it by the lane on the client's CPU.
    assert stats["native_handoffs"] >= 2, stats
    assert stats["native_faults"] >= 64 + 64 + 8 - 3, stats
    cpus, faults = lanes_of(stats_line(running))
    assert cpus == [first_cpu, second_cpu]
    assert faults[0] == 0 and faults[1] == stats["native_faults"], faults
    assert f"lane_cpus={first_cpu},{second_cpu}" in next(
        line for line in running.logs().splitlines() if "event=fast_path" in line
    )
    assert stats["lane_moves"] == 0, stats


def test_an_attachment_follows_its_client_to_the_lane_on_its_new_cpu(
    service_dir: Path, shm_prefix: str, tmp_path: Path
) -> None:
    """The client moves to the other CPU: the lane serving it sees so (at most every 10 ms
    of faults) and the attachment moves to the lane there; nothing is lost on the way."""
    first_cpu, second_cpu = two_cpus()
    pages = 4096
    running = Service(service_dir, shm_prefix, [*ONE_PAGE, "--fault-threads", "2"])
    running.start()
    try:
        with running.client() as client:
            region, data = make_region(client, tmp_path, "file", pages * PAGE)
            order = shuffled(range(pages), 8)
            with client.attach(region.id, mode="shared-copy") as attached:
                memory = Memory.of(attached)
                with running_on(first_cpu):
                    assert memory.wrong_pages(data, order[:64]) == []
                    assert entry_of(client, attached.attachment_id)["fault_thread_cpu"] == first_cpu
                touched = 64
                with running_on(second_cpu):
                    # one page at a time, a little apart, until a look found the client moved
                    while touched < pages:
                        assert memory.wrong_pages(data, order[touched : touched + 1]) == []
                        touched += 1
                        entry = entry_of(client, attached.attachment_id)
                        if entry["fault_thread_cpu"] == second_cpu:
                            break
                    assert entry["fault_thread_cpu"] == second_cpu, f"{touched} faults"
                    assert memory.wrong_pages(data, order[touched : touched + 256]) == []
                    touched += 256
            counters = entry_of(client, attached.attachment_id)["counters"]  # ended: final
            assert counters["faults"] == touched, counters
            assert client.read(region.id, 0, pages * PAGE) == data
    finally:
        stats = stop(running)
    assert stats["lane_moves"] >= 1, stats
    cpus, faults = lanes_of(stats_line(running))
    assert cpus == [first_cpu, second_cpu]
    # The first lane served the first 64 and those until the look; the second the rest.
    assert faults[0] >= 64 and faults[1] >= 256, faults
    assert sum(faults) == stats["native_faults"] == touched, (faults, stats)


def test_the_thread_that_faulted_places_the_attachment_not_the_main_thread(
    service_dir: Path, shm_prefix: str, tmp_path: Path
) -> None:
    """The shmfault client enables UFFD_FEATURE_THREAD_ID: a fault names its thread, and a
    lane looks at that thread's CPU. Here the main thread stays on one CPU while another
    thread faults on the other."""
    first_cpu, second_cpu = two_cpus()
    pages = 4096
    running = Service(service_dir, shm_prefix, [*ONE_PAGE, "--fault-threads", "2"])
    running.start()
    try:
        with running.client() as client, running_on(first_cpu):
            region, data = make_region(client, tmp_path, "zero", pages * PAGE)
            with client.attach(region.id, mode="shared-copy") as attached:
                memory = Memory.of(attached)
                assert entry_of(client, attached.attachment_id)["fault_thread_cpu"] == first_cpu
                moved = threading.Event()

                def fault_from_the_other_cpu() -> None:
                    os.sched_setaffinity(0, {second_cpu})
                    for page in range(pages):
                        # a thread of its own: Memory touches on a thread it starts, which
                        # inherits this one's CPU
                        assert memory.wrong_pages(data, [page]) == []
                        if entry_of(client, attached.attachment_id)["fault_thread_cpu"] == (
                            second_cpu
                        ):
                            moved.set()
                            return

                faulter = threading.Thread(target=fault_from_the_other_cpu)
                faulter.start()
                faulter.join(60)
                assert moved.is_set()
    finally:
        stats = stop(running)
    assert stats["lane_moves"] >= 1, stats


def test_only_the_lanes_are_pinned_the_threads_they_start_are_not(
    service_dir: Path, shm_prefix: str, tmp_path: Path
) -> None:
    """A window of 256 KiB or more is copied in two halves at once, the second on a worker
    thread that a lane starts. Started by a pinned lane it would inherit the lane's one CPU
    and the halves would take turns; it must have every CPU the service has."""
    cpus = two_cpus()
    running = Service(
        service_dir,
        shm_prefix,
        ["--fault-around", "128", "--fault-around-max", "0", "--fault-threads", "2"],
    )
    running.start()
    assert running.process is not None
    pid = running.process.pid
    try:
        with running.client() as client, running_on(cpus[0]):
            region, data = make_region(client, tmp_path, "zero", 1024 * PAGE)
            with client.attach(region.id, mode="shared-copy") as attached:
                before = len(list(Path(f"/proc/{pid}/task").iterdir()))
                assert Memory.of(attached).wrong_pages(data, range(0, 1024, 128)) == []
                allowed = {}
                for task in Path(f"/proc/{pid}/task").iterdir():
                    status = (task / "status").read_text()
                    listed = re.search(r"^Cpus_allowed_list:\s*(\S+)", status, re.M)
                    assert listed is not None
                    allowed[task.name] = listed.group(1)
    finally:
        stats = stop(running)
    assert stats["native_faults"] == 8, stats
    single = sorted(
        cpus_list for cpus_list in allowed.values() if "," not in cpus_list and "-" not in cpus_list
    )
    # the two lanes, one CPU each; every other thread (the workers included) all of them
    assert single == [str(cpu) for cpu in cpus], allowed
    # the large windows started a worker (on the lane that served them)
    assert len(allowed) > before, (before, allowed)


def test_clients_hopping_between_cpus_while_attaching_and_detaching_lose_nothing(
    service_dir: Path, shm_prefix: str, tmp_path: Path
) -> None:
    """Four client threads, each on a region of its own, move to another CPU every few
    faults and detach and attach again now and then, so that attachments are moved between
    lanes while they fault, are taken back, and end. Every page reads right, moves happen,
    and nothing is left behind in the service."""
    cpus = two_cpus()
    pages = 512
    running = Service(service_dir, shm_prefix, [*ONE_PAGE, "--fault-threads", "2"])
    running.start()
    assert running.process is not None
    pid = running.process.pid
    try:
        with running.client() as client:
            regions = [make_region(client, tmp_path, "file", pages * PAGE) for _ in range(4)]
            baseline = fd_count(pid)
            failures: list[str] = []

            def hop(index: int) -> None:
                region, data = regions[index]
                rng = random.Random(index)
                try:
                    for round_ in range(3):
                        with client.attach(region.id, mode=LAZY_MODES[index % 3]) as attached:
                            memory = Memory.of(attached)
                            order = shuffled(range(pages), index * 10 + round_)
                            for start in range(0, pages, 8):
                                os.sched_setaffinity(0, {rng.choice(cpus)})
                                if memory.wrong_pages(data, order[start : start + 8]):
                                    failures.append(f"client {index}: wrong bytes")
                                    return
                                if start % 64 == 0:
                                    time.sleep(0.011)  # past the 10 ms between looks
                except Exception as exc:  # reported below, with the others
                    failures.append(f"client {index}: {exc!r}")

            threads = [threading.Thread(target=hop, args=(i,)) for i in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(100)
            assert not any(thread.is_alive() for thread in threads)
            assert failures == []
            settle(lambda: fd_count(pid) == baseline, "every attachment's fds closed")
            # the service still answers, and every attachment of the test has ended
            entries = client.stats()
            assert len(entries) == 12 and all(e["ended"] is not None for e in entries), entries
    finally:
        stats = stop(running)
    assert stats["lane_moves"] >= 1, stats
    assert stats["native_faults"] >= 1, stats


def test_one_fault_thread_starts_no_lane(
    service_dir: Path, shm_prefix: str, tmp_path: Path
) -> None:
    if fastpath.library() is None:
        pytest.skip(f"the C fast path is not loaded: {fastpath.unavailable_reason()}")
    running = Service(service_dir, shm_prefix, [*ONE_PAGE, "--fault-threads", "1"])
    running.start()
    try:
        with running.client() as client:
            regions = [make_region(client, tmp_path, "zero", 16 * PAGE) for _ in range(2)]
            for region, data in regions:
                with client.attach(region.id) as attached:
                    assert Memory.of(attached).wrong_pages(data, range(16)) == []
    finally:
        stats = stop(running)
    assert stats["lanes"] == 0, stats
    assert stats["native_faults"] == 32, stats
    assert "lane_cpus=none" in running.logs(), "the start line says there is no lane"

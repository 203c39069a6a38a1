"""Lazy attach against the real service (a subprocess) and the real kernel.

Every test that touches attached memory has a small timeout: a fault nobody resolves hangs the
touching thread forever, and that is this system's typical failure. This process touches through
attach_helpers.Memory (a bounded thread, GIL released), so a hung fault fails the test instead
of freezing it; where several clients matter they are forked processes (attach_helpers.Child),
whose every answer the test waits for with a bound.

Expected bytes are always computed here, from random file contents and writes this test made,
and compared byte for byte.
"""

from __future__ import annotations

import errno
import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shmfault import _libc, protocol
from shmfault._abi import Feature
from shmfault.attach import AttachError, attach
from shmfault.client import Client
from shmfault.errors import RegionBusyError
from shmfault.memory import default_huge_page_size
from shmfault.modes import CHAIN, Mode, UffdAccess, kernel_support
from shmfault.protocol import ErrorCode, ErrorMessage
from shmfault.store import Source
from shmfault.uffd import open_userfaultfd
from tests.integration.attach_helpers import (
    BACKINGS,
    FAULT_AROUND,
    LAZY_MODES,
    MODES,
    PAGE,
    SOURCES,
    Child,
    ChildMessages,
    Handoff,
    Memory,
    blocks_of,
    child_pool,
    entry_of,
    fd_count,
    handoff_pool,
    make_region,
    need_modes,
    random_file,
    settle,
    shuffled,
    wrong_pages,
)
from tests.integration.conftest import Service, cli

MADV_FREE = 8
SHARED_MODES = ("shared-copy", "shared-continue")


@pytest.fixture
def children() -> Iterator[Callable[..., Child]]:
    yield from child_pool()


@pytest.fixture
def handoffs() -> Iterator[Callable[[str | os.PathLike[str]], Handoff]]:
    yield from handoff_pool()


def token_for(client: Client, region_id: str) -> tuple[str, str, str]:
    """``(handoff socket, region id, token)``: what a client process needs to attach."""
    region, token, handoff = client.issue_attach_token(region_id)
    return handoff, region, token


def allocated(client: Client, region_id: str) -> int:
    return client.get_region(region_id).allocated_bytes


def page_of(data: bytes | memoryview, page: int) -> bytes:
    return bytes(data[page * PAGE : (page + 1) * PAGE])


# --- 1. every mode, every source, every backing ---


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backing", BACKINGS)
@pytest.mark.parametrize("source", SOURCES)
def test_every_mode_reads_the_source_byte_for_byte(
    client: Client, tmp_path: Path, source: str, backing: str
) -> None:
    need_modes(client, *MODES)
    pages = 64
    for mode in MODES:
        for order in ("random", "sequential"):
            region, expected = make_region(client, tmp_path, source, pages * PAGE, backing)
            before = allocated(client, region.id)
            with client.attach(region, mode=mode) as attachment:
                assert attachment.mode is Mode.from_name(mode)
                assert attachment.reasons == ""  # forced, and the kernel has every mode
                assert attachment.length == pages * PAGE
                assert attachment.page_size == PAGE
                # Lazy: nothing is filled before the first touch. Eager: all of it is.
                assert allocated(client, region.id) == (pages * PAGE if mode == "eager" else before)
                memory = Memory.of(attachment)
                if order == "random":
                    wrong = memory.wrong_pages(expected, shuffled(range(pages), seed=pages))
                else:
                    whole = memory.read()
                    wrong = [p for p in range(pages) if page_of(whole, p) != page_of(expected, p)]
                assert wrong == [], f"{mode}, {order} touches: pages {wrong} are not the source's"
            # The shared modes filled the region itself; private-copy filled only its own copy.
            assert allocated(client, region.id) == (
                before if mode == "private-copy" else pages * PAGE
            )
            assert client.read(region.id) == expected
            # Detached: the counters are final. Random order: one fault per block; in order the
            # window doubles (16 + 32 + the last 16 pages: 3 faults). The shared modes filled
            # what the region lacked, private-copy every page of its copy.
            entry = entry_of(client, attachment.attachment_id)
            assert entry["mode"] == mode
            counters = entry["counters"]
            if mode == "eager":
                assert counters["faults"] == counters["pages_filled"] == 0
            else:
                expected_faults = pages // FAULT_AROUND if order == "random" else 3
                assert counters["faults"] == expected_faults, order
                filled = pages if mode == "private-copy" else pages - before // PAGE
                assert counters["pages_filled"] == filled


@pytest.mark.timeout(30)
def test_default_mode_is_the_head_of_the_services_chain(client: Client, tmp_path: Path) -> None:
    region, expected = make_region(client, tmp_path, "file", 32 * PAGE)
    support = kernel_support(client.capabilities())
    head = next(mode for mode in CHAIN if not support[mode])
    with client.attach(region) as attachment:
        assert attachment.mode is head
        assert attachment.mode is Mode.SHARED_COPY  # this kernel has every feature
        assert attachment.reasons == ""
        assert not attachment.user_mode_only  # root gets a full userfaultfd
        assert Memory.of(attachment).read() == expected
        assert entry_of(client, attachment.attachment_id)["mode_reasons"] == ""


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", LAZY_MODES)
def test_a_write_to_an_unfilled_page_keeps_the_rest_of_the_page(
    client: Client, tmp_path: Path, mode: str
) -> None:
    need_modes(client, mode)
    # A write fault on a missing page: the page is filled from the source first, then written.
    region, expected = make_region(client, tmp_path, "file", 32 * PAGE)
    with client.attach(region, mode=mode) as attachment:
        memory = Memory.of(attachment)
        memory.write(20 * PAGE + 100, b"hello")
        page = memory.page(20)
    want = bytearray(page_of(expected, 20))
    want[100:105] = b"hello"
    assert page == bytes(want)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", ["zero", "file"])
def test_hugetlb_regions_in_every_mode(
    client: Client, tmp_path: Path, huge_pages: int, source: str
) -> None:
    need_modes(client, *MODES, hugetlb=True)
    huge = default_huge_page_size()
    size = 2 * huge  # the fixture reserved 4 huge pages: one region at a time fits
    path, data = random_file(tmp_path, size)
    for mode in MODES:
        if source == "zero":
            region, expected = client.create_region(size, backing="hugetlb"), bytes(size)
        else:
            region = client.create_region(size, backing="hugetlb", source=Source.of_file(path))
            expected = data
        with client.attach(region, mode=mode) as attachment:
            assert attachment.mode is Mode.from_name(mode)
            assert attachment.page_size == huge
            memory = Memory.of(attachment)
            # A base page inside the second huge page faults in the whole huge page.
            assert memory.read(huge + PAGE, PAGE) == expected[huge + PAGE : huge + 2 * PAGE], mode
            assert memory.read() == expected, mode
        client.delete_region(region.id)


# --- 2. who sees a write ---


def _write_then_read(
    messages: ChildMessages, handoff: str, region_id: str, token: str, mode: str
) -> dict[str, bytes]:
    with attach(handoff, region_id, token, mode=mode) as attachment:
        attachment.buffer[10 * PAGE + 100 : 10 * PAGE + 110] = b"from-child"
        messages.send("written")
        messages.recv()  # the parent has written page 20
        return {
            "page 10": page_of(attachment.buffer, 10),
            "page 20": page_of(attachment.buffer, 20),
        }


def _read_pages(
    messages: ChildMessages, handoff: str, region_id: str, token: str, mode: str, pages: list[int]
) -> dict[int, bytes]:
    with attach(handoff, region_id, token, mode=mode) as attachment:
        return {page: page_of(attachment.buffer, page) for page in pages}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", SHARED_MODES)
def test_shared_writes_are_seen_by_every_attachment_and_by_read_region(
    client: Client, tmp_path: Path, children: Callable[..., Child], mode: str
) -> None:
    need_modes(client, mode)
    region, source = make_region(client, tmp_path, "file", 64 * PAGE)
    expected = bytearray(source)
    with client.attach(region, mode=mode) as mine:
        writer = children(_write_then_read, *token_for(client, region.id), mode)
        assert writer.recv() == "written"
        expected[10 * PAGE + 100 : 10 * PAGE + 110] = b"from-child"
        # The child's write, into a page nobody had filled, is in this process's mapping...
        assert Memory.of(mine).page(10) == page_of(expected, 10)
        # ...and in the region.
        assert client.read(region.id, 10 * PAGE, PAGE) == page_of(expected, 10)
        Memory.of(mine).write(20 * PAGE + 5, b"from-parent")
        expected[20 * PAGE + 5 : 20 * PAGE + 16] = b"from-parent"
        writer.send("go")
        seen = writer.result()
        assert seen == {"page 10": page_of(expected, 10), "page 20": page_of(expected, 20)}
        # A private-copy attachment copies the region's current bytes, writes included.
        reader = children(_read_pages, *token_for(client, region.id), "private-copy", [10, 20, 30])
        assert reader.result() == {p: page_of(expected, p) for p in (10, 20, 30)}
    assert client.read(region.id) == bytes(expected)


@pytest.mark.timeout(30)
def test_private_copy_writes_stay_private(
    client: Client, tmp_path: Path, children: Callable[..., Child]
) -> None:
    region, source = make_region(client, tmp_path, "file", 64 * PAGE)
    with client.attach(region, mode="private-copy") as mine:
        memory = Memory.of(mine)
        memory.write(10 * PAGE, b"secret")
        private = bytearray(page_of(source, 10))
        private[:6] = b"secret"
        assert memory.page(10) == bytes(private)
        for mode in ("shared-copy", "private-copy"):
            other = children(_read_pages, *token_for(client, region.id), mode, [10])
            assert other.result() == {10: page_of(source, 10)}, mode
        assert client.read(region.id) == source
        # A write to the region reaches a private page not copied yet, never one copied.
        client.write(region.id, 10 * PAGE + 50, b"later")
        client.write(region.id, 40 * PAGE + 50, b"later")
        assert memory.page(10) == bytes(private)
        later = bytearray(page_of(source, 40))
        later[50:55] = b"later"
        assert memory.page(40) == bytes(later)


# --- 3. fill once, serve many ---


def _touch_together(
    messages: ChildMessages,
    handoff: str,
    region_id: str,
    token: str,
    mode: str,
    pages: list[int],
    expected: bytes,
) -> dict[str, Any]:
    with attach(handoff, region_id, token, mode=mode) as attachment:
        messages.send(attachment.attachment_id)
        messages.recv()  # every child is attached: touch at once
        wrong = wrong_pages(attachment.buffer, expected, pages)
        return {"mode": attachment.mode.wire_name, "wrong": wrong}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("modes", ["shared-copy", "shared-continue", "mixed"])
def test_eight_processes_fill_each_page_once(
    client: Client, tmp_path: Path, children: Callable[..., Child], modes: str
) -> None:
    need_modes(client, *(SHARED_MODES if modes == "mixed" else (modes,)))
    region_pages = 256
    path, data = random_file(tmp_path, region_pages * PAGE)
    region = client.create_region(region_pages * PAGE, source=Source.of_file(path))
    # Every child touches the 40 common pages and 24 of its own choice, in its own order, so
    # the children fault on the same pages and blocks at the same time. Pages 224.. are never
    # touched: the region must stay unfilled there.
    common = shuffled(range(224), seed=1)[:40]
    touched: set[int] = set()
    workers = []
    for index in range(8):
        own = shuffled(range(224), seed=100 + index)[:24]
        pages = shuffled({*common, *own}, seed=200 + index)
        touched.update(pages)
        mode = modes if modes != "mixed" else SHARED_MODES[index % 2]
        workers.append(children(_touch_together, *token_for(client, region.id), mode, pages, data))
    ids = [worker.recv() for worker in workers]
    assert client.get_region(region.id).attachments == 8
    for worker in workers:
        worker.send("go")
    for worker in workers:
        result = worker.result()
        assert result["wrong"] == [], f"child {worker.pid} read wrong bytes on {result['wrong']}"
    # Fault-around fills whole aligned blocks; a block is filled once, whoever faulted first.
    filled_pages = blocks_of(touched, region_pages)
    assert allocated(client, region.id) == filled_pages * PAGE
    entries = [entry_of(client, attachment_id) for attachment_id in ids]
    assert sum(e["counters"]["pages_filled"] for e in entries) == filled_pages
    assert sum(e["counters"]["bytes_filled"] for e in entries) == filled_pages * PAGE
    assert {e["pid"] for e in entries} == {w.pid for w in workers}
    assert all(e["end_reason"] == "the client detached" for e in entries)
    assert client.get_region(region.id).attachments == 0
    assert client.read(region.id) == data


# --- 4. statistics ---


def _touch_and_wait(
    messages: ChildMessages, handoff: str, region_id: str, token: str, mode: str, pages: list[int]
) -> None:
    with attach(handoff, region_id, token, mode=mode) as attachment:
        for page in pages:
            attachment.buffer[page * PAGE]  # the touch is the point
        messages.send(attachment.attachment_id)
        messages.recv()


@pytest.mark.timeout(30)
def test_stats_list_every_attachment_and_the_cli_agrees(
    service: Service, client: Client, tmp_path: Path, children: Callable[..., Child]
) -> None:
    region, _ = make_region(client, tmp_path, "file", 64 * PAGE)
    plan = {"shared-copy": [0, 20], "private-copy": [0, 40, 41, 63]}
    workers = {
        mode: children(_touch_and_wait, *token_for(client, region.id), mode, pages)
        for mode, pages in plan.items()
    }
    ids = {mode: worker.recv() for mode, worker in workers.items()}
    live = {entry["attachment_id"]: entry for entry in client.stats(region.id)}
    assert set(live) == set(ids.values())
    for mode, attachment_id in ids.items():
        entry = live[attachment_id]
        assert entry["ended"] is None
        assert entry["end_reason"] == ""
        assert entry["mode"] == mode
        assert entry["pid"] == workers[mode].pid
    for worker in workers.values():
        worker.send("detach")
        worker.result()
    entries = {entry["attachment_id"]: entry for entry in client.stats(region.id)}
    for mode, attachment_id in ids.items():
        entry = entries[attachment_id]
        blocks = len({page // FAULT_AROUND for page in plan[mode]})
        assert entry["region_id"] == region.id
        assert entry["pid"] == workers[mode].pid
        assert entry["uid"] == 0
        assert entry["length"] == 64 * PAGE
        assert entry["region_offset"] == 0
        assert entry["mode_reasons"] == ""
        assert entry["ended"] is not None and entry["started"] <= entry["ended"]
        assert entry["end_reason"] == "the client detached"
        counters = entry["counters"]
        # One fault per block touched: the first touch fills the whole block.
        assert counters["faults"] == counters["faults_missing"] == blocks
        assert counters["pages_filled"] == blocks * FAULT_AROUND
        assert counters["bytes_filled"] == blocks * FAULT_AROUND * PAGE
        assert counters["zero_pages"] == 0
        assert counters["outside"] == counters["abandoned"] == 0
        # Every resolved fault is in one latency bucket.
        assert sum(bucket["count"] for bucket in entry["latency"]) == blocks
        assert all(bucket["le_ns"] is None or bucket["le_ns"] > 0 for bucket in entry["latency"])
        assert 0 < counters["latency_p50_ns"] <= counters["latency_p99_ns"]
    # shared-copy filled blocks 0 and 1 of the region; private-copy filled only its own copy.
    assert allocated(client, region.id) == 2 * FAULT_AROUND * PAGE

    code, out, err = cli("stats", region.id, "--json", "--target", str(service.socket))
    assert code == 0, err
    assert json.loads(out) == client.stats(region.id)
    code, out, err = cli("stats", region.id, "--target", str(service.socket))
    assert code == 0, err
    lines = out.decode().splitlines()
    for mode, attachment_id in ids.items():
        (line,) = [line for line in lines if line.split()[0] == str(attachment_id)]
        assert mode in line
        assert str(workers[mode].pid) in line
        assert "ended: the client detached" in line


# --- 6. a client killed in the middle of a fault ---


def _fault_forever(
    messages: ChildMessages, handoff: str, region_id: str, token: str, pages: int
) -> None:
    attachment = attach(handoff, region_id, token, mode="shared-copy")
    messages.send(attachment.attachment_id)
    while True:
        for page in range(pages):
            attachment.buffer[page * PAGE]  # each untouched block is a fault
        # Punch the pages out of the region: the next round faults on every block again.
        _libc.madvise(attachment.address, attachment.length, _libc.MADV_REMOVE)


def wchan(pid: int) -> str:
    with open(f"/proc/{pid}/wchan") as handle:
        return handle.read()


#: Where the victim sleeps while the service does not answer: in a page fault, or in
#: madvise(MADV_REMOVE) waiting for its REMOVE event to be read.
IN_A_FAULT = "handle_userfault"
IN_AN_EVENT = "userfaultfd_event_wait_completion"


def stop_in_a_fault(service_pid: int, victim_pid: int) -> None:
    """SIGSTOP the service at a moment the victim is asleep in a page fault (the service is
    left stopped)."""
    while True:
        os.kill(service_pid, signal.SIGSTOP)
        settle(
            lambda: wchan(victim_pid) in (IN_A_FAULT, IN_AN_EVENT),
            f"the victim waits for the stopped service (it is in {wchan(victim_pid)!r})",
        )
        if wchan(victim_pid) == IN_A_FAULT:
            return
        os.kill(service_pid, signal.SIGCONT)  # caught in madvise: let it go on, try again


@pytest.mark.timeout(60)
@pytest.mark.parametrize("moment", ["blocked", "running"])
def test_a_client_killed_mid_fault_ends_alone(
    service: Service, client: Client, tmp_path: Path, children: Callable[..., Child], moment: str
) -> None:
    assert service.process is not None
    service_pid = service.process.pid
    pages = 2048
    region, expected = make_region(client, tmp_path, "file", pages * PAGE)
    survivor = client.attach(region, mode="shared-copy")
    try:
        baseline = fd_count(service_pid)
        victim = children(_fault_forever, *token_for(client, region.id), pages)
        victim_id = victim.recv()
        settle(
            lambda: entry_of(client, victim_id)["counters"]["faults"] > 3 * pages // FAULT_AROUND,
            "the victim faults round after round",
        )
        if moment == "blocked":
            # With the service stopped the victim's next fault cannot be answered: it is
            # asleep in handle_userfault when it is killed, for certain.
            stop_in_a_fault(service_pid, victim.pid)
            try:
                victim.kill()
            finally:
                os.kill(service_pid, signal.SIGCONT)
        else:
            victim.kill()
        assert os.WTERMSIG(victim.wait()) == signal.SIGKILL
        settle(lambda: entry_of(client, victim_id)["ended"] is not None, "the attachment ends")
        ended = entry_of(client, victim_id)
        assert ended["end_reason"] in (
            "the client process exited",
            "the client closed the handoff connection",
            "the client's memory is gone (ESRCH)",
        )
        settle(lambda: fd_count(service_pid) == baseline, f"the service is back at {baseline} fds")
        assert client.get_region(region.id).attachments == 1
        # The other client is served still, every byte right (the victim's MADV_REMOVE may
        # have punched pages out under it: they read as the source again).
        order = shuffled(range(pages), seed=7)
        assert Memory.of(survivor).wrong_pages(expected, order) == []
        assert entry_of(client, survivor.attachment_id)["ended"] is None
    finally:
        survivor.detach()
    assert "engine_crashed" not in service.logs()
    assert "fault_failed" not in service.logs()


# --- 7. madvise, mremap, munmap on attached memory ---


@pytest.mark.timeout(30)
def test_dontneed_on_private_copy_refills_from_the_region(client: Client, tmp_path: Path) -> None:
    region, source = make_region(client, tmp_path, "file", 64 * PAGE)
    with client.attach(region, mode="private-copy") as attachment:
        memory = Memory.of(attachment)
        memory.write(2 * PAGE, b"private")
        assert memory.read(2 * PAGE, 7) == b"private"
        # The region changes meanwhile, on a page to be dropped and on one to be kept.
        client.write(region.id, 3 * PAGE, b"region")
        client.write(region.id, 9 * PAGE, b"region")
        _libc.madvise(attachment.address, 8 * PAGE, _libc.MADV_DONTNEED)
        expected = bytearray(source)
        expected[3 * PAGE : 3 * PAGE + 6] = b"region"
        # The private write is gone and the dropped pages read the region as it is now; the
        # pages kept still hold what they were copied with.
        assert memory.wrong_pages(bytes(expected), range(16)) == []
        assert client.read(region.id, 9 * PAGE, 6) == b"region"
    counters = entry_of(client, attachment.attachment_id)["counters"]  # detached: final
    assert counters["events_remove"] == 1
    assert counters["pages_filled"] == FAULT_AROUND + 8


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", SHARED_MODES)
def test_dontneed_on_a_shared_mode_keeps_the_page_in_the_region(
    client: Client, tmp_path: Path, mode: str
) -> None:
    need_modes(client, mode)
    region, source = make_region(client, tmp_path, "file", 64 * PAGE)
    with client.attach(region, mode=mode) as attachment:
        memory = Memory.of(attachment)
        memory.write(2 * PAGE, b"shared")
        _libc.madvise(attachment.address, 8 * PAGE, _libc.MADV_DONTNEED)
        expected = bytearray(source)
        expected[2 * PAGE : 2 * PAGE + 6] = b"shared"
        assert memory.wrong_pages(bytes(expected), range(16)) == []
        assert client.read(region.id, 0, 16 * PAGE) == bytes(expected[: 16 * PAGE])
    counters = entry_of(client, attachment.attachment_id)["counters"]  # detached: final
    assert counters["events_remove"] == 1
    assert counters["pages_filled"] == FAULT_AROUND  # nothing filled twice


def _read_page_twice(
    messages: ChildMessages, handoff: str, region_id: str, token: str, mode: str, page: int
) -> bytes:
    with attach(handoff, region_id, token, mode=mode) as attachment:
        messages.send(page_of(attachment.buffer, page))
        messages.recv()  # the parent punched the page out of the region
        return page_of(attachment.buffer, page)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", SHARED_MODES)
@pytest.mark.parametrize("other_mode", SHARED_MODES)
def test_remove_on_a_shared_mode_reads_the_source_again_for_every_sharer(
    client: Client, tmp_path: Path, children: Callable[..., Child], mode: str, other_mode: str
) -> None:
    need_modes(client, mode, other_mode)
    region, source = make_region(client, tmp_path, "file", 64 * PAGE)
    with client.attach(region, mode=mode) as attachment:
        memory = Memory.of(attachment)
        memory.write(2 * PAGE, b"wrote")
        written = bytearray(page_of(source, 2))
        written[:5] = b"wrote"
        other = children(_read_page_twice, *token_for(client, region.id), other_mode, 2)
        assert other.recv() == bytes(written)
        before = allocated(client, region.id)
        _libc.madvise(attachment.address, 8 * PAGE, _libc.MADV_REMOVE)
        assert allocated(client, region.id) == before - 8 * PAGE
        # The other process had the page mapped and got no event of its own: the hole took
        # the page from its mapping too (a shared-continue engine must not trust its bitmap).
        other.send("removed")
        assert other.result() == page_of(source, 2)
        assert memory.wrong_pages(source, range(16)) == []
        assert client.read(region.id, 0, 16 * PAGE) == source[: 16 * PAGE]


@pytest.mark.timeout(30)
def test_madv_free_then_dontneed_on_private_copy_is_served(client: Client, tmp_path: Path) -> None:
    # MADV_FREE is reported as a REMOVE, yet the pages stay mapped until reclaim: the engine's
    # bitmap then says "not mapped" for mapped pages, and a range copy over the block stops
    # at the first of them with EEXIST. The page that faulted must still be served.
    region, source = make_region(client, tmp_path, "file", 64 * PAGE)
    with client.attach(region, mode="private-copy") as attachment:
        memory = Memory.of(attachment)
        assert memory.page(0) == page_of(source, 0)
        _libc.madvise(attachment.address, FAULT_AROUND * PAGE, MADV_FREE)
        _libc.madvise(attachment.address + 5 * PAGE, PAGE, _libc.MADV_DONTNEED)
        assert memory.page(5) == page_of(source, 5)
        assert memory.wrong_pages(source, range(64)) == []
    assert entry_of(client, attachment.attachment_id)["counters"]["events_remove"] == 2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", LAZY_MODES)
def test_mremap_moves_the_attachment(client: Client, tmp_path: Path, mode: str) -> None:
    need_modes(client, mode)
    pages = 64
    region, source = make_region(client, tmp_path, "file", pages * PAGE)
    attachment = client.attach(region, mode=mode)
    try:
        Memory.of(attachment).write(PAGE, b"moved")
        expected = bytearray(source)
        expected[PAGE : PAGE + 5] = b"moved"
        # A reserved range to move onto: MREMAP_FIXED makes the move certain.
        target = _libc.mmap(
            0, pages * PAGE, _libc.PROT_NONE, _libc.MAP_PRIVATE | _libc.MAP_ANONYMOUS
        )
        flags = _libc.MREMAP_MAYMOVE | _libc.MREMAP_FIXED
        moved = _libc.mremap(attachment.address, pages * PAGE, pages * PAGE, flags, target)
        assert moved == target
        # detach() must unmap where the memory is now.
        old, attachment.address = attachment.address, moved
        order = shuffled(range(pages), seed=3)
        assert Memory(moved, pages * PAGE).wrong_pages(bytes(expected), order) == []
    finally:
        attachment.detach()
    entry = entry_of(client, attachment.attachment_id)  # detached: final
    assert entry["counters"]["events_remap"] == 1
    assert entry["base"] == moved != old
    assert entry["counters"]["outside"] == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", LAZY_MODES)
def test_partial_munmap_leaves_the_rest_served(client: Client, tmp_path: Path, mode: str) -> None:
    need_modes(client, mode)
    pages = 64
    region, source = make_region(client, tmp_path, "file", pages * PAGE)
    with client.attach(region, mode=mode) as attachment:
        memory = Memory.of(attachment)
        assert memory.page(40) == page_of(source, 40)
        _libc.munmap(attachment.address + 32 * PAGE, 32 * PAGE)
        assert memory.wrong_pages(source, shuffled(range(32), seed=4)) == []
        assert entry_of(client, attachment.attachment_id)["ended"] is None
    # The detach above unregistered and unmapped a range with a hole in it, without hanging.
    entry = entry_of(client, attachment.attachment_id)
    assert entry["end_reason"] == "the client detached"
    assert entry["counters"]["events_unmap"] == 1


def _unmap_and_attach_again(
    messages: ChildMessages,
    handoff: str,
    region_id: str,
    first_token: str,
    second_token: str,
    mode: str,
    expected: bytes,
) -> dict[str, Any]:
    first = attach(handoff, region_id, first_token, mode=mode)
    assert page_of(first.buffer, 0) == page_of(expected, 0)
    # Everything unmapped, the attachment's connection still open. ``first`` is never used
    # again: its detach() would unmap whatever is at its address now.
    first.buffer.release()
    _libc.munmap(first.address, first.length)
    messages.send(first.attachment_id)
    messages.recv()
    with attach(handoff, region_id, second_token, mode=mode) as second:
        wrong = wrong_pages(second.buffer, expected, shuffled(range(64), seed=5))
        return {"id": second.attachment_id, "wrong": wrong}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", LAZY_MODES)
def test_munmap_everything_then_attach_again(
    client: Client, tmp_path: Path, children: Callable[..., Child], mode: str
) -> None:
    need_modes(client, mode)
    region, source = make_region(client, tmp_path, "file", 64 * PAGE)
    handoff, region_id, first_token = token_for(client, region.id)
    second_token = token_for(client, region.id)[2]
    worker = children(
        _unmap_and_attach_again, handoff, region_id, first_token, second_token, mode, source
    )
    first_id = worker.recv()
    # munmap returned once the service had read the UNMAP event; it counts it just after.
    settle(
        lambda: entry_of(client, first_id)["counters"]["events_unmap"] == 1,
        "the service counts the UNMAP",
    )
    assert entry_of(client, first_id)["ended"] is None  # the connection is the lifeline
    worker.send("attach again")
    result = worker.result()
    assert result["wrong"] == []
    assert entry_of(client, result["id"])["end_reason"] == "the client detached"
    settle(lambda: entry_of(client, first_id)["ended"] is not None, "the first attachment ends")


# --- 8. what the handoff socket refuses ---


def refused(connection: Handoff, message: protocol.Message | None, code: ErrorCode) -> str:
    """Check ``message`` is ERROR ``code`` and the service then closed; its text."""
    assert isinstance(message, ErrorMessage), message
    assert message.code is code, message.message
    assert connection.ended()
    return message.message


@pytest.fixture
def region_and_bytes(client: Client, tmp_path: Path) -> tuple[str, bytes]:
    region, source = make_region(client, tmp_path, "file", 32 * PAGE)
    return region.id, source


def still_serving(client: Client, region_id: str, source: bytes) -> None:
    """A real client attaches and reads every byte right; the refused handshakes left no
    attachment counted."""
    assert client.get_region(region_id).attachments == 0
    with client.attach(region_id) as attachment:
        assert Memory.of(attachment).read() == source


@pytest.mark.timeout(30)
def test_tokens_that_do_not_attach(
    service: Service,
    client: Client,
    tmp_path: Path,
    handoffs: Callable[[str | os.PathLike[str]], Handoff],
    region_and_bytes: tuple[str, bytes],
) -> None:
    region_id, source = region_and_bytes
    other, _ = make_region(client, tmp_path, "zero", 4 * PAGE)
    handoff = client.get_region(region_id).handoff_socket

    connection = handoffs(handoff)
    refused(connection, connection.hello(region_id, "not-a-token"), ErrorCode.DENIED)

    # Another region's token is no token for this one, and stays good for its own region.
    connection = handoffs(handoff)
    refused(connection, connection.hello(region_id, other.attach_token), ErrorCode.DENIED)
    with client.attach(other) as attachment:
        assert Memory.of(attachment).read() == bytes(4 * PAGE)

    # A token attaches once.
    _, token = token_for(client, region_id)[1:]
    with attach(handoff, region_id, token) as attachment:
        assert Memory.of(attachment).page(0) == source[:PAGE]
    connection = handoffs(handoff)
    refused(connection, connection.hello(region_id, token), ErrorCode.DENIED)

    connection = handoffs(handoff)
    message = connection.hello("r000000000000", token_for(client, region_id)[2])
    assert "r000000000000" in refused(connection, message, ErrorCode.NOT_FOUND)
    connection = handoffs(handoff)
    refused(connection, connection.hello("no-such-name", "token"), ErrorCode.NOT_FOUND)

    # A client without userfaultfd cannot have a lazy mode, and may not pretend otherwise.
    connection = handoffs(handoff)
    message = connection.hello(
        region_id, token_for(client, region_id)[2], mode=Mode.SHARED_COPY, access=UffdAccess.NONE
    )
    assert "no userfaultfd" in refused(connection, message, ErrorCode.MODE_UNAVAILABLE)
    still_serving(client, region_id, source)


def _welcomed(
    client: Client,
    handoffs: Callable[[str | os.PathLike[str]], Handoff],
    region_id: str,
    mode: Mode = Mode.SHARED_COPY,
) -> Handoff:
    handoff, _, token = token_for(client, region_id)
    connection = handoffs(handoff)
    welcome = connection.hello(region_id, token, mode=mode)
    assert isinstance(welcome, protocol.Welcome), welcome
    return connection


# Each case: the ATTACH (base, length, region_offset) for a mapping at ``address`` of a region
# of ``size`` bytes.
BAD_RANGES: dict[str, Callable[[int, int], tuple[int, int, int]]] = {
    "base unaligned": lambda address, size: (address + 1, size, 0),
    "length unaligned": lambda address, size: (address, size - 1, 0),
    "length zero": lambda address, size: (address, 0, 0),
    "longer than the region": lambda address, size: (address, size + PAGE, 0),
    "offset unaligned": lambda address, size: (address, PAGE, 100),
    "offset past the end": lambda address, size: (address, 2 * PAGE, size - PAGE),
    "base overflows": lambda address, size: ((1 << 64) - PAGE, 2 * PAGE, 0),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", BAD_RANGES)
def test_bad_ranges_are_refused(
    service: Service,
    client: Client,
    handoffs: Callable[[str | os.PathLike[str]], Handoff],
    region_and_bytes: tuple[str, bytes],
    case: str,
) -> None:
    assert service.process is not None
    region_id, source = region_and_bytes
    baseline = fd_count(service.process.pid)
    connection = _welcomed(client, handoffs, region_id)
    address = connection.map_region()
    uffd = connection.uffd(register=address)
    base, length, offset = BAD_RANGES[case](address, len(source))
    connection.send(protocol.Attach(base, length, offset), [uffd.fileno()])
    refused(connection, connection.receive(), ErrorCode.BAD_RANGE)
    # The service closed the userfaultfd it was given, and the connection.
    settle(lambda: fd_count(service.process.pid) == baseline, f"back at {baseline} fds")  # type: ignore[union-attr]
    still_serving(client, region_id, source)


def _pipe_end(connection: Handoff, address: int) -> int:
    read_end, write_end = os.pipe()
    os.close(write_end)
    return connection.own(read_end)


# Each case: the fd sent in place of the userfaultfd, for a mapping of the region at
# ``address``. The two with a forbidden feature are registered over the mapping, as a client
# would, so the refusal can only come from the feature.
BAD_UFFDS: dict[str, Callable[[Handoff, int], int]] = {
    "a pipe": _pipe_end,
    "a memfd": lambda connection, address: connection.own(os.memfd_create("not-a-uffd")),
    "a uffd without its handshake": lambda connection, address: connection.own(
        open_userfaultfd()[0]
    ),
    "a uffd with EVENT_FORK": lambda connection, address: connection.uffd(
        Feature.EVENT_FORK, register=address
    ).fileno(),
    "a uffd with SIGBUS": lambda connection, address: connection.uffd(
        Feature.SIGBUS, register=address
    ).fileno(),
    "a uffd without the features": lambda connection, address: connection.uffd(features=0).fileno(),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", BAD_UFFDS)
def test_bad_userfaultfds_are_refused(
    service: Service,
    client: Client,
    handoffs: Callable[[str | os.PathLike[str]], Handoff],
    region_and_bytes: tuple[str, bytes],
    case: str,
) -> None:
    assert service.process is not None
    region_id, source = region_and_bytes
    baseline = fd_count(service.process.pid)
    connection = _welcomed(client, handoffs, region_id)
    address = connection.map_region()
    fd = BAD_UFFDS[case](connection, address)
    connection.send(protocol.Attach(address, len(source), 0), [fd])
    refused(connection, connection.receive(), ErrorCode.BAD_UFFD)
    settle(lambda: fd_count(service.process.pid) == baseline, f"back at {baseline} fds")  # type: ignore[union-attr]
    still_serving(client, region_id, source)


@pytest.mark.timeout(30)
def test_a_mapping_registered_by_another_uffd_is_busy(
    client: Client,
    handoffs: Callable[[str | os.PathLike[str]], Handoff],
    region_and_bytes: tuple[str, bytes],
) -> None:
    region_id, source = region_and_bytes
    with client.attach(region_id, mode="shared-copy") as first:
        # A second attachment claims the first one's mapping with a userfaultfd of its own.
        connection = _welcomed(client, handoffs, region_id)
        uffd = connection.uffd()
        connection.send(protocol.Attach(first.address, first.length, 0), [uffd.fileno()])
        message = refused(connection, connection.receive(), ErrorCode.BAD_UFFD)
        assert os.strerror(errno.EBUSY) in message
        # The first attachment was not disturbed.
        assert Memory.of(first).read() == source
        assert entry_of(client, first.attachment_id)["ended"] is None
    still_serving(client, region_id, source)


@pytest.mark.timeout(30)
def test_malformed_and_unexpected_messages_are_refused(
    client: Client,
    handoffs: Callable[[str | os.PathLike[str]], Handoff],
    region_and_bytes: tuple[str, bytes],
) -> None:
    region_id, source = region_and_bytes
    handoff = client.get_region(region_id).handoff_socket
    connection = handoffs(handoff)
    connection.send(b"XXXX" + bytes(12))
    refused(connection, connection.receive(), ErrorCode.MALFORMED)
    # ATTACH before HELLO.
    connection = handoffs(handoff)
    connection.send(protocol.Attach(0, PAGE, 0))
    refused(connection, connection.receive(), ErrorCode.UNEXPECTED)
    # An fd on HELLO, which carries none.
    connection = handoffs(handoff)
    read_end, write_end = os.pipe()
    try:
        connection.send(protocol.Hello(region_id, token_for(client, region_id)[2]), [read_end])
    finally:
        os.close(read_end)
        os.close(write_end)
    refused(connection, connection.receive(), ErrorCode.MALFORMED)
    still_serving(client, region_id, source)


@pytest.mark.timeout(30)
def test_an_attach_at_a_region_offset_fills_within_its_aligned_blocks(
    client: Client,
    handoffs: Callable[[str | os.PathLike[str]], Handoff],
    tmp_path: Path,
) -> None:
    region, source = make_region(client, tmp_path, "file", 64 * PAGE)
    connection = _welcomed(client, handoffs, region.id)
    assert connection.welcome is not None and connection.region_fd is not None
    offset, pages = 3 * PAGE, 40
    address = connection.map_region(offset, pages * PAGE)
    uffd = connection.uffd(register=address, length=pages * PAGE)
    connection.send(protocol.Attach(address, pages * PAGE, offset), [uffd.fileno()])
    ready = connection.receive()
    assert isinstance(ready, protocol.Ready), ready
    memory = Memory(address, pages * PAGE)
    assert memory.page(0) == page_of(source, 3)
    # The block of region pages [0, 16) clipped to the attachment: pages 3 to 15.
    assert allocated(client, region.id) == 13 * PAGE
    assert memory.page(17) == page_of(source, 20)
    assert allocated(client, region.id) == (13 + 16) * PAGE
    expected = source[offset : offset + pages * PAGE]
    assert memory.wrong_pages(expected, shuffled(range(pages), seed=6)) == []
    # Pages outside [3, 43) of the region were never filled.
    assert allocated(client, region.id) == pages * PAGE
    connection.close()
    settle(lambda: entry_of(client, ready.attachment_id)["ended"] is not None, "the end")
    entry = entry_of(client, ready.attachment_id)
    assert entry["region_offset"] == offset
    assert entry["counters"]["pages_filled"] == pages


@pytest.mark.timeout(30)
def test_handshake_timeout(
    service_dir: Path,
    shm_prefix: str,
    handoffs: Callable[[str | os.PathLike[str]], Handoff],
) -> None:
    hurried = Service(service_dir, shm_prefix, ["--handshake-timeout", "1"])
    hurried.start()
    with hurried.client() as client:
        region = client.create_region(4 * PAGE)
        silent = handoffs(region.handoff_socket)
        halfway = handoffs(region.handoff_socket)
        assert isinstance(halfway.hello(region.id, region.attach_token), protocol.Welcome)
        assert client.get_region(region.id).attachments == 1
        # Nothing more from either: both get ERROR TIMEOUT, then the end of the connection.
        refused(silent, silent.receive(), ErrorCode.TIMEOUT)
        refused(halfway, halfway.receive(), ErrorCode.TIMEOUT)
        # The token redeemed by the HELLO no longer counts as an attachment.
        assert client.get_region(region.id).attachments == 0
        with client.attach(region.id) as attachment:
            assert Memory.of(attachment).read() == bytes(4 * PAGE)
    assert hurried.stop() == 0


# --- 9. deleting an attached region ---


@pytest.mark.timeout(30)
def test_delete_while_attached_is_busy_unless_forced(
    client: Client,
    handoffs: Callable[[str | os.PathLike[str]], Handoff],
    tmp_path: Path,
) -> None:
    region, source = make_region(client, tmp_path, "file", 32 * PAGE)
    connection = _welcomed(client, handoffs, region.id)
    address = connection.map_region()
    uffd = connection.uffd(register=address)
    connection.send(protocol.Attach(address, len(source), 0), [uffd.fileno()])
    ready = connection.receive()
    assert isinstance(ready, protocol.Ready), ready
    real = client.attach(region.id)
    assert Memory.of(real).page(0) == source[:PAGE]
    with pytest.raises(RegionBusyError, match="2 attachment"):
        client.delete_region(region.id)
    assert client.get_region(region.id).attachments == 2
    client.delete_region(region.id, force=True)
    for attachment_id in (ready.attachment_id, real.attachment_id):
        entry = entry_of(client, attachment_id)
        assert entry["ended"] is not None
        assert entry["end_reason"] == "the region was deleted (forced)"
    # The client's lifeline ends: the service closed the connection.
    assert connection.ended()
    # A detach after the end neither hangs nor raises.
    real.detach()
    assert real.closed


# --- the Python client's own refusals ---


@pytest.mark.timeout(30)
def test_require_and_forced_modes_raise_instead_of_stepping_down(
    client: Client, tmp_path: Path
) -> None:
    region, _ = make_region(client, tmp_path, "zero", 4 * PAGE)
    with client.attach(region, require="shared-copy") as attachment:
        assert attachment.mode is Mode.SHARED_COPY
    with pytest.raises(ValueError, match="unknown mode"):
        client.attach(region, mode="lazy")


def test_attach_error_is_raised_for_a_refused_token(client: Client, tmp_path: Path) -> None:
    region, _ = make_region(client, tmp_path, "zero", 4 * PAGE)
    with pytest.raises(AttachError) as caught:
        attach(region.handoff_socket, region.id, "wrong")
    assert caught.value.code is ErrorCode.DENIED
    assert client.get_region(region.id).attachments == 0


@pytest.mark.timeout(60)
def test_a_refused_attach_is_uncounted_before_its_error_arrives(
    client: Client,
    handoffs: Callable[[str | os.PathLike[str]], Handoff],
    region_and_bytes: tuple[str, bytes],
) -> None:
    # The HELLO counted an attachment; the ERROR that refuses the ATTACH must come after the
    # count is given back, or a client that reacts to it at once (deletes the region, say)
    # finds an attachment that is not there.
    region_id, source = region_and_bytes
    for _ in range(50):
        connection = _welcomed(client, handoffs, region_id)
        address = connection.map_region()
        uffd = connection.uffd(register=address)
        connection.send(protocol.Attach(address + 1, len(source), 0), [uffd.fileno()])
        message = connection.receive()
        assert isinstance(message, ErrorMessage) and message.code is ErrorCode.BAD_RANGE
        assert client.get_region(region_id).attachments == 0
        connection.close()


def _touch_after_the_source_shrank(
    messages: ChildMessages, handoff: str, region_id: str, token: str, mode: str, pages: int
) -> None:
    attachment = attach(handoff, region_id, token, mode=mode)
    messages.send((attachment.attachment_id, bytes(attachment.buffer[:PAGE])))
    assert messages.recv() == "shrunk"
    attachment.buffer[(pages - 1) * PAGE]  # its fault cannot be served: the parent kills us


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["shared-copy", "private-copy"])
def test_a_source_that_shrank_ends_the_attachment_saying_so(
    client: Client, tmp_path: Path, children: Callable[..., Child], mode: str
) -> None:
    """The fault path may copy from a mapping of the source file, which the first fault makes:
    a page the file no longer has then fails the copy (EFAULT), and the attachment ends with the
    source's own error, as a read of it would; never with wrong or zero bytes served."""
    pages = 4 * FAULT_AROUND
    path, data = random_file(tmp_path, pages * PAGE)
    region = client.create_region(pages * PAGE, source=Source.of_file(path)).id
    child = children(_touch_after_the_source_shrank, *token_for(client, region), mode, pages)
    try:
        attachment_id, first = child.recv()
        assert first == data[:PAGE]
        os.truncate(path, PAGE)
        child.send("shrunk")
        settle(lambda: entry_of(client, attachment_id)["ended"] is not None, "the attachment ends")
        reason = entry_of(client, attachment_id)["end_reason"]
        assert "shrank" in reason, reason
    finally:
        child.kill()

"""A service restart that attached clients survive (docs/reliability.md, "Restarts").

The client keeps its own userfaultfd: while the service is gone a fault blocks (never zeros).
The client library notices the end of its handoff connection and re-attaches (REATTACH,
docs/protocol.md) when the service is back; the restarted service wakes the whole range, since
the faults the dead one had read are never delivered again, and takes back a memfd region's
memory from a shared client (it did not survive the service).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from shmfault import protocol
from shmfault.attach import Link, attach
from shmfault.client import Client
from shmfault.store import Source
from tests.integration.attach_helpers import (
    FAULT_AROUND,
    PAGE,
    ChildMessages,
    Handoff,
    Memory,
    child_pool,
    entry_of,
    random_file,
    settle,
    shuffled,
)
from tests.integration.conftest import Service

pytestmark = pytest.mark.timeout(90)

PAGES = 8 * FAULT_AROUND
SIZE = PAGES * PAGE


def _region(client: Client, tmp_path: Path, backing: str = "memfd") -> tuple[str, bytes]:
    path, data = random_file(tmp_path, SIZE, f"restart-{os.urandom(3).hex()}")
    return client.create_region(SIZE, backing=backing, source=Source.of_file(path)).id, data


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("mode", ["shared-copy", "shared-continue", "private-copy"])
def test_an_attachment_survives_a_restart_with_its_bytes(
    service: Service, client: Client, tmp_path: Path, mode: str, how: int
) -> None:
    region_id, data = _region(client, tmp_path)
    expected = bytearray(data)
    attached = client.attach(region_id, mode=mode)
    memory = Memory.of(attached)
    first_half = range(PAGES // 2)
    assert memory.wrong_pages(data, first_half) == []
    written = b"written before the restart"
    memory.write(3 * PAGE + 100, written)
    expected[3 * PAGE + 100 : 3 * PAGE + 100 + len(written)] = written

    service.stop(how)
    settle(lambda: attached.link is Link.REATTACHING, "the client noticed the service gone")
    # A fault now blocks: there is nobody to serve it. It runs on once the service is back.
    outcome: list[bytes] = []
    # Not through Memory (which gives a touch 10 s): this one waits for a whole restart.
    toucher = threading.Thread(
        target=lambda: outcome.append(attached.read((PAGES - 1) * PAGE, PAGE)), daemon=True
    )
    toucher.start()
    time.sleep(0.2)
    assert not outcome, "a fault was answered with no service"
    service.start()
    # Bounded by the test's timeout (scaled where the machine is slow, as in an emulated VM).
    toucher.join()
    assert outcome == [bytes(expected[(PAGES - 1) * PAGE : PAGES * PAGE])]
    settle(lambda: attached.link is Link.ATTACHED, "re-attached")
    assert attached.reattaches == 1
    assert memory.wrong_pages(bytes(expected), shuffled(range(PAGES), 7)) == []
    with service.client() as again:
        entry = entry_of(again, attached.attachment_id)
        assert entry["ended"] is None
        assert "re-attached" in entry["mode_reasons"]
        attached.detach()
        settle(lambda: entry_of(again, attached.attachment_id)["ended"] is not None, "ended")
        assert again.get_region(region_id).attachments == 0
        if mode != "private-copy":
            # The shared client handed the region's memory back: what it wrote is the
            # region's, not lost with the service.
            assert again.read(region_id, 0, SIZE) == bytes(expected)
            assert not again.get_region(region_id).content_reset


def test_an_attachment_whose_client_never_returns_is_forgotten_after_the_grace(
    service_dir: Path, shm_prefix: str, tmp_path: Path
) -> None:
    running = Service(service_dir, shm_prefix, extra_args=["--reattach-grace", "1"])
    running.start()
    with running.client() as client:
        region_id, _data = _region(client, tmp_path)
        attached = client.attach(region_id, mode="private-copy")
    running.stop(signal.SIGKILL)
    attached.close()  # the client goes away while the service is down
    running.start()
    with running.client() as client:
        # Counted until the grace runs out: a region a client may come back to is busy.
        assert client.get_region(region_id).attachments == 1
        settle(lambda: client.get_region(region_id).attachments == 0, "the orphan expired")
        client.delete_region(region_id)
    assert "event=reattach_expired" in running.logs()
    running.stop()


def test_a_reattach_must_be_the_same_client_token_and_range(
    service: Service, client: Client, tmp_path: Path
) -> None:
    region_id, _data = _region(client, tmp_path)
    region, token, handoff_path = client.issue_attach_token(region_id)
    attached = Handoff(handoff_path)
    try:
        attached.hello(region, token, mode=protocol.Mode.PRIVATE_COPY)
        base = attached.map_region()
        uffd = attached.uffd(register=base).fileno()
        attached.send(protocol.Attach(base, SIZE), [uffd])
        assert isinstance(attached.receive(), protocol.Ready)
        service.stop(signal.SIGKILL)
        service.start()

        def reattach(token_: str, length: int) -> protocol.Message | None:
            other = Handoff(handoff_path)
            try:
                message = protocol.Reattach(
                    region, token_, protocol.Mode.PRIVATE_COPY, base, length, 0
                )
                other.send(message, [uffd])
                return other.receive()
            finally:
                other.close()

        refused = reattach("not-the-token", SIZE)
        assert isinstance(refused, protocol.ErrorMessage)
        assert refused.code is protocol.ErrorCode.DENIED
        refused = reattach(token, SIZE // 2)
        assert isinstance(refused, protocol.ErrorMessage)
        assert refused.code is protocol.ErrorCode.DENIED and "the attachment was" in refused.message
        # A refused claim is spent: the attachment is forgotten, its region free again.
        with service.client() as again:
            assert again.get_region(region_id).attachments == 0
    finally:
        attached.close()


STORM_PAGES = 4096  # 16 MiB per region: thousands of faults per client at --fault-around 1
STORM_CLIENTS = 8
#: The issue's bound: a client waits no longer than the restart plus this.
STORM_SLACK = 1.0


def _storm_client(
    messages: ChildMessages,
    handoff: str,
    region_id: str,
    token: str,
    mode: str,
    source: str,
    own_writes: list[tuple[int, bytes]],
    all_writes: list[tuple[int, bytes]],
    seed: int,
) -> tuple[float, list[int], int, float]:
    """Attach, write, wait for the go, touch every page in a random order (timing each touch;
    half of them, then wait for the parent to say go on), then check every page: (worst touch
    in seconds, wrong pages, re-attaches, when the touches ended on the monotonic clock)."""
    attached = attach(handoff, region_id, token, mode=mode)
    for offset, data in own_writes:
        attached.write(offset, data)
    messages.send("written")
    assert messages.recv() == "go"
    worst = 0.0
    order = shuffled(range(STORM_PAGES), seed)
    for index, page in enumerate(order):
        if index == len(order) // 2:
            messages.send("half")
            assert messages.recv() == "on"
        started = time.monotonic()
        attached.read(page * PAGE, 1)
        worst = max(worst, time.monotonic() - started)
    ended = time.monotonic()
    expected = bytearray(Path(source).read_bytes())
    # Shared: every client's writes are the region's. Private: only this client's own.
    for offset, data in all_writes if mode != "private-copy" else own_writes:
        expected[offset : offset + len(data)] = data
    got = attached.read(0, STORM_PAGES * PAGE)
    wrong = [
        page
        for page in range(STORM_PAGES)
        if got[page * PAGE : (page + 1) * PAGE] != expected[page * PAGE : (page + 1) * PAGE]
    ]
    reattaches = attached.reattaches
    attached.detach()
    return worst, wrong, reattaches, ended


@pytest.mark.timeout(240)
def test_a_storm_of_clients_survives_a_sigkill_of_the_service(
    service_dir: Path, shm_prefix: str, tmp_path: Path
) -> None:
    """8 client processes, shared and private, faulting when the service is SIGKILLed and
    restarted: every client finishes, every byte is the source's or what a client wrote
    before the kill, and none waits longer than the restart plus a second."""
    running = Service(service_dir, shm_prefix, extra_args=["--fault-around", "1"])
    running.start()
    size = STORM_PAGES * PAGE
    path, _data = random_file(tmp_path, size, "storm.bin")
    pool = child_pool()
    spawn = next(pool)
    try:
        with running.client() as client:
            shared = client.create_region(size, source=Source.of_file(path)).id
            private = client.create_region(size, source=Source.of_file(path)).id
            plans = []
            for index in range(STORM_CLIENTS):
                mode = ("shared-copy", "shared-continue", "private-copy", "private-copy")[index % 4]
                region = private if mode == "private-copy" else shared
                _region_id, token, handoff = client.issue_attach_token(region)
                # Disjoint spots: page 7 * index + 1, at an offset of its own.
                writes = [((7 * index + 1) * PAGE + 64 * index, f"client {index}".encode())]
                plans.append((handoff, region, token, mode, writes))
        all_shared_writes = [w for p in plans if p[3] != "private-copy" for w in p[4]]
        clients = [
            spawn(
                _storm_client,
                handoff,
                region,
                token,
                mode,
                str(path),
                writes,
                all_shared_writes,
                index,
            )
            for index, (handoff, region, token, mode, writes) in enumerate(plans)
        ]
        for child in clients:
            assert child.recv() == "written"
        for child in clients:
            child.send("go")
        # Mid-storm, deterministically: every client is half-way, with thousands of touches to
        # go (a private client's every one a fault) when the service dies a moment later.
        for child in clients:
            assert child.recv() == "half"
        for child in clients:
            child.send("on")
        killed = time.monotonic()
        running.stop(signal.SIGKILL)
        running.start()
        downtime = time.monotonic() - killed
        results = [child.result(timeout=120) for child in clients]
    finally:
        for _ in pool:
            pass
        running.stop()
    # A shared client may find its remaining pages filled by the others before the kill; any
    # client still touching then must have re-attached, once; the private ones always were.
    for index, (worst, wrong, reattaches, ended) in enumerate(results):
        assert wrong == [], f"client {index} read wrong pages {wrong[:10]}"
        if ended > killed or plans[index][3] == "private-copy":
            assert reattaches == 1, f"client {index} re-attached {reattaches} times"
        else:
            assert reattaches in (0, 1), f"client {index} re-attached {reattaches} times"
        assert worst <= downtime + STORM_SLACK, (
            f"client {index} waited {worst:.2f} s for a page; the service was down {downtime:.2f} s"
        )

"""The VMM's side of Firecracker's page-fault handler protocol, played the way Firecracker plays
it during ``PUT /snapshot/load`` with ``mem_backend.backend_type`` "Uffd", so no real VMM is
needed:

1. map every guest memory region as anonymous private memory (MAP_HUGETLB for a hugetlbfs
   guest);
2. open a userfaultfd (UFFDIO_API with EVENT_REMOVE: Firecracker asks for it when the snapshot
   has a balloon device) and register every region MISSING;
3. connect a SOCK_STREAM socket to the handler and send, in ONE sendmsg, the JSON array of
   regions (serde_json's compact form, fields in Firecracker's order: ``base_host_virt_addr``,
   ``size``, ``offset``, ``page_size``, ``page_size_kib``, the last two both in bytes) with
   the userfaultfd as the one SCM_RIGHTS fd;
4. keep the socket open and silent, and touch guest memory.

The VMM is a forked child (attach_helpers.Child): a fault blocks the faulting thread until the
service answers, so it must not be the test process. The child touches memory on command and
answers with what it read. Variants of step 3 (another payload, no fd, two fds, a fd that is no
userfaultfd) make the refusals testable.
"""

from __future__ import annotations

import array
import ctypes
import json
import mmap
import os
import random
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from shmfault import _libc
from shmfault._abi import Feature, RegisterMode
from shmfault.uffd import Uffd
from tests.integration.attach_helpers import ChildMessages

PAGE = mmap.PAGESIZE
MAP_HUGETLB = 0x40000
MADV_DONTNEED = 4


@dataclass(frozen=True)
class GuestRegion:
    """One guest memory region: ``length`` bytes holding the memory file's bytes at
    ``offset``, with pages of ``page_size`` bytes (larger than the base page: hugetlbfs)."""

    length: int
    offset: int
    page_size: int = PAGE


@dataclass(frozen=True)
class Handshake:
    """How the VMM sends its message; the defaults are exactly Firecracker's.

    ``payload``: bytes sent instead of the JSON of the regions (``{bases}`` is not expanded:
    give it whole). ``fds``: "uffd" (the one userfaultfd), "none", "two" (the userfaultfd and
    a pipe), "pipe" (a pipe instead of the userfaultfd). ``page_size_fields``: which page size
    fields the JSON carries ("both", "page_size", "legacy", "none": an older VMM).
    ``features``: what the userfaultfd's UFFDIO_API enables. ``page_size_sent``: a page size
    to claim instead of the region's."""

    payload: bytes | None = None
    fds: str = "uffd"
    page_size_fields: str = "both"
    features: Feature = Feature.EVENT_REMOVE
    page_size_sent: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: the second region's address claimed one page into the first's (an overlap)
    overlap: bool = False


def firecracker_json(
    bases: list[int], regions: list[GuestRegion], handshake: Handshake = Handshake()
) -> bytes:
    """The message as Firecracker's serde_json writes it (compact, fields in struct order)."""
    entries = []
    for base, region in zip(bases, regions, strict=True):
        entry: dict[str, Any] = {
            "base_host_virt_addr": base,
            "size": region.length,
            "offset": region.offset,
        }
        page_size = handshake.page_size_sent or region.page_size
        if handshake.page_size_fields in ("both", "page_size"):
            entry["page_size"] = page_size
        if handshake.page_size_fields in ("both", "legacy"):
            entry["page_size_kib"] = page_size  # bytes, despite the name, as Firecracker sends
        entry.update(handshake.extra)
        entries.append(entry)
    if handshake.overlap:
        entries[1]["base_host_virt_addr"] = bases[0] + PAGE
    return json.dumps(entries, separators=(",", ":")).encode()


class _Guest:
    """The child's guest memory: mapped regions and how to touch them."""

    def __init__(self, regions: list[GuestRegion]) -> None:
        self.regions = regions
        self.bases: list[int] = []
        protection = _libc.PROT_READ | _libc.PROT_WRITE
        for region in regions:
            flags = _libc.MAP_PRIVATE | _libc.MAP_ANONYMOUS
            if region.page_size != PAGE:
                flags |= MAP_HUGETLB
            self.bases.append(_libc.mmap(0, region.length, protection, flags))

    def read(self, index: int, offset: int, length: int) -> bytes:
        buffer = ctypes.create_string_buffer(length)
        # ctypes releases the GIL: a thread blocked in a fault here stops no other thread.
        _libc.copy_memory(ctypes.addressof(buffer), self.bases[index] + offset, length)
        return buffer.raw

    def write(self, index: int, offset: int, data: bytes) -> None:
        source = ctypes.create_string_buffer(data, len(data))
        _libc.copy_memory(self.bases[index] + offset, ctypes.addressof(source), len(data))

    def dontneed(self, index: int, offset: int, length: int) -> None:
        # What Firecracker does for a balloon inflation: the uffd reports EVENT_REMOVE.
        _libc.madvise(self.bases[index] + offset, length, MADV_DONTNEED)


def vmm(
    messages: ChildMessages,
    socket_path: str,
    regions: list[GuestRegion],
    memory_file: str,
    handshake: Handshake,
) -> None:
    """The VMM child: steps 1-3, then ("ready", bases) and commands until "exit"."""
    guest = _Guest(regions)
    uffd = Uffd.open(handshake.features)
    for base, region in zip(guest.bases, regions, strict=True):
        uffd.register(base, region.length, RegisterMode.MISSING)
    payload = handshake.payload
    if payload is None:
        payload = firecracker_json(guest.bases, regions, handshake)
    pipe_read, _pipe_write = os.pipe()
    fds = {
        "uffd": [uffd.fileno()],
        "none": [],
        "two": [uffd.fileno(), pipe_read],
        "pipe": [pipe_read],
    }[handshake.fds]
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    connection.connect(socket_path)
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sent = connection.sendmsg([payload], ancillary if fds else [])
    assert sent == len(payload), f"sent {sent} of {len(payload)} bytes"
    # Like Firecracker, the VMM keeps its own copy of the uffd: its memory stays registered, so
    # an untouched page blocks rather than reading zeros if the handler is gone.
    messages.send(("ready", guest.bases))
    with open(memory_file, "rb") as source:
        expected = source.read()
    while True:
        command, *arguments = messages.recv()
        if command == "exit":
            return
        messages.send(_run(command, arguments, guest, connection, expected))


def _run(
    command: str,
    arguments: list[Any],
    guest: _Guest,
    connection: socket.socket,
    expected: bytes,
) -> Any:
    if command == "read":
        index, offset, length = arguments
        return guest.read(index, offset, length)
    if command == "write":
        index, offset, data = arguments
        guest.write(index, offset, data)
        return None
    if command == "dontneed":
        index, offset, length = arguments
        guest.dontneed(index, offset, length)
        return None
    if command == "wait_closed":
        # Whether the handler closed the connection within the timeout (EOF), without reading
        # anything the handler might have sent (it never sends).
        (timeout,) = arguments
        if not select.select([connection], [], [], timeout)[0]:
            return False
        return connection.recv(1, socket.MSG_PEEK) == b""
    if command == "close_socket":
        connection.close()
        return None
    if command == "race":
        return _race(guest, expected, *arguments)
    raise ValueError(f"unknown command {command!r}")


#: The grain a torn read is checked at: memcpy moves at least this much at a time.
_GRAIN = 8


def _torn(data: bytes, wanted: bytes) -> bool:
    """Whether ``data`` is the file's bytes in part and zeros in the rest, grain by grain: what
    a read gets when the page is dropped (and refaulted as zeros) while it copies."""
    zero = bytes(_GRAIN)
    return all(
        data[at : at + _GRAIN] in (wanted[at : at + _GRAIN], zero)
        for at in range(0, len(data), _GRAIN)
    )


Observation = tuple[int, float, float, str]  # page, read began, read ended, what it read


def _read_until(
    guest: _Guest,
    expected: bytes,
    index: int,
    first: int,
    pages: int,
    seed: int,
    stop: threading.Event,
    progress: list[int],
    into: list[Observation],
) -> None:
    region = guest.regions[index]
    page = region.page_size
    zeros = bytes(page)
    rng = random.Random(seed)
    while not stop.is_set():
        order = list(range(first, first + pages))
        rng.shuffle(order)
        for number in order:
            began = time.monotonic()
            data = guest.read(index, number * page, page)
            ended = time.monotonic()
            source = region.offset + number * page
            wanted = expected[source : source + page]
            if data == wanted:
                kind = "file"
            elif data == zeros:
                kind = "zero"
            elif _torn(data, wanted):
                kind = "torn"
            else:
                kind = "other"
            into.append((number, began, ended, kind))  # list.append is atomic
            progress[0] += 1  # only a hint for when to drop: a lost update is harmless


def _race(
    guest: _Guest, expected: bytes, index: int, pages: int, rounds: int, readers: int
) -> dict[str, Any]:
    """Balloon inflation racing the guest: in every round, ``readers`` threads fault the pages
    of a range never touched before (random order, again and again) while another thread drops
    the whole range with MADV_DONTNEED. Every page read must be the memory file's bytes or zeros
    and nothing else (a read that overlaps the MADV_DONTNEED may get the file's bytes in part
    and zeros in the rest: the page went away under the copy); a read that began after the
    MADV_DONTNEED returned must be zeros (not the file again); a read that ended before it
    began must be the file's bytes."""
    region = guest.regions[index]
    page = region.page_size
    assert rounds * pages * page <= region.length, "the region is too small for the rounds"
    violations: list[str] = []
    counts = {"file": 0, "zero": 0, "torn": 0, "other": 0}
    for round_number in range(rounds):
        first = round_number * pages
        stop = threading.Event()
        progress = [0]
        observations: list[Observation] = []
        threads = [
            threading.Thread(
                target=_read_until,
                args=(guest, expected, index, first, pages, round_number * 100 + n, stop),
                kwargs={"progress": progress, "into": observations},
                daemon=True,
            )
            for n in range(readers)
        ]
        for thread in threads:
            thread.start()
        # Let the readers get going (some pages filled, more faults in flight), then drop all.
        deadline = time.monotonic() + 10
        while progress[0] < pages // 2 and time.monotonic() < deadline:
            time.sleep(0.0005)
        dropped_from = time.monotonic()
        guest.dontneed(index, first * page, pages * page)
        dropped_until = time.monotonic()
        # The readers go on after the drop: each page's next fault must bring zeros.
        while progress[0] < 3 * pages and time.monotonic() < deadline:
            time.sleep(0.0005)
        stop.set()
        for thread in threads:
            thread.join(30)
            if thread.is_alive():
                violations.append(f"round {round_number}: a reader is stuck in a fault")
                return {"violations": violations, "counts": counts}
        for number, began, ended, kind in observations:
            counts[kind] += 1
            where = f"round {round_number} page {number}"
            if kind == "other":
                violations.append(f"{where}: neither the file's bytes nor zeros")
            elif kind == "torn" and (ended < dropped_from or began > dropped_until):
                violations.append(
                    f"{where}: part file, part zeros, though read apart from MADV_DONTNEED"
                )
            elif began > dropped_until and kind != "zero":
                violations.append(f"{where}: read after MADV_DONTNEED returned is not zeros")
            elif ended < dropped_from and kind != "file":
                violations.append(f"{where}: read before MADV_DONTNEED began is not the file")
    return {"violations": violations, "counts": counts}

"""FaultEngine: serves the page faults of every attachment, on one thread, from one epoll.

For each attachment the engine watches three things: the client's userfaultfd (faults and
events), the handoff connection (DETACH, or its end: the client is gone) and a pidfd of the
client's process. Every batch of events read from a userfaultfd is applied in two passes:
REMOVE, UNMAP and REMAP first (an unread one makes every fill ioctl return EAGAIN, and they
change what the attachment maps), then the page faults.

Rules every fault read keeps:

- It ends in exactly one resolving ioctl (COPY, ZEROPAGE, CONTINUE), a WAKE, or a logged
  abandon when the client's mm is gone (ESRCH/ENOSPC): a thread is never left blocked.
- EEXIST means another path filled the page first (another attachment, a WriteRegion, a
  fault-around): the faulting thread is woken, not filled twice.
- EAGAIN is retried after the events queued behind it are read, never spun on.
- An address outside the attachment's range is never filled with region bytes: the page is
  unregistered from the client's userfaultfd and the thread woken, so it faults as if shmfault
  were not there.

The per-mode work (what "resolve" means) is in :meth:`FaultEngine._resolve`. All blocking work
(source reads) happens on the engine thread: a slow file source slows every attachment's faults,
which the benchmarks measure.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import itertools
import logging
import os
import queue
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from shmfault import _unix, logs, protocol
from shmfault.errors import (
    ShmfaultError,
    UffdError,
    UffdPageExistsError,
    UffdProcessGoneError,
    UffdRetryError,
)
from shmfault.events import Pagefault, Remap, Remove, Unmap
from shmfault.memory import BackingKind, RegionBacking
from shmfault.modes import Mode
from shmfault.uffd import Uffd

_log = logging.getLogger("shmfault.engine")


#: Faults and events read per read(2) of a userfaultfd.
EVENTS_PER_READ = 64
#: Times one fault is retried after EAGAIN (with the queued events read in between) before it is
#: woken unfilled and left to fault again.
MAX_RETRIES = 16
#: Times in a row one page may fault again after an EEXIST wake before the attachment is ended.
MAX_REFAULTS = 10_000
#: Finished attachments whose statistics are kept for GetStats.
FINISHED_KEPT = 1024

_next_attachment_id = itertools.count(1)


def new_attachment_id() -> int:
    """A process-unique attachment id."""
    return next(_next_attachment_id)


#: Latency histogram bucket upper bounds in nanoseconds: 1 us to ~1 s, doubling.
LATENCY_BOUNDS_NS: tuple[int, ...] = tuple(1000 << i for i in range(21))


@dataclass(slots=True)
class AttachmentStats:
    """Counters of one attachment. Latency is from the read(2) that returned the fault to the
    return of the ioctl that resolved it."""

    faults_missing: int = 0
    faults_minor: int = 0
    faults_wp: int = 0
    pages_filled: int = 0
    bytes_filled: int = 0
    zero_pages: int = 0
    wakes: int = 0
    eexist: int = 0
    eagain: int = 0
    outside: int = 0
    abandoned: int = 0
    events_remove: int = 0
    events_unmap: int = 0
    events_remap: int = 0
    latency_ns: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_NS) + 1))

    def record_latency(self, nanoseconds: int) -> None:
        self.latency_ns[bisect.bisect_left(LATENCY_BOUNDS_NS, nanoseconds)] += 1

    @property
    def faults(self) -> int:
        return self.faults_missing + self.faults_minor + self.faults_wp

    def percentile_ns(self, fraction: float) -> int | None:
        """Upper bound of the bucket holding the ``fraction`` quantile (None: no faults)."""
        total = sum(self.latency_ns)
        if not total:
            return None
        rank = fraction * total
        seen = 0
        for index, count in enumerate(self.latency_ns):
            seen += count
            if seen >= rank:
                return LATENCY_BOUNDS_NS[min(index, len(LATENCY_BOUNDS_NS) - 1)]
        return LATENCY_BOUNDS_NS[-1]

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__slots__ if name != "latency_ns"}
        data["faults"] = self.faults
        data["latency_p50_ns"] = self.percentile_ns(0.5)
        data["latency_p99_ns"] = self.percentile_ns(0.99)
        data["latency_histogram"] = [
            {"le_ns": bound, "count": count}
            for bound, count in zip((*LATENCY_BOUNDS_NS, None), self.latency_ns, strict=True)
            if count
        ]
        return data


@dataclass(eq=False)
class Attachment:
    """One client mapping of (part of) a region, served by the engine.

    ``base``/``length`` are the client's addresses; ``region_offset`` the region offset ``base``
    maps. The engine owns ``uffd``, ``connection`` and ``pidfd`` once :meth:`FaultEngine.add`
    has taken the attachment, and closes them when the attachment ends.
    """

    region: RegionBacking
    mode: Mode
    base: int
    length: int
    region_offset: int
    uffd: Uffd | None
    connection: socket.socket
    machine: protocol.ServiceConnection
    pid: int = 0
    uid: int = -1
    pidfd: int | None = None
    id: int = field(default_factory=new_attachment_id)
    stats: AttachmentStats = field(default_factory=AttachmentStats)
    started: float = field(default_factory=time.time)
    ended: float | None = None
    end_reason: str = ""
    #: one "mode: why" line per better mode passed over (WELCOME's reasons)
    mode_reasons: str = ""
    #: the page last answered EEXIST-and-woken, and how many times in a row (a livelock guard)
    refault_address: int = -1
    refaults: int = 0
    #: pages of this mapping the engine has filled and the client has not dropped since
    #: (private-copy and shared-continue; shared-copy asks the region file instead)
    mapped: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        self.mapped = bytearray(self.length // self.region.page_size)

    @property
    def region_id(self) -> str:
        return self.region.region_id

    def contains(self, address: int) -> bool:
        return self.base <= address < self.base + self.length

    def describe(self) -> dict[str, Any]:
        """Plain data for GetStats."""
        return {
            "attachment_id": self.id,
            "region_id": self.region_id,
            "mode": self.mode.wire_name,
            "mode_reasons": self.mode_reasons,
            "pid": self.pid,
            "uid": self.uid,
            "base": self.base,
            "length": self.length,
            "region_offset": self.region_offset,
            "started": self.started,
            "ended": self.ended,
            "end_reason": self.end_reason,
            "stats": self.stats.to_dict(),
        }


def _address_of(data: bytes) -> int:
    # c_char_p over a bytes object points at its buffer: no copy. ``data`` must outlive the use.
    address = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    assert address is not None
    return address


class _Retry(Exception):
    """The fault could not be resolved now (EAGAIN): read the queued events, then retry."""


class _Gone(Exception):
    """The client's mm is gone: end the attachment."""


_UFFD, _CONNECTION, _PIDFD, _CONTROL = range(4)


class FaultEngine:
    """Serves every attachment's faults on one thread. ``add``/``end``/``stop`` are thread-safe.

    ``fault_around_pages``: faults are resolved a block at a time (aligned, clipped to the
    attachment), filling the pages of the block the client has not got yet, so sequential
    access takes one fault per block instead of per page. ``on_end`` is called (on the engine
    thread) once per attachment after its fds are closed.
    """

    def __init__(
        self,
        *,
        fault_around_pages: int = 16,
        on_end: Callable[[Attachment], None] | None = None,
    ) -> None:
        if fault_around_pages < 1:
            raise ValueError(f"fault_around_pages must be >= 1, not {fault_around_pages}")
        self.fault_around_pages = fault_around_pages
        self._on_end = on_end
        self._epoll = select.epoll()
        self._wakeup = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wakeup, select.EPOLLIN)
        self._control: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._fds: dict[int, tuple[int, Attachment | None]] = {self._wakeup: (_CONTROL, None)}
        self._attachments: dict[int, Attachment] = {}
        self._finished: deque[Attachment] = deque(maxlen=FINISHED_KEPT)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="shmfault-engine", daemon=True)
        self._running = False

    # --- control (any thread) ---

    def start(self) -> None:
        """Start the engine thread."""
        self._running = True
        self._thread.start()

    def add(self, attachment: Attachment) -> None:
        """Start serving ``attachment`` (the engine takes its fds). Does not block; the
        attachment counts as live (``live_count``, ``attachments``) from the moment it returns."""
        with self._lock:
            self._attachments[attachment.id] = attachment
        self._control.put(("add", attachment))
        os.eventfd_write(self._wakeup, 1)

    def end(self, attachment_id: int, reason: str) -> None:
        """Stop serving an attachment (its faults are woken, its fds closed). Does not block."""
        self._control.put(("end", (attachment_id, reason)))
        os.eventfd_write(self._wakeup, 1)

    def end_region(self, region_id: str, reason: str, timeout: float = 5.0) -> None:
        """End every attachment of ``region_id`` and wait (up to ``timeout`` seconds) until the
        engine thread has done so. Thread-safe."""
        if not self._running:
            return
        done = threading.Event()
        self._control.put(("end_region", (region_id, reason, done)))
        os.eventfd_write(self._wakeup, 1)
        done.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """End every attachment and the engine thread; close the engine's fds. Blocks until the
        thread has finished (at most ``timeout`` seconds)."""
        if self._running:
            self._control.put(("stop", None))
            os.eventfd_write(self._wakeup, 1)
            self._thread.join(timeout)
        self._running = False
        with contextlib.suppress(OSError):
            self._epoll.close()
        with contextlib.suppress(OSError):
            os.close(self._wakeup)

    def attachments(self, region_id: str | None = None) -> list[dict[str, Any]]:
        """GetStats data of live attachments (of one region, or all) and of recently ended
        ones. Thread-safe; counters may be a batch behind."""
        with self._lock:
            chosen = [*self._attachments.values(), *self._finished]
        return [a.describe() for a in chosen if region_id is None or a.region_id == region_id]

    def live_count(self, *, uid: int | None = None) -> int:
        """Live attachments (of one client uid, or all). Thread-safe."""
        with self._lock:
            live = self._attachments.values()
            return sum(1 for a in live if uid is None or a.uid == uid)

    # --- the engine thread ---

    def _run(self) -> None:
        try:
            while True:
                for fd, _mask in self._epoll.poll():
                    kind, attachment = self._fds.get(fd, (None, None))
                    if kind == _CONTROL:
                        if not self._control_events():
                            return
                    elif attachment is None or attachment.id not in self._attachments:
                        continue  # ended earlier in this batch
                    elif kind == _UFFD:
                        self._serve_uffd(attachment)
                    elif kind == _CONNECTION:
                        self._serve_connection(attachment)
                    elif kind == _PIDFD:
                        self._finish(attachment, "the client process exited")
        except Exception:
            logs.exception(_log, "engine_crashed")
            raise
        finally:
            for attachment in list(self._attachments.values()):
                self._finish(attachment, "the service is stopping")

    def _control_events(self) -> bool:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wakeup)
        while True:
            try:
                command, argument = self._control.get_nowait()
            except queue.Empty:
                return True
            if command == "add":
                self._adopt(argument)
            elif command == "end":
                attachment = self._attachments.get(argument[0])
                if attachment is not None:
                    self._finish(attachment, argument[1])
            elif command == "end_region":
                region_id, reason, done = argument
                for attachment in list(self._attachments.values()):
                    if attachment.region_id == region_id:
                        self._finish(attachment, reason)
                done.set()
            elif command == "stop":
                return False

    def _watch(self, fd: int, kind: int, attachment: Attachment) -> None:
        self._fds[fd] = (kind, attachment)
        self._epoll.register(fd, select.EPOLLIN)

    def _adopt(self, attachment: Attachment) -> None:
        if attachment.id not in self._attachments:
            return  # ended (stop, a forced delete) before the engine thread got to it
        self._watch(attachment.connection.fileno(), _CONNECTION, attachment)
        if attachment.uffd is not None:
            self._watch(attachment.uffd.fileno(), _UFFD, attachment)
        if attachment.pidfd is not None:
            self._watch(attachment.pidfd, _PIDFD, attachment)
        logs.event(
            _log,
            logging.INFO,
            "attached",
            attachment=attachment.id,
            region=attachment.region_id,
            mode=attachment.mode.wire_name,
            pid=attachment.pid,
            length=attachment.length,
        )
        # Faults may have queued before the fd was watched: epoll reports them (level
        # triggered), so nothing more to do here.

    def _finish(self, attachment: Attachment, reason: str, reply: bytes | None = None) -> None:
        """End an attachment: stop watching it, close its uffd, count it ended (``on_end``),
        then send ``reply`` (so DETACHED means all of that is done) and close the rest."""
        if attachment.id not in self._attachments:
            return
        fds = [attachment.connection.fileno()]
        if attachment.uffd is not None and not attachment.uffd.closed:
            fds.append(attachment.uffd.fileno())
        if attachment.pidfd is not None:
            fds.append(attachment.pidfd)
        for fd in fds:
            self._fds.pop(fd, None)
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)
        if attachment.uffd is not None:
            attachment.uffd.close()
        attachment.ended = time.time()
        attachment.end_reason = reason
        with self._lock:
            del self._attachments[attachment.id]
            self._finished.append(attachment)
        logs.event(
            _log,
            logging.INFO,
            "detached",
            attachment=attachment.id,
            region=attachment.region_id,
            reason=reason,
            faults=attachment.stats.faults,
            pages_filled=attachment.stats.pages_filled,
        )
        if self._on_end is not None:
            try:
                self._on_end(attachment)
            except Exception:
                logs.exception(_log, "on_end_failed", attachment=attachment.id)
        if reply is not None:
            with contextlib.suppress(OSError):
                _unix.send_packet(attachment.connection, reply)
        attachment.connection.close()
        if attachment.pidfd is not None:
            os.close(attachment.pidfd)
            attachment.pidfd = None

    # --- the handoff connection ---

    def _serve_connection(self, attachment: Attachment) -> None:
        try:
            packet = _unix.recv_packet(attachment.connection)
        except OSError as exc:
            self._finish(attachment, f"the handoff connection failed: {exc.strerror}")
            return
        if packet is None:
            attachment.machine.connection_lost()
            self._finish(attachment, "the client closed the handoff connection")
            return
        event = attachment.machine.receive(packet.data, packet.fds, truncated=packet.truncated)
        if isinstance(event, protocol.DetachRequested):
            # Faults still queued are served first: a thread that faulted before DETACH runs on.
            if attachment.uffd is not None:
                self._serve_uffd(attachment)
            reply = attachment.machine.detached()
            reason = "the client detached"
        elif isinstance(event, protocol.Violation):
            _unix.close_fds(event.fds_to_close)
            reply = event.close_reply
            reason = f"protocol violation: {event.message}"
        else:  # nothing else is legal once attached; the machine says so
            reply = attachment.machine.error(
                protocol.ErrorCode.UNEXPECTED, f"unexpected {type(event).__name__}"
            )
            reason = "unexpected message"
        self._finish(attachment, reason, reply)

    # --- faults ---

    def _serve_uffd(self, attachment: Attachment) -> None:
        assert attachment.uffd is not None
        pending: deque[tuple[Pagefault, int, int]] = deque()
        try:
            if not self._read_batch(attachment, pending):
                return
            while pending:
                fault, read_at, tries = pending.popleft()
                try:
                    self._resolve(attachment, fault)
                except _Retry:
                    attachment.stats.eagain += 1
                    if tries >= MAX_RETRIES:
                        self._wake(attachment, fault.address)
                        continue
                    self._read_batch(attachment, pending)
                    pending.append((fault, read_at, tries + 1))
                    continue
                attachment.stats.record_latency(time.perf_counter_ns() - read_at)
        except _Gone:
            attachment.stats.abandoned += len(pending)
            self._finish(attachment, "the client's memory is gone (ESRCH)")
        except (UffdError, ShmfaultError, OSError) as exc:
            logs.event(
                _log, logging.ERROR, "fault_failed", attachment=attachment.id, error=str(exc)
            )
            for fault, _read_at, _tries in pending:
                self._wake(attachment, fault.address)
            self._finish(attachment, f"serving a fault failed: {exc}")

    def _read_batch(
        self, attachment: Attachment, pending: deque[tuple[Pagefault, int, int]]
    ) -> bool:
        """Read one batch: apply its events, queue its faults. False when nothing was read."""
        assert attachment.uffd is not None
        events = attachment.uffd.read_events(EVENTS_PER_READ)
        if not events:
            return False
        read_at = time.perf_counter_ns()
        stats = attachment.stats
        for event in events:
            if isinstance(event, Pagefault):
                if event.is_minor:
                    stats.faults_minor += 1
                elif event.is_write_protect:
                    stats.faults_wp += 1
                else:
                    stats.faults_missing += 1
                pending.append((event, read_at, 0))
            elif isinstance(event, Remove):
                stats.events_remove += 1
                self._forget(attachment, event.start, event.end)
            elif isinstance(event, Unmap):
                stats.events_unmap += 1
                self._forget(attachment, event.start, event.end)
            elif isinstance(event, Remap):
                stats.events_remap += 1
                self._remap(attachment, event)
            else:  # Fork: refused at handshake, so a kernel bug or a lie; never serve it
                _unix.close_fds([event.uffd_fd])
        return True

    def _forget(self, attachment: Attachment, start: int, end: int) -> None:
        """Pages in [start, end) were dropped or unmapped: they fault again when touched."""
        page = attachment.region.page_size
        first = max(start, attachment.base)
        last = min(end, attachment.base + attachment.length)
        if first < last:
            index = (first - attachment.base) // page
            count = -(-(last - first) // page)
            attachment.mapped[index : index + count] = bytes(count)

    def _remap(self, attachment: Attachment, event: Remap) -> None:
        # mremap moves (part of) the mapping. Only a move of the whole attachment keeps it
        # servable; a partial move leaves pieces the engine cannot address consistently, so
        # the moved part is simply no longer served (its faults land outside the range).
        if event.from_address == attachment.base and event.length >= attachment.length:
            attachment.base = event.to_address
        else:
            self._forget(attachment, event.from_address, event.from_address + event.length)

    def _wake(self, attachment: Attachment, address: int) -> None:
        assert attachment.uffd is not None
        page = attachment.region.page_size
        try:
            attachment.uffd.wake(address - address % page, page)
            attachment.stats.wakes += 1
        except UffdProcessGoneError as exc:
            raise _Gone from exc

    def _window(self, attachment: Attachment, offset: int) -> tuple[int, int]:
        """The fault-around block around region offset ``offset``, clipped to the attachment."""
        page = attachment.region.page_size
        block = self.fault_around_pages * page
        aligned = offset - offset % block
        # Both ends from the aligned block: clipping the start must not push the end into the
        # next block (an attachment at a region offset that is not a block multiple).
        start = max(aligned, attachment.region_offset)
        end = min(aligned + block, attachment.region_offset + attachment.length)
        return start, end

    def _resolve(self, attachment: Attachment, fault: Pagefault) -> None:
        uffd = attachment.uffd
        assert uffd is not None
        if not attachment.contains(fault.address):
            attachment.stats.outside += 1
            page = attachment.region.page_size
            page_address = fault.address - fault.address % page
            logs.event(
                _log,
                logging.WARNING,
                "fault_outside",
                attachment=attachment.id,
                address=fault.address,
            )
            with contextlib.suppress(UffdError):
                uffd.unregister(page_address, page)
            self._wake(attachment, page_address)
            return
        offset = attachment.region_offset + (fault.address - attachment.base)
        try:
            if attachment.mode is Mode.SHARED_COPY:
                self._shared_copy(attachment, uffd, offset)
            elif attachment.mode is Mode.SHARED_CONTINUE:
                self._shared_continue(attachment, uffd, offset)
            else:
                self._private_copy(attachment, uffd, offset)
        except UffdPageExistsError:
            attachment.stats.eexist += 1
            self._guard_refaults(attachment, fault.address)
            self._wake(attachment, fault.address)
        except UffdRetryError as exc:
            raise _Retry from exc
        except UffdProcessGoneError as exc:
            raise _Gone from exc
        except UffdError as exc:
            if exc.errno != errno.ENOENT:
                raise
            # No VMA at the address any more: the client unmapped it (its UNMAP event is on its
            # way) or its mm is being torn down. No thread can be waiting on a page that is not
            # mapped: there is nothing to fill or wake.
            attachment.stats.abandoned += 1

    def _guard_refaults(self, attachment: Attachment, address: int) -> None:
        """End the attachment when one page keeps faulting although the kernel says it is
        mapped (EEXIST, woken, faulted again): a state this engine does not understand, which
        would otherwise spin the engine thread at full CPU for every other client. Failing
        closed leaves that client's thread blocked, never reading wrong bytes."""
        page = address - address % attachment.region.page_size
        if page == attachment.refault_address:
            attachment.refaults += 1
            if attachment.refaults >= MAX_REFAULTS:
                raise UffdError(
                    errno.EEXIST,
                    "UFFDIO_COPY",
                    page,
                    attachment.region.page_size,
                    detail=f"the page faulted {MAX_REFAULTS} times in a row while mapped",
                )
        else:
            attachment.refault_address = page
            attachment.refaults = 0

    def _address(self, attachment: Attachment, offset: int) -> int:
        return attachment.base + (offset - attachment.region_offset)

    def _count_fill(self, attachment: Attachment, length: int, zero: bool) -> None:
        pages = length // attachment.region.page_size
        attachment.stats.pages_filled += pages
        attachment.stats.bytes_filled += length
        if zero:
            attachment.stats.zero_pages += pages

    def _shared_copy(self, attachment: Attachment, uffd: Uffd, offset: int) -> None:
        region = attachment.region
        start, end = self._window(attachment, offset)
        served = False
        with region.locked():
            # Holes of the region file in the block: exactly the pages nobody has yet. The
            # page that faulted is one of them unless someone filled it since the fault.
            for hole_start, hole_end in list(region.backing.holes(start, end)):
                address = self._address(attachment, hole_start)
                try:
                    # UFFDIO_ZEROPAGE does not exist for hugetlbfs (EINVAL): copy zeros there.
                    if region.content.zero and region.backing.kind is not BackingKind.HUGETLB:
                        uffd.zeropage(address, hole_end - hole_start)
                    else:
                        data = region.content.read(hole_start, hole_end - hole_start)
                        uffd.copy(address, _address_of(data), hole_end - hole_start)
                except (UffdPageExistsError, UffdRetryError) as exc:
                    # Raced with another filler: whatever got done is woken; make sure the
                    # faulting page is, too (it exists now, or the retry will fill it).
                    if hole_start <= offset < hole_end and exc.done <= offset - hole_start:
                        raise
                    continue
                region.backing.mark_filled(hole_start, hole_end)
                self._count_fill(attachment, hole_end - hole_start, region.content.zero)
                if hole_start <= offset < hole_end:
                    served = True
        if not served:
            self._wake(attachment, self._address(attachment, offset))

    def _shared_continue(self, attachment: Attachment, uffd: Uffd, offset: int) -> None:
        region = attachment.region
        page = region.page_size
        start, end = self._window(attachment, offset)
        filled = region.fill(start, end - start)  # into the page cache, through the service
        if filled:
            self._count_fill(attachment, filled, region.content.zero)
        first = (start - attachment.region_offset) // page
        index = (offset - attachment.region_offset) // page

        def map_run(run_start: int, run_end: int) -> None:
            uffd.continue_(attachment.base + run_start * page, (run_end - run_start) * page)

        served, _mapped = self._map_runs(
            attachment, first, first + (end - start) // page, index, map_run
        )
        if not served:
            self._map_one(attachment, index, lambda address: uffd.continue_(address, page))

    def _private_copy(self, attachment: Attachment, uffd: Uffd, offset: int) -> None:
        region = attachment.region
        page = region.page_size
        start, end = self._window(attachment, offset)
        first = (start - attachment.region_offset) // page
        index = (offset - attachment.region_offset) // page
        last = first + (end - start) // page
        block: list[bytes] = []  # read only when some page of the block is missing

        def map_run(run_start: int, run_end: int) -> None:
            if not block:
                block.append(region.peek(start, end - start))
            source = _address_of(block[0]) + (run_start - first) * page
            uffd.copy(attachment.base + run_start * page, source, (run_end - run_start) * page)

        served, mapped = self._map_runs(attachment, first, last, index, map_run)
        self._count_fill(attachment, mapped * page, False)
        if not served:
            page_data = region.peek(offset - offset % page, page)
            self._map_one(
                attachment, index, lambda address: uffd.copy(address, _address_of(page_data), page)
            )
            self._count_fill(attachment, page, False)

    def _map_runs(
        self,
        attachment: Attachment,
        first: int,
        last: int,
        index: int,
        map_run: Callable[[int, int], None],
    ) -> tuple[bool, int]:
        """Map the pages of ``[first, last)`` (page indexes of the mapping) that the bitmap says
        this mapping has not got, one ``map_run(run_start, run_end)`` per run: pages mapped
        already would stop a range ioctl with EEXIST. Returns whether page ``index`` was mapped
        here and how many pages were. Raises the ioctl's error when it stopped before ``index``
        for a reason other than EEXIST (the caller retries or wakes)."""
        page = attachment.region.page_size
        served = False
        mapped = 0
        for run_start, run_end in list(_runs(attachment.mapped, first, last)):
            try:
                map_run(run_start, run_end)
            except (UffdPageExistsError, UffdRetryError) as exc:
                done = exc.done // page
                attachment.mapped[run_start : run_start + done] = b"\x01" * done
                mapped += done
                if isinstance(exc, UffdPageExistsError):
                    attachment.mapped[run_start + done] = 1  # mapped already, bitmap or not
                elif run_start + done <= index < run_end:
                    raise
                continue
            attachment.mapped[run_start:run_end] = b"\x01" * (run_end - run_start)
            mapped += run_end - run_start
            if run_start <= index < run_end:
                served = True
        return served, mapped

    def _map_one(self, attachment: Attachment, index: int, resolve: Callable[[int], int]) -> None:
        """Resolve page ``index`` of the mapping alone, with ``resolve(address)``.

        For a fault the block's runs did not serve: the bitmap says this mapping has the page,
        yet it faulted, or a range ioctl stopped at a page mapped already. Bitmap and page
        tables disagree without an event to say so: a hole punched in the region (another
        sharer's MADV_REMOVE) unmaps the page from every mapping, but only the process that
        asked gets EVENT_REMOVE; a MADV_FREE'd page is reported removed yet stays until
        reclaim. Waking the thread would only make it fault again, forever. EEXIST here means
        the page really is mapped (a race): it is noted and the thread woken by the caller.
        """
        address = attachment.base + index * attachment.region.page_size
        try:
            resolve(address)
        except UffdPageExistsError:
            attachment.mapped[index] = 1
            raise
        attachment.mapped[index] = 1


def _runs(bitmap: bytearray, first: int, last: int) -> Iterator[tuple[int, int]]:
    """Runs ``[start, end)`` of zero bytes in ``bitmap[first:last]``."""
    index = first
    while index < last:
        start = bitmap.find(0, index, last)
        if start < 0:
            return
        end = bitmap.find(1, start, last)
        end = last if end < 0 else end
        yield start, end
        index = end

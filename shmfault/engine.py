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

An attachment is one userfaultfd over one or more ranges of one region (a shmfault client
attaches one; a Firecracker VMM hands over all its guest memory regions at once), each range
keeping one state byte per page: what the client has got from the engine, and whether a dropped
page refills from the region or, with balloon semantics, reads zeros.

The per-mode work (what "resolve" means) is in :meth:`FaultEngine._fill`, shared by faults and
by replay, which fills recorded pages ahead of the client one bounded step at a time between
epoll rounds, so a fault never waits behind more than one step. All blocking work (source reads)
happens on the engine thread: a slow file source slows every attachment's faults, which the
benchmarks measure.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import errno
import itertools
import logging
import os
import queue
import re
import select
import signal
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from shmfault import _unix, fastpath, logs, protocol
from shmfault._abi import UFFD_MSG_SIZE, UFFDIO_COPY_STRUCT, EventType, PagefaultFlag
from shmfault.errors import (
    ShmfaultError,
    UffdError,
    UffdPageExistsError,
    UffdProcessGoneError,
    UffdRetryError,
)
from shmfault.events import Event, Fork, Remap, Remove, Unmap, parse_events
from shmfault.memory import BackingKind, RegionBacking
from shmfault.modes import Mode
from shmfault.recording import Recorder
from shmfault.uffd import Uffd

_BASE_PAGE = os.sysconf("SC_PAGESIZE")
#: guards AttachmentStats.native against a fold while another thread merges
_FOLD_LOCK = threading.Lock()

_log = logging.getLogger("shmfault.engine")


#: After a gap longer than the spin window, spin only this fraction of it (a probe).
SPIN_PROBE_DIVISOR = 16

#: A copy at least this long is split in two, the second half issued on the copier thread
#: while the engine thread does the first: the kernel's copy (page allocation and memcpy) is the
#: bound of a large window, and UFFDIO_COPY releases the GIL (fcntl.ioctl), so the two run on
#: two CPUs at once.
PARALLEL_COPY_BYTES = 256 * 1024

#: Faults and events read per read(2) of a userfaultfd.
EVENTS_PER_READ = 64
#: Times one fault is retried after EAGAIN (with the queued events read in between) before it is
#: woken unfilled and left to fault again.
MAX_RETRIES = 16
#: Times in a row one page may fault again after an EEXIST wake before the attachment is ended.
MAX_REFAULTS = 10_000
#: Most lane threads that serve faults in C (FaultEngine ``threads``' default: one per CPU).
MAX_FAULT_THREADS = 4
#: A read of a client's userfaultfd that has not returned after this many seconds was made to
#: block by the client (it shares the file: it cleared O_NONBLOCK and read its own events).
READ_STALL = 0.25
#: The signal that interrupts such a read (sent to the engine thread only); the engine takes
#: it only when the application has not (its handler is SIG_DFL at start).
STALL_SIGNAL = signal.SIGUSR2
#: Recorded pages filled per step of a replay. Faults are served between steps, so this bounds
#: how long a fault waits behind a replay (a step of scattered pages is one ioctl per page).
PREFETCH_PAGES = 64
#: The end reason of the attachments the service's stop ends: they stay persisted, for their
#: clients to re-attach when it is back.
SERVICE_STOPPING = "the service is stopping"
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
    enomem: int = 0
    events_remove: int = 0
    events_unmap: int = 0
    events_remap: int = 0
    #: pages filled ahead of the client from a replayed recording
    pages_prefetched: int = 0
    latency_ns: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_NS) + 1))
    #: the C fast path's counters of the attachment while it serves it (see :meth:`merged`)
    native: fastpath.NativeAttachment | None = None

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

    def merged(self) -> AttachmentStats:
        """These counters with the C fast path's added: the attachment's whole count. The C
        side's are folded in for good (:meth:`fold_native`) when it stops serving it."""
        # A stats call on a gRPC thread may meet the engine thread folding: under the lock
        # it sees the counters either before the fold or after it, never both or neither.
        with _FOLD_LOCK:
            return self._merged()

    def _merged(self) -> AttachmentStats:
        native = self.native
        if native is None:
            return self
        total = dataclasses.replace(self, native=None, latency_ns=list(self.latency_ns))
        for name, value in native.counters().items():
            setattr(total, name, getattr(total, name) + value)
        for index, count in enumerate(native.latency()):
            total.latency_ns[index] += count
        return total

    def fold_native(self) -> None:
        """Add the C fast path's counters to these, for good (it no longer serves them)."""
        with _FOLD_LOCK:
            if self.native is not None:
                total = self._merged()
                for name in self.__slots__:
                    setattr(self, name, getattr(total, name))
                self.native = None

    def to_dict(self) -> dict[str, Any]:
        total = self.merged()
        data = {
            name: getattr(total, name)
            for name in self.__slots__
            if name not in ("latency_ns", "native")
        }
        data["faults"] = total.faults
        data["latency_p50_ns"] = total.percentile_ns(0.5)
        data["latency_p99_ns"] = total.percentile_ns(0.99)
        data["latency_histogram"] = [
            {"le_ns": bound, "count": count}
            for bound, count in zip((*LATENCY_BOUNDS_NS, None), total.latency_ns, strict=True)
            if count
        ]
        return data


#: Per-page states of a :class:`MappedRange` (one byte per page).
#: The client has not got the page from the engine (or dropped it since): fill it from the region.
ABSENT = 0
#: Filled from the region by the engine, not dropped since.
MAPPED = 1
#: Dropped by an EVENT_REMOVE on an attachment with ``zero_after_remove``: zeros on next fault.
REMOVED = 2
#: Zero-filled after a remove. Kept apart from MAPPED because the remove's zap may land after the
#: zero fill (the kernel queues EVENT_REMOVE before it zaps): a fault here means zeros again.
ZEROED = 3

_ABSENT_RUN = re.compile(b"\x00+")

#: The head of a ``uffd_msg`` as the fault path reads it: the event code, then (for a page
#: fault) its flags and address; the rest of the record is not needed there.
_PAGEFAULT_RECORD = struct.Struct("=B7xQQ")
# The ABI's enum members as plain ints: tested once per fault.
_EVENT_PAGEFAULT = int(EventType.PAGEFAULT)
_FLAG_WRITE = int(PagefaultFlag.WRITE)
_FLAG_WP = int(PagefaultFlag.WP)
_FLAG_MINOR = int(PagefaultFlag.MINOR)


@dataclass(eq=False)
class MappedRange:
    """One contiguous client range of an attachment: ``length`` bytes at client address ``base``
    mapping the region from ``region_offset``. ``pages`` holds one state byte per page
    (:data:`ABSENT`, :data:`MAPPED`, :data:`REMOVED`, :data:`ZEROED`); the attachment sizes it."""

    base: int
    length: int
    region_offset: int
    pages: bytearray = field(default_factory=bytearray, repr=False)
    #: adaptive fault-around: the region offset a sequential next fault would have (the end of
    #: the last window filled) and the window it would get, in pages
    sequential_next: int = -1
    window_pages: int = 0

    @property
    def end(self) -> int:
        return self.base + self.length

    def contains(self, address: int) -> bool:
        return self.base <= address < self.base + self.length

    def describe(self) -> dict[str, int]:
        return {"base": self.base, "length": self.length, "region_offset": self.region_offset}


@dataclass(eq=False)
class Attachment:
    """One client userfaultfd served by the engine: one or more ranges of one region.

    A shmfault client attaches one range; a Firecracker VMM hands over every guest memory region
    at once (``kind`` "firecracker"). The engine owns ``uffd``, ``connection`` and ``pidfd`` once
    :meth:`FaultEngine.add` has taken the attachment, and closes them when the attachment ends.
    ``machine`` is None for a connection that carries no shmfault protocol: then any byte on it,
    like its end, ends the attachment. ``zero_after_remove`` gives Firecracker's balloon
    semantics: a page dropped with MADV_DONTNEED (EVENT_REMOVE) reads zeros, not the region,
    on its next fault. ``recorder`` records every fault served; ``replay`` lists region page
    indexes the engine fills ahead of the client, between faults.
    """

    region: RegionBacking
    mode: Mode
    ranges: list[MappedRange]
    uffd: Uffd | None
    connection: socket.socket
    machine: protocol.ServiceConnection | None
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
    kind: str = "attach"
    zero_after_remove: bool = False
    recorder: Recorder | None = None
    #: the id the recording was saved under, once the attachment has ended
    recording_id: str = ""
    replay: Sequence[int] | None = None
    #: the next index of ``replay`` to fill
    replay_next: int = 0
    #: the store's key of the persisted attachment (re-attach after a restart); b"" if none
    reattach_key: bytes = b""
    #: a packet the engine sends on ``connection`` when it takes the attachment (READY)
    greeting: bytes = b""
    #: the page last answered EEXIST-and-woken, and how many times in a row (a livelock guard)
    refault_address: int = -1
    refaults: int = 0
    #: the C fast path's view of this attachment while it serves its faults (engine thread)
    native: fastpath.NativeAttachment | None = None
    #: range bases, sorted, for the address -> range search
    _bases: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.ranges:
            raise ValueError("an attachment needs at least one range")
        page = self.region.page_size
        for mapped_range in self.ranges:
            mapped_range.pages = bytearray(mapped_range.length // page)
        self._sort_ranges()

    def _sort_ranges(self) -> None:
        self.ranges.sort(key=lambda r: r.base)
        self._bases = [r.base for r in self.ranges]

    @property
    def region_id(self) -> str:
        return self.region.region_id

    @property
    def length(self) -> int:
        return sum(r.length for r in self.ranges)

    def range_of(self, address: int) -> MappedRange | None:
        """The range holding ``address``, or None."""
        if len(self.ranges) == 1:
            only = self.ranges[0]
            return only if only.contains(address) else None
        index = bisect.bisect_right(self._bases, address) - 1
        if index >= 0 and self.ranges[index].contains(address):
            return self.ranges[index]
        return None

    def range_at_offset(self, offset: int) -> MappedRange | None:
        """A range mapping region offset ``offset``, or None."""
        for mapped_range in self.ranges:
            if 0 <= offset - mapped_range.region_offset < mapped_range.length:
                return mapped_range
        return None

    def contains(self, address: int) -> bool:
        return self.range_of(address) is not None

    @property
    def replay_pending(self) -> int:
        return 0 if self.replay is None else max(0, len(self.replay) - self.replay_next)

    def describe(self) -> dict[str, Any]:
        """Plain data for GetStats. ``base``/``length``/``region_offset`` are the first
        range's (the only one of a shmfault attach); ``ranges`` lists them all."""
        first = self.ranges[0]
        native = self.native
        return {
            "attachment_id": self.id,
            "region_id": self.region_id,
            "kind": self.kind,
            "mode": self.mode.wire_name,
            "mode_reasons": self.mode_reasons,
            "pid": self.pid,
            "uid": self.uid,
            "base": first.base,
            "length": first.length,
            "region_offset": first.region_offset,
            "ranges": [r.describe() for r in self.ranges],
            "started": self.started,
            "ended": self.ended,
            "end_reason": self.end_reason,
            "recording": self.recorder is not None,
            "recording_id": self.recording_id,
            "replay_pages": 0 if self.replay is None else len(self.replay),
            "replay_pending": self.replay_pending,
            # where the C fast path serves it: its thread's CPU, or None (the engine thread,
            # Python, an unpinned lane, ended)
            "fault_thread_cpu": None if native is None or native.cpu < 0 else native.cpu,
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


class _Stalled(Exception):
    """The client made the engine's read of its userfaultfd block: end the attachment."""


def _lane_count(threads: int | None, cpus: Sequence[int]) -> int:
    """Lane threads for ``threads`` fault threads (None: the default) on ``cpus``."""
    if threads is None:
        threads = min(len(cpus), MAX_FAULT_THREADS)
    return 0 if threads <= 1 else threads


def spin_window(gap_ns: int, spin_ns: int) -> int:
    """The spin after a burst of activity that came ``gap_ns`` after the previous one: the whole
    ``spin_ns`` when such a spin would have caught that burst, else a 1/16 probe."""
    return spin_ns if gap_ns <= spin_ns else spin_ns // SPIN_PROBE_DIVISOR


def _interrupt_only(signum: int, frame: object) -> None:
    """STALL_SIGNAL's handler: its delivery interrupts the engine's read; nothing else."""


_UFFD, _CONNECTION, _PIDFD, _CONTROL, _HANDBACK = range(5)


class FaultEngine:
    """Serves every attachment's faults on one thread. ``add``/``end``/``stop`` are thread-safe.

    ``fault_around_pages``: faults are resolved a block at a time (aligned, clipped to the
    attachment), filling the pages of the block the client has not got yet, so sequential
    access takes one fault per block instead of per page. ``on_end`` is called (on the engine
    thread) once per attachment after its fds are closed.

    ``fault_around_max_pages``: where access is sequential (each fault where the last window
    ended), the window doubles up to this many pages; random access keeps the block. Equal to
    ``fault_around_pages`` (the default): no growth. Huge pages never grow.

    ``spin_us``: after serving something, the engine keeps polling without sleeping for this
    many microseconds before it blocks in epoll again. A client that faults again within that
    time is served without the cross-CPU wake-up of a sleeping thread (tens of microseconds on
    virtual machines), at the cost of that much CPU after each burst of activity (``spin``
    counters in :meth:`engine_stats`). Adaptive: when the last gap between two bursts was longer
    than the window, the next window is only a 1/16 probe, so a client faulting a little too
    far apart for the spin to catch does not cost a CPU for nothing. 0 never spins.

    ``fast_path``: wait and serve the common page fault in C (:mod:`shmfault.fastpath`) when
    the library is built; everything else, and every fault without it, is served here.
    ``threads``: with the fast path, how many threads serve faults in C. 1: this one alone.
    More: that many lane threads, each pinned to one of the CPUs the service may run on, and
    each attachment lent to the lane on its client's CPU (followed when the client moves:
    fastpath.NativeEngine); this thread then serves only the replaying ones. Default: one per
    CPU, at most :data:`MAX_FAULT_THREADS`, so one lane per CPU (none with one CPU).
    """

    def __init__(
        self,
        *,
        fault_around_pages: int = 16,
        fault_around_max_pages: int | None = None,
        spin_us: int = 0,
        on_end: Callable[[Attachment], None] | None = None,
        fast_path: bool = True,
        threads: int | None = None,
    ) -> None:
        if fault_around_pages < 1:
            raise ValueError(f"fault_around_pages must be >= 1, not {fault_around_pages}")
        maximum = fault_around_pages if fault_around_max_pages is None else fault_around_max_pages
        if maximum < fault_around_pages:
            raise ValueError(
                f"fault_around_max_pages ({maximum}) is below fault_around_pages "
                f"({fault_around_pages})"
            )
        self.fault_around_max_pages = maximum
        if spin_us < 0:
            raise ValueError(f"spin_us must be >= 0, not {spin_us}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, not {threads}")
        self.fault_around_pages = fault_around_pages
        self.spin_ns = spin_us * 1000
        #: the current spin window (adaptive: the whole spin_us, or a short probe)
        self.spin_window_ns = self.spin_ns
        #: windows cut down to a probe (the gap before them was longer than spin_us)
        self.spin_probes = 0
        #: polls made while spinning, those that found work, and time spent spinning
        self.spin_polls = 0
        self.spin_hits = 0
        self.spin_time_ns = 0
        self._on_end = on_end
        self._epoll = select.epoll()
        self._wakeup = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wakeup, select.EPOLLIN)
        self._control: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._fds: dict[int, tuple[int, Attachment | None]] = {self._wakeup: (_CONTROL, None)}
        self._attachments: dict[int, Attachment] = {}
        self._finished: deque[Attachment] = deque(maxlen=FINISHED_KEPT)
        #: attachments with replay pages left, served round robin
        self._prefetching: deque[Attachment] = deque()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="shmfault-engine", daemon=True)
        self._running = False
        #: the attachment whose userfaultfd the engine thread is reading, and since when
        self._reading: tuple[Attachment, float] | None = None
        #: the attachment whose read the stall guard interrupted
        self._stalled: Attachment | None = None
        #: the thread that copies the second half of a large window (None on one CPU)
        self._copier: concurrent.futures.ThreadPoolExecutor | None = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shmfault-copier")
            if (os.cpu_count() or 1) > 1
            else None
        )
        #: buffers of the engine thread, reused: one read's records, one ioctl's argument
        self._read_buffer = bytearray(EVENTS_PER_READ * UFFD_MSG_SIZE)
        self._ioctl_arg = bytearray(UFFDIO_COPY_STRUCT.size)  # the largest of them
        self._guard = threading.Thread(
            target=self._guard_reads, name="shmfault-engine-guard", daemon=True
        )
        lib = fastpath.library() if fast_path else None
        cpus = sorted(os.sched_getaffinity(0))
        #: the C side: waits on the epoll set and serves the common fault (None: Python only)
        self._native = (
            None
            if lib is None
            else fastpath.NativeEngine(
                lib,
                epoll_fd=self._epoll.fileno(),
                fault_around_pages=self.fault_around_pages,
                fault_around_max_pages=self.fault_around_max_pages,
                base_page=_BASE_PAGE,
                latency_bounds_ns=LATENCY_BOUNDS_NS,
                spin_ns=self.spin_ns,
                probe_divisor=SPIN_PROBE_DIVISOR,
                parallel_bytes=PARALLEL_COPY_BYTES if self._copier is not None else 0,
                lanes=_lane_count(threads, cpus),
                cpus=cpus,
            )
        )
        if self._native is not None:
            self._fds[self._native.handback_fd] = (_HANDBACK, None)
            self._epoll.register(self._native.handback_fd, select.EPOLLIN)

    @property
    def fast_path(self) -> bool:
        """Whether the C fast path serves the faults it can."""
        return self._native is not None

    @property
    def lane_cpus(self) -> list[int]:
        """The CPU each lane thread is pinned to (-1: not pinned); empty without lanes."""
        return [] if self._native is None else list(self._native.lane_cpus)

    # --- control (any thread) ---

    def start(self) -> None:
        """Start the engine thread."""
        self._running = True
        self._thread.start()
        # A handler can only be installed from the main thread; the service starts its engine
        # there. Elsewhere (a library user's thread) the guard stays off.
        if threading.current_thread() is threading.main_thread() and signal.getsignal(
            STALL_SIGNAL
        ) in (signal.SIG_DFL, _interrupt_only):
            signal.signal(STALL_SIGNAL, _interrupt_only)
            self._guard.start()

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
        if self._native is not None and not self._thread.is_alive():
            self._native.close()  # never under a thread still waiting in it
        if self._copier is not None:
            self._copier.shutdown(wait=True)
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

    def engine_stats(self) -> dict[str, Any]:
        """Engine-wide counters: the spin policy's polls, hits and time. Thread-safe (read
        without a lock: a batch behind at most)."""
        if self._native is not None:
            native = self._native.stats()
            return {
                "spin_us": self.spin_ns // 1000,
                "spin_window_us": native.pop("spin_window_ns") // 1000,
                "fast_path": 1,
                **native,
            }
        return {
            "spin_us": self.spin_ns // 1000,
            "spin_window_us": self.spin_window_ns // 1000,
            "fast_path": 0,
            "spin_probes": self.spin_probes,
            "spin_polls": self.spin_polls,
            "spin_hits": self.spin_hits,
            "spin_time_ns": self.spin_time_ns,
        }

    def live_count(self, *, uid: int | None = None) -> int:
        """Live attachments (of one client uid, or all). Thread-safe."""
        with self._lock:
            live = self._attachments.values()
            return sum(1 for a in live if uid is None or a.uid == uid)

    # --- the stall guard ---

    def _guard_reads(self) -> None:
        """Interrupt a read of a client's userfaultfd that blocks: the client shares the file
        and can clear O_NONBLOCK between the engine setting it and reading, after reading its
        own events; the engine thread, serving every client, must not wait on one."""
        ident = self._thread.ident
        assert ident is not None
        while self._running:
            time.sleep(READ_STALL / 2)
            reading = self._reading
            if reading is not None and time.monotonic() - reading[1] > READ_STALL:
                # Only a read that really was interrupted ends the attachment: one that returned
                # meanwhile (a thread descheduled for long on a busy machine) is not a stall.
                self._stalled = reading[0]
                if self._reading is reading:
                    with contextlib.suppress(ProcessLookupError, RuntimeError):
                        signal.pthread_kill(ident, STALL_SIGNAL)

    # --- the engine thread ---

    def _run(self) -> None:
        try:
            if self._native is not None:
                self._run_native(self._native)
            else:
                self._run_python()
        except Exception:
            logs.exception(_log, "engine_crashed")
            raise
        finally:
            for attachment in list(self._attachments.values()):
                self._finish(attachment, SERVICE_STOPPING)

    def _run_native(self, native: fastpath.NativeEngine) -> None:
        """The loop with the C side waiting: it spins, serves what it can and returns the fds
        left to this thread, which serves them as :meth:`_run_python` would."""
        while True:
            ready = native.wait(0 if self._prefetching else -1)
            if not self._dispatch(ready):
                return
            if self._prefetching:
                self._prefetch_step()
            if ready:
                native.mark_active()

    def _dispatch(self, ready: Iterable[int]) -> bool:
        """Serve the ready ``fds``; False once the engine is told to stop."""
        for fd in ready:
            kind, attachment = self._fds.get(fd, (None, None))
            if kind == _CONTROL:
                if not self._control_events():
                    return False
            elif kind == _HANDBACK:
                self._handbacks()
            elif attachment is None or attachment.id not in self._attachments:
                continue  # ended earlier in this batch
            elif kind == _UFFD:
                self._serve_uffd(attachment)
            elif kind == _CONNECTION:
                self._serve_connection(attachment)
            elif kind == _PIDFD:
                self._finish(attachment, "the client process exited")
        return True

    def _handbacks(self) -> None:
        """Serve what the lanes handed back, or move it to the lane its client is on."""
        assert self._native is not None
        for native in self._native.take_handbacks():
            handed: Attachment = native.owner
            if handed.id not in self._attachments or handed.native is not native:
                continue
            if not native.struct.wanted_lane:
                self._serve_uffd(handed)
                continue
            assert handed.uffd is not None
            try:
                self._native.move(handed.uffd.fileno(), native)
            except OSError as exc:
                self._failed(handed, exc)

    def _run_python(self) -> None:
        """The loop without the C side: the same waiting and spinning, in Python."""
        spin_until = 0
        idle_since = 0  # when the engine last finished serving something
        while True:
            # While a replay is pending, look at the fds without waiting: faults first, then
            # one step of the replay. Just after activity, likewise (spin_us).
            now = time.monotonic_ns() if self.spin_ns else 0
            spinning = now < spin_until
            if spin_until and not spinning:  # the window ran out
                self.spin_time_ns += spin_until - idle_since
                spin_until = 0
            ready = self._epoll.poll(0 if self._prefetching or spinning else -1)
            if spinning:
                self.spin_polls += 1
                if ready:  # the window caught work
                    self.spin_hits += 1
                    self.spin_time_ns += time.monotonic_ns() - idle_since
                    spin_until = 0
            if ready and self.spin_ns:
                # Adaptive: spin the whole window after activity only when the last gap
                # between activities fitted in it (a spin would have caught it); otherwise
                # only a short probe, so that a client faulting a little further apart
                # than the window does not cost a CPU for nothing.
                self.spin_window_ns = spin_window(time.monotonic_ns() - idle_since, self.spin_ns)
                self.spin_probes += self.spin_window_ns < self.spin_ns
            if not self._dispatch(fd for fd, _mask in ready):
                return
            if self._prefetching:
                self._prefetch_step()
            if ready and self.spin_ns:
                # The window starts once the work is done, not while it is being done.
                idle_since = time.monotonic_ns()
                spin_until = idle_since + self.spin_window_ns

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
        if attachment.greeting:
            try:
                _unix.send_packet(attachment.connection, attachment.greeting)
            except OSError as exc:
                self._finish(attachment, f"the client went away before READY: {exc.strerror}")
                return
        self._watch(attachment.connection.fileno(), _CONNECTION, attachment)
        if attachment.uffd is not None:
            self._watch(attachment.uffd.fileno(), _UFFD, attachment)
            self._go_native(attachment)
        if attachment.pidfd is not None:
            self._watch(attachment.pidfd, _PIDFD, attachment)
        if attachment.replay_pending and attachment.uffd is not None:
            self._prefetching.append(attachment)
        logs.event(
            _log,
            logging.INFO,
            "attached",
            attachment=attachment.id,
            region=attachment.region_id,
            mode=attachment.mode.wire_name,
            pid=attachment.pid,
            length=attachment.length,
            fast_path=attachment.native is not None,
        )
        # Faults may have queued before the fd was watched: epoll reports them (level
        # triggered), so nothing more to do here.

    def _go_native(self, attachment: Attachment) -> None:
        """Let the C side serve the attachment's faults, when it can serve the common one: a
        copy mode over base pages, the region's content zeros or a mapped file."""
        region = attachment.region
        lock = region.native_lock
        if (
            self._native is None
            or lock is None
            or attachment.uffd is None
            or attachment.mode not in (Mode.SHARED_COPY, Mode.SHARED_CONTINUE, Mode.PRIVATE_COPY)
            or region.backing.kind is BackingKind.HUGETLB
            or region.page_size != _BASE_PAGE
        ):
            return
        with lock:  # the backing's fd and the content's mapping stay open meanwhile
            if region.backing.fileno() < 0:
                return
            source = None if region.content.zero else region.content.in_place()
            if not region.content.zero and (source is None or not source.address):
                return  # another region, a lost source, a file that cannot be mapped
            native = fastpath.NativeAttachment(
                uffd=attachment.uffd.fileno(),
                mode=int(attachment.mode),
                region_fd=region.backing.fileno(),
                zero=region.content.zero,
                source=source,
                page_size=region.page_size,
                region_lock=lock,
                ranges=attachment.ranges,
                recording=attachment.recorder is not None,
                pid=attachment.pid or 0,
            )
        fd = attachment.uffd.fileno()
        native.owner = attachment
        try:
            # A replay's steps fill on the engine thread: its faults are served there too.
            self._native.watch(fd, native, lendable=attachment.replay is None)
        except MemoryError:
            logs.event(_log, logging.WARNING, "fast_path_full", attachment=attachment.id)
            return  # Python serves this one
        if native.lane:
            self._epoll.unregister(fd)  # its lane waits on it instead
        attachment.native = attachment.stats.native = native

    def _leave_native(self, attachment: Attachment) -> None:
        """Stop the C side serving the attachment (before its uffd is closed: the fd number
        may be reused); its counters are folded into the attachment's."""
        if attachment.native is None or self._native is None:
            return
        assert attachment.uffd is not None
        self._native.unwatch(attachment.uffd.fileno())
        attachment.native.pull(attachment.ranges)
        self._take_recorded(attachment, attachment.native)
        attachment.stats.fold_native()
        attachment.native = None

    def _take_recorded(self, attachment: Attachment, native: fastpath.NativeAttachment) -> None:
        """Move the faults the C side served and recorded to the attachment's recorder."""
        if attachment.recorder is not None:
            attachment.recorder.record_entries(native.take_recorded())

    def _finish(self, attachment: Attachment, reason: str, reply: bytes | None = None) -> None:
        """End an attachment: stop watching it, close its uffd, count it ended (``on_end``),
        then send ``reply`` (so DETACHED means all of that is done) and close the rest."""
        if attachment.id not in self._attachments:
            return
        self._leave_native(attachment)
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

    def _prefetch_step(self) -> None:
        attachment = self._prefetching[0]
        if attachment.id in self._attachments and attachment.replay_pending:
            self._prefetch(attachment)
        if attachment.id in self._attachments and attachment.replay_pending:
            self._prefetching.rotate(-1)
        else:
            self._prefetching.popleft()

    # --- the handoff connection ---

    def _serve_connection(self, attachment: Attachment) -> None:
        try:
            packet = _unix.recv_packet(attachment.connection)
        except OSError as exc:
            self._finish(attachment, f"the handoff connection failed: {exc.strerror}")
            return
        if packet is None:
            if attachment.machine is None:
                self._finish(attachment, "the client closed its connection")
                return
            attachment.machine.connection_lost()
            self._finish(attachment, "the client closed the handoff connection")
            return
        if attachment.machine is None:
            # A connection with no shmfault protocol on it (a VMM's) must stay silent.
            _unix.close_fds(packet.fds)
            self._finish(attachment, "the client sent bytes on a connection that must be silent")
            return
        event = attachment.machine.receive(packet.data, packet.fds, truncated=packet.truncated)
        if isinstance(event, protocol.DetachRequested):
            # Faults still queued are served first: a thread that faulted before DETACH runs on.
            if attachment.uffd is not None:
                self._serve_uffd(attachment, lend_again=False)  # it ends right below
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

    def _serve_uffd(self, attachment: Attachment, *, lend_again: bool = True) -> None:
        native = attachment.native
        if native is None or self._native is None or attachment.uffd is None:
            self._serve_uffd_records(attachment)
            return
        # The C side read records it left to this thread (or none: read here). The windows
        # go back and forth: this thread may move them, and a remap moves a range. A lent
        # attachment is taken from its lane meanwhile.
        fd = attachment.uffd.fileno()
        self._native.take(fd, native)
        records, read_at = native.leftover()
        native.pull(attachment.ranges)
        self._take_recorded(attachment, native)  # before the records left over: in order
        try:
            self._serve_uffd_records(attachment, records, read_at)
        finally:
            if attachment.native is native and lend_again:
                native.push(attachment.ranges)
                try:
                    self._native.give(fd, native)
                except OSError as exc:
                    self._failed(attachment, exc)

    def _serve_uffd_records(
        self, attachment: Attachment, records: bytes = b"", read_at: int = 0
    ) -> None:
        """Serve one read of the attachment's records: ``records`` (read at ``read_at``, by the
        C side) when given, else a batch read here."""
        assert attachment.uffd is not None
        # (fault address, monotonic_ns when read, tries so far), in the order read
        pending: deque[tuple[int, int, int]] = deque()
        latency = attachment.stats.latency_ns
        try:
            if records:
                self._take_batch(attachment, records, len(records), read_at, pending)
            elif not self._read_batch(attachment, pending):
                return
            while pending:
                address, read_at, tries = pending.popleft()
                try:
                    self._resolve(attachment, address)
                except _Retry:
                    attachment.stats.eagain += 1
                    if tries >= MAX_RETRIES:
                        self._wake(attachment, address)
                        continue
                    self._read_batch(attachment, pending)
                    pending.append((address, read_at, tries + 1))
                    continue
                # AttachmentStats.record_latency, inlined: once per fault.
                latency[bisect.bisect_left(LATENCY_BOUNDS_NS, time.monotonic_ns() - read_at)] += 1
        except _Gone:
            attachment.stats.abandoned += len(pending)
            self._finish(attachment, "the client's memory is gone (ESRCH)")
        except _Stalled:
            logs.event(_log, logging.WARNING, "read_stalled", attachment=attachment.id)
            for address, _read_at, _tries in pending:
                with contextlib.suppress(_Gone, UffdError):
                    self._wake(attachment, address)
            self._finish(
                attachment,
                "the client made the service's read of its userfaultfd block (it cleared "
                "O_NONBLOCK on the shared file and read its own events)",
            )
        except (UffdError, ShmfaultError, OSError) as exc:
            self._failed(attachment, exc, [address for address, _read_at, _tries in pending])

    def _failed(self, attachment: Attachment, exc: Exception, unserved: Sequence[int] = ()) -> None:
        """End the attachment after an error, waking the faults (addresses) not served yet."""
        logs.event(_log, logging.ERROR, "fault_failed", attachment=attachment.id, error=str(exc))
        for address in unserved:
            with contextlib.suppress(_Gone, UffdError):
                self._wake(attachment, address)
        self._finish(attachment, f"serving a fault failed: {exc}")

    def _read_batch(self, attachment: Attachment, pending: deque[tuple[int, int, int]]) -> bool:
        """Read one batch: apply its events, queue its faults. False when nothing was read."""
        assert attachment.uffd is not None
        self._stalled = None
        self._reading = (attachment, time.monotonic())
        buffer = self._read_buffer  # the engine thread's own: no allocation per read
        try:
            count = attachment.uffd.read_into(buffer)
        except InterruptedError:
            if self._stalled is attachment:
                raise _Stalled from None
            count = 0  # a signal meant for something else: read again when epoll says so
        finally:
            self._reading = None
        if not count:
            return False
        self._take_batch(attachment, buffer, count, time.monotonic_ns(), pending)
        return True

    def _take_batch(
        self,
        attachment: Attachment,
        buffer: bytes | bytearray,
        count: int,
        read_at: int,
        pending: deque[tuple[int, int, int]],
    ) -> None:
        """Apply the events of ``count`` bytes of records in ``buffer``, queue their faults."""
        stats = attachment.stats
        recorder = attachment.recorder
        # Page faults are nearly every record: decoded here with one unpack_from each, their
        # flags tested as plain ints (no Pagefault object, no IntFlag arithmetic per fault).
        # Every other record, and a trailing partial one, goes through parse_events.
        whole = count - count % UFFD_MSG_SIZE
        missing = minor = wp = 0
        for position in range(0, whole, UFFD_MSG_SIZE):
            code, flags, address = _PAGEFAULT_RECORD.unpack_from(buffer, position)
            if code == _EVENT_PAGEFAULT:
                if flags & _FLAG_MINOR:
                    minor += 1
                elif flags & _FLAG_WP:
                    wp += 1
                else:
                    missing += 1
                pending.append((address, read_at, 0))
                if recorder is not None:
                    self._record(attachment, recorder, address, bool(flags & _FLAG_WRITE))
            else:
                (event,) = parse_events(buffer[position : position + UFFD_MSG_SIZE])
                self._apply_event(attachment, event)
        stats.faults_missing += missing
        stats.faults_minor += minor
        stats.faults_wp += wp
        if whole != count:
            parse_events(buffer[whole:count])  # raises EventDecodeError: ends the attachment

    def _apply_event(self, attachment: Attachment, event: Event) -> None:
        """Apply a record other than a page fault (in the order read, before any fault of the
        batch is served)."""
        stats = attachment.stats
        if isinstance(event, Remove):
            stats.events_remove += 1
            self._forget(
                attachment,
                event.start,
                event.end,
                REMOVED if attachment.zero_after_remove else ABSENT,
            )
        elif isinstance(event, Unmap):
            stats.events_unmap += 1
            self._forget(attachment, event.start, event.end, ABSENT)
        elif isinstance(event, Remap):
            stats.events_remap += 1
            self._remap(attachment, event)
        elif isinstance(event, Fork):
            # refused at handshake, so a kernel bug or a lie; never serve it
            _unix.close_fds([event.uffd_fd])

    def _record(
        self, attachment: Attachment, recorder: Recorder, address: int, write: bool
    ) -> None:
        mapped_range = attachment.range_of(address)
        if mapped_range is not None:
            offset = mapped_range.region_offset + (address - mapped_range.base)
            recorder.record(offset // attachment.region.page_size, write)

    def _forget(self, attachment: Attachment, start: int, end: int, state: int = ABSENT) -> None:
        """Pages in [start, end) were dropped or unmapped: they fault again when touched, and
        are then filled as ``state`` says (:data:`ABSENT`: from the region; :data:`REMOVED`:
        zeros)."""
        page = attachment.region.page_size
        for mapped_range in attachment.ranges:
            first = max(start, mapped_range.base)
            last = min(end, mapped_range.end)
            if first < last:
                index = (first - mapped_range.base) // page
                count = -(-(last - first) // page)
                mapped_range.pages[index : index + count] = bytes([state]) * count

    def _remap(self, attachment: Attachment, event: Remap) -> None:
        # mremap moves (part of) a mapping. Only a move of a whole range keeps it servable; a
        # partial move leaves pieces the engine cannot address consistently, so the moved part
        # is simply no longer served (its faults land outside every range).
        for mapped_range in attachment.ranges:
            if event.from_address == mapped_range.base and event.length >= mapped_range.length:
                mapped_range.base = event.to_address
                attachment._sort_ranges()
                return
        self._forget(attachment, event.from_address, event.from_address + event.length)

    def _wake(self, attachment: Attachment, address: int) -> None:
        assert attachment.uffd is not None
        page = attachment.region.page_size
        try:
            attachment.uffd.wake(address - address % page, page, arg=self._ioctl_arg)
            attachment.stats.wakes += 1
        except UffdProcessGoneError as exc:
            raise _Gone from exc

    def _window(self, mapped_range: MappedRange, page_size: int, offset: int) -> tuple[int, int]:
        """The fault-around block around region offset ``offset``, clipped to the range."""
        block = self.fault_around_pages * page_size
        aligned = offset - offset % block
        # Both ends from the aligned block: clipping the start must not push the end into the
        # next block (a range at a region offset that is not a block multiple).
        start = max(aligned, mapped_range.region_offset)
        end = min(aligned + block, mapped_range.region_offset + mapped_range.length)
        return start, end

    def _adaptive_window(
        self, mapped_range: MappedRange, page_size: int, offset: int
    ) -> tuple[int, int]:
        """The window to fill for a fault at ``offset``. A fault where the last window ended
        is sequential access: its window starts there and doubles, up to
        ``fault_around_max_pages``; any other fault gets the aligned fault-around block and
        starts the growth over. With the maximum at the base size, or pages larger than the
        base page, always the block."""
        limit = mapped_range.region_offset + mapped_range.length
        # Huge pages never grow: the block is already 16 huge pages (32 MiB at 2 MiB), and one
        # fault filling 512 MiB would stall the client for a tenth of a second.
        if (
            offset == mapped_range.sequential_next
            and self.fault_around_max_pages > self.fault_around_pages
            and page_size == _BASE_PAGE
        ):
            pages = min(mapped_range.window_pages * 2, self.fault_around_max_pages)
            start, end = offset, min(offset + pages * page_size, limit)
        else:
            pages = self.fault_around_pages
            start, end = self._window(mapped_range, page_size, offset)
        mapped_range.window_pages = pages
        mapped_range.sequential_next = end
        return start, end

    def _resolve(self, attachment: Attachment, address: int) -> None:
        uffd = attachment.uffd
        assert uffd is not None
        mapped_range = attachment.range_of(address)
        page = attachment.region.page_size
        if mapped_range is None:
            attachment.stats.outside += 1
            page_address = address - address % page
            logs.event(
                _log,
                logging.WARNING,
                "fault_outside",
                attachment=attachment.id,
                address=address,
            )
            with contextlib.suppress(UffdError):
                uffd.unregister(page_address, page)
            self._wake(attachment, page_address)
            return
        offset = mapped_range.region_offset + (address - mapped_range.base)
        start, end = self._adaptive_window(mapped_range, page, offset)
        try:
            self._fill(attachment, mapped_range, start, end, offset)
        except UffdPageExistsError:
            attachment.stats.eexist += 1
            self._guard_refaults(attachment, address)
            self._wake(attachment, address)
        except UffdRetryError as exc:
            raise _Retry from exc
        except UffdProcessGoneError as exc:
            raise _Gone from exc
        except UffdError as exc:
            if exc.errno == errno.ENOMEM:
                # The kernel could not allocate the page (memory cgroup limit, pressure): not
                # this client's fault nor a broken state. Wake the thread; it faults again and
                # the fill is tried again then, so memory freed meanwhile lets it run on.
                attachment.stats.enomem += 1
                self._wake(attachment, address)
                return
            if exc.errno != errno.ENOENT:
                raise
            # No VMA at the address any more: the client unmapped it while the thread waited
            # (its UNMAP event is on its way) or its mm is being torn down. Nothing to fill; the
            # thread is woken (a wake needs no mapping) so that it faults again and gets its
            # SIGSEGV now rather than sleeping until the client closes its userfaultfd.
            attachment.stats.abandoned += 1
            with contextlib.suppress(UffdError):
                uffd.wake(address - address % page, page)

    def _fill(
        self,
        attachment: Attachment,
        mapped_range: MappedRange,
        start: int,
        end: int,
        fault_offset: int | None,
    ) -> None:
        """Give the client the pages of region offsets ``[start, end)`` of ``mapped_range`` it
        has not got, by the attachment's mode. With ``fault_offset`` (a fault's region offset,
        inside the block), that page is resolved or its thread woken whatever happens to the
        rest; without (a prefetch), pages that cannot be filled now are left to fault."""
        if attachment.mode is Mode.SHARED_COPY:
            self._shared_copy(attachment, mapped_range, start, end, fault_offset)
        elif attachment.mode is Mode.SHARED_CONTINUE:
            self._shared_continue(attachment, mapped_range, start, end, fault_offset)
        else:
            self._private_copy(attachment, mapped_range, start, end, fault_offset)

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

    def _count_fill(self, attachment: Attachment, length: int, zero: bool) -> None:
        pages = length // attachment.region.page_size
        attachment.stats.pages_filled += pages
        attachment.stats.bytes_filled += length
        if zero:
            attachment.stats.zero_pages += pages

    def _shared_copy(
        self,
        attachment: Attachment,
        mapped_range: MappedRange,
        start: int,
        end: int,
        offset: int | None,
    ) -> None:
        uffd = attachment.uffd
        assert uffd is not None
        region = attachment.region
        # client address = region offset + delta
        delta = mapped_range.base - mapped_range.region_offset
        with region.locked():
            # The whole block in one COPY, without searching the region file's holes first: the
            # kernel never overwrites a page the file has (another sharer's fill, a write) but
            # stops there, with EEXIST at the first page or a partial copy up to it. Only then,
            # which is rare, are the holes of the rest of the block searched and filled one by
            # one. Either way each page is filled once, under the region lock.
            try:
                self._copy_from_region(attachment, uffd, start, end, start + delta)
            except (UffdPageExistsError, UffdRetryError) as exc:
                done = exc.done
            else:
                done = end - start
            if done:
                region.backing.mark_filled(start, start + done)
                self._count_fill(attachment, done, region.content.zero)
            served = offset is not None and start <= offset < start + done
            if start + done < end:
                served = self._copy_holes(attachment, start + done, end, offset, delta) or served
        if offset is not None and not served:
            self._wake(attachment, offset + delta)

    def _copy(self, uffd: Uffd, address: int, source: int, length: int, page: int) -> None:
        """UFFDIO_COPY ``length`` bytes from ``source`` to ``address``, a large copy in two
        halves on two threads at once. Fails as one copy would: EEXIST or EAGAIN with ``done``
        counting the bytes in place from ``address`` on (a second half that got further than a
        failed first leaves pages mapped that a later fill finds with EEXIST)."""
        half = length // 2 - (length // 2) % page  # 0 for a single (huge) page
        if self._copier is None or length < PARALLEL_COPY_BYTES or not half:
            uffd.copy(address, source, length, arg=self._ioctl_arg)
            return
        second = self._copier.submit(uffd.copy, address + half, source + half, length - half)
        try:
            uffd.copy(address, source, half, arg=self._ioctl_arg)
        except BaseException:
            # Never return while the copier still writes into this client's memory.
            with contextlib.suppress(UffdError, OSError):
                second.result()
            raise
        try:
            second.result()
        except (UffdPageExistsError, UffdRetryError) as exc:
            # The first half is in place: a partial copy of the whole, as the kernel says it.
            raise UffdRetryError(
                errno.EAGAIN, "UFFDIO_COPY", address, length, done=half + exc.done
            ) from None

    def _copy_holes(
        self, attachment: Attachment, start: int, end: int, offset: int | None, delta: int
    ) -> bool:
        """Fill the holes of the region file in ``[start, end)`` (the region lock held): exactly
        the pages nobody has yet. Returns whether the fault's page (``offset``) was filled here;
        raises EEXIST/EAGAIN when the copy stopped before it (the caller wakes or retries)."""
        uffd = attachment.uffd
        assert uffd is not None
        region = attachment.region
        served = False
        # The page that faulted is one of the holes unless someone filled it since the fault.
        for hole_start, hole_end in list(region.backing.holes(start, end)):
            try:
                self._copy_from_region(attachment, uffd, hole_start, hole_end, hole_start + delta)
            except (UffdPageExistsError, UffdRetryError) as exc:
                # Raced with another filler: whatever got done is woken; make sure the
                # faulting page is, too (it exists now, or the retry will fill it).
                if (
                    offset is not None
                    and hole_start <= offset < hole_end
                    and exc.done <= offset - hole_start
                ):
                    raise
                continue
            region.backing.mark_filled(hole_start, hole_end)
            self._count_fill(attachment, hole_end - hole_start, region.content.zero)
            if offset is not None and hole_start <= offset < hole_end:
                served = True
        return served

    def _copy_from_region(
        self, attachment: Attachment, uffd: Uffd, start: int, end: int, address: int
    ) -> None:
        """UFFDIO_COPY (or ZEROPAGE) the region's content for ``[start, end)`` to ``address``."""
        region = attachment.region
        content = region.content
        if content.zero and region.backing.kind is not BackingKind.HUGETLB:
            uffd.zeropage(address, end - start, arg=self._ioctl_arg)
            return
        # Straight from a mapping of the source where it has one (a file): no read into a new
        # buffer. The caller holds the region lock, which keeps the mapping alive (close takes it).
        source = content.address(start, end - start)
        if source is not None:
            try:
                self._copy(uffd, address, source, end - start, region.page_size)
                return
            except UffdError as exc:
                if exc.errno != errno.EFAULT:
                    raise
                # The source no longer has the bytes (it shrank): read raises the error that
                # says so; should it not, copy what it read.
        # UFFDIO_ZEROPAGE does not exist for hugetlbfs (EINVAL): zeros are copied there.
        data = content.read(start, end - start)
        uffd.copy(address, _address_of(data), end - start, arg=self._ioctl_arg)

    def _shared_continue(
        self,
        attachment: Attachment,
        mapped_range: MappedRange,
        start: int,
        end: int,
        offset: int | None,
    ) -> None:
        uffd = attachment.uffd
        assert uffd is not None
        region = attachment.region
        page = region.page_size
        filled = region.fill(start, end - start)  # into the page cache, through the service
        if filled:
            self._count_fill(attachment, filled, region.content.zero)
        first = (start - mapped_range.region_offset) // page
        last = first + (end - start) // page
        index = None if offset is None else (offset - mapped_range.region_offset) // page

        def map_run(run_start: int, run_end: int) -> None:
            uffd.continue_(
                mapped_range.base + run_start * page,
                (run_end - run_start) * page,
                arg=self._ioctl_arg,
            )

        served, _mapped = self._map_runs(attachment, mapped_range, first, last, index, map_run)
        if index is not None and not served:
            self._map_one(
                attachment, mapped_range, index, lambda address: uffd.continue_(address, page)
            )

    def _private_copy(
        self,
        attachment: Attachment,
        mapped_range: MappedRange,
        start: int,
        end: int,
        offset: int | None,
    ) -> None:
        uffd = attachment.uffd
        assert uffd is not None
        region = attachment.region
        page = region.page_size
        first = (start - mapped_range.region_offset) // page
        last = first + (end - start) // page
        index = None if offset is None else (offset - mapped_range.region_offset) // page
        if index is not None and mapped_range.pages[index] in (REMOVED, ZEROED):
            self._zero_removed(attachment, mapped_range, index, last)
            return
        block: list[bytes] = []  # read only when some page of the block is missing
        zeroed = [0]  # pages of the runs mapped as zero pages

        def map_run(run_start: int, run_end: int) -> None:
            destination = mapped_range.base + run_start * page
            length = (run_end - run_start) * page
            offset = start + (run_start - first) * page
            with region.locked():
                # Where the region has none of the run's pages, its bytes are the source's:
                # zero pages for zeros (as the C fast path maps them), or copied straight from
                # the source's mapping, under the region lock (no fill or write can land
                # meanwhile, and the mapping stays alive).
                if (
                    region.content.zero
                    and region.backing.kind is not BackingKind.HUGETLB
                    and _all_holes(region, offset, length)
                ):
                    try:
                        uffd.zeropage(destination, length, arg=self._ioctl_arg)
                    except (UffdPageExistsError, UffdRetryError) as exc:
                        zeroed[0] += exc.done // page
                        raise
                    zeroed[0] += run_end - run_start
                    return
                source = _source_in_place(region, offset, length)
                if source is not None:
                    try:
                        self._copy(uffd, destination, source, length, page)
                        return
                    except UffdError as exc:
                        if exc.errno != errno.EFAULT:
                            raise
                        # The source shrank: the read below raises the error that says so.
            if not block:
                block.append(region.peek(start, end - start))
            source = _address_of(block[0]) + (run_start - first) * page
            self._copy(
                uffd,
                mapped_range.base + run_start * page,
                source,
                (run_end - run_start) * page,
                page,
            )

        served, mapped = self._map_runs(attachment, mapped_range, first, last, index, map_run)
        self._count_fill(attachment, (mapped - zeroed[0]) * page, False)
        self._count_fill(attachment, zeroed[0] * page, True)
        if index is not None and not served:
            assert offset is not None
            page_data = region.peek(offset - offset % page, page)
            self._map_one(
                attachment,
                mapped_range,
                index,
                lambda address: uffd.copy(address, _address_of(page_data), page),
            )
            self._count_fill(attachment, page, False)

    def _zero_removed(
        self, attachment: Attachment, mapped_range: MappedRange, index: int, last: int
    ) -> None:
        """Zero-fill the removed pages from ``index`` up to ``last`` (balloon semantics): the
        faulting page and the removed run after it, marked :data:`ZEROED`."""
        uffd = attachment.uffd
        assert uffd is not None
        page = attachment.region.page_size
        states = mapped_range.pages
        run_end = index + 1
        while run_end < last and states[run_end] == REMOVED:
            run_end += 1
        address = mapped_range.base + index * page
        try:
            if attachment.region.backing.kind is BackingKind.HUGETLB:
                # hugetlbfs has no UFFDIO_ZEROPAGE (EINVAL): copy zeros there.
                zeros = bytes((run_end - index) * page)
                uffd.copy(address, _address_of(zeros), len(zeros))
            else:
                uffd.zeropage(address, (run_end - index) * page)
        except (UffdPageExistsError, UffdRetryError) as exc:
            done = exc.done // page
            states[index : index + done] = bytes([ZEROED]) * done
            self._count_fill(attachment, done * page, True)
            if done == 0:
                raise
            return
        states[index:run_end] = bytes([ZEROED]) * (run_end - index)
        self._count_fill(attachment, (run_end - index) * page, True)

    def _map_runs(
        self,
        attachment: Attachment,
        mapped_range: MappedRange,
        first: int,
        last: int,
        index: int | None,
        map_run: Callable[[int, int], None],
    ) -> tuple[bool, int]:
        """Map the pages of ``[first, last)`` (page indexes of the range) that the range says
        the client has not got (:data:`ABSENT`), one ``map_run(run_start, run_end)`` per run:
        pages mapped already would stop a range ioctl with EEXIST. Returns whether page
        ``index`` was mapped here and how many pages were. Raises the ioctl's error when it
        stopped before ``index`` for a reason other than EEXIST (the caller retries or wakes)."""
        page = attachment.region.page_size
        states = mapped_range.pages
        served = False
        mapped = 0
        for run_start, run_end in list(_runs(states, first, last)):
            try:
                map_run(run_start, run_end)
            except (UffdPageExistsError, UffdRetryError) as exc:
                done = exc.done // page
                states[run_start : run_start + done] = b"\x01" * done
                mapped += done
                if isinstance(exc, UffdPageExistsError):
                    states[run_start + done] = MAPPED  # mapped already, whatever we thought
                elif index is not None and run_start + done <= index < run_end:
                    raise
                continue
            states[run_start:run_end] = b"\x01" * (run_end - run_start)
            mapped += run_end - run_start
            if index is not None and run_start <= index < run_end:
                served = True
        return served, mapped

    def _map_one(
        self,
        attachment: Attachment,
        mapped_range: MappedRange,
        index: int,
        resolve: Callable[[int], int],
    ) -> None:
        """Resolve page ``index`` of the range alone, with ``resolve(address)``.

        For a fault the block's runs did not serve: the range says the client has the page,
        yet it faulted, or a range ioctl stopped at a page mapped already. State and page
        tables disagree without an event to say so: a hole punched in the region (another
        sharer's MADV_REMOVE) unmaps the page from every mapping, but only the process that
        asked gets EVENT_REMOVE; a MADV_FREE'd page is reported removed yet stays until
        reclaim. Waking the thread would only make it fault again, forever. EEXIST here means
        the page really is mapped (a race): it is noted and the thread woken by the caller.
        """
        address = mapped_range.base + index * attachment.region.page_size
        try:
            resolve(address)
        except UffdPageExistsError:
            mapped_range.pages[index] = MAPPED
            raise
        mapped_range.pages[index] = MAPPED

    # --- replay: filling recorded pages ahead of the client ---

    def _prefetch(self, attachment: Attachment) -> None:
        """Fill the next :data:`PREFETCH_PAGES` pages of the attachment's replay list. Each
        recorded page is filled with its fault-around block, as its fault was when recorded
        (a recording holds the faults, not the pages fault-around brought with them);
        overlapping blocks are filled once. A page that cannot be filled now (raced, EAGAIN,
        unmapped) is simply left to fault. With the fast path the step is one call into C,
        which leaves to :meth:`_prefetch_block` only a block it could not do whole."""
        replay = attachment.replay
        assert replay is not None
        begin = attachment.replay_next
        pages = sorted(replay[begin : begin + PREFETCH_PAGES])
        native = attachment.native
        if native is not None and self._native is not None:
            while pages:
                done, filled, block = self._native.replay_step(native, pages)
                attachment.stats.pages_prefetched += filled
                if block is None:
                    break
                range_index, start, end = block
                if not self._prefetch_block(attachment, attachment.ranges[range_index], start, end):
                    return
                pages = pages[done:]
        else:
            for mapped_range, start, end in self._replay_blocks(attachment, pages):
                if not self._prefetch_block(attachment, mapped_range, start, end):
                    return
        # Advanced last: GetStats reads it from another thread, and "nothing pending" must
        # mean the pages are in.
        attachment.replay_next = begin + PREFETCH_PAGES

    def _replay_blocks(
        self, attachment: Attachment, pages: Iterable[int]
    ) -> list[tuple[MappedRange, int, int]]:
        """The fault-around blocks of the recorded ``pages`` (ascending), overlapping ones
        merged; pages outside every range are left out."""
        page = attachment.region.page_size
        blocks: list[tuple[MappedRange, int, int]] = []
        for index in pages:
            mapped_range = attachment.range_at_offset(index * page)
            if mapped_range is None:
                continue  # a page outside what this attachment maps
            start, end = self._window(mapped_range, page, index * page)
            if blocks and blocks[-1][0] is mapped_range and start <= blocks[-1][2]:
                blocks[-1] = (mapped_range, blocks[-1][1], max(end, blocks[-1][2]))
            else:
                blocks.append((mapped_range, start, end))
        return blocks

    def _prefetch_block(
        self, attachment: Attachment, mapped_range: MappedRange, start: int, end: int
    ) -> bool:
        """Fill one replay block in Python; False when that ended the attachment."""
        stats = attachment.stats
        before = stats.pages_filled
        try:
            self._fill(attachment, mapped_range, start, end, None)
        except (UffdPageExistsError, UffdRetryError):
            pass
        except UffdProcessGoneError:
            self._finish(attachment, "the client's memory is gone (ESRCH)")
            return False
        except UffdError as exc:
            if exc.errno != errno.ENOENT:
                self._failed(attachment, exc)
                return False
        except (ShmfaultError, OSError) as exc:
            self._failed(attachment, exc)
            return False
        stats.pages_prefetched += stats.pages_filled - before
        return True


def _all_holes(region: RegionBacking, offset: int, length: int) -> bool:
    """Whether the region file has none of the pages of ``[offset, offset + length)``."""
    return list(region.backing.holes(offset, offset + length)) == [(offset, offset + length)]


def _source_in_place(region: RegionBacking, offset: int, length: int) -> int | None:
    """Where this process has the bytes of region ``[offset, offset + length)`` in place: the
    mapping of a file source, when the region file has none of those pages (all holes). None:
    read them. The caller holds the region lock."""
    if region.content.zero or not _all_holes(region, offset, length):
        return None
    return region.content.address(offset, length)


def _runs(bitmap: bytearray, first: int, last: int) -> Iterator[tuple[int, int]]:
    """Runs ``[start, end)`` of zero (:data:`ABSENT`) bytes in ``bitmap[first:last]``."""
    for match in _ABSENT_RUN.finditer(bitmap, first, last):
        yield match.start(), match.end()

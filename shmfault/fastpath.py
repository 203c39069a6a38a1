"""The fault engine's fast path in C (``_fastpath.c``), loaded with ctypes.

The C code serves the common page fault (a batch of nothing but page faults inside an
attachment's ranges, filled from zeros or a mapped file source) on the engine thread without
the interpreter, and waits on the engine's epoll set, spinning after activity, with the GIL
released. Everything else it hands back to :class:`~shmfault.engine.FaultEngine`, which keeps
every rule of the Python path; the comment at the top of ``_fastpath.c`` lists what goes back.

``make setup`` compiles the library next to this module with the system's C compiler (a
library of a stale source is rebuilt, one that fails to build or load is reported and
skipped). Without it, or with ``SHMFAULT_FAST_PATH=0`` in the environment, :func:`library`
returns None and the engine serves every fault in Python, as before: same results, more CPU
per fault.

The structures below mirror the C ones field for field; :func:`library` refuses a library
whose structure sizes differ.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from shmfault import logs

_log = logging.getLogger(__name__)

#: the library's file, built by ``make setup`` from ``_fastpath.c``
LIBRARY_PATH = Path(__file__).with_name("_fastpath.so")
SOURCE_PATH = Path(__file__).with_name("_fastpath.c")
#: the environment variable that turns the fast path off ("0")
ENVIRONMENT = "SHMFAULT_FAST_PATH"
ABI_VERSION = 2
#: records one read takes (engine.EVENTS_PER_READ) and the size of one
_EVENTS_PER_READ = 64
_MSG_SIZE = 32
#: faults a recording attachment's C side keeps before Python must take them
RECORD_CAPACITY = 4096
#: buckets of the latency histogram (engine.LATENCY_BOUNDS_NS plus the overflow bucket)
LATENCY_BUCKETS = 22
_MAX_READY = 256


class Range(ctypes.Structure):
    """``struct sf_range``: one :class:`~shmfault.engine.MappedRange`."""

    _fields_ = [
        ("base", ctypes.c_uint64),
        ("length", ctypes.c_uint64),
        ("region_offset", ctypes.c_uint64),
        ("pages", ctypes.c_void_p),
        ("sequential_next", ctypes.c_int64),
        ("window_pages", ctypes.c_uint64),
    ]


class Counters(ctypes.Structure):
    """``struct sf_counters``: what the C code adds to an attachment's statistics."""

    _fields_ = [
        ("faults_missing", ctypes.c_uint64),
        ("faults_minor", ctypes.c_uint64),
        ("pages_filled", ctypes.c_uint64),
        ("bytes_filled", ctypes.c_uint64),
        ("zero_pages", ctypes.c_uint64),
        ("latency", ctypes.c_uint64 * LATENCY_BUCKETS),
    ]


#: the counters besides the histogram, in the names AttachmentStats uses
COUNTER_NAMES = ("faults_missing", "faults_minor", "pages_filled", "bytes_filled", "zero_pages")


class AttachmentStruct(ctypes.Structure):
    """``struct sf_attachment``."""

    _fields_ = [
        ("uffd", ctypes.c_int32),
        ("mode", ctypes.c_int32),
        ("region_fd", ctypes.c_int32),
        ("zero", ctypes.c_int32),
        ("source_fd", ctypes.c_int32),
        ("source_offset", ctypes.c_uint64),
        ("source_base", ctypes.c_uint64),
        ("source_mapped", ctypes.c_uint64),
        ("page_size", ctypes.c_uint64),
        ("region", ctypes.c_void_p),  # struct sf_region *: opaque here (pthread_mutex_t)
        ("range_count", ctypes.c_uint32),
        ("leftover_length", ctypes.c_uint32),
        ("ranges", ctypes.POINTER(Range)),
        ("leftover_read_ns", ctypes.c_int64),
        ("record", ctypes.c_void_p),
        ("record_capacity", ctypes.c_uint32),
        ("record_length", ctypes.c_uint32),
        ("counters", Counters),
        ("leftover", ctypes.c_uint8 * (_EVENTS_PER_READ * _MSG_SIZE)),
        ("in_lane", ctypes.c_int32),
        ("pid", ctypes.c_int32),
        ("last_tid", ctypes.c_uint32),
        ("placed_ns", ctypes.c_int64),
        ("wanted_lane", ctypes.c_int32),
        ("tids_visible", ctypes.c_int32),
    ]


class EngineStruct(ctypes.Structure):
    """``struct sf_engine``."""

    _fields_ = [
        ("epfd", ctypes.c_int32),
        ("nowait_reads", ctypes.c_int32),
        ("fault_around_pages", ctypes.c_uint64),
        ("fault_around_max_pages", ctypes.c_uint64),
        ("base_page", ctypes.c_uint64),
        ("latency_bounds", ctypes.c_uint64 * (LATENCY_BUCKETS - 1)),
        ("spin_ns", ctypes.c_int64),
        ("spin_window_ns", ctypes.c_int64),
        ("spin_until", ctypes.c_int64),
        ("idle_since", ctypes.c_int64),
        ("spin_probes", ctypes.c_uint64),
        ("spin_polls", ctypes.c_uint64),
        ("spin_hits", ctypes.c_uint64),
        ("spin_time_ns", ctypes.c_uint64),
        ("faults_served", ctypes.c_uint64),
        ("batches_returned", ctypes.c_uint64),
        ("ready_count", ctypes.c_int32),
        ("ready", ctypes.c_int32 * _MAX_READY),
        ("table_size", ctypes.c_int32),
        ("table", ctypes.c_void_p),
        ("buffer_size", ctypes.c_uint64),
        ("buffer", ctypes.c_void_p),
        ("parallel_bytes", ctypes.c_uint64),
        ("worker", ctypes.c_void_p),
    ]


#: the structures by the index sf_sizeof() takes (0, struct sf_region, is opaque here)
_STRUCTS = {1: Range, 2: Counters, 3: AttachmentStruct, 4: EngineStruct}
_load_lock = threading.Lock()


@functools.cache
def _load_once() -> tuple[ctypes.CDLL | None, str]:
    lib, why_not = _load()
    if lib is None:
        logs.event(_log, logging.INFO, "fast_path_off", reason=why_not)
    return lib, why_not


def library() -> ctypes.CDLL | None:
    """The loaded library, or None (the reason is :func:`unavailable_reason`). Loaded once."""
    with _load_lock:
        return _load_once()[0]


def unavailable_reason() -> str:
    """Why :func:`library` returns None ("" when it does not)."""
    with _load_lock:
        return _load_once()[1]


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get(ENVIRONMENT, "1") == "0":
        return None, f"{ENVIRONMENT}=0 in the environment"
    if not LIBRARY_PATH.exists():
        return None, f"{LIBRARY_PATH.name} is not built (make setup builds it with cc)"
    if SOURCE_PATH.exists() and SOURCE_PATH.stat().st_mtime > LIBRARY_PATH.stat().st_mtime:
        return None, f"{LIBRARY_PATH.name} is older than {SOURCE_PATH.name} (run make setup)"
    try:
        lib = ctypes.CDLL(str(LIBRARY_PATH), use_errno=True)
    except OSError as exc:
        return None, f"{LIBRARY_PATH.name} does not load: {exc}"
    lib.sf_abi_version.restype = ctypes.c_int
    if lib.sf_abi_version() != ABI_VERSION:
        return None, f"{LIBRARY_PATH.name} has another ABI version (run make setup)"
    lib.sf_sizeof.restype = ctypes.c_size_t
    lib.sf_sizeof.argtypes = [ctypes.c_int]
    for which, struct in _STRUCTS.items():
        if lib.sf_sizeof(which) != ctypes.sizeof(struct):
            return None, f"{LIBRARY_PATH.name}: struct {struct.__name__} differs (run make setup)"
    region = ctypes.c_void_p
    engine = ctypes.POINTER(EngineStruct)
    attachment = ctypes.POINTER(AttachmentStruct)
    opaque = ctypes.c_void_p
    for name, argtypes, restype in (
        ("sf_handbacks_new", [ctypes.c_int], opaque),
        ("sf_handbacks_free", [opaque], None),
        (
            "sf_handbacks_take",
            [opaque, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int],
            ctypes.c_int,
        ),
        ("sf_lane_start", [engine, opaque, ctypes.c_int, ctypes.c_int], opaque),
        ("sf_lane_cpu", [opaque], ctypes.c_int),
        ("sf_task_cpu", [ctypes.c_int, ctypes.c_uint], ctypes.c_int),
        ("sf_lane_stop", [opaque], None),
        ("sf_lane_engine", [opaque], engine),
        ("sf_lane_watch", [opaque, ctypes.c_int, attachment], ctypes.c_int),
        ("sf_lane_unwatch", [opaque, ctypes.c_int], None),
        ("sf_lane_take", [opaque, ctypes.c_int], None),
        ("sf_lane_give", [opaque, ctypes.c_int], ctypes.c_int),
        ("sf_region_init", [region], ctypes.c_int),
        ("sf_region_lock", [region], None),
        ("sf_region_unlock", [region], None),
        ("sf_region_close", [region], None),
        ("sf_engine_init", [engine, ctypes.c_int], ctypes.c_int),
        ("sf_engine_free", [engine], None),
        ("sf_watch", [engine, ctypes.c_int, ctypes.POINTER(AttachmentStruct)], ctypes.c_int),
        ("sf_wait", [engine, ctypes.c_int, ctypes.c_int], ctypes.c_int),
        ("sf_mark_active", [engine], None),
        (
            "sf_replay_step",
            [
                engine,
                ctypes.POINTER(AttachmentStruct),
                ctypes.POINTER(ctypes.c_uint64),
                ctypes.c_int,
                ctypes.POINTER(ctypes.c_uint64),
                ctypes.POINTER(ctypes.c_uint32),
                ctypes.POINTER(ctypes.c_uint64),
                ctypes.POINTER(ctypes.c_uint64),
            ],
            ctypes.c_int,
        ),
    ):
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = restype
    return lib, ""


class RegionLock:
    """A region's lock that the C fast path takes too: a recursive pthread mutex.

    Used like :class:`threading.RLock` (``with lock:``). Acquiring releases the GIL while it
    waits (a ctypes call), so a thread holding the lock never waits on one that wants it.
    :meth:`close` marks the region closed (under the lock): C code never touches it after.
    """

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        # struct sf_region holds a pthread_mutex_t, whose size is the C library's business.
        self._memory = ctypes.create_string_buffer(lib.sf_sizeof(0))
        #: the address of the struct sf_region, for the C side
        self.address = ctypes.addressof(self._memory)
        if lib.sf_region_init(self.address):
            raise OSError("pthread_mutex_init failed")

    def __enter__(self) -> bool:
        self._lib.sf_region_lock(self.address)
        return True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._lib.sf_region_unlock(self.address)

    def close(self) -> None:
        """Mark the region closed; the caller holds the lock."""
        self._lib.sf_region_close(self.address)


def region_lock() -> contextlib.AbstractContextManager[Any]:
    """A lock for a new region: shared with the C fast path when it is loaded, else an RLock."""
    lib = library()
    return threading.RLock() if lib is None else RegionLock(lib)


def _same_pid_namespace(pid: int) -> bool:
    """Whether process ``pid`` shares this process's pid namespace: the thread ids its faults
    carry (UFFD_FEATURE_THREAD_ID) are then ids in our /proc, not only in its own."""
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino == os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return False


class NativeAttachment:
    """An attachment as the C fast path serves it: the C structures, kept alive here.

    The page-state bytearrays are shared with the C code (exported buffers: their size must not
    change while this object lives). The fault-around window is copied: :meth:`pull` before
    Python serves the attachment, :meth:`push` after (the engine thread does both). With
    ``recording``, the C side keeps the faults it serves for :meth:`take_recorded`.
    """

    def __init__(
        self,
        *,
        uffd: int,
        mode: int,
        region_fd: int,
        zero: bool,
        source: Any,
        page_size: int,
        region_lock: RegionLock,
        ranges: list[Any],
        recording: bool = False,
        pid: int = 0,
    ) -> None:
        self.struct = AttachmentStruct()
        self._ranges = (Range * len(ranges))()
        # by range object: a remap re-sorts the engine's list, and each range keeps its pages
        self._page_arrays = {
            id(r): (ctypes.c_uint8 * len(r.pages)).from_buffer(r.pages) for r in ranges
        }
        self._region_lock = region_lock  # the C side points into it
        #: the lane serving it: 0 the engine thread's wait, 1.. a lane thread (NativeEngine)
        self.lane = 0
        #: the engine's object for the attachment (a hand-back names this one)
        self.owner: Any = None
        #: the CPU its lane is pinned to (-1: the engine thread, or an unpinned lane)
        self.cpu = -1
        self._record = (ctypes.c_uint64 * RECORD_CAPACITY)() if recording else None
        struct = self.struct
        struct.uffd = uffd
        struct.mode = mode
        struct.region_fd = region_fd
        struct.zero = int(zero)
        struct.source_fd = -1 if source is None else source.fd
        if source is not None:
            struct.source_offset = source.offset
            struct.source_base = source.address
            struct.source_mapped = source.mapped
        struct.page_size = page_size
        struct.pid = pid  # placement looks at the CPU its threads run on (NativeEngine)
        struct.tids_visible = int(bool(pid) and _same_pid_namespace(pid))
        struct.region = region_lock.address
        struct.range_count = len(ranges)
        struct.ranges = ctypes.cast(self._ranges, ctypes.POINTER(Range))
        if self._record is not None:
            struct.record = ctypes.addressof(self._record)
            struct.record_capacity = RECORD_CAPACITY
        self.push(ranges)

    def push(self, ranges: list[Any]) -> None:
        """Give the C side the ranges as Python left them (a remap moves a base)."""
        for native, mapped_range in zip(self._ranges, ranges, strict=True):
            native.base = mapped_range.base
            native.length = mapped_range.length
            native.region_offset = mapped_range.region_offset
            native.pages = ctypes.addressof(self._page_arrays[id(mapped_range)])
            native.sequential_next = mapped_range.sequential_next
            native.window_pages = mapped_range.window_pages

    def pull(self, ranges: list[Any]) -> None:
        """Take the fault-around windows as the C side left them."""
        for native, mapped_range in zip(self._ranges, ranges, strict=True):
            mapped_range.sequential_next = native.sequential_next
            mapped_range.window_pages = native.window_pages

    def leftover(self) -> tuple[bytes, int]:
        """The records the C side read but left to Python, and when they were read
        (``time.monotonic_ns``); cleared."""
        length = self.struct.leftover_length
        if not length:
            return b"", 0
        self.struct.leftover_length = 0
        return ctypes.string_at(ctypes.addressof(self.struct.leftover), length), int(
            self.struct.leftover_read_ns
        )

    def take_recorded(self) -> list[int]:
        """The faults the C side served since the last call, ``page_index << 1 | write``, in
        order; cleared."""
        length = self.struct.record_length
        if self._record is None or not length:
            return []
        entries = self._record[:length]
        self.struct.record_length = 0
        return entries

    def counters(self) -> dict[str, int]:
        """The C side's counters (read while it may add to them)."""
        counters = self.struct.counters
        values = {name: int(getattr(counters, name)) for name in COUNTER_NAMES}
        return values

    def latency(self) -> list[int]:
        """The C side's latency histogram buckets."""
        return list(self.struct.counters.latency)


class NativeEngine:
    """The C side of one :class:`~shmfault.engine.FaultEngine`: waits on its epoll set and
    serves the attachments registered with :meth:`watch`.

    With ``lanes`` > 0 it also runs that many lane threads, lane i pinned to ``cpus[i]`` (none
    past the list's end), each serving the attachments lent to it on an epoll set of its own;
    then every lendable attachment is lent to one, preferably the one on its client's CPU. What
    a lane cannot serve it hands back: the engine's ``handback_fd`` (an eventfd in the engine's
    epoll set) becomes readable and :meth:`take_handbacks` lists the attachments, which the
    engine thread then owns until it gives them back (:meth:`give`). A lane also hands back an
    attachment whose client now runs on another lane's CPU (``wanted_lane``): :meth:`move`.
    """

    def __init__(
        self,
        lib: ctypes.CDLL,
        *,
        epoll_fd: int,
        fault_around_pages: int,
        fault_around_max_pages: int,
        base_page: int,
        latency_bounds_ns: tuple[int, ...],
        spin_ns: int,
        probe_divisor: int,
        parallel_bytes: int,
        lanes: int = 0,
        cpus: Sequence[int] = (),
    ) -> None:
        if len(latency_bounds_ns) != LATENCY_BUCKETS - 1:
            raise ValueError("the latency histogram differs from the C side's")
        self._lib = lib
        self.struct = EngineStruct()
        self._pointer = ctypes.byref(self.struct)
        lib.sf_engine_init(self._pointer, epoll_fd)
        self.struct.fault_around_pages = fault_around_pages
        self.struct.fault_around_max_pages = fault_around_max_pages
        self.struct.base_page = base_page
        for index, bound in enumerate(latency_bounds_ns):
            self.struct.latency_bounds[index] = bound
        self.struct.spin_ns = spin_ns
        self.struct.spin_window_ns = spin_ns
        self.struct.parallel_bytes = parallel_bytes
        self._probe_divisor = probe_divisor
        self._watched: dict[int, NativeAttachment] = {}
        #: the eventfd a lane writes when it hands an attachment back
        self.handback_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._handbacks = lib.sf_handbacks_new(self.handback_fd)
        #: lane threads (each with an epoll fd and an eventfd), started now, so that the
        #: service's threads and fds do not change with its attachments; index i is lane i + 1
        self._lanes: list[int] = []
        while self._handbacks and len(self._lanes) < lanes:
            index = len(self._lanes)
            cpu = cpus[index] if index < len(cpus) else -1
            handle = lib.sf_lane_start(self._pointer, self._handbacks, probe_divisor, cpu)
            if not handle:
                logs.event(_log, logging.WARNING, "lane_not_started", started=len(self._lanes))
                break
            self._lanes.append(handle)
        #: the CPU each lane is pinned to (-1: not pinned), index i is lane i + 1
        self.lane_cpus = [int(lib.sf_lane_cpu(handle)) for handle in self._lanes]
        #: live attachments per lane, index 0 the engine thread's
        self._load = [0] * (len(self._lanes) + 1)
        #: attachments moved to the lane on their client's CPU
        self.moves = 0
        #: the attachments lent to lanes by the address of their struct (hand-backs name them)
        self.lent: dict[int, NativeAttachment] = {}

    def watch(self, fd: int, attachment: NativeAttachment, *, lendable: bool = True) -> None:
        """Serve ``fd``'s readiness with ``attachment`` from now on: with lanes, on the lane
        on its client's CPU, or the one with the fewest attachments; otherwise (or
        ``lendable`` False) in the engine thread's own wait, lane 0. The engine thread must not
        watch ``fd`` in its own epoll set for a lent one."""
        lane = self._lane_for(attachment) if lendable else 0
        if lane:
            if self._lib.sf_lane_watch(self._lanes[lane - 1], fd, ctypes.byref(attachment.struct)):
                lane = 0
            else:
                self.lent[ctypes.addressof(attachment.struct)] = attachment
        if not lane and self._lib.sf_watch(self._pointer, fd, ctypes.byref(attachment.struct)):
            raise MemoryError("the fast path's fd table cannot grow")
        self._lend(attachment, lane)
        self._watched[fd] = attachment

    def _lane_for(self, attachment: NativeAttachment) -> int:
        if not self._lanes:
            return 0
        cpu = self._lib.sf_task_cpu(attachment.struct.pid, 0) if attachment.struct.pid else -1
        if cpu >= 0 and cpu in self.lane_cpus:
            return self.lane_cpus.index(cpu) + 1
        return min(range(1, len(self._load)), key=self._load.__getitem__)

    def _lend(self, attachment: NativeAttachment, lane: int) -> None:
        attachment.lane = lane
        attachment.cpu = self.lane_cpus[lane - 1] if lane else -1
        self._load[lane] += 1

    def move(self, fd: int, attachment: NativeAttachment) -> None:
        """Lend a handed-back attachment to the lane it asked for (``wanted_lane``), its
        client's CPU's. Raises OSError when no lane takes it; it is then unwatched."""
        wanted = int(attachment.struct.wanted_lane)
        attachment.struct.wanted_lane = 0
        old = attachment.lane
        if not 0 < wanted <= len(self._lanes) or wanted == old:
            self.give(fd, attachment)
            return
        self._lib.sf_lane_unwatch(self._lanes[old - 1], fd)
        self._load[old] -= 1
        for lane in (wanted, old):
            if not self._lib.sf_lane_watch(
                self._lanes[lane - 1], fd, ctypes.byref(attachment.struct)
            ):
                self._lend(attachment, lane)
                self.moves += lane == wanted
                return
        self._watched.pop(fd, None)
        self.lent.pop(ctypes.addressof(attachment.struct), None)
        raise OSError("no lane took an attachment back (epoll_ctl)")

    def unwatch(self, fd: int) -> None:
        """Stop serving ``fd`` for good (before it is closed: the number may be reused). Once
        this returns no lane serves it or will."""
        attachment = self._watched.pop(fd, None)
        if attachment is None:
            return
        self._load[attachment.lane] -= 1
        if attachment.lane:
            self._lib.sf_lane_unwatch(self._lanes[attachment.lane - 1], fd)
            self.lent.pop(ctypes.addressof(attachment.struct), None)
        else:
            self._lib.sf_watch(self._pointer, fd, None)

    def take(self, fd: int, attachment: NativeAttachment) -> None:
        """The engine thread serves a lent attachment for a while: once this returns its lane
        does not serve it until :meth:`give`."""
        if attachment.lane:
            self._lib.sf_lane_take(self._lanes[attachment.lane - 1], fd)

    def give(self, fd: int, attachment: NativeAttachment) -> None:
        """Lend the attachment to its lane again."""
        if attachment.lane and self._lib.sf_lane_give(self._lanes[attachment.lane - 1], fd):
            raise OSError("a lane refused an attachment back (epoll_ctl)")

    def take_handbacks(self) -> list[NativeAttachment]:
        """The lent attachments a lane handed back since the last call, oldest first (the
        engine thread owns them now); those unwatched meanwhile are left out."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.handback_fd)
        taken: list[NativeAttachment] = []
        room = 256
        buffer = (ctypes.c_void_p * room)()
        while True:
            count = self._lib.sf_handbacks_take(self._handbacks, buffer, room)
            for address in buffer[:count]:
                attachment = self.lent.get(address or 0)
                if attachment is not None:
                    taken.append(attachment)
            if count < room:
                return taken

    def wait(self, timeout_ms: int) -> list[int]:
        """Wait (``timeout_ms``; -1: no limit; 0: a look) and serve; the fds left to Python."""
        count = self._lib.sf_wait(self._pointer, timeout_ms, self._probe_divisor)
        if count < 0:
            raise OSError(-count, os.strerror(-count))
        return list(self.struct.ready[:count])

    def replay_step(
        self, attachment: NativeAttachment, pages: Sequence[int]
    ) -> tuple[int, int, tuple[int, int, int] | None]:
        """Fill the fault-around blocks of the recorded ``pages`` (region page indexes,
        ascending) ahead of the client: (how many of ``pages`` are done with, pages filled, a
        block ``(range index, start, end)`` not done whole, which the caller finishes, or
        None when all were)."""
        array = (ctypes.c_uint64 * len(pages))(*pages)
        filled = ctypes.c_uint64(0)
        block_range = ctypes.c_uint32(0)
        block_start = ctypes.c_uint64(0)
        block_end = ctypes.c_uint64(0)
        done = self._lib.sf_replay_step(
            self._pointer,
            ctypes.byref(attachment.struct),
            array,
            len(pages),
            ctypes.byref(filled),
            ctypes.byref(block_range),
            ctypes.byref(block_start),
            ctypes.byref(block_end),
        )
        if not block_end.value:  # every block done (done == len(pages))
            return done, filled.value, None
        return done, filled.value, (block_range.value, block_start.value, block_end.value)

    def mark_active(self) -> None:
        """Python served something: start the spin window now."""
        self._lib.sf_mark_active(self._pointer)

    def stats(self) -> dict[str, Any]:
        """Spin counters, faults served in C, readinesses handed to Python: the engine
        thread's and its lanes' summed (the spin window is the engine thread's)."""
        structs = [self.struct, *(self._lib.sf_lane_engine(lane).contents for lane in self._lanes)]
        totals = {
            name: sum(int(getattr(struct, field)) for struct in structs)
            for name, field in (
                ("spin_probes", "spin_probes"),
                ("spin_polls", "spin_polls"),
                ("spin_hits", "spin_hits"),
                ("spin_time_ns", "spin_time_ns"),
                ("native_faults", "faults_served"),
                ("native_handoffs", "batches_returned"),
            )
        }
        return {
            **totals,
            "lane_faults": sum(int(struct.faults_served) for struct in structs[1:]),
            # per lane, comma-separated: one key=value field in the log line
            "lane_faults_each": ",".join(str(int(struct.faults_served)) for struct in structs[1:]),
            "lane_cpus": ",".join(map(str, self.lane_cpus)),
            "lane_moves": self.moves,
            "spin_window_ns": int(self.struct.spin_window_ns),
            "native_nowait_reads": int(self.struct.nowait_reads),
            "lanes": len(self._lanes),
        }

    def close(self) -> None:
        """Stop the lanes and free the C side's memory (the engine thread has stopped
        waiting)."""
        for fd in list(self._watched):
            self.unwatch(fd)
        for lane in self._lanes:
            self._lib.sf_lane_stop(lane)
        self._lanes.clear()
        self._lib.sf_engine_free(self._pointer)
        if self._handbacks:
            self._lib.sf_handbacks_free(self._handbacks)
            self._handbacks = None
        os.close(self.handback_fd)

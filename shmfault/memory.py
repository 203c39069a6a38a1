"""Region backings: the file behind a region's memory, and the page-granular data path over it.

Three kinds of file back a region: an anonymous memfd (sealed against shrinking and growing), a
named POSIX shared memory object on /dev/shm (posix_ipc), and a hugetlb memfd. All are sparse:
``ftruncate`` sets the size and no page exists until something is written.

A page is *filled* when it is present in the file. On tmpfs (memfd, /dev/shm) presence is what
``lseek(SEEK_DATA/SEEK_HOLE)`` reports, so nothing else needs to be recorded and a restarted
service still knows which pages of a /dev/shm object were written. hugetlbfs has no SEEK_HOLE
(its llseek is the default one: all "data") and no ``write(2)``: hugetlb backings keep a bitmap
in memory (their content does not outlive the process anyway) and are written through a mapping
the service holds for the life of the region. That mapping is made without MAP_NORESERVE, so the
kernel reserves every huge page at create: a later fault can never SIGBUS for lack of a page.

:class:`RegionBacking` puts a backing and its source content together: ``fill`` writes the
source's bytes into the pages of a range that are still holes, ``read`` fills then reads,
``write`` fills the partially covered edge pages then writes. The lazy-attach fault engine uses
the same ``fill`` before UFFDIO_CONTINUE.

Caveat: page-granular presence assumes tmpfs allocates base pages. With shmem transparent huge
pages forced on (``shmem_enabled`` = always/force, or a /dev/shm mounted huge=always), writing
one page may allocate a 2 MiB folio and make its neighbours look filled with zeros.
:func:`shmem_thp_warning` tells the server to log that at startup.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import mmap
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import posix_ipc

from shmfault import _libc, fastpath
from shmfault.errors import (
    AlreadyExistsError,
    HugePagesUnavailableError,
    QuotaExceededError,
    RegionNotFoundError,
)

#: Largest piece read from a source or written to a backing in one call: bounds the memory a
#: fill of a huge range uses, and how long the region lock is held between pieces.
CHUNK_BYTES = 1 << 20

_HUGEPAGES_SYSFS = Path("/sys/kernel/mm/hugepages")


class BackingKind(enum.StrEnum):
    """What kind of file backs a region."""

    MEMFD = "memfd"
    POSIX_SHM = "posix-shm"
    HUGETLB = "hugetlb"


def base_page_size() -> int:
    """The base page size of this machine (the page size of memfd and /dev/shm backings)."""
    return os.sysconf("SC_PAGE_SIZE")


def default_huge_page_size() -> int:
    """The default huge page size (``Hugepagesize`` of /proc/meminfo), in bytes; 0 where the
    kernel has no hugetlb support. Never blocks."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("Hugepagesize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def page_size_of(kind: BackingKind) -> int:
    """The page size a new backing of ``kind`` has (0: hugetlb is not supported here)."""
    return default_huge_page_size() if kind is BackingKind.HUGETLB else base_page_size()


def available_huge_pages(page_size: int) -> tuple[int, str]:
    """Huge pages of ``page_size`` that a new reservation can still get (free minus reserved),
    and a description of the sysfs figures behind the number. Never blocks."""
    directory = _HUGEPAGES_SYSFS / f"hugepages-{page_size // 1024}kB"
    try:
        free = int((directory / "free_hugepages").read_text())
        reserved = int((directory / "resv_hugepages").read_text())
    except (OSError, ValueError):
        return 0, f"{directory} is not readable: this kernel offers no {page_size} byte pages"
    available = max(free - reserved, 0)
    return available, f"{directory}: free_hugepages {free}, resv_hugepages {reserved}"


def shmem_thp_warning() -> str | None:
    """Why page-granular filling could be wrong on this machine, or None when it is sound."""
    path = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
    try:
        text = path.read_text()
    except OSError:
        return None
    chosen = text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()
    if chosen in ("always", "within_size", "force"):
        return (
            f"{path} is {chosen!r}: tmpfs may allocate huge folios, so writing one page of a "
            "memfd region can make its neighbours look filled; set it to 'never' or 'advise'"
        )
    return None


class Backing:
    """An open backing file of a region. Owns its file descriptor (and, for hugetlb, the
    service's mapping of it); thread-unsafe on its own: :class:`RegionBacking` serialises."""

    def __init__(
        self, kind: BackingKind, fd: int, size: int, page_size: int, shm_name: str = ""
    ) -> None:
        self.kind = kind
        self.size = size
        self.page_size = page_size
        self.shm_name = shm_name
        self._fd = fd
        self._map: mmap.mmap | None = None
        self._filled: bytearray | None = None
        if kind is BackingKind.HUGETLB:
            try:
                self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                os.close(fd)
                available, figures = available_huge_pages(page_size)
                raise HugePagesUnavailableError(
                    f"cannot reserve {size // page_size} huge pages of {page_size} bytes for "
                    f"{size} bytes ({exc.strerror}); {available} available ({figures})",
                    "size",
                ) from exc
            self._filled = bytearray(size // page_size)

    @classmethod
    def create(cls, kind: BackingKind, size: int, label: str, shm_name: str = "") -> Backing:
        """A new, empty (sparse) backing of ``size`` bytes, which must be a multiple of
        ``page_size_of(kind)``. ``label`` names the memfd (visible in /proc/PID/fd);
        ``shm_name`` is the POSIX name of a posix-shm backing.

        Does not block. Raises :class:`AlreadyExistsError` when ``shm_name`` exists,
        :class:`HugePagesUnavailableError` when the huge pages cannot be reserved, OSError on
        other kernel refusals.
        """
        if kind is BackingKind.POSIX_SHM:
            try:
                shm = posix_ipc.SharedMemory(shm_name, posix_ipc.O_CREX, mode=0o600, size=size)
            except posix_ipc.ExistentialError as exc:
                raise AlreadyExistsError(f"POSIX shm object {shm_name} already exists") from exc
            fd = os.dup(shm.fd)
            shm.close_fd()
            return cls(kind, fd, size, base_page_size(), shm_name)
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        page_size = base_page_size()
        if kind is BackingKind.HUGETLB:
            flags |= os.MFD_HUGETLB
            page_size = default_huge_page_size()
        fd = os.memfd_create(label, flags)
        try:
            os.ftruncate(fd, size)
            # The mapping of every attached client would SIGBUS past a shrunk end; growing
            # would escape the quotas. F_SEAL_SEAL: nobody holding the fd can undo that.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)
            if kind is BackingKind.HUGETLB:
                page_size = os.fstatvfs(fd).f_bsize
        except BaseException:
            os.close(fd)
            raise
        return cls(kind, fd, size, page_size)

    @classmethod
    def open_posix_shm(cls, shm_name: str, size: int) -> Backing | None:
        """Reopen the posix-shm object ``shm_name`` a previous run of the service created, or
        None when it is gone or not ours to trust (another owner, not a regular file, another
        size): the caller then recreates the region's content. Does not block."""
        try:
            shm = posix_ipc.SharedMemory(shm_name)
        except posix_ipc.ExistentialError:
            return None
        fd = os.dup(shm.fd)
        shm.close_fd()
        info = os.fstat(fd)
        if info.st_uid != os.geteuid() or not stat.S_ISREG(info.st_mode) or info.st_size != size:
            os.close(fd)
            return None
        return cls(BackingKind.POSIX_SHM, fd, size, base_page_size(), shm_name)

    def fileno(self) -> int:
        """The backing's file descriptor (owned by this object)."""
        return self._fd

    def allocated_bytes(self) -> int:
        """Memory the file holds now (st_blocks). O(1)."""
        return os.fstat(self._fd).st_blocks * 512

    def holes(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The unfilled page ranges ``[hole_start, hole_end)`` within the page-aligned range
        ``[start, end)``, in order. Never walks past ``end``: SEEK_HOLE from inside a run of
        pages walks the whole run (0.8 ms over 64 MiB), so a range the file has every page of
        is told by cachestat first, where the kernel has it."""
        if self._filled is not None:
            yield from self._bitmap_runs(start, end, 0)
            return
        position = start
        while position < end:
            present = _libc.pages_present(self._fd, position, end - position)
            if present is not None and present >= (end - position) // self.page_size:
                return
            try:
                hole = os.lseek(self._fd, position, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return
                raise
            if hole >= end:
                return
            try:
                data = os.lseek(self._fd, hole, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data = self.size
            yield hole, min(data, end)
            position = data

    def _bitmap_runs(self, start: int, end: int, value: int) -> Iterator[tuple[int, int]]:
        assert self._filled is not None
        page = start // self.page_size
        last = end // self.page_size
        other = bytes([1 - value])
        this = bytes([value])
        while page < last:
            first = self._filled.find(this, page, last)
            if first < 0:
                return
            after = self._filled.find(other, first, last)
            after = last if after < 0 else after
            yield first * self.page_size, after * self.page_size
            page = after

    def mark_filled(self, start: int, end: int) -> None:
        """Pages [start, end) were filled from outside this object (the fault engine's
        UFFDIO_COPY into an attached mapping). Only a bitmap-tracked backing (hugetlb) needs
        telling: tmpfs knows its own holes."""
        if self._filled is not None:
            first, last = start // self.page_size, end // self.page_size
            self._filled[first:last] = b"\x01" * (last - first)

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset`` (whole, retrying short writes). Marks touched hugetlb
        pages filled: the caller makes sure partial pages were filled first."""
        if self._map is not None:
            self._map[offset : offset + len(data)] = data
            self.mark_filled(
                offset - offset % self.page_size,
                -(-(offset + len(data)) // self.page_size) * self.page_size,
            )
            return
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written

    def zero_fill(self, start: int, end: int) -> None:
        """Allocate zeroed pages for the page-aligned hole range ``[start, end)``."""
        os.posix_fallocate(self._fd, start, end - start)
        self.mark_filled(start, end)

    def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (holes read as zeros and stay holes)."""
        pieces = []
        while length > 0:
            piece = os.pread(self._fd, length, offset)
            if not piece:
                raise OSError(errno.EIO, f"short read of a backing at {offset}")
            pieces.append(piece)
            offset += len(piece)
            length -= len(piece)
        return b"".join(pieces)

    def close(self) -> None:
        """Release the mapping and the file descriptor. Idempotent."""
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def unlink(self) -> None:
        """Remove a posix-shm backing's name (the memory goes with the last descriptor)."""
        if self.shm_name:
            unlink_posix_shm(self.shm_name)


def unlink_posix_shm(shm_name: str) -> bool:
    """Remove the POSIX shm object ``shm_name``; False when it did not exist."""
    try:
        posix_ipc.unlink_shared_memory(shm_name)
    except posix_ipc.ExistentialError:
        return False
    return True


def unlink_posix_shm_if_ours(shm_name: str) -> bool:
    """Remove ``shm_name`` only when this user owns it (a stale object of ours, e.g. of the
    wrong size); an object someone else created under our name is left alone."""
    try:
        shm = posix_ipc.SharedMemory(shm_name)
    except posix_ipc.ExistentialError:
        return False
    try:
        owner = os.fstat(shm.fd).st_uid
    finally:
        shm.close_fd()
    return owner == os.geteuid() and unlink_posix_shm(shm_name)


class FileInPlace(NamedTuple):
    """Where a file source's bytes are for code that reads them without Python (the engine's
    C fast path): the open file and the file offset of region offset 0, and a mapping of it."""

    fd: int
    offset: int
    #: the address of region offset 0 in a read-only shared mapping of the file (0: none)
    address: int
    #: region bytes mapped from offset 0
    mapped: int


class Content(Protocol):
    """The bytes a region's pages hold before anyone writes them."""

    #: Every byte is zero: an unfilled page already reads right, reading need not fill it.
    zero: bool

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of content at ``offset``. May block on disk. Raises
        SourceUnavailableError when the source can no longer provide them."""
        ...

    def address(self, offset: int, length: int) -> int | None:
        """Where this process can read the content's ``[offset, offset + length)`` in place (a
        mapping of the source, valid until :meth:`close`), or None: use :meth:`read`. A copy
        from it fails with EFAULT where the source no longer has the bytes; :meth:`read` then
        says why."""
        ...

    def in_place(self) -> FileInPlace | None:
        """The file the content is read from, and its mapping, or None (not a file). Valid
        until :meth:`close`, like :meth:`address`."""
        ...

    def close(self) -> None:
        """Release what the content holds open."""
        ...


class ZeroContent:
    """Zeros: the content of the zero and bytes sources."""

    zero = True

    def read(self, offset: int, length: int) -> bytes:
        """``length`` zero bytes."""
        return bytes(length)

    def address(self, offset: int, length: int) -> int | None:
        """None: zeros are not read from anywhere."""
        return None

    def in_place(self) -> FileInPlace | None:
        """None: not a file."""
        return None

    def close(self) -> None:
        """Nothing to release."""


class RegionBacking:
    """A region's backing together with its source content, behind one lock.

    Every method is page-granular, works in pieces of at most :data:`CHUNK_BYTES`, and does
    work proportional to the range asked for, never to the region's size. Each holds the
    region's lock while it runs (blocking other calls on the same region, not on others).
    Ranges must lie within the region; callers validate them. After :meth:`close`, every
    method raises :class:`RegionNotFoundError`.
    """

    def __init__(self, region_id: str, backing: Backing, content: Content) -> None:
        self.region_id = region_id
        self.backing = backing
        self.content = content
        self.size = backing.size
        self.page_size = backing.page_size
        # Shared with the engine's C fast path when it is loaded (it fills under it too).
        self._lock = fastpath.region_lock()
        self._closed = False

    @property
    def native_lock(self) -> fastpath.RegionLock | None:
        """The lock as the C fast path takes it, or None (the fast path is not loaded)."""
        return self._lock if isinstance(self._lock, fastpath.RegionLock) else None

    def locked(self) -> contextlib.AbstractContextManager[Any]:
        """The region's lock, to hold across a check of its holes and the fill that follows
        (the fault engine's UFFDIO_COPY into the region file). Reentrant."""
        return self._lock

    def _check_open(self) -> None:
        if self._closed:
            raise RegionNotFoundError(f"region {self.region_id} was deleted", "region")

    def _page_range(self, offset: int, length: int) -> tuple[int, int]:
        start = offset - offset % self.page_size
        end = min(-(-(offset + length) // self.page_size) * self.page_size, self.size)
        return start, end

    def fill(self, offset: int, length: int) -> int:
        """Fill from the source every unfilled page that ``[offset, offset + length)`` touches;
        filled pages are left alone (they may hold writes). Returns the bytes filled.

        Blocks on the source (disk reads, another region's lock). Raises
        :class:`QuotaExceededError` when the kernel has no memory or space left for the pages,
        SourceUnavailableError from the source.
        """
        with self._lock:
            self._check_open()
            start, end = self._page_range(offset, length)
            filled = 0
            try:
                for hole_start, hole_end in list(self.backing.holes(start, end)):
                    if self.content.zero:
                        self.backing.zero_fill(hole_start, hole_end)
                    else:
                        for piece in range(hole_start, hole_end, CHUNK_BYTES):
                            piece_end = min(piece + CHUNK_BYTES, hole_end)
                            self.backing.pwrite(piece, self.content.read(piece, piece_end - piece))
                    filled += hole_end - hole_start
            except OSError as exc:
                raise _no_room(exc, self.region_id) from exc
            return filled

    def read(self, offset: int, length: int) -> bytes:
        """The region's bytes at ``[offset, offset + length)``, filling unfilled pages from the
        source first, except for zero content, where a hole already reads right and reading
        need not cost memory. Blocks like :meth:`fill`."""
        with self._lock:
            self._check_open()
            if not self.content.zero:
                self.fill(offset, length)
            return self.backing.pread(offset, length)

    def peek(self, offset: int, length: int) -> bytes:
        """The region's current bytes at ``[offset, offset + length)`` without filling
        anything: unfilled pages are read from the source. This is what a region that uses
        this one as its source sees. Blocks on the source."""
        with self._lock:
            self._check_open()
            if self.content.zero:
                return self.backing.pread(offset, length)
            end = offset + length
            pieces = []
            position = offset
            start, page_end = self._page_range(offset, length)
            for page_hole_start, page_hole_end in self.backing.holes(start, page_end):
                hole_start, hole_end = max(page_hole_start, offset), min(page_hole_end, end)
                if hole_start > position:
                    pieces.append(self.backing.pread(position, hole_start - position))
                pieces.append(self.content.read(hole_start, hole_end - hole_start))
                position = hole_end
            if position < end:
                pieces.append(self.backing.pread(position, end - position))
            return b"".join(pieces)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset``. The first and last pages, when only partly covered,
        are filled from the source first so their other bytes are right. Blocks like
        :meth:`fill`."""
        if not data:
            return
        with self._lock:
            self._check_open()
            end = offset + len(data)
            if offset % self.page_size:
                self.fill(offset, 1)
            if end % self.page_size:
                self.fill(end - 1, 1)
            try:
                self.backing.pwrite(offset, data)
            except OSError as exc:
                raise _no_room(exc, self.region_id) from exc

    def fill_all(self) -> int:
        """Fill every unfilled page (eager fill policy). Returns the bytes filled. Blocks for
        time proportional to the unfilled size."""
        filled = 0
        # Piece by piece, so other calls on the region get the lock between pieces.
        for piece in range(0, self.size, CHUNK_BYTES):
            filled += self.fill(piece, min(CHUNK_BYTES, self.size - piece))
        return filled

    def allocated_bytes(self) -> int:
        """Memory the backing holds now; 0 once closed."""
        with self._lock:
            return 0 if self._closed else self.backing.allocated_bytes()

    def close(self) -> None:
        """Close the backing and the content, waiting for a running call on this region to
        finish first. Idempotent. Does not unlink a posix-shm name."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if isinstance(self._lock, fastpath.RegionLock):
                    self._lock.close()
                self.backing.close()
                self.content.close()


def _no_room(exc: OSError, region_id: str) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
        return QuotaExceededError(
            f"the kernel has no room for more pages of region {region_id}: {exc.strerror}"
        )
    return exc

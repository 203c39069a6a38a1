"""The few raw calls Python's standard library lacks, made through libc with ctypes.

Every call here raises :class:`OSError` with the C ``errno`` on failure and retries ``EINTR``.
Nothing above this module calls ctypes for a system call.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

_libc = ctypes.CDLL(None, use_errno=True)

#: userfaultfd(2) syscall number per architecture (unistd.h); the call has no glibc wrapper
#: before glibc 2.36 and none in musl.
_SYS_USERFAULTFD = {
    "x86_64": 323,
    "aarch64": 282,
    "ppc64le": 364,
    "ppc64": 364,
    "s390x": 355,
    "riscv64": 282,
    "loongarch64": 282,
}

_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

#: cachestat(2), Linux 6.5: one number on every architecture, as for every call since 424
_SYS_CACHESTAT = 451
#: whether the kernel said ENOSYS once (then it is not asked again)
_cachestat_missing = [False]


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_mremap = _libc.mremap
_mremap.restype = ctypes.c_void_p
_mremap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_void_p,
]
_madvise = _libc.madvise
_madvise.restype = ctypes.c_int
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

MAP_FAILED = ctypes.c_void_p(-1).value

# mman.h values that Python's mmap module does not export on every version.
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_POPULATE = 0x8000
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MREMAP_DONTUNMAP = 4
MADV_DONTNEED = 4
MADV_REMOVE = 9
MADV_DONTFORK = 10
MADV_POPULATE_WRITE = 23
PROT_NONE = 0
PROT_READ = 1
PROT_WRITE = 2


def _raise_errno(call: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{call}: {os.strerror(err)}")


def userfaultfd_syscall_number() -> int | None:
    """The userfaultfd(2) syscall number on this architecture, or None where unknown."""
    return _SYS_USERFAULTFD.get(platform.machine())


def userfaultfd(flags: int) -> int:
    """userfaultfd(2): a new userfaultfd file descriptor. Raises OSError (ENOSYS where the
    architecture's syscall number is unknown)."""
    number = userfaultfd_syscall_number()
    if number is None:
        raise OSError(
            errno.ENOSYS, f"userfaultfd: no syscall number known for {platform.machine()}"
        )
    while True:
        fd = _syscall(ctypes.c_long(number), ctypes.c_int(flags))
        if fd >= 0:
            return int(fd)
        if ctypes.get_errno() != errno.EINTR:
            _raise_errno("userfaultfd")


def pages_present(fd: int, offset: int, length: int) -> int | None:
    """cachestat(2): how many pages of the file's ``[offset, offset + length)`` it has, in
    memory or (shmem) swapped out; None when the kernel cannot say (before 6.5, hugetlbfs)."""
    if _cachestat_missing[0]:
        return None
    request = _CachestatRange(offset, length)
    stat = _Cachestat()
    if _syscall(
        ctypes.c_long(_SYS_CACHESTAT),
        ctypes.c_uint(fd),
        ctypes.byref(request),
        ctypes.byref(stat),
        ctypes.c_uint(0),
    ):
        _cachestat_missing[0] = ctypes.get_errno() == errno.ENOSYS
        return None
    return int(stat.nr_cache + stat.nr_evicted)


def mmap(address: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """mmap(2); returns the mapping's address. Raises OSError."""
    result = _mmap(address or None, length, prot, flags, fd, offset)
    if result is None or result == MAP_FAILED:
        _raise_errno("mmap")
    assert result is not None
    return int(result)


def munmap(address: int, length: int) -> None:
    """munmap(2). Raises OSError."""
    if _munmap(address, length) != 0:
        _raise_errno("munmap")


def mremap(address: int, old_length: int, new_length: int, flags: int, new_address: int = 0) -> int:
    """mremap(2); returns the new address. Raises OSError."""
    result = _mremap(address, old_length, new_length, flags, new_address or None)
    if result is None or result == MAP_FAILED:
        _raise_errno("mremap")
    assert result is not None
    return int(result)


_read = _libc.read
_read.restype = ctypes.c_ssize_t
_read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]


def read_once(fd: int, buffer: ctypes.Array[ctypes.c_char] | bytearray) -> int:
    """read(2) into ``buffer``, once: unlike ``os.read``, a signal interrupts it (OSError
    EINTR) rather than restarting it, so that another thread can unblock a read that should
    not have blocked (``signal.pthread_kill``). Releases the GIL. Returns the bytes read."""
    if isinstance(buffer, bytearray):
        buffer = (ctypes.c_char * len(buffer)).from_buffer(buffer)
    count = _read(fd, buffer, len(buffer))
    if count < 0:
        _raise_errno("read")
    return int(count)


def madvise(address: int, length: int, advice: int) -> None:
    """madvise(2); retries EINTR (MADV_POPULATE_* may be interrupted). Raises OSError."""
    while _madvise(address, length, advice) != 0:
        if ctypes.get_errno() != errno.EINTR:
            _raise_errno("madvise")


def memory_view(address: int, length: int) -> memoryview:
    """A writable memoryview over ``length`` bytes at ``address`` (which must stay mapped)."""
    return memoryview((ctypes.c_char * length).from_address(address)).cast("B")


def copy_memory(destination: int, source: int, length: int) -> None:
    """memmove between raw addresses without holding the GIL.

    A touch of userfaultfd-registered memory may block in the kernel until another thread of
    this process resolves it: that thread must be able to run, so the toucher must not hold
    the GIL while it waits.
    """
    ctypes.memmove(destination, source, length)

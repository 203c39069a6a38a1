"""The userfaultfd kernel ABI as data, transcribed from ``<linux/userfaultfd.h>``.

Struct layouts, ioctl request numbers, and feature, event and mode bits. No behaviour lives
here: :mod:`shmfault.uffd` and :mod:`shmfault.events` give it meaning. Values the build
machine's headers may be too old to know (``WP_UNPOPULATED``, ``POISON``, ``WP_ASYNC``,
``MOVE``) are included; the running kernel reports which of them it supports.

Every struct is little-/native-endian with natural alignment, exactly as the C compiler
lays it out on the 64-bit architectures Linux supports userfaultfd on (x86_64, aarch64,
ppc64le, s390x is big-endian and uses the native byte order: hence ``=``).
"""

from __future__ import annotations

import enum
import platform
import struct

# --- ioctl request encoding (asm-generic/ioctl.h) ---
# powerpc overrides it (arch/powerpc/include/uapi/asm/ioctl.h: 13 size bits, 3 direction bits,
# NONE=1, WRITE=4): its _IO/_IOR numbers differ from the generic ones. Every other architecture
# that _libc knows a userfaultfd syscall number for uses the generic encoding.
_POWERPC = platform.machine().startswith(("ppc", "powerpc"))

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 13 if _POWERPC else 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 1 if _POWERPC else 0
_IOC_WRITE = 4 if _POWERPC else 1
_IOC_READ = 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _io(type_: int, nr: int) -> int:
    return _ioc(_IOC_NONE, type_, nr, 0)


def _ior(type_: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ, type_, nr, size)


def _iowr(type_: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, type_, nr, size)


def ioctl_size(request: int) -> int:
    """The argument size encoded in an ioctl request number."""
    return (request >> _IOC_SIZESHIFT) & ((1 << _IOC_SIZEBITS) - 1)


# --- struct layouts ---

#: struct uffdio_range { __u64 start; __u64 len; }
UFFDIO_RANGE = struct.Struct("=QQ")
#: struct uffdio_api { __u64 api; __u64 features; __u64 ioctls; }
UFFDIO_API_STRUCT = struct.Struct("=QQQ")
#: struct uffdio_register { struct uffdio_range range; __u64 mode; __u64 ioctls; }
UFFDIO_REGISTER_STRUCT = struct.Struct("=QQQQ")
#: struct uffdio_copy { __u64 dst; __u64 src; __u64 len; __u64 mode; __s64 copy; }
UFFDIO_COPY_STRUCT = struct.Struct("=QQQQq")
#: struct uffdio_zeropage { struct uffdio_range range; __u64 mode; __s64 zeropage; }
UFFDIO_ZEROPAGE_STRUCT = struct.Struct("=QQQq")
#: struct uffdio_move { __u64 dst; __u64 src; __u64 len; __u64 mode; __s64 move; }
UFFDIO_MOVE_STRUCT = struct.Struct("=QQQQq")
#: struct uffdio_writeprotect { struct uffdio_range range; __u64 mode; }
UFFDIO_WRITEPROTECT_STRUCT = struct.Struct("=QQQ")
#: struct uffdio_continue { struct uffdio_range range; __u64 mode; __s64 mapped; }
UFFDIO_CONTINUE_STRUCT = struct.Struct("=QQQq")
#: struct uffdio_poison { struct uffdio_range range; __u64 mode; __s64 updated; }
UFFDIO_POISON_STRUCT = struct.Struct("=QQQq")

#: struct uffd_msg: __u8 event; __u8 reserved1; __u16 reserved2; __u32 reserved3; then a
#: 24-byte union (packed in C, but every member is naturally aligned at offset 8).
UFFD_MSG = struct.Struct("=BBHI24s")
UFFD_MSG_SIZE = UFFD_MSG.size  # 32
#: union arm for UFFD_EVENT_PAGEFAULT: __u64 flags; __u64 address; union { __u32 ptid; } feat;
MSG_PAGEFAULT = struct.Struct("=QQI4x")
#: union arm for UFFD_EVENT_FORK: __u32 ufd;
MSG_FORK = struct.Struct("=I20x")
#: union arm for UFFD_EVENT_REMAP: __u64 from; __u64 to; __u64 len;
MSG_REMAP = struct.Struct("=QQQ")
#: union arm for UFFD_EVENT_REMOVE and UFFD_EVENT_UNMAP: __u64 start; __u64 end;
MSG_REMOVE = struct.Struct("=QQ8x")

# --- constants ---

UFFD_API = 0xAA
#: ioctl type letter of the userfaultfd ioctls
UFFDIO = 0xAA
#: ioctl type letter of /dev/userfaultfd
USERFAULTFD_IOC = 0xAA

#: flag of the userfaultfd(2) syscall (5.11+): only faults from user mode are reported
UFFD_USER_MODE_ONLY = 1

USERFAULTFD_IOC_NEW = _io(USERFAULTFD_IOC, 0x00)


class IoctlNr(enum.IntEnum):
    """The ioctl ordinals (``_UFFDIO_*``): bit ``1 << nr`` in an ``ioctls`` mask."""

    REGISTER = 0x00
    UNREGISTER = 0x01
    WAKE = 0x02
    COPY = 0x03
    ZEROPAGE = 0x04
    MOVE = 0x05  # 6.8+
    WRITEPROTECT = 0x06  # 5.7+
    CONTINUE = 0x07  # 5.13+
    POISON = 0x08  # 6.6+
    API = 0x3F


UFFDIO_API = _iowr(UFFDIO, IoctlNr.API, UFFDIO_API_STRUCT.size)
UFFDIO_REGISTER = _iowr(UFFDIO, IoctlNr.REGISTER, UFFDIO_REGISTER_STRUCT.size)
UFFDIO_UNREGISTER = _ior(UFFDIO, IoctlNr.UNREGISTER, UFFDIO_RANGE.size)
UFFDIO_WAKE = _ior(UFFDIO, IoctlNr.WAKE, UFFDIO_RANGE.size)
UFFDIO_COPY = _iowr(UFFDIO, IoctlNr.COPY, UFFDIO_COPY_STRUCT.size)
UFFDIO_ZEROPAGE = _iowr(UFFDIO, IoctlNr.ZEROPAGE, UFFDIO_ZEROPAGE_STRUCT.size)
UFFDIO_MOVE = _iowr(UFFDIO, IoctlNr.MOVE, UFFDIO_MOVE_STRUCT.size)
UFFDIO_WRITEPROTECT = _iowr(UFFDIO, IoctlNr.WRITEPROTECT, UFFDIO_WRITEPROTECT_STRUCT.size)
UFFDIO_CONTINUE = _iowr(UFFDIO, IoctlNr.CONTINUE, UFFDIO_CONTINUE_STRUCT.size)
UFFDIO_POISON = _iowr(UFFDIO, IoctlNr.POISON, UFFDIO_POISON_STRUCT.size)


class Ioctl(enum.IntFlag):
    """Bits of the ``ioctls`` masks that UFFDIO_API and UFFDIO_REGISTER return."""

    REGISTER = 1 << IoctlNr.REGISTER
    UNREGISTER = 1 << IoctlNr.UNREGISTER
    WAKE = 1 << IoctlNr.WAKE
    COPY = 1 << IoctlNr.COPY
    ZEROPAGE = 1 << IoctlNr.ZEROPAGE
    MOVE = 1 << IoctlNr.MOVE
    WRITEPROTECT = 1 << IoctlNr.WRITEPROTECT
    CONTINUE = 1 << IoctlNr.CONTINUE
    POISON = 1 << IoctlNr.POISON
    API = 1 << IoctlNr.API


class Feature(enum.IntFlag):
    """``UFFD_FEATURE_*``: what UFFDIO_API reports and what a handle may enable.

    The comment on each names the kernel release that brought it.
    """

    PAGEFAULT_FLAG_WP = 1 << 0  # 5.7
    EVENT_FORK = 1 << 1  # 4.11
    EVENT_REMAP = 1 << 2  # 4.11
    EVENT_REMOVE = 1 << 3  # 4.11
    MISSING_HUGETLBFS = 1 << 4  # 4.11
    MISSING_SHMEM = 1 << 5  # 4.11
    EVENT_UNMAP = 1 << 6  # 4.11
    SIGBUS = 1 << 7  # 4.14
    THREAD_ID = 1 << 8  # 4.14
    MINOR_HUGETLBFS = 1 << 9  # 5.13
    MINOR_SHMEM = 1 << 10  # 5.14
    EXACT_ADDRESS = 1 << 11  # 5.18
    WP_HUGETLBFS_SHMEM = 1 << 12  # 5.19
    WP_UNPOPULATED = 1 << 13  # 6.4
    POISON = 1 << 14  # 6.6
    WP_ASYNC = 1 << 15  # 6.7
    MOVE = 1 << 16  # 6.8


class RegisterMode(enum.IntFlag):
    """``UFFDIO_REGISTER_MODE_*``."""

    MISSING = 1 << 0
    WP = 1 << 1  # 5.7
    MINOR = 1 << 2  # 5.13


class CopyMode(enum.IntFlag):
    """``UFFDIO_COPY_MODE_*``."""

    DONTWAKE = 1 << 0
    WP = 1 << 1


class ZeropageMode(enum.IntFlag):
    """``UFFDIO_ZEROPAGE_MODE_*``."""

    DONTWAKE = 1 << 0


class WriteprotectMode(enum.IntFlag):
    """``UFFDIO_WRITEPROTECT_MODE_*``."""

    WP = 1 << 0
    DONTWAKE = 1 << 1


class ContinueMode(enum.IntFlag):
    """``UFFDIO_CONTINUE_MODE_*``."""

    DONTWAKE = 1 << 0
    WP = 1 << 1  # 6.4


class PoisonMode(enum.IntFlag):
    """``UFFDIO_POISON_MODE_*``."""

    DONTWAKE = 1 << 0


class MoveMode(enum.IntFlag):
    """``UFFDIO_MOVE_MODE_*``."""

    DONTWAKE = 1 << 0
    ALLOW_SRC_HOLES = 1 << 1


class EventType(enum.IntEnum):
    """``UFFD_EVENT_*``: the ``event`` byte of a ``uffd_msg``."""

    PAGEFAULT = 0x12
    FORK = 0x13
    REMAP = 0x14
    REMOVE = 0x15
    UNMAP = 0x16


class PagefaultFlag(enum.IntFlag):
    """``UFFD_PAGEFAULT_FLAG_*``: the ``flags`` of a pagefault message."""

    WRITE = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


def flag_names(value: int, flags: type[enum.IntFlag]) -> list[str]:
    """Names of the bits set in ``value``; bits ``flags`` does not know become ``"0x..."``."""
    names: list[str] = []
    for bit in range(value.bit_length()):
        mask = 1 << bit
        if value & mask:
            try:
                names.append(flags(mask).name or hex(mask))
            except ValueError:
                names.append(hex(mask))
    return names

"""The events a userfaultfd delivers, decoded from ``uffd_msg`` records by one pure function."""

from __future__ import annotations

from dataclasses import dataclass

from shmfault import _abi
from shmfault.errors import EventDecodeError

_PAGEFAULT = _abi.EventType.PAGEFAULT
_FORK = _abi.EventType.FORK
_REMAP = _abi.EventType.REMAP
_REMOVE = _abi.EventType.REMOVE
_UNMAP = _abi.EventType.UNMAP
_FLAG_WRITE = _abi.PagefaultFlag.WRITE
_FLAG_WP = _abi.PagefaultFlag.WP
_FLAG_MINOR = _abi.PagefaultFlag.MINOR


@dataclass(frozen=True, slots=True)
class Pagefault:
    """A thread touched a registered page it may not use yet and is blocked until resolved.

    ``address`` is the faulting address rounded down to the page unless the handle enabled
    EXACT_ADDRESS; ``thread_id`` is the faulting thread's id (0 unless THREAD_ID was enabled).
    """

    address: int
    flags: int
    thread_id: int = 0

    @property
    def is_write(self) -> bool:
        """The access was a write (otherwise a read)."""
        return bool(self.flags & _FLAG_WRITE)

    @property
    def is_write_protect(self) -> bool:
        """A write hit a write-protected page (register mode WP)."""
        return bool(self.flags & _FLAG_WP)

    @property
    def is_minor(self) -> bool:
        """The page is in the page cache but not mapped here (register mode MINOR)."""
        return bool(self.flags & _FLAG_MINOR)

    @property
    def kind(self) -> str:
        """``"missing"``, ``"wp"`` or ``"minor"``."""
        if self.flags & _FLAG_WP:
            return "wp"
        if self.flags & _FLAG_MINOR:
            return "minor"
        return "missing"


@dataclass(frozen=True, slots=True)
class Fork:
    """The registered process forked (EVENT_FORK). ``uffd_fd`` is a new userfaultfd that the
    kernel installed in the *reader's* fd table for the child: the reader owns and must close it.
    """

    uffd_fd: int


@dataclass(frozen=True, slots=True)
class Remap:
    """A registered range moved with mremap(2) (EVENT_REMAP)."""

    from_address: int
    to_address: int
    length: int


@dataclass(frozen=True, slots=True)
class Remove:
    """Pages in [start, end) were dropped by MADV_DONTNEED/MADV_REMOVE (EVENT_REMOVE): their next
    touch faults again. While this event is unread, fill ioctls on the range return EAGAIN."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Unmap:
    """[start, end) was unmapped (EVENT_UNMAP): stop serving it."""

    start: int
    end: int


Event = Pagefault | Fork | Remap | Remove | Unmap


def parse_events(data: bytes | bytearray | memoryview) -> list[Event]:
    """Decode consecutive 32-byte ``uffd_msg`` records. Pure: no I/O, no kernel.

    Raises :class:`EventDecodeError` for a trailing partial record or an unknown event code; the
    error's ``events`` holds every other record of the batch, decoded, in order.
    """
    view = memoryview(data).cast("B")
    count, remainder = divmod(len(view), _abi.UFFD_MSG_SIZE)
    events: list[Event] = []
    problems: list[str] = []
    for index, (code, _r1, _r2, _r3, body) in enumerate(
        _abi.UFFD_MSG.iter_unpack(view[: count * _abi.UFFD_MSG_SIZE])
    ):
        if code == _PAGEFAULT:
            flags, address, ptid = _abi.MSG_PAGEFAULT.unpack(body)
            events.append(Pagefault(address, flags, ptid))
        elif code == _REMOVE:
            events.append(Remove(*_abi.MSG_REMOVE.unpack(body)))
        elif code == _UNMAP:
            events.append(Unmap(*_abi.MSG_REMOVE.unpack(body)))
        elif code == _REMAP:
            events.append(Remap(*_abi.MSG_REMAP.unpack(body)))
        elif code == _FORK:
            events.append(Fork(_abi.MSG_FORK.unpack(body)[0]))
        else:
            problems.append(f"record {index}: unknown event code {code:#x}")
    if remainder:
        problems.append(
            f"{remainder} trailing bytes are not a whole {_abi.UFFD_MSG_SIZE}-byte record"
        )
    if problems:
        raise EventDecodeError("; ".join(problems), list(events))
    return events

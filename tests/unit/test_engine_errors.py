"""Every errno a fill or wake ioctl can return, injected through a stand-in userfaultfd, maps to
its documented action (docs/reliability.md, "What each ioctl error does"):

- EEXIST: the page is there already: the thread is woken, nothing filled twice;
- EAGAIN: the queued events are read and the fill retried, at most MAX_RETRIES times, then the
  thread is woken unfilled (it faults again);
- ENOMEM: the thread is woken unfilled, to fault again (the allocation may succeed later);
- ENOENT: no mapping at the address any more: nothing to fill, counted abandoned, the thread
  woken (it faults again and gets its SIGSEGV);
- ESRCH, ENOSPC: the client's memory is gone: the attachment ends, nothing woken;
- anything else (EINVAL, EFAULT, EPERM, EIO...): the attachment ends, every fault read and not
  served is woken first, so no thread stays blocked on this service's account.

The kernel itself is exercised by the integration tests; here only the engine's reaction is
under test, which no real kernel can be made to produce on demand for every errno.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from shmfault import _abi
from shmfault.engine import MAX_RETRIES, Attachment, FaultEngine, MappedRange
from shmfault.errors import uffd_error
from shmfault.events import Pagefault, Remove
from shmfault.memory import BackingKind
from shmfault.modes import Mode

PAGE = 4096
BASE = 0x7F00_0000_0000


def _record(event: Pagefault | Remove) -> bytes:
    if isinstance(event, Pagefault):
        body = _abi.MSG_PAGEFAULT.pack(event.flags, event.address, event.thread_id)
        return _abi.UFFD_MSG.pack(_abi.EventType.PAGEFAULT, 0, 0, 0, body)
    body = _abi.MSG_REMOVE.pack(event.start, event.end)
    return _abi.UFFD_MSG.pack(_abi.EventType.REMOVE, 0, 0, 0, body)


class FakeUffd:
    """Answers the engine's ioctls from a script: ``fails[operation]`` lists errnos to raise,
    one per call, before the call succeeds. Records every call."""

    def __init__(self, events: list[list[Any]], fails: dict[str, list[int]]) -> None:
        self.events = events
        self.fails = {name: list(codes) for name, codes in fails.items()}
        self.calls: list[tuple[str, int, int]] = []
        self.closed = False

    def _call(self, operation: str, address: int, length: int) -> int:
        self.calls.append((operation, address, length))
        codes = self.fails.get(operation)
        if codes:
            raise uffd_error(codes.pop(0), operation, address, length)
        return length

    def read_events(self, limit: int) -> list[Any]:
        return self.events.pop(0) if self.events else []

    def read_into(self, buffer: bytearray) -> int:
        """The next scripted batch as the kernel writes it: ``uffd_msg`` records."""
        records = b"".join(_record(event) for event in self.read_events(0))
        buffer[: len(records)] = records
        return len(records)

    def copy(self, destination: int, source: int, length: int, **_: Any) -> int:
        return self._call("UFFDIO_COPY", destination, length)

    def zeropage(self, address: int, length: int, **_: Any) -> int:
        return self._call("UFFDIO_ZEROPAGE", address, length)

    def continue_(self, address: int, length: int, **_: Any) -> int:
        return self._call("UFFDIO_CONTINUE", address, length)

    def wake(self, address: int, length: int, **_: Any) -> None:
        self._call("UFFDIO_WAKE", address, length)

    def unregister(self, address: int, length: int) -> None:
        self._call("UFFDIO_UNREGISTER", address, length)

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        self.closed = True

    def operations(self) -> list[str]:
        return [operation for operation, _address, _length in self.calls]


class Region:
    """A private-copy region stand-in: its bytes are a pattern, never read from a kernel."""

    page_size = PAGE
    region_id = "r0000000000aa"
    #: the region file has every page (no holes): its bytes are always read (peek) and copied,
    #: never zero pages nor copies straight from a source mapping
    backing = SimpleNamespace(kind=BackingKind.MEMFD, holes=lambda start, end: iter(()))
    content = SimpleNamespace(zero=True)

    def locked(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def peek(self, offset: int, length: int) -> bytes:
        return bytes(length)


@pytest.fixture
def engine() -> Iterator[FaultEngine]:
    made = FaultEngine(fault_around_pages=1)
    yield made
    made.stop()


def serve(
    engine: FaultEngine,
    events: list[list[Any]],
    fails: dict[str, list[int]],
    *,
    zero_after_remove: bool = False,
) -> tuple[Attachment, FakeUffd]:
    """One batch of ``events`` read and served by the engine, as its thread would."""
    fake = FakeUffd(events, fails)
    ours, theirs = socket.socketpair()
    theirs.close()
    attachment = Attachment(
        region=Region(),  # type: ignore[arg-type]
        mode=Mode.PRIVATE_COPY,
        ranges=[MappedRange(BASE, 8 * PAGE, 0)],
        uffd=fake,  # type: ignore[arg-type]
        connection=ours,
        machine=None,
        zero_after_remove=zero_after_remove,
    )
    engine._attachments[attachment.id] = attachment
    engine._serve_uffd(attachment)
    return attachment, fake


def fault(page: int) -> Pagefault:
    return Pagefault(BASE + page * PAGE, 0)


def ended(engine: FaultEngine, attachment: Attachment) -> bool:
    return attachment.id not in engine._attachments and attachment.ended is not None


def test_eexist_wakes_the_thread_and_marks_the_page_mapped(engine: FaultEngine) -> None:
    # The page exists, so both the block's copy and the page's own copy find it there.
    attachment, fake = serve(engine, [[fault(2)]], {"UFFDIO_COPY": [errno.EEXIST] * 2})
    assert fake.operations() == ["UFFDIO_COPY", "UFFDIO_COPY", "UFFDIO_WAKE"]
    assert attachment.ranges[0].pages[2] == 1
    assert (attachment.stats.eexist, attachment.stats.wakes) == (1, 1)
    assert not ended(engine, attachment)


def test_eagain_reads_the_queued_events_then_retries(engine: FaultEngine) -> None:
    # The REMOVE queued behind the fault is what made the copy fail: it is read, then the copy
    # succeeds.
    events = [[fault(3)], [Remove(BASE + 6 * PAGE, BASE + 8 * PAGE)]]
    attachment, fake = serve(engine, events, {"UFFDIO_COPY": [errno.EAGAIN]})
    assert fake.operations() == ["UFFDIO_COPY", "UFFDIO_COPY"]
    assert attachment.stats.eagain == 1
    assert attachment.stats.events_remove == 1
    assert attachment.ranges[0].pages[3] == 1
    assert not ended(engine, attachment)


def test_eagain_forever_wakes_the_thread_unfilled_after_the_retry_limit(
    engine: FaultEngine,
) -> None:
    attachment, fake = serve(
        engine, [[fault(1)]], {"UFFDIO_COPY": [errno.EAGAIN] * (MAX_RETRIES + 1)}
    )
    assert fake.operations() == ["UFFDIO_COPY"] * (MAX_RETRIES + 1) + ["UFFDIO_WAKE"]
    assert attachment.ranges[0].pages[1] == 0  # not filled: it faults again
    assert not ended(engine, attachment)


def test_enomem_wakes_the_thread_to_fault_again(engine: FaultEngine) -> None:
    attachment, fake = serve(engine, [[fault(4)]], {"UFFDIO_COPY": [errno.ENOMEM]})
    assert fake.operations() == ["UFFDIO_COPY", "UFFDIO_WAKE"]
    assert attachment.stats.enomem == 1
    assert attachment.ranges[0].pages[4] == 0
    assert not ended(engine, attachment)


def test_enoent_abandons_the_fault_and_wakes_its_thread(engine: FaultEngine) -> None:
    attachment, fake = serve(engine, [[fault(0)]], {"UFFDIO_COPY": [errno.ENOENT]})
    # Woken to fault again, on a page no longer mapped: its SIGSEGV, now.
    assert fake.operations() == ["UFFDIO_COPY", "UFFDIO_WAKE"]
    assert attachment.stats.abandoned == 1
    assert not ended(engine, attachment)


@pytest.mark.parametrize("code", [errno.ESRCH, errno.ENOSPC])
def test_a_gone_client_ends_the_attachment_without_wakes(engine: FaultEngine, code: int) -> None:
    attachment, fake = serve(engine, [[fault(0), fault(5)]], {"UFFDIO_COPY": [code]})
    assert fake.operations() == ["UFFDIO_COPY"]
    assert ended(engine, attachment)
    assert "gone" in attachment.end_reason
    assert attachment.stats.abandoned == 1  # the second fault, never tried
    assert fake.closed


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EFAULT, errno.EPERM, errno.EIO])
def test_any_other_errno_ends_the_attachment_after_waking_what_it_read(
    engine: FaultEngine, code: int
) -> None:
    attachment, fake = serve(engine, [[fault(0), fault(5), fault(6)]], {"UFFDIO_COPY": [code]})
    assert fake.operations() == ["UFFDIO_COPY", "UFFDIO_WAKE", "UFFDIO_WAKE"]
    woken = [address for operation, address, _length in fake.calls if operation == "UFFDIO_WAKE"]
    assert woken == [BASE + 5 * PAGE, BASE + 6 * PAGE]
    assert ended(engine, attachment)
    assert "serving a fault failed" in attachment.end_reason
    assert fake.closed


def test_a_failing_wake_after_eexist_ends_the_attachment(engine: FaultEngine) -> None:
    attachment, fake = serve(
        engine,
        [[fault(2)]],
        {"UFFDIO_COPY": [errno.EEXIST] * 2, "UFFDIO_WAKE": [errno.ESRCH]},
    )
    assert fake.operations() == ["UFFDIO_COPY", "UFFDIO_COPY", "UFFDIO_WAKE"]
    assert ended(engine, attachment)


def test_a_fault_outside_every_range_is_unregistered_and_woken_never_filled(
    engine: FaultEngine,
) -> None:
    attachment, fake = serve(engine, [[Pagefault(BASE + 9 * PAGE, 0)]], {})
    assert fake.operations() == ["UFFDIO_UNREGISTER", "UFFDIO_WAKE"]
    assert attachment.stats.outside == 1


def test_a_removed_page_with_balloon_semantics_is_zero_filled_not_copied(
    engine: FaultEngine,
) -> None:
    attachment, fake = serve(
        engine, [[Remove(BASE, BASE + 2 * PAGE), fault(1)], [fault(1)]], {}, zero_after_remove=True
    )
    # The REMOVE in the same batch is applied before the fault: zeros, and only the removed run
    # from the faulting page on.
    assert fake.calls == [("UFFDIO_ZEROPAGE", BASE + PAGE, PAGE)]
    # Faulting again (the zap landed after the zero fill): zeros again, never the region.
    engine._serve_uffd(attachment)
    assert fake.calls[-1] == ("UFFDIO_ZEROPAGE", BASE + PAGE, PAGE)
    assert attachment.stats.zero_pages == 2
    engine._finish(attachment, "test over")


def test_the_attachments_of_these_tests_do_not_leak_sockets(engine: FaultEngine) -> None:
    attachment, _fake = serve(engine, [[fault(0)]], {"UFFDIO_COPY": [errno.EINVAL]})
    assert attachment.connection.fileno() == -1

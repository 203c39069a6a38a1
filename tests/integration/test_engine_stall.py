"""The engine's stall guard (docs/security.md §5.3) against the real kernel: a read of a
client's userfaultfd that blocks is interrupted and ends that attachment only.

A client shares the userfaultfd file with the service and can clear O_NONBLOCK after the
service set it, having read its own events: the service's read then blocks. That race cannot
be produced on demand, but its outcome can: a userfaultfd opened blocking, with nothing queued,
read by the engine's own code on a thread the guard watches.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from shmfault import engine as engine_module
from shmfault.engine import READ_STALL, Attachment, FaultEngine, MappedRange
from shmfault.modes import Mode
from shmfault.uffd import Uffd

pytestmark = pytest.mark.timeout(30)


def attachment_over(uffd: Uffd) -> tuple[Attachment, socket.socket]:
    """An attachment of one page on ``uffd``, and the client's end of its connection."""
    ours, theirs = socket.socketpair()
    region: Any = SimpleNamespace(page_size=4096, region_id="r0000000000bb")
    attachment = Attachment(
        region=region,
        mode=Mode.PRIVATE_COPY,
        ranges=[MappedRange(0x7F00_0000_0000, 4096, 0)],
        uffd=uffd,
        connection=ours,
        machine=None,
    )
    return attachment, theirs


@pytest.fixture
def guarded() -> Iterator[FaultEngine]:
    """An engine whose guard watches a thread the test runs (its own thread is not started)."""
    made = FaultEngine()
    yield made
    made._running = False
    made.stop()


def test_a_read_that_blocks_is_interrupted_and_ends_only_that_attachment(
    guarded: FaultEngine,
) -> None:
    uffd = Uffd.open(nonblocking=False)  # what a client that cleared O_NONBLOCK leaves
    attachment, theirs = attachment_over(uffd)
    guarded._attachments[attachment.id] = attachment
    outcome: list[object] = []

    def read() -> None:
        try:
            guarded._read_batch(attachment, deque())
            outcome.append("returned")
        except Exception as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read)
    guarded._thread = reader  # the guard interrupts the engine thread: here, this one
    signal.signal(engine_module.STALL_SIGNAL, engine_module._interrupt_only)
    guarded._running = True
    reader.start()
    guarded._guard.start()
    started = time.monotonic()
    reader.join(10)
    assert not reader.is_alive(), "the blocked read was never interrupted"
    assert len(outcome) == 1 and type(outcome[0]).__name__ == "_Stalled"
    # Interrupted by the guard, after the stall bound and not long after it.
    assert time.monotonic() - started >= READ_STALL
    uffd.close()
    attachment.connection.close()
    theirs.close()


def test_a_read_that_returns_is_never_taken_for_a_stall(guarded: FaultEngine) -> None:
    uffd = Uffd.open()  # non-blocking: nothing queued, the read returns at once
    attachment, theirs = attachment_over(uffd)
    # A stale mark from an earlier read must not end this one.
    guarded._stalled = attachment
    assert guarded._read_batch(attachment, deque()) is False
    uffd.close()
    attachment.connection.close()
    theirs.close()

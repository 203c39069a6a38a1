"""Uffd against the real kernel: one test per ioctl and per event kind.

A thread that touches registered memory blocks in the kernel until the fault is resolved. The
touching threads (``lab.read``/``lab.write``) reach the memory through C with the GIL released;
the main thread resolves with ``wait`` + ``read_events``. Every test that touches registered
memory has a small timeout, so a fault nobody resolves fails the test instead of hanging it, and
``lab`` closes the handles (waking any thread still blocked) before it joins the threads.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from shmfault import _libc
from shmfault._abi import Feature, Ioctl, RegisterMode
from shmfault.errors import (
    UffdError,
    UffdFeatureError,
    UffdPageExistsError,
    UffdRetryError,
)
from shmfault.events import Event, Fork, Pagefault, Remap, Remove, Unmap
from shmfault.uffd import NotAUserfaultfdError, Uffd, open_userfaultfd
from tests import worlds

if TYPE_CHECKING:
    from tests.conftest import Lab

PAGE = os.sysconf("SC_PAGE_SIZE")
TIMEOUT = 10
#: how long a thread that should stay blocked is given to (wrongly) finish
STILL_BLOCKED = 0.2

RW = _libc.PROT_READ | _libc.PROT_WRITE
MISSING = RegisterMode.MISSING
WP = RegisterMode.WP
MINOR = RegisterMode.MINOR

Require = Callable[[Feature], None]


def events(uffd: Uffd, count: int, timeout: float = 5) -> list[Event]:
    """Exactly ``count`` events, read as they arrive; fails on fewer by the deadline or more."""
    deadline = time.monotonic() + timeout
    received: list[Event] = []
    while len(received) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not uffd.wait(remaining):
            pytest.fail(f"{len(received)} of {count} events after {timeout} s: {received}")
        received += uffd.read_events()
    assert len(received) == count, received
    return received


def one_fault(uffd: Uffd) -> Pagefault:
    [event] = events(uffd, 1)
    assert isinstance(event, Pagefault), event
    return event


def pending(uffd: Uffd) -> int:
    """Faults queued and not read yet, as the kernel counts them (fdinfo ``pending:``)."""
    with open(f"/proc/self/fdinfo/{uffd.fileno()}", "rb") as info:
        for line in info.read().decode().splitlines():
            if line.startswith("pending:"):
                return int(line.split()[1])
    raise AssertionError("no pending: line in the userfaultfd's fdinfo")


def peek(address: int, length: int) -> bytes:
    """Read memory from the main thread: only for pages already present or unregistered."""
    return bytes(_libc.memory_view(address, length))


def pattern(tag: bytes, length: int = PAGE) -> bytes:
    return (tag * (length // len(tag) + 1))[:length]


# --- register / unregister ---


def test_handshake_reports_the_api_ioctls(lab: Lab) -> None:
    uffd = lab.uffd()
    assert Ioctl.REGISTER | Ioctl.UNREGISTER | Ioctl.API in uffd.ioctls
    assert uffd.features == Feature(0)
    assert uffd.available_features & Feature.EVENT_FORK  # in every kernel since 4.11
    assert uffd.path and not uffd.closed


def test_register_missing_returns_the_fill_ioctls(lab: Lab) -> None:
    uffd = lab.uffd()
    address = lab.anon(2)
    ioctls = uffd.register(address, 2 * PAGE, MISSING)
    assert Ioctl.WAKE | Ioctl.COPY | Ioctl.ZEROPAGE in ioctls
    # Only a WP registration may write-protect, only a MINOR one continue.
    assert not ioctls & Ioctl.WRITEPROTECT
    assert not ioctls & Ioctl.CONTINUE


def test_register_wp_adds_writeprotect(lab: Lab, require: Require) -> None:
    require(Feature.PAGEFAULT_FLAG_WP)
    uffd = lab.uffd()
    address = lab.anon()
    ioctls = uffd.register(address, PAGE, WP)
    assert Ioctl.WRITEPROTECT | Ioctl.WAKE in ioctls
    assert not ioctls & Ioctl.CONTINUE


def test_register_minor_on_shmem_adds_continue(lab: Lab, require: Require) -> None:
    require(Feature.MINOR_SHMEM)
    uffd = lab.uffd()
    address = lab.shared(lab.memfd())
    ioctls = uffd.register(address, PAGE, MINOR)
    assert Ioctl.CONTINUE | Ioctl.WAKE in ioctls
    assert not ioctls & Ioctl.WRITEPROTECT


def test_register_minor_on_anonymous_memory_is_refused(lab: Lab) -> None:
    uffd = lab.uffd()
    address = lab.anon()
    with pytest.raises(UffdError) as raised:
        uffd.register(address, PAGE, MINOR)
    assert raised.value.errno == errno.EINVAL
    assert (raised.value.operation, raised.value.address, raised.value.length) == (
        "UFFDIO_REGISTER",
        address,
        PAGE,
    )
    assert f"UFFDIO_REGISTER at {address:#x}+{PAGE:#x} failed" in str(raised.value)


def test_register_twice_with_another_handle_is_busy(lab: Lab) -> None:
    address = lab.anon()
    lab.uffd().register(address, PAGE, MISSING)
    with pytest.raises(UffdError) as raised:
        lab.uffd().register(address, PAGE, MISSING)
    assert raised.value.errno == errno.EBUSY


@pytest.mark.timeout(TIMEOUT)
def test_unregister_wakes_a_blocked_thread_which_then_faults_normally(lab: Lab) -> None:
    uffd = lab.uffd()
    address = lab.anon()
    uffd.register(address, PAGE, MISSING)
    reader = lab.read(address)
    one_fault(uffd)
    assert not reader.finished(STILL_BLOCKED)
    uffd.unregister(address, PAGE)
    # Without userfaultfd the retried fault maps the zero page.
    assert reader.value() == bytes(PAGE)
    assert uffd.read_events() == []


@pytest.mark.timeout(TIMEOUT)
def test_closing_the_handle_wakes_a_blocked_thread(lab: Lab) -> None:
    uffd = lab.uffd()
    address = lab.anon()
    uffd.register(address, PAGE, MISSING)
    reader = lab.read(address)
    one_fault(uffd)
    uffd.close()
    assert reader.value() == bytes(PAGE)


# --- copy ---


@pytest.mark.timeout(TIMEOUT)
def test_read_fault_is_served_by_copy(lab: Lab) -> None:
    uffd = lab.uffd()
    address = lab.anon(2)
    uffd.register(address, 2 * PAGE, MISSING)
    reader = lab.read(address + PAGE)
    fault = one_fault(uffd)
    assert fault == Pagefault(address=address + PAGE, flags=0, thread_id=0)
    assert fault.kind == "missing" and not fault.is_write
    payload = pattern(b"copy-read ")
    assert uffd.copy(address + PAGE, lab.source(payload), PAGE) == PAGE
    assert reader.value() == payload


@pytest.mark.timeout(TIMEOUT)
def test_write_fault_is_flagged_and_the_write_lands_on_the_copied_page(lab: Lab) -> None:
    uffd = lab.uffd()
    address = lab.anon()
    uffd.register(address, PAGE, MISSING)
    writer = lab.write(address + 8, b"written!")
    fault = one_fault(uffd)
    assert fault.address == address  # rounded down to the page
    assert fault.is_write and fault.kind == "missing"
    uffd.copy(address, lab.source(pattern(b"-")), PAGE)
    writer.value()
    assert peek(address, 24) == b"--------written!--------"


@pytest.mark.timeout(TIMEOUT)
def test_copy_dontwake_fills_but_the_thread_sleeps_until_wake(lab: Lab) -> None:
    uffd = lab.uffd()
    address = lab.anon()
    uffd.register(address, PAGE, MISSING)
    reader = lab.read(address)
    one_fault(uffd)
    payload = pattern(b"dontwake ")
    assert uffd.copy(address, lab.source(payload), PAGE, dontwake=True) == PAGE
    assert peek(address, PAGE) == payload
    assert not reader.finished(STILL_BLOCKED)
    uffd.wake(address, PAGE)
    assert reader.value() == payload


@pytest.mark.timeout(TIMEOUT)
def test_copy_over_a_present_page_is_eexist_and_wakes_nobody(lab: Lab) -> None:
    uffd = lab.uffd()
    address = lab.anon()
    uffd.register(address, PAGE, MISSING)
    reader = lab.read(address)
    one_fault(uffd)
    first = pattern(b"first ")
    uffd.copy(address, lab.source(first), PAGE, dontwake=True)
    with pytest.raises(UffdPageExistsError) as raised:
        uffd.copy(address, lab.source(pattern(b"second ")), PAGE)
    assert raised.value.errno == errno.EEXIST
    assert raised.value.done == 0
    assert (raised.value.operation, raised.value.address) == ("UFFDIO_COPY", address)
    assert not reader.finished(STILL_BLOCKED)
    assert peek(address, PAGE) == first
    uffd.wake(address, PAGE)
    assert reader.value() == first


@pytest.mark.timeout(TIMEOUT)
def test_copy_stopping_at_a_present_page_is_partial(lab: Lab) -> None:
    # The kernel copies page by page; meeting the present second page it stops, wakes the
    # range it did fill, and reports EAGAIN with the bytes done in uffdio_copy.copy.
    uffd = lab.uffd()
    address = lab.anon(2)
    uffd.register(address, 2 * PAGE, MISSING)
    second = pattern(b"present ")
    uffd.copy(address + PAGE, lab.source(second), PAGE)
    reader = lab.read(address)
    one_fault(uffd)
    payload = pattern(b"partial ", 2 * PAGE)
    with pytest.raises(UffdRetryError) as raised:
        uffd.copy(address, lab.source(payload), 2 * PAGE)
    assert raised.value.errno == errno.EAGAIN
    assert raised.value.done == PAGE
    assert (raised.value.address, raised.value.length) == (address, 2 * PAGE)
    assert f"after {PAGE} bytes" in str(raised.value)
    assert reader.value() == payload[:PAGE]
    assert peek(address + PAGE, PAGE) == second


@pytest.mark.timeout(TIMEOUT)
def test_pending_remove_event_makes_fills_eagain_until_read(lab: Lab) -> None:
    # MADV_DONTNEED on a range registered with EVENT_REMOVE queues the event and sleeps
    # until it is read, before dropping anything; meanwhile every fill on the handle gets EAGAIN.
    uffd = lab.uffd(Feature.EVENT_REMOVE)
    address = lab.anon()
    uffd.register(address, PAGE, MISSING)
    uffd.copy(address, lab.source(pattern(b"old ")), PAGE)
    advisor = lab.start(lambda: _libc.madvise(address, PAGE, _libc.MADV_DONTNEED))
    assert uffd.wait(5)
    assert not advisor.finished(STILL_BLOCKED)
    for attempt in (
        lambda: uffd.copy(address, lab.source(pattern(b"new ")), PAGE),
        lambda: uffd.zeropage(address, PAGE),
    ):
        with pytest.raises(UffdRetryError) as raised:
            attempt()
        assert raised.value.errno == errno.EAGAIN
        assert raised.value.done == 0
    assert uffd.read_events() == [Remove(start=address, end=address + PAGE)]
    advisor.value()
    # The page is gone now, so the fill that was refused goes through.
    payload = pattern(b"new ")
    assert uffd.copy(address, lab.source(payload), PAGE) == PAGE
    assert peek(address, PAGE) == payload


# --- zeropage, continue, writeprotect, poison, move, wake ---


@pytest.mark.timeout(TIMEOUT)
def test_zeropage_serves_anonymous_memory(lab: Lab) -> None:
    uffd = lab.uffd()
    address = lab.anon()
    uffd.register(address, PAGE, MISSING)
    reader = lab.read(address)
    one_fault(uffd)
    assert uffd.zeropage(address, PAGE) == PAGE
    assert reader.value() == bytes(PAGE)


@pytest.mark.timeout(TIMEOUT)
def test_zeropage_on_shmem_allocates_a_page_cache_page(lab: Lab) -> None:
    uffd = lab.uffd()
    fd = lab.memfd()
    address = lab.shared(fd)
    uffd.register(address, PAGE, MISSING)
    reader = lab.read(address)
    one_fault(uffd)
    assert uffd.zeropage(address, PAGE) == PAGE
    assert reader.value() == bytes(PAGE)
    # A real shmem page, not the shared zero page: a write through the mapping is in the file.
    _libc.memory_view(address, 5)[:] = b"shmem"
    assert os.pread(fd, 5, 0) == b"shmem"


@pytest.mark.timeout(TIMEOUT)
def test_copy_serves_shmem_and_fills_the_file(lab: Lab) -> None:
    uffd = lab.uffd()
    fd = lab.memfd()
    address = lab.shared(fd)
    uffd.register(address, PAGE, MISSING)
    reader = lab.read(address)
    one_fault(uffd)
    payload = pattern(b"into the file ")
    uffd.copy(address, lab.source(payload), PAGE)
    assert reader.value() == payload
    assert os.pread(fd, PAGE, 0) == payload


@pytest.mark.timeout(TIMEOUT)
def test_continue_maps_the_page_cache_page_of_a_minor_fault(lab: Lab, require: Require) -> None:
    require(Feature.MINOR_SHMEM)
    uffd = lab.uffd()
    fd = lab.memfd()
    payload = pattern(b"written through the fd ")
    os.pwrite(fd, payload, 0)
    address = lab.shared(fd)
    uffd.register(address, PAGE, MINOR)
    reader = lab.read(address)
    fault = one_fault(uffd)
    assert fault.kind == "minor" and fault.is_minor
    assert fault.address == address
    assert uffd.continue_(address, PAGE) == PAGE
    assert reader.value() == payload


@pytest.mark.timeout(TIMEOUT)
def test_writeprotect_blocks_a_writer_until_protection_is_cleared(
    lab: Lab, require: Require
) -> None:
    require(Feature.PAGEFAULT_FLAG_WP)
    uffd = lab.uffd()
    address = lab.anon()
    uffd.register(address, PAGE, MISSING | WP)
    original = pattern(b"protected ")
    uffd.copy(address, lab.source(original), PAGE, wp=True)
    # Reading a write-protected page does not fault.
    assert peek(address, PAGE) == original
    writer = lab.write(address, b"overwrite")
    fault = one_fault(uffd)
    assert fault.kind == "wp"
    assert fault.is_write and fault.is_write_protect
    assert fault.address == address
    assert not writer.finished(STILL_BLOCKED)
    assert peek(address, PAGE) == original
    uffd.writeprotect(address, PAGE, protect=False)
    writer.value()
    assert peek(address, PAGE) == b"overwrite" + original[9:]


@pytest.mark.timeout(TIMEOUT)
def test_writeprotect_can_protect_a_present_page_later(lab: Lab, require: Require) -> None:
    require(Feature.PAGEFAULT_FLAG_WP)
    uffd = lab.uffd()
    address = lab.anon()
    uffd.register(address, PAGE, MISSING | WP)
    uffd.copy(address, lab.source(pattern(b"a")), PAGE)
    uffd.writeprotect(address, PAGE, protect=True)
    writer = lab.write(address, b"b")
    assert one_fault(uffd).kind == "wp"
    uffd.writeprotect(address, PAGE, protect=False)
    writer.value()
    assert peek(address, 2) == b"ba"


def _touch_and_report(address: int) -> bytes:
    return ctypes.string_at(address, 1)


@pytest.mark.timeout(TIMEOUT)
def test_poison_makes_a_later_touch_raise_sigbus(lab: Lab, require: Require) -> None:
    require(Feature.POISON)
    uffd = lab.uffd(Feature.POISON)
    address = lab.anon()
    uffd.register(address, PAGE, MISSING)
    assert uffd.poison(address, PAGE) == PAGE
    # The poison marker survives fork; the child has no registration, so nothing but the
    # marker can make its touch fail.
    with pytest.raises(worlds.ChildDiedError) as raised:
        worlds.run_in_child(_touch_and_report, address, timeout=5)
    assert raised.value.signal == signal.SIGBUS
    # A kernel-mode access to the poisoned page fails rather than being reported.
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"x")
        reader = lab.start(lambda: os.readv(read_end, [_libc.memory_view(address, PAGE)]))
        with pytest.raises(OSError, match=os.strerror(errno.EFAULT)) as failed:
            reader.value()
        assert failed.value.errno == errno.EFAULT
    finally:
        os.close(read_end)
        os.close(write_end)
    assert uffd.read_events() == []


def test_poison_needs_the_feature_enabled(lab: Lab) -> None:
    uffd = lab.uffd()
    address = lab.anon()
    uffd.register(address, PAGE, MISSING)
    with pytest.raises(UffdError) as raised:
        uffd.poison(address, PAGE)
    assert raised.value.errno == errno.EOPNOTSUPP
    assert "Feature.POISON" in str(raised.value)


@pytest.mark.timeout(TIMEOUT)
def test_move_hands_an_anonymous_page_over_without_copying(lab: Lab, require: Require) -> None:
    require(Feature.MOVE)
    uffd = lab.uffd(Feature.MOVE)
    destination = lab.anon()
    uffd.register(destination, PAGE, MISSING)
    source = lab.anon()
    payload = pattern(b"moved ")
    _libc.memory_view(source, PAGE)[:] = payload
    reader = lab.read(destination)
    one_fault(uffd)
    assert uffd.move(destination, source, PAGE) == PAGE
    assert reader.value() == payload
    # The page left the source: what remains there is a hole that reads as zeros.
    assert peek(source, PAGE) == bytes(PAGE)
    with pytest.raises(UffdPageExistsError):
        uffd.move(destination, source, PAGE)


@pytest.mark.timeout(TIMEOUT)
def test_move_from_a_hole_is_enoent_unless_holes_are_allowed(lab: Lab, require: Require) -> None:
    require(Feature.MOVE)
    uffd = lab.uffd(Feature.MOVE)
    destination = lab.anon()
    uffd.register(destination, PAGE, MISSING)
    source = lab.anon()
    with pytest.raises(UffdError) as raised:
        uffd.move(destination, source, PAGE)
    assert raised.value.errno == errno.ENOENT
    assert uffd.move(destination, source, PAGE, allow_source_holes=True) == PAGE


def test_move_needs_the_feature_enabled(lab: Lab) -> None:
    uffd = lab.uffd()
    with pytest.raises(UffdError) as raised:
        uffd.move(lab.anon(), lab.anon(), PAGE)
    assert raised.value.errno == errno.EOPNOTSUPP
    assert "Feature.MOVE" in str(raised.value)


@pytest.mark.timeout(TIMEOUT)
def test_wake_without_filling_makes_the_thread_fault_again(lab: Lab) -> None:
    uffd = lab.uffd()
    address = lab.anon()
    uffd.register(address, PAGE, MISSING)
    reader = lab.read(address)
    assert one_fault(uffd).address == address
    uffd.wake(address, PAGE)
    # Woken with the page still missing, the thread retries the access and is reported again.
    assert one_fault(uffd).address == address
    assert not reader.finished(STILL_BLOCKED)
    uffd.zeropage(address, PAGE)
    assert reader.value() == bytes(PAGE)


# --- events ---


@pytest.mark.timeout(TIMEOUT)
def test_one_read_returns_every_queued_fault(lab: Lab) -> None:
    uffd = lab.uffd()
    count = 3
    address = lab.anon(count)
    uffd.register(address, count * PAGE, MISSING)
    readers = [lab.read(address + i * PAGE) for i in range(count)]
    deadline = time.monotonic() + 5
    while pending(uffd) < count:
        assert time.monotonic() < deadline, f"only {pending(uffd)} faults queued"
        time.sleep(0.01)
    batch = uffd.read_events()
    assert sorted(e.address for e in batch if isinstance(e, Pagefault)) == [
        address + i * PAGE for i in range(count)
    ]
    assert len(batch) == count
    assert pending(uffd) == 0
    # One copy over the range wakes all three.
    payload = pattern(b"batch ", count * PAGE)
    assert uffd.copy(address, lab.source(payload), count * PAGE) == count * PAGE
    for i, reader in enumerate(readers):
        assert reader.value() == payload[i * PAGE : (i + 1) * PAGE]


@pytest.mark.timeout(TIMEOUT)
def test_read_events_honours_max_events(lab: Lab) -> None:
    uffd = lab.uffd()
    address = lab.anon(2)
    uffd.register(address, 2 * PAGE, MISSING)
    lab.read(address)
    lab.read(address + PAGE)
    deadline = time.monotonic() + 5
    while pending(uffd) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert len(uffd.read_events(max_events=1)) == 1
    assert len(uffd.read_events(max_events=1)) == 1
    assert uffd.read_events() == []
    assert uffd.zeropage(address, 2 * PAGE) == 2 * PAGE


def test_nonblocking_read_with_nothing_queued_is_empty(lab: Lab) -> None:
    uffd = lab.uffd()
    assert uffd.read_events() == []
    assert uffd.wait(0) is False


@pytest.mark.timeout(TIMEOUT)
def test_remap_event_and_the_registration_moves_along(lab: Lab) -> None:
    uffd = lab.uffd(Feature.EVENT_REMAP)
    address = lab.anon(2)
    uffd.register(address, 2 * PAGE, MISSING)
    target = lab.anon(2, prot=_libc.PROT_NONE)
    flags = _libc.MREMAP_MAYMOVE | _libc.MREMAP_FIXED
    mover = lab.start(lambda: _libc.mremap(address, 2 * PAGE, 2 * PAGE, flags, target))
    assert events(uffd, 1) == [Remap(from_address=address, to_address=target, length=2 * PAGE)]
    assert mover.value() == target
    lab.forget(address)
    # The moved range is still registered: touching it at its new place faults there.
    reader = lab.read(target + PAGE)
    assert one_fault(uffd).address == target + PAGE
    uffd.zeropage(target + PAGE, PAGE)
    assert reader.value() == bytes(PAGE)


@pytest.mark.timeout(TIMEOUT)
def test_mremap_with_event_unmap_also_reports_the_old_range_unmapped(lab: Lab) -> None:
    uffd = lab.uffd(Feature.EVENT_REMAP | Feature.EVENT_UNMAP)
    address = lab.anon(2)
    uffd.register(address, 2 * PAGE, MISSING)
    target = lab.anon(2, prot=_libc.PROT_NONE)
    flags = _libc.MREMAP_MAYMOVE | _libc.MREMAP_FIXED
    mover = lab.start(lambda: _libc.mremap(address, 2 * PAGE, 2 * PAGE, flags, target))
    assert events(uffd, 2) == [
        Remap(from_address=address, to_address=target, length=2 * PAGE),
        Unmap(start=address, end=address + 2 * PAGE),
    ]
    assert mover.value() == target
    lab.forget(address)


@pytest.mark.timeout(TIMEOUT)
def test_unmap_event_blocks_munmap_until_read(lab: Lab) -> None:
    uffd = lab.uffd(Feature.EVENT_UNMAP)
    address = lab.anon(3)
    uffd.register(address, 3 * PAGE, MISSING)
    unmapper = lab.start(lambda: _libc.munmap(address + PAGE, PAGE))
    assert uffd.wait(5)
    assert not unmapper.finished(STILL_BLOCKED)
    assert uffd.read_events() == [Unmap(start=address + PAGE, end=address + 2 * PAGE)]
    unmapper.value()
    lab.forget(address)
    lab.track(address, PAGE)
    lab.track(address + 2 * PAGE, PAGE)


@pytest.mark.timeout(TIMEOUT)
def test_remove_event_then_the_dropped_page_faults_again(lab: Lab) -> None:
    uffd = lab.uffd(Feature.EVENT_REMOVE)
    address = lab.anon(2)
    uffd.register(address, 2 * PAGE, MISSING)
    uffd.copy(address, lab.source(pattern(b"kept ", 2 * PAGE)), 2 * PAGE)
    advisor = lab.start(lambda: _libc.madvise(address, 2 * PAGE, _libc.MADV_DONTNEED))
    assert events(uffd, 1) == [Remove(start=address, end=address + 2 * PAGE)]
    advisor.value()
    reader = lab.read(address + PAGE)
    assert one_fault(uffd).address == address + PAGE
    uffd.zeropage(address + PAGE, PAGE)
    assert reader.value() == bytes(PAGE)


@pytest.mark.timeout(TIMEOUT)
def test_without_event_remove_madvise_does_not_wait(lab: Lab) -> None:
    uffd = lab.uffd()
    address = lab.anon()
    uffd.register(address, PAGE, MISSING)
    uffd.copy(address, lab.source(pattern(b"z")), PAGE)
    advisor = lab.start(lambda: _libc.madvise(address, PAGE, _libc.MADV_DONTNEED))
    assert advisor.finished(5)
    assert uffd.read_events() == []


def _forking_helper(channel: socket.socket, page: int) -> int:
    """In a child: register a page with EVENT_FORK, hand the uffd over, then fork once."""
    with Uffd.open(Feature.EVENT_FORK) as uffd:
        address = _libc.mmap(0, page, RW, _libc.MAP_PRIVATE | _libc.MAP_ANONYMOUS)
        uffd.register(address, page, MISSING)
        socket.send_fds(channel, [b"u"], [uffd.fileno()])
    if channel.recv(1) != b"g":
        return 1
    # fork() sleeps in the kernel until the FORK event has been read through the handed fd.
    grandchild = os.fork()
    if grandchild == 0:
        os._exit(0)
    os.waitpid(grandchild, 0)
    channel.sendall(b"f")
    return 0


@pytest.mark.timeout(TIMEOUT)
def test_fork_event_hands_the_reader_a_uffd_for_the_child(lab: Lab) -> None:
    # fork() blocks until the event is read and Python's os.fork holds the GIL, so the forking
    # process cannot be this one: a helper child hands us its uffd and forks on our signal.
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            ours.close()
            code = _forking_helper(theirs, PAGE)
        finally:
            os._exit(code)
    theirs.close()
    fork_fd = -1
    try:
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        uffd = lab.own(Uffd.adopt(fds[0]))
        assert uffd.features == Feature.EVENT_FORK
        ours.sendall(b"g")
        [event] = events(uffd, 1)
        assert isinstance(event, Fork)
        fork_fd = event.uffd_fd
        assert os.readlink(f"/proc/self/fd/{fork_fd}") == "anon_inode:[userfaultfd]"
        # The child's handle inherits the handshake and features of the parent's.
        child_uffd = Uffd.adopt(fork_fd)
        fork_fd = -1
        assert child_uffd.features == Feature.EVENT_FORK
        child_uffd.close()
        assert ours.recv(1) == b"f"
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if fork_fd >= 0:
            os.close(fork_fd)
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        ours.close()


@pytest.mark.timeout(TIMEOUT)
def test_thread_id_names_the_faulting_thread(lab: Lab, require: Require) -> None:
    require(Feature.THREAD_ID)
    uffd = lab.uffd(Feature.THREAD_ID)
    address = lab.anon(2)
    uffd.register(address, 2 * PAGE, MISSING)
    first = lab.read(address)
    fault = one_fault(uffd)
    second = lab.read(address + PAGE)
    other = one_fault(uffd)
    assert fault.thread_id == first.native_id != 0
    assert other.thread_id == second.native_id != first.native_id
    uffd.zeropage(address, 2 * PAGE)
    first.value()
    second.value()


@pytest.mark.timeout(TIMEOUT)
def test_exact_address_reports_the_byte_touched(lab: Lab, require: Require) -> None:
    require(Feature.EXACT_ADDRESS)
    uffd = lab.uffd(Feature.EXACT_ADDRESS)
    address = lab.anon()
    uffd.register(address, PAGE, MISSING)
    reader = lab.read(address + 123, 8)
    assert one_fault(uffd).address == address + 123
    uffd.zeropage(address, PAGE)
    assert reader.value() == bytes(8)


def _touch_with_sigbus_feature(page: int) -> bytes:
    with Uffd.open(Feature.SIGBUS) as uffd:
        address = _libc.mmap(0, page, RW, _libc.MAP_PRIVATE | _libc.MAP_ANONYMOUS)
        uffd.register(address, page, MISSING)
        return ctypes.string_at(address, 1)


@pytest.mark.timeout(TIMEOUT)
def test_sigbus_feature_raises_sigbus_instead_of_reporting() -> None:
    with pytest.raises(worlds.ChildDiedError) as raised:
        worlds.run_in_child(_touch_with_sigbus_feature, PAGE, timeout=5)
    assert raised.value.signal == signal.SIGBUS


@pytest.mark.timeout(TIMEOUT)
def test_kernel_mode_fault_is_served(lab: Lab) -> None:
    uffd = lab.uffd()
    address = lab.anon()
    uffd.register(address, PAGE, MISSING)
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"from the pipe")
        # pipe_read's copy_to_user faults on the registered page inside the kernel.
        reader = lab.start(lambda: os.readv(read_end, [_libc.memory_view(address, PAGE)]))
        fault = one_fault(uffd)
        assert fault.address == address and fault.is_write
        uffd.copy(address, lab.source(pattern(b"#")), PAGE)
        assert reader.value() == len(b"from the pipe")
        assert peek(address, 16) == b"from the pipe###"
    finally:
        os.close(read_end)
        os.close(write_end)


# --- adopt, feature errors, closed handles ---


@pytest.mark.timeout(TIMEOUT)
def test_adopt_takes_over_a_live_uffd(lab: Lab, require: Require) -> None:
    require(Feature.THREAD_ID)
    opened = lab.uffd(Feature.THREAD_ID | Feature.EVENT_REMOVE)
    adopted = lab.own(Uffd.adopt(os.dup(opened.fileno())))
    assert adopted.features == Feature.THREAD_ID | Feature.EVENT_REMOVE
    assert adopted.path == "adopted"
    assert adopted.user_mode_only is False
    address = lab.anon()
    adopted.register(address, PAGE, MISSING)
    reader = lab.read(address)
    # Both fds are the same file: the fault shows up on either.
    fault = one_fault(opened)
    assert fault.thread_id == reader.native_id
    adopted.copy(address, lab.source(pattern(b"adopted ")), PAGE)
    assert reader.value() == pattern(b"adopted ")


def _fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _pipe_end() -> tuple[int, list[int]]:
    read_end, write_end = os.pipe()
    return read_end, [read_end, write_end]


def _eventfd() -> tuple[int, list[int]]:
    fd = os.eventfd(0)
    return fd, [fd]


def _memfd() -> tuple[int, list[int]]:
    fd = os.memfd_create("not-a-uffd")
    return fd, [fd]


def _regular_file() -> tuple[int, list[int]]:
    fd = os.open("/proc/self/status", os.O_RDONLY)
    return fd, [fd]


@pytest.mark.parametrize("make", [_pipe_end, _eventfd, _memfd, _regular_file])
def test_adopt_refuses_what_is_not_a_userfaultfd(make: Callable[[], tuple[int, list[int]]]) -> None:
    fd, to_close = make()
    try:
        with pytest.raises(NotAUserfaultfdError, match="not a userfaultfd"):
            Uffd.adopt(fd)
        assert _fd_is_open(fd)  # the caller still owns it
    finally:
        for each in to_close:
            os.close(each)


def test_adopt_refuses_a_closed_fd() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    with pytest.raises(NotAUserfaultfdError):
        Uffd.adopt(read_end)


def test_adopt_refuses_a_uffd_before_its_handshake() -> None:
    fd, _path, _user_mode_only = open_userfaultfd()
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
        with pytest.raises(NotAUserfaultfdError, match="handshake has not run"):
            Uffd.adopt(fd)
        assert _fd_is_open(fd)
    finally:
        os.close(fd)


def test_unknown_feature_bit_is_a_feature_error_naming_it(offered: Feature) -> None:
    unknown = 1 << 30
    with pytest.raises(UffdFeatureError) as raised:
        Uffd.open(Feature.THREAD_ID | unknown)
    assert raised.value.missing == ["0x40000000"]
    assert raised.value.available == int(offered)
    assert raised.value.errno == errno.EINVAL
    assert "kernel lacks 0x40000000" in str(raised.value)
    assert f"it offers {int(offered):#x}" in str(raised.value)


def test_every_offered_feature_can_be_enabled_at_once(lab: Lab, offered: Feature) -> None:
    # EVENT_FORK is refused (EPERM) without CAP_SYS_PTRACE, whatever the kernel offers.
    wanted = offered if os.geteuid() == 0 else offered & ~Feature.EVENT_FORK
    uffd = lab.uffd(wanted)
    # What the kernel recorded, read back through fdinfo rather than from what was asked.
    assert lab.own(Uffd.adopt(os.dup(uffd.fileno()))).features == wanted


def test_closed_handle_refuses_fileno_and_ioctls(lab: Lab) -> None:
    uffd = lab.uffd()
    fd = uffd.fileno()
    uffd.close()
    assert uffd.closed
    assert not _fd_is_open(fd) or os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[userfaultfd]"
    with pytest.raises(ValueError, match="closed"):
        uffd.fileno()
    with pytest.raises(ValueError, match="closed"):
        uffd.register(lab.anon(), PAGE, MISSING)
    with pytest.raises(ValueError, match="closed"):
        uffd.read_events()
    uffd.close()  # idempotent
    assert "closed" in repr(uffd)


def test_with_block_closes_the_handle() -> None:
    with Uffd.open() as uffd:
        assert not uffd.closed
    assert uffd.closed


@pytest.mark.timeout(10)
def test_read_never_blocks_when_another_holder_clears_o_nonblock(lab: Lab) -> None:
    """A client sharing the userfaultfd file can clear O_NONBLOCK on it; the service's reads
    must still return at once instead of hanging its engine thread."""
    handle = lab.uffd()
    flags = fcntl.fcntl(handle.fileno(), fcntl.F_GETFL)
    fcntl.fcntl(handle.fileno(), fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    assert handle.read_events() == []
    assert fcntl.fcntl(handle.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
    fcntl.fcntl(handle.fileno(), fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    # Still served: a real fault is read the same way.
    address = lab.anon()
    handle.register(address, PAGE, RegisterMode.MISSING)
    toucher = lab.read(address, 8)
    # The first read after O_NONBLOCK is set again may come back empty with the fault queued
    # (seen on 6.18); the engine's level-triggered epoll reports the fd again, as this loop does.
    events: list[Event] = []
    while not events:
        assert handle.wait(5)
        events = handle.read_events()
    assert [type(e).__name__ for e in events] == ["Pagefault"]
    handle.zeropage(address, PAGE)
    assert toucher.value() == bytes(8)

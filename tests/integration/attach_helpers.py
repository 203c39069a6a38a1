"""Helpers of the lazy-attach tests: regions of every source with the bytes they must read as,
client processes forked from the test, a hand-driven handoff connection, and the service's fds.

Child processes are forks, never execs (see tests/worlds.py): a child has every module the test
imported. It keeps the fds it inherits (gRPC's fork handlers restart its pollers in the child on
their own fds, which must stay open); that is harmless here, because the parent ends its own
attachments with an explicit DETACH, not by closing its connection.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import mmap
import os
import pickle
import random
import select
import signal
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shmfault import _libc, _unix, protocol
from shmfault._abi import Feature
from shmfault.client import Client
from shmfault.modes import Mode, UffdAccess, kernel_support, requirements
from shmfault.store import Region, Source, SourceKind
from shmfault.uffd import Uffd

PAGE = mmap.PAGESIZE
#: The service's default fault-around block, in pages (``--fault-around``).
FAULT_AROUND = 16
LAZY_MODES = ("shared-copy", "shared-continue", "private-copy")
MODES = (*LAZY_MODES, "eager")
SOURCES = ("zero", "file", "clone", "bytes")
BACKINGS = ("memfd", "posix-shm")
#: How long a wait for the service to catch up may take before the test says what it saw.
#: Not an assertion about speed: the condition either comes true or is a bug.
SETTLE_SECONDS = 10.0


def need_modes(client: Client, *modes: str, hugetlb: bool = False) -> None:
    """Skip a test that forces ``modes`` where this kernel cannot give one of them, with the
    reason of the service's probe (and, for hugetlb regions, the features UFFDIO_API lacks)."""
    support = kernel_support(client.capabilities())
    offered: Feature | None = None
    for name in dict.fromkeys(modes):
        mode = Mode.from_name(name)
        if support[mode]:
            pytest.skip(f"the probe says {name} cannot work on this kernel: {support[mode]}")
        if hugetlb:
            if offered is None:
                with Uffd.open() as handle:
                    offered = handle.available_features
            lacking = requirements(mode, hugetlb=True).features & ~offered
            if lacking:
                pytest.skip(f"{name} on hugetlb regions needs {lacking!r}, which the kernel lacks")


def random_file(directory: Path, size: int, name: str = "source.bin") -> tuple[Path, bytes]:
    """A file of ``size`` random bytes in ``directory``: a source whose every page differs."""
    data = os.urandom(size)
    path = directory / name
    path.write_bytes(data)
    return path, data


def make_region(
    client: Client, directory: Path, source: str, size: int, backing: str = "memfd"
) -> tuple[Region, bytes]:
    """A region of ``size`` bytes filled from ``source`` (zero, file, clone or bytes) and the
    bytes it must read as. Nothing of it is filled yet but what a write put there.

    file: a random file read from an offset of 3 pages (so the offset is honoured). clone: a
    file-sourced region with a write across a page boundary, cloned. bytes: zeros with random
    writes at unaligned offsets (WriteRegion fills the partial edge pages)."""
    if source == "zero":
        return client.create_region(size, backing=backing), bytes(size)
    if source == "file":
        path, data = random_file(directory, size + 3 * PAGE, f"file-{os.urandom(4).hex()}")
        region = client.create_region(size, backing=backing, source=Source.of_file(path, 3 * PAGE))
        return region, data[3 * PAGE : 3 * PAGE + size]
    if source == "clone":
        path, data = random_file(directory, size, f"clone-{os.urandom(4).hex()}")
        original = client.create_region(size, source=Source.of_file(path))
        expected = bytearray(data)
        patch = os.urandom(PAGE + 100)
        client.write(original.id, 5 * PAGE - 50, patch)
        expected[5 * PAGE - 50 : 5 * PAGE - 50 + len(patch)] = patch
        region = client.create_region(size, backing=backing, source=Source.of_region(original.id))
        return region, bytes(expected)
    if source == "bytes":
        region = client.create_region(size, backing=backing, source=Source(SourceKind.BYTES))
        expected = bytearray(size)
        for offset, length in ((123, 3 * PAGE), (size // 2 + 7, PAGE // 2), (size - 10, 10)):
            chunk = os.urandom(length)
            client.write(region.id, offset, chunk)
            expected[offset : offset + length] = chunk
        return region, bytes(expected)
    raise ValueError(f"unknown source {source!r}")


def wrong_pages(view: memoryview, expected: bytes, pages: Iterable[int]) -> list[int]:
    """The pages of ``pages``, touched in that order, whose bytes differ from ``expected``.
    For child processes (the parent bounds their time); the test process uses Memory."""
    return [
        page
        for page in pages
        if bytes(view[page * PAGE : (page + 1) * PAGE]) != expected[page * PAGE : (page + 1) * PAGE]
    ]


#: How long one touch of attached memory may stay unanswered before the test fails.
TOUCH_SECONDS = 10.0


def bounded(action: Callable[[], Any], what: str) -> Any:
    """``action()`` on a thread of its own; fails the test if it has not returned within
    TOUCH_SECONDS.

    A fault nobody answers blocks the touching thread in the kernel: on the main thread it
    would also block pytest's timeout, whose signal handler needs the main thread back in
    Python. ``action`` must touch memory with the GIL released (``_libc.copy_memory``), so that
    this thread can give up waiting.
    """
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("ok", action()))
        except BaseException as exc:
            outcome.append(("raised", exc))

    thread = threading.Thread(target=run, name=f"touch: {what}", daemon=True)
    thread.start()
    thread.join(TOUCH_SECONDS)
    if thread.is_alive():
        pytest.fail(f"{what}: a page fault was not answered within {TOUCH_SECONDS} s")
    kind, value = outcome[0]
    if kind == "raised":
        raise value
    return value


class Memory:
    """Attached memory at ``address`` as the test process touches it: every access is a
    ``_libc.copy_memory`` (the GIL released) on a bounded thread."""

    def __init__(self, address: int, length: int) -> None:
        self.address = address
        self.length = length

    @classmethod
    def of(cls, attachment: Any) -> Memory:
        return cls(attachment.address, attachment.length)

    def _copy_out(self, offset: int, length: int) -> bytes:
        assert offset >= 0 and offset + length <= self.length
        buffer = ctypes.create_string_buffer(length)
        _libc.copy_memory(ctypes.addressof(buffer), self.address + offset, length)
        return buffer.raw

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        size = self.length - offset if length is None else length
        return bounded(lambda: self._copy_out(offset, size), f"read {size} bytes at {offset}")  # type: ignore[no-any-return]

    def page(self, page: int) -> bytes:
        return self.read(page * PAGE, PAGE)

    def write(self, offset: int, data: bytes) -> None:
        assert offset >= 0 and offset + len(data) <= self.length
        source = ctypes.create_string_buffer(data, len(data))
        destination = self.address + offset
        bounded(
            lambda: _libc.copy_memory(destination, ctypes.addressof(source), len(data)),
            f"write {len(data)} bytes at {offset}",
        )

    def wrong_pages(self, expected: bytes, pages: Iterable[int]) -> list[int]:
        """The pages of ``pages``, touched in that order, whose bytes differ from
        ``expected``."""
        order = list(pages)

        def check() -> list[int]:
            return [
                page
                for page in order
                if self._copy_out(page * PAGE, PAGE) != expected[page * PAGE : (page + 1) * PAGE]
            ]

        return bounded(check, f"touch {len(order)} pages")  # type: ignore[no-any-return]


def shuffled(items: Iterable[int], seed: int) -> list[int]:
    order = list(items)
    random.Random(seed).shuffle(order)
    return order


def blocks_of(pages: Iterable[int], region_pages: int) -> int:
    """How many pages fault-around fills when ``pages`` are touched: every aligned block of
    FAULT_AROUND pages holding one of them, whole (clipped to the region's end)."""
    blocks = {page // FAULT_AROUND for page in pages}
    return sum(min(FAULT_AROUND, region_pages - block * FAULT_AROUND) for block in blocks)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settle(condition: Callable[[], bool], what: str) -> None:
    """Wait until ``condition()`` holds (the service works asynchronously); fail naming
    ``what`` if it never does."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.01)


def entry_of(client: Client, attachment_id: int) -> dict[str, Any]:
    """The GetStats entry of one attachment (looked up among all regions' attachments, so it
    works after its region was deleted)."""
    for entry in client.stats():
        if entry["attachment_id"] == attachment_id:
            return entry
    raise AssertionError(f"attachment {attachment_id} is not in GetStats")


# --- child processes ---

_LENGTH = struct.Struct("<I")
#: How long the test waits for one message from a child: past it, the child is stuck (a fault
#: unanswered) and the test fails with TimeoutError rather than by pytest's timeout.
CHILD_SECONDS = 20.0


class Channel:
    """Pickled messages over a stream socket, between the test and one child."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, value: Any) -> None:
        data = pickle.dumps(value)
        self.sock.sendall(_LENGTH.pack(len(data)) + data)

    def recv(self, timeout: float | None = None) -> Any:
        """The next message; EOFError when the other side is gone; TimeoutError."""
        header = self._exactly(_LENGTH.size, timeout)
        return pickle.loads(self._exactly(_LENGTH.unpack(header)[0], timeout))

    def _exactly(self, size: int, timeout: float | None) -> bytes:
        data = b""
        while len(data) < size:
            if timeout is not None and not select.select([self.sock], [], [], timeout)[0]:
                raise TimeoutError(f"no message from the other process within {timeout} s")
            piece = self.sock.recv(size - len(data))
            if not piece:
                raise EOFError("the other process closed the channel")
            data += piece
        return data


class Child:
    """A forked process running ``func(channel, *args)``; its return value (or exception) is
    the last message on the channel."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            _child_main(theirs, func, args)
        theirs.close()
        self.pid = pid
        self.channel = Channel(ours)
        self.status: int | None = None

    def recv(self, timeout: float = CHILD_SECONDS) -> Any:
        """The next message the child sent (not its result)."""
        kind, value = self.channel.recv(timeout)
        if kind == "raised":
            pytest.fail(f"child {self.pid} failed:\n{value}")
        assert kind == "message", f"child {self.pid} returned {value!r} early"
        return value

    def send(self, value: Any) -> None:
        self.channel.send(value)

    def result(self, timeout: float = CHILD_SECONDS) -> Any:
        """The child's return value; fails the test with its traceback if it raised."""
        kind, value = self.channel.recv(timeout)
        self.wait()
        if kind == "raised":
            pytest.fail(f"child {self.pid} failed:\n{value}")
        assert kind == "result", f"child {self.pid} sent {value!r} instead of its result"
        return value

    def kill(self) -> None:
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.wait()

    def wait(self) -> int:
        if self.status is None:
            self.status = os.waitpid(self.pid, 0)[1]
            self.channel.sock.close()
        return self.status


class ChildMessages:
    """What the function in the child is given to talk to the test."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    def send(self, value: Any) -> None:
        self._channel.send(("message", value))

    def recv(self) -> Any:
        return self._channel.recv()


def _child_main(sock: socket.socket, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
    code = 0
    try:
        # A child meant to be killed must not dump the parent's faulthandler traceback.
        faulthandler.disable()
        channel = Channel(sock)
        try:
            message: tuple[str, Any] = ("result", func(ChildMessages(channel), *args))
        except BaseException as exc:
            message = ("raised", "".join(traceback.format_exception(exc)))
        channel.send(message)
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def child_pool() -> Iterator[Callable[..., Child]]:
    """For a fixture to ``yield from``: ``spawn(func, *args)`` forks a Child; every child
    still running when the test ends is killed and reaped."""
    started: list[Child] = []

    def spawn(func: Callable[..., Any], *args: Any) -> Child:
        child = Child(func, *args)
        started.append(child)
        return child

    yield spawn
    for child in started:
        child.kill()


# --- the handoff protocol by hand ---


class Handoff:
    """One handoff connection driven message by message, for the tests of what the service
    refuses. Every fd it was given is closed by :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.sock = _unix.connect_seqpacket(os.fspath(path), timeout=30)
        self.region_fd: int | None = None
        self.welcome: protocol.Welcome | None = None
        self._owned: list[int] = []
        self._mappings: list[tuple[int, int]] = []
        self._handles: list[Uffd] = []

    def send(self, message: protocol.Message | bytes, fds: Iterable[int] = ()) -> None:
        packet = message if isinstance(message, bytes) else protocol.encode(message)
        _unix.send_packet(self.sock, packet, list(fds))

    def receive(self) -> protocol.Message | None:
        """The next message (its fds kept, the region fd as ``region_fd``), None at the end."""
        packet = _unix.recv_packet(self.sock)
        if packet is None:
            return None
        self._owned.extend(packet.fds)
        message = protocol.decode(packet.data)
        if isinstance(message, protocol.Welcome):
            self.welcome = message
            self.region_fd = packet.fds[0] if packet.fds else None
        return message

    def hello(
        self,
        region_id: str,
        token: str,
        *,
        mode: Mode | None = None,
        access: UffdAccess = UffdAccess.FULL,
    ) -> protocol.Message | None:
        self.send(protocol.Hello(region_id, token, mode=mode, uffd_access=access))
        return self.receive()

    def map_region(self, offset: int = 0, length: int | None = None) -> int:
        """Map ``length`` bytes (default: all) of the WELCOME's region from ``offset`` as the
        mode says; the address."""
        assert self.welcome is not None
        size = self.welcome.region_size - offset if length is None else length
        protection = _libc.PROT_READ | _libc.PROT_WRITE
        if self.region_fd is not None:
            shared = _libc.MAP_SHARED
            address = _libc.mmap(0, size, protection, shared, self.region_fd, offset)
        else:
            address = _libc.mmap(0, size, protection, _libc.MAP_PRIVATE | _libc.MAP_ANONYMOUS)
        self._mappings.append((address, size))
        return address

    def map(self, length: int, flags: int, fd: int = -1, offset: int = 0) -> int:
        """Any other mapping (read-write), unmapped with the connection; the address."""
        protection = _libc.PROT_READ | _libc.PROT_WRITE
        address = _libc.mmap(0, length, protection, flags, fd, offset)
        self._mappings.append((address, length))
        return address

    def uffd(
        self,
        extra: Feature | int = 0,
        *,
        features: Feature | int | None = None,
        register: int | None = None,
        length: int | None = None,
    ) -> Uffd:
        """A userfaultfd with the WELCOME's features and ``extra`` (or exactly ``features``),
        registered as WELCOME says over ``length`` bytes (default: the region's) at
        ``register`` when given."""
        assert self.welcome is not None
        wanted = Feature(self.welcome.features) | extra if features is None else features
        handle = Uffd.open(wanted)
        self._handles.append(handle)
        if register is not None:
            size = self.welcome.region_size if length is None else length
            handle.register(register, size, self.welcome.register_mode)
        return handle

    def own(self, fd: int) -> int:
        """Close ``fd`` with the connection; returns it."""
        self._owned.append(fd)
        return fd

    def ended(self) -> bool:
        """The service closed the connection (waits for it)."""
        return self.receive() is None

    def close(self) -> None:
        """Idempotent: what was released is forgotten (an fd or address closed twice could
        be someone else's by then)."""
        self.sock.close()
        # Handles first: closing a uffd unregisters its ranges, so munmap needs no reader of
        # its UNMAP event.
        for handle in self._handles:
            handle.close()
        for address, length in self._mappings:
            _libc.munmap(address, length)
        _unix.close_fds(self._owned)
        self._handles, self._mappings, self._owned = [], [], []


def handoff_pool() -> Iterator[Callable[[str | os.PathLike[str]], Handoff]]:
    """For a fixture to ``yield from``: ``connect(path)`` opens a hand-driven connection; all
    are closed after the test."""
    opened: list[Handoff] = []

    def connect(path: str | os.PathLike[str]) -> Handoff:
        connection = Handoff(path)
        opened.append(connection)
        return connection

    yield connect
    for connection in opened:
        connection.close()


# --- hostile clients (docs/security.md §6: what every hostile test checks afterwards) ---


def service_pid(service: Any) -> int:
    """The pid of a running ``conftest.Service``."""
    assert service.process is not None, "the service is not running"
    return int(service.process.pid)


def unharmed(client: Client, pid: int, baseline: int, region_id: str, source: bytes) -> None:
    """The service came through a hostile client whole: its fd count is back at ``baseline``
    (nothing received or opened for the hostile connection was leaked), the region counts no
    attachment left over, and a well-behaved client attaches and reads every byte right."""
    settle(lambda: fd_count(pid) == baseline, f"the service is back at {baseline} fds")
    settle(
        lambda: client.get_region(region_id).attachments == 0,
        "the region counts no attachment left over",
    )
    with client.attach(region_id) as attachment:
        assert Memory.of(attachment).read() == source
    settle(lambda: fd_count(pid) == baseline, f"the service is back at {baseline} fds")

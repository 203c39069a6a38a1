"""Shared fixtures: real mappings, userfaultfd handles and the threads that touch them; POSIX
shm names and huge pages that are given back after the test.

Everything a test makes through ``lab`` is undone after it, in the one order that cannot hang:
close the handles (which wakes every thread blocked on their faults), join the threads, and only
then unmap the memory and close the files.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import posix_ipc
import pytest

from shmfault import _libc
from shmfault._abi import Feature
from shmfault.uffd import Uffd

PAGE = mmap.PAGESIZE
_JOIN_SECONDS = 5.0


class Toucher:
    """Runs ``action`` on its own thread. The action must touch registered memory through C
    with the GIL released (``_libc.copy_memory``, ``os.readv``...): the main thread has to run
    to resolve the fault the toucher blocks on."""

    def __init__(self, action: Callable[[], Any]) -> None:
        self._action = action
        self.native_id = 0
        self.result: Any = None
        self.error: BaseException | None = None
        self._running = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._running.wait(_JOIN_SECONDS)

    def _run(self) -> None:
        self.native_id = threading.get_native_id()
        self._running.set()
        try:
            self.result = self._action()
        except BaseException as exc:
            self.error = exc

    def finished(self, timeout: float) -> bool:
        """Whether the action returned (or raised) within ``timeout`` seconds."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def value(self, timeout: float = _JOIN_SECONDS) -> Any:
        """The action's result; re-raises its exception; fails if it is still blocked."""
        if not self.finished(timeout):
            pytest.fail(f"the touching thread is still blocked after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result


class Lab:
    """Memory, handles and threads for one test, all released by :meth:`close`."""

    page = PAGE

    def __init__(self) -> None:
        self._handles: list[Uffd] = []
        self._touchers: list[Toucher] = []
        self._mappings: dict[int, int] = {}
        self._fds: list[int] = []
        self._buffers: list[ctypes.Array[ctypes.c_char]] = []

    def uffd(self, features: Feature | int = 0, **options: Any) -> Uffd:
        handle = Uffd.open(features, **options)
        self._handles.append(handle)
        return handle

    def own(self, handle: Uffd) -> Uffd:
        """Close ``handle`` with the others (one this test adopted or received)."""
        self._handles.append(handle)
        return handle

    def anon(self, pages: int = 1, prot: int = _libc.PROT_READ | _libc.PROT_WRITE) -> int:
        """A private anonymous mapping, nothing populated."""
        return self.track(
            _libc.mmap(0, pages * PAGE, prot, _libc.MAP_PRIVATE | _libc.MAP_ANONYMOUS),
            pages * PAGE,
        )

    def memfd(self, pages: int = 1) -> int:
        """A memfd of ``pages`` pages, nothing in its page cache yet."""
        fd = os.memfd_create("shmfault-test", os.MFD_CLOEXEC)
        self._fds.append(fd)
        os.ftruncate(fd, pages * PAGE)
        return fd

    def shared(self, fd: int, pages: int = 1) -> int:
        """A fresh MAP_SHARED mapping of ``fd``: none of its pages mapped in yet."""
        prot = _libc.PROT_READ | _libc.PROT_WRITE
        return self.track(_libc.mmap(0, pages * PAGE, prot, _libc.MAP_SHARED, fd), pages * PAGE)

    def track(self, address: int, length: int) -> int:
        self._mappings[address] = length
        return address

    def forget(self, address: int) -> None:
        """The test unmapped or moved the mapping at ``address`` itself."""
        del self._mappings[address]

    def source(self, data: bytes) -> int:
        """The address of a private copy of ``data``: where UFFDIO_COPY takes bytes from."""
        buffer = ctypes.create_string_buffer(data, len(data))
        self._buffers.append(buffer)
        return ctypes.addressof(buffer)

    def start(self, action: Callable[[], Any]) -> Toucher:
        toucher = Toucher(action)
        self._touchers.append(toucher)
        return toucher

    def read(self, address: int, length: int = PAGE) -> Toucher:
        """A thread that copies ``length`` bytes out of ``address`` and returns them."""

        def action() -> bytes:
            buffer = ctypes.create_string_buffer(length)
            _libc.copy_memory(ctypes.addressof(buffer), address, length)
            return buffer.raw

        return self.start(action)

    def write(self, address: int, data: bytes) -> Toucher:
        """A thread that copies ``data`` to ``address``."""
        source = self.source(data)
        return self.start(lambda: _libc.copy_memory(address, source, len(data)))

    def close(self) -> None:
        for handle in self._handles:
            handle.close()
        stuck = [t for t in self._touchers if not t.finished(_JOIN_SECONDS)]
        for address, length in self._mappings.items():
            _libc.munmap(address, length)
        for fd in self._fds:
            os.close(fd)
        if stuck:
            pytest.fail(f"{len(stuck)} touching thread(s) still blocked after their uffd closed")


@pytest.fixture
def lab() -> Iterator[Lab]:
    bench = Lab()
    try:
        yield bench
    finally:
        bench.close()


@pytest.fixture(scope="session")
def offered() -> Feature:
    """The features this kernel offers (skips where no userfaultfd can be had at all)."""
    try:
        with Uffd.open() as handle:
            return handle.available_features
    except OSError as exc:
        pytest.skip(f"no userfaultfd on this machine: {exc}")


@pytest.fixture
def require(offered: Feature) -> Callable[[Feature], None]:
    """``require(feature)`` skips the test, naming the feature, where the kernel lacks it."""

    def check(feature: Feature) -> None:
        if not offered & feature:
            pytest.skip(f"the kernel does not offer Feature.{feature.name}")

    return check


HUGEPAGES_2M = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")


@pytest.fixture
def shm_prefix() -> Iterator[str]:
    """A POSIX shm name prefix of this test alone; every object under it is unlinked after."""
    prefix = f"shmfault-test-{secrets.token_hex(4)}"
    yield prefix
    for entry in os.listdir("/dev/shm"):
        if entry.startswith(prefix + "."):
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_shared_memory("/" + entry)


@pytest.fixture
def huge_pages() -> Iterator[int]:
    """Reserve 4 huge pages of 2 MiB for the test (root only), restoring the old count after.
    Skips where that is impossible."""
    try:
        old = int(HUGEPAGES_2M.read_text())
    except (OSError, ValueError):
        pytest.skip("no 2 MiB hugetlb pool on this kernel")
    if os.geteuid() != 0:
        pytest.skip("reserving huge pages needs root (writes nr_hugepages)")
    try:
        HUGEPAGES_2M.write_text(str(old + 4))
    except OSError as exc:
        pytest.skip(f"cannot reserve huge pages: {exc}")
    try:
        free = int((HUGEPAGES_2M.parent / "free_hugepages").read_text())
        if free < 4:
            pytest.skip(f"the kernel gave only {free} free huge pages")
        yield 4
    finally:
        HUGEPAGES_2M.write_text(str(old))


def no_free_huge_pages() -> bool:
    """True when the default hugetlb pool has no free page (the refusal can be tested)."""
    try:
        free = int((HUGEPAGES_2M.parent / "free_hugepages").read_text())
        reserved = int((HUGEPAGES_2M.parent / "resv_hugepages").read_text())
    except (OSError, ValueError):
        return False
    return free - reserved == 0

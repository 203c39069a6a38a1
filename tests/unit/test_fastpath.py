"""Loading the C fast path, and the region lock it shares with Python (real pthread mutexes)."""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from shmfault import fastpath
from shmfault.engine import LATENCY_BOUNDS_NS

PAGE = os.sysconf("SC_PAGESIZE")


def built() -> None:
    if not fastpath.LIBRARY_PATH.exists():
        pytest.skip(f"{fastpath.LIBRARY_PATH.name} is not built (make setup builds it)")


def test_the_library_make_setup_built_loads_with_structures_of_the_same_size() -> None:
    built()
    assert fastpath.library() is not None, fastpath.unavailable_reason()
    assert fastpath.unavailable_reason() == ""


def test_turned_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fastpath.ENVIRONMENT, "0")
    lib, why = fastpath._load()
    assert lib is None
    assert why == "SHMFAULT_FAST_PATH=0 in the environment"


def test_a_library_not_built_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fastpath, "LIBRARY_PATH", tmp_path / "_fastpath.so")
    lib, why = fastpath._load()
    assert lib is None
    assert "is not built" in why


def test_a_library_older_than_its_source_is_not_loaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    built()
    library = tmp_path / "_fastpath.so"
    source = tmp_path / "_fastpath.c"
    shutil.copy(fastpath.LIBRARY_PATH, library)
    shutil.copy(fastpath.SOURCE_PATH, source)
    os.utime(library, (time.time() - 60, time.time() - 60))
    monkeypatch.setattr(fastpath, "LIBRARY_PATH", library)
    monkeypatch.setattr(fastpath, "SOURCE_PATH", source)
    lib, why = fastpath._load()
    assert lib is None
    assert "older than" in why


def test_a_file_that_is_no_library_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    library = tmp_path / "_fastpath.so"
    library.write_bytes(b"not an ELF file")
    monkeypatch.setattr(fastpath, "LIBRARY_PATH", library)
    monkeypatch.setattr(fastpath, "SOURCE_PATH", tmp_path / "absent.c")
    lib, why = fastpath._load()
    assert lib is None
    assert "does not load" in why


def test_the_region_lock_is_recursive_and_excludes_other_threads() -> None:
    built()
    lib = fastpath.library()
    assert lib is not None
    lock = fastpath.RegionLock(lib)
    order: list[str] = []

    def take() -> None:
        with lock:
            order.append("other")

    with lock, lock:  # recursive: RegionBacking's methods call each other
        other = threading.Thread(target=take)
        other.start()
        other.join(0.2)
        # The other thread waits (with the GIL released: this thread runs on meanwhile).
        assert other.is_alive()
        order.append("holder")
    other.join(5)
    assert not other.is_alive()
    assert order == ["holder", "other"]


def _engine(lib: object, epoll: select.epoll, spin_ns: int) -> fastpath.NativeEngine:
    return fastpath.NativeEngine(
        lib,  # type: ignore[arg-type]
        epoll_fd=epoll.fileno(),
        fault_around_pages=16,
        fault_around_max_pages=1024,
        base_page=PAGE,
        latency_bounds_ns=LATENCY_BOUNDS_NS,
        spin_ns=spin_ns,
        probe_divisor=16,
        parallel_bytes=0,
    )


def test_a_look_returns_after_one_poll_even_inside_the_spin_window() -> None:
    # The engine asks for a look (timeout 0) while a replay step is pending: spinning the
    # window there would hold the replay up for all of it.
    built()
    lib = fastpath.library()
    with select.epoll() as epoll:
        engine = _engine(lib, epoll, spin_ns=60 * 1_000_000_000)
        try:
            engine.mark_active()
            assert engine.wait(0) == []
            assert engine.stats()["spin_polls"] == 1
        finally:
            engine.close()


def test_the_spin_window_polls_until_something_is_ready() -> None:
    built()
    lib = fastpath.library()
    with select.epoll() as epoll:
        ready = os.eventfd(0, os.EFD_NONBLOCK)
        epoll.register(ready, select.EPOLLIN)
        engine = _engine(lib, epoll, spin_ns=60 * 1_000_000_000)
        try:
            engine.mark_active()
            writer = threading.Timer(0.05, os.eventfd_write, (ready, 1))
            writer.start()
            # An fd the C side does not serve is Python's: returned once it is ready.
            assert engine.wait(-1) == [ready]
            writer.join()
            assert engine.stats()["spin_polls"] > 1
        finally:
            engine.close()
            os.close(ready)


def _mapped_range(base: int, pages: int, region_offset: int) -> SimpleNamespace:
    """What NativeAttachment reads of an engine.MappedRange."""
    return SimpleNamespace(
        base=base,
        length=pages * PAGE,
        region_offset=region_offset,
        pages=bytearray(pages),
        sequential_next=-1,
        window_pages=16,
    )


def _zero_attachment(
    lock: fastpath.RegionLock, ranges: list[SimpleNamespace]
) -> fastpath.NativeAttachment:
    """A shared-copy attachment of a zero region, on no userfaultfd (nothing is mapped)."""
    return fastpath.NativeAttachment(
        uffd=-1,
        mode=1,
        region_fd=-1,
        zero=True,
        source=None,
        page_size=PAGE,
        region_lock=lock,
        ranges=ranges,
    )


def test_a_remap_that_reorders_the_ranges_keeps_each_ranges_own_pages() -> None:
    # The engine keeps its ranges sorted by address; a remap moves one past another. The C
    # side must then see each range with its own page states, not its old neighbour's.
    built()
    lib = fastpath.library()
    assert lib is not None

    low, high = _mapped_range(0x10000000, 4, 0), _mapped_range(0x20000000, 8, 4 * PAGE)
    native = _zero_attachment(fastpath.RegionLock(lib), [low, high])
    low.base = 0x30000000  # remapped above the other
    ranges = sorted([low, high], key=lambda r: r.base)
    native.push(ranges)
    for index, expected in enumerate(ranges):
        seen = native.struct.ranges[index]
        assert seen.base == expected.base
        assert seen.length == expected.length
        assert seen.region_offset == expected.region_offset
        pages = (ctypes.c_uint8 * len(expected.pages)).from_buffer(expected.pages)
        assert seen.pages == ctypes.addressof(pages)


def test_the_cpu_of_a_task_is_read_past_a_command_name_with_spaces_and_parentheses() -> None:
    built()
    lib = fastpath.library()
    assert lib is not None
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[-1]
    script = (
        "import os, sys, time\n"
        "open('/proc/self/comm', 'w').write(') 1 2 (x) 3')\n"
        f"os.sched_setaffinity(0, {{{cpu}}})\n"
        "print(flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        child.stdout.readline()  # renamed and pinned
        with open(f"/proc/{child.pid}/comm") as comm:
            assert comm.read().strip() == ") 1 2 (x) 3"
        assert lib.sf_task_cpu(child.pid, 0) == cpu
        assert lib.sf_task_cpu(child.pid, child.pid) == cpu  # the main thread by its tid
    finally:
        child.kill()
        child.wait()
    assert lib.sf_task_cpu(child.pid, 0) == -1  # gone


def test_the_cpu_of_one_thread_is_that_threads() -> None:
    built()
    lib = fastpath.library()
    assert lib is not None
    cpus = sorted(os.sched_getaffinity(0))
    seen: list[int] = []

    def pinned() -> None:
        os.sched_setaffinity(0, {cpus[-1]})
        seen.append(lib.sf_task_cpu(os.getpid(), threading.get_native_id()))

    thread = threading.Thread(target=pinned)
    thread.start()
    thread.join()
    assert seen == [cpus[-1]]


def test_a_replay_step_whose_last_block_is_left_unfinished_says_so() -> None:
    # The count of pages done with cannot tell "all done" from "the last block not done":
    # the block itself must come back, or Python never finishes it (nor meets its error).
    built()
    lib = fastpath.library()
    assert lib is not None
    closed = fastpath.RegionLock(lib)
    with closed:
        closed.close()  # the C side then fills nothing: every block comes back unfinished
    native = _zero_attachment(closed, [_mapped_range(0x10000000, 64, 0)])
    with select.epoll() as epoll:
        engine = _engine(lib, epoll, spin_ns=0)
        try:
            assert engine.replay_step(native, [3]) == (1, 0, (0, 0, 16 * PAGE))
            assert engine.replay_step(native, [3, 40]) == (1, 0, (0, 0, 16 * PAGE))
            assert engine.replay_step(native, [40]) == (1, 0, (0, 32 * PAGE, 48 * PAGE))
            assert engine.replay_step(native, [64 + 5]) == (1, 0, None)  # outside: skipped
        finally:
            engine.close()


def test_thread_ids_are_looked_up_only_for_clients_in_our_pid_namespace() -> None:
    assert fastpath._same_pid_namespace(os.getpid())
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) to start a process in a pid namespace of its own")
    holder = subprocess.Popen([unshare, "--pid", "--fork", "--kill-child", "sleep", "60"])
    try:
        children: list[str] = []
        deadline = time.monotonic() + 10
        while not children and time.monotonic() < deadline:
            with open(f"/proc/{holder.pid}/task/{holder.pid}/children") as listed:
                children = listed.read().split()
            time.sleep(0.01)
        if not children:
            pytest.skip("unshare --pid --fork started no child (no permission?)")
        assert not fastpath._same_pid_namespace(int(children[0]))
    finally:
        holder.kill()
        holder.wait()
    assert not fastpath._same_pid_namespace(holder.pid)  # gone: not ours to look into

"""The ``file`` workload: a region filled from a file on disk, first touched in address order,
with the file's pages in the page cache (*warm*) and not (*cold*).

The other workloads keep their source in tmpfs, so that no disk is ever read and only the
fault path is measured. This one is what a VM restored from a snapshot file does: the bytes
come from a real file system, and on a cold start from the disk. *Cold* is made before each
measurement by dropping the file's pages from the page cache with
``posix_fadvise(POSIX_FADV_DONTNEED)`` after an ``fsync`` (any owner of the file may; clean
pages go), checked with cachestat(2), and recorded as the fraction still cached. *Warm*
reads the whole file first.

Baseline in the same repetition and state: the kernel's own first touch of a private mapping
of the same file (``MAP_PRIVATE``, a write fault copies the file's page), which is what a
program that maps its snapshot itself would pay.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks.service import Service, watchdog
from benchmarks.workloads import (
    Record,
    Workspace,
    _address,
    _counters,
    _region,
    _service_fields,
    sequential_figures,
)
from shmfault import Client, _libc

STATES = ("cold", "warm")


def file_path(ws: Workspace) -> Path:
    return ws.file_directory / f"sfbench-{os.getpid()}-file.bin"


def write_file(ws: Workspace) -> Path:
    """The source's first ``file_size`` bytes as a file of their own on the file directory's
    file system, synced so that every page of it can be dropped from the cache."""
    path = file_path(ws)
    size = ws.config.file_size
    assert ws.source_map is not None
    ws.made_files.append(path)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(ws.source_map)
        written = 0
        while written < size:
            written += os.write(descriptor, view[written : min(size, written + (8 << 20))])
        view.release()
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return path


def can_be_cold(path: Path) -> bool:
    """Whether the file's pages can leave memory at all (not on a memory file system)."""
    return _file_system(path) not in ("tmpfs", "ramfs", "hugetlbfs")


def _file_system(path: Path) -> str:
    """The type of the file system ``path`` is on, from the longest mount point holding it."""
    best = ("", "")
    target = str(path.resolve())
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            mount_point, kind = fields[4], fields[fields.index("-") + 1]
            inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best[0]):
                best = (mount_point, kind)
    return best[1]


def set_state(path: Path, size: int, state: str, page_size: int) -> float:
    """Make the file cold (its pages dropped from the cache) or warm (all of them read in);
    returns the fraction of its pages cached afterwards (cachestat; -1 if the kernel cannot
    say)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if state == "cold":
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        else:
            done = 0
            while done < size:
                chunk = os.pread(descriptor, 8 << 20, done)
                if not chunk:
                    break
                done += len(chunk)
        present = _libc.pages_present(descriptor, 0, size)
    finally:
        os.close(descriptor)
    return -1.0 if present is None else present / (size // page_size)


def shmfault_file(
    ws: Workspace, service: Service, client: Client, path: Path, mode: str, state: str, rep: int
) -> Record:
    """A region of the file, attached in ``mode``, touched once in address order."""
    config = ws.config
    size = config.file_size
    with _region(ws, client, size, mode, source=path) as (region, attachment):
        cached = set_state(path, size, state, ws.page_size)
        with watchdog(service, config.run_timeout, f"file {mode} {state}"):
            before = service.cpu_ns()
            elapsed = ws.toucher.touch_seq(attachment.address, size, ws.page_size, config.write)
            after = service.cpu_ns()
            bad = ws.mismatched(attachment.address, None, size // ws.page_size)
        attachment.detach()
        counters = _counters(client, region.id, attachment.attachment_id)
    return {
        "workload": "file",
        "subject": "shmfault",
        "mode": mode,
        "state": state,
        "cached_before": cached,
        "fault_around": service.fault_around,
        "rep": rep,
        **sequential_figures(size, elapsed, bad),
        **_service_fields(before, after, counters),
    }


def kernel_file(ws: Workspace, path: Path, state: str, rep: int) -> Record:
    """The baseline: first touch of a private mapping of the file itself."""
    config = ws.config
    size = config.file_size
    with _private_mapping(path, size) as address:
        cached = set_state(path, size, state, ws.page_size)
        elapsed = ws.toucher.touch_seq(address, size, ws.page_size, config.write)
        bad = ws.mismatched(address, None, size // ws.page_size)
    return {
        "workload": "file",
        "subject": "kernel",
        "mode": "mmap-private-first-touch",
        "state": state,
        "cached_before": cached,
        "fault_around": 0,
        "rep": rep,
        **sequential_figures(size, elapsed, bad),
    }


@contextlib.contextmanager
def _private_mapping(path: Path, size: int) -> Iterator[int]:
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        mapping = mmap.mmap(
            descriptor, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
    finally:
        os.close(descriptor)
    try:
        yield _address(mapping)
    finally:
        mapping.close()


def run_repetition(
    ws: Workspace, rep: int, keep: Callable[[Record | None], None], say: Callable[[str], None]
) -> None:
    """Every mode and state once, each state's kernel baseline first. The service runs with
    its default fault-around (16 pages, growing to 1024 while access is sequential)."""
    config = ws.config
    path = file_path(ws) if file_path(ws).exists() else write_file(ws)
    states = [s for s in STATES if s != "cold" or can_be_cold(path)]
    if rep == 0 and "cold" not in states:
        say(f"file: {path.parent} is tmpfs, whose pages cannot leave memory: warm only")
    states = states[rep % len(states) :] + states[: rep % len(states)]
    shift = rep % len(config.modes)
    modes = [*config.modes[shift:], *config.modes[:shift]]
    with (
        Service(
            ws.directory / f"file-r{rep}",
            fault_around=16,
            extra_args=["--fault-around-max", "1024", *config.service_args],
        ) as service,
        service.client() as client,
    ):
        for state in states:
            keep(kernel_file(ws, path, state, rep))
            for mode in modes:
                keep(shmfault_file(ws, service, client, path, mode, state, rep))

"""The client processes of the multi-process workloads (``share``, ``scale``, ``cores``).

They are forked by a fork server (multiprocessing's "forkserver" context) that has imported only
this module: no gRPC, no channel, no thread of the benchmarks' own process is ever copied into a
child. A child attaches with :func:`shmfault.attach.attach` and tokens its parent issued over
gRPC, touches with the same loops as the other workloads (``touch.c`` through ctypes, which
releases the GIL, so a faulting touch never blocks the attachment's own threads), checks every
touched page against the source file and reports over a queue. Nothing here may import gRPC
(``tests/unit/test_benchmarks_clients.py`` checks).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import time
import traceback
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from benchmarks import native
from shmfault.attach import Attachment, attach


class _Queue(Protocol):
    def put(self, obj: Any) -> None: ...


class _Event(Protocol):
    def wait(self, timeout: float | None = None) -> bool: ...


@dataclass(frozen=True)
class Grant:
    """One attachment a child makes: the region, a single-use token, and where the region's
    bytes start in the source file (to check them)."""

    handoff: str
    region_id: str
    token: str
    source_offset: int = 0


@dataclass(frozen=True)
class Job:
    """What one child does. ``pages`` are the page indexes touched in every grant's mapping (in
    that order). With ``timed_attach`` the attaches are part of the timed stretch (``scale``);
    otherwise the child attaches first, says ``ready`` and waits for ``go`` (``share``,
    ``cores``). ``kernel`` maps ``size`` bytes of the source file itself instead of attaching:
    the same touches through the kernel's own fault path, the baseline. With ``hold`` the child
    keeps its attachments after reporting, until ``release``."""

    index: int
    source_path: str
    pages: array[int]
    mode: str = "shared-copy"
    grants: tuple[Grant, ...] = ()
    write: bool = True
    library: str | None = None
    timed_attach: bool = False
    hold: bool = False
    kernel: bool = False
    size: int = 0
    #: where the kernel baseline's mapping starts in the source file (a multiple of pages)
    offset: int = 0
    latencies: bool = False


def _address(mapping: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(mapping))


def run_client(job: Job, go: _Event, release: _Event, results: _Queue) -> None:
    """A child's whole life. Messages on ``results``: ``("ready", index)``, then
    ``("done", index, result)``, or ``("error", index, text)`` at any point."""
    try:
        _run(job, go, release, results)
    except BaseException:
        results.put(("error", job.index, traceback.format_exc()))


def _run(job: Job, go: _Event, release: _Event, results: _Queue) -> None:
    toucher: native.Toucher = (
        native.CTouch(Path(job.library)) if job.library else native.PythonTouch()
    )
    page_size = mmap.PAGESIZE
    with open(job.source_path, "r+b") as source_file:
        # MAP_SHARED over the source: the kernel baseline touches (a write that keeps the bytes)
        # the same file the service fills from; the shmfault children only read it.
        source = mmap.mmap(source_file.fileno(), 0)
    source_address = _address(source)
    count = len(job.pages)
    latencies = array("I", bytes(4 * count * max(len(job.grants), 1))) if job.latencies else None
    attachments: list[Attachment] = []
    attach_ns: list[int] = []

    def attach_one(grant: Grant) -> Attachment:
        started = time.monotonic_ns()
        made = attach(grant.handoff, grant.region_id, grant.token, mode=job.mode)
        attach_ns.append(time.monotonic_ns() - started)
        if made.mode.wire_name != job.mode:
            made.detach()
            raise RuntimeError(f"asked for {job.mode}, got {made.mode.wire_name}")
        attachments.append(made)
        return made

    try:
        if not job.timed_attach and not job.kernel:
            for grant in job.grants:
                attach_one(grant)
        results.put(("ready", job.index))
        go.wait()
        touch_ns = 0
        bad = 0
        start = time.monotonic_ns()
        if job.kernel:
            touch_ns, bad = _touch_source(job, toucher, source_address, latencies)
        else:
            for k, grant in enumerate(job.grants):
                made = attachments[k] if not job.timed_attach else attach_one(grant)
                window = None
                if latencies is not None:
                    window = array("I", bytes(4 * count))
                touch_ns += toucher.touch_list(
                    made.address, page_size, job.pages, window, job.write
                )
                if window is not None and latencies is not None:
                    latencies[k * count : (k + 1) * count] = window
        end = time.monotonic_ns()
        if not job.kernel:
            # Checked after the clock stops, like the single-process workloads.
            for k, grant in enumerate(job.grants):
                bad += toucher.mismatched_pages(
                    attachments[k].address,
                    source_address + grant.source_offset,
                    page_size,
                    job.pages,
                    count,
                )
        results.put(
            (
                "done",
                job.index,
                {
                    "index": job.index,
                    "start_ns": start,
                    "end_ns": end,
                    "touch_ns": touch_ns,
                    "touches": count * max(len(job.grants), 1),
                    "attach_ns": attach_ns,
                    "attachment_ids": [a.attachment_id for a in attachments],
                    "bad_pages": bad,
                    "latencies": latencies.tobytes() if latencies is not None else b"",
                    "pid": os.getpid(),
                },
            )
        )
        if job.hold:
            release.wait()
    finally:
        for made in attachments:
            with contextlib.suppress(Exception):
                made.detach()
        with contextlib.suppress(BufferError):
            source.close()


def _touch_source(
    job: Job, toucher: native.Toucher, source_address: int, latencies: array[int] | None
) -> tuple[int, int]:
    """The kernel baseline: a fresh shared mapping of ``job.size`` bytes of the source file
    (already in the page cache) at ``job.offset``, touched and checked like an attachment."""
    page_size = mmap.PAGESIZE
    with open(job.source_path, "r+b") as source_file:
        mapping = mmap.mmap(source_file.fileno(), job.size, offset=job.offset)
    try:
        address = _address(mapping)
        elapsed = toucher.touch_list(address, page_size, job.pages, latencies, job.write)
        bad = toucher.mismatched_pages(
            address, source_address + job.offset, page_size, job.pages, len(job.pages)
        )
    finally:
        with contextlib.suppress(BufferError):
            mapping.close()
    return elapsed, bad

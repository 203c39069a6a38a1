"""The workloads of several processes, many attachments and many regions, and the control plane.

- ``share``: 1, 2, 4, 8 processes attached to one region (shared modes), each touching every
  page in an order of its own: time until every process has touched every page, and the
  service's fill counters summed over the region's attachments against the region's pages;
  baseline: as many processes touching a fresh mapping of the (page-cached) source file.
- ``cores``: one client process faulting on its region, then two on two regions at once:
  faults/s of two over one; baseline: the same two numbers for the kernel's own first touch.
- ``scale``: (a) ``scale_attachments`` small regions created, then attached and faulted by
  ``scale_processes`` client processes, held idle while a probe attachment's fault latency is
  measured, against the same probe alone before (and after) in the same service; the
  service's memory before and after; (b) ``scale_regions`` regions created and deleted in a
  fresh service: rates and memory per region.
- ``control``: CreateRegion, GetRegion, DeleteRegion round trips, one after another over the
  unix socket, against the gRPC health check and GetCapabilities in the same service.

Client processes come from a fork server (:mod:`benchmarks.clients`); nothing forked here ever
uses gRPC.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import resource
import time
from array import array
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from queue import Empty
from types import TracebackType
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks import clients
from benchmarks.clients import Grant, Job
from benchmarks.service import Service, on_abort, watchdog
from benchmarks.workloads import (
    MULTI_WORKLOADS,
    Record,
    Workspace,
    fault_latency_summary,
    latency_summary,
)
from shmfault import Client, Source
from shmfault.errors import RegionNotFoundError

__all__ = ["MULTI_WORKLOADS", "describe", "run_repetition"]
SHARED_MODES = ("shared-copy", "shared-continue")
KiB = 1 << 10


# --- the service's memory ---


def process_status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem (bytes), Threads and open fds of ``pid``."""
    wanted = {"VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"}
    status: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as lines:
        for line in lines:
            key, _, value = line.partition(":")
            if key in wanted:
                parts = value.split()
                status[key] = int(parts[0]) * (KiB if len(parts) > 1 else 1)
    status["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return status


def _per(after: dict[str, int], before: dict[str, int], count: int, key: str) -> float | None:
    return (after[key] - before[key]) / count if count else None


# --- child processes ---


def _library(ws: Workspace) -> str | None:
    """The compiled touch loops a child loads (the same build as this process's)."""
    if ws.toucher.kind != "c":
        return None
    return str(ws.directory / "libsfb_touch.so")


def _permutation(count: int, seed: int) -> array[int]:
    return array("Q", random.Random(seed).sample(range(count), count))


class Fleet:
    """Client processes forked by a fork server that imported only :mod:`benchmarks.clients`.
    Leaving the ``with`` block releases them (they detach and exit) and reaps them; any that
    does not exit in time is killed, by its own pid."""

    def __init__(self, service: Service, timeout: float, what: str) -> None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["benchmarks.clients"])
        self._context = context
        self._service = service
        self._timeout = timeout
        self._what = what
        self.go = context.Event()
        self.release = context.Event()
        self._results = context.Queue()
        self._processes: list[BaseProcess] = []
        on_abort(self._kill)

    def start(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            process = self._context.Process(
                target=clients.run_client,
                args=(job, self.go, self.release, self._results),
                name=f"sfb-client-{job.index}",
                daemon=True,
            )
            process.start()
            self._processes.append(process)

    def wait(self, kind: str, count: int) -> dict[int, Any]:
        """The ``kind`` messages ("ready" or "done") of ``count`` children, by child index.
        Raises RuntimeError on a child's error, a dead service or the timeout."""
        deadline = time.monotonic() + self._timeout
        got: dict[int, Any] = {}
        while len(got) < count:
            try:
                message = self._results.get(timeout=0.5)
            except Empty:
                if not self._service.alive():
                    raise RuntimeError(f"{self._what}: the service exited") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self._what}: {len(got)} of {count} children {kind} after "
                        f"{self._timeout:.0f} s"
                    ) from None
                dead = [p for p in self._processes if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"{self._what}: child {dead[0].name} died") from None
                continue
            if message[0] == "error":
                raise RuntimeError(f"{self._what}: child {message[1]} failed:\n{message[2]}")
            if message[0] == kind:
                got[message[1]] = message[2] if len(message) > 2 else None
        return got

    def _kill(self) -> None:
        for process in self._processes:
            if process.exitcode is None:
                with contextlib.suppress(Exception):
                    process.kill()

    def close(self) -> None:
        self.release.set()
        self.go.set()  # a child still waiting for the start must not wait forever
        deadline = time.monotonic() + 60
        for process in self._processes:
            process.join(max(0.1, deadline - time.monotonic()))
        self._kill()
        for process in self._processes:
            process.join(5)
        self._results.close()
        self._results.join_thread()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _span(done: dict[int, Any]) -> int:
    """From the first child's start to the last child's end (CLOCK_MONOTONIC is system-wide)."""
    return int(max(d["end_ns"] for d in done.values()) - min(d["start_ns"] for d in done.values()))


def _grant(client: Client, region_id: str) -> Grant:
    region, token, handoff = client.issue_attach_token(region_id)
    return Grant(handoff=handoff, region_id=region, token=token)


def _attachment_counters(client: Client, region_id: str, ids: set[int]) -> list[dict[str, Any]]:
    return [dict(e["counters"]) for e in client.stats(region_id) if e["attachment_id"] in ids]


def _cpu_fields(before: tuple[int, int, int], after: tuple[int, int, int], faults: int) -> Record:
    user, system = after[0] - before[0], after[1] - before[1]
    return {
        "service_cpu_ns": user + system,
        "cpu_ns_per_fault": (user + system) / faults if faults else None,
        "user_ns_per_fault": user / faults if faults else None,
        "sys_ns_per_fault": system / faults if faults else None,
    }


# --- share ---


def share(
    ws: Workspace, service: Service, client: Client, mode: str, rep: int, processes: int
) -> Record:
    """``processes`` children attached to one region, each touching all its pages in its own
    random order, started together."""
    config = ws.config
    pages = config.share_size // ws.page_size
    region = client.create_region(config.share_size, source=Source.of_file(ws.source_path))
    try:
        jobs = [
            Job(
                index=k,
                source_path=str(ws.source_path),
                pages=_permutation(pages, config.seed * 1000 + rep * 10 + k),
                mode=mode,
                grants=(_grant(client, region.id),),
                write=config.write,
                library=_library(ws),
            )
            for k in range(processes)
        ]
        with Fleet(service, config.run_timeout, f"share {mode} x{processes}") as fleet:
            fleet.start(jobs)
            fleet.wait("ready", processes)
            before = service.cpu_ns()
            fleet.go.set()
            done = fleet.wait("done", processes)
            after = service.cpu_ns()
        ids = {i for d in done.values() for i in d["attachment_ids"]}
        counters = _attachment_counters(client, region.id, ids)
    finally:
        client.delete_region(region.id, force=True)
    filled = sum(int(c.get("pages_filled", 0)) for c in counters)
    faults = sum(int(c.get("faults", 0)) for c in counters)
    bad = sum(d["bad_pages"] for d in done.values())
    return {
        "workload": "share",
        "subject": "shmfault",
        "mode": mode,
        "processes": processes,
        "fault_around": service.fault_around,
        "rep": rep,
        "pages": pages,
        "touches": pages * processes,
        "attachments_counted": len(counters),
        "faults": faults,
        "pages_filled": filled,
        "fills_per_page": filled / pages,
        "filled_once": filled == pages and len(counters) == processes,
        "elapsed_ns": _span(done),
        "process_ns": sorted(d["touch_ns"] for d in done.values()),
        **_cpu_fields(before, after, faults),
        "bad_pages": bad,
        "verified": bad == 0,
    }


def share_kernel(ws: Workspace, service: Service, rep: int, processes: int) -> Record:
    """The baseline: the same children and touches on fresh mappings of the source file."""
    config = ws.config
    pages = config.share_size // ws.page_size
    jobs = [
        Job(
            index=k,
            source_path=str(ws.source_path),
            pages=_permutation(pages, config.seed * 1000 + rep * 10 + k),
            write=config.write,
            library=_library(ws),
            kernel=True,
            size=config.share_size,
        )
        for k in range(processes)
    ]
    with Fleet(service, config.run_timeout, f"share kernel x{processes}") as fleet:
        fleet.start(jobs)
        fleet.wait("ready", processes)
        fleet.go.set()
        done = fleet.wait("done", processes)
    bad = sum(d["bad_pages"] for d in done.values())
    return {
        "workload": "share",
        "subject": "kernel",
        "mode": "file-first-touch",
        "processes": processes,
        "fault_around": 0,
        "rep": rep,
        "pages": pages,
        "touches": pages * processes,
        "elapsed_ns": _span(done),
        "bad_pages": bad,
        "verified": bad == 0,
    }


# --- cores ---


def cores(
    ws: Workspace, service: Service, client: Client, mode: str, rep: int, count: int
) -> Record:
    """``count`` children, each on a region of its own, all of its pages in random order."""
    config = ws.config
    pages = config.cores_size // ws.page_size
    regions = [
        client.create_region(config.cores_size, source=Source.of_file(ws.source_path))
        for _ in range(count)
    ]
    try:
        jobs = [
            Job(
                index=k,
                source_path=str(ws.source_path),
                pages=_permutation(pages, config.seed * 2000 + rep * 10 + k),
                mode=mode,
                grants=(_grant(client, region.id),),
                write=config.write,
                library=_library(ws),
                latencies=True,
            )
            for k, region in enumerate(regions)
        ]
        with Fleet(service, config.run_timeout, f"cores {mode} x{count}") as fleet:
            fleet.start(jobs)
            fleet.wait("ready", count)
            before = service.cpu_ns()
            fleet.go.set()
            done = fleet.wait("done", count)
            after = service.cpu_ns()
        ids = {i for d in done.values() for i in d["attachment_ids"]}
        counters = [c for r in regions for c in _attachment_counters(client, r.id, ids)]
    finally:
        for region in regions:
            client.delete_region(region.id, force=True)
    faults = sum(int(c.get("faults", 0)) for c in counters)
    elapsed = _span(done)
    latencies = array("I")
    for d in done.values():
        latencies.frombytes(d["latencies"])
    bad = sum(d["bad_pages"] for d in done.values())
    return {
        "workload": "cores",
        "subject": "shmfault",
        "mode": mode,
        "clients": count,
        "fault_around": service.fault_around,
        "rep": rep,
        "touches": pages * count,
        "faults": faults,
        "elapsed_ns": elapsed,
        "faults_per_s": faults / (elapsed / 1e9),
        **latency_summary(latencies),
        **_cpu_fields(before, after, faults),
        "bad_pages": bad,
        "verified": bad == 0,
    }


def cores_kernel(ws: Workspace, service: Service, rep: int, count: int) -> Record:
    """The machine's own scaling: ``count`` children first-touching the page-cached source."""
    config = ws.config
    pages = config.cores_size // ws.page_size
    jobs = [
        Job(
            index=k,
            source_path=str(ws.source_path),
            pages=_permutation(pages, config.seed * 2000 + rep * 10 + k),
            write=config.write,
            library=_library(ws),
            kernel=True,
            size=config.cores_size,
            # pages of its own, as each shmfault client has a region of its own
            offset=k * config.cores_size,
        )
        for k in range(count)
    ]
    with Fleet(service, config.run_timeout, f"cores kernel x{count}") as fleet:
        fleet.start(jobs)
        fleet.wait("ready", count)
        fleet.go.set()
        done = fleet.wait("done", count)
    elapsed = _span(done)
    bad = sum(d["bad_pages"] for d in done.values())
    return {
        "workload": "cores",
        "subject": "kernel",
        "mode": "file-first-touch",
        "clients": count,
        "fault_around": 0,
        "rep": rep,
        "touches": pages * count,
        "faults": pages * count,
        "elapsed_ns": elapsed,
        "faults_per_s": pages * count / (elapsed / 1e9),
        "bad_pages": bad,
        "verified": bad == 0,
    }


# --- scale ---


def _probe(ws: Workspace, service: Service, client: Client, mode: str, rep: int) -> Record:
    """One attachment in this process faulting on every page of a fresh probe region, each
    touch timed (the service runs with fault-around 1: every touch is a fault)."""
    config = ws.config
    pages = _permutation(config.scale_probe_size // ws.page_size, config.seed * 3000 + rep)
    latencies = array("I", bytes(4 * len(pages)))
    region = client.create_region(config.scale_probe_size, source=Source.of_file(ws.source_path))
    try:
        attachment = client.attach(region, mode=mode)
        try:
            with watchdog(service, config.run_timeout, "scale probe"):
                elapsed = ws.toucher.touch_list(
                    attachment.address, ws.page_size, pages, latencies, config.write
                )
                bad = ws.mismatched(attachment.address, pages, len(pages))
        finally:
            attachment.detach()
        counters = _attachment_counters(client, region.id, {attachment.attachment_id})
    finally:
        client.delete_region(region.id, force=True)
    faults = int(counters[0].get("faults", 0)) if counters else 0
    return {
        "touches": len(pages),
        "faults": faults,
        "elapsed_ns": elapsed,
        **latency_summary(latencies),
        **fault_latency_summary(latencies, faults),
        "bad_pages": bad,
    }


def _wait_detached(client: Client, region_ids: set[str], timeout: float = 60.0) -> int:
    """Wait until no attachment of ``region_ids`` is live; returns how many still are."""
    deadline = time.monotonic() + timeout
    while True:
        live = sum(1 for e in client.stats() if e["region_id"] in region_ids and e["ended"] is None)
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.2)


def _source_offset(ws: Workspace, index: int, size: int) -> int:
    """Region ``index``'s place in the source file: consecutive, wrapping around."""
    slots = max(1, ws.source_size // size)
    return (index % slots) * size


def scale_attachments(ws: Workspace, rep: int, say: Callable[[str], None]) -> Record:
    config = ws.config
    mode = config.scale_mode
    count = config.scale_attachments
    size = config.scale_region_size
    workers = max(1, min(config.scale_processes, count))
    limit = str(count + 64)
    extra = [
        *config.service_args,
        "--max-attachments",
        limit,
        "--max-attachments-per-uid",
        limit,
    ]
    directory = ws.directory / f"scale-r{rep}"
    with Service(directory, fault_around=1, extra_args=extra) as service, service.client() as c:
        alone = _probe(ws, service, c, mode, rep)
        say(f"  scale probe alone: fault p99 {alone['p99_ns'] / 1000:.1f} us")
        status_start = process_status(service.pid)
        started = time.monotonic_ns()
        regions = [
            c.create_region(
                size,
                source=Source.of_file(ws.source_path, _source_offset(ws, k, size)),
            )
            for k in range(count)
        ]
        create_ns = time.monotonic_ns() - started
        status_regions = process_status(service.pid)
        grants = [
            Grant(r.handoff_socket, r.id, r.attach_token, _source_offset(ws, k, size))
            for k, r in enumerate(regions)
        ]
        jobs = [
            Job(
                index=w,
                source_path=str(ws.source_path),
                pages=array("Q", [0]),
                mode=mode,
                grants=tuple(grants[w::workers]),
                write=config.write,
                library=_library(ws),
                timed_attach=True,
                hold=True,
            )
            for w in range(workers)
        ]
        with Fleet(service, config.run_timeout, f"scale {count} attachments") as fleet:
            fleet.start(jobs)
            fleet.wait("ready", workers)
            fleet.go.set()
            done = fleet.wait("done", workers)
            attach_fault_ns = _span(done)
            attached = sum(len(d["attachment_ids"]) for d in done.values())
            say(f"  {attached} attachments made and faulted in {attach_fault_ns / 1e9:.1f} s")
            status_attached = process_status(service.pid)
            loaded = _probe(ws, service, c, mode, rep)
            say(f"  scale probe with them: fault p99 {loaded['p99_ns'] / 1000:.1f} us")
        still_live = _wait_detached(c, {r.id for r in regions})
        status_detached = process_status(service.pid)
        after = _probe(ws, service, c, mode, rep)
        started = time.monotonic_ns()
        for region in regions:
            c.delete_region(region.id)
        delete_ns = time.monotonic_ns() - started
        status_deleted = process_status(service.pid)
    attach_ns = sorted(n for d in done.values() for n in d["attach_ns"])
    bad = sum(d["bad_pages"] for d in done.values()) + sum(
        p["bad_pages"] for p in (alone, loaded, after)
    )
    return {
        "workload": "scale",
        "subject": "attachments",
        "mode": mode,
        "fault_around": 1,
        "rep": rep,
        "attachments": attached,
        "processes": workers,
        "region_size": size,
        "create_ns": create_ns,
        "attach_fault_ns": attach_fault_ns,
        "create_per_s": count / (create_ns / 1e9),
        "attach_fault_per_s": attached / (attach_fault_ns / 1e9),
        "create_attach_fault_per_s": attached / ((create_ns + attach_fault_ns) / 1e9),
        "attach_p50_ns": attach_ns[len(attach_ns) // 2] if attach_ns else None,
        "attach_p99_ns": attach_ns[min(len(attach_ns) - 1, len(attach_ns) * 99 // 100)]
        if attach_ns
        else None,
        "delete_per_s": count / (delete_ns / 1e9),
        "status_start": status_start,
        "status_regions": status_regions,
        "status_attached": status_attached,
        "status_detached": status_detached,
        "status_deleted": status_deleted,
        "rss_per_region": _per(status_regions, status_start, count, "VmRSS"),
        "rss_per_attachment": _per(status_attached, status_regions, attached, "VmRSS"),
        "anon_per_attachment": _per(status_attached, status_regions, attached, "RssAnon"),
        # Source-file pages the service's mappings of the sources hold (RssFile, or RssShmem
        # for a source on tmpfs) are the file's own pages, there with or without the service:
        # its own memory is the rest.
        "file_per_attachment": (_per(status_attached, status_regions, attached, "RssFile") or 0.0)
        + (_per(status_attached, status_regions, attached, "RssShmem") or 0.0),
        "fds_per_attachment": _per(status_attached, status_regions, attached, "fds"),
        "threads_added": status_attached["Threads"] - status_regions["Threads"],
        "rss_kept_per_attachment": _per(status_detached, status_regions, attached, "VmRSS"),
        "fds_kept_after_detach": status_detached["fds"] - status_regions["fds"],
        "still_live_after_detach": still_live,
        "rss_kept_per_region": _per(status_deleted, status_start, count, "VmRSS"),
        "probe_alone": alone,
        "probe_loaded": loaded,
        "probe_after": after,
        "probe_p99_alone_ns": alone["fault_p99_ns"],
        "probe_p99_loaded_ns": loaded["fault_p99_ns"],
        "probe_p99_after_ns": after["fault_p99_ns"],
        "probe_p50_alone_ns": alone["fault_p50_ns"],
        "probe_p50_loaded_ns": loaded["fault_p50_ns"],
        "p99_loaded_vs_alone": _ratio(loaded["fault_p99_ns"], alone["fault_p99_ns"]),
        "p99_loaded_vs_after": _ratio(loaded["fault_p99_ns"], after["fault_p99_ns"]),
        "p50_loaded_vs_alone": _ratio(loaded["fault_p50_ns"], alone["fault_p50_ns"]),
        "bad_pages": bad,
        "verified": bad == 0 and attached == count,
    }


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top is not None and bottom else None


def _raise_fd_limit(count: int) -> tuple[int, int]:
    """Make room for ``count`` file-source regions in the service, which inherits this
    process's fd limit and raises its soft limit to the hard one: each such region holds two
    fds (its memfd and its source file). Returns (hard limit before, after); raising the hard
    limit needs root (CAP_SYS_RESOURCE), and without it the run may end in EMFILE."""
    needed = 2 * count + 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= needed:
        return hard, hard
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, needed))
    return hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def scale_regions(ws: Workspace, rep: int, say: Callable[[str], None]) -> Record:
    """``scale_regions`` regions created one after another in a fresh service, a sample read
    back and checked, then all deleted."""
    config = ws.config
    count = config.scale_regions
    size = config.scale_region_size
    fd_limit_before, fd_limit = _raise_fd_limit(count)
    if fd_limit != fd_limit_before:
        say(f"  fd hard limit raised from {fd_limit_before} to {fd_limit} for the service")
    # Where the fds cannot hold a source file per region, measure regions without one (one fd
    # each) rather than not at all: their bytes are then written through the service and read
    # back for the check.
    with_source = fd_limit == resource.RLIM_INFINITY or fd_limit >= 2 * count + 512
    if not with_source:
        say(
            f"  fd hard limit {fd_limit} < 2 x {count} regions + 512, and not raisable here: "
            "regions without a source file"
        )
    extra = list(config.service_args)
    if count + 16 > 10_000:  # the service's default --max-regions
        extra += ["--max-regions", str(count + 16)]
    directory = ws.directory / f"regions-r{rep}"
    with Service(directory, fault_around=16, extra_args=extra) as service, service.client() as c:
        c.get_region(c.create_region(size).id)  # warm the channel, then gone again
        for region in c.list_regions():
            c.delete_region(region.id)
        status_start = process_status(service.pid)
        times = array("Q", bytes(8 * count))
        ids: list[str] = []
        started = time.monotonic_ns()
        for k in range(count):
            before = time.monotonic_ns()
            source = Source.of_file(ws.source_path, _source_offset(ws, k, size))
            region = c.create_region(size, source=source if with_source else None)
            times[k] = time.monotonic_ns() - before
            ids.append(region.id)
        create_ns = time.monotonic_ns() - started
        status_created = process_status(service.pid)
        say(f"  {count} regions created in {create_ns / 1e9:.1f} s")
        sample = range(0, count, max(1, count // 32))
        bad = 0
        assert ws.source_map is not None
        for k in sample:
            offset = _source_offset(ws, k, size)
            want = ws.source_map[offset : offset + size]
            if not with_source:
                c.write(ids[k], 0, want)
            if c.read(ids[k]) != want:
                bad += 1
        listed = sum(1 for _ in c.iter_regions())
        status_read = process_status(service.pid)
        started = time.monotonic_ns()
        for region_id in ids:
            c.delete_region(region_id)
        delete_ns = time.monotonic_ns() - started
        status_deleted = process_status(service.pid)
    tenth = max(1, count // 10)
    first = sum(times[:tenth])
    last = sum(times[-tenth:])
    return {
        "workload": "scale",
        "subject": "regions",
        "fault_around": 0,
        "rep": rep,
        "regions": count,
        "region_size": size,
        "fd_limit_inherited": fd_limit_before,
        "fd_limit": fd_limit,
        "source": "file" if with_source else "none",
        "listed": listed,
        "create_per_s": count / (create_ns / 1e9),
        "create_first_per_s": tenth / (first / 1e9),
        "create_last_per_s": tenth / (last / 1e9),
        "last_vs_first": first / last if last else None,
        "create_p50_ns": sorted(times)[count // 2],
        "create_p99_ns": sorted(times)[min(count - 1, count * 99 // 100)],
        "delete_per_s": count / (delete_ns / 1e9),
        "status_start": status_start,
        "status_created": status_created,
        "status_read": status_read,
        "status_deleted": status_deleted,
        "rss_per_region": _per(status_created, status_start, count, "VmRSS"),
        "anon_per_region": _per(status_created, status_start, count, "RssAnon"),
        "fds_per_region": _per(status_created, status_start, count, "fds"),
        "rss_kept_per_region": _per(status_deleted, status_start, count, "VmRSS"),
        "sample_checked": len(sample),
        "bad_pages": bad,
        "verified": bad == 0 and listed == count,
    }


# --- control plane ---


def _timed_calls(count: int, call: Callable[[int], None]) -> tuple[int, array[int]]:
    latencies = array("Q", bytes(8 * count))
    clock = time.perf_counter_ns
    started = clock()
    for k in range(count):
        before = clock()
        call(k)
        latencies[k] = clock() - before
    return clock() - started, latencies


def control(ws: Workspace, rep: int, say: Callable[[str], None]) -> list[Record]:
    """One client, one call at a time: health checks, GetCapabilities, then ``control_calls``
    CreateRegion, GetRegion of each, DeleteRegion of each, then health checks again."""
    config = ws.config
    count = config.control_calls
    size = config.scale_region_size
    directory = ws.directory / f"control-r{rep}"
    records: list[Record] = []
    with (
        Service(directory, fault_around=16, extra_args=config.service_args) as service,
        service.client() as client,
        grpc.insecure_channel(client.target) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service="")
        for _ in range(50):  # connect and warm both channels
            health.Check(check)
            client.capabilities()
        regions: list[Any] = []
        created_ok = [True]
        got_ok = [True]

        def do_health(_k: int) -> None:
            if health.Check(check).status != health_pb2.HealthCheckResponse.SERVING:
                raise RuntimeError("the service is not SERVING")

        def do_capabilities(_k: int) -> None:
            client.capabilities()

        def do_create(k: int) -> None:
            region = client.create_region(
                size, source=Source.of_file(ws.source_path, _source_offset(ws, k, size))
            )
            created_ok[0] &= region.size == size and bool(region.id)
            regions.append(region)

        def do_get(k: int) -> None:
            region = client.get_region(regions[k].id)
            got_ok[0] &= region.id == regions[k].id and region.size == size

        def do_delete(k: int) -> None:
            client.delete_region(regions[k].id)

        steps: list[tuple[str, Callable[[int], None]]] = [
            ("health", do_health),
            ("GetCapabilities", do_capabilities),
            ("CreateRegion", do_create),
            ("GetRegion", do_get),
            ("DeleteRegion", do_delete),
            ("health-after", do_health),
        ]
        for name, step in steps:
            elapsed, latencies = _timed_calls(count, step)
            ok = True
            if name == "CreateRegion":
                ok = created_ok[0] and len(regions) == count
            elif name == "GetRegion":
                ok = got_ok[0]
            elif name == "DeleteRegion":
                ok = _all_gone(client, [r.id for r in regions[:: max(1, count // 16)]])
            ordered = sorted(latencies)
            records.append(
                {
                    "workload": "control",
                    "subject": name,
                    "fault_around": 0,
                    "rep": rep,
                    "calls": count,
                    "elapsed_ns": elapsed,
                    "per_s": count / (elapsed / 1e9),
                    "p50_ns": ordered[count // 2],
                    "p99_ns": ordered[min(count - 1, count * 99 // 100)],
                    "bad_pages": 0,
                    "verified": ok,
                }
            )
            say(f"  control {name:16} {count / (elapsed / 1e9):8.0f} calls/s")
    return records


def _all_gone(client: Client, region_ids: list[str]) -> bool:
    """Every one of ``region_ids`` is unknown to the service now."""
    for region_id in region_ids:
        try:
            client.get_region(region_id)
        except RegionNotFoundError:
            continue
        return False
    return not client.list_regions()


# --- one repetition of the lot ---


def run_repetition(
    ws: Workspace, rep: int, keep: Callable[[Record | None], None], say: Callable[[str], None]
) -> None:
    """The multi-process workloads of ``ws.config.workloads`` once. Modes and process counts
    are rotated from one repetition to the next, so none always runs first."""
    config = ws.config
    shift = rep % len(config.modes)
    modes = [*config.modes[shift:], *config.modes[:shift]]
    if "share" in config.workloads:
        shared = [m for m in modes if m in SHARED_MODES]
        with (
            Service(
                ws.directory / f"share-r{rep}",
                fault_around=config.share_fault_around,
                extra_args=config.service_args,
            ) as service,
            service.client() as client,
        ):
            counts = list(config.share_processes)
            counts = counts[rep % len(counts) :] + counts[: rep % len(counts)]
            for processes in counts:
                keep(share_kernel(ws, service, rep, processes))
                for mode in shared:
                    keep(share(ws, service, client, mode, rep, processes))
    if "cores" in config.workloads:
        with (
            Service(
                ws.directory / f"cores-r{rep}",
                fault_around=config.cores_fault_around,
                extra_args=config.service_args,
            ) as service,
            service.client() as client,
        ):
            order = (1, 2) if rep % 2 == 0 else (2, 1)
            for count in order:
                keep(cores_kernel(ws, service, rep, count))
            for mode in modes:
                for count in order:
                    keep(cores(ws, service, client, mode, rep, count))
    if "scale" in config.workloads:
        keep(scale_attachments(ws, rep, say))
        keep(scale_regions(ws, rep, say))
    if "control" in config.workloads:
        for record in control(ws, rep, say):
            keep(record)


def describe(record: Record) -> str:
    """One progress line for a record of these workloads."""
    ok = "ok" if record["verified"] else f"BAD ({record['bad_pages']} pages)"
    workload = record["workload"]
    if workload == "share":
        filled = (
            f"  filled {record['pages_filled']:,} of {record['pages']:,}"
            if record["subject"] == "shmfault"
            else ""
        )
        return (
            f"  share {record['subject']:8} {record['mode']:16} x{record['processes']}  "
            f"{record['elapsed_ns'] / 1e6:8.1f} ms{filled}  {ok}"
        )
    if workload == "cores":
        return (
            f"  cores {record['subject']:8} {record['mode']:16} x{record['clients']}  "
            f"{record['faults_per_s']:10,.0f} faults/s  {ok}"
        )
    if workload == "scale" and record["subject"] == "attachments":
        return (
            f"  scale {record['attachments']} attachments: "
            f"{_kib(record['rss_per_attachment'])} KiB RSS each, probe p99 "
            f"{_x(record['p99_loaded_vs_alone'])} of alone  {ok}"
        )
    if workload == "scale":
        return (
            f"  scale {record['regions']} regions: {record['create_per_s']:,.0f} created/s, "
            f"{_kib(record['rss_per_region'])} KiB RSS each  {ok}"
        )
    return f"  {workload} {record['subject']}  {ok}"


def _kib(value: float | None) -> str:
    return "—" if value is None else f"{value / KiB:.1f}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"

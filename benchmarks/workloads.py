"""The workloads and their baselines. Every function returns plain records (dicts) that
:mod:`benchmarks.report` aggregates; every record says whether the bytes touched were right.

Workloads, run against a fresh region per run (a file source, so every page has distinct bytes):

- ``rand``: distinct pages picked uniformly at random, touched once each in the client by a C
  loop that times every touch (the fault's whole round trip as the client sees it);
- ``seq``: every page of the region in address order (fill bandwidth);
- ``file``: every page in address order of a region filled from a file on disk, its pages
  cached or not (:mod:`benchmarks.filesource`);
- ``replay``: a working-set trace (clusters of 1 to 16 consecutive pages at random places,
  visited in random order) over a region filled from a file: first recorded (an attach with
  ``record``), then timed to completion on demand and with the recording replayed (an attach
  with ``replay``: the service fills the recorded pages ahead of the client), each on a fresh
  region of the same file.

Baselines, measured in the same run, in this process, with the same touch loop:

- ``kernel``: first touch of a fresh mapping of a memfd whose pages are already in memory (the
  kernel's own fault path, no userfaultfd): what a region that needed no filling would cost;
- ``memcpy``: one memcpy of the same size between populated buffers;
- ``reference``: the reference C handler (uffd_bench.c), when present.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import random
import shutil
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from benchmarks import native
from benchmarks.reference import REFERENCE_MODE, Reference, build
from benchmarks.service import Service, on_abort, watchdog
from shmfault import Client, Source

Record = dict[str, Any]
MODES = ("shared-copy", "shared-continue", "private-copy")
#: The workloads of benchmarks/scaling.py.
MULTI_WORKLOADS = ("share", "cores", "scale", "control")
KiB = 1 << 10
MiB = 1 << 20


@dataclass
class Config:
    """What a run measures. Sizes in bytes."""

    workloads: tuple[str, ...] = ("rand", "seq")
    modes: tuple[str, ...] = MODES
    rand_size: int = 256 * MiB
    touches: int = 20_000
    seq_size: int = 256 * MiB
    rand_fault_around: tuple[int, ...] = (1, 16)
    seq_fault_around: tuple[int, ...] = (16, 64)
    replay_size: int = 1024 * MiB
    replay_touches: int = 32_768
    replay_fault_around: tuple[int, ...] = (16,)
    repeat: int = 3
    write: bool = True
    seed: int = 1
    reference_source: Path | None = None
    touch_loop: str = "c"
    source_dir: Path | None = None
    pin: int | None = None
    run_timeout: float = 300.0
    service_args: list[str] = field(default_factory=list)
    # The multi-process workloads (benchmarks/scaling.py).
    share_size: int = 64 * MiB
    share_processes: tuple[int, ...] = (1, 2, 4, 8)
    share_fault_around: int = 16
    cores_size: int = 32 * MiB
    cores_fault_around: int = 1
    scale_mode: str = "shared-copy"
    scale_attachments: int = 1000
    scale_processes: int = 50
    scale_regions: int = 10_000
    scale_region_size: int = 64 * KiB
    scale_probe_size: int = 16 * MiB
    control_calls: int = 1000
    # The file workload (benchmarks/filesource.py).
    file_size: int = 256 * MiB
    file_dir: Path | None = None

    @property
    def phases(self) -> list[int]:
        """Every fault-around value a service is started with, in order."""
        wanted: set[int] = set()
        if "rand" in self.workloads:
            wanted.update(self.rand_fault_around)
        if "seq" in self.workloads:
            wanted.update(self.seq_fault_around)
        if "replay" in self.workloads:
            wanted.update(self.replay_fault_around)
        return sorted(wanted)


def _percentile(ordered: list[int], fraction: float) -> int:
    # The reference's indexing (lat[n * q]), so both sides mean the same thing.
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def latency_summary(latencies: array[int]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "p50_ns": _percentile(ordered, 0.50),
        "p90_ns": _percentile(ordered, 0.90),
        "p99_ns": _percentile(ordered, 0.99),
        "p999_ns": _percentile(ordered, 0.999),
        "mean_ns": sum(ordered) / len(ordered),
        "max_ns": ordered[-1],
    }


def fault_latency_summary(latencies: array[int], faults: int) -> dict[str, float | None]:
    """Percentiles over the touches that faulted. With fault-around most random touches land on
    pages an earlier fault already filled and cost a TLB miss, not a fault; the service counts
    the faults exactly, and a fault (tens of us) is far slower than a touch of a mapped page
    (under 1 us), so the ``faults`` slowest touches are the faulting ones."""
    if not 0 < faults <= len(latencies):
        return {"fault_p50_ns": None, "fault_p99_ns": None}
    slowest = sorted(latencies)[len(latencies) - faults :]
    return {
        "fault_p50_ns": _percentile(slowest, 0.50),
        "fault_p99_ns": _percentile(slowest, 0.99),
    }


def _address(mapping: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(mapping))


class Workspace:
    """The temporary directory, the source file (mapped here for checking), the touch loops and
    the reference handler of one run. Removes everything it made on exit."""

    def __init__(self, config: Config, say: Callable[[str], None]) -> None:
        self.config = config
        self.say = say
        self.directory = Path()
        self.source_path = Path()
        self.source_map: mmap.mmap | None = None
        self.source_address = 0
        self.source_size = 0
        self.page_size = mmap.PAGESIZE
        self.toucher: native.Toucher = native.PythonTouch()
        self.reference: Reference | None = None
        self.notes: list[str] = []
        self.timer_overhead_ns = 0
        #: files made outside the work directory, removed with it
        self.made_files: list[Path] = []

    def __enter__(self) -> Self:
        self.directory = Path(tempfile.mkdtemp(prefix="sfb-"))
        on_abort(self.cleanup)
        try:
            self._prepare()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cleanup()

    def _prepare(self) -> None:
        config = self.config
        self.toucher = native.load(self.directory, config.touch_loop)
        self.timer_overhead_ns = self.toucher.timer_overhead_ns()
        if self.toucher.kind == "python":
            self.notes.append(
                "touch loop: Python (no C compiler or --touch-loop python): every per-touch "
                f"time includes ~{self.timer_overhead_ns} ns of interpreter overhead, and a "
                "write touch is a read then a write, so it faults as a read (which gets the "
                "kernel's own fault-around in the first-touch baseline)"
            )
        else:
            self.notes.append(
                f"touch loop: C (touch.c), timer pair overhead {self.timer_overhead_ns} ns"
            )
        if config.reference_source is not None:
            self.reference, message = build(config.reference_source, self.directory)
            self.notes.append(message)
            self.say(message)
        else:
            self.notes.append("reference handler not run (--no-reference, or no counterpart)")
        size = max(
            config.rand_size if "rand" in config.workloads else 0,
            config.seq_size if "seq" in config.workloads else 0,
            config.replay_size if "replay" in config.workloads else 0,
            config.share_size if "share" in config.workloads else 0,
            2 * config.cores_size if "cores" in config.workloads else 0,
            # scale's small regions take consecutive slices of it, wrapping around
            max(config.scale_probe_size, 64 * MiB) if "scale" in config.workloads else 0,
            64 * MiB if "control" in config.workloads else 0,
            config.file_size if "file" in config.workloads else 0,
        )
        self.source_size = size
        source_dir = config.source_dir or _default_source_dir(self.directory)
        self.source_path = source_dir / f"sfbench-{os.getpid()}-source.bin"
        self.say(f"writing a {size >> 20} MiB source file at {self.source_path}")
        descriptor = os.open(self.source_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(descriptor, size)
            self.source_map = mmap.mmap(descriptor, size)
        finally:
            os.close(descriptor)
        self.source_address = _address(self.source_map)
        self.toucher.fill_pattern(self.source_address, size, config.seed)

    def cleanup(self) -> None:
        if self.source_map is not None:
            with contextlib.suppress(BufferError):
                self.source_map.close()
            self.source_map = None
        for path in [self.source_path, *self.made_files]:
            if path.name:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        if self.directory.name:
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def file_directory(self) -> Path:
        """Where the ``file`` workload's file goes: ``file_dir``, else the work directory."""
        return self.config.file_dir or self.directory

    def random_pages(self, rep: int) -> array[int]:
        """The pages the ``rand`` workload touches in repetition ``rep``: distinct, uniform."""
        pages = self.config.rand_size // self.page_size
        count = min(self.config.touches, pages)
        return array("Q", random.Random(self.config.seed + rep).sample(range(pages), count))

    def trace_pages(self, rep: int) -> array[int]:
        """The ``replay`` workload's trace: ``replay_touches`` distinct pages in clusters of 1
        to 16 consecutive pages at random places, clusters in random order."""
        rng = random.Random(self.config.seed * 7919 + rep)
        total = self.config.replay_size // self.page_size
        wanted = min(self.config.replay_touches, total // 2)
        taken = bytearray(total)
        clusters: list[range] = []
        count = 0
        while count < wanted:
            length = min(rng.randint(1, 16), wanted - count)
            start = rng.randrange(total - length)
            if any(taken[start : start + length]):
                continue
            taken[start : start + length] = b"\x01" * length
            clusters.append(range(start, start + length))
            count += length
        rng.shuffle(clusters)
        return array("Q", (page for cluster in clusters for page in cluster))

    def service(self, fault_around: int, rep: int) -> Service:
        return Service(
            self.directory / f"fa{fault_around}-r{rep}",
            fault_around=fault_around,
            extra_args=self.config.service_args,
        )

    def mismatched(self, address: int, pages: array[int] | None, count: int) -> int:
        return self.toucher.mismatched_pages(
            address, self.source_address, self.page_size, pages, count
        )


def _default_source_dir(fallback: Path) -> Path:
    """tmpfs when there is one (the source's pages then stay in memory and never cause disk
    writeback during a measurement, like the reference's memfd), else the work directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return fallback


# --- shmfault ---


@contextlib.contextmanager
def _region(
    ws: Workspace,
    client: Client,
    size: int,
    mode: str,
    source: Path | None = None,
    **attach: Any,
) -> Iterator[tuple[Any, Any]]:
    """A fresh region of ``source`` (default: the run's source file), attached in ``mode``;
    detached and deleted after."""
    region = client.create_region(size, source=Source.of_file(source or ws.source_path))
    try:
        attachment = client.attach(region, mode=mode, **attach)
        if attachment.mode.wire_name != mode:
            attachment.detach()
            raise RuntimeError(f"asked for {mode}, got {attachment.mode.wire_name}")
        try:
            yield region, attachment
        finally:
            attachment.detach()
    finally:
        client.delete_region(region.id, force=True)


def sequential_figures(size: int, elapsed_ns: int, bad_pages: int) -> Record:
    """The fields every in-order fill of ``size`` bytes reports."""
    return {
        "bytes": size,
        "elapsed_ns": elapsed_ns,
        "gbps": size / elapsed_ns,
        "bad_pages": bad_pages,
        "verified": bad_pages == 0,
    }


def _counters(client: Client, region_id: str, attachment_id: int) -> dict[str, Any]:
    for entry in client.stats(region_id):
        if entry["attachment_id"] == attachment_id:
            return dict(entry["counters"])
    return {}


def _service_fields(
    before: tuple[int, int, int], after: tuple[int, int, int], counters: dict[str, Any]
) -> Record:
    faults = int(counters.get("faults", 0))
    user, system, oncpu = (b - a for a, b in zip(before, after, strict=True))

    def per_fault(value: int) -> float | None:
        return value / faults if faults else None

    return {
        "faults": faults,
        "pages_filled": int(counters.get("pages_filled", 0)),
        "eexist": int(counters.get("eexist", 0)),
        "wakes": int(counters.get("wakes", 0)),
        "eagain": int(counters.get("eagain", 0)),
        "service_cpu_ns": user + system,
        "service_user_ns": user,
        "service_sys_ns": system,
        "service_oncpu_ns": oncpu,
        "cpu_ns_per_fault": per_fault(user + system),
        "user_ns_per_fault": per_fault(user),
        "sys_ns_per_fault": per_fault(system),
        "oncpu_ns_per_fault": per_fault(oncpu),
        "service_p50_bucket_ns": counters.get("latency_p50_ns"),
    }


def shmfault_rand(
    ws: Workspace, service: Service, client: Client, mode: str, rep: int, pages: array[int]
) -> Record:
    config = ws.config
    latencies = array("I", bytes(4 * len(pages)))
    with _region(ws, client, config.rand_size, mode) as (region, attachment):
        with watchdog(service, config.run_timeout, f"rand {mode}"):
            before = service.cpu_ns()
            elapsed = ws.toucher.touch_list(
                attachment.address, ws.page_size, pages, latencies, config.write
            )
            after = service.cpu_ns()
            bad = ws.mismatched(attachment.address, pages, len(pages))
        attachment.detach()
        counters = _counters(client, region.id, attachment.attachment_id)
    record: Record = {
        "workload": "rand",
        "subject": "shmfault",
        "mode": mode,
        "fault_around": service.fault_around,
        "rep": rep,
        "touches": len(pages),
        "elapsed_ns": elapsed,
        **latency_summary(latencies),
        **_service_fields(before, after, counters),
        "bad_pages": bad,
        "verified": bad == 0,
    }
    record["faults_per_s"] = record["faults"] / (elapsed / 1e9)
    record["touches_per_s"] = len(pages) / (elapsed / 1e9)
    record.update(fault_latency_summary(latencies, record["faults"]))
    return record


def shmfault_seq(ws: Workspace, service: Service, client: Client, mode: str, rep: int) -> Record:
    config = ws.config
    size = config.seq_size
    with _region(ws, client, size, mode) as (region, attachment):
        with watchdog(service, config.run_timeout, f"seq {mode}"):
            before = service.cpu_ns()
            elapsed = ws.toucher.touch_seq(attachment.address, size, ws.page_size, config.write)
            after = service.cpu_ns()
            bad = ws.mismatched(attachment.address, None, size // ws.page_size)
        attachment.detach()
        counters = _counters(client, region.id, attachment.attachment_id)
    record: Record = {
        "workload": "seq",
        "subject": "shmfault",
        "mode": mode,
        "fault_around": service.fault_around,
        "rep": rep,
        **sequential_figures(size, elapsed, bad),
        **_service_fields(before, after, counters),
    }
    record["faults_per_s"] = record["faults"] / (elapsed / 1e9)
    return record


def shmfault_replay(
    ws: Workspace, service: Service, client: Client, mode: str, rep: int, pages: array[int]
) -> list[Record]:
    """The trace recorded, then on demand and replayed, each on a fresh region: one record
    per variant (``record``, ``ondemand``, ``replay``), time to completion in the client."""
    config = ws.config
    latencies = array("I", bytes(4 * len(pages)))
    records: list[Record] = []
    recording_id = ""
    for variant in ("record", "ondemand", "replay"):
        attach: dict[str, Any] = {}
        if variant == "record":
            attach["record"] = True
        elif variant == "replay":
            attach["replay"] = recording_id
        with _region(ws, client, config.replay_size, mode, **attach) as (region, attachment):
            with watchdog(service, config.run_timeout, f"replay {variant} {mode}"):
                before = service.cpu_ns()
                elapsed = ws.toucher.touch_list(
                    attachment.address, ws.page_size, pages, latencies, config.write
                )
                after = service.cpu_ns()
                bad = ws.mismatched(attachment.address, pages, len(pages))
            attachment.detach()
            entry = next(
                e for e in client.stats(region.id) if e["attachment_id"] == attachment.attachment_id
            )
        if variant == "record":
            recording_id = _saved_recording(client, entry)
        counters = dict(entry["counters"])
        records.append(
            {
                "workload": "replay",
                "subject": "shmfault",
                "variant": variant,
                "mode": mode,
                "fault_around": service.fault_around,
                "rep": rep,
                "touches": len(pages),
                "elapsed_ns": elapsed,
                "pages_prefetched": int(counters.get("pages_prefetched", 0)),
                **_service_fields(before, after, counters),
                "bad_pages": bad,
                "verified": bad == 0,
            }
        )
    return records


def _saved_recording(client: Client, entry: dict[str, Any], timeout: float = 60.0) -> str:
    """The id of the recording an ended attachment saved, once the service has written it."""
    recording_id = str(entry["recording_id"])
    deadline = time.monotonic() + timeout
    while not any(r["recording_id"] == recording_id for r in client.list_recordings()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"recording {recording_id!r} was never written")
        time.sleep(0.05)
    return recording_id


# --- baselines ---


@contextlib.contextmanager
def _populated_memfd(ws: Workspace, size: int) -> Iterator[int]:
    """A memfd holding the source's first ``size`` bytes, every page in memory, mapped
    nowhere."""
    descriptor = os.memfd_create("sfbench-first-touch", os.MFD_CLOEXEC)
    try:
        os.ftruncate(descriptor, size)
        with mmap.mmap(descriptor, size) as filler:
            ws.toucher.copy(_address(filler), ws.source_address, size)
        yield descriptor
    finally:
        os.close(descriptor)


def kernel_rand(ws: Workspace, rep: int, pages: array[int]) -> Record:
    """Random first touches of a fresh mapping of a populated memfd: the kernel's fault path."""
    config = ws.config
    size = config.rand_size
    latencies = array("I", bytes(4 * len(pages)))
    with _populated_memfd(ws, size) as descriptor, mmap.mmap(descriptor, size) as mapping:
        address = _address(mapping)
        elapsed = ws.toucher.touch_list(address, ws.page_size, pages, latencies, config.write)
        bad = ws.mismatched(address, pages, len(pages))
    return {
        "workload": "rand",
        "subject": "kernel",
        "mode": "memfd-first-touch",
        "fault_around": 0,
        "rep": rep,
        "touches": len(pages),
        "faults": len(pages),
        "elapsed_ns": elapsed,
        **latency_summary(latencies),
        "faults_per_s": len(pages) / (elapsed / 1e9),
        "touches_per_s": len(pages) / (elapsed / 1e9),
        "bad_pages": bad,
        "verified": bad == 0,
    }


def kernel_seq(ws: Workspace, rep: int) -> Record:
    """Sequential first touch of a fresh mapping of a populated memfd."""
    config = ws.config
    size = config.seq_size
    with _populated_memfd(ws, size) as descriptor, mmap.mmap(descriptor, size) as mapping:
        address = _address(mapping)
        elapsed = ws.toucher.touch_seq(address, size, ws.page_size, config.write)
        bad = ws.mismatched(address, None, size // ws.page_size)
    return {
        "workload": "seq",
        "subject": "kernel",
        "mode": "memfd-first-touch",
        "fault_around": 0,
        "rep": rep,
        **sequential_figures(size, elapsed, bad),
        "faults": size // ws.page_size,
    }


def memcpy(ws: Workspace, rep: int) -> Record:
    """memcpy of the sequential size between two populated anonymous buffers (the second of
    two copies: the first warms caches and TLB)."""
    size = ws.config.seq_size
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
    with mmap.mmap(-1, size, flags=flags) as source, mmap.mmap(-1, size, flags=flags) as target:
        source_address, target_address = _address(source), _address(target)
        ws.toucher.copy(source_address, ws.source_address, size)
        ws.toucher.copy(target_address, source_address, size)
        elapsed = ws.toucher.copy(target_address, source_address, size)
        bad = ws.mismatched(target_address, None, size // ws.page_size)
    return {
        "workload": "seq",
        "subject": "memcpy",
        "mode": "memcpy",
        "fault_around": 0,
        "rep": rep,
        "bytes": size,
        "elapsed_ns": elapsed,
        "gbps": size / elapsed,
        "bad_pages": bad,
        "verified": bad == 0,
    }


def reference(
    ws: Workspace, workload: str, mode: str, fault_around: int, rep: int
) -> Record | None:
    """One reference handler run (None when the reference is absent). ``mode`` is a shmfault
    mode (mapped to the reference's) or a reference mode (``base-shm-minor``, ``memcpy``)."""
    if ws.reference is None:
        return None
    config = ws.config
    reference_mode = REFERENCE_MODE.get(mode, mode)
    if fault_around & (fault_around - 1):
        return None  # the reference takes powers of two only
    size = config.rand_size if workload == "rand" else config.seq_size
    result = ws.reference.run(
        mode=reference_mode,
        pattern=workload,
        size=size,
        fault_around=fault_around,
        touches=config.touches,
        write=config.write,
        seed=config.seed + rep,
        timeout=config.run_timeout,
    )
    faults = int(result.get("faults", 0))
    user_ns = int(result.get("h_user_us", 0)) * 1000
    sys_ns = int(result.get("h_sys_us", 0)) * 1000
    cpu_ns = user_ns + sys_ns
    handler = faults and reference_mode in REFERENCE_MODE.values()
    record: Record = {
        "workload": workload,
        "subject": "reference",
        "mode": mode,
        "reference_mode": reference_mode,
        "fault_around": fault_around if reference_mode in REFERENCE_MODE.values() else 0,
        "rep": rep,
        "touches": int(result.get("touches", 0)),
        "faults": faults,
        "elapsed_ns": float(result.get("total_s", 0)) * 1e9,
        "gbps": float(result.get("gbps", 0)),
        "faults_per_s": float(result.get("faults_per_s", 0)),
        "cpu_ns_per_fault": cpu_ns / faults if handler else None,
        "user_ns_per_fault": user_ns / faults if handler else None,
        "sys_ns_per_fault": sys_ns / faults if handler else None,
        "bad_pages": int(result.get("bad", 0)),
        "verified": int(result.get("bad", 0)) == 0,
        "raw": result,
    }
    if workload == "rand":
        for key in ("p50_ns", "p90_ns", "p99_ns", "p999_ns", "mean_ns"):
            record[key] = result.get(key)
    return record


# --- the whole run ---


def run_all(config: Config, say: Callable[[str], None]) -> tuple[list[Record], list[str]]:
    """Every workload and baseline, ``config.repeat`` times; returns the records and notes.

    Each repetition runs the baselines, then one service per fault-around value with every
    mode (rotated from one repetition to the next, so no mode always runs first), each shmfault
    run immediately followed by the reference's run of the same kind.
    """
    records: list[Record] = []

    def keep(record: Record | None) -> None:
        if record is None:
            return
        records.append(record)
        say(describe(record))

    with Workspace(config, say) as ws:
        for rep in range(config.repeat):
            say(f"repetition {rep + 1}/{config.repeat}")
            pages = ws.random_pages(rep)
            if "rand" in config.workloads:
                keep(kernel_rand(ws, rep, pages))
            if "seq" in config.workloads:
                keep(kernel_seq(ws, rep))
                keep(memcpy(ws, rep))
                keep(reference(ws, "seq", "base-shm-minor", 0, rep))
                keep(reference(ws, "seq", "memcpy", 0, rep))
            shift = rep % len(config.modes)
            modes = [*config.modes[shift:], *config.modes[:shift]]
            for fault_around in config.phases:
                started = time.monotonic()
                with ws.service(fault_around, rep) as service, service.client() as client:
                    say(
                        f"service up (--fault-around {fault_around}) in "
                        f"{time.monotonic() - started:.1f} s"
                    )
                    for mode in modes:
                        if "rand" in config.workloads and fault_around in config.rand_fault_around:
                            keep(shmfault_rand(ws, service, client, mode, rep, pages))
                            keep(reference(ws, "rand", mode, fault_around, rep))
                        if "seq" in config.workloads and fault_around in config.seq_fault_around:
                            keep(shmfault_seq(ws, service, client, mode, rep))
                            keep(reference(ws, "seq", mode, fault_around, rep))
                        if (
                            "replay" in config.workloads
                            and fault_around in config.replay_fault_around
                        ):
                            for record in shmfault_replay(
                                ws, service, client, mode, rep, ws.trace_pages(rep)
                            ):
                                keep(record)
            if "file" in config.workloads:
                from benchmarks import filesource  # it imports this module

                filesource.run_repetition(ws, rep, keep, say)
            if any(w in MULTI_WORKLOADS for w in config.workloads):
                from benchmarks import scaling  # it imports this module

                scaling.run_repetition(ws, rep, keep, say)
        notes = list(ws.notes)
    return records, notes


def describe(record: Record) -> str:
    """One progress line for a record."""
    if record["workload"] in MULTI_WORKLOADS:
        from benchmarks import scaling

        return scaling.describe(record)
    head = f"  {record['workload']:4} {record['subject']:9} {record['mode']:17}"
    if record.get("fault_around"):
        head += f" fa={record['fault_around']:<3}"
    else:
        head += " " * 7
    ok = "ok" if record["verified"] else f"BAD PAGES {record['bad_pages']}"
    if record["workload"] == "replay":
        return (
            f"{head} {record['variant']:8} {record['elapsed_ns'] / 1e6:9.1f} ms  "
            f"{record['faults']:7} faults  {record['pages_prefetched']:7} prefetched  {ok}"
        )
    if record["workload"] == "file":
        return (
            f"{head} {record['state']:4} (cached {max(record['cached_before'], 0):4.0%}) "
            f"{record['gbps']:6.2f} GB/s  {ok}"
        )
    if record["workload"] == "rand":
        return (
            f"{head} p50 {record['p50_ns'] / 1000:7.1f} us  p99 {record['p99_ns'] / 1000:7.1f} us"
            f"  {record['faults_per_s']:9.0f} faults/s  {ok}"
        )
    return f"{head} {record['gbps']:6.2f} GB/s  {ok}"

"""``probe()``: what the running kernel and this process can do with userfaultfd, with reasons.

The report answers three questions, in order of depth:

1. Can this process get a userfaultfd at all, by which path, and can it serve kernel-mode faults?
2. Which API features and ioctls does the kernel report, and which register modes does each
   memory type (anonymous, memfd, POSIX shm, hugetlb memfd) accept?
3. Does a real fault round trip work: a page touched by a thread, the fault read, resolved with
   the ioctl under test, the thread run on, and the bytes it sees checked?

Round trips run in forked children under a time limit, so a kernel that never delivers or never
resolves a fault costs the probe its limit, not a hang; the probe itself never raises. It forks:
call it from a single-threaded process (the service probes once at startup, before its threads).
The JSON form (``Capabilities.to_dict()``) is a stable schema documented in docs/probe.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import mmap
import os
import platform
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import posix_ipc

from shmfault import _abi, _libc, modes
from shmfault._abi import Feature, Ioctl, RegisterMode
from shmfault.errors import UffdUnavailableError, errno_of
from shmfault.uffd import (
    PATH_DEVICE,
    PATH_SYSCALL,
    PATH_USER_MODE_ONLY,
    Uffd,
    open_device,
    open_userfaultfd,
    seccomp_mode,
    why_denied,
)

SCHEMA_VERSION = 1

#: open paths as they are named in the JSON report
_PATH_KEYS = {
    PATH_SYSCALL: "syscall",
    PATH_DEVICE: "dev_userfaultfd",
    PATH_USER_MODE_ONLY: "user_mode_only",
}

MEMORY_TYPES = ("anonymous", "memfd", "posix_shm", "hugetlb")
REGISTER_MODES = ("missing", "minor", "wp")
_REGISTER_BITS = {
    "missing": RegisterMode.MISSING,
    "minor": RegisterMode.MINOR,
    "wp": RegisterMode.MISSING | RegisterMode.WP,
}
#: The API features a registration needs, by memory type and register mode.
_FEATURES_NEEDED: dict[tuple[str, str], Feature] = {
    ("anonymous", "missing"): Feature(0),
    ("anonymous", "wp"): Feature.PAGEFAULT_FLAG_WP,
    ("memfd", "missing"): Feature.MISSING_SHMEM,
    ("memfd", "minor"): Feature.MINOR_SHMEM,
    ("memfd", "wp"): Feature.PAGEFAULT_FLAG_WP | Feature.WP_HUGETLBFS_SHMEM | Feature.MISSING_SHMEM,
    ("posix_shm", "missing"): Feature.MISSING_SHMEM,
    ("posix_shm", "minor"): Feature.MINOR_SHMEM,
    ("posix_shm", "wp"): Feature.PAGEFAULT_FLAG_WP
    | Feature.WP_HUGETLBFS_SHMEM
    | Feature.MISSING_SHMEM,
    ("hugetlb", "missing"): Feature.MISSING_HUGETLBFS,
    ("hugetlb", "minor"): Feature.MINOR_HUGETLBFS,
    ("hugetlb", "wp"): Feature.PAGEFAULT_FLAG_WP
    | Feature.WP_HUGETLBFS_SHMEM
    | Feature.MISSING_HUGETLBFS,
}
#: Round trips per memory type: name -> register mode it needs.
_ROUND_TRIPS: dict[str, tuple[tuple[str, str], ...]] = {
    "anonymous": (
        ("missing-copy", "missing"),
        ("missing-zeropage", "missing"),
        ("wp", "wp"),
        ("kernel-fault", "missing"),
    ),
    "memfd": (
        ("missing-copy", "missing"),
        ("missing-zeropage", "missing"),
        ("minor-continue", "minor"),
        ("wp", "wp"),
    ),
    "posix_shm": (("missing-copy", "missing"), ("minor-continue", "minor")),
    "hugetlb": (("missing-copy", "missing"), ("minor-continue", "minor")),
}


@dataclass(slots=True)
class Check:
    """A yes/no answer with the reason behind it (why not, or a detail of the yes)."""

    ok: bool
    reason: str = ""


@dataclass(slots=True)
class RoundTrip:
    """One real fault, resolved and checked."""

    ok: bool
    reason: str = ""
    elapsed_ms: float | None = None


@dataclass(slots=True)
class Registration:
    """UFFDIO_REGISTER of one memory type in one mode."""

    ok: bool
    ioctls: list[str] = field(default_factory=list)
    reason: str = ""


@dataclass(slots=True)
class MemoryReport:
    """What one memory type supports."""

    available: bool
    reason: str = ""
    register: dict[str, Registration] = field(default_factory=dict)
    round_trips: dict[str, RoundTrip] = field(default_factory=dict)


@dataclass(slots=True)
class ModeReport:
    name: str
    available: bool
    reason: str


@dataclass(slots=True)
class Capabilities:
    """The probe's report. ``to_dict()`` is the JSON schema of docs/probe.md."""

    kernel: dict[str, Any]
    process: dict[str, Any]
    access: dict[str, Any]
    api: dict[str, Any]
    memory: dict[str, MemoryReport]
    modes: list[ModeReport]

    @property
    def best_mode(self) -> str:
        """The first available mode of the fallback chain (``eager`` always is)."""
        return next(mode.name for mode in self.modes if mode.available)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able data (docs/probe.md)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "kernel": self.kernel,
            "process": self.process,
            "access": self.access,
            "api": self.api,
            "memory": {name: asdict(report) for name, report in self.memory.items()},
            "modes": {
                "best": self.best_mode,
                "chain": [asdict(mode) for mode in self.modes],
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def lookup(self, name: str) -> Check:
        """Whether a named capability is there. Names: an API feature (``minor_shmem``), an ioctl
        (``continue``), a mode (``shared-continue``), an open path (``syscall``,
        ``dev-userfaultfd``, ``user-mode-only``, ``userfaultfd``), ``kernel-faults``, or a round
        trip (``memfd.minor-continue``). Raises ValueError for a name that is none of these."""
        key = name.strip().lower()
        paths = self.access["paths"]
        simple: dict[str, dict[str, Any]] = {
            "syscall": paths["syscall"],
            "dev-userfaultfd": paths["dev_userfaultfd"],
            "user-mode-only": paths["user_mode_only"],
            "kernel-faults": self.access["kernel_faults"],
            "userfaultfd": self.access["userfaultfd"],
        }
        if key in simple:
            return Check(simple[key]["ok"], simple[key]["reason"])
        for chained in self.modes:
            if key == chained.name:
                return Check(chained.available, chained.reason)
        if "." in key:
            memory, _, trip = key.partition(".")
            report = self.memory.get(memory)
            if report is not None and trip in report.round_trips:
                result = report.round_trips[trip]
                return Check(result.ok, result.reason)
        feature = key.upper().removeprefix("UFFD_FEATURE_")
        if feature in Feature.__members__:
            have = feature.lower() in self.api["features"]
            return Check(have, "" if have else self.api["reason"] or f"kernel lacks {feature}")
        ioctl = key.upper().removeprefix("UFFDIO_")
        if ioctl in Ioctl.__members__:
            have = ioctl.lower() in self.api["ioctls"] or any(
                ioctl.lower() in reg.ioctls
                for report in self.memory.values()
                for reg in report.register.values()
            )
            return Check(have, "" if have else f"no registration offers UFFDIO_{ioctl}")
        raise ValueError(
            f"unknown capability {name!r}: expected a feature, ioctl, mode, open path, "
            "'kernel-faults' or MEMORY.ROUND_TRIP"
        )

    def missing(self, names: list[str]) -> list[tuple[str, str]]:
        """(name, reason) of each named capability that is not there. Raises ValueError."""
        checks = [(name, self.lookup(name)) for name in names]
        return [(name, check.reason or "not available") for name, check in checks if not check.ok]


# --- kernel and process facts ---


def _read(path: str) -> str | None:
    try:
        # Binary, decoded without a codec lookup: works even where imports cannot.
        with open(path, "rb") as handle:
            return handle.read().decode().strip()
    except OSError:
        return None


def _bracketed(value: str | None) -> str | None:
    """The selected word of a sysfs choice list: ``always [madvise] never`` -> ``madvise``."""
    if value is None:
        return None
    for word in value.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return value


def huge_page_pools() -> list[dict[str, int]]:
    """Each huge page size with its total and free pages, from /sys/kernel/mm/hugepages."""
    root = "/sys/kernel/mm/hugepages"
    pools: list[dict[str, int]] = []
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return pools
    for name in names:
        try:
            size_kib = int(name.removeprefix("hugepages-").removesuffix("kB"))
        except ValueError:
            continue
        total = _read(f"{root}/{name}/nr_hugepages")
        free = _read(f"{root}/{name}/free_hugepages")
        pools.append(
            {
                "size": size_kib * 1024,
                "total": int(total) if total and total.isdigit() else 0,
                "free": int(free) if free and free.isdigit() else 0,
            }
        )
    return pools


def _default_huge_page_size() -> int | None:
    meminfo = _read("/proc/meminfo") or ""
    for line in meminfo.splitlines():
        if line.startswith("Hugepagesize:"):
            return int(line.split()[1]) * 1024
    return None


def _kernel_facts() -> dict[str, Any]:
    uname = os.uname()
    thp = "/sys/kernel/mm/transparent_hugepage"
    return {
        "release": uname.release,
        "version": uname.version,
        "machine": platform.machine(),
        "page_size": os.sysconf("SC_PAGE_SIZE"),
        "huge_page_size": _default_huge_page_size(),
        "huge_pages": huge_page_pools(),
        "thp": {
            "enabled": _bracketed(_read(f"{thp}/enabled")),
            "defrag": _bracketed(_read(f"{thp}/defrag")),
            "shmem_enabled": _bracketed(_read(f"{thp}/shmem_enabled")),
        },
    }


_CAP_SYS_PTRACE = 19


def _process_facts() -> dict[str, Any]:
    status = _read("/proc/self/status") or ""
    effective = 0
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split()[1], 16)
    return {
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "cap_sys_ptrace": bool(effective & (1 << _CAP_SYS_PTRACE)),
        "seccomp": {0: "disabled", 1: "strict", 2: "filter"}.get(seccomp_mode(), "unknown"),
    }


def _open_path_check(path: str) -> dict[str, Any]:
    """Whether one open path works, by opening (and closing) a userfaultfd through it alone."""
    try:
        if path == PATH_USER_MODE_ONLY:
            fd, _, _ = open_userfaultfd(user_mode_only=True)
        elif path == PATH_SYSCALL:
            fd = _libc.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK)
        else:
            fd = open_device(os.O_CLOEXEC | os.O_NONBLOCK)
    except UffdUnavailableError as exc:
        attempt = exc.attempts[-1]
        return {"ok": False, "errno": errno.errorcode.get(attempt.errno), "reason": attempt.reason}
    except OSError as exc:
        number = errno_of(exc)
        return {
            "ok": False,
            "errno": errno.errorcode.get(number),
            "reason": why_denied(path, number),
        }
    os.close(fd)
    return {"ok": True, "errno": None, "reason": ""}


def _access_facts() -> dict[str, Any]:
    sysctl = _read("/proc/sys/vm/unprivileged_userfaultfd")
    paths = {
        "syscall": _open_path_check(PATH_SYSCALL),
        "dev_userfaultfd": _open_path_check(PATH_DEVICE),
        "user_mode_only": _open_path_check(PATH_USER_MODE_ONLY),
    }
    full = paths["syscall"]["ok"] or paths["dev_userfaultfd"]["ok"]
    anyway = full or paths["user_mode_only"]["ok"]
    if full:
        kernel_faults = {"ok": True, "reason": ""}
    elif anyway:
        kernel_faults = {
            "ok": False,
            "reason": "only a user-mode-only userfaultfd is allowed here: a kernel-mode access "
            "(a read(2) into unfilled memory) fails with EFAULT instead of being served",
        }
    else:
        kernel_faults = {"ok": False, "reason": "no userfaultfd at all"}
    reasons = [f"{name}: {check['reason']}" for name, check in paths.items() if not check["ok"]]
    return {
        "unprivileged_userfaultfd_sysctl": int(sysctl) if sysctl and sysctl.isdigit() else None,
        "paths": paths,
        "userfaultfd": {"ok": anyway, "reason": "" if anyway else "; ".join(reasons)},
        "kernel_faults": kernel_faults,
    }


def _api_facts() -> dict[str, Any]:
    try:
        fd, path, user_mode_only = open_userfaultfd()
    except UffdUnavailableError as exc:
        return {
            "ok": False,
            "reason": str(exc),
            "path": None,
            "user_mode_only": None,
            "features_mask": 0,
            "features": [],
            "unknown_features": [],
            "ioctls": [],
        }
    try:
        # The handle takes the fd (and closes it); its reply is everything the kernel offers.
        with Uffd.handshake(fd, 0, path=path, user_mode_only=user_mode_only) as handle:
            features, ioctls = int(handle.available_features), int(handle.ioctls)
    except OSError as exc:
        return {
            "ok": False,
            "reason": f"UFFDIO_API failed: {os.strerror(errno_of(exc))}",
            "path": _PATH_KEYS[path],
            "user_mode_only": user_mode_only,
            "features_mask": 0,
            "features": [],
            "unknown_features": [],
            "ioctls": [],
        }
    names = _abi.flag_names(features, Feature)
    return {
        "ok": True,
        "reason": "",
        "path": _PATH_KEYS[path],
        "user_mode_only": user_mode_only,
        "features_mask": features,
        "features": [name.lower() for name in names if not name.startswith("0x")],
        "unknown_features": [int(name, 16) for name in names if name.startswith("0x")],
        "ioctls": [
            name.lower() for name in _abi.flag_names(ioctls, Ioctl) if not name.startswith("0x")
        ],
    }


# --- memory of each type ---


class _Memory:
    """A small mapping of one memory type, with its fd where it has one."""

    def __init__(self, kind: str, pages: int, page_size: int, *, reserve: bool = True) -> None:
        self.kind = kind
        self.page_size = page_size
        self.length = pages * page_size
        self.fd = -1
        flags = _libc.MAP_SHARED
        if kind == "anonymous":
            flags = _libc.MAP_PRIVATE | _libc.MAP_ANONYMOUS
        elif kind == "memfd":
            self.fd = os.memfd_create("shmfault-probe", os.MFD_CLOEXEC)
        elif kind == "hugetlb":
            self.fd = os.memfd_create("shmfault-probe", os.MFD_CLOEXEC | os.MFD_HUGETLB)
            if not reserve:
                # Registration needs no huge page: do not let mmap reserve one.
                flags |= _libc.MAP_NORESERVE
        elif kind == "posix_shm":
            name = f"/shmfault-probe-{os.getpid()}-{time.monotonic_ns()}"
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600)
            shm.unlink()  # nameless from here on: nothing to clean up if we die
            self.fd = os.dup(shm.fd)
            shm.close_fd()
        else:
            raise ValueError(kind)
        try:
            if self.fd >= 0:
                os.ftruncate(self.fd, self.length)
            self.address = _libc.mmap(
                0, self.length, _libc.PROT_READ | _libc.PROT_WRITE, flags, self.fd
            )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if getattr(self, "address", 0):
            _libc.munmap(self.address, self.length)
            self.address = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@contextlib.contextmanager
def _memory(kind: str, pages: int, page_size: int, *, reserve: bool = True) -> Iterator[_Memory]:
    mem = _Memory(kind, pages, page_size, reserve=reserve)
    try:
        yield mem
    finally:
        mem.close()


def _page_size_of(kind: str, kernel: dict[str, Any]) -> int:
    if kind == "hugetlb":
        return int(kernel.get("huge_page_size") or 2 * 1024 * 1024)
    return int(kernel.get("page_size") or mmap.PAGESIZE)


def _registration(kind: str, mode: str, available: Feature, page_size: int) -> Registration:
    if kind == "anonymous" and mode == "minor":
        return Registration(False, reason="minor faults exist only for shmem and hugetlbfs")
    needed = _FEATURES_NEEDED[(kind, mode)]
    lacking = _abi.flag_names(int(needed) & ~int(available), Feature)
    if lacking:
        return Registration(False, reason=f"kernel lacks {', '.join(lacking)}")
    try:
        with Uffd.open(needed) as uffd, _memory(kind, 1, page_size, reserve=False) as mem:
            ioctls = uffd.register(mem.address, mem.length, _REGISTER_BITS[mode])
    except (OSError, ValueError) as exc:
        return Registration(False, reason=str(exc))
    return Registration(True, ioctls=[name.lower() for name in _abi.flag_names(ioctls, Ioctl)])


# --- round trips (each in a forked child) ---


class _Toucher(threading.Thread):
    """Touches registered memory without holding the GIL, so this process can resolve it."""

    def __init__(self, action: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self._action = action
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._action()
        except BaseException as exc:  # reported to the prober, never lost
            self.error = exc


def _await_fault(
    uffd: Uffd, deadline: float, expected_kind: str, address: int, toucher: _Toucher
) -> None:
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no fault was delivered")
        # In slices, so a toucher that failed instead of faulting ends the wait at once.
        if not uffd.wait(min(remaining, 0.05)):
            if not toucher.is_alive():
                toucher.join()
                raise AssertionError(f"the access failed without a fault: {toucher.error}")
            continue
        for event in uffd.read_events():
            kind = getattr(event, "kind", None)
            if kind is None:
                continue
            if kind != expected_kind or event.address != address:  # type: ignore[union-attr]
                raise AssertionError(f"unexpected {event}")
            return


def _round_trip_in_child(kind: str, trip: str, page_size: int, time_limit: float) -> None:
    """Fault one page, resolve it with the ioctl under test, check the bytes. Raises on failure."""
    deadline = time.monotonic() + time_limit
    mode = dict(_ROUND_TRIPS[kind])[trip]
    pattern = os.urandom(page_size)
    source = ctypes.create_string_buffer(pattern, page_size)
    seen = ctypes.create_string_buffer(64)
    with _memory(kind, 2, page_size) as mem, Uffd.open(_FEATURES_NEEDED[(kind, mode)]) as uffd:
        target = mem.address + page_size  # the second page: a wrong-address bug shows up
        expected = pattern
        if trip == "minor-continue":
            # Into the page cache through a second, unregistered view of the same file (the way
            # the service fills it; hugetlbfs has no write(2)): present but unmapped in ``mem``.
            view = _libc.mmap(
                0, mem.length, _libc.PROT_READ | _libc.PROT_WRITE, _libc.MAP_SHARED, mem.fd
            )
            try:
                _libc.copy_memory(view + page_size, ctypes.addressof(source), page_size)
            finally:
                _libc.munmap(view, mem.length)
        uffd.register(mem.address, mem.length, _REGISTER_BITS[mode])
        if trip == "wp":
            uffd.copy(target, ctypes.addressof(source), page_size, wp=True)
            written = ctypes.create_string_buffer(os.urandom(64), 64)
            expected = written.raw + pattern[64:]
            toucher = _Toucher(lambda: _libc.copy_memory(target, ctypes.addressof(written), 64))
        elif trip == "kernel-fault":
            read_end, write_end = os.pipe()
            os.write(write_end, pattern[:64])
            os.close(write_end)
            expected = pattern[:64] + bytes(page_size - 64)

            def kernel_touch() -> None:
                try:
                    if os.readv(read_end, [_libc.memory_view(target, 64)]) != 64:
                        raise AssertionError("short read")
                finally:
                    os.close(read_end)

            toucher = _Toucher(kernel_touch)
        else:
            toucher = _Toucher(lambda: _libc.copy_memory(ctypes.addressof(seen), target, 64))
        toucher.start()
        try:
            expected_kind = {"wp": "wp", "minor-continue": "minor"}.get(trip, "missing")
            _await_fault(uffd, deadline, expected_kind, target, toucher)
            if trip in ("missing-copy",):
                uffd.copy(target, ctypes.addressof(source), page_size)
            elif trip == "kernel-fault":
                # The pipe's bytes land after the fault resolves: map a zero page first.
                uffd.zeropage(target, page_size)
            elif trip == "missing-zeropage":
                uffd.zeropage(target, page_size)
                expected = bytes(page_size)
            elif trip == "minor-continue":
                uffd.continue_(target, page_size)
            elif trip == "wp":
                uffd.writeprotect(target, page_size, protect=False)
            toucher.join(max(0.0, deadline - time.monotonic()))
        finally:
            if toucher.is_alive():
                uffd.close()  # wakes the toucher: it then faults without userfaultfd
                toucher.join(1.0)
                raise TimeoutError("the faulting thread was not woken by the resolving ioctl")
        if toucher.error is not None:
            raise toucher.error
        actual = bytes(_libc.memory_view(target, page_size))
        if actual != expected:
            raise AssertionError("the page does not hold the bytes it was resolved with")
        if trip not in ("wp", "kernel-fault") and seen.raw[:64] != expected[:64]:
            raise AssertionError("the faulting thread saw other bytes than were filled")


def _run_forked(work: Callable[[], None], time_limit: float) -> RoundTrip:
    """Run ``work`` in a forked child; kill it after ``time_limit`` + slack."""
    read_end, write_end = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 0
        try:
            os.close(read_end)
            work()
            message = b"ok"
        except BaseException as exc:
            message = f"{type(exc).__name__}: {exc}".encode(errors="replace")
            code = 1
        try:
            os.write(write_end, message[:4000])
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], time_limit + 1.0)
        output = os.read(read_end, 4096) if ready else b""
    finally:
        os.close(read_end)
    elapsed = (time.monotonic() - started) * 1000
    if not ready:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return RoundTrip(False, f"timed out after {time_limit:g}s: the kernel hung the fault")
    _, status = os.waitpid(pid, 0)
    if output == b"ok" and os.waitstatus_to_exitcode(status) == 0:
        return RoundTrip(True, "", round(elapsed, 2))
    if not output:
        output = f"child died: wait status {status:#x}".encode()
    return RoundTrip(False, output.decode(errors="replace"), round(elapsed, 2))


def _memory_report(
    kind: str, kernel: dict[str, Any], api: dict[str, Any], round_trips: bool, timeout: float
) -> MemoryReport:
    page_size = _page_size_of(kind, kernel)
    report = MemoryReport(True)
    if kind == "hugetlb":
        pool = next((p for p in kernel.get("huge_pages", []) if p["size"] == page_size), None)
        if pool is None:
            return MemoryReport(False, "the kernel has no hugetlbfs page pool")
        if pool["free"] < 2:
            report.reason = (
                f"{pool['free']} free {page_size // 1024} KiB huge pages (round trips need 2: "
                "reserve them with sysctl vm.nr_hugepages)"
            )
    available = Feature(api["features_mask"])
    for mode in REGISTER_MODES:
        if not api["ok"]:
            report.register[mode] = Registration(False, reason=api["reason"])
        else:
            report.register[mode] = _registration(kind, mode, available, page_size)
    for trip, mode in _ROUND_TRIPS[kind]:
        registration = report.register[mode]
        if not registration.ok:
            report.round_trips[trip] = RoundTrip(
                False, f"cannot register {mode}: {registration.reason}"
            )
        elif not round_trips:
            report.round_trips[trip] = RoundTrip(False, "not run (--no-round-trips)")
        elif report.reason:
            report.round_trips[trip] = RoundTrip(False, report.reason)
        else:
            report.round_trips[trip] = _run_forked(
                functools.partial(_round_trip_in_child, kind, trip, page_size, timeout), timeout
            )
    return report


def _modes(memory: dict[str, MemoryReport]) -> list[ModeReport]:
    chain: list[ModeReport] = []
    for mode in modes.CHAIN:
        proof = modes.PROOF[mode]
        if proof is None:
            chain.append(ModeReport(mode.wire_name, True, "needs no userfaultfd"))
            continue
        kind, trip, _register_mode = proof
        result = memory[kind].round_trips[trip]
        reason = "" if result.ok else f"{kind} {trip} round trip failed: {result.reason}"
        chain.append(ModeReport(mode.wire_name, result.ok, reason))
    return chain


def _guarded(section: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return compute()
    except Exception as exc:  # the probe reports; it never crashes
        return {"ok": False, "reason": f"probing {section} failed: {type(exc).__name__}: {exc}"}


def probe(round_trips: bool = True, timeout: float = 5.0) -> Capabilities:
    """Probe the running kernel and this process. Never raises, never hangs.

    Blocks for the round trips: a few milliseconds each normally, at most ``timeout`` (+1 s)
    each when the kernel misbehaves. Forks one child per round trip.
    """
    kernel = _guarded("the kernel", _kernel_facts)
    process = _guarded("the process", _process_facts)
    access = _guarded("userfaultfd access", _access_facts)
    api = _guarded("UFFDIO_API", _api_facts)
    api.setdefault("features_mask", 0)
    api.setdefault("features", [])
    api.setdefault("ioctls", [])
    memory: dict[str, MemoryReport] = {}
    for kind in MEMORY_TYPES:
        try:
            memory[kind] = _memory_report(kind, kernel, api, round_trips, timeout)
        except Exception as exc:
            reason = f"probing {kind} failed: {type(exc).__name__}: {exc}"
            memory[kind] = MemoryReport(
                False,
                reason,
                register={mode: Registration(False, reason=reason) for mode in REGISTER_MODES},
                round_trips={trip: RoundTrip(False, reason) for trip, _ in _ROUND_TRIPS[kind]},
            )
    return Capabilities(kernel, process, access, api, memory, _modes(memory))


# --- the human table ---


def _mark(ok: bool) -> str:
    return "yes" if ok else "NO "


def format_table(report: Capabilities) -> str:
    """The report as an aligned plain-text table for people."""
    k = report.kernel
    lines = [
        f"kernel        {k.get('release')} {k.get('machine')}, page {k.get('page_size')} bytes",
    ]
    for pool in k.get("huge_pages", []):
        lines.append(
            f"huge pages    {pool['size'] // 1024} KiB: {pool['free']} free of {pool['total']}"
        )
    thp = k.get("thp", {})
    lines.append(f"THP           enabled={thp.get('enabled')} shmem={thp.get('shmem_enabled')}")
    p = report.process
    lines.append(
        f"process       uid={p.get('uid')} cap_sys_ptrace={p.get('cap_sys_ptrace')} "
        f"seccomp={p.get('seccomp')}"
    )
    a = report.access
    lines.append(
        f"sysctl        vm.unprivileged_userfaultfd={a.get('unprivileged_userfaultfd_sysctl')}"
    )
    lines.append("")
    lines.append("access")
    for name, check in a.get("paths", {}).items():
        lines.append(f"  {_mark(check['ok'])} {name:<18} {check['reason']}")
    kf = a.get("kernel_faults", {"ok": False, "reason": ""})
    lines.append(f"  {_mark(kf['ok'])} {'kernel-faults':<18} {kf['reason']}")
    api = report.api
    lines.append("")
    if api.get("ok"):
        lines.append(f"API features  {api['features_mask']:#x}: {' '.join(api['features'])}")
        if api.get("unknown_features"):
            lines.append(f"  unknown bits: {' '.join(hex(b) for b in api['unknown_features'])}")
        lines.append(f"API ioctls    {' '.join(api['ioctls'])}")
    else:
        lines.append(f"API           unavailable: {api.get('reason')}")
    lines.append("")
    lines.append("memory        register (ioctls)                        round trips")
    for kind, mem in report.memory.items():
        lines.append(f"  {kind}{'' if mem.available else ': ' + mem.reason}")
        for mode, reg in mem.register.items():
            detail = ",".join(reg.ioctls) if reg.ok else reg.reason
            lines.append(f"    {_mark(reg.ok)} {mode:<8} {detail}")
        for trip, result in mem.round_trips.items():
            timing = f"{result.elapsed_ms:.1f} ms" if result.elapsed_ms is not None else ""
            lines.append(
                f"    {_mark(result.ok)} {trip:<17} {timing if result.ok else result.reason}"
            )
    lines.append("")
    lines.append(f"best mode     {report.best_mode}")
    for chained in report.modes:
        lines.append(f"  {_mark(chained.available)} {chained.name:<16} {chained.reason}")
    return "\n".join(lines) + "\n"

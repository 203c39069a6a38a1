"""The service under test: ``python -m shmfault serve`` as a subprocess in a private runtime and
state directory, started per configuration and always stopped (also on errors and Ctrl-C)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

from shmfault.client import Client

REPO = Path(__file__).resolve().parents[1]
_CLOCK_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")

#: Every process the benchmarks started and have not reaped yet; ``reap_all`` kills them.
_LIVE: list[subprocess.Popen[bytes]] = []
#: What to undo (temporary files) when the run has to end abruptly.
_CLEANUPS: list[Callable[[], None]] = []


def on_abort(cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` if the watchdog has to end the process."""
    _CLEANUPS.append(cleanup)


def _run_cleanups() -> None:
    while _CLEANUPS:
        with contextlib.suppress(Exception):
            _CLEANUPS.pop()()


def reap_all() -> None:
    """Kill and reap every child the benchmarks started that is still running."""
    while _LIVE:
        process = _LIVE.pop()
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)


def track(process: subprocess.Popen[bytes]) -> None:
    _LIVE.append(process)


def untrack(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ValueError):
        _LIVE.remove(process)


def process_cpu_ns(pid: int) -> tuple[int, int]:
    """(utime, stime) of every thread of ``pid`` from /proc/PID/stat, in ns (clock-tick
    grain)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        text = stat.read()
    fields = text[text.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15.
    return int(fields[11]) * _CLOCK_TICK_NS, int(fields[12]) * _CLOCK_TICK_NS


def process_oncpu_ns(pid: int) -> int:
    """Time on CPU of every thread of ``pid`` in ns, from /proc/PID/task/*/schedstat
    (nanosecond grain; threads that ended meanwhile are missing). 0 where unavailable."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for task in tasks:
        with (
            contextlib.suppress(OSError, ValueError, IndexError),
            open(f"/proc/{pid}/task/{task}/schedstat", "rb") as schedstat,
        ):
            total += int(schedstat.read().split()[0])
    return total


class Service:
    """One ``shmfault serve`` process. Use as a context manager."""

    def __init__(
        self,
        directory: Path,
        *,
        fault_around: int,
        extra_args: list[str] | None = None,
        launcher: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self.fault_around = fault_around
        self.extra_args = extra_args or []
        #: what runs the service module instead of ``python -m shmfault`` (profiling)
        self.launcher = launcher or [sys.executable, "-m", "shmfault"]
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "service.log"

    @property
    def socket(self) -> Path:
        return self.directory / "run" / "shmfault.sock"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        return [
            *self.launcher,
            "serve",
            "--runtime-dir",
            str(self.directory / "run"),
            "--state-dir",
            str(self.directory / "state"),
            "--no-probe-round-trips",
            "--shm-prefix",
            f"sfbench{os.getpid()}",
            "--grace",
            "1",
            "--fault-around",
            str(self.fault_around),
            # Fixed blocks, as every table's "fa N" says; growth is measured by passing
            # --service-arg=--fault-around-max --service-arg=M, which comes later and wins.
            "--fault-around-max",
            "0",
            *self.extra_args,
        ]

    def start(self, timeout: float = 60.0) -> None:
        """Start and wait until it serves. Raises RuntimeError with the log if it does not."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env=self.env,
                # Our Ctrl-C must not reach it directly: we stop it ourselves, in order.
                start_new_session=True,
            )
        track(self.process)
        deadline = time.monotonic() + timeout
        while True:
            text = self.log.read_text(errors="replace")
            if "event=serving" in text or '"event": "serving"' in text:
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the service did not start; its log:\n{text}")
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; reaps the process. Idempotent."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        untrack(process)

    def client(self) -> Client:
        return Client(self.socket)

    def cpu_ns(self) -> tuple[int, int, int]:
        """(utime, stime) from /proc/PID/stat and the on-CPU time from schedstat, in ns."""
        user, system = process_cpu_ns(self.pid)
        return user, system, process_oncpu_ns(self.pid)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def watchdog(service: Service, seconds: float, what: str) -> Iterator[None]:
    """Guard a stretch that touches attached memory: a touch of an unfilled page blocks in the
    kernel until the service answers, so if the service dies or the stretch takes longer than
    ``seconds``, report it, kill every child and exit the whole process (code 3)."""
    done = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + seconds
        while not done.wait(0.2):
            if not service.alive() or time.monotonic() > deadline:
                reason = "the service exited" if not service.alive() else f"over {seconds:.0f} s"
                try:
                    tail = service.log.read_text(errors="replace").splitlines()[-20:]
                except OSError:
                    tail = []
                print(
                    f"benchmarks: {what}: {reason}. Stopping. The service's last log lines:",
                    *tail,
                    sep="\n",
                    file=sys.stderr,
                    flush=True,
                )
                reap_all()
                _run_cleanups()
                os._exit(3)

    thread = threading.Thread(target=watch, name="watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()

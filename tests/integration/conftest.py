"""The real service as a subprocess (``python -m shmfault serve``) with real sockets."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shmfault.client import Client

ROOT = Path(__file__).resolve().parents[2]
#: Every service process a test started, so none outlives its test even when the test fails.
_SPAWNED: list[subprocess.Popen[bytes]] = []


@dataclass
class Service:
    """One service process and the paths it uses. Restartable."""

    base: Path
    shm_prefix: str
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def runtime_dir(self) -> Path:
        return self.base / "run"

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    @property
    def socket(self) -> Path:
        return self.runtime_dir / "shmfault.sock"

    @property
    def log(self) -> Path:
        return self.base / f"service-{self.starts}.log"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "shmfault",
            "serve",
            "--runtime-dir",
            str(self.runtime_dir),
            "--state-dir",
            str(self.state_dir),
            "--shm-prefix",
            self.shm_prefix,
            "--no-probe-round-trips",
            "--grace",
            "5",
            *self.extra_args,
        ]

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it to serve."""
        self.starts += 1
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT
            )
        _SPAWNED.append(self.process)
        return self.process

    def start(self) -> None:
        """Start and wait until the log says it serves (or fail with the log if it exits)."""
        process = self.spawn()
        # Bounded by the test's timeout, not by a clock here.
        while not any(m in self.log.read_text() for m in ("event=serving", '"event": "serving"')):
            if process.poll() is not None:
                pytest.fail(f"service exited with {process.returncode}:\n{self.log.read_text()}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the process and wait for it; returns its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait()
        self.process = None
        return code

    def restart(self) -> None:
        assert self.stop() == 0
        self.start()

    def client(self) -> Client:
        return Client(self.socket)

    def logs(self) -> str:
        return "".join(
            (self.base / f"service-{n}.log").read_text() for n in range(1, self.starts + 1)
        )


@pytest.fixture(autouse=True)
def _no_service_survives() -> Iterator[None]:
    yield
    while _SPAWNED:
        process = _SPAWNED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def service_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Short paths: a unix socket address holds at most 107 bytes.
    return Path(tmp_path_factory.mktemp("svc", numbered=True))


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory other uids may traverse, for a service they connect to (the pytest
    directories are private to root)."""
    base = Path(tempfile.mkdtemp(prefix="shmfault-open-", dir="/tmp"))
    os.chmod(base, 0o711)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def service(service_dir: Path, shm_prefix: str) -> Iterator[Service]:
    running = Service(service_dir, shm_prefix)
    running.start()
    yield running
    if running.process is not None:
        running.process.kill()
        running.process.wait()


@pytest.fixture
def client(service: Service) -> Iterator[Client]:
    with service.client() as connected:
        yield connected


def cli(
    *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> tuple[int, bytes, str]:
    """Run ``python -m shmfault ARGS``; returns (exit code, stdout bytes, stderr text)."""
    done = subprocess.run(
        [sys.executable, "-m", "shmfault", *args],
        input=stdin,
        capture_output=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    return done.returncode, done.stdout, done.stderr.decode()

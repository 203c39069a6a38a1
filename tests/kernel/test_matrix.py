"""The kernel matrix's cases: the probe's verdict, one attach per mode, and each fallback.

They run on the running kernel as part of the suite, and inside a VM per kernel under
``scripts/kernel_matrix.py``, which reads their results by test id into docs/kernels.md: keep the
ids (``test_probe_verdict``, ``test_attach_mode[MODE]``, ``test_fallback[CASE]``) stable.

Nothing here assumes a feature: what each test expects is worked out from what the kernel offers,
and a mode the probe says cannot work here is skipped with the probe's reason.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shmfault import Source
from shmfault._abi import Feature
from shmfault.attach import attach
from shmfault.errors import UffdFeatureError
from shmfault.modes import CHAIN, Mode, kernel_support
from shmfault.uffd import Uffd
from tests import worlds
from tests.integration.conftest import Service

# Generous: inside an emulated VM everything is several times slower than on the host.
pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

PAGE = os.sysconf("SC_PAGE_SIZE")
PAGES = 32
ROOT = Path(__file__).resolve().parents[2]


def _offered() -> Feature:
    try:
        with Uffd.open() as handle:
            return handle.available_features
    except OSError as exc:
        pytest.skip(f"no userfaultfd on this machine: {exc}")


def _unprivileged_sysctl() -> int | None:
    try:
        return int(Path("/proc/sys/vm/unprivileged_userfaultfd").read_text())
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "shmfault", "probe", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    """One service for the module, reachable by ``nobody`` too (its group owns the sockets)."""
    if os.geteuid() != 0:
        pytest.skip("the matrix starts the service as root")
    base = Path(tempfile.mkdtemp(prefix="shmfault-km-", dir="/tmp"))
    base.chmod(0o711)  # nobody may pass through to the group-owned runtime directory
    extra: list[str] = []
    with contextlib.suppress(KeyError):
        extra = ["--group", grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name]
    running = Service(base, f"shmfault-km-{secrets.token_hex(4)}", extra_args=extra)
    try:
        running.start()
        yield running
    finally:
        if running.process is not None:
            running.process.kill()
            running.process.wait()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def source(service: Service) -> tuple[Path, bytes]:
    """A file of random pages, readable by the service."""
    data = os.urandom(PAGES * PAGE)
    path = service.base / "source.bin"
    path.write_bytes(data)
    return path, data


@pytest.fixture(scope="module")
def support(service: Service) -> dict[Mode, str]:
    with service.client() as client:
        return kernel_support(client.capabilities())


# --- the probe ---


def test_probe_verdict(report: dict[str, Any]) -> None:
    """The report matches what UFFDIO_API says, and every mode of the chain works or says why."""
    offered = _offered()
    api = report["api"]
    assert api["ok"], api["reason"]
    assert api["features_mask"] == int(offered)
    assert sorted(api["features"]) == sorted(f.name.lower() for f in Feature if f & offered)
    chain = report["modes"]["chain"]
    assert [m["name"] for m in chain] == [m.wire_name for m in CHAIN]
    for mode in chain:
        assert mode["available"] or mode["reason"], mode
    assert report["modes"]["best"] == next(m["name"] for m in chain if m["available"])
    # A register mode whose feature is missing is refused by name, without asking the kernel.
    if not offered & Feature.MINOR_SHMEM:
        minor = report["memory"]["memfd"]["register"]["minor"]
        assert not minor["ok"] and "MINOR_SHMEM" in minor["reason"]


def test_missing_features_are_refused_by_name(report: dict[str, Any]) -> None:
    """Every feature this shmfault knows and the kernel lacks: asking for it fails naming it, and
    ``probe --require`` says it is missing. (Nothing to check where the kernel has them all.)"""
    offered = _offered()
    lacking = [f for f in Feature if not f & offered]
    if not lacking:
        pytest.skip("this kernel offers every feature shmfault knows")
    for feature in lacking:
        with pytest.raises(UffdFeatureError) as raised:
            Uffd.open(feature)
        assert raised.value.missing == [feature.name], feature
    names = [f.name.lower() for f in lacking]
    done = subprocess.run(
        [sys.executable, "-m", "shmfault", "probe", "--no-round-trips", "--require", *names],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 1, done.stderr
    for name in names:
        assert name in done.stderr


# --- one attach per mode ---


@pytest.mark.parametrize("mode", [mode.wire_name for mode in CHAIN])
def test_attach_mode(
    service: Service, support: dict[Mode, str], source: tuple[Path, bytes], mode: str
) -> None:
    """Force ``mode``; every page of the attachment holds the file's bytes."""
    why = support[Mode.from_name(mode)]
    if why:
        pytest.skip(f"the probe says {mode} cannot work on this kernel: {why}")
    path, data = source
    with service.client() as client:
        region = client.create_region(len(data), source=Source.of_file(path))
        try:
            with client.attach(region, mode=mode) as attachment:
                assert attachment.mode is Mode.from_name(mode)
                assert bytes(attachment.buffer) == data  # every first touch is a fault
        finally:
            client.delete_region(region.id, force=True)


# --- the fallbacks: the same client in the worlds where it gets less ---


def _attach_and_read(handoff: str, region_id: str, token: str, digest: str) -> dict[str, Any]:
    """In the child: attach, read everything, say what it got."""
    with attach(handoff, region_id, token) as attachment:
        seen = hashlib.sha256(bytes(attachment.buffer)).hexdigest()
        return {
            "mode": attachment.mode.wire_name,
            "reasons": attachment.reasons,
            "user_mode_only": attachment.user_mode_only,
            "bytes_ok": seen == digest,
        }


FALLBACKS = {
    # user=..., deny_userfaultfd=..., deny_dev_userfaultfd=...
    "nobody": {"user": "nobody"},
    "seccomp-syscall": {"deny_userfaultfd": True},
    "seccomp-all": {"deny_userfaultfd": True, "deny_dev_userfaultfd": True},
}


def _expected(case: str, support: dict[Mode, str]) -> tuple[str, bool | None]:
    """(mode, user_mode_only) the client should end up with in ``case`` on this kernel."""
    lazy_head = next(m.wire_name for m in CHAIN if not support[m])
    if case == "seccomp-all":
        return "eager", False
    if case == "seccomp-syscall":
        # /dev/userfaultfd (6.1+) is the way round a filter on the syscall; without it the
        # user-mode-only path is the same syscall, also denied.
        if os.path.exists("/dev/userfaultfd"):
            return lazy_head, False
        return "eager", False
    # nobody: the full syscall only with vm.unprivileged_userfaultfd=1; the device only when its
    # mode lets others open it; else the user-mode-only path (5.11+), which serves every lazy mode.
    device_open = os.path.exists("/dev/userfaultfd") and bool(
        os.stat("/dev/userfaultfd").st_mode & 0o006
    )
    full = _unprivileged_sysctl() == 1 or device_open
    return lazy_head, None if full else True


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_fallback(
    service: Service, support: dict[Mode, str], source: tuple[Path, bytes], case: str
) -> None:
    path, data = source
    digest = hashlib.sha256(data).hexdigest()
    with service.client() as client:
        region = client.create_region(len(data), source=Source.of_file(path))
        try:
            region_id, token, handoff = client.issue_attach_token(region.id)
            got = worlds.run_in_child(
                _attach_and_read, handoff, region_id, token, digest, timeout=240, **FALLBACKS[case]
            )
        finally:
            client.delete_region(region.id, force=True)
    mode, user_mode_only = _expected(case, support)
    assert got["bytes_ok"], got
    assert got["mode"] == mode, got
    if user_mode_only is not None:
        assert got["user_mode_only"] is user_mode_only, got
    if mode == "eager":
        assert "no userfaultfd" in got["reasons"], got

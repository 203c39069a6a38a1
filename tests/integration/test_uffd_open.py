"""The three ways of opening a userfaultfd, for real: as root, as nobody, and behind seccomp
filters that deny the syscall, the /dev/userfaultfd ioctl, or both.

The worlds other than plain root are forked children (tests.worlds): whatever runs there must
only use modules this file has already imported, since a child that became nobody cannot import
(the interpreter lives under /root).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
import time
from typing import Any

import pytest

from shmfault import _libc
from shmfault._abi import UFFD_USER_MODE_ONLY, Feature, RegisterMode
from shmfault.errors import OpenAttempt, UffdError, UffdUnavailableError
from shmfault.uffd import (
    PATH_DEVICE,
    PATH_SYSCALL,
    PATH_USER_MODE_ONLY,
    Uffd,
    open_device,
    open_userfaultfd,
    seccomp_mode,
)
from tests import worlds

PAGE = os.sysconf("SC_PAGE_SIZE")
TIMEOUT = 20
UFFD_LINK = "anon_inode:[userfaultfd]"
FLAGS = os.O_CLOEXEC | os.O_NONBLOCK


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (to open every path, and to become nobody)")


def _need_device() -> None:
    if not os.path.exists(PATH_DEVICE):
        pytest.skip(f"no {PATH_DEVICE} on this machine (kernel before 5.11, or no node)")


def _need_seccomp() -> None:
    reason = worlds.seccomp_unavailable()
    if reason is not None:
        pytest.skip(reason)


def _need_unprivileged_denied() -> None:
    with open("/proc/sys/vm/unprivileged_userfaultfd", "rb") as sysctl:
        if int(sysctl.read()) != 0:
            pytest.skip("vm.unprivileged_userfaultfd=1 lets nobody use the full syscall")


def _need_device_closed_to_others() -> None:
    _need_device()
    if os.stat(PATH_DEVICE).st_mode & (stat.S_IROTH | stat.S_IWOTH):
        pytest.skip(f"{PATH_DEVICE} is open to every user here")


def _is_uffd(fd: int) -> bool:
    return os.readlink(f"/proc/self/fd/{fd}") == UFFD_LINK


def _opened() -> dict[str, Any]:
    """Open by the default chain; what came out, and from which world."""
    with Uffd.open() as uffd:
        return {
            "path": uffd.path,
            "user_mode_only": uffd.user_mode_only,
            "seccomp": seccomp_mode(),
            "uid": os.getuid(),
        }


def _attempts(**options: Any) -> list[OpenAttempt]:
    """The attempts of an open that must fail."""
    try:
        Uffd.open(**options).close()
    except UffdUnavailableError as error:
        return error.attempts
    raise AssertionError(f"Uffd.open({options}) succeeded")


def _kernel_then_user_access(page: int, user_mode_only: bool | None = None) -> dict[str, Any]:
    """A kernel-mode write (readv from a pipe) into an unfilled registered page, then a
    user-mode read of another, served from this thread."""
    outcome: dict[str, Any] = {}
    with Uffd.open(user_mode_only=user_mode_only) as uffd:
        outcome["user_mode_only"] = uffd.user_mode_only
        prot = _libc.PROT_READ | _libc.PROT_WRITE
        address = _libc.mmap(0, 2 * page, prot, _libc.MAP_PRIVATE | _libc.MAP_ANONYMOUS)
        uffd.register(address, 2 * page, RegisterMode.MISSING)
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)  # so what is left in the pipe can be read without waiting
        os.write(write_end, b"kernel")
        results: dict[str, Any] = {}

        def kernel_access() -> None:
            try:
                results["readv"] = os.readv(read_end, [_libc.memory_view(address, page)])
            except OSError as exc:
                results["readv"] = exc.errno

        kernel = threading.Thread(target=kernel_access)
        kernel.start()
        # Either the fault is reported (and the thread sleeps until it is resolved) or the
        # syscall fails and the thread ends: wait for whichever comes first.
        deadline = time.monotonic() + 5
        reported = False
        while kernel.is_alive() and time.monotonic() < deadline and not reported:
            reported = uffd.wait(0.01)
        outcome["kernel_fault_reported"] = reported or uffd.wait(0)
        if outcome["kernel_fault_reported"]:
            uffd.read_events()
            uffd.zeropage(address, page)
        kernel.join(5)
        outcome["readv"] = results.get("readv")
        try:
            outcome["pipe_still_holds"] = os.read(read_end, 16)
        except BlockingIOError:
            outcome["pipe_still_holds"] = b""

        buffer = ctypes.create_string_buffer(8)

        def user_access() -> None:
            _libc.copy_memory(ctypes.addressof(buffer), address + page, 8)

        user = threading.Thread(target=user_access)
        user.start()
        outcome["user_fault_reported"] = uffd.wait(5)
        outcome["user_events"] = uffd.read_events()
        source = ctypes.create_string_buffer(b"U" * page, page)
        uffd.copy(address + page, ctypes.addressof(source), page)
        user.join(5)
        outcome["user_read"] = buffer.raw
        os.close(read_end)
        os.close(write_end)
        _libc.munmap(address, 2 * page)
    return outcome


# --- root, no filter ---


def test_root_opens_by_the_syscall() -> None:
    _need_root()
    opened = _opened()
    assert opened["path"] == PATH_SYSCALL
    assert opened["user_mode_only"] is False


def test_root_can_open_every_path_directly() -> None:
    _need_root()
    _need_device()
    fds: list[int] = []
    try:
        fds.append(_libc.userfaultfd(FLAGS))
        fds.append(open_device(FLAGS))
        fds.append(_libc.userfaultfd(FLAGS | UFFD_USER_MODE_ONLY))
        assert [_is_uffd(fd) for fd in fds] == [True, True, True]
    finally:
        for fd in fds:
            os.close(fd)


def test_user_mode_only_on_request() -> None:
    with Uffd.open(user_mode_only=True) as uffd:
        assert uffd.path == PATH_USER_MODE_ONLY
        assert uffd.user_mode_only is True


def test_full_power_on_request_as_root() -> None:
    _need_root()
    with Uffd.open(user_mode_only=False) as uffd:
        assert uffd.path == PATH_SYSCALL
        assert uffd.user_mode_only is False


def test_raw_open_reports_path_and_mode() -> None:
    fd, path, user_mode_only = open_userfaultfd(user_mode_only=True, nonblocking=False)
    try:
        assert (path, user_mode_only) == (PATH_USER_MODE_ONLY, True)
        assert _is_uffd(fd)
        assert os.get_blocking(fd)
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)


def test_raw_open_is_nonblocking_by_default() -> None:
    fd, _path, _user_mode_only = open_userfaultfd()
    try:
        assert not os.get_blocking(fd)
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)


@pytest.mark.timeout(TIMEOUT)
def test_user_mode_only_drops_kernel_faults_even_for_root() -> None:
    _need_root()
    outcome = _kernel_then_user_access(PAGE, user_mode_only=True)
    assert outcome["user_mode_only"] is True
    assert outcome["kernel_fault_reported"] is False
    assert outcome["readv"] == errno.EFAULT
    assert outcome["user_read"] == b"U" * 8


@pytest.mark.timeout(TIMEOUT)
def test_full_power_uffd_serves_kernel_mode_faults_as_root() -> None:
    _need_root()
    outcome = _kernel_then_user_access(PAGE, user_mode_only=False)
    assert outcome["kernel_fault_reported"] is True
    assert outcome["readv"] == len(b"kernel")
    assert outcome["pipe_still_holds"] == b""


# --- seccomp ---


@pytest.mark.timeout(TIMEOUT)
def test_syscall_denied_by_seccomp_falls_back_to_the_device() -> None:
    _need_root()
    _need_device()
    _need_seccomp()
    opened = worlds.run_in_child(_opened, deny_userfaultfd=True)
    assert opened["seccomp"] == 2
    assert opened["path"] == PATH_DEVICE
    assert opened["user_mode_only"] is False


@pytest.mark.timeout(TIMEOUT)
def test_device_uffd_serves_kernel_mode_faults() -> None:
    _need_root()
    _need_device()
    _need_seccomp()
    outcome = worlds.run_in_child(_kernel_then_user_access, PAGE, deny_userfaultfd=True)
    assert outcome["user_mode_only"] is False
    assert outcome["kernel_fault_reported"] is True
    assert outcome["readv"] == len(b"kernel")
    assert outcome["user_read"] == b"U" * 8


@pytest.mark.timeout(TIMEOUT)
def test_syscall_denied_by_seccomp_leaves_no_user_mode_only_path() -> None:
    _need_seccomp()
    attempts = worlds.run_in_child(lambda: _attempts(user_mode_only=True), deny_userfaultfd=True)
    assert [(a.path, a.errno) for a in attempts] == [(PATH_USER_MODE_ONLY, errno.EPERM)]
    assert "seccomp" in attempts[0].reason


@pytest.mark.timeout(TIMEOUT)
def test_device_ioctl_denied_by_seccomp_leaves_the_syscall() -> None:
    _need_root()
    _need_device()
    _need_seccomp()

    def device_then_default() -> tuple[int, dict[str, Any]]:
        try:
            os.close(open_device(FLAGS))
        except OSError as exc:
            return exc.errno or 0, _opened()
        return 0, _opened()

    device_errno, opened = worlds.run_in_child(device_then_default, deny_dev_userfaultfd=True)
    assert device_errno == errno.EPERM
    assert opened["path"] == PATH_SYSCALL


@pytest.mark.timeout(TIMEOUT)
def test_no_userfaultfd_at_all_lists_every_attempt_and_blames_seccomp() -> None:
    _need_root()
    _need_seccomp()
    with pytest.raises(UffdUnavailableError) as raised:
        # The exception itself crosses back from the child, pickled.
        worlds.run_in_child(Uffd.open, deny_userfaultfd=True, deny_dev_userfaultfd=True)
    attempts = raised.value.attempts
    expected_paths = [PATH_SYSCALL, PATH_USER_MODE_ONLY]
    if os.path.exists(PATH_DEVICE):
        expected_paths.insert(1, PATH_DEVICE)
    assert [a.path for a in attempts] == expected_paths
    assert all(a.errno == errno.EPERM for a in attempts), attempts
    for attempt in attempts:
        assert "seccomp" in attempt.reason, attempt
    assert raised.value.errno == errno.EPERM
    for path in expected_paths:
        assert path in str(raised.value)


@pytest.mark.timeout(TIMEOUT)
def test_full_power_denied_everywhere_is_unavailable_not_user_mode_only() -> None:
    _need_root()
    _need_seccomp()
    attempts = worlds.run_in_child(
        lambda: _attempts(user_mode_only=False), deny_userfaultfd=True, deny_dev_userfaultfd=True
    )
    assert PATH_USER_MODE_ONLY not in [a.path for a in attempts]
    assert attempts[0].path == PATH_SYSCALL


# --- nobody ---


@pytest.mark.timeout(TIMEOUT)
def test_nobody_falls_through_to_user_mode_only() -> None:
    _need_root()
    _need_unprivileged_denied()
    opened = worlds.run_in_child(_opened, user="nobody")
    assert opened["uid"] != 0
    assert opened["path"] == PATH_USER_MODE_ONLY
    assert opened["user_mode_only"] is True


@pytest.mark.timeout(TIMEOUT)
def test_nobody_asking_for_full_power_gets_every_refusal() -> None:
    _need_root()
    _need_unprivileged_denied()
    _need_device_closed_to_others()
    attempts = worlds.run_in_child(lambda: _attempts(user_mode_only=False), user="nobody")
    assert [(a.path, a.errno) for a in attempts] == [
        (PATH_SYSCALL, errno.EPERM),
        (PATH_DEVICE, errno.EACCES),
    ]
    assert "unprivileged_userfaultfd" in attempts[0].reason
    assert "file mode" in attempts[1].reason
    assert "seccomp" not in attempts[0].reason


@pytest.mark.timeout(TIMEOUT)
def test_nobody_user_mode_only_uffd_serves_user_faults_but_not_kernel_ones() -> None:
    _need_root()
    _need_unprivileged_denied()
    outcome = worlds.run_in_child(_kernel_then_user_access, PAGE, user="nobody")
    assert outcome["user_mode_only"] is True
    # The kernel-mode access is not reported: the syscall fails, and consumes nothing.
    assert outcome["kernel_fault_reported"] is False
    assert outcome["readv"] == errno.EFAULT
    assert outcome["pipe_still_holds"] == b"kernel"
    assert outcome["user_fault_reported"] is True
    assert len(outcome["user_events"]) == 1
    assert outcome["user_read"] == b"U" * 8


@pytest.mark.timeout(TIMEOUT)
def test_nobody_cannot_enable_event_fork() -> None:
    _need_root()

    def fork_feature() -> int:
        try:
            Uffd.open(Feature.EVENT_FORK).close()
        except UffdError as exc:
            return exc.errno
        return 0

    # The kernel offers EVENT_FORK but only to CAP_SYS_PTRACE: EPERM, not a missing feature.
    assert worlds.run_in_child(fork_feature, user="nobody") == errno.EPERM

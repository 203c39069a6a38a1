"""Run a function in another "world": a forked child that may be another user, or behind a
seccomp filter that denies userfaultfd the way container runtimes' default profiles do.

The child is a fork of the test process, never an exec: the interpreter lives under /root, which
an unprivileged user cannot enter, so a child that dropped to ``nobody`` cannot start Python nor
import a module that is not imported yet. Everything the child needs is imported here, in the
parent, before the fork.
"""

from __future__ import annotations

import errno
import faulthandler
import os
import pickle
import pwd
import select
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from shmfault._abi import USERFAULTFD_IOC_NEW

try:
    import pyseccomp
except (ImportError, OSError, RuntimeError) as exc:  # pyseccomp raises RuntimeError without lib
    pyseccomp = None
    _SECCOMP_IMPORT_ERROR = f"pyseccomp cannot be loaded ({exc})"
else:
    _SECCOMP_IMPORT_ERROR = ""

T = TypeVar("T")

#: the ioctl request is an unsigned int to the kernel, which ignores the upper half of the
#: register: compare only the low 32 bits, or garbage there would slip past the filter.
_LOW_32_BITS = 0xFFFFFFFF


class ChildDiedError(RuntimeError):
    """The child ended without handing back a result (killed by a signal, or exited early)."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.signal = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        if self.signal is not None:
            how = f"was killed by {signal.Signals(self.signal).name}"
        else:
            how = f"exited with status {os.waitstatus_to_exitcode(status)}"
        super().__init__(f"the child process {how} without handing back a result")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.status,))


def seccomp_unavailable() -> str | None:
    """Why a seccomp filter cannot be installed here, or None when it can."""
    if pyseccomp is None:
        return _SECCOMP_IMPORT_ERROR
    try:
        with open("/proc/self/status", "rb") as status:
            if b"\nSeccomp:" not in status.read():
                return "the kernel was built without CONFIG_SECCOMP"
    except OSError as exc:
        return f"cannot read /proc/self/status: {exc.strerror}"
    try:
        number = pyseccomp.resolve_syscall(pyseccomp.system_arch(), "userfaultfd")
    except (OSError, RuntimeError, ValueError) as exc:
        return f"libseccomp cannot resolve the userfaultfd syscall ({exc})"
    if number < 0:
        return "libseccomp does not know the userfaultfd syscall on this architecture"
    return None


def _install_seccomp(deny_userfaultfd: bool, deny_dev_userfaultfd: bool) -> None:
    assert pyseccomp is not None
    rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    if deny_userfaultfd:
        rules.add_rule(pyseccomp.ERRNO(errno.EPERM), "userfaultfd")
    if deny_dev_userfaultfd:
        rules.add_rule(
            pyseccomp.ERRNO(errno.EPERM),
            "ioctl",
            pyseccomp.Arg(1, pyseccomp.MASKED_EQ, _LOW_32_BITS, USERFAULTFD_IOC_NEW),
        )
    rules.load()


def _child(
    write_fd: int,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    account: pwd.struct_passwd | None,
    deny_userfaultfd: bool,
    deny_dev_userfaultfd: bool,
) -> None:
    """The child's whole life: it never returns, so pytest's own machinery never runs twice."""
    code = 0
    try:
        # A child meant to die by a signal (SIGBUS from a poisoned page) must not dump a
        # traceback of the parent's faulthandler into the test output.
        faulthandler.disable()
        try:
            if deny_userfaultfd or deny_dev_userfaultfd:
                _install_seccomp(deny_userfaultfd, deny_dev_userfaultfd)
            if account is not None:
                os.setgroups([])
                os.setgid(account.pw_gid)
                os.setuid(account.pw_uid)
            payload = pickle.dumps(("ok", func(*args), ""))
        except BaseException as exc:
            text = "".join(traceback.format_exception(exc))
            try:
                payload = pickle.dumps(("raised", exc, text))
            except Exception:
                payload = pickle.dumps(("raised", RuntimeError(text), text))
        view = memoryview(payload)
        while view:
            view = view[os.write(write_fd, view) :]
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def _reap(pid: int, deadline: float) -> int:
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.01)


def run_in_child(
    func: Callable[..., T],
    *args: Any,
    user: str | None = None,
    deny_userfaultfd: bool = False,
    deny_dev_userfaultfd: bool = False,
    timeout: float = 30,
) -> T:
    """``func(*args)`` in a forked child; returns its value or re-raises its exception here.

    ``user``: drop to that account (groups, gid, uid) before calling. ``deny_userfaultfd``: a
    seccomp filter makes the userfaultfd syscall fail with EPERM. ``deny_dev_userfaultfd``: the
    same filter makes ``ioctl(fd, USERFAULTFD_IOC_NEW)`` fail with EPERM; with both nothing can
    get a userfaultfd, even root. The calling test is skipped, with the reason, when the seccomp
    filter or the user is not available here. The value and any exception must be picklable.
    Raises TimeoutError (after killing the child) past ``timeout`` seconds, and
    :class:`ChildDiedError` when the child dies without answering.
    """
    if deny_userfaultfd or deny_dev_userfaultfd:
        reason = seccomp_unavailable()
        if reason is not None:
            pytest.skip(reason)
    account = None
    if user is not None:
        try:
            account = pwd.getpwnam(user)
        except KeyError:
            pytest.skip(f"no user {user!r} on this machine")
        if os.geteuid() != 0:
            pytest.skip(f"becoming {user!r} needs root")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(write_fd, func, args, account, deny_userfaultfd, deny_dev_userfaultfd)
    os.close(write_fd)
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([read_fd], [], [], remaining)[0]:
                raise TimeoutError(f"the child process did not answer within {timeout} s")
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    except BaseException:
        # Also on pytest-timeout's interruption: never leave a child running behind a test.
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(read_fd)
    status = _reap(pid, time.monotonic() + 5)
    if not chunks:
        raise ChildDiedError(status)
    kind, value, text = pickle.loads(b"".join(chunks))
    if kind == "raised":
        assert isinstance(value, BaseException)
        value.add_note(f"raised in the child process:\n{text}")
        raise value
    return value

"""``Uffd``: a typed handle on a userfaultfd, one method per ioctl.

Opening tries every way the kernel offers of getting a userfaultfd, in this order:

1. ``userfaultfd(2)`` without ``UFFD_USER_MODE_ONLY``. Cheapest, needs no filesystem, and can
   serve faults taken inside the kernel (a ``read(2)`` into registered memory). Allowed to root,
   to holders of ``CAP_SYS_PTRACE``, and to everyone when ``vm.unprivileged_userfaultfd=1``.
2. ``/dev/userfaultfd`` with ``USERFAULTFD_IOC_NEW`` (5.11+). Same power as 1, but governed by the
   device node's file mode instead of the sysctl: how an administrator grants userfaultfd to a
   group. Also the way round a seccomp filter that denies only the syscall.
3. ``userfaultfd(2)`` with ``UFFD_USER_MODE_ONLY`` (5.11+). Allowed to every user, but a fault
   taken in kernel mode is not reported: the syscall that touched the page fails with EFAULT.

A path that is denied falls through to the next; when none works the error lists every attempt
and why it failed. ``user_mode_only=True`` restricts opening to path 3, ``False`` to paths 1-2.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
from types import TracebackType
from typing import Self

from shmfault import _abi, _libc
from shmfault._abi import (
    ContinueMode,
    CopyMode,
    Feature,
    Ioctl,
    MoveMode,
    PoisonMode,
    RegisterMode,
    WriteprotectMode,
    ZeropageMode,
)
from shmfault.errors import (
    OpenAttempt,
    ShmfaultError,
    UffdError,
    UffdFeatureError,
    UffdUnavailableError,
    errno_of,
    uffd_error,
)
from shmfault.events import Event, parse_events

DEV_USERFAULTFD = "/dev/userfaultfd"
PATH_SYSCALL = "userfaultfd(2)"
PATH_DEVICE = "/dev/userfaultfd"
PATH_USER_MODE_ONLY = "userfaultfd(2, UFFD_USER_MODE_ONLY)"

#: the bit the kernel sets in ctx->features once UFFDIO_API has run (fs/userfaultfd.c)
_FEATURE_INITIALIZED = 1 << 31


def seccomp_mode() -> int:
    """This process's seccomp mode from /proc/self/status: 0 none, 1 strict, 2 filter."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status.read().decode().splitlines():
                if line.startswith("Seccomp:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def why_denied(path: str, err: int) -> str:
    filtered = seccomp_mode() == 2
    if err == errno.EACCES and path == PATH_DEVICE:
        return "the device node's file mode does not let this user open it"
    if err == errno.EPERM and path == PATH_DEVICE:
        # EPERM never comes from the file mode (that is EACCES): a device cgroup refuses the
        # open, or a filter refuses the USERFAULTFD_IOC_NEW ioctl on the opened node.
        return "a device cgroup or security module denies the device" + (
            ", or the seccomp filter installed here denies its USERFAULTFD_IOC_NEW ioctl"
            if filtered
            else ""
        )
    if err == errno.EPERM:
        reason = (
            "vm.unprivileged_userfaultfd=0 and the process lacks CAP_SYS_PTRACE"
            if path == PATH_SYSCALL
            else "the kernel refused (it may predate UFFD_USER_MODE_ONLY, 5.11)"
        )
        return reason + (", or the seccomp filter installed here denies it" if filtered else "")
    if err == errno.ENOSYS:
        return "kernel built without CONFIG_USERFAULTFD" + (
            ", or the seccomp filter installed here denies the syscall" if filtered else ""
        )
    if err == errno.ENOENT:
        return "no /dev/userfaultfd (kernel before 5.11, or the node was not created)"
    if err == errno.EINVAL and path == PATH_USER_MODE_ONLY:
        return "kernel predates UFFD_USER_MODE_ONLY (5.11)"
    if err in (errno.EMFILE, errno.ENFILE):
        return "out of file descriptors"
    return os.strerror(err)


def open_device(flags: int) -> int:
    device = os.open(DEV_USERFAULTFD, os.O_RDWR | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(device, _abi.USERFAULTFD_IOC_NEW, flags)
    finally:
        os.close(device)


def open_userfaultfd(
    *, user_mode_only: bool | None = None, nonblocking: bool = True
) -> tuple[int, str, bool]:
    """A raw userfaultfd by the first path that works (see the module docstring).

    Returns ``(fd, path, user_mode_only)``; the fd is close-on-exec and its UFFDIO_API
    handshake has not run. Never blocks. Raises :class:`UffdUnavailableError`.
    """
    flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
    attempts: list[OpenAttempt] = []
    if user_mode_only is not True:
        try:
            return _libc.userfaultfd(flags), PATH_SYSCALL, False
        except OSError as exc:
            attempts.append(
                OpenAttempt(PATH_SYSCALL, errno_of(exc), why_denied(PATH_SYSCALL, errno_of(exc)))
            )
        try:
            return open_device(flags), PATH_DEVICE, False
        except OSError as exc:
            attempts.append(
                OpenAttempt(PATH_DEVICE, errno_of(exc), why_denied(PATH_DEVICE, errno_of(exc)))
            )
    if user_mode_only is not False:
        try:
            return _libc.userfaultfd(flags | _abi.UFFD_USER_MODE_ONLY), PATH_USER_MODE_ONLY, True
        except OSError as exc:
            attempts.append(
                OpenAttempt(
                    PATH_USER_MODE_ONLY,
                    errno_of(exc),
                    why_denied(PATH_USER_MODE_ONLY, errno_of(exc)),
                )
            )
    raise UffdUnavailableError(attempts)


def available_features() -> tuple[Feature, Ioctl]:
    """The API features and ioctls this kernel offers, from a throwaway userfaultfd.

    Raises :class:`UffdUnavailableError` when no userfaultfd can be had.
    """
    fd, _path, _umo = open_userfaultfd()
    try:
        _api, features, ioctls = _api_handshake(fd, 0)
    finally:
        os.close(fd)
    return Feature(features), Ioctl(ioctls)


def _api_handshake(fd: int, features: int) -> tuple[int, int, int]:
    buffer = bytearray(_abi.UFFDIO_API_STRUCT.pack(_abi.UFFD_API, features, 0))
    try:
        fcntl.ioctl(fd, _abi.UFFDIO_API, buffer, True)
    except OSError as exc:
        raise uffd_error(errno_of(exc), "UFFDIO_API", detail=f"features {features:#x}") from None
    api, reported, ioctls = _abi.UFFDIO_API_STRUCT.unpack(buffer)
    return api, reported, ioctls


class NotAUserfaultfdError(ShmfaultError, ValueError):
    """A file descriptor offered as a userfaultfd is something else."""


class Uffd:
    """An open userfaultfd whose UFFDIO_API handshake has run.

    Owns its file descriptor: closing the handle (or leaving its ``with`` block) closes it, which
    unregisters every range and wakes every thread still blocked on one of its faults (they then
    fault normally, without userfaultfd). Methods are thread-safe in the sense that the kernel
    serializes them; none blocks except :meth:`read_events` on a blocking handle and :meth:`wait`.

    Every ioctl method raises :class:`~shmfault.errors.UffdError` (an ``OSError``) naming the
    operation, address and length; the subclasses for EEXIST, EAGAIN and ESRCH/ENOSPC tell the
    caller what to do next.
    """

    def __init__(
        self,
        fd: int,
        *,
        features: int,
        available_features: int,
        ioctls: int,
        path: str,
        user_mode_only: bool,
    ) -> None:
        self._fd = fd
        self.features = Feature(features)
        self.available_features = Feature(available_features)
        self.ioctls = Ioctl(ioctls)
        self.path = path
        self.user_mode_only = user_mode_only
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self._nonblocking = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)
        #: read with preadv2(RWF_NOWAIT) first (see :meth:`read_into`); False once refused
        self._nowait_reads = self._nonblocking

    @classmethod
    def open(
        cls,
        features: Feature | int = 0,
        *,
        user_mode_only: bool | None = None,
        nonblocking: bool = True,
    ) -> Self:
        """Open a userfaultfd and run the UFFDIO_API handshake enabling ``features``.

        ``user_mode_only``: None tries every path, True only the user-mode-only syscall, False
        only paths that can serve kernel-mode faults. Never blocks. Raises
        :class:`UffdUnavailableError` when no path works and :class:`UffdFeatureError`, naming
        the missing features, when the kernel lacks one asked for.
        """
        fd, path, umo = open_userfaultfd(user_mode_only=user_mode_only, nonblocking=nonblocking)
        return cls.handshake(fd, features, path=path, user_mode_only=umo)

    @classmethod
    def handshake(
        cls, fd: int, features: Feature | int, *, path: str, user_mode_only: bool
    ) -> Self:
        """Run the UFFDIO_API handshake on a raw fd from :func:`open_userfaultfd` and take
        ownership of it (closed on failure). For a client that must open its userfaultfd before
        it knows which features to ask for. Raises like :meth:`open`."""
        try:
            try:
                _api, available, ioctls = _api_handshake(fd, int(features))
            except UffdError as exc:
                if exc.errno != errno.EINVAL or not features:
                    raise
                # The kernel zeroes the reply on refusal: ask a fresh handle what it offers.
                offered, _ioctls = available_features()
                missing = _abi.flag_names(int(features) & ~int(offered), Feature)
                if not missing:
                    raise
                raise UffdFeatureError(missing, int(offered)) from None
        except BaseException:
            os.close(fd)
            raise
        return cls(
            fd,
            features=int(features),
            available_features=available,
            ioctls=ioctls,
            path=path,
            user_mode_only=user_mode_only,
        )

    @classmethod
    def adopt(cls, fd: int) -> Self:
        """Take ownership of a userfaultfd made elsewhere (received over a socket, inherited).

        Its handshake must already have run; the enabled features are read from
        ``/proc/self/fdinfo``. Raises :class:`NotAUserfaultfdError` (``fd`` is left open: the
        caller still owns it) when ``fd`` is not a userfaultfd or its handshake has not run.
        Whether it was opened user-mode-only cannot be read back and is reported as False.
        """
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as exc:
            raise NotAUserfaultfdError(f"fd {fd}: {exc.strerror}") from None
        if target != "anon_inode:[userfaultfd]":
            raise NotAUserfaultfdError(f"fd {fd} is {target!r}, not a userfaultfd")
        features = _fdinfo_features(fd)
        if features is None or not features & _FEATURE_INITIALIZED:
            raise NotAUserfaultfdError(f"fd {fd}: its UFFDIO_API handshake has not run")
        enabled = features & ~_FEATURE_INITIALIZED
        range_ioctls = (
            Ioctl.WAKE
            | Ioctl.COPY
            | Ioctl.ZEROPAGE
            | Ioctl.WRITEPROTECT
            | Ioctl.CONTINUE
            | Ioctl.POISON
            | Ioctl.MOVE
        )
        return cls(
            fd,
            features=enabled,
            available_features=enabled,
            ioctls=Ioctl.REGISTER | Ioctl.UNREGISTER | Ioctl.API | range_ioctls,
            path="adopted",
            user_mode_only=False,
        )

    # --- the file descriptor ---

    def fileno(self) -> int:
        """The file descriptor. Raises ValueError once closed."""
        if self._fd < 0:
            raise ValueError("userfaultfd handle is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the fd (idempotent). Threads blocked on its faults are woken."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A leaked handle would keep faults of a dead region alive: close it all the same.
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<Uffd {state} via {self.path} features={int(self.features):#x}>"

    # --- events ---

    def wait(self, timeout: float | None) -> bool:
        """Block up to ``timeout`` seconds (None: forever) until an event is readable."""
        millis = None if timeout is None else max(0, int(timeout * 1000))
        return bool(self._poller.poll(millis))

    def read_events(self, max_events: int = 64) -> list[Event]:
        """Read up to ``max_events`` queued events with one read.

        A handle opened non-blocking (the default) returns [] when no event is queued, whatever
        another holder of the same file does to O_NONBLOCK (see :meth:`read_into`). A blocking
        handle waits for one. A signal interrupts a read that waits (InterruptedError), never
        restarts it: a read that blocks can be ended from another thread. Raises
        :class:`~shmfault.errors.EventDecodeError` for a record it cannot decode (carrying the
        others) and :class:`UffdError` for a failed read.
        """
        buffer = bytearray(max_events * _abi.UFFD_MSG_SIZE)
        count = self.read_into(buffer)
        return parse_events(memoryview(buffer)[:count]) if count else []

    def read_into(self, buffer: bytearray) -> int:
        """Read as many whole queued ``uffd_msg`` records as fit into ``buffer`` with one read;
        returns the bytes read (0: none queued, on a non-blocking handle). The caller decodes
        them (:func:`~shmfault.events.parse_events`); reusing one buffer saves an allocation
        per read. Raises like :meth:`read_events`.

        O_NONBLOCK belongs to the open file, which a client shares with the service and can
        clear. A non-blocking handle therefore reads with ``preadv2(RWF_NOWAIT)`` first, which
        never waits whatever the file's flags say (userfaultfd has ``read_iter`` since 6.8;
        before, the kernel refuses the flag and the handle stops asking). Only when that finds
        nothing (or is refused) does it fall back to one guarded read: O_NONBLOCK is set again
        if it was cleared, then a plain read(2). So a read with events queued costs one system
        call, and a read can only block if the client clears O_NONBLOCK *and* reads its own
        events between the flag check and the read (FaultEngine's stall guard covers that).
        """
        fd = self.fileno()
        try:
            if self._nowait_reads:
                try:
                    return os.preadv(fd, [buffer], -1, os.RWF_NOWAIT)
                except BlockingIOError:
                    pass  # nothing queued, or a kernel that says so wrongly: ask once more below
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ESPIPE):
                        raise
                    self._nowait_reads = False  # no read_iter on this kernel's userfaultfd
            if self._nonblocking:
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                if not flags & os.O_NONBLOCK:
                    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
            return _libc.read_once(fd, buffer)
        except BlockingIOError:
            return 0
        except InterruptedError:
            raise  # a signal sent to interrupt a read that blocked (FaultEngine's stall guard)
        except OSError as exc:
            raise uffd_error(errno_of(exc), "read") from None

    # --- ioctls ---

    def _ioctl(
        self,
        name: str,
        request: int,
        layout: struct.Struct,
        target: tuple[int, int],
        *fields: int,
        arg: bytearray | None = None,
    ) -> bytearray:
        """Run one ioctl; ``target`` is the (address, length) an error should name. ``arg``:
        a buffer of at least ``layout.size`` bytes to pack the argument into (a fresh one when
        None); the kernel's answer is read from its first ``layout.size`` bytes."""
        buffer = bytearray(layout.size) if arg is None else arg
        layout.pack_into(buffer, 0, *fields)
        try:
            fcntl.ioctl(self.fileno(), request, buffer, True)
        except OSError as exc:
            # Fill ioctls end in a signed result field: bytes done, or a negative errno.
            done = layout.unpack_from(buffer)[-1] if layout.format.endswith("q") else 0
            raise uffd_error(errno_of(exc), name, *target, done=max(done, 0)) from None
        return buffer

    def register(self, address: int, length: int, mode: RegisterMode | int) -> Ioctl:
        """UFFDIO_REGISTER [address, address+length) in ``mode`` (MISSING, WP, MINOR, or a
        combination). Returns the ioctls the kernel allows on that range."""
        buffer = self._ioctl(
            "UFFDIO_REGISTER",
            _abi.UFFDIO_REGISTER,
            _abi.UFFDIO_REGISTER_STRUCT,
            (address, length),
            address,
            length,
            int(mode),
            0,
        )
        return Ioctl(_abi.UFFDIO_REGISTER_STRUCT.unpack(buffer)[3])

    def unregister(self, address: int, length: int) -> None:
        """UFFDIO_UNREGISTER the range. Threads blocked on it are woken."""
        self._ioctl(
            "UFFDIO_UNREGISTER",
            _abi.UFFDIO_UNREGISTER,
            _abi.UFFDIO_RANGE,
            (address, length),
            address,
            length,
        )

    def copy(
        self,
        destination: int,
        source: int,
        length: int,
        *,
        dontwake: bool = False,
        wp: bool = False,
        arg: bytearray | None = None,
    ) -> int:
        """UFFDIO_COPY ``length`` bytes from address ``source`` (this process) to the registered
        ``destination``; wakes the faulting threads unless ``dontwake``. Returns bytes copied
        (``length``: the kernel reports a partial copy as EAGAIN).

        EEXIST (:class:`~shmfault.errors.UffdPageExistsError`): the first page is already there
        and the faulting thread still sleeps. EAGAIN (:class:`~shmfault.errors.UffdRetryError`)
        with ``done`` > 0: a partial copy, the first ``done`` bytes are in place and woken, and
        the page after them stopped it (it exists, or the range changed).

        ``arg``: a buffer of at least ``UFFDIO_COPY_STRUCT.size`` bytes that the caller reuses
        for every call from one thread (the same for :meth:`zeropage`, :meth:`continue_` and
        :meth:`wake`), which saves an allocation per call; None allocates one.
        """
        mode = (CopyMode.DONTWAKE if dontwake else 0) | (CopyMode.WP if wp else 0)
        self._ioctl(
            "UFFDIO_COPY",
            _abi.UFFDIO_COPY,
            _abi.UFFDIO_COPY_STRUCT,
            (destination, length),
            destination,
            source,
            length,
            mode,
            0,
            arg=arg,
        )
        # Success means every byte: the kernel reports a short copy as EAGAIN with ``done``.
        return length

    def zeropage(
        self, address: int, length: int, *, dontwake: bool = False, arg: bytearray | None = None
    ) -> int:
        """UFFDIO_ZEROPAGE: map zero pages over the range. Returns bytes zeroed (``length``;
        errors as :meth:`copy`, ``arg`` too)."""
        mode = ZeropageMode.DONTWAKE if dontwake else 0
        self._ioctl(
            "UFFDIO_ZEROPAGE",
            _abi.UFFDIO_ZEROPAGE,
            _abi.UFFDIO_ZEROPAGE_STRUCT,
            (address, length),
            address,
            length,
            mode,
            0,
            arg=arg,
        )
        return length

    def continue_(
        self,
        address: int,
        length: int,
        *,
        dontwake: bool = False,
        wp: bool = False,
        arg: bytearray | None = None,
    ) -> int:
        """UFFDIO_CONTINUE: map the page-cache pages already present over a MINOR range.
        Returns bytes mapped (``length``; errors as :meth:`copy`, ``arg`` too)."""
        mode = (ContinueMode.DONTWAKE if dontwake else 0) | (ContinueMode.WP if wp else 0)
        self._ioctl(
            "UFFDIO_CONTINUE",
            _abi.UFFDIO_CONTINUE,
            _abi.UFFDIO_CONTINUE_STRUCT,
            (address, length),
            address,
            length,
            mode,
            0,
            arg=arg,
        )
        return length

    def wake(self, address: int, length: int, *, arg: bytearray | None = None) -> None:
        """UFFDIO_WAKE the threads blocked on the range without filling anything (``arg`` as
        for :meth:`copy`)."""
        self._ioctl(
            "UFFDIO_WAKE",
            _abi.UFFDIO_WAKE,
            _abi.UFFDIO_RANGE,
            (address, length),
            address,
            length,
            arg=arg,
        )

    def writeprotect(
        self, address: int, length: int, *, protect: bool, dontwake: bool = False
    ) -> None:
        """UFFDIO_WRITEPROTECT: set (``protect``) or clear write protection on a WP range.
        Clearing wakes the blocked writers unless ``dontwake``."""
        mode = (WriteprotectMode.WP if protect else 0) | (
            WriteprotectMode.DONTWAKE if dontwake else 0
        )
        self._ioctl(
            "UFFDIO_WRITEPROTECT",
            _abi.UFFDIO_WRITEPROTECT,
            _abi.UFFDIO_WRITEPROTECT_STRUCT,
            (address, length),
            address,
            length,
            mode,
        )

    def _require(self, feature: Feature, operation: str, address: int, length: int) -> None:
        if not self.features & feature:
            raise UffdError(
                errno.EOPNOTSUPP,
                operation,
                address,
                length,
                detail=f"the handle was opened without Feature.{feature.name}",
            )

    def poison(self, address: int, length: int, *, dontwake: bool = False) -> int:
        """UFFDIO_POISON (6.6+, Feature.POISON): later touches of the range raise SIGBUS.
        Returns bytes poisoned."""
        self._require(Feature.POISON, "UFFDIO_POISON", address, length)
        mode = PoisonMode.DONTWAKE if dontwake else 0
        buffer = self._ioctl(
            "UFFDIO_POISON",
            _abi.UFFDIO_POISON,
            _abi.UFFDIO_POISON_STRUCT,
            (address, length),
            address,
            length,
            mode,
            0,
        )
        return int(_abi.UFFDIO_POISON_STRUCT.unpack(buffer)[3])

    def move(
        self,
        destination: int,
        source: int,
        length: int,
        *,
        dontwake: bool = False,
        allow_source_holes: bool = False,
    ) -> int:
        """UFFDIO_MOVE (6.8+, Feature.MOVE): move anonymous pages from ``source`` (registered in
        this handle's mm) to ``destination`` without copying. Returns bytes moved."""
        self._require(Feature.MOVE, "UFFDIO_MOVE", destination, length)
        mode = (MoveMode.DONTWAKE if dontwake else 0) | (
            MoveMode.ALLOW_SRC_HOLES if allow_source_holes else 0
        )
        buffer = self._ioctl(
            "UFFDIO_MOVE",
            _abi.UFFDIO_MOVE,
            _abi.UFFDIO_MOVE_STRUCT,
            (destination, length),
            destination,
            source,
            length,
            mode,
            0,
        )
        return int(_abi.UFFDIO_MOVE_STRUCT.unpack(buffer)[4])


def _fdinfo_features(fd: int) -> int | None:
    """The features in the ``API:\taa:<features>:<ioctls>`` line of a userfaultfd's fdinfo."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as info:
            for line in info.read().decode().splitlines():
                if line.startswith("API:"):
                    return int(line.split()[1].split(":")[1], 16)
    except (OSError, ValueError, IndexError):
        return None
    return None

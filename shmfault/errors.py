"""The exception tree. Everything shmfault raises on purpose derives from :class:`ShmfaultError`.

Kernel failures are :class:`UffdError`, which is also an :class:`OSError` carrying the errno, so
code that already handles ``OSError`` keeps working. Each names the operation that failed and the
address range it was applied to.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Iterable
from dataclasses import dataclass


class ShmfaultError(Exception):
    """Root of every error shmfault raises on purpose."""


class UffdError(ShmfaultError, OSError):
    """A userfaultfd operation failed in the kernel.

    ``operation`` is the ioctl or call (``"UFFDIO_COPY"``), ``address``/``length`` the range it
    was applied to (0 where the call has none), ``done`` the bytes the kernel completed before
    failing (partial COPY/ZEROPAGE/CONTINUE/MOVE/POISON), ``errno`` the kernel's error number.
    """

    def __init__(
        self,
        errno: int,
        operation: str,
        address: int = 0,
        length: int = 0,
        done: int = 0,
        detail: str = "",
    ) -> None:
        self.operation = operation
        self.address = address
        self.length = length
        self.done = done
        self.detail = detail
        where = f" at {address:#x}+{length:#x}" if length else ""
        partial = f" after {done} bytes" if done else ""
        extra = f": {detail}" if detail else ""
        message = f"{operation}{where} failed{partial}: {os.strerror(errno)}{extra}"
        super().__init__(errno, message)

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[object, ...]:
        return (
            type(self),
            (self.errno, self.operation, self.address, self.length, self.done, self.detail),
        )


class UffdPageExistsError(UffdError):
    """EEXIST: the page is already present. The faulting thread is still asleep: WAKE it."""


class UffdRetryError(UffdError):
    """EAGAIN: the mapping changed under the operation (a pending REMOVE/UNMAP/REMAP event, or
    a partial fill whose bytes done are in ``done``). Drain the events, then retry the rest."""


class UffdProcessGoneError(UffdError):
    """ESRCH (the faulting mm is exiting) or ENOSPC (5.6+: the mm is gone): nothing to serve."""


_ERRNO_CLASSES: dict[int, type[UffdError]] = {
    _errno.EEXIST: UffdPageExistsError,
    _errno.EAGAIN: UffdRetryError,
    _errno.ESRCH: UffdProcessGoneError,
    _errno.ENOSPC: UffdProcessGoneError,
}


def uffd_error(
    errno: int, operation: str, address: int = 0, length: int = 0, done: int = 0, detail: str = ""
) -> UffdError:
    """The most specific :class:`UffdError` subclass for ``errno``."""
    cls = _ERRNO_CLASSES.get(errno, UffdError)
    return cls(errno, operation, address, length, done, detail)


@dataclass(frozen=True, slots=True)
class OpenAttempt:
    """One way of getting a userfaultfd that was tried, and why it failed."""

    path: str
    errno: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {_errno.errorcode.get(self.errno, self.errno)} ({self.reason})"


class UffdUnavailableError(UffdError):
    """No way of getting a userfaultfd worked. ``attempts`` says what was tried, in order."""

    def __init__(self, attempts: list[OpenAttempt]) -> None:
        self.attempts = list(attempts)
        last = attempts[-1].errno if attempts else _errno.ENOSYS
        tried = "; ".join(str(a) for a in attempts) or "no path was allowed by the options given"
        super().__init__(last, "open userfaultfd", detail=f"tried {tried}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.attempts,))


class UffdFeatureError(UffdError):
    """UFFDIO_API refused: the kernel does not offer every feature asked for."""

    def __init__(self, missing: list[str], available: int) -> None:
        self.missing = list(missing)
        self.available = available
        super().__init__(
            _errno.EINVAL,
            "UFFDIO_API",
            detail=f"kernel lacks {', '.join(missing)} (it offers {available:#x})",
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.missing, self.available))


class EventDecodeError(ShmfaultError):
    """Bytes read from a userfaultfd do not decode as ``uffd_msg`` records.

    ``events`` holds every record of the batch that did decode, so the caller loses nothing
    it could have acted on.
    """

    def __init__(self, message: str, events: list[object]) -> None:
        super().__init__(message)
        self.events = events

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.events))


class RecordingFormatError(ShmfaultError, ValueError):
    """A working-set recording (``docs/recording.md``) is malformed, or recordings that must share
    a geometry do not; the message names the field or entry at fault."""


def errno_of(exc: OSError) -> int:
    """The errno of an OSError raised by a system call (EIO for the rare one built without)."""
    return exc.errno if exc.errno is not None else _errno.EIO


class RequestError(ShmfaultError):
    """A request to the region service was refused or failed; the message names the value at
    fault, ``field`` the argument that carried it (``"size"``, ``"source.file.path"``; empty
    when no single argument is to blame).

    The service maps each subclass to one gRPC status code (``shmfault.service``); the client
    library maps the status back to the same class, so callers catch these on both sides.
    """

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.field))


class InvalidArgumentError(RequestError, ValueError):
    """An argument is malformed or out of range (INVALID_ARGUMENT)."""


class RegionNotFoundError(RequestError, LookupError):
    """No region has that id or name (NOT_FOUND)."""


class RecordingNotFoundError(RequestError, LookupError):
    """No working-set recording has that id (NOT_FOUND)."""


class EndpointNotFoundError(RequestError, LookupError):
    """No Firecracker endpoint has that id (NOT_FOUND)."""


class AlreadyExistsError(RequestError):
    """The name is taken by another region, or the path by another file (ALREADY_EXISTS)."""


class QuotaExceededError(RequestError):
    """A configured limit would be exceeded; nothing was allocated (RESOURCE_EXHAUSTED)."""


class HugePagesUnavailableError(QuotaExceededError):
    """Not enough free huge pages for a hugetlb region (RESOURCE_EXHAUSTED)."""


class RegionBusyError(RequestError):
    """The region is in use: attached, or the source of another region (FAILED_PRECONDITION)."""


class SourceUnavailableError(RequestError):
    """A region's source can no longer provide its bytes, e.g. the file shrank
    (FAILED_PRECONDITION)."""


class PermissionDeniedError(RequestError):
    """The service may not do that for this caller, e.g. read a file outside the allowed source
    directories (PERMISSION_DENIED)."""


class UnauthenticatedError(PermissionDeniedError):
    """The call carried no credential where the service requires one, or one the service did
    not issue or has revoked (UNAUTHENTICATED)."""


class ServiceUnavailableError(RequestError):
    """The service cannot be reached, or cannot provide that now (UNAVAILABLE)."""


class ServiceInternalError(RequestError):
    """The service failed in a way no other class describes (INTERNAL, UNKNOWN, ...)."""


class ProtocolError(ShmfaultError):
    """The handoff protocol (``docs/protocol.md``) was broken, by this side or by the peer."""


class LocalProtocolError(ProtocolError):
    """This process misused the handoff protocol: a value that cannot be encoded, or a message or
    call that is not allowed in the connection's state. A bug in the caller; nothing was sent and
    the connection's state did not change."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the handoff protocol.

    ``code`` is the protocol's error code for it (a :class:`shmfault.protocol.ErrorCode`),
    ``message`` says what was wrong, naming the field at fault. ``fds_to_close`` lists every fd
    that arrived with the bad message: nobody else will close them, the caller must.
    """

    def __init__(self, code: int, message: str, fds_to_close: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fds_to_close = list(fds_to_close)

    def __str__(self) -> str:
        name = getattr(self.code, "name", None) or str(int(self.code))
        return f"{name}: {self.message}"

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.code, self.message, self.fds_to_close))

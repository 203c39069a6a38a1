"""The exception tree: what each error says, which class an errno picks, and that every error
survives pickling (errors cross process boundaries: a forked prober, a service's worker)."""

from __future__ import annotations

import errno
import os
import pickle

import pytest

from shmfault.errors import (
    EventDecodeError,
    OpenAttempt,
    ShmfaultError,
    UffdError,
    UffdFeatureError,
    UffdPageExistsError,
    UffdProcessGoneError,
    UffdRetryError,
    UffdUnavailableError,
    errno_of,
    uffd_error,
)
from shmfault.events import Fork, Pagefault

ATTEMPTS = [
    OpenAttempt("userfaultfd(2)", errno.EPERM, "vm.unprivileged_userfaultfd=0"),
    OpenAttempt("/dev/userfaultfd", errno.EACCES, "the device node's file mode"),
]


def test_uffd_error_is_an_oserror_and_a_shmfault_error() -> None:
    error = UffdError(errno.EINVAL, "UFFDIO_REGISTER", 0x1000, 0x2000)
    assert isinstance(error, OSError)
    assert isinstance(error, ShmfaultError)
    assert error.errno == errno.EINVAL
    with pytest.raises(OSError, match="UFFDIO_REGISTER"):
        raise error


def test_message_names_operation_range_done_and_strerror() -> None:
    error = UffdError(errno.EAGAIN, "UFFDIO_COPY", 0x7F00_0000_0000, 0x2000, done=4096)
    assert str(error) == (
        f"UFFDIO_COPY at 0x7f0000000000+0x2000 failed after 4096 bytes: {os.strerror(errno.EAGAIN)}"
    )
    assert (error.operation, error.address, error.length, error.done) == (
        "UFFDIO_COPY",
        0x7F00_0000_0000,
        0x2000,
        4096,
    )


def test_message_without_range_or_progress_names_only_the_operation() -> None:
    error = UffdError(errno.EBADF, "read")
    assert str(error) == f"read failed: {os.strerror(errno.EBADF)}"


def test_detail_is_appended() -> None:
    error = UffdError(errno.EOPNOTSUPP, "UFFDIO_POISON", 0x1000, 0x1000, detail="no POISON")
    assert str(error).endswith(f"{os.strerror(errno.EOPNOTSUPP)}: no POISON")


@pytest.mark.parametrize(
    ("number", "cls"),
    [
        (errno.EEXIST, UffdPageExistsError),
        (errno.EAGAIN, UffdRetryError),
        (errno.ESRCH, UffdProcessGoneError),
        (errno.ENOSPC, UffdProcessGoneError),
        (errno.EINVAL, UffdError),
        (errno.EFAULT, UffdError),
        (errno.ENOENT, UffdError),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else errno.errorcode[value],
)
def test_errno_picks_the_subclass(number: int, cls: type[UffdError]) -> None:
    error = uffd_error(number, "UFFDIO_COPY", 0x1000, 0x1000, done=0)
    assert type(error) is cls
    assert error.errno == number
    assert error.operation == "UFFDIO_COPY"


def test_subclasses_are_still_uffd_errors() -> None:
    for cls in (UffdPageExistsError, UffdRetryError, UffdProcessGoneError):
        assert issubclass(cls, UffdError)


@pytest.mark.parametrize(
    "error",
    [
        UffdError(errno.EINVAL, "UFFDIO_REGISTER", 0x1000, 0x2000),
        UffdError(errno.EOPNOTSUPP, "UFFDIO_MOVE", 0x1000, 0x1000, detail="no Feature.MOVE"),
        uffd_error(errno.EEXIST, "UFFDIO_COPY", 0x3000, 0x1000),
        uffd_error(errno.EAGAIN, "UFFDIO_COPY", 0x3000, 0x2000, done=4096),
        uffd_error(errno.ESRCH, "UFFDIO_ZEROPAGE", 0x5000, 0x1000),
        UffdUnavailableError(ATTEMPTS),
        UffdFeatureError(["MOVE", "0x40000000"], 0x1FFFF),
    ],
    ids=lambda error: type(error).__name__,
)
def test_pickle_round_trip_keeps_class_fields_and_message(error: UffdError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.errno == error.errno
    assert (copy.operation, copy.address, copy.length, copy.done) == (
        error.operation,
        error.address,
        error.length,
        error.done,
    )
    assert copy.__dict__ == error.__dict__


def test_unavailable_error_lists_every_attempt_in_order() -> None:
    error = UffdUnavailableError(ATTEMPTS)
    assert error.attempts == ATTEMPTS
    assert error.errno == errno.EACCES  # the last attempt's
    message = str(error)
    assert "userfaultfd(2): EPERM (vm.unprivileged_userfaultfd=0)" in message
    assert "/dev/userfaultfd: EACCES (the device node's file mode)" in message
    assert message.index("userfaultfd(2)") < message.index("/dev/userfaultfd")


def test_unavailable_error_keeps_its_own_copy_of_the_attempts() -> None:
    attempts = list(ATTEMPTS)
    error = UffdUnavailableError(attempts)
    attempts.clear()
    assert error.attempts == ATTEMPTS


def test_unavailable_error_with_no_attempt_says_so() -> None:
    error = UffdUnavailableError([])
    assert error.errno == errno.ENOSYS
    assert "no path was allowed" in str(error)


def test_open_attempt_names_the_errno_symbolically() -> None:
    assert str(OpenAttempt("p", errno.EPERM, "why")) == "p: EPERM (why)"
    assert str(OpenAttempt("p", 100_000, "why")) == "p: 100000 (why)"


def test_feature_error_names_what_is_missing_and_what_is_offered() -> None:
    error = UffdFeatureError(["POISON", "0x40000000"], 0x3FFF)
    assert error.errno == errno.EINVAL
    assert error.operation == "UFFDIO_API"
    assert error.missing == ["POISON", "0x40000000"]
    assert error.available == 0x3FFF
    assert "kernel lacks POISON, 0x40000000 (it offers 0x3fff)" in str(error)


def test_event_decode_error_is_not_an_oserror_and_survives_pickling() -> None:
    error = EventDecodeError("record 1: unknown event code 0x42", [Fork(3), Pagefault(0x1000, 1)])
    assert isinstance(error, ShmfaultError)
    assert not isinstance(error, OSError)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is EventDecodeError
    assert str(copy) == str(error)
    assert copy.events == error.events


def test_errno_of() -> None:
    assert errno_of(OSError(errno.EPERM, "denied")) == errno.EPERM
    # An OSError built without an errno (a message alone) has none to give.
    assert errno_of(OSError("no errno here")) == errno.EIO

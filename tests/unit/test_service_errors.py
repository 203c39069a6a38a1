"""The error -> status table and its inverse, and the servicer's use of it, without a server."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from shmfault import errors
from shmfault.service import (
    DEFAULT_CLASS_OF,
    STATUS_OF,
    ShmfaultService,
    exception_for,
    status_of,
)
from shmfault.store import RegionStore
from shmfault.v1 import shmfault_pb2 as pb

EXPECTED = {
    errors.InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.RegionNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.RecordingNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.EndpointNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    errors.QuotaExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.HugePagesUnavailableError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.RegionBusyError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.SourceUnavailableError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    errors.ServiceUnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.ServiceInternalError: grpc.StatusCode.INTERNAL,
}


def every_request_error() -> list[type[errors.RequestError]]:
    found: list[type[errors.RequestError]] = []
    pending: list[type[errors.RequestError]] = [errors.RequestError]
    while pending:
        cls = pending.pop()
        found.extend(cls.__subclasses__())
        pending.extend(cls.__subclasses__())
    return found


def test_table_is_as_documented() -> None:
    assert STATUS_OF == EXPECTED


def test_every_request_error_has_a_status() -> None:
    for cls in every_request_error():
        code, message = status_of(cls("the value 42 is wrong", "size"))
        assert code != grpc.StatusCode.INTERNAL or cls is errors.ServiceInternalError
        assert message == "the value 42 is wrong"


@pytest.mark.parametrize("cls", sorted(EXPECTED, key=lambda c: c.__name__))
def test_client_gets_the_same_class_back(cls: type[errors.RequestError]) -> None:
    code, message = status_of(cls("bad 7", "offset"))
    metadata = [("shmfault-error", cls.__name__), ("shmfault-field", "offset")]
    back = exception_for(code, message, metadata)
    assert type(back) is cls
    assert str(back) == "bad 7"
    assert back.field == "offset"


def test_unknown_class_or_mismatched_code_falls_back_to_the_code() -> None:
    back = exception_for(grpc.StatusCode.NOT_FOUND, "gone", [("shmfault-error", "Nope")])
    assert type(back) is errors.RegionNotFoundError
    # A class name that does not match the code is not trusted.
    back = exception_for(
        grpc.StatusCode.NOT_FOUND, "gone", [("shmfault-error", "QuotaExceededError")]
    )
    assert type(back) is errors.RegionNotFoundError
    back = exception_for(grpc.StatusCode.DATA_LOSS, "boom")
    assert type(back) is errors.ServiceInternalError
    assert "DATA_LOSS" in str(back)
    assert all(issubclass(c, errors.RequestError) for c in DEFAULT_CLASS_OF.values())


def test_unexpected_exceptions_are_internal() -> None:
    code, message = status_of(ZeroDivisionError("division by zero"))
    assert code == grpc.StatusCode.INTERNAL
    assert "ZeroDivisionError" in message


class Aborted(Exception):
    pass


class FakeContext:
    """The ServicerContext methods the servicer uses; no metadata: an anonymous caller."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: Sequence[tuple[str, str]] = ()

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.trailing = metadata

    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        return ()

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Aborted


@pytest.fixture
def servicer(tmp_path: Path, shm_prefix: str) -> ShmfaultService:
    regions = RegionStore(tmp_path, shm_prefix=shm_prefix)

    def capabilities() -> dict[str, object]:
        raise errors.ServiceUnavailableError("no probe in this test")

    return ShmfaultService(regions, capabilities)


@pytest.mark.parametrize(
    ("call", "code", "field"),
    [
        (
            lambda s, c: s.CreateRegion(pb.CreateRegionRequest(size=0), c),
            "INVALID_ARGUMENT",
            "size",
        ),
        (
            lambda s, c: s.CreateRegion(pb.CreateRegionRequest(size=1 << 62), c),
            "RESOURCE_EXHAUSTED",
            "size",
        ),
        (lambda s, c: s.GetRegion(pb.GetRegionRequest(region="ghost"), c), "NOT_FOUND", "region"),
        (
            lambda s, c: s.DeleteRegion(pb.DeleteRegionRequest(region="ghost"), c),
            "NOT_FOUND",
            "region",
        ),
        (
            lambda s, c: list(s.ReadRegion(pb.ReadRegionRequest(region="ghost"), c)),
            "NOT_FOUND",
            "region",
        ),
        (
            lambda s, c: s.WriteRegion(iter([pb.WriteRegionRequest(data=b"x")]), c),
            "INVALID_ARGUMENT",
            "region",
        ),
        (lambda s, c: s.GetCapabilities(pb.GetCapabilitiesRequest(), c), "UNAVAILABLE", ""),
    ],
)
def test_servicer_aborts_with_the_table(
    servicer: ShmfaultService, call: object, code: str, field: str
) -> None:
    context = FakeContext()
    assert callable(call)
    with pytest.raises(Aborted):
        call(servicer, context)
    assert context.code == getattr(grpc.StatusCode, code)
    metadata = dict(context.trailing)
    assert metadata.get("shmfault-field", "") == field
    assert metadata["shmfault-error"].endswith("Error")

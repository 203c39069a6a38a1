"""The Python library of the region service::

    from shmfault import Client, Source

    with Client() as client:                     # the local service's unix socket
        region = client.create_region(64 << 20, source=Source.of_file("/snapshots/vm.mem"))
        client.write(region.id, 0, b"hello")
        assert client.read(region.id, 0, 5) == b"hello"
        client.delete_region(region.id)

Every method blocks until the service answers (no deadline unless ``timeout`` is given) and
raises only shmfault's own exceptions (:mod:`shmfault.errors`): the class the service raised,
never ``grpc.RpcError``. An unreachable service is :class:`ServiceUnavailableError`.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from shmfault.attach import DEFAULT_TIMEOUT as DEFAULT_ATTACH_TIMEOUT
from shmfault.attach import AttachError, Attachment, IdentityLink, identify
from shmfault.attach import attach as attach_region
from shmfault.errors import (
    InvalidArgumentError,
    RequestError,
    ServiceUnavailableError,
    ShmfaultError,
    UnauthenticatedError,
)
from shmfault.identity import CREDENTIAL_METADATA_KEY
from shmfault.memory import CHUNK_BYTES, BackingKind
from shmfault.protocol import ErrorCode
from shmfault.server import MAX_MESSAGE_BYTES, default_socket_path
from shmfault.service import (
    BACKING_TO_PROTO,
    FILL_TO_PROTO,
    exception_for,
    region_from_proto,
    source_to_proto,
)
from shmfault.store import FillPolicy, Region, Source
from shmfault.v1 import shmfault_pb2 as pb
from shmfault.v1 import shmfault_pb2_grpc as pb_grpc

__all__ = ["Attachment", "Client", "Region", "Source"]

_T = TypeVar("_T")
_UINT64_END = 1 << 64


def resolve_target(target: str | os.PathLike[str] | None) -> str:
    """The gRPC target for ``target``: None is the local socket (``$SHMFAULT_SOCKET`` or the
    runtime directory's), a path is a unix socket, ``HOST:PORT`` or ``unix:...`` as given."""
    if target is None:
        return f"unix:{default_socket_path()}"
    text = os.fspath(target)
    if text.startswith(("/", "./", "../")) or isinstance(target, os.PathLike):
        return f"unix:{os.path.abspath(text)}"
    return text


def _uint64(value: int, name: str) -> int:
    if not 0 <= value < _UINT64_END:
        raise InvalidArgumentError(f"{name} {value} does not fit an unsigned 64-bit integer", name)
    return value


class Client:
    """A connection to the region service. Use as a context manager (or call :meth:`close`).

    Connecting is lazy: an unreachable service is reported by the first call. Over a unix
    socket, the first call also identifies this process to the service (docs/protocol.md §3.7),
    so that the regions it creates belong to its uid and the calls it makes may use them; the
    identity connection is held until :meth:`close`. A call whose identification fails raises
    (rather than go on anonymously and create regions anybody may use); ``anonymous=True``
    skips it, as does a TCP target or a service without identities (``identity_error`` says
    which).
    """

    def __init__(
        self,
        target: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = None,
        anonymous: bool = False,
    ) -> None:
        self.target = resolve_target(target)
        self.timeout = timeout
        self.anonymous = anonymous
        self._channel = grpc.insecure_channel(
            self.target,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self._stub = pb_grpc.ShmfaultStub(self._channel)
        self._spent_tokens: set[str] = {""}
        self._identity_lock = threading.Lock()
        self._identity: IdentityLink | None = None
        self._identity_tried = False
        #: why this client calls anonymously, "" when it has identified (or not tried yet)
        self.identity_error = ""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (and the identity connection: its credential is revoked).
        Idempotent."""
        with self._identity_lock:
            if self._identity is not None:
                self._identity.close()
                self._identity = None
        self._channel.close()

    @property
    def uid(self) -> int | None:
        """The uid the service knows this client as; None while anonymous."""
        self._metadata()
        return None if self._identity is None else self._identity.uid

    def _options(self) -> dict[str, Any]:
        """The keyword arguments of every stub call."""
        return {"timeout": self.timeout, "metadata": self._metadata()}

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata of every call: this process's credential, once identified."""
        with self._identity_lock:
            if not self._identity_tried:
                self._identity_tried = True
                self._identify()
            if self._identity is None:
                return ()
            return ((CREDENTIAL_METADATA_KEY, self._identity.credential.hex()),)

    def _identify(self) -> None:
        """Identify, or decide to call anonymously. Raises (and tries again on the next call)
        when the service cannot be asked or refuses: failing open would create regions that
        anybody may use."""
        if self.anonymous:
            self.identity_error = "anonymous by request"
            return
        if not self.target.startswith("unix:"):
            self.identity_error = "a TCP target: the service cannot tell who is calling"
            return
        try:
            # GetCapabilities is the one call a service that requires identity answers
            # anonymously: it names the handoff socket to identify on.
            request = pb.GetCapabilitiesRequest()
            response = self._stub.GetCapabilities(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            self._identity_tried = False
            raise self._translate(exc) from None
        if not response.handoff_socket:
            self.identity_error = "the service does not offer identities"
            return
        try:
            self._identity = identify(response.handoff_socket, self.timeout or 30.0)
        except (OSError, ShmfaultError) as exc:
            self._identity_tried = False
            raise ServiceUnavailableError(
                f"cannot identify to the service on {response.handoff_socket}: {exc} (pass "
                "anonymous=True to call without an identity)"
            ) from None

    def _call(self, function: Callable[[], _T]) -> _T:
        try:
            return function()
        except grpc.RpcError as exc:
            error = self._translate(exc)
        if isinstance(error, UnauthenticatedError) and self._forget_identity():
            # A restarted service knows none of the previous run's credentials: identify
            # again, once.
            try:
                return function()
            except grpc.RpcError as exc:
                error = self._translate(exc)
        raise error

    def _forget_identity(self) -> bool:
        """Drop the credential (so that the next call identifies again); whether there was
        one."""
        with self._identity_lock:
            if self._identity is None:
                return False
            self._identity.close()
            self._identity = None
            self._identity_tried = False
            return True

    def _translate(self, exc: grpc.RpcError) -> RequestError:
        call: grpc.Call = exc  # type: ignore[assignment]
        code = call.code()
        details = call.details() or ""
        error = exception_for(code, details, call.trailing_metadata() or ())
        if isinstance(error, UnauthenticatedError) and self.identity_error:
            return UnauthenticatedError(f"{error} ({self.identity_error})", error.field)
        if isinstance(error, ServiceUnavailableError) and code == grpc.StatusCode.UNAVAILABLE:
            return ServiceUnavailableError(
                f"cannot reach the shmfault service at {self.target}: {details}"
            )
        return error

    def create_region(
        self,
        size: int,
        *,
        backing: BackingKind | str = BackingKind.MEMFD,
        source: Source | None = None,
        name: str = "",
        labels: Mapping[str, str] | None = None,
        fill_policy: FillPolicy | str = FillPolicy.LAZY,
    ) -> Region:
        """Create a region of ``size`` bytes (a multiple of the backing's page size) and return
        it, with its single-use ``attach_token``. Blocks for the eager fill when
        ``fill_policy="eager"``. Raises InvalidArgumentError, AlreadyExistsError,
        QuotaExceededError, HugePagesUnavailableError, RegionNotFoundError (source region),
        PermissionDeniedError (source file), ServiceUnavailableError."""
        try:
            backing_kind = BackingKind(backing)
            policy = FillPolicy(fill_policy)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc), "backing") from None
        if source is not None:
            _uint64(source.offset, "source.file.offset")
        request = pb.CreateRegionRequest(
            size=_uint64(size, "size"),
            backing=BACKING_TO_PROTO[backing_kind],
            source=source_to_proto(source or Source()),
            name=name,
            labels=dict(labels or {}),
            fill_policy=FILL_TO_PROTO[policy],
        )
        response = self._call(lambda: self._stub.CreateRegion(request, **self._options()))
        return region_from_proto(response.region, response.attach_token)

    def get_region(self, region: str) -> Region:
        """The region with id or name ``region``. Raises RegionNotFoundError."""
        request = pb.GetRegionRequest(region=region)
        return region_from_proto(
            self._call(lambda: self._stub.GetRegion(request, **self._options()))
        )

    def iter_regions(
        self, labels: Mapping[str, str] | None = None, page_size: int = 0
    ) -> Iterator[Region]:
        """Every region carrying all of ``labels``, in id order, fetched a page at a time as
        the iteration goes."""
        token = ""
        while True:
            request = pb.ListRegionsRequest(
                labels=dict(labels or {}), page_size=page_size, page_token=token
            )
            response = self._list_page(request)
            yield from (region_from_proto(r) for r in response.regions)
            token = response.next_page_token
            if not token:
                return

    def _list_page(self, request: pb.ListRegionsRequest) -> pb.ListRegionsResponse:
        return self._call(lambda: self._stub.ListRegions(request, **self._options()))

    def list_regions(self, labels: Mapping[str, str] | None = None) -> list[Region]:
        """Every region carrying all of ``labels``, in id order (all pages)."""
        return list(self.iter_regions(labels))

    def delete_region(self, region: str, *, force: bool = False) -> None:
        """Delete a region. Raises RegionNotFoundError; RegionBusyError while it is attached
        (unless ``force``) or the source of another region."""
        request = pb.DeleteRegionRequest(region=region, force=force)
        self._call(lambda: self._stub.DeleteRegion(request, **self._options()))

    def iter_read(self, region: str, offset: int = 0, length: int = 0) -> Iterator[bytes]:
        """The bytes of ``[offset, offset + length)`` (``length`` 0: to the end) in pieces of
        at most 1 MiB, as the service streams them."""
        request = pb.ReadRegionRequest(
            region=region, offset=_uint64(offset, "offset"), length=_uint64(length, "length")
        )
        stream = self._call(lambda: self._stub.ReadRegion(request, **self._options()))
        try:
            for piece in stream:
                yield piece.data
        except grpc.RpcError as exc:
            raise self._translate(exc) from None

    def read(self, region: str, offset: int = 0, length: int = 0) -> bytes:
        """The bytes of ``[offset, offset + length)`` (``length`` 0: to the end of the
        region). Unfilled pages are filled from the source by the service. Raises
        RegionNotFoundError, InvalidArgumentError (range), SourceUnavailableError."""
        return b"".join(self.iter_read(region, offset, length))

    def write(self, region: str, offset: int, data: bytes | memoryview) -> int:
        """Write ``data`` at ``offset``, streamed in 1 MiB chunks; returns the bytes written.
        Raises RegionNotFoundError, InvalidArgumentError (range), QuotaExceededError."""
        _uint64(offset, "offset")
        view = memoryview(data).cast("B")

        def chunks() -> Iterator[pb.WriteRegionRequest]:
            yield pb.WriteRegionRequest(
                region=region, offset=offset, data=bytes(view[:CHUNK_BYTES])
            )
            for start in range(CHUNK_BYTES, len(view), CHUNK_BYTES):
                yield pb.WriteRegionRequest(
                    offset=offset + start, data=bytes(view[start : start + CHUNK_BYTES])
                )

        response = self._call(lambda: self._stub.WriteRegion(chunks(), **self._options()))
        return response.bytes_written

    def capabilities(self) -> dict[str, object]:
        """The service kernel's capabilities report (the ``shmfault probe --json`` document),
        as taken when the service started. Raises ServiceUnavailableError when the service
        has none."""
        request = pb.GetCapabilitiesRequest()
        response = self._call(lambda: self._stub.GetCapabilities(request, **self._options()))
        report: dict[str, object] = json.loads(response.capabilities_json)
        return report

    def issue_attach_token(
        self, region: str, *, record: bool = False, replay: str = ""
    ) -> tuple[str, str, str]:
        """A fresh single-use attach token: ``(region id, token, handoff socket path)``. The
        attachment that uses it records its faults (``record``) or has recording ``replay``'s
        pages filled ahead of it. Raises RegionNotFoundError, RecordingNotFoundError,
        InvalidArgumentError, ServiceUnavailableError."""
        request = pb.IssueAttachTokenRequest(region=region, record=record, replay=replay)
        response = self._call(lambda: self._stub.IssueAttachToken(request, **self._options()))
        return response.region_id, response.attach_token, response.handoff_socket

    def attach(
        self,
        region: str | Region,
        *,
        mode: str | None = None,
        require: str | None = None,
        timeout: float = DEFAULT_ATTACH_TIMEOUT,
        record: bool = False,
        replay: str = "",
    ) -> Attachment:
        """Map ``region`` (id, name or Region) into this process, filled lazily by the service:
        the returned :class:`~shmfault.attach.Attachment` (a context manager) has the memory as
        ``buffer``. ``mode`` forces an attach mode (``shared-copy``, ``shared-continue``,
        ``private-copy``, ``eager``); ``require`` refuses modes worse than the one named. Either
        raises :class:`~shmfault.attach.AttachError` rather than step down. ``record`` saves the
        faults served as a working-set recording when the attachment ends (its id is in
        :meth:`stats`); ``replay`` (a recording id) fills that recording's pages ahead of the
        client (docs/recording.md).

        Uses the Region's own token when it has an unused one, else asks for a new one. Works
        from any thread. Blocks for the handshake (an eager attach: until the range is filled).
        Raises RegionNotFoundError, AttachError, ServiceUnavailableError, OSError."""
        options = record or replay
        if (
            isinstance(region, Region)
            and region.attach_token not in self._spent_tokens
            and not options
        ):
            region_id, token, handoff = region.id, region.attach_token, region.handoff_socket
            # A token attaches once: remember it so this Region is not offered it again.
            self._spent_tokens.add(token)
            try:
                return attach_region(
                    handoff, region_id, token, mode=mode, minimum=require, timeout=timeout
                )
            except AttachError as exc:
                if exc.code is not ErrorCode.DENIED or "expired" not in str(exc):
                    raise
            # The Region's token outlived its lifetime (--token-ttl): ask for a fresh one.
            region_id, token, handoff = self.issue_attach_token(region_id)
        else:
            reference = region.id if isinstance(region, Region) else region
            region_id, token, handoff = self.issue_attach_token(
                reference, record=record, replay=replay
            )
        return attach_region(handoff, region_id, token, mode=mode, minimum=require, timeout=timeout)

    def stats(self, region: str = "") -> list[dict[str, Any]]:
        """Statistics of the attachments of ``region`` (all regions when empty): live ones and
        recently ended ones, as plain dicts (GetStats). Raises RegionNotFoundError,
        ServiceUnavailableError."""
        request = pb.GetStatsRequest(region=region)
        response = self._call(lambda: self._stub.GetStats(request, **self._options()))
        return [_stats_from_proto(entry) for entry in response.attachments]

    # --- working-set recordings (docs/recording.md) ---

    def list_recordings(self, region_id: str = "") -> list[dict[str, Any]]:
        """Stored recordings (of one region id), oldest first. Raises ServiceUnavailableError."""
        request = pb.ListRecordingsRequest(region_id=region_id)
        response = self._call(lambda: self._stub.ListRecordings(request, **self._options()))
        return [_recording_from_proto(entry) for entry in response.recordings]

    def get_recording(self, recording_id: str) -> tuple[dict[str, Any], bytes]:
        """A recording's description and its file's bytes. Raises RecordingNotFoundError."""
        request = pb.GetRecordingRequest(recording_id=recording_id)
        response = self._call(lambda: self._stub.GetRecording(request, **self._options()))
        return _recording_from_proto(response.recording), response.data

    def import_recording(self, data: bytes) -> dict[str, Any]:
        """Store a recording file under a new id. Raises InvalidArgumentError."""
        request = pb.ImportRecordingRequest(data=data)
        response = self._call(lambda: self._stub.ImportRecording(request, **self._options()))
        return _recording_from_proto(response)

    def merge_recordings(self, recording_ids: list[str]) -> dict[str, Any]:
        """A new recording of the pages seen in all of ``recording_ids``, in average order.
        Raises RecordingNotFoundError, InvalidArgumentError."""
        request = pb.MergeRecordingsRequest(recording_ids=recording_ids)
        response = self._call(lambda: self._stub.MergeRecordings(request, **self._options()))
        return _recording_from_proto(response)

    def delete_recording(self, recording_id: str) -> None:
        """Raises RecordingNotFoundError."""
        request = pb.DeleteRecordingRequest(recording_id=recording_id)
        self._call(lambda: self._stub.DeleteRecording(request, **self._options()))

    def open_firecracker_endpoint(
        self, region: str, socket_path: str, *, record: bool = False, replay: str = ""
    ) -> dict[str, Any]:
        """Listen at ``socket_path`` (absolute) for Firecracker VMMs restoring a snapshot with
        the Uffd memory backend, serving their guest memory from ``region`` (docs/firecracker.md).
        Returns the endpoint (``id``, ``socket_path``, ``region_id``, ...). Raises
        RegionNotFoundError, InvalidArgumentError (path), AlreadyExistsError (path in use)."""
        request = pb.OpenFirecrackerEndpointRequest(
            region=region, socket_path=socket_path, record=record, replay=replay
        )
        return _endpoint_from_proto(
            self._call(lambda: self._stub.OpenFirecrackerEndpoint(request, **self._options()))
        )

    def close_firecracker_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        """Stop an endpoint and remove its socket (VMs it attached stay served); returns it as
        it was last. Raises EndpointNotFoundError."""
        request = pb.CloseFirecrackerEndpointRequest(endpoint_id=endpoint_id)
        response = self._call(
            lambda: self._stub.CloseFirecrackerEndpoint(request, **self._options())
        )
        return _endpoint_from_proto(response.endpoint)

    def list_firecracker_endpoints(self) -> list[dict[str, Any]]:
        """Every open Firecracker endpoint."""
        request = pb.ListFirecrackerEndpointsRequest()
        response = self._call(
            lambda: self._stub.ListFirecrackerEndpoints(request, **self._options())
        )
        return [_endpoint_from_proto(entry) for entry in response.endpoints]


def _recording_from_proto(entry: pb.Recording) -> dict[str, Any]:
    return {
        "recording_id": entry.recording_id,
        "region_id": entry.region_id,
        "page_size": entry.page_size,
        "region_size": entry.region_size,
        "faults": entry.faults,
        "pages": entry.pages,
        "created": entry.created.ToNanoseconds() / 1e9,
        "file_bytes": entry.file_bytes,
    }


def _endpoint_from_proto(entry: pb.FirecrackerEndpoint) -> dict[str, Any]:
    return {
        "id": entry.id,
        "socket_path": entry.socket_path,
        "region_id": entry.region_id,
        "created": entry.created.ToNanoseconds() / 1e9,
        "attached": entry.attached,
        "refused": entry.refused,
        "record": entry.record,
        "replay": entry.replay,
    }


def _stats_from_proto(entry: pb.AttachmentStats) -> dict[str, Any]:
    return {
        "attachment_id": entry.attachment_id,
        "region_id": entry.region_id,
        "mode": entry.mode,
        "mode_reasons": entry.mode_reasons,
        "kind": entry.kind,
        "ranges": [
            {"base": r.base, "length": r.length, "region_offset": r.region_offset}
            for r in entry.ranges
        ],
        "pid": entry.pid,
        "uid": entry.uid,
        "base": entry.base,
        "length": entry.length,
        "region_offset": entry.region_offset,
        "started": entry.started.ToNanoseconds() / 1e9,
        "ended": entry.ended.ToNanoseconds() / 1e9 if entry.HasField("ended") else None,
        "end_reason": entry.end_reason,
        "recording_id": entry.recording_id,
        "replay_pages": entry.replay_pages,
        "replay_pending": entry.replay_pending,
        "fault_thread_cpu": (
            entry.fault_thread_cpu if entry.HasField("fault_thread_cpu") else None
        ),
        "counters": dict(entry.counters),
        "latency": [{"le_ns": b.le_ns or None, "count": b.count} for b in entry.latency],
    }

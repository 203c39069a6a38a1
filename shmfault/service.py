"""The gRPC servicer of ``shmfault.v1.Shmfault``: protobuf in, :mod:`shmfault.store` calls,
protobuf out. Thin on purpose: validation and behaviour live in the store.

One table, :data:`STATUS_OF`, maps every shmfault exception class to its gRPC status code; the
client library reads it backwards. Besides the code and message, a failed call carries two
trailing metadata entries: ``shmfault-error`` (the exception class name, so the client raises
exactly that class) and ``shmfault-field`` (the request field at fault, when there is one).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from shmfault import errors, store
from shmfault.identity import CREDENTIAL_METADATA_KEY, GONE_OWNER, Caller, Identities
from shmfault.memory import BackingKind
from shmfault.recording_store import RecordingInfo, RecordingStore
from shmfault.v1 import shmfault_pb2 as pb
from shmfault.v1 import shmfault_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from shmfault.firecracker import EndpointInfo, FirecrackerEndpoints

_log = logging.getLogger("shmfault.service")

ERROR_CLASS_KEY = "shmfault-error"
ERROR_FIELD_KEY = "shmfault-field"

#: The one error -> status table. Order matters only in that a subclass is looked up through
#: its MRO, so the most specific entry wins.
STATUS_OF: dict[type[errors.RequestError], grpc.StatusCode] = {
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

#: The class a client raises for a status code when the metadata names no known class.
DEFAULT_CLASS_OF: dict[grpc.StatusCode, type[errors.RequestError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: errors.InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: errors.RegionNotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExistsError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.QuotaExceededError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.RegionBusyError,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: errors.UnauthenticatedError,
    grpc.StatusCode.UNAVAILABLE: errors.ServiceUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.ServiceUnavailableError,
    grpc.StatusCode.CANCELLED: errors.ServiceUnavailableError,
}

_CLASS_BY_NAME: dict[str, type[errors.RequestError]] = {cls.__name__: cls for cls in STATUS_OF}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed RPC answers for ``exc``. Anything that is not a
    RequestError is a bug or an unexpected kernel failure: INTERNAL, naming its type."""
    if isinstance(exc, errors.RequestError):
        for cls in type(exc).__mro__:
            code = STATUS_OF.get(cls)
            if code is not None:
                return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def exception_for(
    code: grpc.StatusCode, message: str, metadata: Sequence[tuple[str, str | bytes]] = ()
) -> errors.RequestError:
    """The shmfault exception a client raises for a failed call (the inverse of
    :func:`status_of`): the class the metadata names if it is one of ours and maps to the same
    code, else the default class of the code, else ServiceInternalError."""
    entries = {key: value for key, value in metadata}
    field = entries.get(ERROR_FIELD_KEY, "")
    name = entries.get(ERROR_CLASS_KEY, "")
    field = field.decode() if isinstance(field, bytes) else field
    name = name.decode() if isinstance(name, bytes) else name
    cls = _CLASS_BY_NAME.get(name)
    if cls is None or STATUS_OF[cls] != code:
        cls = DEFAULT_CLASS_OF.get(code, errors.ServiceInternalError)
    if cls is errors.ServiceInternalError and code != grpc.StatusCode.INTERNAL:
        message = f"{code.name}: {message}"
    return cls(message, field)


def _abort(context: grpc.ServicerContext, method: str, exc: BaseException) -> NoReturn:
    code, message = status_of(exc)
    metadata: list[tuple[str, str]] = [(ERROR_CLASS_KEY, type(exc).__name__)]
    field = getattr(exc, "field", "")
    if field:
        metadata.append((ERROR_FIELD_KEY, field))
    level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO
    _log.log(
        level,
        "rpc_failed",
        exc_info=code == grpc.StatusCode.INTERNAL,
        extra={"fields": {"method": method, "code": code.name, "message": message}},
    )
    context.set_trailing_metadata(tuple(metadata))
    context.abort(code, message)


# -- proto <-> store -------------------------------------------------------------------------

_BACKING_FROM_PROTO = {
    pb.BACKING_UNSPECIFIED: BackingKind.MEMFD,
    pb.BACKING_MEMFD: BackingKind.MEMFD,
    pb.BACKING_POSIX_SHM: BackingKind.POSIX_SHM,
    pb.BACKING_HUGETLB: BackingKind.HUGETLB,
}
BACKING_TO_PROTO = {
    BackingKind.MEMFD: pb.BACKING_MEMFD,
    BackingKind.POSIX_SHM: pb.BACKING_POSIX_SHM,
    BackingKind.HUGETLB: pb.BACKING_HUGETLB,
}
_FILL_FROM_PROTO = {
    pb.FILL_POLICY_UNSPECIFIED: store.FillPolicy.LAZY,
    pb.FILL_POLICY_LAZY: store.FillPolicy.LAZY,
    pb.FILL_POLICY_EAGER: store.FillPolicy.EAGER,
}
FILL_TO_PROTO = {
    store.FillPolicy.LAZY: pb.FILL_POLICY_LAZY,
    store.FillPolicy.EAGER: pb.FILL_POLICY_EAGER,
}


def backing_from_proto(value: int) -> BackingKind:
    """The backing a request names. Raises InvalidArgumentError for a value not in the enum."""
    try:
        return _BACKING_FROM_PROTO[value]  # type: ignore[index]
    except KeyError:
        raise errors.InvalidArgumentError(
            f"backing {value} is not a known Backing", "backing"
        ) from None


def fill_policy_from_proto(value: int) -> store.FillPolicy:
    """The fill policy a request names. Raises InvalidArgumentError for an unknown value."""
    try:
        return _FILL_FROM_PROTO[value]  # type: ignore[index]
    except KeyError:
        raise errors.InvalidArgumentError(
            f"fill_policy {value} is not a known FillPolicy", "fill_policy"
        ) from None


def source_from_proto(message: pb.Source) -> store.Source:
    """The store's Source for a request's source (unset: zero)."""
    kind = message.WhichOneof("kind")
    if kind == "file":
        return store.Source(store.SourceKind.FILE, message.file.path, message.file.offset)
    if kind == "region":
        return store.Source(store.SourceKind.REGION, region=message.region.region)
    if kind == "bytes":
        return store.Source(store.SourceKind.BYTES)
    return store.Source(store.SourceKind.ZERO)


def source_to_proto(source: store.Source) -> pb.Source:
    """The protobuf form of a Source."""
    if source.kind is store.SourceKind.FILE:
        return pb.Source(file=pb.FileSource(path=source.path, offset=source.offset))
    if source.kind is store.SourceKind.REGION:
        return pb.Source(region=pb.RegionSource(region=source.region))
    if source.kind is store.SourceKind.BYTES:
        return pb.Source(bytes=pb.BytesSource())
    return pb.Source(zero=pb.ZeroSource())


def region_to_proto(region: store.Region) -> pb.Region:
    """The protobuf form of a Region (the attach token is never part of it)."""
    created = Timestamp()
    created.FromNanoseconds(int(region.created * 1e9))
    return pb.Region(
        id=region.id,
        name=region.name,
        size=region.size,
        page_size=region.page_size,
        backing=BACKING_TO_PROTO[region.backing],
        source=source_to_proto(region.source),
        labels=dict(region.labels),
        fill_policy=FILL_TO_PROTO[region.fill_policy],
        shm_name=region.shm_name,
        handoff_socket=region.handoff_socket,
        created=created,
        allocated_bytes=region.allocated_bytes,
        attachments=region.attachments,
        content_reset=region.content_reset,
        owner_uid=region.owner_uid,
    )


def region_from_proto(message: pb.Region, attach_token: str = "") -> store.Region:
    """The Region a protobuf Region describes (for the client library)."""
    return store.Region(
        id=message.id,
        size=message.size,
        page_size=message.page_size,
        backing=_BACKING_FROM_PROTO.get(message.backing, BackingKind.MEMFD),
        source=source_from_proto(message.source),
        fill_policy=_FILL_FROM_PROTO.get(message.fill_policy, store.FillPolicy.LAZY),
        name=message.name,
        labels=dict(message.labels),
        shm_name=message.shm_name,
        handoff_socket=message.handoff_socket,
        created=message.created.ToNanoseconds() / 1e9,
        allocated_bytes=message.allocated_bytes,
        attachments=message.attachments,
        content_reset=message.content_reset,
        attach_token=attach_token,
        owner_uid=message.owner_uid if message.HasField("owner_uid") else None,
    )


# -- the servicer ----------------------------------------------------------------------------


class Attachments(Protocol):
    """The fault engine as the servicer sees it."""

    def attachments(self, region_id: str | None = None) -> list[dict[str, Any]]:
        """GetStats data (``FaultEngine.attachments``)."""
        ...

    def end_region(self, region_id: str, reason: str) -> None:
        """End every attachment of the region and wait until they are gone."""
        ...


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def recording_to_proto(info: RecordingInfo) -> pb.Recording:
    return pb.Recording(
        recording_id=info.recording_id,
        region_id=info.region_id,
        page_size=info.page_size,
        region_size=info.region_size,
        faults=info.faults,
        pages=info.pages,
        created=_timestamp(info.created),
        file_bytes=info.file_bytes,
    )


def attachment_to_proto(data: Mapping[str, Any]) -> pb.AttachmentStats:
    """GetStats' message for one ``FaultEngine.attachments()`` entry."""
    stats = data["stats"]
    counters = {name: int(value) for name, value in stats.items() if isinstance(value, int)}
    return pb.AttachmentStats(
        attachment_id=data["attachment_id"],
        region_id=data["region_id"],
        mode=data["mode"],
        mode_reasons=data["mode_reasons"],
        kind=data.get("kind", "attach"),
        ranges=[
            pb.MappedRange(base=r["base"], length=r["length"], region_offset=r["region_offset"])
            for r in data.get("ranges", ())
        ],
        pid=data["pid"],
        uid=data["uid"],
        base=data["base"],
        length=data["length"],
        region_offset=data["region_offset"],
        started=_timestamp(data["started"]),
        ended=_timestamp(data["ended"]),
        end_reason=data["end_reason"],
        recording_id=data["recording_id"],
        replay_pages=data["replay_pages"],
        replay_pending=data["replay_pending"],
        fault_thread_cpu=data.get("fault_thread_cpu"),
        counters=counters,
        latency=[
            pb.LatencyBucket(le_ns=bucket["le_ns"] or 0, count=bucket["count"])
            for bucket in stats["latency_histogram"]
        ],
    )


class ShmfaultService(pb_grpc.ShmfaultServicer):
    """``shmfault.v1.Shmfault`` over a RegionStore. Each method blocks its gRPC worker thread
    for as long as the store call takes (eager fills, disk reads of file sources)."""

    def __init__(
        self,
        regions: store.RegionStore,
        capabilities: Callable[[], Mapping[str, object]],
        attachments: Attachments | None = None,
        firecracker: FirecrackerEndpoints | None = None,
        recordings: RecordingStore | None = None,
        identities: Identities | None = None,
        require_identity: bool = False,
        handoff_socket: str = "",
    ) -> None:
        self._store = regions
        self._identities = identities if identities is not None else Identities()
        self._require_identity = require_identity
        self._handoff_socket = handoff_socket
        self._capabilities = capabilities
        self._attachments = attachments
        self._firecracker = firecracker
        self._recordings = recordings

    # -- who is calling, and what they may use (docs/security.md §3.1) ---------------------

    def _caller(self, context: grpc.ServicerContext, *, anonymous_ok: bool = False) -> Caller:
        """The caller of this call, from its ``shmfault-credential`` metadata. Raises
        UnauthenticatedError for a credential not issued here (or revoked), and for no
        credential where the service requires one (unless ``anonymous_ok``)."""
        presented = [
            value
            for key, value in context.invocation_metadata() or ()
            if key == CREDENTIAL_METADATA_KEY
        ]
        if not presented:
            if self._require_identity and not anonymous_ok:
                raise errors.UnauthenticatedError(
                    "this service requires a credential on every call: identify on its "
                    f"handoff socket {self._handoff_socket} (docs/protocol.md §3.7)"
                )
            return Caller(None)
        text = presented[-1]
        try:
            credential = bytes.fromhex(text if isinstance(text, str) else text.decode())
        except (ValueError, UnicodeDecodeError):
            credential = b""
        caller = self._identities.caller_of(credential)
        if caller is None:
            raise errors.UnauthenticatedError(
                "the credential is not one this service issued, or its identity connection "
                "has closed: identify again"
            )
        return caller

    def _region(self, caller: Caller, ref: str, field: str = "region") -> store.Region:
        """Region ``ref`` if ``caller`` may use it. PermissionDeniedError otherwise."""
        try:
            region = self._store.get(ref)
        except errors.RequestError as exc:
            if field == exc.field:
                raise
            raise type(exc)(str(exc), field) from None
        caller.check_use(region.owner_uid, f"region {region.id}", field)
        return region

    def _visible(self, caller: Caller) -> Callable[[store.Region], bool]:
        return lambda region: caller.may_use(region.owner_uid)

    def _region_owner(self, region_id: str) -> int | None:
        """The owner of ``region_id``; a region that no longer exists is treated as owned by
        the service (only admins may see what was left of it)."""
        try:
            return self._store.get(region_id).owner_uid
        except errors.RegionNotFoundError:
            return GONE_OWNER

    def _recording_store(self) -> RecordingStore:
        if self._recordings is None:
            raise errors.ServiceUnavailableError("this service keeps no recordings")
        return self._recordings

    def CreateRegion(
        self, request: pb.CreateRegionRequest, context: grpc.ServicerContext
    ) -> pb.CreateRegionResponse:
        """See the proto."""
        try:
            caller = self._caller(context)
            source = source_from_proto(request.source)
            if source.kind is store.SourceKind.REGION:
                # Cloning reads the source region: only for those who may read it.
                self._region(caller, source.region, "source.region")
            region = self._store.create(
                request.size,
                backing=backing_from_proto(request.backing),
                source=source,
                name=request.name,
                labels=dict(request.labels),
                fill_policy=fill_policy_from_proto(request.fill_policy),
                owner_uid=caller.uid,
                per_uid_limits=not caller.admin,
                may_read=caller.may_read,
            )
            return pb.CreateRegionResponse(
                region=region_to_proto(region), attach_token=region.attach_token
            )
        except Exception as exc:
            _abort(context, "CreateRegion", exc)

    def GetRegion(self, request: pb.GetRegionRequest, context: grpc.ServicerContext) -> pb.Region:
        """See the proto."""
        try:
            return region_to_proto(self._region(self._caller(context), request.region))
        except Exception as exc:
            _abort(context, "GetRegion", exc)

    def ListRegions(
        self, request: pb.ListRegionsRequest, context: grpc.ServicerContext
    ) -> pb.ListRegionsResponse:
        """See the proto."""
        try:
            regions, next_token = self._store.list(
                dict(request.labels),
                request.page_size,
                request.page_token,
                visible=self._visible(self._caller(context)),
            )
            return pb.ListRegionsResponse(
                regions=[region_to_proto(r) for r in regions], next_page_token=next_token
            )
        except Exception as exc:
            _abort(context, "ListRegions", exc)

    def DeleteRegion(
        self, request: pb.DeleteRegionRequest, context: grpc.ServicerContext
    ) -> pb.DeleteRegionResponse:
        """See the proto."""
        try:
            self._region(self._caller(context), request.region)
            if request.force and self._firecracker is not None:
                # Before the attachments end: no endpoint may add one behind end_region.
                self._firecracker.close_region(self._store.get(request.region).id)
            if request.force and self._attachments is not None:
                region_id = self._store.get(request.region).id
                self._attachments.end_region(region_id, "the region was deleted (forced)")
            deleted = self._store.delete(request.region, force=request.force)
            if self._firecracker is not None:
                self._firecracker.close_region(deleted.id)
            return pb.DeleteRegionResponse()
        except Exception as exc:
            _abort(context, "DeleteRegion", exc)

    def WriteRegion(
        self, request_iterator: Iterator[pb.WriteRegionRequest], context: grpc.ServicerContext
    ) -> pb.WriteRegionResponse:
        """See the proto. Chunks are applied as they arrive; on failure the chunks before the
        failing one stay written, and the message says how many bytes that was."""
        written = 0
        region = ""
        try:
            caller = self._caller(context)
            for chunk in request_iterator:
                if not region:
                    region = chunk.region
                    if not region:
                        raise errors.InvalidArgumentError(
                            "the first WriteRegion message must name the region", "region"
                        )
                    self._region(caller, region)
                elif chunk.region and chunk.region != region:
                    raise errors.InvalidArgumentError(
                        f"WriteRegion stream for {region!r} names another region {chunk.region!r}",
                        "region",
                    )
                self._store.write(region, chunk.offset, chunk.data)
                written += len(chunk.data)
            return pb.WriteRegionResponse(bytes_written=written)
        except Exception as exc:
            if written and isinstance(exc, errors.RequestError):
                exc = type(exc)(f"{exc} (after {written} bytes were written)", exc.field)
            _abort(context, "WriteRegion", exc)

    def ReadRegion(
        self, request: pb.ReadRegionRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ReadRegionResponse]:
        """See the proto. Streams pieces of at most 1 MiB."""
        try:
            self._region(self._caller(context), request.region)
            for offset, data in self._store.read(request.region, request.offset, request.length):
                yield pb.ReadRegionResponse(offset=offset, data=data)
        except Exception as exc:
            _abort(context, "ReadRegion", exc)

    def GetCapabilities(
        self, request: pb.GetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.GetCapabilitiesResponse:
        """See the proto. The report is the one taken at startup, not a new probe."""
        try:
            caller = self._caller(context, anonymous_ok=True)
            report = self._capabilities()
            return pb.GetCapabilitiesResponse(
                capabilities_json=json.dumps(report),
                handoff_socket=self._handoff_socket,
                identity_required=self._require_identity,
                caller_uid=caller.uid,
            )
        except Exception as exc:
            _abort(context, "GetCapabilities", exc)

    def IssueAttachToken(
        self, request: pb.IssueAttachTokenRequest, context: grpc.ServicerContext
    ) -> pb.IssueAttachTokenResponse:
        """See the proto."""
        try:
            caller = self._caller(context)
            region = self._region(caller, request.region)
            if request.replay:
                # Checked now so that a wrong id fails here, with a status, rather than at
                # the handshake; the handoff checks again (it may be deleted in between).
                replayed = self._recording_store().info(request.replay)
                self._check_recording(caller, replayed)
                if (replayed.page_size, replayed.region_size) != (region.page_size, region.size):
                    raise errors.InvalidArgumentError(
                        f"recording {request.replay} is of a region of {replayed.region_size} "
                        f"bytes in {replayed.page_size}-byte pages, not {region.size} in "
                        f"{region.page_size}",
                        "replay",
                    )
            options = store.AttachOptions(record=request.record, replay=request.replay)
            token = self._store.issue_token(region.id, options)
            return pb.IssueAttachTokenResponse(
                region_id=region.id, attach_token=token, handoff_socket=region.handoff_socket
            )
        except Exception as exc:
            _abort(context, "IssueAttachToken", exc)

    def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.ServicerContext
    ) -> pb.GetStatsResponse:
        """See the proto."""
        try:
            caller = self._caller(context)
            region_id = self._region(caller, request.region).id if request.region else None
            entries = [] if self._attachments is None else self._attachments.attachments(region_id)
            if region_id is None and not caller.admin:
                entries = [e for e in entries if caller.may_use(self._region_owner(e["region_id"]))]
            return pb.GetStatsResponse(attachments=[attachment_to_proto(e) for e in entries])
        except Exception as exc:
            _abort(context, "GetStats", exc)

    def ListRecordings(
        self, request: pb.ListRecordingsRequest, context: grpc.ServicerContext
    ) -> pb.ListRecordingsResponse:
        """See the proto."""
        try:
            caller = self._caller(context)
            found = [
                info
                for info in self._recording_store().list(request.region_id)
                if caller.may_use(self._region_owner(info.region_id))
            ]
            return pb.ListRecordingsResponse(recordings=[recording_to_proto(i) for i in found])
        except Exception as exc:
            _abort(context, "ListRecordings", exc)

    def GetRecording(
        self, request: pb.GetRecordingRequest, context: grpc.ServicerContext
    ) -> pb.GetRecordingResponse:
        """See the proto."""
        try:
            caller = self._caller(context)
            recordings = self._recording_store()
            info = recordings.info(request.recording_id)
            self._check_recording(caller, info)
            data = recordings.export(request.recording_id)
            return pb.GetRecordingResponse(recording=recording_to_proto(info), data=data)
        except Exception as exc:
            _abort(context, "GetRecording", exc)

    def ImportRecording(
        self, request: pb.ImportRecordingRequest, context: grpc.ServicerContext
    ) -> pb.Recording:
        """See the proto."""
        try:
            caller = self._caller(context)
            recordings = self._recording_store()
            caller.check_use(
                self._region_owner(recordings.region_of(request.data)),
                "the region of that recording",
                "data",
            )
            return recording_to_proto(recordings.import_(request.data))
        except Exception as exc:
            _abort(context, "ImportRecording", exc)

    def MergeRecordings(
        self, request: pb.MergeRecordingsRequest, context: grpc.ServicerContext
    ) -> pb.Recording:
        """See the proto."""
        try:
            caller = self._caller(context)
            recordings = self._recording_store()
            for recording_id in request.recording_ids:
                self._check_recording(caller, recordings.info(recording_id))
            merged = recordings.merge(list(request.recording_ids))
            return recording_to_proto(merged)
        except Exception as exc:
            _abort(context, "MergeRecordings", exc)

    def DeleteRecording(
        self, request: pb.DeleteRecordingRequest, context: grpc.ServicerContext
    ) -> pb.DeleteRecordingResponse:
        """See the proto."""
        try:
            caller = self._caller(context)
            recordings = self._recording_store()
            self._check_recording(caller, recordings.info(request.recording_id))
            recordings.delete(request.recording_id)
            return pb.DeleteRecordingResponse()
        except Exception as exc:
            _abort(context, "DeleteRecording", exc)

    def OpenFirecrackerEndpoint(
        self, request: pb.OpenFirecrackerEndpointRequest, context: grpc.ServicerContext
    ) -> pb.FirecrackerEndpoint:
        """See the proto."""
        try:
            caller = self._caller(context)
            self._region(caller, request.region)
            if request.replay:
                self._check_recording(caller, self._recording_store().info(request.replay))
            caller.check_socket_directory(request.socket_path)
            opened = self._endpoints().open(
                request.region, request.socket_path, record=request.record, replay=request.replay
            )
            return endpoint_to_proto(opened)
        except Exception as exc:
            _abort(context, "OpenFirecrackerEndpoint", exc)

    def CloseFirecrackerEndpoint(
        self, request: pb.CloseFirecrackerEndpointRequest, context: grpc.ServicerContext
    ) -> pb.CloseFirecrackerEndpointResponse:
        """See the proto."""
        try:
            caller = self._caller(context)
            endpoints = self._endpoints()
            for listed in endpoints.list():
                if listed.id == request.endpoint_id:
                    caller.check_use(
                        self._region_owner(listed.region_id),
                        f"endpoint {listed.id}",
                        "endpoint_id",
                    )
            info = endpoints.close(request.endpoint_id)
            return pb.CloseFirecrackerEndpointResponse(endpoint=endpoint_to_proto(info))
        except Exception as exc:
            _abort(context, "CloseFirecrackerEndpoint", exc)

    def ListFirecrackerEndpoints(
        self, request: pb.ListFirecrackerEndpointsRequest, context: grpc.ServicerContext
    ) -> pb.ListFirecrackerEndpointsResponse:
        """See the proto."""
        try:
            caller = self._caller(context)
            return pb.ListFirecrackerEndpointsResponse(
                endpoints=[
                    endpoint_to_proto(info)
                    for info in self._endpoints().list()
                    if caller.may_use(self._region_owner(info.region_id))
                ]
            )
        except Exception as exc:
            _abort(context, "ListFirecrackerEndpoints", exc)

    def _check_recording(self, caller: Caller, info: RecordingInfo) -> None:
        caller.check_use(
            self._region_owner(info.region_id),
            f"recording {info.recording_id}",
            "recording_id",
        )

    def _endpoints(self) -> FirecrackerEndpoints:
        if self._firecracker is None:
            raise errors.ServiceUnavailableError("this service has no Firecracker endpoints")
        return self._firecracker


def endpoint_to_proto(info: EndpointInfo) -> pb.FirecrackerEndpoint:
    """The protobuf form of a Firecracker endpoint."""
    return pb.FirecrackerEndpoint(
        id=info.id,
        socket_path=info.socket_path,
        region_id=info.region_id,
        created=_timestamp(info.created),
        attached=info.attached,
        refused=info.refused,
        record=info.record,
        replay=info.replay,
    )

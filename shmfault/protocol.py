"""The handoff protocol (``docs/protocol.md``) as a sans-IO state machine.

Nothing here touches a socket, a file or a clock. Bytes and received fds go in, events come out;
outgoing messages come back as bytes for the caller to send (``shmfault._unix`` moves them and
their fds). This keeps every rule of the protocol testable without a kernel, in the manner of the
h11 library:

- :func:`encode` / :func:`decode` translate one message to and from one packet, checking every
  field the document constrains. A peer's bad packet raises :class:`RemoteProtocolError` naming
  the field at fault; a value this side cannot encode raises :class:`LocalProtocolError`.
- :class:`ServiceConnection` and :class:`ClientConnection` are the two ends of one connection.
  Their transitions are tables (``SERVICE_RECEIVES``, ``SERVICE_SENDS``, ``CLIENT_SENDS``,
  ``CLIENT_RECEIVES``): a message that is not in the table for the current state is a protocol
  error, never a silent no-op.

File descriptors are plain ints here. Whoever receives a packet owns the fds that came with it;
on a bad packet the machines hand every one of them back (``Violation.fds_to_close``,
``RemoteProtocolError.fds_to_close``) so that none leaks.

``Mode`` and ``UffdAccess`` are :mod:`shmfault.modes`'s, re-exported: one enum per concept,
numbered as on the wire.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from shmfault._abi import Feature, RegisterMode
from shmfault.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from shmfault.modes import Mode, UffdAccess

__all__ = [
    "ATTACH_BODY",
    "CLIENT_RECEIVES",
    "CLIENT_SENDS",
    "ERROR_BODY",
    "HEADER",
    "HELLO_BODY",
    "MAGIC",
    "MAX_PACKET",
    "MAX_REGION_ID",
    "MAX_TOKEN",
    "READY_BODY",
    "SERVICE_RECEIVES",
    "SERVICE_SENDS",
    "SUPPORTED_VERSIONS",
    "VERSION",
    "WELCOME_BODY",
    "Attach",
    "AttachReceived",
    "ClientConnection",
    "ClientEvent",
    "ClientState",
    "Detach",
    "DetachRequested",
    "Detached",
    "DetachedReceived",
    "ErrorCode",
    "ErrorMessage",
    "ErrorReceived",
    "Hello",
    "HelloReceived",
    "Identify",
    "IdentifyReceived",
    "Identity",
    "IdentityReceived",
    "LocalProtocolError",
    "Message",
    "MessageType",
    "Mode",
    "ProtocolError",
    "Ready",
    "ReadyReceived",
    "Reattach",
    "ReattachReceived",
    "RemoteProtocolError",
    "ServiceConnection",
    "ServiceEvent",
    "ServiceState",
    "UffdAccess",
    "Violation",
    "Welcome",
    "WelcomeReceived",
    "decode",
    "encode",
    "fds_expected",
]

# --- framing ---

MAGIC = b"SHMF"
VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (VERSION,)
#: magic, version, type, body_length, reserved
HEADER = struct.Struct("<4sHHII")
MAX_PACKET = 4096
MAX_REGION_ID = 64
MAX_TOKEN = 256

#: HELLO's fixed part: mode, minimum_mode, uffd_access, reserved u8, reserved u32
HELLO_BODY = struct.Struct("<BBBBI")
#: WELCOME's fixed part: mode, 3 reserved bytes, page_size, region_size, attachment_id,
#: register_mode, features
WELCOME_BODY = struct.Struct("<B3sIQQQQ")
#: base, length, region_offset
ATTACH_BODY = struct.Struct("<QQQ")
#: attachment_id
READY_BODY = struct.Struct("<Q")
#: REATTACH's fixed part: mode, 3 reserved bytes, base, length, region_offset
REATTACH_BODY = struct.Struct("<B3sQQQ")
#: ERROR's fixed part: code
ERROR_BODY = struct.Struct("<I")
#: IDENTITY: uid, reserved u32, credential
IDENTITY_BODY = struct.Struct("<II32s")
_STRING_LENGTH = struct.Struct("<H")

_E = TypeVar("_E", bound=enum.IntEnum)
_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF


class MessageType(enum.IntEnum):
    """The ``type`` field of the header. 0x0B-0x0F are reserved."""

    HELLO = 0x01
    WELCOME = 0x02
    ATTACH = 0x03
    READY = 0x04
    DETACH = 0x05
    DETACHED = 0x06
    ERROR = 0x07
    REATTACH = 0x08
    IDENTIFY = 0x09
    IDENTITY = 0x0A


class ErrorCode(enum.IntEnum):
    """ERROR's ``code``; ``docs/protocol.md`` §3.5 says when each is sent."""

    MALFORMED = 1
    VERSION = 2
    UNEXPECTED = 3
    NOT_FOUND = 4
    DENIED = 5
    MODE_UNAVAILABLE = 6
    BAD_RANGE = 7
    BAD_UFFD = 8
    LIMIT = 9
    TIMEOUT = 10
    INTERNAL = 11
    SHUTTING_DOWN = 12
    BUSY = 13


# --- messages ---


@dataclass(frozen=True, slots=True)
class Hello:
    """Client → service, no fds. ``mode`` None lets the service choose; ``minimum_mode`` None
    accepts any mode of the service's chain. (:func:`encode` also takes 0 for either, as on the
    wire; :func:`decode` always gives None.)"""

    message_type: ClassVar[MessageType] = MessageType.HELLO

    region_id: str
    attach_token: str
    mode: Mode | None = None
    minimum_mode: Mode | None = None
    uffd_access: UffdAccess = UffdAccess.FULL


@dataclass(frozen=True, slots=True)
class Welcome:
    """Service → client; carries the region fd except in private-copy.

    ``reasons`` has one ``name: why`` line per mode that was passed over. Any int is taken for
    ``register_mode`` and ``features``; :func:`decode` gives RegisterMode and Feature.
    """

    message_type: ClassVar[MessageType] = MessageType.WELCOME

    mode: Mode
    page_size: int
    region_size: int
    attachment_id: int
    register_mode: RegisterMode | int
    features: Feature | int
    reasons: str = ""


@dataclass(frozen=True, slots=True)
class Attach:
    """Client → service; carries the client's userfaultfd except in eager."""

    message_type: ClassVar[MessageType] = MessageType.ATTACH

    base: int
    length: int
    region_offset: int = 0


@dataclass(frozen=True, slots=True)
class Ready:
    """Service → client, no fds: the service now serves every fault in the attached range."""

    message_type: ClassVar[MessageType] = MessageType.READY

    attachment_id: int


@dataclass(frozen=True, slots=True)
class Detach:
    """Client → service, no fds, empty body."""

    message_type: ClassVar[MessageType] = MessageType.DETACH


@dataclass(frozen=True, slots=True)
class Detached:
    """Service → client, no fds, empty body: the service no longer serves the range."""

    message_type: ClassVar[MessageType] = MessageType.DETACHED


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """Service → client, no fds. The service closes the connection after sending it."""

    message_type: ClassVar[MessageType] = MessageType.ERROR

    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class Reattach:
    """Client → service, after the service restarted: serve this mapping again. Carries the
    client's userfaultfd, and the region fd in the shared modes. ``attach_token`` is the token
    the attachment was made with; the rest must be what it was attached as."""

    message_type: ClassVar[MessageType] = MessageType.REATTACH

    region_id: str
    attach_token: str
    mode: Mode
    base: int
    length: int
    region_offset: int = 0


@dataclass(frozen=True, slots=True)
class Identify:
    """Client → service, no fds, empty body: the first and only message of an identity
    connection. The service answers IDENTITY."""

    message_type: ClassVar[MessageType] = MessageType.IDENTIFY


@dataclass(frozen=True, slots=True)
class Identity:
    """Service → client, no fds: ``credential`` stands for ``uid`` (the connection's
    SO_PEERCRED uid) on gRPC calls for as long as this connection stays open."""

    message_type: ClassVar[MessageType] = MessageType.IDENTITY

    uid: int
    credential: bytes


Message = (
    Hello
    | Welcome
    | Attach
    | Ready
    | Detach
    | Detached
    | ErrorMessage
    | Reattach
    | Identify
    | Identity
)


def _carries_region_fd(mode: Mode) -> bool:
    """The client maps the region's fd, so WELCOME carries it: every mode but private-copy."""
    return mode is not Mode.PRIVATE_COPY


def _carries_uffd(mode: Mode) -> bool:
    """The client registers with a userfaultfd and hands it over in ATTACH: all but eager."""
    return mode is not Mode.EAGER


def fds_expected(message_type: MessageType, mode: Mode | None = None) -> int:
    """How many fds travel with a message of ``message_type`` in ``mode``.

    WELCOME carries the region fd except in private-copy; ATTACH carries the userfaultfd except
    in eager; REATTACH carries the userfaultfd and, except in private-copy, the region fd;
    nothing else carries any. ``mode`` is needed for those three only (the mode of the WELCOME,
    the one the WELCOME before the ATTACH chose, the REATTACH's own): LocalProtocolError
    without it.
    """
    message_type = MessageType(message_type)
    if message_type is MessageType.REATTACH:
        if mode is None:
            raise LocalProtocolError("the fds of REATTACH depend on the mode")
        return 1 + _carries_region_fd(Mode(mode))
    if message_type in (MessageType.WELCOME, MessageType.ATTACH):
        if mode is None:
            raise LocalProtocolError(f"the fds of {message_type.name} depend on the mode")
        mode = Mode(mode)
        if message_type is MessageType.WELCOME:
            return 1 if _carries_region_fd(mode) else 0
        return 1 if _carries_uffd(mode) else 0
    return 0


# --- encoding ---


def _uint(name: str, value: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise LocalProtocolError(f"{name} is {value!r}, not an integer in 0..{maximum:#x}")
    return int(value)


def _enum(name: str, value: object, kind: type[_E]) -> _E:
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return kind(value)
        except ValueError:
            pass
    known = ", ".join(f"{member.value} ({member.name})" for member in kind)
    raise LocalProtocolError(f"{name} is {value!r}, not one of {known}")


def _optional_mode(name: str, value: Mode | None) -> int:
    # 0 is accepted as well as None: it is what the wire says for "any".
    return 0 if value is None or value == 0 else _enum(name, value, Mode).value


def _string(name: str, value: str, minimum: int, maximum: int) -> bytes:
    if not isinstance(value, str):
        raise LocalProtocolError(f"{name} is {value!r}, not a str")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"{name} cannot be encoded as UTF-8: {exc}") from None
    if not minimum <= len(raw) <= maximum:
        raise LocalProtocolError(f"{name} is {len(raw)} bytes of UTF-8, not {minimum}-{maximum}")
    return _STRING_LENGTH.pack(len(raw)) + raw


def encode(message: Message) -> bytes:
    """The packet (header and body) of ``message``.

    Raises LocalProtocolError, naming the field, for a value the protocol cannot carry: an
    integer out of its field's range, an unknown mode or code, a region id or token that is
    empty or too long, or a message whose packet would exceed MAX_PACKET bytes.
    """
    body: bytes
    match message:
        case Hello():
            body = (
                HELLO_BODY.pack(
                    _optional_mode("mode", message.mode),
                    _optional_mode("minimum_mode", message.minimum_mode),
                    _enum("uffd_access", message.uffd_access, UffdAccess).value,
                    0,
                    0,
                )
                + _string("region_id", message.region_id, 1, MAX_REGION_ID)
                + _string("attach_token", message.attach_token, 1, MAX_TOKEN)
            )
        case Welcome():
            body = WELCOME_BODY.pack(
                _enum("mode", message.mode, Mode).value,
                bytes(3),
                _uint("page_size", message.page_size, _U32),
                _uint("region_size", message.region_size, _U64),
                _uint("attachment_id", message.attachment_id, _U64),
                _uint("register_mode", message.register_mode, _U64),
                _uint("features", message.features, _U64),
            ) + _string("reasons", message.reasons, 0, MAX_PACKET)
        case Attach():
            body = ATTACH_BODY.pack(
                _uint("base", message.base, _U64),
                _uint("length", message.length, _U64),
                _uint("region_offset", message.region_offset, _U64),
            )
        case Ready():
            body = READY_BODY.pack(_uint("attachment_id", message.attachment_id, _U64))
        case Reattach():
            mode = _enum("mode", message.mode, Mode)
            if mode is Mode.EAGER:
                raise LocalProtocolError("REATTACH mode is eager: nothing to re-attach")
            body = (
                REATTACH_BODY.pack(
                    mode.value,
                    bytes(3),
                    _uint("base", message.base, _U64),
                    _uint("length", message.length, _U64),
                    _uint("region_offset", message.region_offset, _U64),
                )
                + _string("region_id", message.region_id, 1, MAX_REGION_ID)
                + _string("attach_token", message.attach_token, 1, MAX_TOKEN)
            )
        case Identity():
            if not isinstance(message.credential, bytes) or len(message.credential) != 32:
                raise LocalProtocolError("IDENTITY credential is not 32 bytes")
            body = IDENTITY_BODY.pack(_uint("uid", message.uid, _U32), 0, message.credential)
        case Detach() | Detached() | Identify():
            body = b""
        case ErrorMessage():
            body = ERROR_BODY.pack(_enum("code", message.code, ErrorCode).value) + _string(
                "message", message.message, 0, MAX_PACKET
            )
        case _:
            raise LocalProtocolError(f"{message!r} is not a handoff protocol message")
    size = HEADER.size + len(body)
    if size > MAX_PACKET:
        raise LocalProtocolError(
            f"{message.message_type.name} would be a {size}-byte packet, more than {MAX_PACKET}"
        )
    return HEADER.pack(MAGIC, VERSION, message.message_type, len(body), 0) + body


# --- decoding ---


class _Reader:
    """Takes fields off a body front to back; every shortfall names the field."""

    def __init__(self, kind: MessageType, body: bytes) -> None:
        self.kind = kind
        self.body = body
        self.offset = 0

    def fixed(self, layout: struct.Struct) -> tuple[int | bytes, ...]:
        end = self.offset + layout.size
        if end > len(self.body):
            raise _malformed(
                f"{self.kind.name} body is {len(self.body)} bytes, shorter than its "
                f"{layout.size}-byte fixed part"
            )
        values = layout.unpack_from(self.body, self.offset)
        self.offset = end
        return values

    def string(self, name: str, minimum: int, maximum: int) -> str:
        if self.offset + _STRING_LENGTH.size > len(self.body):
            raise _malformed(f"{self.kind.name} {name}: the body ends inside its length prefix")
        (length,) = _STRING_LENGTH.unpack_from(self.body, self.offset)
        start = self.offset + _STRING_LENGTH.size
        if start + length > len(self.body):
            raise _malformed(
                f"{self.kind.name} {name} declares {length} bytes but only "
                f"{len(self.body) - start} remain"
            )
        if not minimum <= length <= maximum:
            raise _malformed(f"{self.kind.name} {name} is {length} bytes, not {minimum}-{maximum}")
        raw = self.body[start : start + length]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _malformed(f"{self.kind.name} {name} is not valid UTF-8: {exc.reason}") from None
        self.offset = start + length
        return text

    def end(self) -> None:
        extra = len(self.body) - self.offset
        if extra:
            raise _malformed(f"{self.kind.name} body has {extra} trailing bytes")


def _malformed(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.MALFORMED, message)


def _int(value: int | bytes) -> int:
    # struct's integer formats give ints; only the reserved 's' fields give bytes.
    assert isinstance(value, int)
    return value


def _decoded_mode(kind: MessageType, name: str, value: int, *, optional: bool) -> Mode | None:
    if optional and value == 0:
        return None
    try:
        return Mode(value)
    except ValueError:
        allowed = "0-4" if optional else "1-4"
        raise _malformed(f"{kind.name} {name} is {value}, not {allowed}") from None


def _reserved(kind: MessageType, value: int | bytes) -> None:
    if isinstance(value, bytes):
        if any(value):
            raise _malformed(f"{kind.name} reserved bytes are {value.hex()}, not zero")
    elif value:
        raise _malformed(f"{kind.name} reserved field is {value:#x}, not zero")


def _decode_hello(reader: _Reader) -> Hello:
    kind = reader.kind
    mode, minimum, access, reserved_byte, reserved_word = reader.fixed(HELLO_BODY)
    _reserved(kind, reserved_byte)
    _reserved(kind, reserved_word)
    try:
        uffd_access = UffdAccess(_int(access))
    except ValueError:
        raise _malformed(f"HELLO uffd_access is {_int(access)}, not 0-2") from None
    hello = Hello(
        mode=_decoded_mode(kind, "mode", _int(mode), optional=True),
        minimum_mode=_decoded_mode(kind, "minimum_mode", _int(minimum), optional=True),
        uffd_access=uffd_access,
        region_id=reader.string("region_id", 1, MAX_REGION_ID),
        attach_token=reader.string("attach_token", 1, MAX_TOKEN),
    )
    reader.end()
    return hello


def _decode_welcome(reader: _Reader) -> Welcome:
    kind = reader.kind
    mode, reserved, page_size, region_size, attachment_id, register_mode, features = reader.fixed(
        WELCOME_BODY
    )
    _reserved(kind, reserved)
    chosen = _decoded_mode(kind, "mode", _int(mode), optional=False)
    assert chosen is not None
    welcome = Welcome(
        mode=chosen,
        page_size=_int(page_size),
        region_size=_int(region_size),
        attachment_id=_int(attachment_id),
        register_mode=RegisterMode(_int(register_mode)),
        features=Feature(_int(features)),
        reasons=reader.string("reasons", 0, MAX_PACKET),
    )
    reader.end()
    return welcome


def _decode_attach(reader: _Reader) -> Attach:
    base, length, region_offset = reader.fixed(ATTACH_BODY)
    reader.end()
    return Attach(base=_int(base), length=_int(length), region_offset=_int(region_offset))


def _decode_ready(reader: _Reader) -> Ready:
    (attachment_id,) = reader.fixed(READY_BODY)
    reader.end()
    return Ready(attachment_id=_int(attachment_id))


def _decode_reattach(reader: _Reader) -> Reattach:
    kind = reader.kind
    mode, reserved, base, length, region_offset = reader.fixed(REATTACH_BODY)
    _reserved(kind, reserved)
    chosen = _decoded_mode(kind, "mode", _int(mode), optional=False)
    assert chosen is not None
    if chosen is Mode.EAGER:
        raise _malformed("REATTACH mode is eager: an eager attachment has nothing to re-attach")
    reattach = Reattach(
        mode=chosen,
        base=_int(base),
        length=_int(length),
        region_offset=_int(region_offset),
        region_id=reader.string("region_id", 1, MAX_REGION_ID),
        attach_token=reader.string("attach_token", 1, MAX_TOKEN),
    )
    reader.end()
    return reattach


def _decode_detach(reader: _Reader) -> Detach:
    reader.end()
    return Detach()


def _decode_detached(reader: _Reader) -> Detached:
    reader.end()
    return Detached()


def _decode_identify(reader: _Reader) -> Identify:
    reader.end()
    return Identify()


def _decode_identity(reader: _Reader) -> Identity:
    uid, reserved, credential = reader.fixed(IDENTITY_BODY)
    _reserved(reader.kind, reserved)
    reader.end()
    assert isinstance(credential, bytes)
    return Identity(uid=_int(uid), credential=credential)


def _decode_error(reader: _Reader) -> ErrorMessage:
    code = _int(reader.fixed(ERROR_BODY)[0])
    try:
        error_code = ErrorCode(code)
    except ValueError:
        raise _malformed(f"ERROR code is {code}, not 1-{max(ErrorCode).value}") from None
    error = ErrorMessage(code=error_code, message=reader.string("message", 0, MAX_PACKET))
    reader.end()
    return error


_DECODERS: dict[MessageType, Callable[[_Reader], Message]] = {
    MessageType.HELLO: _decode_hello,
    MessageType.WELCOME: _decode_welcome,
    MessageType.ATTACH: _decode_attach,
    MessageType.READY: _decode_ready,
    MessageType.DETACH: _decode_detach,
    MessageType.DETACHED: _decode_detached,
    MessageType.ERROR: _decode_error,
    MessageType.REATTACH: _decode_reattach,
    MessageType.IDENTIFY: _decode_identify,
    MessageType.IDENTITY: _decode_identity,
}


def decode(packet: bytes) -> Message:
    """The message in ``packet`` (one whole packet as received).

    Checks, in this order: the packet holds a header and is at most MAX_PACKET bytes; the magic;
    the version (ErrorCode.VERSION, listing SUPPORTED_VERSIONS); ``body_length`` equals the
    bytes after the header; the reserved field is zero; the type is known; then the body field
    by field (reserved fields zero, modes and codes in range, strings within their bounds and
    valid UTF-8, nothing left over). Any failure raises RemoteProtocolError with
    ErrorCode.MALFORMED (or VERSION) and a message naming the field at fault.
    """
    packet = bytes(packet)
    if len(packet) < HEADER.size:
        raise _malformed(
            f"packet is {len(packet)} bytes, shorter than the {HEADER.size}-byte header"
        )
    if len(packet) > MAX_PACKET:
        raise _malformed(f"packet is {len(packet)} bytes, more than {MAX_PACKET}")
    magic, version, type_number, body_length, reserved = HEADER.unpack_from(packet)
    if magic != MAGIC:
        raise _malformed(f"magic is {magic!r}, not {MAGIC!r}")
    if version not in SUPPORTED_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
        raise RemoteProtocolError(
            ErrorCode.VERSION,
            f"version {version} is not supported; supported versions: {supported}",
        )
    if body_length != len(packet) - HEADER.size:
        raise _malformed(
            f"body_length is {body_length} but {len(packet) - HEADER.size} bytes follow the header"
        )
    if reserved != 0:
        raise _malformed(f"header reserved field is {reserved:#x}, not zero")
    try:
        kind = MessageType(type_number)
    except ValueError:
        raise _malformed(f"message type {type_number:#04x} is unknown") from None
    return _DECODERS[kind](_Reader(kind, packet[HEADER.size :]))


def _error_packet(code: ErrorCode, message: str) -> bytes:
    """An ERROR packet; ``message`` is cut (at a character boundary) to fit in MAX_PACKET, so
    that reporting a failure can never itself fail."""
    room = MAX_PACKET - HEADER.size - ERROR_BODY.size - _STRING_LENGTH.size
    raw = message.encode("utf-8", errors="replace")
    if len(raw) > room:
        message = raw[:room].decode("utf-8", errors="ignore")
    else:
        message = raw.decode("utf-8")
    return encode(ErrorMessage(code, message))


# --- the service's end ---


class ServiceState(enum.Enum):
    """Where the service's end of a connection is (``docs/protocol.md`` §4).

    The document's AWAIT_HELLO, AWAIT_ATTACH and ATTACHED each have a ``SEND_*`` twin here for
    the moment between receiving a message and answering it, so that every answer can be
    checked against what was asked.
    """

    AWAIT_HELLO = "AWAIT_HELLO"
    SEND_WELCOME = "SEND_WELCOME"  # HELLO received: answer WELCOME or ERROR
    AWAIT_ATTACH = "AWAIT_ATTACH"
    SEND_READY = "SEND_READY"  # ATTACH received: answer READY or ERROR
    ATTACHED = "ATTACHED"
    SEND_DETACHED = "SEND_DETACHED"  # DETACH received: answer DETACHED
    SEND_IDENTITY = "SEND_IDENTITY"  # IDENTIFY received: answer IDENTITY or ERROR
    IDENTIFIED = "IDENTIFIED"  # the credential lives until the connection ends
    CLOSED = "CLOSED"


_S = ServiceState

#: (state, message received) -> next state. Anything missing is UNEXPECTED.
SERVICE_RECEIVES: dict[tuple[ServiceState, MessageType], ServiceState] = {
    (_S.AWAIT_HELLO, MessageType.HELLO): _S.SEND_WELCOME,
    (_S.AWAIT_HELLO, MessageType.REATTACH): _S.SEND_READY,
    (_S.AWAIT_HELLO, MessageType.IDENTIFY): _S.SEND_IDENTITY,
    (_S.AWAIT_ATTACH, MessageType.ATTACH): _S.SEND_READY,
    (_S.ATTACHED, MessageType.DETACH): _S.SEND_DETACHED,
}

#: (state, message sent) -> next state. ERROR may be sent in every state but CLOSED.
SERVICE_SENDS: dict[tuple[ServiceState, MessageType], ServiceState] = {
    (_S.SEND_WELCOME, MessageType.WELCOME): _S.AWAIT_ATTACH,
    (_S.SEND_READY, MessageType.READY): _S.ATTACHED,
    (_S.SEND_DETACHED, MessageType.DETACHED): _S.CLOSED,
    (_S.SEND_IDENTITY, MessageType.IDENTITY): _S.IDENTIFIED,
    **{(state, MessageType.ERROR): _S.CLOSED for state in ServiceState if state is not _S.CLOSED},
}

#: The states in which the handshake timeout still runs: HELLO and ATTACH have not both
#: arrived. Once ATTACH is in, the service's own work (an eager fill) may take longer.
_HANDSHAKE_STATES = frozenset({_S.AWAIT_HELLO, _S.SEND_WELCOME, _S.AWAIT_ATTACH})


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """A valid HELLO: check region, token and mode, then answer :meth:`ServiceConnection.welcome`
    or :meth:`ServiceConnection.error`."""

    hello: Hello


@dataclass(frozen=True, slots=True)
class AttachReceived:
    """A valid ATTACH. ``uffd_fd`` (None in eager) is the client's userfaultfd, now owned by the
    caller. Check and register the range, then answer ``ready`` or ``error``."""

    attach: Attach
    uffd_fd: int | None


@dataclass(frozen=True, slots=True)
class IdentifyReceived:
    """The client asked for a credential: answer :meth:`ServiceConnection.identity` (or
    ``error``), then keep the connection until it ends, and revoke the credential then."""


@dataclass(frozen=True, slots=True)
class DetachRequested:
    """The client asked to detach: stop serving, then answer :meth:`ServiceConnection.detached`."""


@dataclass(frozen=True, slots=True)
class Violation:
    """The client broke the protocol; the connection is now CLOSED.

    The caller sends ``close_reply`` (an ERROR packet with ``code`` and ``message``), closes the
    connection and closes every fd in ``fds_to_close``: all that arrived with the bad packet.
    """

    code: ErrorCode
    message: str
    fds_to_close: list[int]
    close_reply: bytes


@dataclass(frozen=True, slots=True)
class ReattachReceived:
    """A valid REATTACH. ``uffd_fd`` and ``region_fd`` (None in private-copy) are now owned by
    the caller. Check the token and the range, adopt the userfaultfd, then answer ``ready``
    (with any new attachment id) or ``error``."""

    reattach: Reattach
    uffd_fd: int
    region_fd: int | None


ServiceEvent = (
    HelloReceived
    | AttachReceived
    | ReattachReceived
    | IdentifyReceived
    | DetachRequested
    | Violation
)


class ServiceConnection:
    """The service's end of one handoff connection. Pure: no I/O, never blocks.

    Feed every received packet to :meth:`receive`; send the bytes the answering methods return
    (with the region fd after :meth:`welcome`, except in private-copy). A method called in a
    state that does not allow it raises LocalProtocolError and changes nothing.
    """

    def __init__(self) -> None:
        self._state = ServiceState.AWAIT_HELLO
        self._hello: Hello | None = None
        self._welcome: Welcome | None = None
        self._reattach: Reattach | None = None

    @property
    def state(self) -> ServiceState:
        return self._state

    @property
    def mode(self) -> Mode | None:
        """The mode of the WELCOME sent (or of the REATTACH received), None before."""
        if self._reattach is not None:
            return self._reattach.mode
        return self._welcome.mode if self._welcome is not None else None

    @property
    def attachment_id(self) -> int | None:
        """The attachment id of the WELCOME sent, None before."""
        return self._welcome.attachment_id if self._welcome is not None else None

    def receive(
        self, packet: bytes, fds: Sequence[int] = (), *, truncated: bool = False
    ) -> ServiceEvent:
        """The event for one received packet and the fds that came with it.

        ``truncated`` says the packet or its control data did not arrive whole (MSG_TRUNC,
        MSG_CTRUNC, or more than MAX_PACKET bytes). Anything wrong (truncation, a malformed or
        unsupported packet, a message not allowed now, the wrong number of fds) returns a
        :class:`Violation` and moves to CLOSED. LocalProtocolError if already CLOSED.
        """
        fds = list(fds)
        if self._state is ServiceState.CLOSED:
            raise LocalProtocolError("receive() on a CLOSED connection")
        if truncated:
            if len(packet) > MAX_PACKET:
                why = f"packet is larger than {MAX_PACKET} bytes"
            else:
                why = "packet or its control message was truncated (more fds than allowed)"
            return self._violation(ErrorCode.MALFORMED, why, fds)
        try:
            message = decode(packet)
        except RemoteProtocolError as exc:
            return self._violation(ErrorCode(exc.code), exc.message, fds)
        kind = message.message_type
        next_state = SERVICE_RECEIVES.get((self._state, kind))
        if next_state is None:
            return self._violation(
                ErrorCode.UNEXPECTED,
                f"{kind.name} is not allowed in state {self._state.name}{self._expecting()}",
                fds,
            )
        mode = message.mode if isinstance(message, Reattach) else self.mode
        expected = fds_expected(kind, mode)
        if len(fds) != expected:
            return self._violation(
                ErrorCode.MALFORMED,
                f"{kind.name}{self._in_mode(kind, mode)} carries {expected} fd(s), got {len(fds)}",
                fds,
            )
        event: ServiceEvent
        match message:
            case Hello():
                self._hello = message
                event = HelloReceived(message)
            case Attach():
                event = AttachReceived(message, fds[0] if fds else None)
            case Reattach():
                self._reattach = message
                event = ReattachReceived(message, fds[0], fds[1] if len(fds) > 1 else None)
            case Identify():
                event = IdentifyReceived()
            case _:
                event = DetachRequested()
        self._state = next_state
        return event

    def welcome(self, welcome: Welcome) -> bytes:
        """The WELCOME packet answering the HELLO just received; send the region fd with it
        unless ``welcome.mode`` is private-copy. LocalProtocolError outside SEND_WELCOME, or if
        the mode contradicts the HELLO (another mode than the one asked for; a mode that needs a
        userfaultfd for a client that has none)."""
        next_state = self._sends(MessageType.WELCOME)
        hello = self._hello
        assert hello is not None
        mode = _enum("mode", welcome.mode, Mode)
        if hello.mode is not None and mode is not hello.mode:
            raise LocalProtocolError(
                f"WELCOME mode {mode.wire_name} but the client asked for {hello.mode.wire_name}"
            )
        if hello.uffd_access is UffdAccess.NONE and _carries_uffd(mode):
            raise LocalProtocolError(
                f"WELCOME mode {mode.wire_name} needs a userfaultfd; the client has none"
            )
        packet = encode(welcome)
        self._welcome = welcome
        self._state = next_state
        return packet

    def ready(self, attachment_id: int) -> bytes:
        """The READY packet answering the ATTACH (or REATTACH) just received. LocalProtocolError
        outside SEND_READY or if ``attachment_id`` is not the WELCOME's (a REATTACH has no
        WELCOME: any id)."""
        next_state = self._sends(MessageType.READY)
        if self._reattach is None and attachment_id != self.attachment_id:
            raise LocalProtocolError(
                f"READY attachment_id {attachment_id} is not the WELCOME's {self.attachment_id}"
            )
        packet = encode(Ready(attachment_id))
        self._state = next_state
        return packet

    def identity(self, uid: int, credential: bytes) -> bytes:
        """The IDENTITY packet answering IDENTIFY; the connection is then IDENTIFIED, and
        receives nothing more. LocalProtocolError outside SEND_IDENTITY."""
        next_state = self._sends(MessageType.IDENTITY)
        packet = encode(Identity(uid, credential))
        self._state = next_state
        return packet

    def detached(self) -> bytes:
        """The DETACHED packet answering DETACH; the connection is then CLOSED.
        LocalProtocolError outside SEND_DETACHED."""
        next_state = self._sends(MessageType.DETACHED)
        packet = encode(Detached())
        self._state = next_state
        return packet

    def error(self, code: ErrorCode, message: str) -> bytes:
        """An ERROR packet; the connection is then CLOSED (send it, then close the socket and
        every fd received on it). ``message`` is cut to fit one packet. LocalProtocolError when
        already CLOSED or for an unknown ``code``."""
        next_state = self._sends(MessageType.ERROR)
        packet = _error_packet(_enum("code", code, ErrorCode), message)
        self._state = next_state
        return packet

    def timed_out(self) -> bytes | None:
        """The handshake timeout expired. While HELLO and ATTACH have not both arrived, returns
        the ERROR TIMEOUT packet to send and moves to CLOSED; otherwise returns None and
        changes nothing."""
        if self._state not in _HANDSHAKE_STATES:
            return None
        missing = "HELLO" if self._state is ServiceState.AWAIT_HELLO else "ATTACH"
        return self.error(ErrorCode.TIMEOUT, f"no {missing} within the handshake timeout")

    def connection_lost(self) -> None:
        """The connection ended (EOF, reset, or the peer process died): moves to CLOSED. Legal
        in every state, CLOSED included."""
        self._state = ServiceState.CLOSED

    def _sends(self, kind: MessageType) -> ServiceState:
        next_state = SERVICE_SENDS.get((self._state, kind))
        if next_state is None:
            raise LocalProtocolError(f"cannot send {kind.name} in state {self._state.name}")
        return next_state

    def _violation(self, code: ErrorCode, message: str, fds: list[int]) -> Violation:
        self._state = ServiceState.CLOSED
        return Violation(code, message, fds, _error_packet(code, message))

    def _expecting(self) -> str:
        wanted = [kind.name for state, kind in SERVICE_RECEIVES if state is self._state]
        return f" (expecting {' or '.join(wanted)})" if wanted else " (expecting nothing)"

    def _in_mode(self, kind: MessageType, mode: Mode | None) -> str:
        if kind in (MessageType.ATTACH, MessageType.REATTACH) and mode:
            return f" in {mode.wire_name}"
        return ""


# --- the client's end ---


class ClientState(enum.Enum):
    """Where the client's end of a connection is."""

    SEND_HELLO = "SEND_HELLO"
    AWAIT_WELCOME = "AWAIT_WELCOME"
    SEND_ATTACH = "SEND_ATTACH"  # WELCOME received: map, register, then ATTACH
    AWAIT_READY = "AWAIT_READY"
    ATTACHED = "ATTACHED"
    AWAIT_DETACHED = "AWAIT_DETACHED"
    AWAIT_IDENTITY = "AWAIT_IDENTITY"
    IDENTIFIED = "IDENTIFIED"  # keep the connection open while the credential is in use
    CLOSED = "CLOSED"


_C = ClientState

#: (state, message sent) -> next state.
CLIENT_SENDS: dict[tuple[ClientState, MessageType], ClientState] = {
    (_C.SEND_HELLO, MessageType.HELLO): _C.AWAIT_WELCOME,
    (_C.SEND_HELLO, MessageType.REATTACH): _C.AWAIT_READY,
    (_C.SEND_HELLO, MessageType.IDENTIFY): _C.AWAIT_IDENTITY,
    (_C.SEND_ATTACH, MessageType.ATTACH): _C.AWAIT_READY,
    (_C.ATTACHED, MessageType.DETACH): _C.AWAIT_DETACHED,
}

#: (state, message received) -> next state. The service may send ERROR at any time.
CLIENT_RECEIVES: dict[tuple[ClientState, MessageType], ClientState] = {
    (_C.AWAIT_WELCOME, MessageType.WELCOME): _C.SEND_ATTACH,
    (_C.AWAIT_READY, MessageType.READY): _C.ATTACHED,
    (_C.AWAIT_DETACHED, MessageType.DETACHED): _C.CLOSED,
    (_C.AWAIT_IDENTITY, MessageType.IDENTITY): _C.IDENTIFIED,
    **{(state, MessageType.ERROR): _C.CLOSED for state in ClientState if state is not _C.CLOSED},
}


@dataclass(frozen=True, slots=True)
class WelcomeReceived:
    """The service's WELCOME. ``region_fd`` (None in private-copy) is now the caller's to map
    and close."""

    welcome: Welcome
    region_fd: int | None


@dataclass(frozen=True, slots=True)
class ReadyReceived:
    """The service serves the attached range from now on."""

    attachment_id: int


@dataclass(frozen=True, slots=True)
class ErrorReceived:
    """The service refused or failed; it closes the connection. The connection is CLOSED."""

    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class DetachedReceived:
    """The service no longer serves the range. The connection is CLOSED."""


@dataclass(frozen=True, slots=True)
class IdentityReceived:
    """The service's IDENTITY: present ``credential`` on gRPC calls while the connection stays
    open."""

    uid: int
    credential: bytes


ClientEvent = WelcomeReceived | ReadyReceived | ErrorReceived | DetachedReceived | IdentityReceived


class ClientConnection:
    """The client's end of one handoff connection. Pure: no I/O, never blocks.

    A method called in a state that does not allow it raises LocalProtocolError and changes
    nothing. A bad packet from the service raises RemoteProtocolError (its ``fds_to_close``
    lists every fd that came with it) and moves to CLOSED: the client then closes the socket.
    """

    def __init__(self) -> None:
        self._state = ClientState.SEND_HELLO
        self._hello: Hello | None = None
        self._welcome: Welcome | None = None
        self._reattach: Reattach | None = None

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def mode(self) -> Mode | None:
        """The mode the service chose in WELCOME (or the REATTACH's), None before."""
        if self._reattach is not None:
            return self._reattach.mode
        return self._welcome.mode if self._welcome is not None else None

    @property
    def welcome_message(self) -> Welcome | None:
        """The WELCOME received, None before."""
        return self._welcome

    def hello(self, hello: Hello) -> bytes:
        """The HELLO packet (no fds). LocalProtocolError outside SEND_HELLO or for a value the
        protocol cannot carry."""
        next_state = self._sends(MessageType.HELLO)
        packet = encode(hello)
        # Kept as the service will read it (0 modes become None, ints become enums), so that the
        # WELCOME is checked against what was really sent.
        self._hello = _decode_hello(_Reader(MessageType.HELLO, packet[HEADER.size :]))
        self._state = next_state
        return packet

    def reattach(self, reattach: Reattach) -> bytes:
        """The REATTACH packet, the first of a connection to a restarted service; send the
        userfaultfd with it, then the region fd unless ``reattach.mode`` is private-copy.
        LocalProtocolError outside SEND_HELLO or for a value the protocol cannot carry."""
        next_state = self._sends(MessageType.REATTACH)
        packet = encode(reattach)
        self._reattach = reattach
        self._state = next_state
        return packet

    def attach(self, attach: Attach) -> bytes:
        """The ATTACH packet; send the userfaultfd with it unless :attr:`mode` is eager.
        LocalProtocolError outside SEND_ATTACH."""
        next_state = self._sends(MessageType.ATTACH)
        packet = encode(attach)
        self._state = next_state
        return packet

    def identify(self) -> bytes:
        """The IDENTIFY packet (no fds), the first of an identity connection.
        LocalProtocolError outside SEND_HELLO."""
        next_state = self._sends(MessageType.IDENTIFY)
        packet = encode(Identify())
        self._state = next_state
        return packet

    def detach(self) -> bytes:
        """The DETACH packet (no fds). LocalProtocolError outside ATTACHED."""
        next_state = self._sends(MessageType.DETACH)
        packet = encode(Detach())
        self._state = next_state
        return packet

    def connection_lost(self) -> None:
        """The connection ended: moves to CLOSED. Legal in every state."""
        self._state = ClientState.CLOSED

    def receive(
        self, packet: bytes, fds: Sequence[int] = (), *, truncated: bool = False
    ) -> ClientEvent:
        """The event for one packet from the service and the fds that came with it.

        Raises RemoteProtocolError (moving to CLOSED, with every fd in ``fds_to_close``) for a
        truncated or malformed packet, a message not allowed now, the wrong number of fds, or
        a WELCOME/READY that contradicts what was asked (another mode than the one requested,
        a mode needing a userfaultfd the client said it lacks, another attachment id).
        LocalProtocolError if already CLOSED.
        """
        fds = list(fds)
        if self._state is ClientState.CLOSED:
            raise LocalProtocolError("receive() on a CLOSED connection")
        try:
            return self._receive(packet, fds, truncated)
        except RemoteProtocolError as exc:
            self._state = ClientState.CLOSED
            raise RemoteProtocolError(exc.code, exc.message, fds) from None

    def _receive(self, packet: bytes, fds: list[int], truncated: bool) -> ClientEvent:
        if truncated:
            raise _malformed("packet or its control message from the service was truncated")
        message = decode(packet)
        kind = message.message_type
        next_state = CLIENT_RECEIVES.get((self._state, kind))
        if next_state is None:
            raise RemoteProtocolError(
                ErrorCode.UNEXPECTED, f"{kind.name} is not allowed in state {self._state.name}"
            )
        mode = message.mode if isinstance(message, Welcome) else self.mode
        expected = fds_expected(kind, mode)
        if len(fds) != expected:
            raise _malformed(f"{kind.name} carries {expected} fd(s), got {len(fds)}")
        event: ClientEvent
        match message:
            case Welcome():
                self._check_welcome(message)
                self._welcome = message
                event = WelcomeReceived(message, fds[0] if fds else None)
            case Ready():
                if self._reattach is None and message.attachment_id != self._welcome_id():
                    raise _malformed(
                        f"READY attachment_id {message.attachment_id} is not the WELCOME's "
                        f"{self._welcome_id()}"
                    )
                event = ReadyReceived(message.attachment_id)
            case ErrorMessage():
                event = ErrorReceived(message.code, message.message)
            case Identity():
                event = IdentityReceived(message.uid, message.credential)
            case _:
                event = DetachedReceived()
        self._state = next_state
        return event

    def _check_welcome(self, welcome: Welcome) -> None:
        hello = self._hello
        assert hello is not None
        if hello.mode is not None and welcome.mode is not hello.mode:
            raise _malformed(
                f"WELCOME mode is {welcome.mode.wire_name}, "
                f"not the {hello.mode.wire_name} asked for"
            )
        if hello.uffd_access is UffdAccess.NONE and _carries_uffd(welcome.mode):
            raise _malformed(
                f"WELCOME mode {welcome.mode.wire_name} needs a userfaultfd; the client has none"
            )

    def _welcome_id(self) -> int:
        assert self._welcome is not None
        return self._welcome.attachment_id

    def _sends(self, kind: MessageType) -> ClientState:
        next_state = CLIENT_SENDS.get((self._state, kind))
        if next_state is None:
            raise LocalProtocolError(f"cannot send {kind.name} in state {self._state.name}")
        return next_state

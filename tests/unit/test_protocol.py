"""The handoff protocol without sockets: the byte layout of every message (packed by hand from
docs/protocol.md, offset by offset), every malformed input, and every transition of both ends'
state machines. fds are plain ints here: the machines never touch them, only hand them on."""

from __future__ import annotations

import functools
import pickle
import random
import struct
from collections.abc import Callable
from typing import TypeVar

import pytest

from shmfault import modes
from shmfault._abi import Feature, RegisterMode
from shmfault.errors import LocalProtocolError, ProtocolError, RemoteProtocolError, ShmfaultError
from shmfault.protocol import (
    CLIENT_RECEIVES,
    CLIENT_SENDS,
    HEADER,
    MAGIC,
    MAX_PACKET,
    MAX_REGION_ID,
    MAX_TOKEN,
    SERVICE_RECEIVES,
    SERVICE_SENDS,
    SUPPORTED_VERSIONS,
    VERSION,
    Attach,
    AttachReceived,
    ClientConnection,
    ClientState,
    Detach,
    Detached,
    DetachedReceived,
    DetachRequested,
    ErrorCode,
    ErrorMessage,
    ErrorReceived,
    Hello,
    HelloReceived,
    Identify,
    IdentifyReceived,
    Identity,
    IdentityReceived,
    Message,
    MessageType,
    Mode,
    Ready,
    ReadyReceived,
    Reattach,
    ReattachReceived,
    ServiceConnection,
    ServiceState,
    UffdAccess,
    Violation,
    Welcome,
    WelcomeReceived,
    decode,
    encode,
    fds_expected,
)

FD = 100  # stands for a received fd: the machines only pass fds on
ATTACHMENT_ID = 7
EVENTS = Feature.EVENT_REMOVE | Feature.EVENT_UNMAP | Feature.EVENT_REMAP


# --- building packets by hand ---


def header(
    kind: int,
    body_length: int,
    *,
    magic: bytes = b"SHMF",
    version: int = 1,
    reserved: int = 0,
) -> bytes:
    return magic + struct.pack("<HHII", version, kind, body_length, reserved)


def packet(kind: int, body: bytes = b"", **fields: int | bytes) -> bytes:
    return header(kind, len(body), **fields) + body  # type: ignore[arg-type]


def string(raw: bytes) -> bytes:
    return struct.pack("<H", len(raw)) + raw


def hello_body(
    mode: int = 0,
    minimum: int = 0,
    access: int = 2,
    region_id: bytes = b"r1",
    token: bytes = b"t1",
    reserved: bytes = b"\0\0\0\0\0",
) -> bytes:
    return bytes([mode, minimum, access]) + reserved + string(region_id) + string(token)


def welcome_body(mode: int = 1, reserved: bytes = b"\0\0\0", reasons: bytes = b"") -> bytes:
    fixed = struct.pack("<B", mode) + reserved + struct.pack("<IQQQQ", 4096, 1 << 20, 7, 1, 0x64)
    return fixed + string(reasons)


def welcome_for(mode: Mode, attachment_id: int = ATTACHMENT_ID) -> Welcome:
    uses_uffd = mode is not Mode.EAGER
    register = RegisterMode.MISSING if uses_uffd else RegisterMode(0)
    if mode is Mode.SHARED_CONTINUE:
        register |= RegisterMode.MINOR
    return Welcome(
        mode=mode,
        page_size=4096,
        region_size=1 << 20,
        attachment_id=attachment_id,
        register_mode=register,
        features=(EVENTS | Feature.MISSING_SHMEM) if uses_uffd else Feature(0),
        reasons="" if mode is Mode.SHARED_COPY else "shared-copy: the kernel lacks MISSING_SHMEM",
    )


HELLO = Hello("region-1", "token-1")
ATTACH = Attach(base=0x7F00_0000_0000, length=0x10000, region_offset=0)
REATTACH = Reattach("region-1", "token-1", Mode.SHARED_COPY, 0x7F00_0000_0000, 0x10000, 0)
CREDENTIAL = bytes(range(32))
IDENTITY = Identity(1000, CREDENTIAL)

#: one valid message of every type, as a peer would send it
SAMPLES: dict[MessageType, Message] = {
    MessageType.HELLO: HELLO,
    MessageType.WELCOME: welcome_for(Mode.SHARED_COPY),
    MessageType.ATTACH: ATTACH,
    MessageType.READY: Ready(ATTACHMENT_ID),
    MessageType.DETACH: Detach(),
    MessageType.DETACHED: Detached(),
    MessageType.ERROR: ErrorMessage(ErrorCode.INTERNAL, "boom"),
    MessageType.REATTACH: REATTACH,
    MessageType.IDENTIFY: Identify(),
    MessageType.IDENTITY: IDENTITY,
}


# --- constants as the document gives them ---


def test_constants_are_the_documents() -> None:
    assert MAGIC == b"SHMF"
    assert int.from_bytes(MAGIC, "little") == 0x464D4853
    assert VERSION == 1
    assert VERSION in SUPPORTED_VERSIONS
    assert HEADER.size == 16
    assert (MAX_PACKET, MAX_REGION_ID, MAX_TOKEN) == (4096, 64, 256)
    assert {t.name: t.value for t in MessageType} == {
        "HELLO": 1,
        "WELCOME": 2,
        "ATTACH": 3,
        "READY": 4,
        "DETACH": 5,
        "DETACHED": 6,
        "ERROR": 7,
        "REATTACH": 8,
        "IDENTIFY": 9,
        "IDENTITY": 10,
    }
    assert [(m.value, m.wire_name) for m in Mode] == [
        (1, "shared-copy"),
        (2, "shared-continue"),
        (3, "private-copy"),
        (4, "eager"),
    ]
    assert [(a.name, a.value) for a in UffdAccess] == [
        ("NONE", 0),
        ("USER_MODE_ONLY", 1),
        ("FULL", 2),
    ]
    assert [(c.value, c.name) for c in ErrorCode] == list(
        enumerate(
            [
                "MALFORMED",
                "VERSION",
                "UNEXPECTED",
                "NOT_FOUND",
                "DENIED",
                "MODE_UNAVAILABLE",
                "BAD_RANGE",
                "BAD_UFFD",
                "LIMIT",
                "TIMEOUT",
                "INTERNAL",
                "SHUTTING_DOWN",
                "BUSY",
            ],
            start=1,
        )
    )


def test_mode_and_uffd_access_are_the_modes_modules() -> None:
    # One enum per concept: the protocol speaks the policy's modes, numbered as on the wire.
    assert Mode is modes.Mode
    assert UffdAccess is modes.UffdAccess


def test_zero_mode_in_a_hello_is_any() -> None:
    zero = Hello("r", "t", mode=0, minimum_mode=0)  # type: ignore[arg-type]
    assert encode(zero) == encode(Hello("r", "t"))
    assert decode(encode(zero)) == Hello("r", "t", mode=None, minimum_mode=None)


@pytest.mark.parametrize(
    ("kind", "mode", "count"),
    [
        (MessageType.WELCOME, Mode.SHARED_COPY, 1),
        (MessageType.WELCOME, Mode.SHARED_CONTINUE, 1),
        (MessageType.WELCOME, Mode.PRIVATE_COPY, 0),
        (MessageType.WELCOME, Mode.EAGER, 1),
        (MessageType.ATTACH, Mode.SHARED_COPY, 1),
        (MessageType.ATTACH, Mode.SHARED_CONTINUE, 1),
        (MessageType.ATTACH, Mode.PRIVATE_COPY, 1),
        (MessageType.ATTACH, Mode.EAGER, 0),
        *[
            (kind, mode, 0)
            for kind in (
                MessageType.HELLO,
                MessageType.READY,
                MessageType.DETACH,
                MessageType.DETACHED,
                MessageType.ERROR,
            )
            for mode in (None, *Mode)
        ],
    ],
)
def test_fds_expected(kind: MessageType, mode: Mode | None, count: int) -> None:
    assert fds_expected(kind, mode) == count


@pytest.mark.parametrize("kind", [MessageType.WELCOME, MessageType.ATTACH])
def test_fds_expected_needs_the_mode_where_it_matters(kind: MessageType) -> None:
    with pytest.raises(LocalProtocolError, match="depend on the mode"):
        fds_expected(kind)


# --- the byte layout, packed by hand ---

GOLDEN: list[tuple[Message, bytes]] = [
    (
        Hello("r1", "tok", mode=Mode.SHARED_CONTINUE, minimum_mode=Mode.PRIVATE_COPY),
        b"SHMF\x01\x00\x01\x00\x11\x00\x00\x00\x00\x00\x00\x00"
        b"\x02\x03\x02\x00\x00\x00\x00\x00"
        b"\x02\x00r1"
        b"\x03\x00tok",
    ),
    (
        Hello("é", "t", uffd_access=UffdAccess.NONE),
        b"SHMF\x01\x00\x01\x00\x0f\x00\x00\x00\x00\x00\x00\x00"
        b"\x00\x00\x00\x00\x00\x00\x00\x00"
        b"\x02\x00\xc3\xa9"
        b"\x01\x00t",
    ),
    (
        Welcome(
            mode=Mode.SHARED_COPY,
            page_size=0x1000,
            region_size=0x1_0000_0000,
            attachment_id=0x0102030405060708,
            register_mode=RegisterMode.MISSING,
            features=EVENTS | Feature.MISSING_SHMEM,
            reasons="x: y",
        ),
        b"SHMF\x01\x00\x02\x00\x2e\x00\x00\x00\x00\x00\x00\x00"
        b"\x01\x00\x00\x00"
        b"\x00\x10\x00\x00"
        b"\x00\x00\x00\x00\x01\x00\x00\x00"
        b"\x08\x07\x06\x05\x04\x03\x02\x01"
        b"\x01\x00\x00\x00\x00\x00\x00\x00"
        b"\x6c\x00\x00\x00\x00\x00\x00\x00"
        b"\x04\x00x: y",
    ),
    (
        Attach(base=0x7F00_0000_1000, length=0x2000, region_offset=0x3000),
        b"SHMF\x01\x00\x03\x00\x18\x00\x00\x00\x00\x00\x00\x00"
        b"\x00\x10\x00\x00\x00\x7f\x00\x00"
        b"\x00\x20\x00\x00\x00\x00\x00\x00"
        b"\x00\x30\x00\x00\x00\x00\x00\x00",
    ),
    (
        Ready(0x2A),
        b"SHMF\x01\x00\x04\x00\x08\x00\x00\x00\x00\x00\x00\x00\x2a\x00\x00\x00\x00\x00\x00\x00",
    ),
    (Detach(), b"SHMF\x01\x00\x05\x00\x00\x00\x00\x00\x00\x00\x00\x00"),
    (Detached(), b"SHMF\x01\x00\x06\x00\x00\x00\x00\x00\x00\x00\x00\x00"),
    (
        ErrorMessage(ErrorCode.BAD_RANGE, "length 0"),
        b"SHMF\x01\x00\x07\x00\x0e\x00\x00\x00\x00\x00\x00\x00\x07\x00\x00\x00\x08\x00length 0",
    ),
    (Identify(), b"SHMF\x01\x00\x09\x00\x00\x00\x00\x00\x00\x00\x00\x00"),
    (
        Identity(0x3E8, bytes(range(32))),
        b"SHMF\x01\x00\x0a\x00\x28\x00\x00\x00\x00\x00\x00\x00"
        b"\xe8\x03\x00\x00\x00\x00\x00\x00" + bytes(range(32)),
    ),
]


@pytest.mark.parametrize(("message", "raw"), GOLDEN, ids=lambda v: type(v).__name__)
def test_encoding_matches_the_documented_layout(message: Message, raw: bytes) -> None:
    assert encode(message) == raw
    assert decode(raw) == message


ROUND_TRIP: list[Message] = [
    *SAMPLES.values(),
    *(welcome_for(mode) for mode in Mode),
    *(Hello("r", "t", mode=mode, minimum_mode=mode) for mode in Mode),
    *(Hello("r", "t", uffd_access=access) for access in UffdAccess),
    Hello("r" * MAX_REGION_ID, "t" * MAX_TOKEN),
    Hello("région-ü", "jeton-€"),
    Welcome(Mode.EAGER, 1 << 30, (1 << 64) - 1, (1 << 64) - 1, RegisterMode(0), Feature(0)),
    Welcome(Mode.SHARED_COPY, 4096, 0, 0, RegisterMode(1 << 40), Feature(1 << 63), "a\nb"),
    Attach((1 << 64) - 1, (1 << 64) - 1, (1 << 64) - 1),
    Attach(0, 0, 0),
    Ready(0),
    Ready((1 << 64) - 1),
    *(ErrorMessage(code, f"{code.name} happened") for code in ErrorCode),
    ErrorMessage(ErrorCode.MALFORMED, ""),
    ErrorMessage(ErrorCode.INTERNAL, "x" * (MAX_PACKET - 16 - 4 - 2)),
    Welcome(Mode.SHARED_COPY, 4096, 1, 1, RegisterMode(1), Feature(0), "y" * (MAX_PACKET - 58)),
]


@pytest.mark.parametrize("message", ROUND_TRIP, ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    raw = encode(message)
    assert len(raw) <= MAX_PACKET
    decoded = decode(raw)
    assert decoded == message
    assert type(decoded) is type(message)
    assert encode(decoded) == raw


def test_decoded_fields_have_their_enum_types() -> None:
    hello = decode(encode(Hello("r", "t", mode=Mode.EAGER, uffd_access=UffdAccess.NONE)))
    assert isinstance(hello, Hello)
    assert hello.mode is Mode.EAGER
    assert hello.minimum_mode is None
    assert hello.uffd_access is UffdAccess.NONE
    welcome = decode(encode(welcome_for(Mode.SHARED_CONTINUE)))
    assert isinstance(welcome, Welcome)
    assert welcome.mode is Mode.SHARED_CONTINUE
    assert isinstance(welcome.register_mode, RegisterMode)
    assert isinstance(welcome.features, Feature)
    error = decode(encode(ErrorMessage(ErrorCode.LIMIT, "m")))
    assert isinstance(error, ErrorMessage)
    assert error.code is ErrorCode.LIMIT


# --- malformed input ---

_BAD_PACKETS: list[tuple[str, bytes, ErrorCode, str]] = [
    (
        "identity reserved not zero",
        packet(10, struct.pack("<II", 1, 7) + bytes(32)),
        ErrorCode.MALFORMED,
        "IDENTITY reserved field is 0x7, not zero",
    ),
    ("identity short", packet(10, bytes(39)), ErrorCode.MALFORMED, "shorter than its 40-byte"),
    ("identify with a body", packet(9, b"x"), ErrorCode.MALFORMED, "IDENTIFY body has 1 trailing"),
    ("empty", b"", ErrorCode.MALFORMED, "0 bytes, shorter than the 16-byte header"),
    ("short", b"SHMF\x01\x00\x05\x00", ErrorCode.MALFORMED, "8 bytes, shorter"),
    (
        "oversize",
        packet(7, b"\0\0\0\0" + string(b"x" * (MAX_PACKET - 21))),
        ErrorCode.MALFORMED,
        "4097 bytes, more than 4096",
    ),
    ("bad magic", packet(5, magic=b"SHMG"), ErrorCode.MALFORMED, "magic is b'SHMG'"),
    ("magic other endian", packet(5, magic=b"FMHS"), ErrorCode.MALFORMED, "magic"),
    ("version 0", packet(5, version=0), ErrorCode.VERSION, "version 0 is not supported"),
    ("version 2", packet(5, version=2), ErrorCode.VERSION, "supported versions: 1"),
    (
        "body_length too big",
        header(5, 1),
        ErrorCode.MALFORMED,
        "body_length is 1 but 0 bytes follow",
    ),
    (
        "body_length too small",
        header(4, 7) + bytes(8),
        ErrorCode.MALFORMED,
        "body_length is 7 but 8 bytes follow",
    ),
    ("reserved", packet(5, reserved=1), ErrorCode.MALFORMED, "header reserved field is 0x1"),
    ("type 0", packet(0), ErrorCode.MALFORMED, "type 0x00 is unknown"),
    ("type 11 (reserved)", packet(11), ErrorCode.MALFORMED, "type 0x0b is unknown"),
    ("reattach short", packet(8, bytes(27)), ErrorCode.MALFORMED, "REATTACH body is 27 bytes"),
    (
        "reattach eager",
        packet(8, b"\x04" + bytes(27) + string(b"r") + string(b"t")),
        ErrorCode.MALFORMED,
        "REATTACH mode is eager",
    ),
    (
        "reattach reserved",
        packet(8, b"\x01\x00\x01\x00" + bytes(24) + string(b"r") + string(b"t")),
        ErrorCode.MALFORMED,
        "REATTACH reserved bytes",
    ),
    (
        "reattach no token",
        packet(8, b"\x01" + bytes(27) + string(b"r") + string(b"")),
        ErrorCode.MALFORMED,
        "REATTACH attach_token is 0 bytes",
    ),
    ("type 0xffff", packet(0xFFFF), ErrorCode.MALFORMED, "type 0xffff is unknown"),
    # HELLO
    ("hello empty body", packet(1), ErrorCode.MALFORMED, "HELLO body is 0 bytes"),
    ("hello mode 5", packet(1, hello_body(mode=5)), ErrorCode.MALFORMED, "HELLO mode is 5"),
    (
        "hello minimum 9",
        packet(1, hello_body(minimum=9)),
        ErrorCode.MALFORMED,
        "HELLO minimum_mode is 9, not 0-4",
    ),
    (
        "hello uffd_access 3",
        packet(1, hello_body(access=3)),
        ErrorCode.MALFORMED,
        "uffd_access is 3, not 0-2",
    ),
    (
        "hello reserved byte",
        packet(1, hello_body(reserved=b"\x01\0\0\0\0")),
        ErrorCode.MALFORMED,
        "HELLO reserved field is 0x1",
    ),
    (
        "hello reserved word",
        packet(1, hello_body(reserved=b"\0\0\0\0\x80")),
        ErrorCode.MALFORMED,
        "HELLO reserved field is 0x80000000",
    ),
    (
        "empty region id",
        packet(1, hello_body(region_id=b"")),
        ErrorCode.MALFORMED,
        "region_id is 0 bytes, not 1-64",
    ),
    (
        "region id too long",
        packet(1, hello_body(region_id=b"r" * 65)),
        ErrorCode.MALFORMED,
        "region_id is 65 bytes, not 1-64",
    ),
    (
        "empty token",
        packet(1, hello_body(token=b"")),
        ErrorCode.MALFORMED,
        "attach_token is 0 bytes, not 1-256",
    ),
    (
        "token too long",
        packet(1, hello_body(token=b"t" * 257)),
        ErrorCode.MALFORMED,
        "attach_token is 257 bytes, not 1-256",
    ),
    (
        "region id invalid utf-8",
        packet(1, hello_body(region_id=b"\xff\xfe")),
        ErrorCode.MALFORMED,
        "region_id is not valid UTF-8",
    ),
    (
        "token a surrogate in utf-8",
        packet(1, hello_body(token=b"\xed\xa0\x80")),
        ErrorCode.MALFORMED,
        "attach_token is not valid UTF-8",
    ),
    (
        "token cut in the middle of a character",
        packet(1, hello_body(token=b"\xc3")),
        ErrorCode.MALFORMED,
        "attach_token is not valid UTF-8",
    ),
    (
        "string runs past the body",
        packet(1, hello_body()[:-1]),
        ErrorCode.MALFORMED,
        "attach_token declares 2 bytes but only 1 remain",
    ),
    (
        "length prefix cut",
        packet(1, hello_body()[: 8 + 4 + 1]),
        ErrorCode.MALFORMED,
        "attach_token: the body ends inside its length prefix",
    ),
    (
        "token missing",
        packet(1, hello_body()[: 8 + 4]),
        ErrorCode.MALFORMED,
        "attach_token: the body ends inside its length prefix",
    ),
    (
        "hello trailing bytes",
        packet(1, hello_body() + b"\0"),
        ErrorCode.MALFORMED,
        "HELLO body has 1 trailing bytes",
    ),
    # WELCOME
    ("welcome mode 0", packet(2, welcome_body(mode=0)), ErrorCode.MALFORMED, "mode is 0, not 1-4"),
    ("welcome mode 5", packet(2, welcome_body(mode=5)), ErrorCode.MALFORMED, "mode is 5, not 1-4"),
    (
        "welcome reserved",
        packet(2, welcome_body(reserved=b"\0\x02\0")),
        ErrorCode.MALFORMED,
        "WELCOME reserved bytes are 000200",
    ),
    (
        "welcome reasons invalid",
        packet(2, welcome_body(reasons=b"a\x80")),
        ErrorCode.MALFORMED,
        "WELCOME reasons is not valid UTF-8",
    ),
    (
        "welcome without reasons",
        packet(2, welcome_body()[:40]),
        ErrorCode.MALFORMED,
        "reasons: the body ends inside its length prefix",
    ),
    (
        "welcome short",
        packet(2, welcome_body()[:39]),
        ErrorCode.MALFORMED,
        "WELCOME body is 39 bytes, shorter than its 40-byte fixed part",
    ),
    (
        "welcome trailing",
        packet(2, welcome_body() + b"xyz"),
        ErrorCode.MALFORMED,
        "3 trailing bytes",
    ),
    # ATTACH, READY, DETACH, DETACHED
    ("attach short", packet(3, bytes(23)), ErrorCode.MALFORMED, "ATTACH body is 23 bytes"),
    ("attach long", packet(3, bytes(25)), ErrorCode.MALFORMED, "ATTACH body has 1 trailing"),
    ("ready short", packet(4, bytes(7)), ErrorCode.MALFORMED, "READY body is 7 bytes"),
    ("ready long", packet(4, bytes(9)), ErrorCode.MALFORMED, "READY body has 1 trailing"),
    ("detach body", packet(5, b"\0"), ErrorCode.MALFORMED, "DETACH body has 1 trailing"),
    ("detached body", packet(6, bytes(4)), ErrorCode.MALFORMED, "DETACHED body has 4 trailing"),
    # ERROR
    (
        "error code 0",
        packet(7, b"\0\0\0\0" + string(b"")),
        ErrorCode.MALFORMED,
        "ERROR code is 0, not 1-13",
    ),
    (
        "error code 14",
        packet(7, b"\x0e\0\0\0" + string(b"")),
        ErrorCode.MALFORMED,
        "ERROR code is 14",
    ),
    (
        "error message invalid",
        packet(7, b"\x01\0\0\0" + string(b"\xc0\xaf")),
        ErrorCode.MALFORMED,
        "ERROR message is not valid UTF-8",
    ),
    ("error no message", packet(7, b"\x01\0\0\0"), ErrorCode.MALFORMED, "ERROR message:"),
]


@pytest.mark.parametrize(
    ("raw", "code", "fragment"),
    [case[1:] for case in _BAD_PACKETS],
    ids=[c[0] for c in _BAD_PACKETS],
)
def test_decode_rejects(raw: bytes, code: ErrorCode, fragment: str) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        decode(raw)
    assert caught.value.code is code
    assert fragment in caught.value.message
    assert caught.value.fds_to_close == []


def test_magic_is_checked_before_the_version_and_the_version_before_the_rest() -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        decode(header(0x99, 5, magic=b"XXXX", version=9))
    assert "magic" in caught.value.message
    # A future version may lay its body out differently: only the version is reported.
    with pytest.raises(RemoteProtocolError) as caught:
        decode(header(0x99, 5, version=2, reserved=3))
    assert caught.value.code is ErrorCode.VERSION


def test_remote_protocol_error_is_a_shmfault_error_and_pickles() -> None:
    error = RemoteProtocolError(ErrorCode.BAD_UFFD, "not a userfaultfd", [FD, FD + 1])
    assert isinstance(error, ProtocolError)
    assert isinstance(error, ShmfaultError)
    assert str(error) == "BAD_UFFD: not a userfaultfd"
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is RemoteProtocolError
    assert (copy.code, copy.message, copy.fds_to_close) == (error.code, error.message, [100, 101])
    assert str(copy) == str(error)
    assert issubclass(LocalProtocolError, ProtocolError)


_UNENCODABLE: list[tuple[str, object, str]] = [
    ("empty region id", Hello("", "t"), "region_id is 0 bytes of UTF-8, not 1-64"),
    ("region id too long", Hello("r" * 65, "t"), "region_id is 65 bytes"),
    ("region id too long in utf-8", Hello("é" * 33, "t"), "region_id is 66 bytes"),
    ("empty token", Hello("r", ""), "attach_token is 0 bytes"),
    ("token too long", Hello("r", "t" * 257), "attach_token is 257 bytes"),
    ("lone surrogate", Hello("\ud800", "t"), "region_id cannot be encoded as UTF-8"),
    ("region id not a str", Hello(b"r", "t"), "region_id is b'r', not a str"),  # type: ignore[arg-type]
    ("mode 5", Hello("r", "t", mode=5), "mode is 5, not one of"),  # type: ignore[arg-type]
    ("mode -1", Hello("r", "t", minimum_mode=-1), "minimum_mode is -1"),  # type: ignore[arg-type]
    ("uffd_access 3", Hello("r", "t", uffd_access=3), "uffd_access is 3"),  # type: ignore[arg-type]
    ("welcome mode None", Welcome(None, 1, 1, 1, RegisterMode(0), Feature(0)), "mode is None"),  # type: ignore[arg-type]
    (
        "page size over u32",
        Welcome(Mode.EAGER, 1 << 32, 1, 1, RegisterMode(0), Feature(0)),
        "page_size is 4294967296",
    ),
    (
        "negative size",
        Welcome(Mode.EAGER, 4096, -1, 1, RegisterMode(0), Feature(0)),
        "region_size is -1",
    ),
    (
        "reasons too long",
        Welcome(Mode.EAGER, 4096, 1, 1, RegisterMode(0), Feature(0), "y" * (MAX_PACKET - 57)),
        "WELCOME would be a 4097-byte packet",
    ),
    ("base over u64", Attach(1 << 64, 1, 0), "base is 18446744073709551616"),
    ("length a float", Attach(0, 1.5, 0), "length is 1.5"),  # type: ignore[arg-type]
    ("offset a bool", Attach(0, 1, True), "region_offset is True"),
    ("attachment id negative", Ready(-1), "attachment_id is -1"),
    ("error code 0", ErrorMessage(0, "m"), "code is 0"),  # type: ignore[arg-type]
    (
        "error message too long",
        ErrorMessage(ErrorCode.INTERNAL, "x" * (MAX_PACKET - 21)),
        "ERROR would be a 4097-byte packet",
    ),
    ("credential too short", Identity(0, b"x" * 31), "credential is not 32 bytes"),
    ("uid over u32", Identity(1 << 32, bytes(32)), "uid is 4294967296"),
    ("not a message", "HELLO", "is not a handoff protocol message"),
]


@pytest.mark.parametrize(
    ("message", "fragment"), [case[1:] for case in _UNENCODABLE], ids=[c[0] for c in _UNENCODABLE]
)
def test_encode_refuses(message: Message, fragment: str) -> None:
    with pytest.raises(LocalProtocolError) as caught:
        encode(message)
    assert fragment in str(caught.value)


# --- the service's end ---

S = ServiceState


def test_service_tables_are_the_documents() -> None:
    receives: dict[tuple[ServiceState, MessageType], ServiceState] = {
        (S.AWAIT_HELLO, MessageType.HELLO): S.SEND_WELCOME,
        (S.AWAIT_HELLO, MessageType.REATTACH): S.SEND_READY,
        (S.AWAIT_HELLO, MessageType.IDENTIFY): S.SEND_IDENTITY,
        (S.AWAIT_ATTACH, MessageType.ATTACH): S.SEND_READY,
        (S.ATTACHED, MessageType.DETACH): S.SEND_DETACHED,
    }
    sends: dict[tuple[ServiceState, MessageType], ServiceState] = {
        (S.SEND_WELCOME, MessageType.WELCOME): S.AWAIT_ATTACH,
        (S.SEND_READY, MessageType.READY): S.ATTACHED,
        (S.SEND_DETACHED, MessageType.DETACHED): S.CLOSED,
        (S.SEND_IDENTITY, MessageType.IDENTITY): S.IDENTIFIED,
        **{(state, MessageType.ERROR): S.CLOSED for state in S if state is not S.CLOSED},
    }
    assert receives == SERVICE_RECEIVES
    assert sends == SERVICE_SENDS


def service_in(state: ServiceState, mode: Mode = Mode.SHARED_COPY) -> ServiceConnection:
    """A service connection driven along the successful path until it reaches ``state``
    (the identity path for its two states)."""
    conn = ServiceConnection()
    if state in (S.SEND_IDENTITY, S.IDENTIFIED):
        conn.receive(encode(Identify()))
        if state is S.IDENTIFIED:
            conn.identity(IDENTITY.uid, IDENTITY.credential)
        assert conn.state is state
        return conn
    steps: list[Callable[[], object]] = [
        lambda: conn.receive(encode(HELLO)),
        lambda: conn.welcome(welcome_for(mode)),
        lambda: conn.receive(encode(ATTACH), [FD] * fds_expected(MessageType.ATTACH, mode)),
        lambda: conn.ready(ATTACHMENT_ID),
        lambda: conn.receive(encode(Detach())),
        conn.detached,
    ]
    for step in steps:
        if conn.state is state:
            break
        step()
    assert conn.state is state
    return conn


def test_service_successful_path() -> None:
    conn = ServiceConnection()
    assert conn.state is S.AWAIT_HELLO
    assert conn.mode is None and conn.attachment_id is None
    assert conn.receive(encode(HELLO), []) == HelloReceived(HELLO)
    assert conn.state is S.SEND_WELCOME
    reply = conn.welcome(welcome_for(Mode.SHARED_CONTINUE))
    assert decode(reply) == welcome_for(Mode.SHARED_CONTINUE)
    assert conn.state is S.AWAIT_ATTACH
    assert conn.mode is Mode.SHARED_CONTINUE and conn.attachment_id == ATTACHMENT_ID
    assert conn.receive(encode(ATTACH), [FD]) == AttachReceived(ATTACH, FD)
    assert conn.state is S.SEND_READY
    assert decode(conn.ready(ATTACHMENT_ID)) == Ready(ATTACHMENT_ID)
    assert conn.state is S.ATTACHED
    assert conn.receive(encode(Detach()), []) == DetachRequested()
    assert conn.state is S.SEND_DETACHED
    assert decode(conn.detached()) == Detached()
    assert conn.state is S.CLOSED


def test_service_eager_attach_carries_no_fd() -> None:
    conn = service_in(S.AWAIT_ATTACH, Mode.EAGER)
    assert conn.receive(encode(ATTACH)) == AttachReceived(ATTACH, None)


@pytest.mark.parametrize("state", [s for s in S if s is not S.CLOSED], ids=lambda s: s.name)
@pytest.mark.parametrize("kind", list(MessageType), ids=lambda k: k.name)
def test_service_receives_every_message_in_every_state(
    state: ServiceState, kind: MessageType
) -> None:
    conn = service_in(state)
    fds = [FD + i for i in range(fds_expected(kind, conn.mode or Mode.SHARED_COPY))]
    event = conn.receive(encode(SAMPLES[kind]), fds)
    next_state = SERVICE_RECEIVES.get((state, kind))
    if next_state is None:
        assert isinstance(event, Violation)
        assert event.code is ErrorCode.UNEXPECTED
        assert f"{kind.name} is not allowed in state {state.name}" in event.message
        assert event.fds_to_close == fds
        assert decode(event.close_reply) == ErrorMessage(ErrorCode.UNEXPECTED, event.message)
        assert conn.state is S.CLOSED
    else:
        expected = {
            MessageType.HELLO: HelloReceived(HELLO),
            MessageType.ATTACH: AttachReceived(ATTACH, FD),
            MessageType.REATTACH: ReattachReceived(REATTACH, FD, FD + 1),
            MessageType.IDENTIFY: IdentifyReceived(),
            MessageType.DETACH: DetachRequested(),
        }[kind]
        assert event == expected
        assert conn.state is next_state


def test_service_violation_says_what_it_expected() -> None:
    event = service_in(S.AWAIT_HELLO).receive(encode(ATTACH), [FD])
    assert isinstance(event, Violation)
    assert event.message == (
        "ATTACH is not allowed in state AWAIT_HELLO (expecting HELLO or REATTACH or IDENTIFY)"
    )
    event = service_in(S.SEND_WELCOME).receive(encode(HELLO))
    assert isinstance(event, Violation)
    assert event.message.endswith("(expecting nothing)")


def test_service_receive_when_closed_is_a_local_error() -> None:
    conn = service_in(S.CLOSED)
    with pytest.raises(LocalProtocolError, match="CLOSED"):
        conn.receive(encode(HELLO))


_FD_CASES: list[tuple[ServiceState, Mode, Message, int]] = [
    (S.AWAIT_HELLO, Mode.SHARED_COPY, HELLO, 1),
    (S.AWAIT_HELLO, Mode.SHARED_COPY, HELLO, 3),
    *[(S.AWAIT_ATTACH, mode, ATTACH, 0) for mode in Mode if mode is not Mode.EAGER],
    *[(S.AWAIT_ATTACH, mode, ATTACH, 2) for mode in Mode if mode is not Mode.EAGER],
    (S.AWAIT_ATTACH, Mode.EAGER, ATTACH, 1),
    (S.ATTACHED, Mode.SHARED_COPY, Detach(), 1),
]


@pytest.mark.parametrize(
    ("state", "mode", "message", "count"),
    _FD_CASES,
    ids=[f"{c[2].message_type.name}-{c[1].wire_name}-{c[3]}fds" for c in _FD_CASES],
)
def test_service_wrong_number_of_fds_is_malformed(
    state: ServiceState, mode: Mode, message: Message, count: int
) -> None:
    conn = service_in(state, mode)
    fds = [FD + i for i in range(count)]
    event = conn.receive(encode(message), fds)
    assert isinstance(event, Violation)
    assert event.code is ErrorCode.MALFORMED
    expected = fds_expected(message.message_type, mode)
    assert f"carries {expected} fd(s), got {count}" in event.message
    assert event.fds_to_close == fds
    assert conn.state is S.CLOSED


@pytest.mark.parametrize("state", [S.AWAIT_HELLO, S.AWAIT_ATTACH, S.ATTACHED], ids=str)
def test_service_truncated_packet_is_malformed_and_its_fds_are_returned(
    state: ServiceState,
) -> None:
    conn = service_in(state)
    event = conn.receive(encode(HELLO), [FD, FD + 1, FD + 2, FD + 3], truncated=True)
    assert isinstance(event, Violation)
    assert event.code is ErrorCode.MALFORMED
    assert "truncated" in event.message
    assert event.fds_to_close == [FD, FD + 1, FD + 2, FD + 3]
    assert conn.state is S.CLOSED


def test_service_oversize_packet_is_malformed() -> None:
    event = ServiceConnection().receive(b"\0" * (MAX_PACKET + 1), [], truncated=True)
    assert isinstance(event, Violation)
    assert event.code is ErrorCode.MALFORMED
    assert "larger than 4096" in event.message


@pytest.mark.parametrize(
    ("name", "raw", "code", "fragment"), _BAD_PACKETS, ids=[c[0] for c in _BAD_PACKETS]
)
def test_service_bad_packet_is_a_violation_with_its_fds(
    name: str, raw: bytes, code: ErrorCode, fragment: str
) -> None:
    conn = ServiceConnection()
    event = conn.receive(raw, [FD])
    assert isinstance(event, Violation)
    assert (event.code, event.fds_to_close) == (code, [FD])
    assert fragment in event.message
    assert decode(event.close_reply) == ErrorMessage(code, event.message)
    assert conn.state is S.CLOSED


def test_service_version_violation_is_answered_in_version_1_listing_the_supported() -> None:
    event = ServiceConnection().receive(packet(1, hello_body(), version=7))
    assert isinstance(event, Violation)
    assert event.close_reply[4:6] == b"\x01\x00"
    reply = decode(event.close_reply)
    assert isinstance(reply, ErrorMessage)
    assert reply.code is ErrorCode.VERSION
    assert reply.message == "version 7 is not supported; supported versions: 1"


ServiceCall = Callable[[ServiceConnection], bytes]
_SERVICE_CALLS: dict[MessageType, ServiceCall] = {
    MessageType.WELCOME: lambda conn: conn.welcome(welcome_for(Mode.SHARED_COPY)),
    MessageType.READY: lambda conn: conn.ready(ATTACHMENT_ID),
    MessageType.DETACHED: lambda conn: conn.detached(),
    MessageType.ERROR: lambda conn: conn.error(ErrorCode.INTERNAL, "boom"),
    MessageType.IDENTITY: lambda conn: conn.identity(IDENTITY.uid, IDENTITY.credential),
}


@pytest.mark.parametrize("state", list(S), ids=lambda s: s.name)
@pytest.mark.parametrize("kind", list(_SERVICE_CALLS), ids=lambda k: k.name)
def test_service_sends_every_message_in_every_state(state: ServiceState, kind: MessageType) -> None:
    conn = service_in(state)
    next_state = SERVICE_SENDS.get((state, kind))
    if next_state is None:
        with pytest.raises(LocalProtocolError, match=f"cannot send {kind.name} in state"):
            _SERVICE_CALLS[kind](conn)
        assert conn.state is state
    else:
        reply = decode(_SERVICE_CALLS[kind](conn))
        assert reply.message_type is kind
        assert conn.state is next_state


def test_service_welcome_must_honour_the_hello() -> None:
    conn = ServiceConnection()
    conn.receive(encode(Hello("r", "t", mode=Mode.SHARED_CONTINUE)))
    with pytest.raises(LocalProtocolError, match="client asked for shared-continue"):
        conn.welcome(welcome_for(Mode.SHARED_COPY))
    assert conn.state is S.SEND_WELCOME
    conn.welcome(welcome_for(Mode.SHARED_CONTINUE))

    conn = ServiceConnection()
    conn.receive(encode(Hello("r", "t", uffd_access=UffdAccess.NONE)))
    with pytest.raises(LocalProtocolError, match="private-copy needs a userfaultfd"):
        conn.welcome(welcome_for(Mode.PRIVATE_COPY))
    conn.welcome(welcome_for(Mode.EAGER))
    assert conn.state is S.AWAIT_ATTACH


def test_service_welcome_that_cannot_be_encoded_changes_nothing() -> None:
    conn = service_in(S.SEND_WELCOME)
    with pytest.raises(LocalProtocolError, match="page_size"):
        conn.welcome(Welcome(Mode.SHARED_COPY, -1, 1, 1, RegisterMode(1), Feature(0)))
    assert conn.state is S.SEND_WELCOME
    assert conn.mode is None


def test_service_ready_must_name_the_welcomes_attachment() -> None:
    conn = service_in(S.SEND_READY)
    with pytest.raises(LocalProtocolError, match="READY attachment_id 8 is not the WELCOME's 7"):
        conn.ready(ATTACHMENT_ID + 1)
    assert conn.state is S.SEND_READY


def test_service_error_cuts_a_long_message_to_fit_and_closes() -> None:
    conn = service_in(S.ATTACHED)
    raw = conn.error(ErrorCode.INTERNAL, "€" * 5000)
    assert len(raw) <= MAX_PACKET
    reply = decode(raw)
    assert isinstance(reply, ErrorMessage)
    assert reply.code is ErrorCode.INTERNAL
    assert set(reply.message) == {"€"}
    assert conn.state is S.CLOSED


def test_service_error_with_an_unknown_code_changes_nothing() -> None:
    conn = service_in(S.AWAIT_HELLO)
    with pytest.raises(LocalProtocolError, match="code is 99"):
        conn.error(99, "x")  # type: ignore[arg-type]
    assert conn.state is S.AWAIT_HELLO


@pytest.mark.parametrize(
    ("state", "missing"),
    [
        (S.AWAIT_HELLO, "HELLO"),
        (S.SEND_WELCOME, "ATTACH"),
        (S.AWAIT_ATTACH, "ATTACH"),
        (S.SEND_READY, None),
        (S.ATTACHED, None),
        (S.SEND_DETACHED, None),
        (S.SEND_IDENTITY, None),
        (S.IDENTIFIED, None),
        (S.CLOSED, None),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_service_timeout(state: ServiceState, missing: str | None) -> None:
    conn = service_in(state)
    raw = conn.timed_out()
    if missing is None:
        assert raw is None
        assert conn.state is state
    else:
        assert raw is not None
        assert decode(raw) == ErrorMessage(
            ErrorCode.TIMEOUT, f"no {missing} within the handshake timeout"
        )
        assert conn.state is S.CLOSED


@pytest.mark.parametrize("state", list(S), ids=lambda s: s.name)
def test_service_connection_lost_closes_from_every_state(state: ServiceState) -> None:
    conn = service_in(state)
    conn.connection_lost()
    assert conn.state is S.CLOSED


# --- the client's end ---

C = ClientState


def test_client_tables() -> None:
    sends: dict[tuple[ClientState, MessageType], ClientState] = {
        (C.SEND_HELLO, MessageType.HELLO): C.AWAIT_WELCOME,
        (C.SEND_HELLO, MessageType.REATTACH): C.AWAIT_READY,
        (C.SEND_HELLO, MessageType.IDENTIFY): C.AWAIT_IDENTITY,
        (C.SEND_ATTACH, MessageType.ATTACH): C.AWAIT_READY,
        (C.ATTACHED, MessageType.DETACH): C.AWAIT_DETACHED,
    }
    receives: dict[tuple[ClientState, MessageType], ClientState] = {
        (C.AWAIT_WELCOME, MessageType.WELCOME): C.SEND_ATTACH,
        (C.AWAIT_READY, MessageType.READY): C.ATTACHED,
        (C.AWAIT_DETACHED, MessageType.DETACHED): C.CLOSED,
        (C.AWAIT_IDENTITY, MessageType.IDENTITY): C.IDENTIFIED,
        **{(state, MessageType.ERROR): C.CLOSED for state in C if state is not C.CLOSED},
    }
    assert sends == CLIENT_SENDS
    assert receives == CLIENT_RECEIVES


# --- re-attaching after a restart ---


@pytest.mark.parametrize(
    "mode", [m for m in Mode if m is not Mode.EAGER], ids=lambda m: m.wire_name
)
def test_reattach_round_trip_and_its_fds(mode: Mode) -> None:
    message = Reattach("r1", "t" * 43, mode, 0x7F00_0000_0000, 1 << 30, 4096)
    assert decode(encode(message)) == message
    expected = 1 if mode is Mode.PRIVATE_COPY else 2
    assert fds_expected(MessageType.REATTACH, mode) == expected
    client = ClientConnection()
    packet = client.reattach(message)
    assert client.state is C.AWAIT_READY and client.mode is mode
    service = ServiceConnection()
    fds = [FD + i for i in range(expected)]
    event = service.receive(packet, fds)
    assert event == ReattachReceived(message, FD, FD + 1 if expected == 2 else None)
    assert service.state is S.SEND_READY and service.mode is mode
    # A re-attachment gets a new id: READY may carry any.
    assert client.receive(service.ready(9999)) == ReadyReceived(9999)
    assert (client.state, service.state) == (C.ATTACHED, S.ATTACHED)
    assert decode(client.detach()) == Detach()


def test_reattach_with_the_wrong_fds_is_a_violation_that_returns_them() -> None:
    event = ServiceConnection().receive(encode(REATTACH), [FD])
    assert isinstance(event, Violation)
    assert event.code is ErrorCode.MALFORMED
    assert "REATTACH in shared-copy carries 2 fd(s), got 1" in event.message
    assert event.fds_to_close == [FD]


def test_reattach_of_an_eager_attachment_cannot_be_encoded() -> None:
    with pytest.raises(LocalProtocolError, match="eager"):
        encode(Reattach("r1", "t", Mode.EAGER, 0, 4096))


def test_reattach_is_only_the_first_message() -> None:
    event = service_in(S.ATTACHED).receive(encode(REATTACH), [FD, FD + 1])
    assert isinstance(event, Violation)
    assert event.code is ErrorCode.UNEXPECTED
    with pytest.raises(LocalProtocolError):
        client_in(C.ATTACHED).reattach(REATTACH)


def client_in(state: ClientState, mode: Mode = Mode.SHARED_COPY) -> ClientConnection:
    """A client connection driven along the successful path until it reaches ``state``
    (the identity path for its two states)."""
    conn = ClientConnection()
    if state in (C.AWAIT_IDENTITY, C.IDENTIFIED):
        conn.identify()
        if state is C.IDENTIFIED:
            conn.receive(encode(IDENTITY))
        assert conn.state is state
        return conn
    steps: list[Callable[[], object]] = [
        lambda: conn.hello(HELLO),
        lambda: conn.receive(
            encode(welcome_for(mode)), [FD] * fds_expected(MessageType.WELCOME, mode)
        ),
        lambda: conn.attach(ATTACH),
        lambda: conn.receive(encode(Ready(ATTACHMENT_ID))),
        conn.detach,
        lambda: conn.receive(encode(Detached())),
    ]
    for step in steps:
        if conn.state is state:
            break
        step()
    assert conn.state is state
    return conn


@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.wire_name)
def test_client_successful_path(mode: Mode) -> None:
    conn = ClientConnection()
    assert conn.state is C.SEND_HELLO
    assert decode(conn.hello(HELLO)) == HELLO
    assert conn.state is C.AWAIT_WELCOME
    region_fds = [FD] if mode is not Mode.PRIVATE_COPY else []
    event = conn.receive(encode(welcome_for(mode)), region_fds)
    assert event == WelcomeReceived(welcome_for(mode), FD if region_fds else None)
    assert conn.state is C.SEND_ATTACH
    assert conn.mode is mode
    assert conn.welcome_message == welcome_for(mode)
    assert decode(conn.attach(ATTACH)) == ATTACH
    assert conn.state is C.AWAIT_READY
    assert conn.receive(encode(Ready(ATTACHMENT_ID))) == ReadyReceived(ATTACHMENT_ID)
    assert conn.state is C.ATTACHED
    assert decode(conn.detach()) == Detach()
    assert conn.state is C.AWAIT_DETACHED
    assert conn.receive(encode(Detached())) == DetachedReceived()
    assert conn.state is C.CLOSED


@pytest.mark.parametrize("state", [s for s in C if s is not C.CLOSED], ids=lambda s: s.name)
@pytest.mark.parametrize("kind", list(MessageType), ids=lambda k: k.name)
def test_client_receives_every_message_in_every_state(
    state: ClientState, kind: MessageType
) -> None:
    conn = client_in(state)
    fds = [FD + i for i in range(fds_expected(kind, Mode.SHARED_COPY))]
    next_state = CLIENT_RECEIVES.get((state, kind))
    if next_state is None:
        with pytest.raises(RemoteProtocolError) as caught:
            conn.receive(encode(SAMPLES[kind]), fds)
        assert caught.value.code is ErrorCode.UNEXPECTED
        assert f"{kind.name} is not allowed in state {state.name}" in caught.value.message
        assert caught.value.fds_to_close == fds
        assert conn.state is C.CLOSED
    else:
        event = conn.receive(encode(SAMPLES[kind]), fds)
        expected = {
            MessageType.WELCOME: WelcomeReceived(welcome_for(Mode.SHARED_COPY), FD),
            MessageType.READY: ReadyReceived(ATTACHMENT_ID),
            MessageType.DETACHED: DetachedReceived(),
            MessageType.ERROR: ErrorReceived(ErrorCode.INTERNAL, "boom"),
            MessageType.IDENTITY: IdentityReceived(IDENTITY.uid, CREDENTIAL),
        }[kind]
        assert event == expected
        assert conn.state is next_state


ClientCall = Callable[[ClientConnection], bytes]
_CLIENT_CALLS: dict[MessageType, ClientCall] = {
    MessageType.HELLO: lambda conn: conn.hello(HELLO),
    MessageType.ATTACH: lambda conn: conn.attach(ATTACH),
    MessageType.DETACH: lambda conn: conn.detach(),
    MessageType.IDENTIFY: lambda conn: conn.identify(),
}


@pytest.mark.parametrize("state", list(C), ids=lambda s: s.name)
@pytest.mark.parametrize("kind", list(_CLIENT_CALLS), ids=lambda k: k.name)
def test_client_sends_every_message_in_every_state(state: ClientState, kind: MessageType) -> None:
    conn = client_in(state)
    next_state = CLIENT_SENDS.get((state, kind))
    if next_state is None:
        with pytest.raises(LocalProtocolError, match=f"cannot send {kind.name} in state"):
            _CLIENT_CALLS[kind](conn)
        assert conn.state is state
    else:
        assert decode(_CLIENT_CALLS[kind](conn)).message_type is kind
        assert conn.state is next_state


def test_client_checks_the_welcome_against_the_hello_as_sent() -> None:
    conn = ClientConnection()
    conn.hello(Hello("r", "t", mode=0, uffd_access=1))  # type: ignore[arg-type]
    event = conn.receive(encode(welcome_for(Mode.SHARED_CONTINUE)), [FD])
    assert isinstance(event, WelcomeReceived)


def test_client_hello_that_cannot_be_encoded_changes_nothing() -> None:
    conn = ClientConnection()
    with pytest.raises(LocalProtocolError, match="region_id"):
        conn.hello(Hello("", "t"))
    assert conn.state is C.SEND_HELLO


@pytest.mark.parametrize(
    ("mode", "count"),
    [
        (Mode.SHARED_COPY, 0),
        (Mode.SHARED_COPY, 2),
        (Mode.SHARED_CONTINUE, 0),
        (Mode.EAGER, 0),
        (Mode.PRIVATE_COPY, 1),
    ],
)
def test_client_welcome_with_the_wrong_number_of_fds(mode: Mode, count: int) -> None:
    conn = client_in(C.AWAIT_WELCOME)
    fds = [FD + i for i in range(count)]
    with pytest.raises(RemoteProtocolError) as caught:
        conn.receive(encode(welcome_for(mode)), fds)
    assert caught.value.code is ErrorCode.MALFORMED
    assert f"WELCOME carries {fds_expected(MessageType.WELCOME, mode)} fd(s), got {count}" in str(
        caught.value
    )
    assert caught.value.fds_to_close == fds
    assert conn.state is C.CLOSED


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (C.AWAIT_READY, Ready(ATTACHMENT_ID)),
        (C.AWAIT_DETACHED, Detached()),
        (C.SEND_ATTACH, ErrorMessage(ErrorCode.TIMEOUT, "no ATTACH")),
    ],
    ids=lambda v: getattr(v, "name", type(v).__name__),
)
def test_client_fds_on_a_message_that_carries_none(state: ClientState, message: Message) -> None:
    conn = client_in(state)
    with pytest.raises(RemoteProtocolError) as caught:
        conn.receive(encode(message), [FD])
    assert caught.value.code is ErrorCode.MALFORMED
    assert caught.value.fds_to_close == [FD]
    assert conn.state is C.CLOSED


def test_client_rejects_a_welcome_that_ignores_the_hello() -> None:
    conn = ClientConnection()
    conn.hello(Hello("r", "t", mode=Mode.PRIVATE_COPY))
    with pytest.raises(RemoteProtocolError, match="mode is shared-copy, not the private-copy"):
        conn.receive(encode(welcome_for(Mode.SHARED_COPY)), [FD])

    conn = ClientConnection()
    conn.hello(Hello("r", "t", uffd_access=UffdAccess.NONE))
    with pytest.raises(RemoteProtocolError, match="shared-copy needs a userfaultfd") as caught:
        conn.receive(encode(welcome_for(Mode.SHARED_COPY)), [FD])
    assert caught.value.fds_to_close == [FD]
    assert conn.state is C.CLOSED


def test_client_rejects_a_ready_for_another_attachment() -> None:
    conn = client_in(C.AWAIT_READY)
    with pytest.raises(RemoteProtocolError, match="READY attachment_id 8 is not the WELCOME's 7"):
        conn.receive(encode(Ready(ATTACHMENT_ID + 1)))
    assert conn.state is C.CLOSED


@pytest.mark.parametrize(
    ("name", "raw", "code", "fragment"), _BAD_PACKETS, ids=[c[0] for c in _BAD_PACKETS]
)
def test_client_bad_packet_raises_with_its_fds(
    name: str, raw: bytes, code: ErrorCode, fragment: str
) -> None:
    conn = client_in(C.AWAIT_WELCOME)
    with pytest.raises(RemoteProtocolError) as caught:
        conn.receive(raw, [FD, FD + 1])
    assert caught.value.code is code
    assert fragment in caught.value.message
    assert caught.value.fds_to_close == [FD, FD + 1]
    assert conn.state is C.CLOSED


def test_client_truncated_packet() -> None:
    conn = client_in(C.AWAIT_WELCOME)
    with pytest.raises(RemoteProtocolError, match="truncated") as caught:
        conn.receive(encode(welcome_for(Mode.SHARED_COPY)), [FD], truncated=True)
    assert caught.value.fds_to_close == [FD]
    assert conn.state is C.CLOSED


def test_client_receive_when_closed_is_a_local_error() -> None:
    conn = client_in(C.CLOSED)
    with pytest.raises(LocalProtocolError, match="CLOSED"):
        conn.receive(encode(Detached()))


@pytest.mark.parametrize("state", list(C), ids=lambda s: s.name)
def test_client_connection_lost_closes_from_every_state(state: ClientState) -> None:
    conn = client_in(state)
    conn.connection_lost()
    assert conn.state is C.CLOSED


# --- the two ends against each other ---


@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.wire_name)
def test_the_two_ends_talk(mode: Mode) -> None:
    client, service = ClientConnection(), ServiceConnection()
    event = service.receive(client.hello(Hello("r", "t", mode=mode)))
    assert isinstance(event, HelloReceived)
    raw = service.welcome(welcome_for(mode))
    assert client.receive(raw, [FD] * fds_expected(MessageType.WELCOME, mode)) == WelcomeReceived(
        welcome_for(mode), None if mode is Mode.PRIVATE_COPY else FD
    )
    uffd = [FD + 1] * fds_expected(MessageType.ATTACH, client.mode)
    event = service.receive(client.attach(ATTACH), uffd)
    assert event == AttachReceived(ATTACH, uffd[0] if uffd else None)
    assert client.receive(service.ready(ATTACHMENT_ID)) == ReadyReceived(ATTACHMENT_ID)
    assert service.receive(client.detach()) == DetachRequested()
    assert client.receive(service.detached()) == DetachedReceived()
    assert client.state is C.CLOSED and service.state is S.CLOSED


def test_a_service_error_reaches_the_client() -> None:
    client, service = ClientConnection(), ServiceConnection()
    service.receive(client.hello(HELLO))
    event = client.receive(service.error(ErrorCode.DENIED, "token already used"))
    assert event == ErrorReceived(ErrorCode.DENIED, "token already used")
    assert client.state is C.CLOSED and service.state is S.CLOSED


# --- fuzzing: only ever a protocol error, never a crash ---

_T = TypeVar("_T")
_FUZZ_SEED = 0x5348_4D46
_FUZZ_CASES = 4000


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(6)
        if choice == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice == 1 and data:
            del data[rng.randrange(len(data)) :]
        elif choice == 2:
            data += rng.randbytes(rng.randint(1, 8))
        elif choice == 3 and len(data) > HEADER.size:
            # Mutate only the body and fix body_length, to get past the header checks.
            data[rng.randrange(HEADER.size, len(data))] ^= 1 << rng.randrange(8)
        elif choice == 4 and len(data) > HEADER.size:
            data.insert(rng.randrange(HEADER.size, len(data)), rng.randrange(256))
        else:
            data[6:8] = struct.pack("<H", rng.randint(0, 11))
        if len(data) >= HEADER.size and rng.random() < 0.8:
            data[8:12] = struct.pack("<I", len(data) - HEADER.size)
    return bytes(data)


def _fuzz_packets() -> list[bytes]:
    rng = random.Random(_FUZZ_SEED)
    valid = [encode(message) for message in ROUND_TRIP]
    packets = []
    for _ in range(_FUZZ_CASES):
        if rng.random() < 0.2:
            packets.append(rng.randbytes(rng.randint(0, 80)))
        else:
            packets.append(_mutate(rng, rng.choice(valid)))
    return packets


def _outcome(action: Callable[[], _T]) -> _T | RemoteProtocolError:
    """What ``action`` returns, or the RemoteProtocolError it raises; anything else escapes."""
    try:
        return action()
    except RemoteProtocolError as exc:
        return exc


def test_fuzzed_packets_decode_or_raise_a_remote_protocol_error() -> None:
    decoded = 0
    for raw in _fuzz_packets():
        outcome = _outcome(functools.partial(decode, raw))
        if isinstance(outcome, RemoteProtocolError):
            assert outcome.code in (ErrorCode.MALFORMED, ErrorCode.VERSION), raw
            assert outcome.message
            assert outcome.fds_to_close == []
        else:
            decoded += 1
            # Whatever decodes is canonical: encoding gives back the very bytes.
            assert encode(outcome) == raw
    # The mutations keep enough packets valid for the body decoders to be exercised.
    assert decoded > _FUZZ_CASES // 40


def test_fuzzed_packets_give_the_machines_only_protocol_outcomes() -> None:
    rng = random.Random(_FUZZ_SEED + 1)
    service_states = [s for s in S if s is not S.CLOSED]
    client_states = [s for s in C if s is not C.CLOSED]
    for raw in _fuzz_packets():
        fds = [FD + i for i in range(rng.choice([0, 0, 1, 2]))]
        truncated = rng.random() < 0.05
        mode = rng.choice(list(Mode))

        service = service_in(rng.choice(service_states), mode)
        event = service.receive(raw, fds, truncated=truncated)
        if isinstance(event, Violation):
            assert event.fds_to_close == fds
            assert decode(event.close_reply) == ErrorMessage(event.code, event.message)
            assert service.state is S.CLOSED
        else:
            # An accepted message took exactly the fds it carries, no more, none left over.
            held = [getattr(event, name, None) for name in ("uffd_fd", "region_fd")]
            assert fds == [fd for fd in held if fd is not None]

        client = client_in(rng.choice(client_states), mode)
        outcome = _outcome(functools.partial(client.receive, raw, fds, truncated=truncated))
        if isinstance(outcome, RemoteProtocolError):
            assert outcome.fds_to_close == fds
            assert client.state is C.CLOSED
        else:
            held = getattr(outcome, "region_fd", None)
            assert fds == ([held] if held is not None else [])

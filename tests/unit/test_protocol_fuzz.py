"""The handoff parser and the service's connection machine under hypothesis: every input is a
message or a protocol error, never a crash, and no received fd is ever lost
(docs/security.md §4.3, §9). Complements the seeded mutation fuzz of test_protocol.py with
inputs hypothesis shrinks to a minimal failing case."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from shmfault._abi import Feature, RegisterMode
from shmfault.errors import LocalProtocolError, RemoteProtocolError
from shmfault.protocol import (
    HEADER,
    MAGIC,
    MAX_PACKET,
    MAX_REGION_ID,
    MAX_TOKEN,
    Attach,
    AttachReceived,
    Detach,
    Detached,
    ErrorCode,
    ErrorMessage,
    Hello,
    Message,
    Mode,
    Ready,
    ServiceConnection,
    ServiceState,
    UffdAccess,
    Violation,
    Welcome,
    decode,
    encode,
)
from tests.fuzzing import fuzz_settings

U64 = st.integers(0, (1 << 64) - 1)
MODES = st.sampled_from(list(Mode))
TEXT = st.text(max_size=40)


def _short_text(minimum: int, maximum: int) -> st.SearchStrategy[str]:
    return st.text(min_size=minimum, max_size=maximum).filter(
        lambda text: minimum <= len(text.encode()) <= maximum
    )


MESSAGES: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Hello,
        region_id=_short_text(1, MAX_REGION_ID),
        attach_token=_short_text(1, MAX_TOKEN),
        mode=st.none() | MODES,
        minimum_mode=st.none() | MODES,
        uffd_access=st.sampled_from(list(UffdAccess)),
    ),
    st.builds(
        Welcome,
        mode=MODES,
        page_size=st.integers(0, (1 << 32) - 1),
        region_size=U64,
        attachment_id=U64,
        register_mode=U64.map(RegisterMode),
        features=U64.map(Feature),
        reasons=TEXT,
    ),
    st.builds(Attach, base=U64, length=U64, region_offset=U64),
    st.builds(Ready, attachment_id=U64),
    st.just(Detach()),
    st.just(Detached()),
    st.builds(ErrorMessage, code=st.sampled_from(list(ErrorCode)), message=TEXT),
)


def _framed(kind: int, body: bytes, version: int = 1) -> bytes:
    return HEADER.pack(MAGIC, version, kind, len(body), 0) + body


#: Packets that get past the header: a known or unknown type, any body, a right length. Most
#: bodies are wrong in some field, which is the point.
FRAMED = st.builds(
    _framed,
    kind=st.integers(0, 0x10),
    body=st.binary(max_size=96),
    version=st.sampled_from([1, 1, 1, 0, 2, 0xFFFF]),
)
#: A valid message with one byte changed, cut short or extended.
MUTATED = st.tuples(MESSAGES.map(encode), st.integers(0), st.integers(0, 255), st.integers(-3, 3))


def _mutate(case: tuple[bytes, int, int, int]) -> bytes:
    raw, where, value, grow = case
    data = bytearray(raw)
    data[where % len(data)] = value
    if grow < 0:
        del data[grow:]
    else:
        data += bytes(grow)
    if len(data) >= HEADER.size:
        struct.pack_into("<I", data, 8, len(data) - HEADER.size)
    return bytes(data)


PACKETS = st.one_of(
    st.binary(max_size=64),
    FRAMED,
    MUTATED.map(_mutate),
    st.binary(min_size=MAX_PACKET + 1, max_size=MAX_PACKET + 8),
)


@fuzz_settings(150)
@given(MESSAGES)
def test_every_message_round_trips(message: Message) -> None:
    try:
        packet = encode(message)
    except LocalProtocolError:
        # Only a message too large for one packet may be refused (a long reasons/message).
        assert isinstance(message, Welcome | ErrorMessage)
        return
    assert len(packet) <= MAX_PACKET
    assert decode(packet) == message


def _decoded(packet: bytes) -> Message | RemoteProtocolError:
    """The message, or the RemoteProtocolError; any other exception escapes the test."""
    try:
        return decode(packet)
    except RemoteProtocolError as exc:
        return exc


@fuzz_settings(500)
@given(PACKETS)
def test_any_packet_decodes_canonically_or_is_a_remote_protocol_error(packet: bytes) -> None:
    outcome = _decoded(packet)
    if isinstance(outcome, RemoteProtocolError):
        assert outcome.code in (ErrorCode.MALFORMED, ErrorCode.VERSION)
        assert outcome.message
        assert outcome.fds_to_close == []
    else:
        # Whatever decodes was the only encoding of its message: nothing the parser ignored.
        assert encode(outcome) == packet


#: One step of a hostile peer: a packet, how many fds came with it, whether it was truncated.
STEPS = st.lists(
    st.tuples(st.one_of(PACKETS, MESSAGES.map(encode)), st.integers(0, 4), st.booleans()),
    min_size=1,
    max_size=6,
)


@fuzz_settings(200)
@given(STEPS, MODES)
def test_the_service_machine_never_loses_an_fd_or_crashes(
    steps: list[tuple[bytes, int, bool]], mode: Mode
) -> None:
    """Every fd handed to ``receive`` comes back: in the Violation to close, or as the one
    userfaultfd of an accepted ATTACH. The service answers what it may answer, as the handoff
    server would; a CLOSED machine refuses more input with LocalProtocolError only."""
    machine = ServiceConnection()
    next_fd = 100
    for packet, fd_count, truncated in steps:
        fds = list(range(next_fd, next_fd + fd_count))
        next_fd += fd_count
        if machine.state is ServiceState.CLOSED:
            try:
                machine.receive(packet, fds, truncated=truncated)
            except LocalProtocolError:
                return
            raise AssertionError("a CLOSED connection took a packet")
        event = machine.receive(packet, fds, truncated=truncated)
        if isinstance(event, Violation):
            assert event.fds_to_close == fds
            assert decode(event.close_reply) == ErrorMessage(event.code, event.message)
            assert machine.state is ServiceState.CLOSED
            continue
        held = event.uffd_fd if isinstance(event, AttachReceived) else None
        assert fds == ([] if held is None else [held])
        # Answer as the service does, so that later steps reach every state.
        if machine.state is ServiceState.SEND_WELCOME:
            hello = event.hello  # type: ignore[union-attr]
            chosen = hello.mode or (Mode.EAGER if hello.uffd_access is UffdAccess.NONE else mode)
            if hello.uffd_access is UffdAccess.NONE and chosen is not Mode.EAGER:
                machine.error(ErrorCode.MODE_UNAVAILABLE, "no userfaultfd")
                continue
            machine.welcome(Welcome(chosen, 4096, 1 << 20, 7, 0, 0))
        elif machine.state is ServiceState.SEND_READY:
            machine.ready(7)
        elif machine.state is ServiceState.SEND_DETACHED:
            machine.detached()

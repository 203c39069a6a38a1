"""Hostile handshakes against the real service: what a process that can reach the handoff socket
may send in place of a client, and what the service makes of it.

Each test cites the section of docs/security.md it checks. After every hostile case the test
asserts the three invariants of docs/security.md §6 through ``attach_helpers.unharmed``: the
service's fd count is back at its baseline, no attachment is left counted, and a well-behaved
client still attaches and reads every byte of its region right.

Already covered elsewhere (tests/integration/test_attach.py), not repeated here: a pipe or a
memfd in place of the userfaultfd, a userfaultfd without its handshake, with EVENT_FORK, with
SIGBUS or without the features; wrong, used and another region's tokens; every bad range
(unaligned, zero, past the region, overflowing 2^64); a mapping another userfaultfd holds
(EBUSY); bad magic, ATTACH before HELLO without an fd, an fd on HELLO; the handshake timeout.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shmfault import _libc, _unix, protocol
from shmfault._abi import RegisterMode
from shmfault.attach import AttachError, attach
from shmfault.client import Client
from shmfault.modes import Mode
from shmfault.protocol import ErrorCode, ErrorMessage
from shmfault.uffd import Uffd
from tests import worlds
from tests.integration.attach_helpers import (
    PAGE,
    ChildMessages,
    Handoff,
    Memory,
    child_pool,
    entry_of,
    fd_count,
    handoff_pool,
    make_region,
    service_pid,
    unharmed,
)
from tests.integration.conftest import Service

pytestmark = [pytest.mark.root]

PAGES = 32


@pytest.fixture
def handoffs() -> Iterator[Callable[[str | os.PathLike[str]], Handoff]]:
    yield from handoff_pool()


class Victim:
    """A region with random bytes, and the service's fd count once it exists."""

    def __init__(self, service: Service, client: Client, tmp_path: Path) -> None:
        region, self.source = make_region(client, tmp_path, "file", PAGES * PAGE)
        self.region_id = region.id
        self.handoff = region.handoff_socket
        self.client = client
        self.pid = service_pid(service)
        self.baseline = fd_count(self.pid)

    def token(self) -> str:
        return self.client.issue_attach_token(self.region_id)[1]

    def unharmed(self) -> None:
        unharmed(self.client, self.pid, self.baseline, self.region_id, self.source)


@pytest.fixture
def victim(service: Service, client: Client, tmp_path: Path) -> Victim:
    return Victim(service, client, tmp_path)


def refused(connection: Handoff, message: protocol.Message | None, code: ErrorCode) -> str:
    """``message`` is ERROR ``code`` and the service then closed the connection; its text."""
    assert isinstance(message, ErrorMessage), message
    assert message.code is code, message.message
    assert connection.ended()
    return message.message


def welcomed(
    victim: Victim,
    handoffs: Callable[[str | os.PathLike[str]], Handoff],
    mode: Mode = Mode.SHARED_COPY,
) -> tuple[Handoff, int]:
    """A connection past WELCOME with the region mapped; the mapping's address."""
    connection = handoffs(victim.handoff)
    welcome = connection.hello(victim.region_id, victim.token(), mode=mode)
    assert isinstance(welcome, protocol.Welcome), welcome
    return connection, connection.map_region()


# --- §4.3: an fd that is not a userfaultfd ---


def _regular_file(connection: Handoff, tmp_path: Path) -> int:
    path = tmp_path / "plain"
    path.write_bytes(b"x" * PAGE)
    return connection.own(os.open(path, os.O_RDWR | os.O_CLOEXEC))


def _file_named_like_a_userfaultfd(connection: Handoff, tmp_path: Path) -> int:
    # The service recognises a userfaultfd by its /proc/self/fd link: a file whose name is
    # that link's text must not pass.
    path = tmp_path / "anon_inode:[userfaultfd]"
    path.write_bytes(b"")
    return connection.own(os.open(path, os.O_RDWR | os.O_CLOEXEC))


def _socket(connection: Handoff, tmp_path: Path) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.own(ours.detach())
    return connection.own(theirs.detach())


def _dev_userfaultfd(connection: Handoff, tmp_path: Path) -> int:
    # The device that makes userfaultfds is not one itself.
    if not os.path.exists("/dev/userfaultfd"):
        pytest.skip("no /dev/userfaultfd on this machine")
    return connection.own(os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC))


NOT_USERFAULTFDS: dict[str, Callable[[Handoff, Path], int]] = {
    "a regular file": _regular_file,
    "a file named anon_inode:[userfaultfd]": _file_named_like_a_userfaultfd,
    "an eventfd": lambda connection, _: connection.own(os.eventfd(0, os.EFD_CLOEXEC)),
    "a socket": _socket,
    "a pidfd": lambda connection, _: connection.own(os.pidfd_open(os.getpid())),
    "an O_PATH fd": lambda connection, tmp_path: connection.own(
        os.open(tmp_path, os.O_PATH | os.O_CLOEXEC)
    ),
    "/dev/userfaultfd itself": _dev_userfaultfd,
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", NOT_USERFAULTFDS)
def test_an_fd_that_is_not_a_userfaultfd_is_refused(
    victim: Victim,
    handoffs: Callable[[str | os.PathLike[str]], Handoff],
    tmp_path: Path,
    case: str,
) -> None:
    """docs/security.md §4.3: the fd in ATTACH must be a userfaultfd (BAD_UFFD otherwise)."""
    connection, address = welcomed(victim, handoffs)
    fd = NOT_USERFAULTFDS[case](connection, tmp_path)
    connection.send(protocol.Attach(address, PAGES * PAGE, 0), [fd])
    message = refused(connection, connection.receive(), ErrorCode.BAD_UFFD)
    assert "not a userfaultfd" in message
    victim.unharmed()


# --- §4.3: the number of fds ---


@pytest.mark.timeout(30)
@pytest.mark.parametrize("extra", ["a second userfaultfd", "a pipe"])
def test_two_fds_on_attach_are_malformed_and_both_closed(
    victim: Victim, handoffs: Callable[[str | os.PathLike[str]], Handoff], extra: str
) -> None:
    """docs/security.md §4.3: ATTACH carries exactly one fd; every fd of a refused packet is
    closed."""
    connection, address = welcomed(victim, handoffs)
    assert connection.welcome is not None
    uffd = connection.uffd(register=address)
    if extra == "a pipe":
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        connection.own(write_end)
        second = connection.own(read_end)
    else:
        second = connection.uffd().fileno()
    connection.send(protocol.Attach(address, PAGES * PAGE, 0), [uffd.fileno(), second])
    message = refused(connection, connection.receive(), ErrorCode.MALFORMED)
    assert "got 2" in message
    victim.unharmed()


def _many_fds(connection: Handoff, count: int) -> list[int]:
    # One eventfd, duplicated: the fd table, not the kernel's file count, is what grows.
    first = connection.own(os.eventfd(0, os.EFD_CLOEXEC))
    return [first] + [connection.own(os.dup(first)) for _ in range(count - 1)]


#: SCM_MAX_FD: the most fds one SCM_RIGHTS message may carry.
SCM_MAX_FD = 253


@pytest.mark.timeout(30)
@pytest.mark.parametrize("count", [5, SCM_MAX_FD])
@pytest.mark.parametrize("on", ["HELLO", "ATTACH"])
def test_more_fds_than_the_receive_buffer_holds_are_all_closed(
    victim: Victim,
    handoffs: Callable[[str | os.PathLike[str]], Handoff],
    count: int,
    on: str,
) -> None:
    """docs/security.md §4.3: the service's control buffer holds 4 fds. More arrive as a
    truncated control message (MSG_CTRUNC): the kernel drops those that did not fit, the service
    closes those that did, and answers MALFORMED."""
    if on == "HELLO":
        connection = handoffs(victim.handoff)
        packet: protocol.Message = protocol.Hello(victim.region_id, victim.token())
    else:
        connection, address = welcomed(victim, handoffs)
        packet = protocol.Attach(address, PAGES * PAGE, 0)
    connection.send(packet, _many_fds(connection, count))
    message = refused(connection, connection.receive(), ErrorCode.MALFORMED)
    assert "truncated" in message
    victim.unharmed()


# --- §4.3, §4.5: the userfaultfd at the wrong moment, twice, or never ---


@pytest.mark.timeout(30)
def test_a_userfaultfd_before_hello_is_refused(
    victim: Victim, handoffs: Callable[[str | os.PathLike[str]], Handoff]
) -> None:
    """docs/security.md §4.3: a userfaultfd on HELLO, or an ATTACH with one before any HELLO,
    is refused and the fd closed."""
    with Uffd.open() as uffd:
        connection = handoffs(victim.handoff)
        connection.send(protocol.Hello(victim.region_id, victim.token()), [uffd.fileno()])
        refused(connection, connection.receive(), ErrorCode.MALFORMED)
        connection = handoffs(victim.handoff)
        connection.send(protocol.Attach(0, PAGE, 0), [uffd.fileno()])
        refused(connection, connection.receive(), ErrorCode.UNEXPECTED)
    victim.unharmed()


@pytest.mark.timeout(30)
def test_an_attach_without_its_userfaultfd_is_refused(
    victim: Victim, handoffs: Callable[[str | os.PathLike[str]], Handoff]
) -> None:
    """docs/security.md §4.3: in a lazy mode ATTACH must carry the userfaultfd; in eager it must
    carry none."""
    connection, address = welcomed(victim, handoffs)
    connection.uffd(register=address)
    connection.send(protocol.Attach(address, PAGES * PAGE, 0))
    assert "got 0" in refused(connection, connection.receive(), ErrorCode.MALFORMED)
    connection, address = welcomed(victim, handoffs, Mode.EAGER)
    with Uffd.open() as stray:
        connection.send(protocol.Attach(address, PAGES * PAGE, 0), [stray.fileno()])
        assert "got 1" in refused(connection, connection.receive(), ErrorCode.MALFORMED)
    victim.unharmed()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("second", ["ATTACH", "DETACH with an fd", "HELLO"])
def test_a_second_message_with_a_userfaultfd_after_ready_ends_only_that_attachment(
    victim: Victim, handoffs: Callable[[str | os.PathLike[str]], Handoff], second: str
) -> None:
    """docs/security.md §4.3: once attached, only DETACH (without fds) is allowed.
    Anything else ends that attachment with an ERROR and closes every fd that came with it; the
    client's own pages stay registered to its userfaultfd, so unfilled ones block, never read
    wrong bytes (docs/protocol.md §5)."""
    connection, address = welcomed(victim, handoffs)
    uffd = connection.uffd(register=address)
    connection.send(protocol.Attach(address, PAGES * PAGE, 0), [uffd.fileno()])
    ready = connection.receive()
    assert isinstance(ready, protocol.Ready), ready
    assert Memory(address, PAGES * PAGE).page(0) == victim.source[:PAGE]
    other = connection.uffd()
    if second == "ATTACH":
        connection.send(protocol.Attach(address, PAGES * PAGE, 0), [other.fileno()])
        code = ErrorCode.UNEXPECTED
    elif second == "HELLO":
        connection.send(protocol.Hello(victim.region_id, victim.token()), [other.fileno()])
        code = ErrorCode.UNEXPECTED
    else:
        connection.send(protocol.Detach(), [other.fileno()])
        code = ErrorCode.MALFORMED
    refused(connection, connection.receive(), code)
    entry = entry_of(victim.client, ready.attachment_id)
    assert entry["ended"] is not None
    assert entry["end_reason"].startswith(("protocol violation", "unexpected message"))
    # The service no longer holds the first userfaultfd either: closing ours unregisters.
    connection.close()
    victim.unharmed()


@pytest.mark.timeout(60)
def test_a_handshake_that_never_sends_its_userfaultfd_frees_its_slot_at_the_timeout(
    service_dir: Path,
    shm_prefix: str,
    handoffs: Callable[[str | os.PathLike[str]], Handoff],
    tmp_path: Path,
) -> None:
    """docs/security.md §4.5: a client that said HELLO holds one of the attachment slots until
    the handshake timeout; then the slot is free again and its token stays spent."""
    hurried = Service(
        service_dir, shm_prefix, ["--handshake-timeout", "1", "--max-attachments", "1"]
    )
    hurried.start()
    with hurried.client() as client:
        victim = Victim(hurried, client, tmp_path)
        token = victim.token()
        stalled = handoffs(victim.handoff)
        assert isinstance(stalled.hello(victim.region_id, token), protocol.Welcome)
        with pytest.raises(AttachError) as full:
            attach(victim.handoff, victim.region_id, victim.token())
        assert full.value.code is ErrorCode.LIMIT
        refused(stalled, stalled.receive(), ErrorCode.TIMEOUT)
        again = handoffs(victim.handoff)
        refused(again, again.hello(victim.region_id, token), ErrorCode.DENIED)
        victim.unharmed()
    assert hurried.stop() == 0


FLOODER = 61003  # a uid that is neither root nor the service's


def _flood(messages: ChildMessages, handoff: str, gid: int) -> None:
    """In the child, as FLOODER: open silent connections until the service refuses more; say
    how many the service took in (handshakes held) and how many it refused at once (LIMIT),
    hold them until told, then say how many are still held, unanswered."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(FLOODER)
    flood: list[socket.socket] = []
    for _ in range(300):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(handoff)
        except BlockingIOError:
            sock.close()
            break  # the backlog is full: the flood is as large as it gets
        flood.append(sock)
    # The service accepts them all (and refuses the excess) within a moment.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(_peek_refusal(s) for s in flood) < len(flood) - 64:
        time.sleep(0.05)
    refused = [s for s in flood if _refusal(s) == ErrorCode.LIMIT]
    held = [s for s in flood if s not in refused]
    messages.send((len(held), len(refused)))
    assert messages.recv() == "done"
    messages.send(sum(1 for s in held if _refusal(s) is None))
    for sock in flood:
        sock.close()


def _peek_refusal(sock: socket.socket) -> bool:
    """An answer waits on ``sock``, not taken."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


def _refusal(sock: socket.socket) -> ErrorCode | None:
    """The code of the ERROR waiting on ``sock`` (non-blocking), None if nothing is there."""
    try:
        packet = _unix.recv_packet(sock)
    except BlockingIOError:
        return None
    if packet is None:
        return None
    message = protocol.decode(packet.data)
    return message.code if isinstance(message, ErrorMessage) else None


@pytest.mark.timeout(60)
def test_a_flood_of_silent_connections_from_one_uid_does_not_delay_another(
    open_dir: Path, shm_prefix: str, nobody: pwd.struct_passwd, tmp_path: Path
) -> None:
    """docs/security.md §4.5: one uid holds at most 64 of the 256 handshake slots; the
    service refuses its excess at once (ERROR LIMIT), so the backlog keeps draining, and
    another uid attaches while the whole flood is still held (its handshake timeout far
    away)."""
    group = grp.getgrgid(nobody.pw_gid).gr_name
    hurried = Service(open_dir, shm_prefix, ["--group", group, "--handshake-timeout", "60"])
    hurried.start()
    pool = child_pool()
    spawn = next(pool)
    try:
        with hurried.client() as client:
            victim = Victim(hurried, client, tmp_path)
            flooder = spawn(_flood, victim.handoff, nobody.pw_gid)
            held, refused = flooder.recv()
            assert held == 64, (held, refused)
            assert refused > 0
            with attach(victim.handoff, victim.region_id, victim.token()) as attachment:
                assert Memory.of(attachment).read() == victim.source
            flooder.send("done")
            assert flooder.recv() == held  # attached while every one of them was held
            victim.unharmed()
    finally:
        for _ in pool:
            pass
    assert hurried.stop() == 0


@pytest.mark.timeout(30)
def test_a_token_not_used_within_its_lifetime_is_refused(
    service_dir: Path, shm_prefix: str, tmp_path: Path
) -> None:
    """docs/security.md §4.1: an attach token is valid for --token-ttl seconds (a day by
    default); after that the handshake is refused DENIED, and a fresh token attaches."""
    hurried = Service(service_dir, shm_prefix, ["--token-ttl", "0.5"])
    hurried.start()
    try:
        with hurried.client() as client:
            victim = Victim(hurried, client, tmp_path)
            stale = victim.token()
            time.sleep(1)
            with pytest.raises(AttachError) as caught:
                attach(victim.handoff, victim.region_id, stale)
            assert caught.value.code is ErrorCode.DENIED
            assert "expired" in str(caught.value)
            # The client library takes a fresh token when a Region's own has expired.
            region = client.create_region(PAGE)
            time.sleep(1)
            with client.attach(region) as attached:
                assert attached.length == PAGE
            client.delete_region(region.id)
            victim.unharmed()
    finally:
        hurried.stop()


# --- §4.3: the declared range must be the region, mapped where the client says ---


def _mapped_elsewhere(connection: Handoff) -> tuple[int, protocol.Attach]:
    """The region mapped from page 4 on, declared as if mapped from page 0."""
    address = connection.map_region(offset=4 * PAGE, length=(PAGES - 4) * PAGE)
    return address, protocol.Attach(address, (PAGES - 4) * PAGE, 0)


def _anonymous_memory(connection: Handoff) -> tuple[int, protocol.Attach]:
    address = connection.map(PAGES * PAGE, _libc.MAP_PRIVATE | _libc.MAP_ANONYMOUS)
    return address, protocol.Attach(address, PAGES * PAGE, 0)


def _private_mapping_of_the_region(connection: Handoff) -> tuple[int, protocol.Attach]:
    assert connection.region_fd is not None
    address = connection.map(PAGES * PAGE, _libc.MAP_PRIVATE, connection.region_fd)
    return address, protocol.Attach(address, PAGES * PAGE, 0)


def _another_memfd(connection: Handoff) -> tuple[int, protocol.Attach]:
    memfd = connection.own(os.memfd_create("not-the-region", os.MFD_CLOEXEC))
    os.ftruncate(memfd, PAGES * PAGE)
    address = connection.map(PAGES * PAGE, _libc.MAP_SHARED, memfd)
    return address, protocol.Attach(address, PAGES * PAGE, 0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", [Mode.SHARED_COPY, Mode.SHARED_CONTINUE])
@pytest.mark.parametrize(
    ("memory", "why"),
    [
        (_mapped_elsewhere, "maps region offset 0x4000, not the declared 0x0"),
        (_anonymous_memory, "maps another file than the region"),
        (_private_mapping_of_the_region, "private mapping of the region"),
        (_another_memfd, "maps another file than the region"),
    ],
)
def test_a_shared_attach_whose_range_is_not_the_region_where_declared_is_refused(
    victim: Victim,
    handoffs: Callable[[str | os.PathLike[str]], Handoff],
    memory: Callable[[Handoff], tuple[int, protocol.Attach]],
    why: str,
    mode: Mode,
) -> None:
    """docs/security.md §4.3: in a shared mode the service fills the region through the
    client's mapping, so the declared range must be a shared mapping of the region at the
    declared offset; otherwise the source's bytes for one offset would land in the region at
    another, for every sharer. The region keeps its bytes."""
    connection = handoffs(victim.handoff)
    welcome = connection.hello(victim.region_id, victim.token(), mode=mode)
    assert isinstance(welcome, protocol.Welcome), welcome
    address, declared = memory(connection)
    uffd = connection.uffd()
    # Anonymous memory has no minor faults: the hostile client registers what it can.
    register_mode = RegisterMode.MISSING if memory is _anonymous_memory else welcome.register_mode
    uffd.register(address, declared.length, register_mode)
    connection.send(declared, [uffd.fileno()])
    message = refused(connection, connection.receive(), ErrorCode.BAD_RANGE)
    assert why in message
    connection.close()
    assert victim.client.read(victim.region_id) == victim.source
    victim.unharmed()


# --- §2.3: socket paths an attacker prepared ---


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["shmfault.sock", "handoff.sock"])
@pytest.mark.parametrize("kind", ["a symlink", "a regular file", "a fifo"])
def test_a_precreated_socket_path_is_refused_and_left_alone(
    service_dir: Path, shm_prefix: str, tmp_path: Path, name: str, kind: str
) -> None:
    """docs/security.md §2.3: a socket path that exists and is not our socket stops the start;
    nothing is removed, followed or written through."""
    runtime = service_dir / "run"
    runtime.mkdir(mode=0o700)
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    path = runtime / name
    if kind == "a symlink":
        path.symlink_to(target)
    elif kind == "a regular file":
        path.write_bytes(b"keep")
    else:
        os.mkfifo(path)
    refused_start = Service(service_dir, shm_prefix)
    assert refused_start.spawn().wait() == 1
    log = refused_start.log.read_text()
    assert "is a symlink" in log if kind == "a symlink" else "is not a socket" in log, log
    assert os.path.lexists(path)
    assert target.read_bytes() == b"keep"
    if kind == "a symlink":
        assert os.readlink(path) == str(target)
    else:
        assert not stat.S_ISSOCK(os.lstat(path).st_mode)


# --- §2.1, §2.2, §4.2: a connection from another uid ---


@pytest.fixture
def nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")


def _connect(path: str) -> str:
    """In the child: connect to a unix socket; 'connected' or the errno's name."""
    family = socket.SOCK_SEQPACKET if path.endswith("handoff.sock") else socket.SOCK_STREAM
    sock = socket.socket(socket.AF_UNIX, family)
    try:
        sock.connect(path)
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]
    finally:
        sock.close()
    return "connected"


def _attach_as_child(handoff: str, region_id: str, tokens: list[str]) -> list[dict[str, object]]:
    """In the child: attach with each token in turn, holding every attachment made, and read
    the region through each; what happened to each."""
    outcomes: list[dict[str, object]] = []
    held = []
    try:
        for token in tokens:
            try:
                attachment = attach(handoff, region_id, token, mode="shared-copy")
            except AttachError as exc:
                outcomes.append({"refused": exc.code.name, "message": str(exc)})
                continue
            held.append(attachment)
            outcomes.append({"id": attachment.attachment_id, "bytes": bytes(attachment.buffer)})
    finally:
        for attachment in held:
            attachment.detach()
    return outcomes


def _attach_posix_shm_as_child(
    handoff: str, region_id: str, tokens: list[str]
) -> list[dict[str, object]]:
    """In the child: ask for shared-copy with the first token, then let the service choose
    with the second, write the page it reads, and say what came back."""
    outcomes: list[dict[str, object]] = []
    try:
        attach(handoff, region_id, tokens[0], mode="shared-copy")
    except AttachError as exc:
        outcomes.append({"refused": exc.code.name, "message": str(exc)})
    with attach(handoff, region_id, tokens[1]) as attachment:
        before = bytes(attachment.buffer)
        attachment.buffer[:4] = b"mine"
        outcomes.append({"mode": attachment.mode.wire_name, "reasons": attachment.reasons})
        outcomes.append({"bytes": before})
    return outcomes


@pytest.mark.timeout(60)
def test_another_uid_never_gets_the_fd_of_a_posix_shm_region(
    open_dir: Path, shm_prefix: str, nobody: pwd.struct_passwd, tmp_path: Path
) -> None:
    """docs/security.md §3.3, §5.2: a posix-shm object cannot be sealed, so a read-write fd of
    it lets its holder resize it under every sharer. Only the service's own uid (which could
    open it in /dev/shm anyway) and root get one; another uid is refused the shared modes and
    falls back to private-copy, saying why, with the right bytes, and cannot change the
    region."""
    group = grp.getgrgid(nobody.pw_gid).gr_name
    shared = Service(open_dir, shm_prefix, ["--group", group])
    shared.start()
    with shared.client() as client:
        region, source = make_region(client, tmp_path, "file", PAGES * PAGE, "posix-shm")
        tokens = [client.issue_attach_token(region.id)[1] for _ in range(2)]
        forced, chosen, read = worlds.run_in_child(
            _attach_posix_shm_as_child, region.handoff_socket, region.id, tokens, user="nobody"
        )
        assert forced["refused"] == ErrorCode.MODE_UNAVAILABLE.name, forced
        assert f"not to uid {nobody.pw_uid}" in str(forced["message"])
        assert chosen["mode"] == "private-copy", chosen
        assert "posix-shm region cannot be sealed" in str(chosen["reasons"])
        assert read["bytes"] == source
        assert client.read(region.id) == source  # its write stayed in its own copy
        # The service's own uid still shares it.
        with client.attach(region.id) as mine:
            assert mine.mode is Mode.SHARED_COPY
            assert Memory.of(mine).read() == source
    assert shared.stop() == 0


@pytest.mark.timeout(60)
def test_another_uid_cannot_reach_a_private_service_even_with_a_token(
    open_dir: Path, shm_prefix: str, nobody: pwd.struct_passwd, tmp_path: Path
) -> None:
    """docs/security.md §2.1, §2.2: without ``--group`` the runtime directory is 0700 and the
    sockets 0600: another uid cannot connect to either, whatever it knows."""
    private = Service(open_dir, shm_prefix)
    private.start()
    with private.client() as client:
        victim = Victim(private, client, tmp_path)
        for path in (str(private.socket), victim.handoff):
            assert worlds.run_in_child(_connect, path, user="nobody", timeout=20) == "EACCES"
        victim.unharmed()
    assert private.stop() == 0


@pytest.mark.timeout(60)
def test_another_uid_in_the_group_attaches_with_a_token_and_is_counted_apart(
    open_dir: Path, shm_prefix: str, nobody: pwd.struct_passwd, tmp_path: Path
) -> None:
    """docs/security.md §4.1, §4.2: with ``--group`` a member of the group connects; the token,
    not the uid, decides whether it attaches; its uid (SO_PEERCRED) is recorded and counted
    against its own per-uid limit, not against root's."""
    group = grp.getgrgid(nobody.pw_gid).gr_name
    shared = Service(open_dir, shm_prefix, ["--group", group, "--max-attachments-per-uid", "1"])
    shared.start()
    with shared.client() as client:
        victim = Victim(shared, client, tmp_path)
        # root holds one attachment, its limit, the whole time: nobody's are counted apart.
        with client.attach(victim.region_id) as mine:
            tokens = ["guessed", victim.token(), victim.token()]
            wrong, first, second = worlds.run_in_child(
                _attach_as_child, victim.handoff, victim.region_id, tokens, user="nobody"
            )
            assert wrong["refused"] == ErrorCode.DENIED.name
            assert first.get("bytes") == victim.source, first
            # nobody's second attachment, while it holds its first, is past its own limit.
            assert second["refused"] == ErrorCode.LIMIT.name, second
            assert f"uid {nobody.pw_uid}" in str(second["message"])
            entry = entry_of(client, int(str(first["id"])))
            assert entry["uid"] == nobody.pw_uid
            assert Memory.of(mine).read() == victim.source
        victim.unharmed()
    assert shared.stop() == 0

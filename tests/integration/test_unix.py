"""``shmfault._unix`` on real ``SOCK_SEQPACKET`` sockets: fds really cross, truncation is seen,
and no fd leaks on any path. Every test checks that this process's fd table is back to what it
was when the test started."""

from __future__ import annotations

import array
import errno
import os
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shmfault import _unix
from shmfault._unix import (
    Credentials,
    Packet,
    close_fds,
    connect_seqpacket,
    fds_from_ancillary,
    listen_seqpacket,
    open_pidfd,
    peer_credentials,
    peer_pidfd,
    recv_packet,
    send_packet,
)
from shmfault.protocol import (
    MAX_PACKET,
    Attach,
    AttachReceived,
    ClientConnection,
    DetachedReceived,
    DetachRequested,
    ErrorCode,
    ErrorMessage,
    Hello,
    HelloReceived,
    Mode,
    ReadyReceived,
    ServiceConnection,
    ServiceState,
    Violation,
    Welcome,
    WelcomeReceived,
    decode,
    encode,
    fds_expected,
)

pytestmark = pytest.mark.timeout(30)

_WAIT = 5.0


def open_fds() -> set[int]:
    """The fds open in this process."""
    # listdir reads the directory through an fd of its own, closed by the time it returns:
    # its entry is the one that no longer resolves.
    return {int(name) for name in os.listdir("/proc/self/fd") if _is_open(name)}


def _is_open(name: str) -> bool:
    try:
        os.readlink(f"/proc/self/fd/{name}")
    except FileNotFoundError:
        return False
    return True


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves an fd open that was not open before it."""
    before = open_fds()
    yield
    leaked = open_fds() - before
    assert not leaked, {fd: _describe(fd) for fd in leaked}


def _describe(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected SOCK_SEQPACKET pair; a receive that finds nothing fails after a few seconds
    instead of hanging the suite."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    left.settimeout(_WAIT)
    right.settimeout(_WAIT)
    try:
        yield left, right
    finally:
        left.close()
        right.close()


@pytest.fixture
def memfds() -> Iterator[list[int]]:
    """memfds made by the test, closed after it; ``memfd(data)`` via :func:`memfd`."""
    made: list[int] = []
    yield made
    close_fds(made)


def memfd(made: list[int], data: bytes) -> int:
    fd = os.memfd_create("shmfault-test-unix", os.MFD_CLOEXEC)
    made.append(fd)
    os.write(fd, data)
    return fd


def pid_of_pidfd(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as info:
        for line in info:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise AssertionError(f"fd {fd} is not a pidfd")


def received(packet: Packet | None) -> Packet:
    assert packet is not None, "end of connection where a packet was expected"
    return packet


# --- fds cross ---


def test_a_memfd_arrives_and_its_bytes_read_back(
    pair: tuple[socket.socket, socket.socket], memfds: list[int]
) -> None:
    left, right = pair
    original = memfd(memfds, b"region bytes")
    send_packet(left, b"P" * 16, [original])
    packet = received(recv_packet(right))
    try:
        assert packet.data == b"P" * 16
        assert not packet.truncated
        [fd] = packet.fds
        assert fd != original
        assert os.fstat(fd).st_ino == os.fstat(original).st_ino
        assert os.pread(fd, 12, 0) == b"region bytes"
        # Received close-on-exec (MSG_CMSG_CLOEXEC): a concurrent fork+exec cannot leak it.
        assert not os.get_inheritable(fd)
        # The sender's fd is still its own.
        os.fstat(original)
    finally:
        close_fds(packet.fds)


def test_several_fds_arrive_in_order(
    pair: tuple[socket.socket, socket.socket], memfds: list[int]
) -> None:
    left, right = pair
    originals = [memfd(memfds, f"file {i}".encode()) for i in range(4)]
    send_packet(left, b"several", originals)
    packet = received(recv_packet(right, max_fds=4))
    try:
        assert not packet.truncated
        assert [os.pread(fd, 6, 0) for fd in packet.fds] == [f"file {i}".encode() for i in range(4)]
    finally:
        close_fds(packet.fds)


def test_several_scm_rights_messages_in_one_packet(
    pair: tuple[socket.socket, socket.socket], memfds: list[int]
) -> None:
    left, right = pair
    first = [memfd(memfds, b"a"), memfd(memfds, b"b")]
    second = [memfd(memfds, b"c")]
    left.sendmsg(
        [b"two control messages"],
        [
            (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", first).tobytes()),
            (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", second).tobytes()),
        ],
    )
    packet = received(recv_packet(right))
    try:
        assert not packet.truncated
        assert [os.pread(fd, 1, 0) for fd in packet.fds] == [b"a", b"b", b"c"]
    finally:
        close_fds(packet.fds)


def test_fds_from_ancillary_reads_every_scm_rights_and_drops_partial_ints() -> None:
    ints = array.array("i", [10, 11, 12]).tobytes()
    ancillary = [
        (socket.SOL_SOCKET, socket.SCM_RIGHTS, ints[:8]),
        (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, b"\x01" * 12),
        (socket.SOL_SOCKET, socket.SCM_RIGHTS, ints[8:] + b"\x07\x00"),  # cut by MSG_CTRUNC
        (socket.SOL_IP, socket.SCM_RIGHTS, ints),  # same type number, another level: no fds
    ]
    assert fds_from_ancillary(ancillary) == [10, 11, 12]
    assert fds_from_ancillary([]) == []


def test_a_packet_without_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    send_packet(left, b"\x01" * MAX_PACKET)
    assert recv_packet(right) == Packet(b"\x01" * MAX_PACKET, [], False)


# --- truncation ---


@pytest.mark.parametrize(("sent", "max_fds"), [(5, 4), (8, 4), (3, 1), (2, 0)])
def test_more_fds_than_max_fds_is_truncated_and_the_violation_path_closes_them(
    pair: tuple[socket.socket, socket.socket], memfds: list[int], sent: int, max_fds: int
) -> None:
    left, right = pair
    originals = [memfd(memfds, b"x") for _ in range(sent)]
    before = open_fds()
    send_packet(left, encode(Hello("r", "t")), originals)
    packet = received(recv_packet(right, max_fds=max_fds))
    assert packet.truncated
    # The kernel installed the fds that fit and dropped the rest. CMSG_SPACE rounds the buffer
    # up to 8 bytes, so an odd max_fds has room for one more.
    assert len(packet.fds) == (socket.CMSG_SPACE(4 * max_fds) - socket.CMSG_LEN(0)) // 4
    assert max_fds <= len(packet.fds) < sent
    assert open_fds() - before == set(packet.fds)

    event = ServiceConnection().receive(packet.data, packet.fds, truncated=packet.truncated)
    assert isinstance(event, Violation)
    assert event.code is ErrorCode.MALFORMED
    assert event.fds_to_close == packet.fds
    send_packet(right, event.close_reply)
    close_fds(event.fds_to_close)
    assert open_fds() == before

    reply = received(recv_packet(left))
    assert decode(reply.data) == ErrorMessage(ErrorCode.MALFORMED, event.message)


@pytest.mark.parametrize("size", [MAX_PACKET + 1, MAX_PACKET + 2, 65536])
def test_an_oversize_packet_is_truncated(
    pair: tuple[socket.socket, socket.socket], memfds: list[int], size: int
) -> None:
    left, right = pair
    fd = memfd(memfds, b"x")
    left.sendmsg(
        [b"y" * size], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
    )
    packet = received(recv_packet(right))
    try:
        assert packet.truncated
        assert len(packet.data) == MAX_PACKET + 1
        assert len(packet.fds) == 1
        event = ServiceConnection().receive(packet.data, packet.fds, truncated=packet.truncated)
        assert isinstance(event, Violation)
        assert "larger than 4096" in event.message
        assert event.fds_to_close == packet.fds
    finally:
        close_fds(packet.fds)
    # The next packet is read whole: the rest of the oversize one is gone, not left queued.
    send_packet(left, b"next")
    assert recv_packet(right) == Packet(b"next", [], False)


def test_send_packet_refuses_what_the_peer_could_not_read(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    left, _right = pair
    with pytest.raises(ValueError, match="4097 bytes, more than 4096"):
        send_packet(left, b"z" * (MAX_PACKET + 1))
    with pytest.raises(ValueError, match="empty packet"):
        send_packet(left, b"")


def test_send_packet_with_a_closed_fd_raises_ebadf(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    left, _right = pair
    fd = os.memfd_create("closed")
    os.close(fd)
    with pytest.raises(OSError, match=os.strerror(errno.EBADF)) as caught:
        send_packet(left, b"data", [fd])
    assert caught.value.errno == errno.EBADF


# --- end of connection ---


def test_end_of_connection_is_none(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    send_packet(left, b"last")
    left.close()
    assert recv_packet(right) == Packet(b"last", [], False)
    assert recv_packet(right) is None
    assert recv_packet(right) is None


def test_an_empty_packet_reads_as_end_of_connection(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    left, right = pair
    left.sendmsg([b""])
    assert recv_packet(right) is None


def test_sending_to_a_closed_peer_is_a_broken_pipe(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    left, right = pair
    right.close()
    with pytest.raises(BrokenPipeError):
        send_packet(left, b"anyone?")


def test_receiving_on_a_nonblocking_socket_with_nothing_queued(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    _left, right = pair
    right.setblocking(False)
    with pytest.raises(BlockingIOError):
        recv_packet(right)


# --- listening and connecting ---


def test_listen_connect_accept(tmp_path: Path, memfds: list[int]) -> None:
    path = str(tmp_path / "handoff.sock")
    with listen_seqpacket(path) as listener:
        assert listener.type == socket.SOCK_SEQPACKET
        assert not listener.get_inheritable()
        assert Path(path).is_socket()
        with connect_seqpacket(path, timeout=_WAIT) as client:
            assert not client.get_inheritable()
            assert client.gettimeout() == _WAIT
            listener.settimeout(_WAIT)
            service, _ = listener.accept()
            with service:
                service.settimeout(_WAIT)
                send_packet(client, b"hello", [memfd(memfds, b"via a path")])
                packet = received(recv_packet(service))
                assert packet.data == b"hello"
                assert os.pread(packet.fds[0], 10, 0) == b"via a path"
                close_fds(packet.fds)
                assert peer_credentials(service) == Credentials(
                    os.getpid(), os.getuid(), os.getgid()
                )


def test_listen_on_a_taken_path_fails_without_leaking(tmp_path: Path) -> None:
    path = tmp_path / "handoff.sock"
    path.write_text("stale")
    with pytest.raises(OSError, match=os.strerror(errno.EADDRINUSE)) as caught:
        listen_seqpacket(str(path))
    assert caught.value.errno == errno.EADDRINUSE


def test_connect_failures(tmp_path: Path) -> None:
    path = str(tmp_path / "handoff.sock")
    with pytest.raises(FileNotFoundError):
        connect_seqpacket(path, timeout=_WAIT)
    listen_seqpacket(path).close()  # leaves the socket file with nobody listening
    with pytest.raises(ConnectionRefusedError):
        connect_seqpacket(path, timeout=_WAIT)


def _fill_backlog(path: str) -> list[socket.socket]:
    """Connections queued on the listener at ``path`` until its backlog refuses one more."""
    queued: list[socket.socket] = []
    for _ in range(1000):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        queued.append(sock)
        try:
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            queued.pop()
            return queued
    raise AssertionError("the backlog never filled")


def test_connect_waits_for_room_in_a_full_backlog(tmp_path: Path) -> None:
    """A unix connect to a full backlog is EAGAIN at once on a non-blocking socket; the timeout
    must bound a wait for room instead (a flood of connections must not refuse a client)."""
    path = str(tmp_path / "handoff.sock")
    with listen_seqpacket(path, backlog=2) as listener:
        queued = _fill_backlog(path)
        try:
            accepted: list[socket.socket] = []
            timer = threading.Timer(0.3, lambda: accepted.append(listener.accept()[0]))
            timer.start()
            with connect_seqpacket(path, timeout=_WAIT) as client:
                timer.join()
                assert accepted, "the connect returned before the listener made room"
                assert client.gettimeout() == _WAIT
            accepted[0].close()
        finally:
            for sock in queued:
                sock.close()


def test_connect_to_a_backlog_that_stays_full_times_out(tmp_path: Path) -> None:
    path = str(tmp_path / "handoff.sock")
    with listen_seqpacket(path, backlog=2):
        queued = _fill_backlog(path)
        try:
            with pytest.raises(TimeoutError, match="backlog full"):
                connect_seqpacket(path, timeout=0.2)
            with pytest.raises(BlockingIOError):
                connect_seqpacket(path, timeout=0)
        finally:
            for sock in queued:
                sock.close()


# --- who is at the other end ---

_CONNECT_AND_WAIT = """
import socket, sys
client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
client.connect(sys.argv[1])
client.recv(1)  # until the test closes its end
"""


def test_peer_credentials_of_a_socketpair(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    mine = Credentials(os.getpid(), os.getuid(), os.getgid())
    assert peer_credentials(left) == mine
    assert peer_credentials(right) == mine


def test_peer_credentials_and_pidfd_of_another_process(tmp_path: Path) -> None:
    path = str(tmp_path / "handoff.sock")
    with listen_seqpacket(path) as listener:
        listener.settimeout(_WAIT)
        child = subprocess.Popen([sys.executable, "-c", _CONNECT_AND_WAIT, path])
        try:
            service, _ = listener.accept()
            with service:
                assert peer_credentials(service) == Credentials(child.pid, os.getuid(), os.getgid())
                pidfd = peer_pidfd(service)
                assert pidfd is not None
                try:
                    assert pid_of_pidfd(pidfd) == child.pid
                    assert not os.get_inheritable(pidfd)
                    # A pidfd turns readable when its process exits: closing our end ends it.
                    assert select.select([pidfd], [], [], 0)[0] == []
                    service.close()
                    assert select.select([pidfd], [], [], _WAIT)[0] == [pidfd]
                finally:
                    os.close(pidfd)
        finally:
            child.kill()
            child.wait(_WAIT)


def test_peer_pidfd_of_a_socketpair_is_this_process(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    left, _right = pair
    pidfd = peer_pidfd(left)
    assert pidfd is not None
    try:
        assert pid_of_pidfd(pidfd) == os.getpid()
    finally:
        os.close(pidfd)


def test_peer_pidfd_falls_back_to_so_peercred(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a kernel before 6.5 or an architecture whose SO_PEERPIDFD number is unknown here.
    monkeypatch.setattr(_unix, "_SO_PEERPIDFD", None)
    left, _right = pair
    pidfd = peer_pidfd(left)
    assert pidfd is not None
    try:
        assert pid_of_pidfd(pidfd) == os.getpid()
    finally:
        os.close(pidfd)


def test_open_pidfd_of_a_live_child_then_of_a_reaped_one() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        pidfd = open_pidfd(child.pid)
        assert pidfd is not None
        try:
            assert pid_of_pidfd(pidfd) == child.pid
            assert not os.get_inheritable(pidfd)
            assert select.select([pidfd], [], [], 0)[0] == []
            child.kill()
            assert select.select([pidfd], [], [], _WAIT)[0] == [pidfd]
        finally:
            os.close(pidfd)
    finally:
        child.kill()
        child.wait(_WAIT)
    assert open_pidfd(child.pid) is None


def test_close_fds_closes_all_and_ignores_the_already_closed(memfds: list[int]) -> None:
    fds = [os.memfd_create("a"), os.memfd_create("b")]
    os.close(fds[0])
    close_fds([fds[0], fds[1], fds[1]])
    for fd in fds:
        with pytest.raises(OSError, match=os.strerror(errno.EBADF)) as caught:
            os.fstat(fd)
        assert caught.value.errno == errno.EBADF


# --- the protocol over real sockets ---


@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.wire_name)
def test_a_whole_handoff_over_a_socketpair(
    pair: tuple[socket.socket, socket.socket], memfds: list[int], mode: Mode
) -> None:
    client_sock, service_sock = pair
    client, service = ClientConnection(), ServiceConnection()
    region = memfd(memfds, b"the region")
    stand_in_uffd = memfd(memfds, b"")  # the machines do not look at what the fd is

    send_packet(client_sock, client.hello(Hello("region-1", "token-1", mode=mode)))
    packet = received(recv_packet(service_sock))
    assert isinstance(service.receive(packet.data, packet.fds), HelloReceived)

    welcome = Welcome(mode, 4096, 4096, 42, 0, 0)  # type: ignore[arg-type]
    region_fds = [region] * fds_expected(welcome.message_type, mode)
    send_packet(service_sock, service.welcome(welcome), region_fds)
    packet = received(recv_packet(client_sock))
    event = client.receive(packet.data, packet.fds)
    assert isinstance(event, WelcomeReceived)
    if mode is Mode.PRIVATE_COPY:
        assert event.region_fd is None
    else:
        assert event.region_fd is not None
        assert os.pread(event.region_fd, 10, 0) == b"the region"
        os.close(event.region_fd)

    attach = Attach(0x7F00_0000_0000, 4096)
    uffd_fds = [stand_in_uffd] * fds_expected(attach.message_type, mode)
    send_packet(client_sock, client.attach(attach), uffd_fds)
    packet = received(recv_packet(service_sock))
    attached = service.receive(packet.data, packet.fds)
    assert isinstance(attached, AttachReceived)
    assert attached.attach == attach
    if attached.uffd_fd is not None:
        assert os.fstat(attached.uffd_fd).st_ino == os.fstat(stand_in_uffd).st_ino
        os.close(attached.uffd_fd)
    assert (attached.uffd_fd is None) == (mode is Mode.EAGER)

    send_packet(service_sock, service.ready(42))
    assert client.receive(received(recv_packet(client_sock)).data) == ReadyReceived(42)
    send_packet(client_sock, client.detach())
    assert service.receive(received(recv_packet(service_sock)).data) == DetachRequested()
    send_packet(service_sock, service.detached())
    assert client.receive(received(recv_packet(client_sock)).data) == DetachedReceived()
    assert service.state is ServiceState.CLOSED

    client_sock.close()
    assert recv_packet(service_sock) is None

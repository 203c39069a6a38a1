"""Unix ``SOCK_SEQPACKET`` sockets for the handoff protocol: the only code in shmfault that sends
or receives file descriptors on a socket.

One protocol message is one packet (``docs/protocol.md`` §1), and fds travel as ``SCM_RIGHTS``
control data on it. Every fd this module receives is installed close-on-exec
(``MSG_CMSG_CLOEXEC``), so a fork+exec racing with a receive can never leak one into a child,
and is handed to the caller, who owns it from then on: even on a truncated packet, where the
fds that did arrive are returned for the protocol machine's error path to close.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import platform
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shmfault.protocol import MAX_PACKET

__all__ = [
    "Credentials",
    "Packet",
    "close_fds",
    "connect_seqpacket",
    "fds_from_ancillary",
    "listen_seqpacket",
    "open_pidfd",
    "peer_credentials",
    "peer_pidfd",
    "recv_packet",
    "send_packet",
]

#: struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_UCRED = struct.Struct("=iII")
_FD_SIZE = array.array("i").itemsize

# SO_PEERPIDFD (6.5+): a pidfd of the peer taken at connect time, without the pid-reuse race of
# SO_PEERCRED + pidfd_open. Python 3.11 lacks the constant. Its value is 77 in
# asm-generic/socket.h, which these architectures use; others (alpha, mips, parisc, sparc)
# number it differently and get the fallback.
_GENERIC_SOCKET_ABI = {"x86_64", "aarch64", "arm64", "ppc64le", "ppc64", "s390x", "riscv64"}
_SO_PEERPIDFD: int | None = getattr(socket, "SO_PEERPIDFD", None) or (
    77 if platform.machine() in _GENERIC_SOCKET_ABI else None
)


@dataclass(frozen=True, slots=True)
class Packet:
    """One received packet.

    ``fds`` are installed in this process (close-on-exec) and owned by the caller.
    ``truncated`` is true when the packet did not arrive whole: it was larger than MAX_PACKET
    (``MSG_TRUNC``, or exactly one byte over), or its control data did not fit the buffer
    (``MSG_CTRUNC``: the kernel dropped the fds that did not fit; ``fds`` holds those that did).
    """

    data: bytes
    fds: list[int]
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class Credentials:
    """The peer's process and user as the kernel recorded them when it connected
    (``SO_PEERCRED``); for a socketpair, the process that created the pair."""

    pid: int
    uid: int
    gid: int


def listen_seqpacket(path: str, backlog: int = 128) -> socket.socket:
    """A ``SOCK_SEQPACKET`` unix socket bound to ``path`` and listening, close-on-exec.

    Does not block. The caller decides the file's fate: any file at ``path``, a stale socket
    included, makes ``bind`` fail with EADDRINUSE (remove it first if it is yours), and the new
    file's mode is what the process umask gives (set the umask, or chmod the file before
    accepting, to decide who may connect).
    Raises OSError (the socket is closed again) when ``path`` cannot be bound: too long for
    ``sun_path`` (107 bytes), directory missing or not writable, address in use.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        listener.bind(path)
        listener.listen(backlog)
    except BaseException:
        listener.close()
        raise
    return listener


def connect_seqpacket(path: str, timeout: float | None = None) -> socket.socket:
    """A ``SOCK_SEQPACKET`` unix socket connected to the listener at ``path``, close-on-exec.

    Blocks until connected, for at most ``timeout`` seconds (None: no limit; 0: do not wait; the
    connect only waits while the listener's backlog is full). ``timeout`` stays set on the socket
    for later sends and receives. Raises TimeoutError, FileNotFoundError (no socket at ``path``),
    ConnectionRefusedError (nobody listening) or another OSError; the socket is then closed.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        if timeout is not None and timeout > 0:
            # A unix connect to a full backlog fails at once with EAGAIN on a non-blocking
            # socket, which is what Python's settimeout makes it: it does not wait for
            # writability as a TCP connect does. Connect blocking instead, bounded by
            # SO_SNDTIMEO, which is the wait the kernel's unix connect honours.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout))
            try:
                sock.connect(path)
            except BlockingIOError:
                raise TimeoutError(
                    errno.ETIMEDOUT,
                    f"the listener at {path} kept its backlog full for {timeout} s",
                ) from None
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(0))
        sock.settimeout(timeout)
        if timeout is None or timeout <= 0:
            sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))


def send_packet(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send ``data`` as one packet, with ``fds`` (if any) as one ``SCM_RIGHTS`` control message.

    The fds stay open here: the peer gets its own copies. Blocks while the peer's receive queue
    is full (unless the socket is non-blocking: BlockingIOError, or has a timeout:
    TimeoutError). EINTR is retried (by Python itself, PEP 475). Raises ValueError for an
    empty packet (the peer would read it as end of connection) or one larger than MAX_PACKET;
    BrokenPipeError when the peer has closed; OSError (EBADF) for an fd that is not open. Never
    raises SIGPIPE.
    """
    if not data:
        raise ValueError("an empty packet reads as the end of the connection to the peer")
    if len(data) > MAX_PACKET:
        raise ValueError(f"packet is {len(data)} bytes, more than {MAX_PACKET}")
    ancillary = []
    if fds:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()))
    sent = sock.sendmsg([data], ancillary, socket.MSG_NOSIGNAL)
    # A SOCK_SEQPACKET send is atomic: all of the packet or an error. Check anyway, since a
    # short send would silently corrupt the framing.
    if sent != len(data):
        raise OSError(errno.EMSGSIZE, f"sent {sent} of {len(data)} bytes of a packet")


def recv_packet(sock: socket.socket, max_fds: int = 4) -> Packet | None:
    """The next packet and the fds that came with it; None at the end of the connection.

    Blocks until a packet arrives (unless the socket is non-blocking: BlockingIOError, or has a
    timeout: TimeoutError). EINTR is retried by Python itself (PEP 475). The control buffer
    is ``CMSG_SPACE(max_fds * sizeof(int))``: room for ``max_fds`` fds (one more when
    ``max_fds`` is odd, as CMSG_SPACE rounds up to 8 bytes); the kernel installs no more than
    fit, drops the rest and sets ``truncated``.
    A zero-length packet without fds cannot be told from end of connection and is returned as
    None. Raises ConnectionResetError or another OSError when the connection failed.
    """
    if max_fds < 0:
        raise ValueError(f"max_fds is {max_fds}, not >= 0")
    # One byte more than the largest legal packet, so that an oversize packet shows up as
    # such even where MSG_TRUNC would not be reported.
    data, ancillary, flags, _address = sock.recvmsg(
        MAX_PACKET + 1, socket.CMSG_SPACE(max_fds * _FD_SIZE), socket.MSG_CMSG_CLOEXEC
    )
    fds = fds_from_ancillary(ancillary)
    truncated = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)) or len(data) > MAX_PACKET
    if not data and not fds and not truncated:
        return None
    return Packet(data, fds, truncated)


def fds_from_ancillary(ancillary: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """Every fd in the ``SCM_RIGHTS`` messages of ``recvmsg``'s ancillary data, in order.

    Linux merges a sender's several ``SCM_RIGHTS`` messages into one, but nothing promises it,
    so all are read. A message cut short by ``MSG_CTRUNC`` may end in a partial int: the
    kernel installs only whole fds, so those bytes name none and are dropped. Other control
    messages carry no fds here (no ``SO_PASSCRED``/``SO_PASSPIDFD`` is set) and are ignored.
    """
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            whole = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:whole]))
    return fds


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd in ``fds``; never raises.

    Linux releases a descriptor even when ``close`` reports an error, so there is nothing to
    retry, and the callers are error paths that must not fail half way through the list.
    """
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def peer_credentials(sock: socket.socket) -> Credentials:
    """The connected peer's pid, uid and gid (``SO_PEERCRED``), as of when it connected.

    Does not block. The pid may since have exited and been reused: to watch the peer process,
    prefer :func:`peer_pidfd`. Raises OSError (ENOTCONN, EBADF) on a socket without a peer.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return Credentials(pid, uid, gid)


def open_pidfd(pid: int) -> int | None:
    """A pidfd (close-on-exec) of process ``pid``; None when no such process exists (ESRCH).

    Does not block. A pidfd becomes readable when the process exits. A zombie still has one.
    Raises OSError for other failures (EMFILE; ENOSYS before 5.3; EINVAL for a pid <= 0).
    """
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def peer_pidfd(sock: socket.socket) -> int | None:
    """A pidfd (close-on-exec) of the connected peer's process; None when it is gone.

    Uses ``SO_PEERPIDFD`` (6.5+), which names the very process that connected. On older
    kernels falls back to :func:`open_pidfd` of the ``SO_PEERCRED`` pid: that pid may have
    been reused by an unrelated process if the peer exited first, so a caller of the fallback
    should check that the connection is still open after getting the pidfd. Does not block.
    Raises OSError as :func:`peer_credentials` and :func:`open_pidfd` do.
    """
    if _SO_PEERPIDFD is not None:
        try:
            fd: int = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
        except ProcessLookupError:
            return None
        except OSError as exc:
            # ENOPROTOOPT: the kernel predates SO_PEERPIDFD. Anything else is a real failure.
            if exc.errno != errno.ENOPROTOOPT:
                raise
        else:
            return fd
    return open_pidfd(peer_credentials(sock).pid)

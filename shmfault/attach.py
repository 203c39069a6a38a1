"""The client side of lazy attach: map a region and hand its userfaultfd to the service.

:func:`attach` runs the handoff handshake of docs/protocol.md and returns an
:class:`Attachment` whose ``buffer`` is the mapped region: its pages fill on first touch. No gRPC
here: the handoff socket, region id and token are all it needs (:meth:`shmfault.Client.attach`
gets them from the service).
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import functools
import mmap
import os
import select
import socket
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from shmfault import _libc, _unix, protocol
from shmfault._abi import Feature
from shmfault.errors import ShmfaultError, UffdUnavailableError
from shmfault.modes import Mode, UffdAccess
from shmfault.uffd import Uffd, available_features, open_userfaultfd

DEFAULT_TIMEOUT = 30.0
#: Waits between tries to re-attach to a restarted service: doubling from the first to the last.
#: Small on purpose: a faulting thread waits for the service and for this backoff.
REATTACH_BACKOFF = (0.02, 0.25)


class Link(enum.Enum):
    """Where an attachment stands with the service."""

    #: served
    ATTACHED = "attached"
    #: the service went away (crashed, restarted, stopped): trying to re-attach; touching an
    #: unfilled page blocks until that succeeds
    REATTACHING = "reattaching"
    #: the service refused to re-attach (or ended the attachment): unfilled pages stay blocked
    LOST = "lost"
    #: detached or closed
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class _Reattach:
    """What a re-attach presents: the handshake's token and what was attached."""

    handoff_socket: str
    region_id: str
    token: str
    mode: Mode
    #: the region's fd in the shared modes (the service may need it back: a memfd region's
    #: memory does not survive the service)
    region_fd: int | None


class AttachError(ShmfaultError):
    """The service refused the attachment. ``code`` is the protocol's ErrorCode."""

    def __init__(self, code: protocol.ErrorCode, message: str) -> None:
        super().__init__(f"attach refused ({code.name}): {message}")
        self.code = code


class Attachment:
    """A region mapped into this process and served by the service.

    ``buffer`` is a writable memoryview over the whole mapping (slicing, ``bytes()``, numpy's
    ``frombuffer`` all work). Touching an unfilled page blocks the touching thread until the
    service has filled it. ``mode`` is the mode the service chose and ``reasons`` why each
    better mode was passed over.

    When the service goes away (a crash, a restart), a thread of this process re-attaches as
    soon as it is back (``link`` says where things stand); meanwhile a touch of an unfilled page
    blocks, and is never answered with zeros. A thread that touches ``buffer`` directly holds
    the GIL while it waits, which would keep that re-attaching thread from running: touch
    through :meth:`read`/:meth:`write` (or from code that releases the GIL) where the service
    may restart under you.

    The handoff connection stays open for the attachment's life; closing it (``detach``,
    ``close``, the ``with`` block's end, or this process dying) ends the attachment. The mapping
    is unmapped at the same time: do not use ``buffer`` afterwards.
    """

    def __init__(
        self,
        *,
        connection: socket.socket,
        machine: protocol.ClientConnection,
        uffd: Uffd | None,
        address: int,
        length: int,
        mode: Mode,
        reasons: str,
        attachment_id: int,
        page_size: int,
        reattach: _Reattach | None = None,
    ) -> None:
        self._connection = connection
        self._machine = machine
        self._uffd = uffd
        self.address = address
        self.length = length
        self.mode = mode
        self.reasons = reasons
        self.attachment_id = attachment_id
        self.page_size = page_size
        self.buffer = _libc.memory_view(address, length)
        self._lock = threading.Lock()
        self._closed = False
        self._reattach = reattach
        self.link = Link.ATTACHED
        #: times this attachment re-attached to a restarted service, and why it was lost
        self.reattaches = 0
        self.lost_reason = ""
        self._wakeup_read, self._wakeup_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._supervisor: threading.Thread | None = None
        if reattach is not None and uffd is not None:
            self._supervisor = threading.Thread(
                target=self._supervise, name=f"shmfault-attachment-{attachment_id}", daemon=True
            )
            self._supervisor.start()

    # --- the service going away, and coming back ---

    def _supervise(self) -> None:
        """Watch the connection; when the service goes away, re-attach until it is back (or
        refuses), so that a restart of the service costs a faulting thread only the restart."""
        while True:
            ready, _w, _x = select.select([self._connection.fileno(), self._wakeup_read], [], [])
            if self._wakeup_read in ready:
                return
            try:
                packet = _unix.recv_packet(self._connection)
            except OSError:
                packet = None
            if packet is not None:
                # Only ERROR may come unasked: the service ended the attachment.
                _unix.close_fds(packet.fds)
                with contextlib.suppress(protocol.ProtocolError):
                    event = self._machine.receive(packet.data, [], truncated=packet.truncated)
                    if isinstance(event, protocol.ErrorReceived):
                        self.lost_reason = f"{event.code.name}: {event.message}"
                self.link = Link.LOST
                return
            self.link = Link.REATTACHING
            if not self._reattach_until_back():
                return

    def _reattach_until_back(self) -> bool:
        """Re-attach with backoff. False when told to stop or refused for good."""
        info = self._reattach
        assert info is not None and self._uffd is not None
        wait = REATTACH_BACKOFF[0]
        while True:
            ready, _w, _x = select.select([self._wakeup_read], [], [], wait)
            if ready:
                return False
            wait = min(wait * 2, REATTACH_BACKOFF[1])
            try:
                connection = _unix.connect_seqpacket(info.handoff_socket, DEFAULT_TIMEOUT)
            except OSError:
                continue  # not back yet
            machine = protocol.ClientConnection()
            message = protocol.Reattach(
                region_id=info.region_id,
                attach_token=info.token,
                mode=info.mode,
                base=self.address,
                length=self.length,
            )
            fds = [self._uffd.fileno()] + ([] if info.region_fd is None else [info.region_fd])
            try:
                _unix.send_packet(connection, machine.reattach(message), fds)
                ready_event = _receive(connection, machine)
            except AttachError as exc:
                connection.close()
                if exc.code in (protocol.ErrorCode.BUSY, protocol.ErrorCode.SHUTTING_DOWN):
                    continue
                self.lost_reason = str(exc)
                self.link = Link.LOST
                return False
            except (OSError, protocol.ProtocolError):
                connection.close()
                continue
            assert isinstance(ready_event, protocol.ReadyReceived)
            with self._lock:
                old = self._connection
                self._connection, self._machine = connection, machine
                self.attachment_id = ready_event.attachment_id
                self.reattaches += 1
                self.link = Link.ATTACHED
            old.close()
            return True

    def _stop_supervisor(self) -> None:
        if self._wakeup_write < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self._wakeup_write, b"x")
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join()
        for fd in (self._wakeup_read, self._wakeup_write):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wakeup_read = self._wakeup_write = -1

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``, copied without holding the GIL: while this thread
        waits for a page, the others run, among them the one that re-attaches when the
        service restarts (a thread reading ``buffer`` directly holds the GIL while it waits)."""
        self._check_span(offset, length)
        out = ctypes.create_string_buffer(length)
        _libc.copy_memory(ctypes.addressof(out), self.address + offset, length)
        return out.raw

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` without holding the GIL (see :meth:`read`)."""
        self._check_span(offset, len(data))
        source = ctypes.create_string_buffer(bytes(data), len(data))
        _libc.copy_memory(self.address + offset, ctypes.addressof(source), len(data))

    def _check_span(self, offset: int, length: int) -> None:
        if self._closed:
            raise ValueError("the attachment is closed")
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"{length} bytes at {offset} are outside the {self.length} mapped")

    @property
    def user_mode_only(self) -> bool:
        """The userfaultfd is user-mode-only: a system call that reads or writes an unfilled
        page of ``buffer`` fails with EFAULT (touch the page first, or attach ``eager``)."""
        return self._uffd is not None and self._uffd.user_mode_only

    @property
    def closed(self) -> bool:
        return self._closed

    def detach(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Tell the service, wait for its DETACHED (up to ``timeout`` seconds), then unmap and
        close. No thread may be touching ``buffer``. Idempotent."""
        self._stop_supervisor()
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(OSError, protocol.ProtocolError):
                if self.link is not Link.ATTACHED:
                    raise OSError("no service to tell")
                self._connection.settimeout(timeout)
                _unix.send_packet(self._connection, self._machine.detach())
                packet = _unix.recv_packet(self._connection)
                if packet is not None:
                    self._machine.receive(packet.data, packet.fds, truncated=packet.truncated)
            self._release()

    def close(self) -> None:
        """End the attachment without waiting for the service (it sees the connection end)."""
        self._stop_supervisor()
        with self._lock:
            if not self._closed:
                self._release()

    def _release(self) -> None:
        self._closed = True
        self.link = Link.CLOSED
        if self._reattach is not None and self._reattach.region_fd is not None:
            os.close(self._reattach.region_fd)
        self.buffer.release()
        if self._uffd is not None:
            # Unregister first: with EVENT_UNMAP enabled, munmap of a registered range waits
            # until someone reads the UNMAP event, and the service has stopped reading.
            with contextlib.suppress(OSError):
                self._uffd.unregister(self.address, self.length)
        _libc.munmap(self.address, self.length)
        if self._uffd is not None:
            self._uffd.close()
        self._connection.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.length} bytes at {self.address:#x}"
        return f"<Attachment {self.attachment_id} {self.mode.wire_name} {state}>"


def _receive(connection: socket.socket, machine: protocol.ClientConnection) -> protocol.ClientEvent:
    packet = _unix.recv_packet(connection)
    if packet is None:
        raise AttachError(protocol.ErrorCode.INTERNAL, "the service closed the connection")
    try:
        event = machine.receive(packet.data, packet.fds, truncated=packet.truncated)
    except protocol.RemoteProtocolError as exc:
        _unix.close_fds(exc.fds_to_close)
        raise
    if isinstance(event, protocol.ErrorReceived):
        raise AttachError(event.code, event.message)
    return event


@dataclass(frozen=True)
class IdentityLink:
    """An identity connection (docs/protocol.md §3.7): ``credential`` stands for ``uid`` on
    gRPC calls while ``connection`` stays open. Closing it revokes the credential."""

    connection: socket.socket
    uid: int
    credential: bytes

    def close(self) -> None:
        self.connection.close()


def identify(
    handoff_socket: str | os.PathLike[str], timeout: float | None = DEFAULT_TIMEOUT
) -> IdentityLink:
    """Ask the service for a credential of this process's uid. Raises AttachError (the
    service refused: LIMIT), OSError (socket), RemoteProtocolError."""
    connection = _unix.connect_seqpacket(os.fspath(handoff_socket), timeout)
    try:
        machine = protocol.ClientConnection()
        _unix.send_packet(connection, machine.identify())
        event = _receive(connection, machine)
        assert isinstance(event, protocol.IdentityReceived)
    except BaseException:
        connection.close()
        raise
    # The connection must not time out while it idles for the client's whole life.
    connection.settimeout(None)
    return IdentityLink(connection, event.uid, event.credential)


@functools.cache
def _thread_id_feature() -> Feature:
    """UFFD_FEATURE_THREAD_ID when the kernel offers it (4.14 and later). Optional: each fault
    then names its thread, and the service serves it from the CPU that thread runs on, not
    the main thread's (protocol.md, WELCOME)."""
    try:
        offered, _ioctls = available_features()
    except (ShmfaultError, OSError):
        return Feature(0)
    return offered & Feature.THREAD_ID


def _aligned_anonymous(length: int, alignment: int, protection: int) -> int:
    """Private anonymous memory of ``length`` bytes at a multiple of ``alignment`` (a hugetlb
    region's huge page: the service serves whole huge pages). Only some kernels align large
    anonymous mappings by themselves (6.18 does for transparent huge pages, 6.1 does not), so
    reserve ``alignment`` more and give the excess back at both ends."""
    anonymous = _libc.MAP_PRIVATE | _libc.MAP_ANONYMOUS
    if alignment <= mmap.PAGESIZE:
        return _libc.mmap(0, length, protection, anonymous)
    reserved = _libc.mmap(0, length + alignment, protection, anonymous)
    address = -(-reserved // alignment) * alignment
    if address > reserved:
        _libc.munmap(reserved, address - reserved)
    tail = reserved + length + alignment - (address + length)
    if tail:
        _libc.munmap(address + length, tail)
    return address


def attach(
    handoff_socket: str | os.PathLike[str],
    region_id: str,
    token: str,
    *,
    mode: Mode | str | None = None,
    minimum: Mode | str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Attachment:
    """Attach to a region through its handoff socket. Blocks for the handshake (an ``eager``
    attachment: until the service has filled the range), at most ``timeout`` seconds per step.

    ``mode`` forces a mode, ``minimum`` refuses modes worse than it; both raise
    :class:`AttachError` (``MODE_UNAVAILABLE``) rather than step down. A process that cannot get a
    userfaultfd at all (seccomp, no kernel support) gets ``eager``. Raises AttachError,
    OSError (socket), :class:`~shmfault.errors.UffdError`.
    """
    forced = Mode.from_name(mode) if isinstance(mode, str) else mode
    floor = Mode.from_name(minimum) if isinstance(minimum, str) else minimum
    raw_fd: int | None = None
    region_fd: int | None = None
    try:
        raw_fd, uffd_path, user_mode_only = open_userfaultfd()
        access = UffdAccess.USER_MODE_ONLY if user_mode_only else UffdAccess.FULL
    except UffdUnavailableError:
        access = UffdAccess.NONE
    connection = _unix.connect_seqpacket(os.fspath(handoff_socket), timeout)
    uffd: Uffd | None = None
    address = 0
    length = 0
    try:
        connection.settimeout(timeout)
        machine = protocol.ClientConnection()
        hello = protocol.Hello(
            mode=forced,
            minimum_mode=floor,
            uffd_access=access,
            region_id=region_id,
            attach_token=token,
        )
        _unix.send_packet(connection, machine.hello(hello))
        event = _receive(connection, machine)
        assert isinstance(event, protocol.WelcomeReceived)
        welcome, region_fd = event.welcome, event.region_fd
        chosen = Mode(welcome.mode)
        length = welcome.region_size
        protection = _libc.PROT_READ | _libc.PROT_WRITE
        try:
            if region_fd is not None:
                address = _libc.mmap(0, length, protection, _libc.MAP_SHARED, region_fd)
            else:
                address = _aligned_anonymous(length, welcome.page_size, protection)
        finally:
            if region_fd is not None and chosen is Mode.EAGER:
                os.close(region_fd)  # nothing to re-attach: an eager mapping needs no service
                region_fd = None
        # A child must not inherit the range: unregistered there, an unfilled page would read
        # as zeros (and, shared, become zeros in the region).
        _libc.madvise(address, length, _libc.MADV_DONTFORK)
        fds: list[int] = []
        if chosen is not Mode.EAGER:
            assert raw_fd is not None
            uffd = Uffd.handshake(
                raw_fd,
                welcome.features | _thread_id_feature(),
                path=uffd_path,
                user_mode_only=user_mode_only,
            )
            raw_fd = None
            uffd.register(address, length, welcome.register_mode)
            fds = [uffd.fileno()]
        _unix.send_packet(
            connection,
            machine.attach(protocol.Attach(base=address, length=length, region_offset=0)),
            fds,
        )
        ready = _receive(connection, machine)
        assert isinstance(ready, protocol.ReadyReceived)
        reattach = None
        if chosen is not Mode.EAGER:
            reattach = _Reattach(os.fspath(handoff_socket), region_id, token, chosen, region_fd)
            region_fd = None  # the attachment's now
        return Attachment(
            connection=connection,
            machine=machine,
            uffd=uffd,
            address=address,
            length=length,
            mode=chosen,
            reasons=welcome.reasons,
            attachment_id=ready.attachment_id,
            page_size=welcome.page_size,
            reattach=reattach,
        )
    except BaseException:
        # The userfaultfd first: with EVENT_UNMAP, munmap of a registered range waits until
        # someone reads the unmap event, and the only reader left would be this very handle.
        if uffd is not None:
            uffd.close()
        if address:
            _libc.munmap(address, length)
        connection.close()
        raise
    finally:
        if raw_fd is not None:
            os.close(raw_fd)
        if region_fd is not None:
            os.close(region_fd)

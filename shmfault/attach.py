"""The client side of lazy attach: map a region and hand its userfaultfd to the service.

:func:`attach` runs the handoff handshake of docs/protocol.md and returns an
:class:`Attachment` whose ``buffer`` is the mapped region: its pages fill on first touch. No gRPC
here: the handoff socket, region id and token are all it needs (:meth:`shmfault.Client.attach`
gets them from the service).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from types import TracebackType
from typing import Self

from shmfault import _libc, _unix, protocol
from shmfault.errors import ShmfaultError, UffdUnavailableError
from shmfault.modes import Mode, UffdAccess
from shmfault.uffd import Uffd, open_userfaultfd

DEFAULT_TIMEOUT = 30.0


class AttachError(ShmfaultError):
    """The service refused the attachment. ``code`` is the protocol's ErrorCode."""

    def __init__(self, code: protocol.ErrorCode, message: str) -> None:
        super().__init__(f"attach refused ({code.name}): {message}")
        self.code = code


class Attachment:
    """A region mapped into this process and served by the service.

    ``buffer`` is a writable memoryview over the whole mapping (slicing, ``bytes()``, numpy's
    ``frombuffer`` all work). Touching an unfilled page blocks the touching thread until the
    service has filled it: from Python that thread holds the GIL meanwhile, which is fine because
    the service is another process. ``mode`` is the mode the service chose and ``reasons`` why
    each better mode was passed over.

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
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(OSError, protocol.LocalProtocolError):
                self._connection.settimeout(timeout)
                _unix.send_packet(self._connection, self._machine.detach())
                packet = _unix.recv_packet(self._connection)
                if packet is not None:
                    self._machine.receive(packet.data, packet.fds, truncated=packet.truncated)
            self._release()

    def close(self) -> None:
        """End the attachment without waiting for the service (it sees the connection end)."""
        with self._lock:
            if not self._closed:
                self._release()

    def _release(self) -> None:
        self._closed = True
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
                anonymous = _libc.MAP_PRIVATE | _libc.MAP_ANONYMOUS
                address = _libc.mmap(0, length, protection, anonymous)
        finally:
            if region_fd is not None:
                os.close(region_fd)
        # A child must not inherit the range: unregistered there, an unfilled page would read
        # as zeros (and, shared, become zeros in the region).
        _libc.madvise(address, length, _libc.MADV_DONTFORK)
        fds: list[int] = []
        if chosen is not Mode.EAGER:
            assert raw_fd is not None
            uffd = Uffd.handshake(
                raw_fd, welcome.features, path=uffd_path, user_mode_only=user_mode_only
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
        )
    except BaseException:
        if address:
            _libc.munmap(address, length)
        if uffd is not None:
            uffd.close()
        connection.close()
        raise
    finally:
        if raw_fd is not None:
            os.close(raw_fd)

"""HandoffServer: runs the handoff handshake (docs/protocol.md) up to a served attachment.

One thread accepts connections on the handoff socket and drives each one's
:class:`~shmfault.protocol.ServiceConnection` through HELLO (token, mode) and ATTACH (range,
userfaultfd). Once READY is sent, the connection, the userfaultfd and a pidfd of the client
move to the :class:`~shmfault.engine.FaultEngine`, which serves faults and watches for the end.
A handshake that has not finished within ``handshake_timeout`` is answered ``ERROR TIMEOUT`` and
its slot freed; every fd received on a refused connection is closed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shmfault import _unix, logs, mappings, protocol
from shmfault._abi import Feature
from shmfault.engine import Attachment, FaultEngine, MappedRange, new_attachment_id
from shmfault.errors import (
    PermissionDeniedError,
    QuotaExceededError,
    RecordingNotFoundError,
    RegionNotFoundError,
    ShmfaultError,
    SourceUnavailableError,
    UffdError,
)
from shmfault.identity import Identities, groups_of, is_admin
from shmfault.memory import BackingKind, RegionBacking
from shmfault.modes import (
    FORBIDDEN_FEATURES,
    Choice,
    Mode,
    ModeUnavailableError,
    UffdAccess,
    choose,
    requirements,
)
from shmfault.recording import Recorder
from shmfault.recording_store import RecordingStore
from shmfault.store import AttachOptions, RegionStore
from shmfault.uffd import NotAUserfaultfdError, Uffd

_log = logging.getLogger("shmfault.handoff")


DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Attachments served at once, in all and per client uid: each costs the engine a few fds and
#: a page bitmap, and a client could otherwise exhaust the service's fd limit.
DEFAULT_MAX_ATTACHMENTS = 4096
DEFAULT_MAX_ATTACHMENTS_PER_UID = 1024
#: Handshakes in progress at once; more connections wait in the listen backlog.
MAX_PENDING = 256
#: Handshakes one uid may have in progress at once (the rest of MAX_PENDING is everyone else's).
MAX_PENDING_PER_UID = 64
#: Seconds a restarted service keeps the previous run's attachments for their clients to
#: re-attach (REATTACH); past it they are forgotten and their regions no longer count them.
DEFAULT_REATTACH_GRACE = 60.0

ErrorCode = protocol.ErrorCode


class _Refusal(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(eq=False)
class _Handshake:
    connection: socket.socket
    machine: protocol.ServiceConnection
    deadline: float
    pid: int
    uid: int
    gid: int
    region: RegionBacking | None = None
    choice: Choice | None = None
    options: AttachOptions = field(default_factory=AttachOptions)
    token: str = ""
    #: the persisted attachment a REATTACH claimed (forgotten again if it is refused)
    reattach_key: bytes = b""
    #: region page indexes to fill ahead of the client (the token's replay recording)
    replay: list[int] | None = None
    attachment_id: int = field(default_factory=new_attachment_id)


@dataclass
class _Identified:
    """An identity connection: its credential lives until the connection ends."""

    connection: socket.socket
    machine: protocol.ServiceConnection
    credential: bytes
    pid: int
    uid: int


class HandoffServer:
    """Accepts attachments on ``listener`` (a bound, listening SOCK_SEQPACKET socket it takes).

    ``support`` says why each mode cannot work on this kernel ('' when it can: see
    :func:`shmfault.modes.kernel_support`); ``api_features`` are the kernel's UFFDIO_API
    features (for hugetlb regions, whose modes need the HUGETLBFS bits).
    """

    def __init__(
        self,
        listener: socket.socket,
        store: RegionStore,
        engine: FaultEngine,
        support: Mapping[Mode, str],
        *,
        api_features: Feature,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_attachments: int = DEFAULT_MAX_ATTACHMENTS,
        max_attachments_per_uid: int = DEFAULT_MAX_ATTACHMENTS_PER_UID,
        recordings: RecordingStore | None = None,
        reattach_grace: float = DEFAULT_REATTACH_GRACE,
        identities: Identities | None = None,
    ) -> None:
        self._listener = listener
        self._identities = identities if identities is not None else Identities()
        self._identified: dict[int, _Identified] = {}
        self._orphans_expire_at: float | None = (
            time.monotonic() + reattach_grace if store.orphans() else None
        )
        self._recordings = recordings
        self._listener.setblocking(False)
        self._store = store
        self._engine = engine
        self._support = dict(support)
        self._api_features = api_features
        self._timeout = handshake_timeout
        self._max_attachments = max_attachments
        self._max_per_uid = max_attachments_per_uid
        self._selector = selectors.DefaultSelector()
        self._wakeup_read, self._wakeup_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._pending: dict[int, _Handshake] = {}
        self._accepting = True
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shmfault-handoff", daemon=True)

    def start(self) -> None:
        """Start accepting on a thread of its own."""
        self._selector.register(self._listener, selectors.EVENT_READ, "listener")
        self._selector.register(self._wakeup_read, selectors.EVENT_READ, "wakeup")
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Refuse handshakes in progress (``SHUTTING_DOWN``), stop accepting, close the listener.
        Blocks until the thread has finished (at most ``timeout`` seconds)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wakeup_write, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout)
        for fd in (self._wakeup_read, self._wakeup_write):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._selector.close()
        self._listener.close()

    # --- the thread ---

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._expire()
                self._expire_orphans()
                deadlines = [h.deadline for h in self._pending.values()]
                if self._orphans_expire_at is not None:
                    deadlines.append(self._orphans_expire_at)
                wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
                for key, _mask in self._selector.select(wait):
                    if key.data == "listener":
                        self._accept()
                    elif key.data == "wakeup":
                        continue
                    elif isinstance(key.data, _Identified):
                        self._receive_identified(key.data)
                    else:
                        self._receive(key.data)
        except Exception:
            logs.exception(_log, "handoff_crashed")
        finally:
            for handshake in list(self._pending.values()):
                self._refuse(handshake, ErrorCode.SHUTTING_DOWN, "the service is stopping")
            for identified in list(self._identified.values()):
                self._end_identity(identified)

    def _accept(self) -> None:
        while len(self._pending) < MAX_PENDING:
            try:
                connection, _address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logs.event(_log, logging.WARNING, "accept_failed", error=exc.strerror)
                return
            connection.setblocking(False)
            credentials = _unix.peer_credentials(connection)
            mine = sum(1 for h in self._pending.values() if h.uid == credentials.uid)
            if mine >= MAX_PENDING_PER_UID:
                # One uid cannot hold every handshake slot: its excess is refused at once, so
                # the backlog keeps draining for everyone else.
                logs.event(
                    _log,
                    logging.INFO,
                    "attach_refused",
                    pid=credentials.pid,
                    code="LIMIT",
                    reason="too many handshakes of this uid in progress",
                )
                with contextlib.suppress(OSError):
                    _unix.send_packet(
                        connection,
                        protocol.ServiceConnection().error(
                            ErrorCode.LIMIT,
                            f"uid {credentials.uid} has {mine} handshakes in progress, the "
                            "limit per uid",
                        ),
                    )
                connection.close()
                continue
            handshake = _Handshake(
                connection,
                protocol.ServiceConnection(),
                time.monotonic() + self._timeout,
                credentials.pid,
                credentials.uid,
                credentials.gid,
            )
            self._pending[connection.fileno()] = handshake
            self._selector.register(connection, selectors.EVENT_READ, handshake)

    def _expire(self) -> None:
        now = time.monotonic()
        for handshake in [h for h in self._pending.values() if h.deadline <= now]:
            reply = handshake.machine.timed_out()
            logs.event(_log, logging.INFO, "handshake_timeout", pid=handshake.pid)
            self._close(handshake, reply)

    def _expire_orphans(self) -> None:
        if self._orphans_expire_at is None or time.monotonic() < self._orphans_expire_at:
            return
        self._orphans_expire_at = None
        for record in self._store.expire_orphans():
            logs.event(
                _log,
                logging.WARNING,
                "reattach_expired",
                region=record.region_id,
                uid=record.uid,
                mode=record.mode,
                reason="its client did not come back within the re-attach grace period",
            )

    def _close(self, handshake: _Handshake, reply: bytes | None) -> None:
        self._pending.pop(handshake.connection.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(handshake.connection)
        if handshake.region is not None:
            # The token was redeemed and counted as an attachment that never came to be. Before
            # the reply: a client that got its ERROR must see the region without it.
            self._store.detach(handshake.region.region_id)
        if handshake.reattach_key:
            self._store.forget_attachment(handshake.reattach_key)
        if reply is not None:
            with contextlib.suppress(OSError):
                _unix.send_packet(handshake.connection, reply)
        handshake.connection.close()

    def _refuse(self, handshake: _Handshake, code: ErrorCode, message: str) -> None:
        logs.event(
            _log, logging.INFO, "attach_refused", pid=handshake.pid, code=code.name, reason=message
        )
        self._close(handshake, handshake.machine.error(code, message))

    def _receive(self, handshake: _Handshake) -> None:
        try:
            packet = _unix.recv_packet(handshake.connection)
        except BlockingIOError:
            return
        except OSError as exc:
            logs.event(
                _log, logging.INFO, "handshake_failed", pid=handshake.pid, error=exc.strerror
            )
            self._close(handshake, None)
            return
        if packet is None:
            handshake.machine.connection_lost()
            self._close(handshake, None)
            return
        event = handshake.machine.receive(packet.data, packet.fds, truncated=packet.truncated)
        if isinstance(event, protocol.Violation):
            _unix.close_fds(event.fds_to_close)
            logs.event(
                _log,
                logging.INFO,
                "attach_refused",
                pid=handshake.pid,
                code=event.code.name,
                reason=event.message,
            )
            self._close(handshake, event.close_reply)
            return
        try:
            if isinstance(event, protocol.HelloReceived):
                self._hello(handshake, event.hello)
            elif isinstance(event, protocol.AttachReceived):
                self._attach(handshake, event.attach, event.uffd_fd)
            elif isinstance(event, protocol.ReattachReceived):
                self._reattach(handshake, event)
            elif isinstance(event, protocol.IdentifyReceived):
                self._identify(handshake)
            else:
                raise _Refusal(ErrorCode.UNEXPECTED, f"unexpected {type(event).__name__}")
        except _Refusal as refusal:
            self._refuse(handshake, refusal.code, refusal.message)
        except Exception as exc:
            logs.exception(_log, "handshake_crashed", pid=handshake.pid)
            self._refuse(handshake, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    # --- identities (docs/protocol.md §3.7) ---

    def _identify(self, handshake: _Handshake) -> None:
        try:
            credential = self._identities.issue(
                handshake.uid, groups_of(handshake.pid, handshake.gid)
            )
        except QuotaExceededError as exc:
            raise _Refusal(ErrorCode.LIMIT, str(exc)) from None
        identified = _Identified(
            handshake.connection, handshake.machine, credential, handshake.pid, handshake.uid
        )
        # No deadline from here on: it is no longer a handshake, and it does not hold one of
        # the handshake slots.
        self._pending.pop(handshake.connection.fileno(), None)
        self._identified[handshake.connection.fileno()] = identified
        self._selector.modify(handshake.connection, selectors.EVENT_READ, identified)
        try:
            _unix.send_packet(
                handshake.connection, handshake.machine.identity(handshake.uid, credential)
            )
        except OSError:
            self._end_identity(identified)
            return
        logs.event(_log, logging.INFO, "identified", uid=handshake.uid, pid=handshake.pid)

    def _receive_identified(self, identified: _Identified) -> None:
        """The client closed its identity connection (or broke the protocol, since it may send
        nothing more): the credential is revoked."""
        try:
            packet = _unix.recv_packet(identified.connection)
        except BlockingIOError:
            return
        except OSError:
            packet = None
        if packet is not None:
            _unix.close_fds(packet.fds)
            event = identified.machine.receive(packet.data, (), truncated=packet.truncated)
            if isinstance(event, protocol.Violation):
                with contextlib.suppress(OSError):
                    _unix.send_packet(identified.connection, event.close_reply)
        self._end_identity(identified)

    def _end_identity(self, identified: _Identified) -> None:
        self._identities.revoke(identified.credential)
        self._identified.pop(identified.connection.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(identified.connection)
        identified.connection.close()
        logs.event(_log, logging.INFO, "identity_ended", uid=identified.uid, pid=identified.pid)

    # --- the two steps ---

    def _support_for(self, region: RegionBacking, uid: int) -> dict[Mode, str]:
        support = dict(self._support)
        if region.backing.kind is BackingKind.HUGETLB:
            for mode in (Mode.SHARED_COPY, Mode.SHARED_CONTINUE):
                lacking = requirements(mode, hugetlb=True).features & ~self._api_features
                if lacking:
                    support[mode] = f"the kernel lacks {lacking!r} for hugetlbfs"
        if region.backing.kind is BackingKind.POSIX_SHM and not is_admin(uid):
            # A posix-shm object cannot be sealed: whoever holds a read-write fd of it can
            # resize it under every sharer. Our own uid could open it in /dev/shm anyway;
            # anybody else gets only modes that do not hand the fd out.
            for mode in (Mode.SHARED_COPY, Mode.SHARED_CONTINUE, Mode.EAGER):
                support[mode] = (
                    f"a posix-shm region cannot be sealed: its fd goes only to uid "
                    f"{os.geteuid()} and root, not to uid {uid}"
                )
        return support

    def _hello(self, handshake: _Handshake, hello: protocol.Hello) -> None:
        if self._stopping.is_set():
            raise _Refusal(ErrorCode.SHUTTING_DOWN, "the service is stopping")
        self._check_limits(handshake)
        try:
            region, options = self._store.redeem_token(hello.region_id, hello.attach_token)
        except RegionNotFoundError as exc:
            raise _Refusal(ErrorCode.NOT_FOUND, str(exc)) from None
        except PermissionDeniedError as exc:
            raise _Refusal(ErrorCode.DENIED, str(exc)) from None
        handshake.region = region
        handshake.options = options
        handshake.token = hello.attach_token
        if options.replay:
            handshake.replay = self._replay_pages(region, options.replay)
        try:
            choice = choose(
                self._support_for(region, handshake.uid),
                UffdAccess(hello.uffd_access),
                requested=hello.mode,
                minimum=hello.minimum_mode,
            )
        except ModeUnavailableError as exc:
            raise _Refusal(ErrorCode.MODE_UNAVAILABLE, str(exc)) from None
        handshake.choice = choice
        needs = requirements(choice.mode, hugetlb=region.backing.kind is BackingKind.HUGETLB)
        welcome = protocol.Welcome(
            mode=choice.mode,
            page_size=region.page_size,
            region_size=region.size,
            attachment_id=handshake.attachment_id,
            register_mode=needs.register_mode,
            features=needs.features,
            reasons=choice.reasons,
        )
        fds = [region.backing.fileno()] if needs.maps_region else []
        _unix.send_packet(handshake.connection, handshake.machine.welcome(welcome), fds)

    def _replay_pages(self, region: RegionBacking, recording_id: str) -> list[int]:
        """The pages of recording ``recording_id`` to fill ahead of an attachment of
        ``region``. Checked again here, not only when the token was issued: the recording may
        have been deleted since."""
        if self._recordings is None:
            raise _Refusal(ErrorCode.NOT_FOUND, "this service keeps no recordings")
        try:
            made = self._recordings.load(recording_id)
        except (RecordingNotFoundError, SourceUnavailableError) as exc:
            raise _Refusal(ErrorCode.NOT_FOUND, str(exc)) from None
        if (made.page_size, made.region_size) != (region.page_size, region.size):
            raise _Refusal(
                ErrorCode.BAD_RANGE,
                f"recording {recording_id} is of a region of {made.region_size} bytes in "
                f"{made.page_size}-byte pages, not {region.size} in {region.page_size}",
            )
        return made.pages()

    def _check_limits(self, handshake: _Handshake) -> None:
        # Handshakes past HELLO count too: each will be an attachment in a moment.
        admitted = [h for h in self._pending.values() if h.region is not None]
        total = self._engine.live_count() + len(admitted)
        if total >= self._max_attachments:
            raise _Refusal(ErrorCode.LIMIT, f"the service serves {total} attachments, its limit")
        mine = self._engine.live_count(uid=handshake.uid) + sum(
            1 for h in admitted if h.uid == handshake.uid
        )
        if mine >= self._max_per_uid:
            raise _Refusal(
                ErrorCode.LIMIT,
                f"uid {handshake.uid} has {mine} attachments, the limit per uid",
            )

    def _check_range(self, region: RegionBacking, attach: protocol.Attach) -> None:
        page = region.page_size
        for name, value in (
            ("base", attach.base),
            ("length", attach.length),
            ("region_offset", attach.region_offset),
        ):
            if value % page:
                raise _Refusal(
                    ErrorCode.BAD_RANGE, f"{name} {value:#x} is not a multiple of {page}"
                )
        if attach.length == 0:
            raise _Refusal(ErrorCode.BAD_RANGE, "length is 0")
        if attach.region_offset + attach.length > region.size:
            raise _Refusal(
                ErrorCode.BAD_RANGE,
                f"region_offset {attach.region_offset} + length {attach.length} is past the "
                f"region's {region.size} bytes",
            )
        if attach.base + attach.length >= 1 << 64:
            raise _Refusal(ErrorCode.BAD_RANGE, f"base {attach.base:#x} + length overflows")

    def _check_mapping(
        self, handshake: _Handshake, region: RegionBacking, mode: Mode, attach: protocol.Attach
    ) -> None:
        """A shared mode fills the region itself through the client's mapping: the declared
        range must be a shared mapping of the region at the declared offset, or the source's
        bytes for one offset would land in the region at another, for every sharer."""
        if mode not in (Mode.SHARED_COPY, Mode.SHARED_CONTINUE):
            return  # private-copy fills the client's own memory; eager fills nothing of it
        try:
            text = mappings.read_maps(handshake.pid) if handshake.pid > 0 else None
        except PermissionError:
            text = None
        except OSError as exc:
            raise _Refusal(
                ErrorCode.BAD_RANGE, f"cannot read the client's mappings: {exc.strerror}"
            ) from None
        if text is None:
            # Another uid's process without CAP_SYS_PTRACE, or a pid outside our namespace:
            # the check cannot run, and what it prevents gains the client nothing
            # (docs/security.md §4.3).
            logs.event(_log, logging.INFO, "mapping_unchecked", pid=handshake.pid)
            return
        backing = os.fstat(region.backing.fileno())
        mismatch = mappings.mapping_mismatch(
            list(mappings.parse_maps(text)),
            base=attach.base,
            length=attach.length,
            region_offset=attach.region_offset,
            dev=backing.st_dev,
            inode=backing.st_ino,
        )
        if mismatch is not None:
            raise _Refusal(
                ErrorCode.BAD_RANGE,
                f"the declared range is not the region mapped at region_offset "
                f"{attach.region_offset:#x}: {mismatch}",
            )

    def _attach(self, handshake: _Handshake, attach: protocol.Attach, uffd_fd: int | None) -> None:
        region, choice = handshake.region, handshake.choice
        assert region is not None and choice is not None
        try:
            self._check_range(region, attach)
            self._check_mapping(handshake, region, choice.mode, attach)
        except _Refusal:
            _unix.close_fds([] if uffd_fd is None else [uffd_fd])
            raise
        uffd = None if uffd_fd is None else self._adopt(region, choice.mode, attach, uffd_fd)
        try:
            if uffd is None:  # eager: fill the attached range before READY
                region.fill(attach.region_offset, attach.length)
            attachment = self._new_attachment(
                handshake,
                region,
                choice.mode,
                attach,
                uffd,
                mode_reasons=choice.reasons,
                recorder=(
                    Recorder(
                        page_size=region.page_size,
                        region_size=region.size,
                        region_id=region.region_id,
                    )
                    if handshake.options.record and uffd is not None
                    else None
                ),
                replay=handshake.replay if uffd is not None else None,
            )
            if uffd is not None:
                # Persisted, so that the client can re-attach to a restarted service.
                attachment.reattach_key = self._store.remember_attachment(
                    region.region_id,
                    handshake.token,
                    uid=handshake.uid,
                    mode=choice.mode.wire_name,
                    base=attach.base,
                    length=attach.length,
                    region_offset=attach.region_offset,
                )
        except BaseException:
            if uffd is not None:
                uffd.close()
            raise
        self._hand_over(handshake, attachment)

    def _reattach(self, handshake: _Handshake, event: protocol.ReattachReceived) -> None:
        """A client of the previous run comes back with its userfaultfd (and region fd): claim
        its persisted attachment, take its memory back if the restart lost the region's, adopt
        the userfaultfd, wake the whole range (faults the dead service read are never
        delivered again), and serve it as a new attachment."""
        message = event.reattach
        uffd_fd: int | None = event.uffd_fd  # ours to close until _adopt takes it
        try:
            if self._stopping.is_set():
                raise _Refusal(ErrorCode.SHUTTING_DOWN, "the service is stopping")
            self._check_limits(handshake)
            try:
                region, record = self._store.reattach(
                    message.region_id, message.attach_token, uid=handshake.uid
                )
            except RegionNotFoundError as exc:
                raise _Refusal(ErrorCode.NOT_FOUND, str(exc)) from None
            except PermissionDeniedError as exc:
                raise _Refusal(ErrorCode.DENIED, str(exc)) from None
            handshake.region = region
            handshake.reattach_key = record.key
            unavailable = self._support_for(region, handshake.uid).get(message.mode)
            if unavailable:
                raise _Refusal(
                    ErrorCode.MODE_UNAVAILABLE, f"{message.mode.wire_name}: {unavailable}"
                )
            said = (message.mode.wire_name, message.base, message.length, message.region_offset)
            was = (record.mode, record.base, record.length, record.region_offset)
            if said != was:
                raise _Refusal(
                    ErrorCode.DENIED,
                    f"REATTACH says (mode, base, length, offset) {said}; the attachment was {was}",
                )
            if event.region_fd is not None:
                try:
                    self._store.adopt_region_fd(region.region_id, event.region_fd)
                except PermissionDeniedError as exc:
                    raise _Refusal(ErrorCode.DENIED, str(exc)) from None
            elif self._store.get(region.region_id).content_reset and any(
                r.mode != Mode.PRIVATE_COPY.wire_name for r in self._store.orphans(region.region_id)
            ):
                # A shared client may yet hand back the region's memory from before the
                # restart; until it does (or gives up), a private copy would read the source.
                self._store.unclaim(record)
                handshake.region = None
                handshake.reattach_key = b""
                raise _Refusal(
                    ErrorCode.BUSY,
                    "the region's memory may yet come back with a shared attachment: retry",
                )
            attach = protocol.Attach(message.base, message.length, message.region_offset)
            self._check_range(region, attach)
            self._check_mapping(handshake, region, message.mode, attach)
            uffd_fd = None
            uffd = self._adopt(region, message.mode, attach, event.uffd_fd)
            try:
                uffd.wake(message.base, message.length)
                attachment = self._new_attachment(
                    handshake,
                    region,
                    message.mode,
                    attach,
                    uffd,
                    mode_reasons="re-attached after a restart of the service",
                    reattach_key=record.key,
                )
            except UffdError as exc:
                uffd.close()
                raise _Refusal(ErrorCode.BAD_UFFD, str(exc)) from None
            except BaseException:
                uffd.close()
                raise
        finally:
            _unix.close_fds([fd for fd in (uffd_fd, event.region_fd) if fd is not None])
        # Claimed and served: nothing to undo when the handshake's bookkeeping is dropped.
        handshake.region = None
        handshake.reattach_key = b""
        logs.event(
            _log,
            logging.INFO,
            "reattached",
            attachment=attachment.id,
            region=region.region_id,
            mode=message.mode.wire_name,
            pid=handshake.pid,
        )
        self._hand_over(handshake, attachment)

    def _new_attachment(
        self,
        handshake: _Handshake,
        region: RegionBacking,
        mode: Mode,
        attach: protocol.Attach,
        uffd: Uffd | None,
        **details: Any,
    ) -> Attachment:
        """The engine's attachment for a handshake that succeeded; READY is its greeting."""
        attachment = Attachment(
            region=region,
            mode=mode,
            ranges=[MappedRange(attach.base, attach.length, attach.region_offset)],
            uffd=uffd,
            connection=handshake.connection,
            machine=handshake.machine,
            pid=handshake.pid,
            uid=handshake.uid,
            pidfd=_unix.peer_pidfd(handshake.connection),
            id=handshake.attachment_id,
            **details,
        )
        # The engine sends READY once it has the attachment: a client that has READY then
        # finds the attachment live (GetStats), and no other thread ever touches the
        # connection after the engine may have closed it.
        attachment.greeting = handshake.machine.ready(attachment.id)
        return attachment

    def _hand_over(self, handshake: _Handshake, attachment: Attachment) -> None:
        # From here on the engine owns the connection, the uffd and the pidfd.
        self._pending.pop(handshake.connection.fileno(), None)
        self._selector.unregister(handshake.connection)
        self._engine.add(attachment)

    def _adopt(
        self, region: RegionBacking, mode: Mode, attach: protocol.Attach, uffd_fd: int
    ) -> Uffd:
        try:
            uffd = Uffd.adopt(uffd_fd)
        except NotAUserfaultfdError as exc:
            _unix.close_fds([uffd_fd])
            raise _Refusal(ErrorCode.BAD_UFFD, str(exc)) from None
        try:
            needs = requirements(mode, hugetlb=region.backing.kind is BackingKind.HUGETLB)
            lacking = needs.features & ~uffd.features
            if lacking:
                raise _Refusal(ErrorCode.BAD_UFFD, f"the userfaultfd lacks features {lacking!r}")
            forbidden = uffd.features & FORBIDDEN_FEATURES
            if forbidden:
                raise _Refusal(
                    ErrorCode.BAD_UFFD, f"the userfaultfd has forbidden features {forbidden!r}"
                )
            try:
                # Registering again through the received fd proves the range is mapped and
                # registrable in this mode, and fails with EBUSY if another uffd holds it.
                uffd.register(attach.base, attach.length, needs.register_mode)
            except UffdError as exc:
                raise _Refusal(ErrorCode.BAD_UFFD, str(exc)) from None
        except (_Refusal, ShmfaultError, OSError):
            uffd.close()
            raise
        return uffd

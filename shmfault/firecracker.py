"""Firecracker's page-fault handler protocol: a VMM restoring a snapshot with the ``Uffd`` memory
backend hands its guest memory's userfaultfd to shmfault, which serves the faults from a region.

The protocol, as Firecracker defines it (its snapshot docs and ``persist.rs``): the handler
listens on a ``SOCK_STREAM`` unix socket; during ``PUT /snapshot/load`` the VMM maps anonymous
private memory for every guest memory region, opens a userfaultfd (``EVENT_REMOVE`` enabled when
the snapshot has a balloon device), registers every region ``MISSING``, connects, and sends one
message: a JSON array with one object per region (``base_host_virt_addr``, ``size``,
``offset`` into the memory file, ``page_size`` in bytes and the deprecated ``page_size_kib``,
also in bytes despite its name; older VMMs send neither, meaning the host page size) with the
userfaultfd as the one ``SCM_RIGHTS`` fd. Then the socket stays open and silent until the VMM
exits. The memory file itself is never sent: the handler knows it (here: the region's source).

:func:`parse_mappings` and :func:`check_mappings` are pure. :class:`FirecrackerEndpoint` is one
listening socket and the thread that reads each VMM's message (with a deadline and a size cap),
validates it, and hands the VM to the :class:`~shmfault.engine.FaultEngine` as one private-copy
attachment with ``zero_after_remove`` (pages the balloon dropped read zeros).
:class:`FirecrackerEndpoints` is the service's set of them, behind the RPCs.
"""

from __future__ import annotations

import array
import contextlib
import errno
import itertools
import json
import logging
import os
import secrets
import selectors
import socket
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shmfault import _unix, logs
from shmfault._abi import RegisterMode
from shmfault.engine import Attachment, FaultEngine, MappedRange
from shmfault.errors import (
    AlreadyExistsError,
    EndpointNotFoundError,
    InvalidArgumentError,
    RecordingNotFoundError,
    RegionNotFoundError,
    ServiceUnavailableError,
    SourceUnavailableError,
    UffdError,
)
from shmfault.memory import RegionBacking, base_page_size
from shmfault.modes import FORBIDDEN_FEATURES, Mode
from shmfault.recording import Recorder
from shmfault.recording_store import RecordingStore
from shmfault.store import RegionStore
from shmfault.uffd import NotAUserfaultfdError, Uffd

_log = logging.getLogger("shmfault.firecracker")

#: The largest message accepted. Firecracker's is about 120 bytes per guest memory region and a
#: VM has a handful of regions; 1 MiB leaves room for thousands without letting a client make
#: the service buffer without bound.
MAX_PAYLOAD = 1 << 20
#: Bytes read per recvmsg: a typical message fits; a larger one arrives over several reads.
RECV_BYTES = 4096
#: fds the control buffer has room for. A VMM sends one; room for more means a second fd is
#: seen (and refused) rather than silently dropped by the kernel as MSG_CTRUNC would be.
RECV_FDS = 4
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: VMs waiting to finish their message at once, per endpoint; more wait in the listen backlog.
MAX_PENDING = 64
#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
_UINT64_END = 1 << 64
_FD_SIZE = array.array("i").itemsize


# --- the message ---------------------------------------------------------------------------


class MappingError(ValueError):
    """The VMM's message is not a valid region list; the message names the field and the
    region index (``regions[2].offset: ...``)."""


@dataclass(frozen=True, slots=True)
class GuestRegionMapping:
    """One guest memory region as the VMM describes it: ``size`` bytes at its address
    ``base_host_virt_addr`` hold the memory file's bytes from ``offset``. ``page_size`` None:
    the VMM sent no page size (older Firecracker), meaning the host's base page size."""

    base_host_virt_addr: int
    size: int
    offset: int
    page_size: int | None


def _uint(entry: dict[str, Any], name: str, index: int, *, required: bool) -> int | None:
    if name not in entry:
        if required:
            raise MappingError(f"regions[{index}].{name}: missing")
        return None
    value = entry[name]
    # bool is an int to Python and 1.0 is not to JSON's Rust side: accept exactly integers.
    if not isinstance(value, int) or isinstance(value, bool):
        raise MappingError(f"regions[{index}].{name}: {value!r} is not an integer")
    if not 0 <= value < _UINT64_END:
        raise MappingError(f"regions[{index}].{name}: {value} is not an unsigned 64-bit integer")
    return value


def parse_mappings(payload: bytes) -> list[GuestRegionMapping]:
    """The regions of one VMM message (a JSON array of objects). Fields other than the five
    Firecracker defines are ignored, so a newer VMM's additions do not break the handshake.
    Raises MappingError naming the field and region index."""
    try:
        document = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MappingError(f"the message is not UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise MappingError(f"the message is not JSON: {exc}") from None
    if not isinstance(document, list):
        raise MappingError(f"the message is a JSON {type(document).__name__}, not an array")
    if not document:
        raise MappingError("the message lists no regions")
    mappings = []
    for index, entry in enumerate(document):
        if not isinstance(entry, dict):
            raise MappingError(f"regions[{index}]: a JSON {type(entry).__name__}, not an object")
        base = _uint(entry, "base_host_virt_addr", index, required=True)
        size = _uint(entry, "size", index, required=True)
        offset = _uint(entry, "offset", index, required=True)
        page_size = _uint(entry, "page_size", index, required=False)
        # Deprecated, and in bytes despite its name (Firecracker fills both with one value).
        legacy = _uint(entry, "page_size_kib", index, required=False)
        if page_size is not None and legacy is not None and page_size != legacy:
            raise MappingError(
                f"regions[{index}].page_size_kib: {legacy} differs from page_size {page_size} "
                "(both are the page size in bytes)"
            )
        assert base is not None and size is not None and offset is not None
        mappings.append(GuestRegionMapping(base, size, offset, page_size or legacy))
    return mappings


def check_mappings(
    mappings: Sequence[GuestRegionMapping], *, region_size: int, page_size: int
) -> None:
    """Check that ``mappings`` can be served from a region of ``region_size`` bytes with pages
    of ``page_size`` bytes: each base, size and offset page-aligned, size > 0, nothing past the
    end of the address space or of the region, no two ranges overlapping, and each region's
    page size the region's (a hugetlbfs guest needs a hugetlb region; see docs/firecracker.md).
    Raises MappingError naming the field and region index."""
    for index, mapping in enumerate(mappings):
        where = f"regions[{index}]"
        sent = mapping.page_size if mapping.page_size is not None else page_size
        if sent != page_size:
            raise MappingError(
                f"{where}.page_size: the VMM's guest memory has {sent}-byte pages but the "
                f"region has {page_size}-byte pages"
                + (
                    " (a hugetlbfs guest needs a region with the hugetlb backing)"
                    if sent > page_size
                    else ""
                )
            )
        if mapping.size == 0:
            raise MappingError(f"{where}.size: 0")
        for name in ("base_host_virt_addr", "size", "offset"):
            value = getattr(mapping, name)
            if value % page_size:
                raise MappingError(
                    f"{where}.{name}: {value:#x} is not a multiple of the page size {page_size}"
                )
        if mapping.base_host_virt_addr + mapping.size >= _UINT64_END:
            raise MappingError(
                f"{where}.size: {mapping.base_host_virt_addr:#x} + {mapping.size:#x} overflows "
                "the address space"
            )
        if mapping.offset + mapping.size > region_size:
            raise MappingError(
                f"{where}.offset: {mapping.offset} + size {mapping.size} is past the end of the "
                f"memory file ({region_size} bytes)"
            )
    order = sorted(range(len(mappings)), key=lambda i: mappings[i].base_host_virt_addr)
    for before, after in itertools.pairwise(order):
        first, second = mappings[before], mappings[after]
        if first.base_host_virt_addr + first.size > second.base_host_virt_addr:
            raise MappingError(
                f"regions[{after}].base_host_virt_addr: {second.base_host_virt_addr:#x} lies "
                f"inside regions[{before}] ({first.base_host_virt_addr:#x} + {first.size:#x})"
            )


class _ArrayScanner:
    """Finds where the JSON array at the start of a byte stream ends, as bytes arrive, without
    parsing it: bracket depth outside strings. Byte-wise is sound for UTF-8, where every byte of
    a multi-byte character is >= 0x80 and so never a bracket, quote or backslash."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._position = 0
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._started = False

    def feed(self, chunk: bytes) -> int | None:
        """Add ``chunk``; the end offset of the array once it is complete, else None. Raises
        MappingError when the stream does not start with an array."""
        self.data += chunk
        data = self.data
        while self._position < len(data):
            byte = data[self._position]
            self._position += 1
            if not self._started:
                if byte in b" \t\r\n":
                    continue
                if byte != ord("["):
                    raise MappingError(
                        f"the message does not start with a JSON array but with {chr(byte)!r}"
                    )
                self._started = True
                self._depth = 1
            elif self._in_string:
                if self._escaped:
                    self._escaped = False
                elif byte == ord("\\"):
                    self._escaped = True
                elif byte == ord('"'):
                    self._in_string = False
            elif byte == ord('"'):
                self._in_string = True
            elif byte in b"[{":
                self._depth += 1
            elif byte in b"]}":
                self._depth -= 1
                if self._depth == 0:
                    return self._position
        return None


# --- the socket ------------------------------------------------------------------------------


def bind_endpoint_socket(path: str, gid: int | None) -> tuple[socket.socket, tuple[int, int]]:
    """A listening ``SOCK_STREAM`` unix socket at ``path``, mode 0600 (0660 and owned by group
    ``gid`` when given, like the service's own sockets), and the (st_dev, st_ino) of its file.

    ``path`` must be absolute and at most 107 bytes; its parent must exist and be a real
    directory (not a symlink); ``path`` itself must not exist unless it is a stale socket of
    this uid that nobody answers on (then it is replaced). Raises InvalidArgumentError,
    AlreadyExistsError (field ``socket_path``).
    """
    # Imported here: the server module composes this one.
    from shmfault.server import StartupError, clear_stale_socket

    field_name = "socket_path"
    if not os.path.isabs(path):
        raise InvalidArgumentError(f"socket path {path!r} is not absolute", field_name)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise InvalidArgumentError(
            f"socket path {path} is longer than the {MAX_SOCKET_PATH} bytes a unix socket "
            "address holds",
            field_name,
        )
    parent = os.path.dirname(path)
    try:
        info = os.lstat(parent)
    except FileNotFoundError:
        raise InvalidArgumentError(
            f"the directory of socket path {path} does not exist", field_name
        ) from None
    except OSError as exc:
        raise InvalidArgumentError(f"{parent}: {exc.strerror}", field_name) from None
    if stat.S_ISLNK(info.st_mode):
        raise InvalidArgumentError(f"{parent} is a symlink: refusing to use it", field_name)
    if not stat.S_ISDIR(info.st_mode):
        raise InvalidArgumentError(f"{parent} is not a directory", field_name)
    try:
        clear_stale_socket(Path(path))
    except StartupError as exc:
        message = str(exc).replace("refusing to start", "refusing")
        raise AlreadyExistsError(message, field_name) from None
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            listener.bind(path)
        except FileExistsError:
            raise AlreadyExistsError(f"socket path {path} exists", field_name) from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:  # created between the check and the bind
                raise AlreadyExistsError(f"socket path {path} exists", field_name) from None
            raise InvalidArgumentError(f"cannot bind {path}: {exc.strerror}", field_name) from None
        identity = _restrict(path, gid)
        # Only now: until listen() a connect is refused, so nobody got in under the bind's
        # umask-given mode.
        listener.listen(128)
    except BaseException:
        listener.close()
        raise
    return listener, identity


def _restrict(path: str, gid: int | None) -> tuple[int, int]:
    # The parent directory may be writable by others (a jail's root): the name could be swapped
    # for a symlink after the bind. Change the mode through an O_PATH|O_NOFOLLOW descriptor
    # checked to be a socket, so a swapped-in symlink's target is never touched.
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISSOCK(info.st_mode):
            raise InvalidArgumentError(
                f"socket path {path} was replaced while it was being created", "socket_path"
            )
        through = f"/proc/self/fd/{fd}"
        os.chmod(through, 0o660 if gid is not None else 0o600)
        if gid is not None:
            os.chown(through, -1, gid)
        return info.st_dev, info.st_ino
    finally:
        os.close(fd)


def _remove_socket(path: str, identity: tuple[int, int]) -> None:
    """Unlink ``path`` if it is still the socket this endpoint bound (not a successor's)."""
    with contextlib.suppress(OSError):
        info = os.lstat(path)
        if stat.S_ISSOCK(info.st_mode) and (info.st_dev, info.st_ino) == identity:
            os.unlink(path)


# --- the endpoint ----------------------------------------------------------------------------


class _Refusal(Exception):
    pass


@dataclass(eq=False)
class _Pending:
    connection: socket.socket
    deadline: float
    pid: int
    uid: int
    scanner: _ArrayScanner = field(default_factory=_ArrayScanner)
    fds: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """What ListFirecrackerEndpoints shows of one endpoint."""

    id: str
    socket_path: str
    region_id: str
    created: float
    #: VMs handed to the engine; connections refused (each logged with its reason)
    attached: int
    refused: int
    #: what each VM's attachment does besides serving faults (docs/recording.md)
    record: bool = False
    replay: str = ""


@dataclass(frozen=True, slots=True)
class Limits:
    """What an endpoint admits: the service's attachment limits (``--max-attachments``,
    ``--max-attachments-per-uid``) and the handshake deadline."""

    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_attachments: int = 4096
    max_attachments_per_uid: int = 1024


class FirecrackerEndpoint:
    """One listening socket bound to one region; each VMM that connects becomes one attachment.
    Takes ``listener`` (bound and listening); :meth:`stop` closes it and removes its file."""

    def __init__(
        self,
        endpoint_id: str,
        listener: socket.socket,
        identity: tuple[int, int],
        socket_path: str,
        region_id: str,
        store: RegionStore,
        engine: FaultEngine,
        limits: Limits,
        *,
        record: bool = False,
        replay: str = "",
        recordings: RecordingStore | None = None,
    ) -> None:
        self.id = endpoint_id
        self.record = record
        self.replay = replay
        self._recordings = recordings
        self.socket_path = socket_path
        self.region_id = region_id
        self.created = time.time()
        self.attached = 0
        self.refused = 0
        self._listener = listener
        self._listener.setblocking(False)
        self._identity = identity
        self._store = store
        self._engine = engine
        self._limits = limits
        self._pending: dict[int, _Pending] = {}
        self._selector = selectors.DefaultSelector()
        self._wakeup_read, self._wakeup_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"shmfault-firecracker-{endpoint_id}", daemon=True
        )

    def info(self) -> EndpointInfo:
        return EndpointInfo(
            self.id,
            self.socket_path,
            self.region_id,
            self.created,
            self.attached,
            self.refused,
            self.record,
            self.replay,
        )

    def _replay_pages(self, region: RegionBacking) -> list[int] | None:
        """The replay recording's pages, or None (logged) when it is gone or does not fit:
        a VM restoring is served on demand rather than refused."""
        if not self.replay or self._recordings is None:
            return None
        try:
            made = self._recordings.load(self.replay)
        except (RecordingNotFoundError, SourceUnavailableError) as exc:
            logs.event(_log, logging.WARNING, "firecracker_replay_skipped", error=str(exc))
            return None
        if (made.page_size, made.region_size) != (region.page_size, region.size):
            logs.event(
                _log,
                logging.WARNING,
                "firecracker_replay_skipped",
                error=f"recording {self.replay} is of another region size or page size",
            )
            return None
        return made.pages()

    def start(self) -> None:
        """Start accepting on a thread of its own."""
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wakeup_read, selectors.EVENT_READ, "wakeup")
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, refuse VMs still sending their message, close the listener and
        remove the socket file. VMs already attached stay served. Blocks until the thread has
        finished (at most ``timeout`` seconds): after it returns, no new attachment comes
        from this endpoint."""
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
        _remove_socket(self.socket_path, self._identity)

    # --- the thread ---

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._expire()
                deadlines = [p.deadline for p in self._pending.values()]
                wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
                for key, _mask in self._selector.select(wait):
                    if key.data is None:
                        self._accept()
                    elif isinstance(key.data, _Pending):
                        self._receive(key.data)
        except Exception:
            logs.exception(_log, "firecracker_endpoint_crashed", endpoint=self.id)
        finally:
            for pending in list(self._pending.values()):
                self._refuse(pending, "the endpoint is closing")

    def _accept(self) -> None:
        while len(self._pending) < MAX_PENDING:
            try:
                connection, _address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logs.event(
                    _log, logging.WARNING, "accept_failed", endpoint=self.id, error=exc.strerror
                )
                return
            connection.setblocking(False)
            try:
                credentials = _unix.peer_credentials(connection)
            except OSError:
                connection.close()
                continue
            pending = _Pending(
                connection,
                time.monotonic() + self._limits.handshake_timeout,
                credentials.pid,
                credentials.uid,
            )
            self._pending[connection.fileno()] = pending
            self._selector.register(connection, selectors.EVENT_READ, pending)

    def _expire(self) -> None:
        now = time.monotonic()
        for pending in [p for p in self._pending.values() if p.deadline <= now]:
            self._refuse(
                pending,
                f"no complete message within {self._limits.handshake_timeout} s "
                f"({len(pending.scanner.data)} bytes received)",
            )

    def _forget(self, pending: _Pending) -> None:
        self._pending.pop(pending.connection.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(pending.connection)

    def _refuse(self, pending: _Pending, reason: str) -> None:
        self.refused += 1
        logs.event(
            _log,
            logging.WARNING,
            "firecracker_refused",
            endpoint=self.id,
            region=self.region_id,
            pid=pending.pid,
            uid=pending.uid,
            reason=reason,
        )
        self._forget(pending)
        _unix.close_fds(pending.fds)
        pending.fds = []
        pending.connection.close()

    def _receive(self, pending: _Pending) -> None:
        try:
            end = self._read(pending)
            if end is None:
                return
            self._complete(pending, end)
        except _Refusal as refusal:
            self._refuse(pending, str(refusal))
        except Exception as exc:
            logs.exception(_log, "firecracker_handshake_crashed", endpoint=self.id, pid=pending.pid)
            self._refuse(pending, f"internal error: {type(exc).__name__}: {exc}")

    def _read(self, pending: _Pending) -> int | None:
        """Read what has arrived; the end of the array once complete, else None."""
        while True:
            try:
                data, ancillary, flags, _address = pending.connection.recvmsg(
                    RECV_BYTES, socket.CMSG_SPACE(RECV_FDS * _FD_SIZE), socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                raise _Refusal(f"receiving failed: {exc.strerror}") from None
            pending.fds.extend(_unix.fds_from_ancillary(ancillary))
            if flags & socket.MSG_CTRUNC:
                raise _Refusal(
                    f"more fds than the {RECV_FDS} a message may carry (control data truncated)"
                )
            if not data:
                raise _Refusal(
                    f"the VMM closed the connection after {len(pending.scanner.data)} bytes, "
                    "before a complete message"
                )
            try:
                end = pending.scanner.feed(data)
            except MappingError as exc:
                raise _Refusal(str(exc)) from None
            if end is not None:
                return end
            if len(pending.scanner.data) > MAX_PAYLOAD:
                raise _Refusal(f"the message is longer than {MAX_PAYLOAD} bytes")

    def _complete(self, pending: _Pending, end: int) -> None:
        data = bytes(pending.scanner.data)
        if data[end:].strip():
            raise _Refusal(
                f"{len(data) - end} bytes follow the region list: the VMM sends one message"
            )
        try:
            mappings = parse_mappings(data[:end])
        except MappingError as exc:
            raise _Refusal(str(exc)) from None
        if len(pending.fds) != 1:
            raise _Refusal(
                f"the message carried {len(pending.fds)} fds, not exactly one (the userfaultfd)"
            )
        self._check_limits(pending.uid)
        try:
            region = self._store.data(self.region_id)
            check_mappings(mappings, region_size=region.size, page_size=region.page_size)
        except RegionNotFoundError as exc:
            raise _Refusal(str(exc)) from None
        except MappingError as exc:
            raise _Refusal(str(exc)) from None
        uffd = self._adopt(pending, mappings, huge=region.page_size != base_page_size())
        try:
            try:
                region = self._store.attach(self.region_id)
            except RegionNotFoundError as exc:
                raise _Refusal(str(exc)) from None
            try:
                attachment = Attachment(
                    region=region,
                    mode=Mode.PRIVATE_COPY,
                    ranges=[MappedRange(m.base_host_virt_addr, m.size, m.offset) for m in mappings],
                    uffd=uffd,
                    connection=pending.connection,
                    machine=None,
                    pid=pending.pid,
                    uid=pending.uid,
                    pidfd=_unix.peer_pidfd(pending.connection),
                    kind="firecracker",
                    zero_after_remove=True,
                    recorder=(
                        Recorder(
                            page_size=region.page_size,
                            region_size=region.size,
                            region_id=region.region_id,
                        )
                        if self.record
                        else None
                    ),
                    replay=self._replay_pages(region),
                )
            except BaseException:
                self._store.detach(self.region_id)
                raise
        except BaseException:
            uffd.close()
            raise
        # From here on the engine owns the connection, the uffd and the pidfd.
        self._forget(pending)
        self._engine.add(attachment)
        self.attached += 1
        logs.event(
            _log,
            logging.INFO,
            "firecracker_attached",
            endpoint=self.id,
            region=self.region_id,
            attachment=attachment.id,
            pid=pending.pid,
            regions=len(mappings),
            bytes=sum(m.size for m in mappings),
        )

    def _check_limits(self, uid: int) -> None:
        total = self._engine.live_count()
        if total >= self._limits.max_attachments:
            raise _Refusal(f"the service serves {total} attachments, its limit")
        mine = self._engine.live_count(uid=uid)
        if mine >= self._limits.max_attachments_per_uid:
            raise _Refusal(f"uid {uid} has {mine} attachments, the limit per uid")

    def _adopt(
        self, pending: _Pending, mappings: Sequence[GuestRegionMapping], *, huge: bool
    ) -> Uffd:
        fd = pending.fds[0]
        try:
            uffd = Uffd.adopt(fd)
        except NotAUserfaultfdError as exc:
            raise _Refusal(f"the fd is not a usable userfaultfd: {exc}") from None
        pending.fds = []  # the handle owns it now
        try:
            forbidden = uffd.features & FORBIDDEN_FEATURES
            if forbidden:
                raise _Refusal(f"the userfaultfd has forbidden features {forbidden!r}")
            for index, mapping in enumerate(mappings):
                try:
                    # Registering again through the received fd proves that the range is
                    # mapped in the VMM and registered MISSING with this very userfaultfd
                    # (another one holding it fails with EBUSY).
                    uffd.register(mapping.base_host_virt_addr, mapping.size, RegisterMode.MISSING)
                except UffdError as exc:
                    raise _Refusal(
                        f"regions[{index}]: the VMM's memory there is not registrable: {exc}"
                    ) from None
        except BaseException:
            uffd.close()
            raise
        return uffd


# --- the service's endpoints -----------------------------------------------------------------


class FirecrackerEndpoints:
    """Every Firecracker endpoint of the service. Thread-safe. Endpoints are not persisted:
    a restarted service has none until they are opened again."""

    def __init__(
        self,
        store: RegionStore,
        engine: FaultEngine,
        *,
        gid: int | None = None,
        limits: Limits | None = None,
        recordings: RecordingStore | None = None,
    ) -> None:
        self._recordings = recordings
        self._store = store
        self._engine = engine
        self._gid = gid
        self._limits = limits or Limits()
        self._lock = threading.Lock()
        self._endpoints: dict[str, FirecrackerEndpoint] = {}
        self._closed = False

    def open(
        self, region: str, socket_path: str, *, record: bool = False, replay: str = ""
    ) -> EndpointInfo:
        """Listen for VMMs at ``socket_path`` and serve them from ``region`` (id or name),
        recording each VM's faults (``record``) and/or filling recording ``replay``'s pages
        ahead of each. Raises RegionNotFoundError, RecordingNotFoundError,
        InvalidArgumentError, AlreadyExistsError."""
        described = self._store.get(region)
        region_id = described.id
        if replay:
            if self._recordings is None:
                raise ServiceUnavailableError("this service keeps no recordings")
            info = self._recordings.info(replay)
            if (info.page_size, info.region_size) != (described.page_size, described.size):
                raise InvalidArgumentError(
                    f"recording {replay} is of a region of {info.region_size} bytes in "
                    f"{info.page_size}-byte pages, not {described.size} in "
                    f"{described.page_size}",
                    "replay",
                )
        listener, identity = bind_endpoint_socket(socket_path, self._gid)
        endpoint = FirecrackerEndpoint(
            "fc" + secrets.token_hex(6),
            listener,
            identity,
            socket_path,
            region_id,
            self._store,
            self._engine,
            self._limits,
            record=record,
            replay=replay,
            recordings=self._recordings,
        )
        with self._lock:
            closed = self._closed
            if not closed:
                self._endpoints[endpoint.id] = endpoint
                endpoint.start()
        if closed:
            endpoint.stop()
            raise ServiceUnavailableError("the service is stopping")
        logs.event(
            _log,
            logging.INFO,
            "firecracker_endpoint_opened",
            endpoint=endpoint.id,
            region=region_id,
            socket=socket_path,
        )
        return endpoint.info()

    def close(self, endpoint_id: str, reason: str = "closed") -> EndpointInfo:
        """Stop an endpoint (its VMs already attached stay served). Raises
        EndpointNotFoundError."""
        with self._lock:
            endpoint = self._endpoints.pop(endpoint_id, None)
        if endpoint is None:
            raise EndpointNotFoundError(f"no Firecracker endpoint {endpoint_id!r}", "endpoint_id")
        endpoint.stop()
        logs.event(
            _log,
            logging.INFO,
            "firecracker_endpoint_closed",
            endpoint=endpoint.id,
            region=endpoint.region_id,
            reason=reason,
            attached=endpoint.attached,
            refused=endpoint.refused,
        )
        return endpoint.info()

    def list(self) -> list[EndpointInfo]:
        """Every open endpoint, oldest first."""
        with self._lock:
            endpoints = list(self._endpoints.values())
        return sorted((e.info() for e in endpoints), key=lambda i: (i.created, i.id))

    def close_region(self, region_id: str) -> None:
        """Close every endpoint of ``region_id`` (it is being deleted)."""
        with self._lock:
            chosen = [e.id for e in self._endpoints.values() if e.region_id == region_id]
        for endpoint_id in chosen:
            with contextlib.suppress(EndpointNotFoundError):
                self.close(endpoint_id, "the region was deleted")

    def stop(self) -> None:
        """Close every endpoint and refuse new ones (service shutdown)."""
        with self._lock:
            self._closed = True
            chosen = list(self._endpoints)
        for endpoint_id in chosen:
            with contextlib.suppress(EndpointNotFoundError):
                self.close(endpoint_id, "the service is stopping")

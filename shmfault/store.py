"""RegionStore: the regions of one service, their sources, limits, lifecycle and metadata.

Plain Python, no gRPC: the servicer translates protobuf to the dataclasses here and back.

Metadata lives in an SQLite database in the state directory; each change is one transaction.
A region whose backing outlives the process (posix-shm) is written in two steps around its
side effects: the row is inserted as ``creating`` before the /dev/shm object is made and marked
``ready`` after; deletion marks it ``deleting`` before unlinking. A crash between the steps
leaves a row that the next start finishes (unlinks the object, deletes the row), so neither a
leaked /dev/shm object nor a resurrected deleted region can result, and no other service's
objects are ever swept.

On restart every ``ready`` region is listed again. memfd and hugetlb content cannot survive the
process: those regions are recreated empty, i.e. with their source's content, and reported with
``content_reset`` (and a log line). A posix-shm region reopens its object by name, so its
written pages stay written and are never refilled from the source.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import errno
import hashlib
import json
import logging
import mmap
import os
import re
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from shmfault import _libc, logs, memory
from shmfault.errors import (
    AlreadyExistsError,
    HugePagesUnavailableError,
    InvalidArgumentError,
    PermissionDeniedError,
    QuotaExceededError,
    RegionBusyError,
    RegionNotFoundError,
    RequestError,
    SourceUnavailableError,
)
from shmfault.memory import BackingKind, FileInPlace, RegionBacking

_log = logging.getLogger("shmfault.store")

GiB = 1 << 30
#: Largest value a size may have anywhere: ftruncate takes an off_t, SQLite a signed 64-bit.
MAX_SIZE = (1 << 63) - 1
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_NAME_LENGTH = 128
MAX_LABELS = 64
MAX_LABEL_KEY_LENGTH = 63
MAX_LABEL_VALUE_LENGTH = 256
DATABASE_NAME = "regions.sqlite3"

_NO_ROOM_ERRNOS = (errno.ENOMEM, errno.ENOSPC, errno.EMFILE, errno.ENFILE)
_ID_PATTERN = re.compile(r"r[0-9a-f]{12}")
_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
_LABEL_KEY_PATTERN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?")
_SHM_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


_SIZE_PATTERN = re.compile(r"\s*(\d+)\s*(?:([KMGTP])(?:iB|B)?|B)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}


def parse_size(text: str | int) -> int:
    """Bytes from a size as users write it: ``4096``, ``4K``, ``64GiB``, ``2M``. Units are
    powers of 1024 (``G`` and ``GiB`` alike: memory is counted in pages). Raises ValueError."""
    if isinstance(text, int):
        return text
    match = _SIZE_PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 4K, 2MiB, 64G)")
    return int(match.group(1)) << _SIZE_UNITS[(match.group(2) or "").upper()]


def log_event(level: int, event: str, **fields: object) -> None:
    """Log one event of the store: ``event`` is the message, ``fields`` its key-value pairs
    (the server's formatter writes them as key=value or JSON)."""
    logs.event(_log, level, event, **fields)


class SourceKind(enum.StrEnum):
    """Where the bytes of a page come from before anyone writes it."""

    ZERO = "zero"
    FILE = "file"
    REGION = "region"
    BYTES = "bytes"


class FillPolicy(enum.StrEnum):
    """When pages are filled from the source."""

    LAZY = "lazy"
    EAGER = "eager"


@dataclass(frozen=True, slots=True)
class Source:
    """A region's source. ``path``/``offset`` for a file, ``region`` (an id, once created;
    an id or a name in a request) for a region."""

    kind: SourceKind = SourceKind.ZERO
    path: str = ""
    offset: int = 0
    region: str = ""

    @classmethod
    def of_file(cls, path: str | os.PathLike[str], offset: int = 0) -> Source:
        """The bytes of the file at ``path`` (absolute, as the service sees it) from
        ``offset`` on."""
        return cls(SourceKind.FILE, path=os.fspath(path), offset=offset)

    @classmethod
    def of_region(cls, region: str) -> Source:
        """The current bytes of the region with id or name ``region`` (a clone)."""
        return cls(SourceKind.REGION, region=region)

    def describe(self) -> str:
        """One word or path for logs and tables: ``zero``, ``file:/p@4096``, ``region:r…``."""
        if self.kind is SourceKind.FILE:
            return f"file:{self.path}@{self.offset}"
        if self.kind is SourceKind.REGION:
            return f"region:{self.region}"
        return self.kind.value


@dataclass(frozen=True, slots=True)
class Region:
    """What a region is, as of the call that returned it."""

    id: str
    size: int
    page_size: int
    backing: BackingKind
    source: Source
    fill_policy: FillPolicy
    name: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    #: POSIX shm name (with its leading '/') of a posix-shm region, else "".
    shm_name: str = ""
    #: Unix socket where a client attaches to the region (lazy-attach protocol).
    handoff_socket: str = ""
    #: Creation time, seconds since the epoch.
    created: float = 0.0
    #: Memory the backing holds now.
    allocated_bytes: int = 0
    attachments: int = 0
    #: The content did not survive the last restart: pages read as the source again.
    content_reset: bool = False
    #: Single-use attach secret: set only on the Region that creation returns.
    attach_token: str = ""
    #: The uid that created it (docs/security.md §3.1); None: created anonymously, or before
    #: regions had owners, and anyone may use it.
    owner_uid: int | None = None

    def to_dict(self) -> dict[str, object]:
        """A JSON-able dict (the CLI's ``--json`` form)."""
        return {
            "id": self.id,
            "name": self.name,
            "size": self.size,
            "page_size": self.page_size,
            "backing": self.backing.value,
            "source": {
                "kind": self.source.kind.value,
                **(
                    {"path": self.source.path, "offset": self.source.offset}
                    if self.source.kind is SourceKind.FILE
                    else {}
                ),
                **({"region": self.source.region} if self.source.kind is SourceKind.REGION else {}),
            },
            "fill_policy": self.fill_policy.value,
            "labels": dict(self.labels),
            "shm_name": self.shm_name,
            "handoff_socket": self.handoff_socket,
            "created": self.created,
            "allocated_bytes": self.allocated_bytes,
            "attachments": self.attachments,
            "content_reset": self.content_reset,
            "owner_uid": self.owner_uid,
            **({"attach_token": self.attach_token} if self.attach_token else {}),
        }


@dataclass(frozen=True, slots=True)
class Limits:
    """What the store refuses to exceed. Sizes count the regions' declared sizes (address
    space promised), not the memory filled so far: a sparse region still reserves its size."""

    max_region_bytes: int = 64 * GiB
    max_total_bytes: int = 256 * GiB
    max_regions: int = 10_000
    #: Per owner (a uid, or all anonymous callers together); callers exempt from them (root
    #: and the service's own uid) are held to the totals only.
    max_regions_per_uid: int = 1024
    max_bytes_per_uid: int = 64 * GiB

    def check(self) -> None:
        """Raise InvalidArgumentError unless every limit is positive and representable."""
        for name in (
            "max_region_bytes",
            "max_total_bytes",
            "max_regions",
            "max_regions_per_uid",
            "max_bytes_per_uid",
        ):
            value = getattr(self, name)
            if not 0 < value <= MAX_SIZE:
                raise InvalidArgumentError(f"limit {name} must be in 1..{MAX_SIZE}: {value}", name)


class FileContent:
    """A regular file read on demand with pread, from ``offset`` on. Holds the file open, so
    a rename or replacement of the path does not change what the region reads."""

    zero = False

    def __init__(self, fd: int, path: str, offset: int) -> None:
        self._fd = fd
        self.path = path
        self.offset = offset
        #: a read-only shared mapping of the file from ``offset`` rounded down to a page, made
        #: on the first :meth:`address` (see :meth:`_map`); all 0 when none can be made
        self._mapping: tuple[int, int, int, int] | None = None

    def read(self, offset: int, length: int) -> bytes:
        """The file's bytes for region bytes ``[offset, offset + length)``. Blocks on disk.
        Raises SourceUnavailableError when the file has shrunk below them."""
        pieces = []
        position = self.offset + offset
        while length > 0:
            piece = os.pread(self._fd, length, position)
            if not piece:
                raise SourceUnavailableError(
                    f"source file {self.path} ends at {position}, before the bytes the region "
                    f"needs at {position}+{length}: it shrank after the region was created",
                    "source.file.path",
                )
            pieces.append(piece)
            position += len(piece)
            length -= len(piece)
        return b"".join(pieces)

    def address(self, offset: int, length: int) -> int | None:
        """Where the file's bytes for region bytes ``[offset, offset + length)`` are mapped in
        this process, so that a UFFDIO_COPY takes them straight from the page cache (no read
        into a fresh buffer, no second copy). None when they are past what was mapped (the file
        grew since) or the file cannot be mapped: use :meth:`read`. The mapping follows the
        file: bytes it no longer has (it shrank) fail the copy with EFAULT, never read wrong;
        :meth:`read` then raises the SourceUnavailableError that says so. Valid until
        :meth:`close`, which callers must not run meanwhile (the region's lock)."""
        mapping = self._mapping
        if mapping is None:
            mapping = self._mapping = self._map()
        start, mapped = mapping[2], mapping[3]
        if offset + length > mapped:
            return None
        return start + offset

    def in_place(self) -> FileInPlace | None:
        """The file, the offset of region offset 0 in it, and its mapping (made now if need
        be; address 0 when the file cannot be mapped). None once closed."""
        if self._fd < 0:
            return None
        if self._mapping is None:
            self._mapping = self._map()
        return FileInPlace(self._fd, self.offset, self._mapping[2], self._mapping[3])

    def _map(self) -> tuple[int, int, int, int]:
        """(mapping address, mapping length, address of file byte ``offset``, bytes mapped from
        ``offset``), all 0 when the file cannot be mapped."""
        page = mmap.PAGESIZE
        aligned = self.offset - self.offset % page
        try:
            length = os.fstat(self._fd).st_size - aligned
            if length <= self.offset - aligned:
                return 0, 0, 0, 0
            base = _libc.mmap(0, length, _libc.PROT_READ, _libc.MAP_SHARED, self._fd, aligned)
        except OSError:
            return 0, 0, 0, 0
        skip = self.offset - aligned
        return base, length, base + skip, length - skip

    def close(self) -> None:
        """Close the file (and unmap it). Idempotent."""
        if self._mapping is not None and self._mapping[1]:
            _libc.munmap(self._mapping[0], self._mapping[1])
        self._mapping = (0, 0, 0, 0)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class RegionContent:
    """Another region's current bytes, read (without filling that region) at fill time."""

    zero = False

    def __init__(self, source: RegionBacking) -> None:
        self.source = source

    def read(self, offset: int, length: int) -> bytes:
        """The source region's current bytes. Blocks on its lock."""
        return self.source.peek(offset, length)

    def address(self, offset: int, length: int) -> int | None:
        """None: a region's bytes are read under its lock (:meth:`read`)."""
        return None

    def in_place(self) -> FileInPlace | None:
        """None: not a file."""
        return None

    def close(self) -> None:
        """Nothing to release: the source region belongs to the store."""


class UnavailableContent:
    """The content of a region whose source was lost while the service was down."""

    zero = False

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def read(self, offset: int, length: int) -> bytes:
        """Always raises SourceUnavailableError."""
        raise SourceUnavailableError(self.reason, "source")

    def address(self, offset: int, length: int) -> int | None:
        """None: there is nothing to read."""
        return None

    def in_place(self) -> FileInPlace | None:
        """None: there is nothing to read."""
        return None

    def close(self) -> None:
        """Nothing to release."""


#: Unused attach tokens kept per region; issuing more invalidates the oldest.
MAX_UNUSED_TOKENS = 1024
#: Seconds an attach token stays valid unused.
DEFAULT_TOKEN_TTL = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class AttachOptions:
    """What an attach token asks of the attachment that redeems it."""

    #: record the faults served (a working-set recording, saved when the attachment ends)
    record: bool = False
    #: id of a recording whose pages are filled ahead of the client ("" for none)
    replay: str = ""


@dataclass(slots=True)
class _Entry:
    region: Region
    data: RegionBacking
    attachments: int = 0
    dependents: set[str] = field(default_factory=set)
    #: attach tokens not yet used (hashed), with what each asks of its attachment
    token_hashes: dict[bytes, AttachOptions] = field(default_factory=dict)
    #: when each of them was issued (time.monotonic)
    token_issued: dict[bytes, float] = field(default_factory=dict)


def _token_hash(token: str) -> bytes:
    # Kept hashed: a dict lookup is not constant-time, but on a hash it leaks nothing usable.
    return hashlib.sha256(token.encode()).digest()


def validate_name(name: str) -> None:
    """Raise InvalidArgumentError unless ``name`` is a valid region name (empty is valid: no
    name)."""
    if not name:
        return
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgumentError(
            f"name is {len(name)} characters long; at most {MAX_NAME_LENGTH} allowed", "name"
        )
    if not _NAME_PATTERN.fullmatch(name) or ".." in name or name == ".":
        raise InvalidArgumentError(
            f"name {name!r} is invalid: only letters, digits, '.', '_' and '-', and neither "
            "'.' alone nor '..' (no '/', no NUL)",
            "name",
        )
    if _ID_PATTERN.fullmatch(name):
        raise InvalidArgumentError(
            f"name {name!r} has the shape of a region id ('r' and 12 hex digits)", "name"
        )


def validate_labels(labels: Mapping[str, str]) -> None:
    """Raise InvalidArgumentError unless every label key and value is valid."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgumentError(f"{len(labels)} labels; at most {MAX_LABELS}", "labels")
    for key, value in labels.items():
        if len(key) > MAX_LABEL_KEY_LENGTH or not _LABEL_KEY_PATTERN.fullmatch(key):
            raise InvalidArgumentError(
                f"label key {key!r} is invalid: 1-{MAX_LABEL_KEY_LENGTH} letters, digits, "
                "'.', '_', '-', '/', starting and ending with a letter or digit",
                "labels",
            )
        if len(value) > MAX_LABEL_VALUE_LENGTH or not value.isprintable():
            raise InvalidArgumentError(
                f"label {key}: value {value[:40]!r} is invalid: at most "
                f"{MAX_LABEL_VALUE_LENGTH} printable characters",
                "labels",
            )


def _check_range(region: Region, offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise InvalidArgumentError(f"negative offset {offset} or length {length}", "offset")
    if offset > region.size or length > region.size - offset:
        raise InvalidArgumentError(
            f"range {offset}+{length} is past the end of region {region.id} ({region.size} bytes)",
            "offset" if offset > region.size else "length",
        )


def _encode_page_token(after_id: str) -> str:
    return base64.urlsafe_b64encode(f"after:{after_id}".encode()).decode().rstrip("=")


def _decode_page_token(token: str) -> str:
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    after_id = text.removeprefix("after:")
    if not text.startswith("after:") or not _ID_PATTERN.fullmatch(after_id):
        raise InvalidArgumentError(
            f"page_token {token[:40]!r} is not one this service issued", "page_token"
        )
    return after_id


_SCHEMA = """
CREATE TABLE IF NOT EXISTS regions (
    id            TEXT PRIMARY KEY,
    name          TEXT UNIQUE,
    size          INTEGER NOT NULL,
    page_size     INTEGER NOT NULL,
    backing       TEXT NOT NULL,
    shm_name      TEXT NOT NULL,
    source_kind   TEXT NOT NULL,
    source_path   TEXT NOT NULL,
    source_offset INTEGER NOT NULL,
    source_region TEXT NOT NULL,
    fill_policy   TEXT NOT NULL,
    labels        TEXT NOT NULL,
    created       REAL NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'deleting')),
    owner_uid     INTEGER
)
"""
#: Attachments a restarted service lets their clients re-attach (docs/protocol.md, REATTACH):
#: one row per live attachment, keyed by the hash of the token it was made with. Added in place
#: to a version 1 database (a new table changes nothing that was there).
_ATTACHMENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS attachments (
    token_hash    BLOB PRIMARY KEY,
    region_id     TEXT NOT NULL,
    uid           INTEGER NOT NULL,
    mode          TEXT NOT NULL,
    base          INTEGER NOT NULL,
    length        INTEGER NOT NULL,
    region_offset INTEGER NOT NULL,
    created       REAL NOT NULL
)
"""
_SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class AttachmentRecord:
    """A persisted attachment: what its client may re-attach after a restart."""

    key: bytes
    region_id: str
    uid: int
    mode: str
    base: int
    length: int
    region_offset: int
    created: float


class RegionStore:
    """Every region of one service. Thread-safe: metadata changes are serialised by one lock
    (held only for bookkeeping and one SQLite transaction, never for data), data calls by each
    region's own lock.

    Opening restores the regions of ``state_dir``'s database (see the module docstring).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        limits: Limits | None = None,
        handoff_socket: str = "",
        shm_prefix: str = "shmfault",
        source_roots: tuple[str, ...] = (),
        token_ttl: float = DEFAULT_TOKEN_TTL,
    ) -> None:
        """Open (creating if needed) the database in ``state_dir`` and restore its regions.
        An attach token not used within ``token_ttl`` seconds is no longer valid.

        Blocks for the restore: reopening posix-shm objects, recreating memfd backings and
        refilling eager regions whose content was reset. ``source_roots``, when not empty,
        restricts file sources to files under those directories. Raises InvalidArgumentError
        for bad limits or prefix, sqlite3.Error when the database is unusable.
        """
        self.limits = limits or Limits()
        self.limits.check()
        if not _SHM_PREFIX_PATTERN.fullmatch(shm_prefix):
            raise InvalidArgumentError(f"shm prefix {shm_prefix!r} is invalid", "shm_prefix")
        self.handoff_socket = handoff_socket
        self.shm_prefix = shm_prefix
        self.source_roots = tuple(os.path.realpath(root) for root in source_roots)
        if token_ttl <= 0:
            raise InvalidArgumentError(f"token_ttl must be positive, not {token_ttl}", "token_ttl")
        self.token_ttl = token_ttl
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._names: dict[str, str] = {}
        self._reserved_bytes = 0
        self._reserved_count = 0
        #: owner uid (None: anonymous) -> [regions, bytes] reserved, for the per-uid limits
        self._reserved_by_owner: dict[int | None, list[int]] = {}
        #: persisted attachments of a previous run not re-attached yet, and those of this run
        self._orphans: dict[bytes, AttachmentRecord] = {}
        self._live_records: set[bytes] = set()
        self._db = sqlite3.connect(
            state_dir / DATABASE_NAME, isolation_level=None, check_same_thread=False
        )
        # WAL with synchronous=NORMAL: a commit is durable once it returns against a crash of
        # this process (SIGKILL included), which is what the two-step region changes and the
        # persisted attachments must survive; only a power loss may drop the last commits,
        # and it takes every region's memory and every client with it. FULL would fsync on
        # every attach and detach (about 3 ms each on a disk).
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, _SCHEMA_VERSION):
            raise InvalidArgumentError(
                f"{state_dir / DATABASE_NAME} has schema version {version}; this service "
                f"knows {_SCHEMA_VERSION}",
                "state_dir",
            )
        with self._transaction():
            self._db.execute(_SCHEMA)
            self._db.execute(_ATTACHMENTS_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(regions)")}
            if "owner_uid" not in columns:
                # Added in place to an older database: its regions have no owner.
                self._db.execute("ALTER TABLE regions ADD COLUMN owner_uid INTEGER")
            self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        self._restore()

    # -- bookkeeping -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _lookup(self, ref: str, field_name: str = "region") -> _Entry:
        """The entry of ``ref`` (id or name); caller holds the lock."""
        if not ref:
            raise InvalidArgumentError(
                f"{field_name} is empty: give a region id or name", field_name
            )
        region_id = ref if _ID_PATTERN.fullmatch(ref) else self._names.get(ref, "")
        entry = self._entries.get(region_id)
        if entry is None:
            raise RegionNotFoundError(f"no region {ref!r}", field_name)
        return entry

    def _snapshot(self, entry: _Entry) -> Region:
        # Called without the store lock: allocated_bytes waits for the region's own lock.
        return replace(
            entry.region,
            allocated_bytes=entry.data.allocated_bytes(),
            attachments=entry.attachments,
            labels=dict(entry.region.labels),
        )

    def _new_id(self) -> str:
        while True:
            region_id = "r" + secrets.token_hex(6)
            if region_id not in self._entries:
                return region_id

    # -- sources ---------------------------------------------------------------------------

    def _open_file(
        self,
        path: str,
        offset: int,
        size: int,
        may_read: Callable[[os.stat_result], bool] | None = None,
    ) -> FileContent:
        if not os.path.isabs(path):
            raise InvalidArgumentError(
                f"source file path {path!r} is not absolute", "source.file.path"
            )
        try:
            # O_NONBLOCK: opening a FIFO must not hang the RPC; checked to be regular below.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        except FileNotFoundError as exc:
            raise InvalidArgumentError(
                f"source file {path} does not exist", "source.file.path"
            ) from exc
        except PermissionError as exc:
            raise PermissionDeniedError(
                f"the service may not read source file {path}", "source.file.path"
            ) from exc
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # The service's own limit, not the caller's mistake.
                raise QuotaExceededError(
                    f"the service has no file descriptor left to open {path} "
                    f"({exc.strerror}): raise its fd limit or lower max_regions",
                    "source.file.path",
                ) from exc
            raise InvalidArgumentError(
                f"source file {path} cannot be opened: {exc.strerror}", "source.file.path"
            ) from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgumentError(
                    f"source file {path} is not a regular file", "source.file.path"
                )
            if may_read is not None and not may_read(info):
                # Checked on the opened file, after every symlink: a link to a file the
                # caller may not read is refused like the file itself.
                raise PermissionDeniedError(
                    f"the caller may not read source file {path} (mode "
                    f"{stat.filemode(info.st_mode)}, owner {info.st_uid}, group {info.st_gid})",
                    "source.file.path",
                )
            if self.source_roots:
                # The path the descriptor really has, after every symlink: no race with a
                # symlink swapped in between a check and the open.
                real = os.readlink(f"/proc/self/fd/{fd}")
                if not any(
                    real == root or real.startswith(root.rstrip("/") + "/")
                    for root in self.source_roots
                ):
                    raise PermissionDeniedError(
                        f"source file {path} ({real}) is outside the allowed source "
                        f"directories {', '.join(self.source_roots)}",
                        "source.file.path",
                    )
            if offset > info.st_size or size > info.st_size - offset:
                raise InvalidArgumentError(
                    f"source file {path} has {info.st_size} bytes: offset {offset} + size "
                    f"{size} is past its end",
                    "source.file.offset" if offset > info.st_size else "size",
                )
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return FileContent(fd, path, offset)

    def _content_for(
        self,
        source: Source,
        size: int,
        may_read: Callable[[os.stat_result], bool] | None = None,
    ) -> tuple[memory.Content, Source, str]:
        """Validate ``source`` for a region of ``size`` bytes; returns its content, the source
        as stored (a region source by id), and the id it depends on. Caller holds the lock."""
        if source.kind is SourceKind.FILE:
            return self._open_file(source.path, source.offset, size, may_read), source, ""
        if source.kind is SourceKind.REGION:
            entry = self._lookup(source.region, "source.region")
            if size > entry.region.size:
                raise InvalidArgumentError(
                    f"source region {entry.region.id} has {entry.region.size} bytes, fewer "
                    f"than the {size} asked for",
                    "size",
                )
            return (
                RegionContent(entry.data),
                replace(source, region=entry.region.id),
                entry.region.id,
            )
        return memory.ZeroContent(), Source(source.kind), ""

    # -- lifecycle -------------------------------------------------------------------------

    def create(
        self,
        size: int,
        *,
        backing: BackingKind = BackingKind.MEMFD,
        source: Source | None = None,
        name: str = "",
        labels: Mapping[str, str] | None = None,
        fill_policy: FillPolicy = FillPolicy.LAZY,
        owner_uid: int | None = None,
        per_uid_limits: bool = True,
        may_read: Callable[[os.stat_result], bool] | None = None,
    ) -> Region:
        """Create a region and return it with a fresh single-use ``attach_token``.

        ``owner_uid`` becomes its owner (None: nobody in particular). ``per_uid_limits``
        counts it against its owner's ``max_regions_per_uid`` and ``max_bytes_per_uid`` (the
        caller decides who is exempt); the totals hold for everyone. ``may_read`` says whether
        the caller could read a file source itself (PermissionDeniedError if not).

        Sizes are refused, never rounded, unless a non-zero multiple of the backing's page
        size. Limits are checked before anything is allocated. Blocks for the eager fill
        (proportional to size) with ``FillPolicy.EAGER``, otherwise briefly.

        Raises InvalidArgumentError (size, name, labels, source), AlreadyExistsError (name),
        RegionNotFoundError (source region), PermissionDeniedError (source file),
        QuotaExceededError / HugePagesUnavailableError (limits, huge pages, kernel memory).
        """
        source = source or Source()
        labels = dict(labels or {})
        validate_name(name)
        validate_labels(labels)
        page_size = memory.page_size_of(backing)
        if page_size == 0:
            raise InvalidArgumentError("this kernel has no hugetlb support", "backing")
        if size <= 0:
            raise InvalidArgumentError(f"size {size} is not positive", "size")
        if size % page_size:
            raise InvalidArgumentError(
                f"size {size} is not a multiple of the {backing.value} page size {page_size} "
                f"(sizes are never rounded: ask for {size - size % page_size} or "
                f"{size - size % page_size + page_size})",
                "size",
            )
        with self._lock:
            if size > self.limits.max_region_bytes:
                raise QuotaExceededError(
                    f"size {size} exceeds the limit max_region_bytes "
                    f"{self.limits.max_region_bytes}",
                    "size",
                )
            if self._reserved_count + 1 > self.limits.max_regions:
                raise QuotaExceededError(
                    f"the service holds {self._reserved_count} regions, the limit max_regions "
                    f"is {self.limits.max_regions}",
                )
            if self._reserved_bytes + size > self.limits.max_total_bytes:
                raise QuotaExceededError(
                    f"size {size} on top of the {self._reserved_bytes} bytes of existing "
                    f"regions exceeds the limit max_total_bytes {self.limits.max_total_bytes}",
                    "size",
                )
            if per_uid_limits:
                self._check_owner_limits(owner_uid, size)
            if name and name in self._names:
                raise AlreadyExistsError(
                    f"name {name!r} is taken by region {self._names[name]}", "name"
                )
            content, stored_source, depends_on = self._content_for(source, size, may_read)
            region_id = self._new_id()
            # Reserved under the lock, so concurrent creations cannot together pass a limit.
            self._reserve(owner_uid, size, +1)
            if name:
                self._names[name] = region_id
            if depends_on:
                self._entries[depends_on].dependents.add(region_id)
        shm_name = f"/{self.shm_prefix}.{region_id}" if backing is BackingKind.POSIX_SHM else ""
        region = Region(
            id=region_id,
            size=size,
            page_size=page_size,
            backing=backing,
            source=stored_source,
            fill_policy=fill_policy,
            name=name,
            labels=labels,
            shm_name=shm_name,
            handoff_socket=self.handoff_socket,
            created=time.time(),
            owner_uid=owner_uid,
        )
        data: RegionBacking | None = None
        try:
            if backing is BackingKind.HUGETLB:
                available, figures = memory.available_huge_pages(page_size)
                if size // page_size > available:
                    raise HugePagesUnavailableError(
                        f"a hugetlb region of {size} bytes needs {size // page_size} huge pages "
                        f"of {page_size} bytes; only {available} are free ({figures})",
                        "size",
                    )
            with self._lock, self._transaction() as db:
                self._insert(db, region, "creating")
            data = RegionBacking(
                region_id,
                memory.Backing.create(backing, size, f"shmfault:{region_id}", shm_name),
                content,
            )
            if fill_policy is FillPolicy.EAGER:
                data.fill_all()
            token = secrets.token_urlsafe(32)
            with self._lock:
                with self._transaction() as db:
                    db.execute("UPDATE regions SET state = 'ready' WHERE id = ?", (region_id,))
                digest = _token_hash(token)
                entry = _Entry(
                    region,
                    data,
                    token_hashes={digest: AttachOptions()},
                    token_issued={digest: time.monotonic()},
                )
                self._entries[region_id] = entry
        except OSError as exc:
            self._abort_create(region, content if data is None else None, data, depends_on)
            if isinstance(exc, RequestError) or exc.errno not in _NO_ROOM_ERRNOS:
                raise
            raise QuotaExceededError(
                f"the kernel refused a backing of {size} bytes: {exc.strerror}", "size"
            ) from exc
        except BaseException:
            self._abort_create(region, content if data is None else None, data, depends_on)
            raise
        log_event(
            logging.INFO,
            "region_created",
            id=region_id,
            name=name,
            size=size,
            backing=backing.value,
            source=stored_source.describe(),
            fill_policy=fill_policy.value,
        )
        return replace(self._snapshot(entry), attach_token=token)

    def _abort_create(
        self,
        region: Region,
        content: memory.Content | None,
        data: RegionBacking | None,
        depends_on: str,
    ) -> None:
        if data is not None:
            data.close()
        elif content is not None:
            content.close()
        if region.shm_name:
            memory.unlink_posix_shm(region.shm_name)
        with self._lock:
            with contextlib.suppress(sqlite3.Error), self._transaction() as db:
                db.execute("DELETE FROM regions WHERE id = ?", (region.id,))
            self._reserve(region.owner_uid, region.size, -1)
            if region.name:
                self._names.pop(region.name, None)
            if depends_on in self._entries:
                self._entries[depends_on].dependents.discard(region.id)

    def _insert(self, db: sqlite3.Connection, region: Region, state: str) -> None:
        db.execute(
            "INSERT INTO regions (id, name, size, page_size, backing, shm_name, source_kind, "
            "source_path, source_offset, source_region, fill_policy, labels, created, state, "
            "owner_uid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                region.id,
                region.name or None,
                region.size,
                region.page_size,
                region.backing.value,
                region.shm_name,
                region.source.kind.value,
                region.source.path,
                region.source.offset,
                region.source.region,
                region.fill_policy.value,
                json.dumps(dict(region.labels), sort_keys=True),
                region.created,
                state,
                region.owner_uid,
            ),
        )

    def get(self, ref: str) -> Region:
        """The region with id or name ``ref``. Does not block. Raises RegionNotFoundError,
        InvalidArgumentError (empty ref)."""
        with self._lock:
            entry = self._lookup(ref)
        return self._snapshot(entry)

    def list(
        self,
        labels: Mapping[str, str] | None = None,
        page_size: int = 0,
        page_token: str = "",
        visible: Callable[[Region], bool] | None = None,
    ) -> tuple[list[Region], str]:
        """One page of the regions carrying every label of ``labels``, in id order, and the
        token of the next page ("" after the last). ``page_size`` 0 means 100; more than 1000
        means 1000. ``visible`` leaves out the regions it says no to (the caller's access).
        Does not block. Raises InvalidArgumentError for a token not issued here."""
        wanted = dict(labels or {})
        if page_size < 0:
            raise InvalidArgumentError(f"page_size {page_size} is negative", "page_size")
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_page_token(page_token) if page_token else ""
        with self._lock:
            matching = sorted(
                region_id
                for region_id, entry in self._entries.items()
                if region_id > after
                and all(entry.region.labels.get(k) == v for k, v in wanted.items())
                and (visible is None or visible(entry.region))
            )
            entries = [self._entries[i] for i in matching[:limit]]
        page = [self._snapshot(entry) for entry in entries]
        next_token = _encode_page_token(page[-1].id) if len(matching) > limit else ""
        return page, next_token

    def delete(self, ref: str, force: bool = False) -> Region:
        """Delete a region: forget it, unlink its posix-shm name, close its backing (waiting
        for a data call running on it). Returns it as it was.

        Raises RegionNotFoundError; RegionBusyError while another region uses it as its
        source, or while attached unless ``force``.
        """
        with self._lock:
            entry = self._lookup(ref)
            region = entry.region
            if entry.dependents:
                raise RegionBusyError(
                    f"region {region.id} is the source of region(s) "
                    f"{', '.join(sorted(entry.dependents))}: delete them first",
                    "region",
                )
            if entry.attachments and not force:
                raise RegionBusyError(
                    f"region {region.id} has {entry.attachments} attachment(s); force to "
                    "delete it anyway",
                    "region",
                )
            with self._transaction() as db:
                db.execute("UPDATE regions SET state = 'deleting' WHERE id = ?", (region.id,))
            del self._entries[region.id]
            if region.name:
                del self._names[region.name]
            if region.source.kind is SourceKind.REGION and region.source.region in self._entries:
                self._entries[region.source.region].dependents.discard(region.id)
            self._reserve(region.owner_uid, region.size, -1)
        snapshot = replace(self._snapshot(entry), attachments=entry.attachments)
        entry.data.close()
        if region.shm_name:
            memory.unlink_posix_shm(region.shm_name)
        with self._lock, self._transaction() as db:
            db.execute("DELETE FROM regions WHERE id = ?", (region.id,))
        log_event(
            logging.INFO,
            "region_deleted",
            id=region.id,
            forced=force,
            attachments=entry.attachments,
        )
        return snapshot

    # -- data ------------------------------------------------------------------------------

    def data(self, ref: str) -> RegionBacking:
        """The data path of a region (for the fault engine and the servicer). Raises
        RegionNotFoundError."""
        with self._lock:
            return self._lookup(ref).data

    def read(
        self, ref: str, offset: int, length: int, chunk: int = memory.CHUNK_BYTES
    ) -> Iterator[tuple[int, bytes]]:
        """Validate now, then iterate over ``(offset, bytes)`` pieces of at most ``chunk``
        bytes of ``[offset, offset + length)`` (``length`` 0: to the end), filling unfilled
        pages from the source as it goes. Each piece blocks on the source.

        Raises RegionNotFoundError, InvalidArgumentError (range) at once; the iterator raises
        SourceUnavailableError, QuotaExceededError, or RegionNotFoundError if the region is
        deleted meanwhile.
        """
        with self._lock:
            entry = self._lookup(ref)
        if length == 0 and 0 <= offset <= entry.region.size:
            length = entry.region.size - offset
        _check_range(entry.region, offset, length)
        return self._pieces(entry.data, offset, length, chunk)

    @staticmethod
    def _pieces(
        data: RegionBacking, offset: int, length: int, chunk: int
    ) -> Iterator[tuple[int, bytes]]:
        end = offset + length
        for position in range(offset, end, chunk):
            yield position, data.read(position, min(chunk, end - position))

    def write(self, ref: str, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset`` (partly covered edge pages are filled from the source
        first). Blocks on the source and the region's lock. Raises RegionNotFoundError,
        InvalidArgumentError (range), QuotaExceededError, SourceUnavailableError."""
        with self._lock:
            entry = self._lookup(ref)
        _check_range(entry.region, offset, len(data))
        entry.data.write(offset, data)

    # -- attachments (used by the lazy-attach handoff) -------------------------------------

    def issue_token(self, ref: str, options: AttachOptions | None = None) -> str:
        """A fresh single-use attach token for the region, carrying ``options`` to the
        attachment. Raises RegionNotFoundError."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            entry = self._lookup(ref)
            hashes = entry.token_hashes
            digest = _token_hash(token)
            hashes[digest] = options or AttachOptions()
            entry.token_issued[digest] = time.monotonic()
            if len(hashes) > MAX_UNUSED_TOKENS:
                # A client that asks for tokens and never attaches must not grow the service
                # without bound: the oldest unused token stops being valid.
                oldest = next(iter(hashes))
                del hashes[oldest]
                entry.token_issued.pop(oldest, None)
        return token

    def redeem_token(self, region_id: str, token: str) -> tuple[RegionBacking, AttachOptions]:
        """Consume ``token`` of region ``region_id`` and count one attachment; the caller must
        call :meth:`detach` when it ends. Returns the region and the token's options. Raises
        RegionNotFoundError, PermissionDeniedError (unknown or used token)."""
        with self._lock:
            entry = self._lookup(region_id)
            digest = _token_hash(token)
            if digest not in entry.token_hashes:
                raise PermissionDeniedError(
                    f"attach token is not valid for region {entry.region.id} (unknown or used)",
                    "token",
                )
            options = entry.token_hashes.pop(digest)
            age = time.monotonic() - entry.token_issued.pop(digest, 0.0)
            if age > self.token_ttl:
                raise PermissionDeniedError(
                    f"attach token for region {entry.region.id} expired: issued {age:.0f} s "
                    f"ago, valid for {self.token_ttl:.0f} s",
                    "token",
                )
            entry.attachments += 1
            return entry.data, options

    def attach(self, region_id: str) -> RegionBacking:
        """Count one attachment of ``region_id`` that needs no token (a Firecracker endpoint's
        VM: whoever could connect to the endpoint's socket is authorised); the caller must call
        :meth:`detach` when it ends. Raises RegionNotFoundError (deleted meanwhile)."""
        with self._lock:
            entry = self._lookup(region_id)
            entry.attachments += 1
            return entry.data

    def detach(self, region_id: str) -> None:
        """Count one attachment of ``region_id`` as ended (no-op once the region is gone)."""
        with self._lock:
            entry = self._entries.get(region_id)
            if entry is not None and entry.attachments > 0:
                entry.attachments -= 1

    # -- re-attaching after a restart ------------------------------------------------------

    def remember_attachment(
        self,
        region_id: str,
        token: str,
        *,
        uid: int,
        mode: str,
        base: int,
        length: int,
        region_offset: int,
    ) -> bytes:
        """Persist an attachment made with ``token`` so that its client can re-attach after a
        restart; returns its key (for :meth:`forget_attachment`)."""
        key = _token_hash(token)
        with self._lock, self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO attachments VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, region_id, uid, mode, base, length, region_offset, time.time()),
            )
            self._live_records.add(key)
        return key

    def forget_attachment(self, key: bytes) -> None:
        """The attachment ended for good (not by the service stopping): no re-attach."""
        with self._lock:
            self._live_records.discard(key)
            if self._orphans.pop(key, None) is not None:
                return  # an orphan is only in memory until claimed; its row goes below too
        with self._lock, self._transaction() as db:
            db.execute("DELETE FROM attachments WHERE token_hash = ?", (key,))

    def reattach(
        self, region_id: str, token: str, *, uid: int
    ) -> tuple[RegionBacking, AttachmentRecord]:
        """Claim the persisted attachment of a previous run made with ``token`` on
        ``region_id``, for client ``uid``: the region and what was attached. The attachment
        keeps the count it had since the restore; the caller calls :meth:`detach` when it ends.
        Raises RegionNotFoundError, PermissionDeniedError (unknown token, another uid, already
        re-attached)."""
        key = _token_hash(token)
        with self._lock:
            entry = self._lookup(region_id)
            record = self._orphans.get(key)
            if record is None or record.region_id != entry.region.id:
                attached = key in self._live_records
                raise PermissionDeniedError(
                    f"no attachment of region {entry.region.id} to re-attach with this token"
                    + (" (it is attached now)" if attached else ""),
                    "token",
                )
            if record.uid != uid:
                raise PermissionDeniedError(
                    f"the attachment belongs to uid {record.uid}, not {uid}", "token"
                )
            del self._orphans[key]
            self._live_records.add(key)
            return entry.data, record

    def unclaim(self, record: AttachmentRecord) -> None:
        """Undo :meth:`reattach` for a client told to retry: the attachment awaits it again."""
        with self._lock:
            self._live_records.discard(record.key)
            self._orphans[record.key] = record

    def orphans(self, region_id: str = "") -> tuple[AttachmentRecord, ...]:
        """Persisted attachments of a previous run not re-attached (yet)."""
        with self._lock:
            return tuple(
                r for r in self._orphans.values() if not region_id or r.region_id == region_id
            )

    def expire_orphans(self) -> tuple[AttachmentRecord, ...]:
        """Give up on the previous run's attachments not re-attached by now (the caller waits
        the re-attach grace period first): their rows go and their regions stop counting
        them."""
        with self._lock:
            expired = tuple(self._orphans.values())
            self._orphans.clear()
            for record in expired:
                entry = self._entries.get(record.region_id)
                if entry is not None and entry.attachments > 0:
                    entry.attachments -= 1
        if expired:
            with self._lock, self._transaction() as db:
                db.executemany(
                    "DELETE FROM attachments WHERE token_hash = ?", [(r.key,) for r in expired]
                )
        return expired

    def adopt_region_fd(self, region_id: str, fd: int) -> bool:
        """Make the memfd ``fd`` (a re-attaching client's mapping of the region from before a
        restart) the region's backing again, if the region's content was reset by the restart
        and nothing has used its new, empty backing since. Returns True when adopted or when
        ``fd`` already is the backing; False when the region keeps its own (posix-shm: its
        content survived). Raises PermissionDeniedError when ``fd`` is not this region's memfd
        or the region's new backing is in use. Does not take ``fd`` (the caller closes it)."""
        with self._lock:
            entry = self._lookup(region_id)
            region, data = entry.region, entry.data
            info = os.fstat(fd)
            current = os.fstat(data.backing.fileno())
            if (info.st_dev, info.st_ino) == (current.st_dev, current.st_ino):
                return True
            if region.backing is not BackingKind.MEMFD or not region.content_reset:
                return False
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if not target.startswith(f"/memfd:shmfault:{region.id} ") or (
                not stat.S_ISREG(info.st_mode) or info.st_size != region.size
            ):
                raise PermissionDeniedError(
                    f"the fd presented is not region {region.id}'s memory", "region_fd"
                )
            live = entry.attachments - sum(
                1 for r in self._orphans.values() if r.region_id == region.id
            )
            if live > 1 or data.allocated_bytes() > 0:
                raise PermissionDeniedError(
                    f"region {region.id} has been used since the restart: its memory from "
                    "before cannot be taken back",
                    "region_fd",
                )
            with data.locked():
                old = data.backing
                data.backing = memory.Backing(
                    BackingKind.MEMFD, os.dup(fd), region.size, region.page_size
                )
                old.close()
            entry.region = replace(region, content_reset=False)
        log_event(
            logging.WARNING,
            "region_recovered",
            id=region.id,
            reason="a re-attaching client handed back its memory from before the restart",
        )
        return True

    # -- restore and shutdown --------------------------------------------------------------

    def _restore(self) -> None:
        self._restore_regions()
        self._restore_attachments()

    def _restore_attachments(self) -> None:
        rows = self._db.execute(
            "SELECT token_hash, region_id, uid, mode, base, length, region_offset, created "
            "FROM attachments"
        ).fetchall()
        gone = []
        for row in rows:
            record = AttachmentRecord(bytes(row[0]), *row[1:])
            entry = self._entries.get(record.region_id)
            if entry is None:
                gone.append((record.key,))
                continue
            self._orphans[record.key] = record
            entry.attachments += 1  # attached until its client comes back or gives up
        if gone:
            with self._transaction() as db:
                db.executemany("DELETE FROM attachments WHERE token_hash = ?", gone)
        if self._orphans:
            log_event(
                logging.INFO,
                "attachments_awaiting_reattach",
                count=len(self._orphans),
            )

    def _restore_regions(self) -> None:
        rows = self._db.execute(
            "SELECT id, name, size, page_size, backing, shm_name, source_kind, source_path, "
            "source_offset, source_region, fill_policy, labels, created, state, owner_uid "
            "FROM regions ORDER BY created, id"
        ).fetchall()
        for row in rows:
            (
                region_id,
                name,
                size,
                page_size,
                backing,
                shm_name,
                source_kind,
                source_path,
                source_offset,
                source_region,
                fill_policy,
                labels,
                created,
                state,
                owner_uid,
            ) = row
            if state != "ready":
                # A crash interrupted its creation or deletion: finish by removing it.
                if shm_name:
                    memory.unlink_posix_shm(shm_name)
                with self._transaction() as db:
                    db.execute("DELETE FROM regions WHERE id = ?", (region_id,))
                log_event(
                    logging.WARNING,
                    "region_cleaned",
                    id=region_id,
                    state=state,
                    reason="interrupted by a crash",
                )
                continue
            region = Region(
                id=region_id,
                size=size,
                page_size=page_size,
                backing=BackingKind(backing),
                source=Source(SourceKind(source_kind), source_path, source_offset, source_region),
                fill_policy=FillPolicy(fill_policy),
                name=name or "",
                labels=json.loads(labels),
                shm_name=shm_name,
                handoff_socket=self.handoff_socket,
                created=created,
                owner_uid=owner_uid,
            )
            try:
                self._restore_one(region)
            except (OSError, RequestError) as exc:
                if shm_name:
                    memory.unlink_posix_shm(shm_name)
                with self._transaction() as db:
                    db.execute("DELETE FROM regions WHERE id = ?", (region_id,))
                log_event(logging.ERROR, "region_dropped", id=region_id, reason=str(exc))

    def _restore_one(self, region: Region) -> None:
        content: memory.Content
        source = region.source
        if source.kind is SourceKind.FILE:
            try:
                content = self._open_file(source.path, source.offset, region.size)
            except RequestError as exc:
                content = UnavailableContent(f"source file of region {region.id}: {exc}")
                log_event(logging.WARNING, "source_unavailable", id=region.id, reason=str(exc))
        elif source.kind is SourceKind.REGION:
            origin = self._entries.get(source.region)
            if origin is None:
                content = UnavailableContent(
                    f"source region {source.region} of region {region.id} did not survive "
                    "the restart"
                )
            else:
                content = RegionContent(origin.data)
        else:
            content = memory.ZeroContent()
        backing = None
        if region.backing is BackingKind.POSIX_SHM:
            backing = memory.Backing.open_posix_shm(region.shm_name, region.size)
        reset = backing is None
        if backing is None:
            if region.shm_name:
                memory.unlink_posix_shm_if_ours(region.shm_name)
            try:
                backing = memory.Backing.create(
                    region.backing, region.size, f"shmfault:{region.id}", region.shm_name
                )
            except BaseException:
                content.close()
                raise
        data = RegionBacking(region.id, backing, content)
        if reset:
            log_event(
                logging.WARNING,
                "region_reset",
                id=region.id,
                backing=region.backing.value,
                reason="its content did not survive the restart; it reads as its source again",
            )
            if region.fill_policy is FillPolicy.EAGER:
                try:
                    data.fill_all()
                except (OSError, RequestError) as exc:
                    log_event(logging.ERROR, "eager_fill_failed", id=region.id, reason=str(exc))
        self._entries[region.id] = _Entry(replace(region, content_reset=reset), data)
        if source.kind is SourceKind.REGION and source.region in self._entries:
            self._entries[source.region].dependents.add(region.id)
        if region.name:
            self._names[region.name] = region.id
        self._reserve(region.owner_uid, region.size, +1)

    def _reserve(self, owner_uid: int | None, size: int, sign: int) -> None:
        """Count a region in (``sign`` +1) or out (-1) of the totals; caller holds the lock."""
        self._reserved_bytes += sign * size
        self._reserved_count += sign
        held = self._reserved_by_owner.setdefault(owner_uid, [0, 0])
        held[0] += sign
        held[1] += sign * size
        if not held[0]:
            del self._reserved_by_owner[owner_uid]

    def _check_owner_limits(self, owner_uid: int | None, size: int) -> None:
        count, held = self._reserved_by_owner.get(owner_uid, (0, 0))
        who = "anonymous callers" if owner_uid is None else f"uid {owner_uid}"
        if count + 1 > self.limits.max_regions_per_uid:
            raise QuotaExceededError(
                f"{who} hold {count} regions, the limit max_regions_per_uid is "
                f"{self.limits.max_regions_per_uid}"
            )
        if held + size > self.limits.max_bytes_per_uid:
            raise QuotaExceededError(
                f"size {size} on top of the {held} bytes {who} hold exceeds the limit "
                f"max_bytes_per_uid {self.limits.max_bytes_per_uid}",
                "size",
            )

    @property
    def count(self) -> int:
        """The number of regions."""
        with self._lock:
            return self._reserved_count

    @property
    def reserved_bytes(self) -> int:
        """The sum of every region's size."""
        with self._lock:
            return self._reserved_bytes

    def close(self) -> None:
        """Close every backing and the database; posix-shm objects stay. Waits for running
        data calls. Idempotent."""
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
            self._names.clear()
        for entry in reversed(entries):
            entry.data.close()
        self._db.close()

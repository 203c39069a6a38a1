"""Working-set recordings: the pages an attachment faulted, in order, for record and replay.

The fault engine feeds every fault it serves to a :class:`Recorder`; when the attachment ends the
service turns it into a :class:`Recording` and writes it with :func:`write_file`. A later attach
of the same content reads it back and prefetches :meth:`Recording.pages` in bulk instead of
faulting them one at a time. :func:`merge` keeps what several runs agree on.

The file format is specified in ``docs/recording.md``; :func:`decode` checks everything in it,
so a damaged or hostile file is refused with a :class:`RecordingFormatError` and never makes the
decoder allocate more than the file's own bytes can expand to.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
import struct
import tempfile
import time
import zlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

from shmfault.errors import RecordingFormatError

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "Access",
    "Recorder",
    "Recording",
    "decode",
    "encode",
    "merge",
    "read_file",
    "write_file",
]

FORMAT_VERSION = 1
MAGIC = b"SHMFREC\x00"
MIN_PAGE_SIZE = 4096
MAX_REGION_ID_BYTES = 255
#: No varint of the payload is longer (a u64 in 7-bit groups); also the cap on decompression.
MAX_VARINT_BYTES = 10
#: Deflate cannot expand input by more than about 1032:1; a header claiming more entries than the
#: payload could hold is refused before anything is decompressed.
_MAX_INFLATE_RATIO = 1032

# Everything up to the region id, then everything after it (docs/recording.md, "Header").
_HEAD = struct.Struct("<8sHHIQQQH")
_TAIL = struct.Struct("<IQ")
_U64_LIMIT = 1 << 64
_NS_PER_SECOND = 1_000_000_000
#: The latest ``created`` a file can hold (in 2554), rounded up to a float so that what decode
#: makes of the largest created_ns passes the constructor's check.
_MAX_CREATED = (_U64_LIMIT - 1) / _NS_PER_SECOND
# Level 6 (zlib's default) compresses these streams within a few percent of level 9, for less
# time at the end of an attachment.
_COMPRESS_LEVEL = 6


class Access(enum.IntEnum):
    """The kind of a fault: the low bit of every entry."""

    READ = 0
    WRITE = 1


_KINDS = (Access.READ, Access.WRITE)


def _geometry_problem(page_size: int, region_size: int, region_id: str) -> str | None:
    """What is wrong with a recording's geometry, or None. Shared by construction and decoding so
    that a recording this module builds is always one it can read back."""
    if page_size < MIN_PAGE_SIZE or page_size & (page_size - 1) or page_size >= 1 << 32:
        return f"page_size {page_size} is not a power of two from {MIN_PAGE_SIZE} to 2**31"
    if region_size <= 0 or region_size % page_size or region_size >= _U64_LIMIT:
        return (
            f"region_size {region_size} is not a non-zero multiple of page_size {page_size}"
            " below 2**64"
        )
    try:
        encoded = region_id.encode("utf-8")
    except UnicodeEncodeError:
        return f"region_id {region_id!r} cannot be encoded as UTF-8"
    if len(encoded) > MAX_REGION_ID_BYTES:
        return f"region_id is {len(encoded)} bytes of UTF-8, more than {MAX_REGION_ID_BYTES}"
    return None


class Recorder:
    """Collects the faults of one attachment, in the order they were served.

    :meth:`record` is called by the fault engine's single thread for every fault, so it does one
    bounds check and one append to a packed array: no per-call allocation beyond the array's
    amortised growth, no lock. :meth:`finish` may be called from another thread: copying the
    array is one C call under the GIL, so it sees a consistent prefix of the faults.
    """

    __slots__ = (
        "_append",
        "_created",
        "_entries",
        "_page_count",
        "page_size",
        "region_id",
        "region_size",
    )

    def __init__(self, *, page_size: int, region_size: int, region_id: str) -> None:
        problem = _geometry_problem(page_size, region_size, region_id)
        if problem is not None:
            raise ValueError(problem)
        self.page_size = page_size
        self.region_size = region_size
        self.region_id = region_id
        self._page_count = region_size // page_size
        self._created = time.time()
        self._entries: array[int] = array("Q")
        self._append = self._entries.append

    def record(self, page_index: int, write: bool) -> None:
        """One fault on ``page_index`` (a write fault if ``write``). Duplicates are kept: the
        order and the repetitions are what a later merge weighs.

        Raises :class:`ValueError` for a page outside the region: such an entry would make the
        recording unreadable, so it is refused here, where the bug is.
        """
        if not 0 <= page_index < self._page_count:
            raise ValueError(
                f"page index {page_index} is outside the region ({self._page_count} pages)"
            )
        self._append(page_index << 1 | (1 if write else 0))

    def record_entries(self, entries: list[int]) -> None:
        """Faults recorded elsewhere (the engine's C side), ``page_index << 1 | write`` each, in
        order. Raises :class:`ValueError` as :meth:`record` does, before recording any."""
        if entries and max(entries) >> 1 >= self._page_count:
            raise ValueError(f"a page index is outside the region ({self._page_count} pages)")
        self._entries.extend(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def finish(self) -> Recording:
        """A snapshot of the faults so far; the recorder keeps recording."""
        return Recording(
            page_size=self.page_size,
            region_size=self.region_size,
            region_id=self.region_id,
            created=self._created,
            entries=self._entries,
        )


@dataclass(frozen=True, slots=True, repr=False)
class Recording:
    """The faults of one attachment (or the merge of several).

    ``created`` is the unix time the recording started. ``entries`` holds one
    ``page_index << 1 | write`` per fault, in fault order, packed in an ``array('Q')`` (8 bytes
    an entry, where a tuple of ints would take about 40). The constructor takes any iterable of
    ints there and stores its own copy, so nobody else holds a reference to mutate; treat it as
    read-only.
    """

    page_size: int
    region_size: int
    region_id: str
    created: float
    entries: array[int]

    def __post_init__(self) -> None:
        problem = _geometry_problem(self.page_size, self.region_size, self.region_id)
        if problem is not None:
            raise ValueError(problem)
        if not (math.isfinite(self.created) and 0 <= self.created <= _MAX_CREATED):
            raise ValueError(f"created {self.created!r} is not a unix time from 1970 to 2554")
        entries = array("Q", self.entries)
        page_count = self.region_size // self.page_size
        if entries and (highest := max(entries) >> 1) >= page_count:
            raise ValueError(
                f"page index {highest} of an entry is outside the region ({page_count} pages)"
            )
        object.__setattr__(self, "entries", entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __hash__(self) -> int:
        return hash(
            (self.page_size, self.region_size, self.region_id, self.created, self.entries.tobytes())
        )

    def __repr__(self) -> str:
        return (
            f"Recording(page_size={self.page_size}, region_size={self.region_size},"
            f" region_id={self.region_id!r}, created={self.created!r}, entries=<{len(self)}>)"
        )

    def pages(self) -> list[int]:
        """Each page index once, in the order it was first faulted: what replay prefetches."""
        return list(dict.fromkeys(entry >> 1 for entry in self.entries))

    def accesses(self) -> Iterator[tuple[int, Access]]:
        """Every fault, in order, as ``(page_index, kind)``."""
        for entry in self.entries:
            yield entry >> 1, _KINDS[entry & 1]

    def written_pages(self) -> set[int]:
        """The pages that took at least one write fault."""
        return {entry >> 1 for entry in self.entries if entry & 1}


# --- Encoding ------------------------------------------------------------------------------


def _created_ns(created: float) -> int:
    # Exact arithmetic: a float time scaled in floating point is off by up to ~256 ns, and then
    # decode(encode(r)).created would not equal r.created. The clamp only bites at _MAX_CREATED,
    # which lies a fraction of a nanosecond beyond the last representable instant.
    return min(round(Fraction(created) * _NS_PER_SECOND), _U64_LIMIT - 1)


def _varints(entries: Iterable[int]) -> bytearray:
    """The uncompressed payload: per entry, zigzag(page delta) << 1 | write as a LEB128 varint."""
    out = bytearray()
    append = out.append
    previous = 0
    for entry in entries:
        page = entry >> 1
        delta = page - previous
        previous = page
        zigzag = delta << 1 if delta >= 0 else (~delta << 1) | 1
        value = zigzag << 1 | (entry & 1)
        while value >= 0x80:
            append(value & 0x7F | 0x80)
            value >>= 7
        append(value)
    return out


def encode(recording: Recording) -> bytes:
    """The recording in the file format of ``docs/recording.md``."""
    region_id = recording.region_id.encode("utf-8")
    payload = zlib.compress(_varints(recording.entries), _COMPRESS_LEVEL)
    head = _HEAD.pack(
        MAGIC,
        FORMAT_VERSION,
        0,
        recording.page_size,
        recording.region_size,
        len(recording.entries),
        _created_ns(recording.created),
        len(region_id),
    )
    tail = _TAIL.pack(zlib.crc32(payload), len(payload))
    return b"".join((head, region_id, tail, payload))


# --- Decoding ------------------------------------------------------------------------------


def _fail(message: str) -> RecordingFormatError:
    return RecordingFormatError(f"not a valid recording: {message}")


def decode(data: bytes) -> Recording:
    """Parse and check a recording. Raises :class:`RecordingFormatError` naming the first thing
    that is wrong; every length in the header is checked against ``len(data)`` before it is used.
    """
    view = memoryview(data)
    if bytes(view[: len(MAGIC)]) != MAGIC[: min(len(view), len(MAGIC))]:
        raise _fail(f"bad magic {bytes(view[: len(MAGIC)])!r}, expected {MAGIC!r}")
    if len(view) < _HEAD.size:
        raise _fail(f"truncated header: {len(view)} bytes, the fixed part alone is {_HEAD.size}")
    (_, version, flags, page_size, region_size, entry_count, created_ns, id_length) = (
        _HEAD.unpack_from(view)
    )
    if version > FORMAT_VERSION:
        raise _fail(
            f"format version {version} was written by a newer shmfault"
            f" (this one reads version {FORMAT_VERSION})"
        )
    if version != FORMAT_VERSION:
        raise _fail(f"unknown format version {version}")
    if flags:
        raise _fail(f"flags {flags:#06x} are reserved and must be 0")
    if id_length > MAX_REGION_ID_BYTES:
        raise _fail(f"region_id length {id_length} is over {MAX_REGION_ID_BYTES}")
    payload_offset = _HEAD.size + id_length + _TAIL.size
    if len(view) < payload_offset:
        raise _fail(
            f"truncated header: {len(view)} bytes, a region_id of {id_length} bytes makes it"
            f" {payload_offset}"
        )
    try:
        region_id = bytes(view[_HEAD.size : _HEAD.size + id_length]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(f"region_id is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    problem = _geometry_problem(page_size, region_size, region_id)
    if problem is not None:
        raise _fail(problem)
    crc, payload_length = _TAIL.unpack_from(view, _HEAD.size + id_length)
    actual = len(view) - payload_offset
    if actual < payload_length:
        raise _fail(f"truncated payload: {actual} of {payload_length} bytes")
    if actual > payload_length:
        raise _fail(f"{actual - payload_length} trailing bytes after the payload")
    payload = view[payload_offset:]
    if zlib.crc32(payload) != crc:
        raise _fail(f"payload CRC32 {zlib.crc32(payload):#010x} does not match {crc:#010x}")
    # Every entry is at least one byte of the decompressed stream, and deflate's expansion is
    # bounded: a count beyond both is a lie, refused before any of it is allocated.
    if entry_count > payload_length * _MAX_INFLATE_RATIO:
        raise _fail(f"entry_count {entry_count} cannot fit in a {payload_length}-byte payload")
    raw = _inflate(payload, entry_count)
    entries = _parse(raw, entry_count, region_size // page_size)
    recording = Recording(
        page_size=page_size,
        region_size=region_size,
        region_id=region_id,
        created=created_ns / _NS_PER_SECOND,
        entries=array("Q"),
    )
    # The entries were range-checked while parsing; skipping the constructor's second pass
    # keeps a decode of a large recording to one walk over it.
    object.__setattr__(recording, "entries", entries)
    return recording


def _inflate(payload: memoryview, entry_count: int) -> bytes:
    limit = entry_count * MAX_VARINT_BYTES
    inflater = zlib.decompressobj()
    try:
        # One byte over the limit: output that reaches it proves the stream is too long, and
        # output short of it means all the input was consumed (zlib stops only when one runs out).
        raw = inflater.decompress(payload, limit + 1)
    except zlib.error as exc:
        raise _fail(f"payload is not a zlib stream ({exc})") from None
    if len(raw) > limit:
        raise _fail(f"payload inflates past {limit} bytes, the most {entry_count} entries can take")
    if not inflater.eof:
        raise _fail("truncated payload: the zlib stream does not end")
    if inflater.unused_data:
        raise _fail(f"{len(inflater.unused_data)} bytes after the end of the zlib stream")
    return raw


def _parse(raw: bytes, entry_count: int, page_count: int) -> array[int]:
    if len(raw) < entry_count:
        raise _fail(f"entry_count {entry_count} but the payload inflates to {len(raw)} bytes")
    entries: array[int] = array("Q")
    append = entries.append
    previous = 0
    position = 0
    end = len(raw)
    while position < end:
        start = position
        byte = raw[position]
        position += 1
        value = byte
        if byte >= 0x80:
            value = byte & 0x7F
            shift = 7
            while True:
                if position == end:
                    raise _fail(f"entry {len(entries)}: varint cut off at the end of the payload")
                byte = raw[position]
                position += 1
                value |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
                if shift >= 7 * MAX_VARINT_BYTES:
                    raise _fail(f"entry {len(entries)}: varint at {start} is over 10 bytes")
            if byte == 0:
                raise _fail(f"entry {len(entries)}: varint at {start} is not in its shortest form")
            if value >= _U64_LIMIT:
                raise _fail(f"entry {len(entries)}: varint at {start} is over 64 bits")
        zigzag = value >> 1
        page = previous + ((zigzag >> 1) if not zigzag & 1 else ~(zigzag >> 1))
        if not 0 <= page < page_count:
            raise _fail(
                f"entry {len(entries)}: page index {page} is outside the region"
                f" ({page_count} pages)"
            )
        append(page << 1 | (value & 1))
        previous = page
    if len(entries) != entry_count:
        raise _fail(f"entry_count {entry_count} but the payload holds {len(entries)} entries")
    return entries


# --- Files ---------------------------------------------------------------------------------


def write_file(path: str | os.PathLike[str], recording: Recording) -> None:
    """Write ``recording`` to ``path`` (mode 0600) so that a crash leaves either the old file or
    the new one, never a torn one: a temporary file in the same directory is written, fsynced and
    renamed over ``path``, and the directory is fsynced so that the rename itself is durable."""
    data = encode(recording)
    target = os.fspath(path)
    directory = os.path.dirname(target) or "."
    fd, temporary = tempfile.mkstemp(
        dir=directory, prefix=f".{os.path.basename(target)}.", suffix=".tmp"
    )
    try:
        # mkstemp's 0600 is further narrowed by the umask; the file's mode is part of the contract.
        os.fchmod(fd, 0o600)
        with open(fd, "wb", closefd=False) as stream:
            stream.write(data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temporary, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


def read_file(path: str | os.PathLike[str]) -> Recording:
    """Read and decode the recording at ``path``. A malformed file raises
    :class:`RecordingFormatError` whose message starts with the path."""
    with open(path, "rb") as stream:
        data = stream.read()
    try:
        return decode(data)
    except RecordingFormatError as exc:
        raise RecordingFormatError(f"{os.fspath(path)}: {exc}") from None


# --- Merging -------------------------------------------------------------------------------


def merge(recordings: Sequence[Recording]) -> Recording:
    """The working set several recordings agree on, one entry per page.

    A page is kept if every recording faulted it. Pages are ordered by their average position,
    a position being the page's index in that recording's :meth:`Recording.pages` divided by
    that list's length, so that a long run and a short one weigh the same; ties go to the lower
    page index. A page is a WRITE if any recording wrote it. The result takes the first
    recording's region_id and the current time as ``created``.

    Raises :class:`ValueError` for no recordings and :class:`RecordingFormatError` (also a
    ValueError) when they do not share page_size and region_size.
    """
    if not recordings:
        raise ValueError("merge needs at least one recording")
    first = recordings[0]
    for number, other in enumerate(recordings[1:], start=1):
        if (other.page_size, other.region_size) != (first.page_size, first.region_size):
            raise RecordingFormatError(
                f"cannot merge recordings of different regions: recording {number} has page_size"
                f" {other.page_size} and region_size {other.region_size}, recording 0 has"
                f" {first.page_size} and {first.region_size}"
            )
    orders = [recording.pages() for recording in recordings]
    common = set(orders[0]).intersection(*orders[1:])
    # Positions are compared as exact fractions over a common denominator: in floating point two
    # equal averages can differ in the last bit and the tie would not go to the page index.
    scale = math.lcm(*(len(order) for order in orders)) if common else 0
    weight: dict[int, int] = dict.fromkeys(common, 0)
    for order in orders if common else ():
        step = scale // len(order)
        for position, page in enumerate(order):
            if page in weight:
                weight[page] += position * step
    written: set[int] = set()
    for recording in recordings:
        written.update(recording.written_pages())
    ranked = sorted(common, key=lambda page: (weight[page], page))
    return Recording(
        page_size=first.page_size,
        region_size=first.region_size,
        region_id=first.region_id,
        created=time.time(),
        entries=array("Q", (page << 1 | (page in written) for page in ranked)),
    )

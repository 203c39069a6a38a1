"""Working-set recordings: the recorder, the file format of docs/recording.md (built here by hand
from the document, not from the module's own structs), every way decode refuses a file, merge,
and the atomic file writes."""

from __future__ import annotations

import os
import random
import stat
import struct
import zlib
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shmfault import recording
from shmfault.errors import RecordingFormatError, ShmfaultError
from shmfault.recording import (
    FORMAT_VERSION,
    Access,
    Recorder,
    Recording,
    decode,
    encode,
    merge,
    read_file,
    write_file,
)

PAGE = 4096
LARGE = 262_144
REGION_ID = "r3f9c0a1b2d4e"
CREATED = 1_700_000_000.5


def _recording(
    faults: Iterable[tuple[int, bool]],
    *,
    pages: int = LARGE,
    page_size: int = PAGE,
    region_id: str = REGION_ID,
) -> Recording:
    recorder = Recorder(page_size=page_size, region_size=pages * page_size, region_id=region_id)
    for page, write in faults:
        recorder.record(page, write)
    return recorder.finish()


def _reads(pages: Iterable[int]) -> Iterator[tuple[int, bool]]:
    return ((page, False) for page in pages)


@pytest.fixture(scope="module")
def sequential() -> Recording:
    return _recording(_reads(range(LARGE)))


@pytest.fixture(scope="module")
def scattered() -> Recording:
    """Every page once, in a random order, a third of them written."""
    rng = random.Random(8)
    order = rng.sample(range(LARGE), LARGE)
    return _recording((page, rng.random() < 0.3) for page in order)


# --- Building files by hand, from docs/recording.md ---------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _stream(faults: Iterable[tuple[int, bool]]) -> bytes:
    out = bytearray()
    previous = 0
    for page, write in faults:
        delta = page - previous
        previous = page
        zigzag = delta * 2 if delta >= 0 else -delta * 2 - 1
        out += _varint(zigzag * 2 + write)
    return bytes(out)


def _file(
    raw: bytes = b"",
    *,
    entry_count: int | None = None,
    magic: bytes = b"SHMFREC\x00",
    version: int = 1,
    flags: int = 0,
    page_size: int = PAGE,
    region_size: int = 16 * PAGE,
    created_ns: int = 1_700_000_000_500_000_000,
    region_id: bytes = REGION_ID.encode(),
    id_length: int | None = None,
    payload: bytes | None = None,
    crc: int | None = None,
    payload_length: int | None = None,
) -> bytes:
    """A recording file as the document lays it out; each field can be made wrong on its own."""
    if payload is None:
        payload = zlib.compress(raw)
    if entry_count is None:
        entry_count = _count_varints(raw)
    head = struct.pack(
        "<8sHHIQQQH",
        magic,
        version,
        flags,
        page_size,
        region_size,
        entry_count,
        created_ns,
        len(region_id) if id_length is None else id_length,
    )
    tail = struct.pack(
        "<IQ",
        zlib.crc32(payload) if crc is None else crc,
        len(payload) if payload_length is None else payload_length,
    )
    return head + region_id + tail + payload


def _count_varints(raw: bytes) -> int:
    return sum(1 for byte in raw if byte < 0x80)


# --- The recorder --------------------------------------------------------------------------------


def test_recorder_keeps_every_fault_in_order_with_duplicates() -> None:
    faults = [(3, False), (4, False), (3, True), (3, False), (0, True)]
    recorder = Recorder(page_size=PAGE, region_size=16 * PAGE, region_id=REGION_ID)
    for page, write in faults:
        recorder.record(page, write)
    assert len(recorder) == 5
    result = recorder.finish()
    assert len(result) == 5
    assert list(result.entries) == [6, 8, 7, 6, 1]
    assert list(result.accesses()) == [
        (3, Access.READ),
        (4, Access.READ),
        (3, Access.WRITE),
        (3, Access.READ),
        (0, Access.WRITE),
    ]
    assert (result.page_size, result.region_size, result.region_id) == (PAGE, 16 * PAGE, REGION_ID)


def test_pages_are_unique_in_first_seen_order() -> None:
    result = _recording(_reads([7, 2, 7, 9, 2, 2, 0, 9, 7]), pages=16)
    assert result.pages() == [7, 2, 9, 0]


def test_finish_is_a_snapshot_and_the_recorder_keeps_recording() -> None:
    recorder = Recorder(page_size=PAGE, region_size=16 * PAGE, region_id=REGION_ID)
    recorder.record(1, False)
    first = recorder.finish()
    recorder.record(2, True)
    second = recorder.finish()
    assert first.pages() == [1]
    assert second.pages() == [1, 2]
    assert first.created == second.created
    assert len(recorder) == 2


def test_record_refuses_a_page_outside_the_region() -> None:
    recorder = Recorder(page_size=PAGE, region_size=16 * PAGE, region_id=REGION_ID)
    with pytest.raises(ValueError, match="page index 16 is outside the region"):
        recorder.record(16, False)
    with pytest.raises(ValueError, match="page index -1"):
        recorder.record(-1, False)
    assert len(recorder) == 0


@pytest.mark.parametrize(
    ("page_size", "region_size", "region_id", "message"),
    [
        (2048, 4096, "r", "page_size 2048"),
        (6144, 6144, "r", "page_size 6144"),
        (1 << 32, 1 << 32, "r", "page_size"),
        (PAGE, 0, "r", "region_size 0"),
        (PAGE, PAGE + 1, "r", "region_size 4097"),
        (PAGE, 1 << 64, "r", "region_size"),
        (PAGE, PAGE, "x" * 256, "region_id is 256 bytes"),
        (PAGE, PAGE, "é" * 128, "region_id is 256 bytes"),
        (PAGE, PAGE, "\udc80", "cannot be encoded as UTF-8"),
    ],
)
def test_geometry_is_checked_up_front(
    page_size: int, region_size: int, region_id: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Recorder(page_size=page_size, region_size=region_size, region_id=region_id)


def test_recording_copies_its_entries_and_checks_them() -> None:
    source = [2, 5]
    result = Recording(PAGE, 4 * PAGE, REGION_ID, CREATED, source)  # type: ignore[arg-type]
    source.append(9)
    assert isinstance(result.entries, array) and result.entries.typecode == "Q"
    assert list(result.entries) == [2, 5]
    with pytest.raises(ValueError, match="page index 4 of an entry is outside"):
        Recording(PAGE, 4 * PAGE, REGION_ID, CREATED, array("Q", [8]))
    with pytest.raises(ValueError, match="created"):
        Recording(PAGE, 4 * PAGE, REGION_ID, float("nan"), array("Q"))
    with pytest.raises(ValueError, match="created"):
        Recording(PAGE, 4 * PAGE, REGION_ID, -1.0, array("Q"))


def test_recording_is_hashable_and_its_repr_stays_short(sequential: Recording) -> None:
    copy = Recording(
        sequential.page_size,
        sequential.region_size,
        sequential.region_id,
        sequential.created,
        sequential.entries,
    )
    assert copy == sequential and hash(copy) == hash(sequential)
    assert len(repr(sequential)) < 200 and "entries=<262144>" in repr(sequential)


def test_entries_are_packed_eight_bytes_each(sequential: Recording) -> None:
    assert sequential.entries.itemsize == 8
    assert len(sequential.entries) == LARGE


# --- Round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "faults",
    [
        [],
        [(0, False)],
        [(15, True)],
        [(page, False) for page in range(16)],
        [(page, page % 3 == 0) for page in reversed(range(16))],
        [(5, False), (5, True), (5, False), (0, False), (15, True), (0, True)],
    ],
    ids=["empty", "first-page", "last-page-written", "sequential", "descending", "duplicates"],
)
def test_round_trip(faults: list[tuple[int, bool]]) -> None:
    original = _recording(faults, pages=16)
    decoded = decode(encode(original))
    assert decoded == original
    assert list(decoded.accesses()) == [(page, Access(write)) for page, write in faults]


def test_round_trip_random_with_writes_and_repeats() -> None:
    rng = random.Random(3)
    faults = [(rng.randrange(1000), rng.random() < 0.5) for _ in range(20_000)]
    original = _recording(faults, pages=1000)
    assert decode(encode(original)) == original


def test_round_trip_large(sequential: Recording, scattered: Recording) -> None:
    for original in (sequential, scattered):
        decoded = decode(encode(original))
        assert decoded == original
        assert decoded.pages() == original.pages()


def test_round_trip_keeps_created_exactly() -> None:
    for created in (CREATED, 1_712_345_678.123456, 1e9 + 1e-6):
        original = Recording(PAGE, PAGE, "", created, array("Q", [1]))
        assert decode(encode(original)).created == created


def test_round_trip_extreme_geometry() -> None:
    page_size = 1 << 31
    region_size = (1 << 64) - page_size
    last = region_size // page_size - 1
    original = Recording(
        page_size, region_size, "é" * 127, CREATED, array("Q", [last << 1 | 1, 0, last << 1])
    )
    assert decode(encode(original)) == original


def test_round_trip_property() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    # Times from 2001 on: there a float's resolution is coarser than the file's nanoseconds, so
    # the float survives the trip exactly.
    @hypothesis.settings(max_examples=200, deadline=None)
    @hypothesis.given(
        page_shift=st.integers(12, 31),
        page_count=st.integers(1, 1 << 32),
        region_id=st.text(max_size=63),  # at most 4 bytes a character: never over 255
        created_ns=st.integers(10**18, (1 << 64) - 1),
        data=st.data(),
    )
    def check(page_shift: int, page_count: int, region_id: str, created_ns: int, data: Any) -> None:
        page_index = st.integers(0, page_count - 1)
        faults = data.draw(st.lists(st.tuples(page_index, st.booleans()), max_size=200))
        original = Recording(
            1 << page_shift,
            page_count << page_shift,
            region_id,
            created_ns / 1e9,
            array("Q", (page << 1 | write for page, write in faults)),
        )
        decoded = decode(encode(original))
        assert decoded == original
        assert list(decoded.accesses()) == [(page, Access(write)) for page, write in faults]

    check()


# --- The layout, as the document gives it --------------------------------------------------------


def test_worked_example_from_the_document() -> None:
    """The example in docs/recording.md, byte for byte (the payload is compared uncompressed:
    the compressed bytes depend on the zlib build)."""
    faults = [(3, False), (4, False), (5, True), (3, False), (0, True)]
    original = Recording(
        PAGE,
        16 * PAGE,
        REGION_ID,
        CREATED,
        array("Q", (page << 1 | write for page, write in faults)),
    )
    data = encode(original)
    header = bytes.fromhex(
        "53484d4652454300 0100 0000 00100000 0000010000000000 0500000000000000"
        " 0065f753fe9c9717 0d00 72336639633061316232643465"
    )
    assert data[: len(header)] == header
    crc, length = struct.unpack_from("<IQ", data, len(header))
    payload = data[len(header) + 12 :]
    assert length == len(payload) and crc == zlib.crc32(payload)
    assert zlib.decompress(payload) == bytes.fromhex("0c 04 05 06 0b")
    assert data == _file(bytes.fromhex("0c 04 05 06 0b"), payload=payload)


def test_header_fields_sit_where_the_document_says(scattered: Recording) -> None:
    data = encode(scattered)
    magic, version, flags, page_size, region_size, count, created_ns, id_length = (
        struct.unpack_from("<8sHHIQQQH", data)
    )
    assert (magic, version, flags) == (b"SHMFREC\x00", FORMAT_VERSION, 0)
    assert (page_size, region_size, count) == (PAGE, LARGE * PAGE, LARGE)
    assert created_ns / 1e9 == scattered.created
    assert data[42 : 42 + id_length].decode() == REGION_ID
    crc, length = struct.unpack_from("<IQ", data, 42 + id_length)
    payload = data[54 + id_length :]
    assert len(payload) == length and zlib.crc32(payload) == crc
    assert zlib.decompress(payload) == _stream(
        (entry >> 1, bool(entry & 1)) for entry in scattered.entries
    )


# --- Compactness (sizes, not timings) ------------------------------------------------------------


def test_sequential_trace_is_one_varint_byte_per_page_and_under_one_byte_compressed(
    sequential: Recording,
) -> None:
    data = encode(sequential)
    id_length = len(REGION_ID)
    raw = zlib.decompress(data[54 + id_length :])
    # The first entry is page 0 (delta 0); every other one is delta 1: the single byte 0x04.
    assert raw == b"\x00" + b"\x04" * (LARGE - 1)
    assert len(data) < LARGE  # under 1 byte per page, header included
    assert len(data) < LARGE / 100  # in fact a run compresses to almost nothing


def test_random_trace_is_under_five_bytes_per_page(scattered: Recording) -> None:
    data = encode(scattered)
    # A delta within +-2**18 pages zigzags to 19 bits, 20 with the write bit: at most 3 bytes.
    raw = zlib.decompress(data[54 + len(REGION_ID) :])
    assert len(raw) <= 3 * LARGE
    assert len(data) < 5 * LARGE
    assert len(data) < 3 * LARGE


# --- Decode refuses ------------------------------------------------------------------------------

EXAMPLE_RAW = bytes.fromhex("0c 04 05 06 0b")


def test_the_hand_built_file_decodes() -> None:
    result = decode(_file(EXAMPLE_RAW))
    assert result.pages() == [3, 4, 5, 0]
    assert result.created == CREATED
    assert result.region_id == REGION_ID


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated header"),
        (b"SHMF", "truncated header"),
        (b"SHMFREC\x00\x01\x00", "truncated header"),
        (b"NOTAREC\x00" + bytes(60), "bad magic"),
        (b"\x89PNG", "bad magic"),
        (_file(EXAMPLE_RAW, magic=b"SHMFREC\x01"), "bad magic"),
        (_file(EXAMPLE_RAW, version=2), "version 2 was written by a newer shmfault"),
        (_file(EXAMPLE_RAW, version=0), "unknown format version 0"),
        (_file(EXAMPLE_RAW, flags=1), "flags 0x0001 are reserved"),
        (_file(EXAMPLE_RAW, page_size=2048), "page_size 2048"),
        (_file(EXAMPLE_RAW, page_size=PAGE + 1), "page_size 4097"),
        (_file(EXAMPLE_RAW, page_size=0), "page_size 0"),
        (_file(EXAMPLE_RAW, region_size=0), "region_size 0"),
        (_file(EXAMPLE_RAW, region_size=PAGE * 16 + 1), "region_size 65537"),
        (_file(EXAMPLE_RAW, region_id=b"x" * 256), "region_id length 256 is over 255"),
        (_file(EXAMPLE_RAW, region_id=b"\xff\xfe"), "region_id is not UTF-8"),
        (_file(EXAMPLE_RAW)[:50], "truncated header"),
        (_file(EXAMPLE_RAW, id_length=200), "truncated header"),
        (_file(EXAMPLE_RAW)[:-1], "truncated payload: 12 of 13 bytes"),
        (_file(EXAMPLE_RAW, payload_length=1 << 63), "truncated payload"),
        (_file(EXAMPLE_RAW) + b"\x00", "1 trailing bytes"),
        (_file(EXAMPLE_RAW, crc=0x12345678), "CRC32 .* does not match 0x12345678"),
    ],
    ids=[
        "empty",
        "magic-prefix",
        "short-header",
        "bad-magic",
        "other-format",
        "magic-last-byte",
        "newer-version",
        "version-0",
        "flags",
        "small-page",
        "odd-page",
        "zero-page",
        "zero-region",
        "unaligned-region",
        "long-id",
        "id-not-utf8",
        "cut-in-tail",
        "id-past-end",
        "truncated-payload",
        "huge-payload-length",
        "trailing-byte",
        "crc",
    ],
)
def test_decode_refuses_a_bad_header(data: bytes, message: str) -> None:
    with pytest.raises(RecordingFormatError, match=message):
        decode(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_file(_stream([(16, False)])), "entry 0: page index 16 is outside the region"),
        (
            _file(_stream([(3, False), (-1, False)])),
            "entry 1: page index -1 is outside the region",
        ),
        (_file(EXAMPLE_RAW, entry_count=4), "entry_count 4 but the payload holds 5 entries"),
        (_file(EXAMPLE_RAW, entry_count=6), "entry_count 6 but the payload inflates to 5"),
        (_file(EXAMPLE_RAW + bytes(10), entry_count=6), "entry_count 6 but the payload holds 15"),
        (_file(b"\x84", entry_count=1), "entry 0: varint cut off"),
        (_file(b"\x84\x00", entry_count=1), "not in its shortest form"),
        (_file(b"\xff" * 10 + b"\x01", entry_count=2), "over 10 bytes"),
        (_file(b"\xff" * 9 + b"\x02", entry_count=1), "over 64 bits"),
        (_file(payload=b"not zlib at all", entry_count=1), "not a zlib stream"),
        (_file(payload=zlib.compress(EXAMPLE_RAW)[:-3], entry_count=5), "does not end"),
        (
            _file(payload=zlib.compress(EXAMPLE_RAW) + b"junk", entry_count=5),
            "4 bytes after the end of the zlib stream",
        ),
    ],
    ids=[
        "page-past-end",
        "page-negative",
        "fewer-claimed",
        "more-claimed",
        "count-mismatch",
        "varint-cut",
        "varint-overlong-form",
        "varint-too-long",
        "varint-over-64-bits",
        "not-zlib",
        "zlib-truncated",
        "after-zlib",
    ],
)
def test_decode_refuses_a_bad_payload(data: bytes, message: str) -> None:
    with pytest.raises(RecordingFormatError, match=message):
        decode(data)


def test_hostile_entry_count_is_refused_before_anything_is_allocated() -> None:
    with pytest.raises(RecordingFormatError, match="cannot fit in a 13-byte payload"):
        decode(_file(EXAMPLE_RAW, entry_count=(1 << 64) - 1))


def test_a_payload_that_inflates_beyond_its_count_is_cut_off() -> None:
    # A megabyte of zeros compresses to about a kilobyte; with a count of 10 decompression must
    # stop at 100 bytes rather than produce the megabyte.
    bomb = zlib.compress(bytes(1 << 20), 9)
    with pytest.raises(RecordingFormatError, match="inflates past 100 bytes"):
        decode(_file(payload=bomb, entry_count=10))


def test_format_error_is_a_shmfault_error_and_a_value_error() -> None:
    with pytest.raises(RecordingFormatError) as caught:
        decode(b"junk")
    assert isinstance(caught.value, ShmfaultError)
    assert isinstance(caught.value, ValueError)


# --- Merge ---------------------------------------------------------------------------------------


def test_merge_keeps_the_intersection_in_average_order() -> None:
    a = _recording(_reads([1, 2, 3, 4]), pages=16)  # positions /4
    b = _recording(_reads([4, 2, 1, 9]), pages=16)
    merged = merge([a, b])
    # 1: (0 + 2)/4, 2: (1 + 1)/4, 4: (3 + 0)/4: pages 1 and 2 tie and go by page index.
    assert merged.pages() == [1, 2, 4]
    assert len(merged) == 3
    assert merged.region_id == a.region_id


def test_merge_weighs_recordings_of_different_lengths_equally() -> None:
    short = _recording(_reads([5, 6]), pages=16)  # 5 at 0/2, 6 at 1/2
    long = _recording(_reads([6, 0, 1, 5, 2, 3, 4, 7, 8, 9]), pages=16)  # 6 at 0/10, 5 at 3/10
    # Raw indexes would put 6 (1 + 0) before 5 (0 + 3); normalised, 5 (0.3) comes before 6 (0.5).
    assert merge([short, long]).pages() == [5, 6]
    assert merge([long, short]).pages() == [5, 6]


def test_merge_breaks_ties_by_page_index() -> None:
    a = _recording(_reads([0, 9, 8]), pages=16)
    b = _recording(_reads([8, 9, 0]), pages=16)
    # All three average 1/3.
    assert merge([a, b]).pages() == [0, 8, 9]


def test_merge_ties_are_exact_where_float_sums_would_differ() -> None:
    # Page 1 sits at 1/10 and 2/10, page 2 at 3/10 and 0/10: both average 3/20, but in floating
    # point 0.1 + 0.2 > 0.3 + 0.0 and page 2 would jump ahead.
    a = _recording(_reads([10, 1, 11, 2, 12, 13, 14, 15, 16, 17]), pages=32)
    b = _recording(_reads([2, 20, 1, 21, 22, 23, 24, 25, 26, 27]), pages=32)
    assert 0.1 + 0.2 != 0.3 + 0.0
    assert merge([a, b]).pages() == [1, 2]


def test_merge_kind_is_write_if_any_recording_wrote_the_page() -> None:
    a = _recording([(1, False), (2, False), (1, True), (3, False)], pages=16)
    b = _recording([(1, False), (2, False), (3, False)], pages=16)
    c = _recording([(3, False), (2, False), (1, False), (2, True)], pages=16)
    merged = merge([a, b, c])
    assert dict(merged.accesses()) == {1: Access.WRITE, 2: Access.WRITE, 3: Access.READ}


def test_merge_of_one_recording_is_its_pages_once_each() -> None:
    only = _recording([(4, False), (2, True), (4, True), (0, False)], pages=16)
    merged = merge([only])
    assert list(merged.accesses()) == [(4, Access.WRITE), (2, Access.WRITE), (0, Access.READ)]
    assert decode(encode(merged)) == merged


def test_merge_with_nothing_in_common_or_an_empty_recording_is_empty() -> None:
    a = _recording(_reads([1, 2]), pages=16)
    assert len(merge([a, _recording(_reads([3]), pages=16)])) == 0
    assert len(merge([a, _recording([], pages=16)])) == 0


def test_merge_refuses_no_recordings() -> None:
    with pytest.raises(ValueError, match="at least one recording"):
        merge([])


def test_merge_refuses_mismatched_page_sizes() -> None:
    small = _recording(_reads([0]), pages=512)
    huge = _recording(_reads([0]), pages=1, page_size=2 << 20)
    assert small.region_size == huge.region_size
    with pytest.raises(RecordingFormatError, match="recording 1 has page_size 2097152"):
        merge([small, huge])
    with pytest.raises(ValueError, match="different regions"):
        merge([small, huge])


def test_merge_refuses_mismatched_region_sizes() -> None:
    with pytest.raises(RecordingFormatError, match="region_size 131072"):
        merge([_recording(_reads([0]), pages=16), _recording(_reads([0]), pages=32)])


def test_merge_large(sequential: Recording, scattered: Recording) -> None:
    merged = merge([sequential, scattered])
    assert len(merged) == LARGE
    assert sorted(merged.pages()) == list(range(LARGE))


# --- Files ---------------------------------------------------------------------------------------


def test_write_file_round_trips_with_mode_0600_and_no_temporary_left(tmp_path: Path) -> None:
    target = tmp_path / "r3f9c0a1b2d4e.rec"
    original = _recording([(1, True), (0, False)], pages=16)
    old_umask = os.umask(0o077)
    try:
        write_file(target, original)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == [target.name]
    assert read_file(target) == original
    assert read_file(str(target)) == original


def test_write_file_mode_does_not_follow_a_permissive_umask(tmp_path: Path) -> None:
    target = tmp_path / "a.rec"
    old_umask = os.umask(0)
    try:
        write_file(target, _recording([], pages=16))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_write_file_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "a.rec"
    target.write_bytes(b"old")
    target.chmod(0o644)
    new = _recording(_reads([3]), pages=16)
    write_file(target, new)
    assert read_file(target) == new
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["a.rec"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "a.rec"
    old = _recording(_reads([1]), pages=16)
    write_file(target, old)

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(recording.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        write_file(target, _recording(_reads([2]), pages=16))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["a.rec"]
    assert read_file(target) == old


def test_write_file_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_file("here.rec", _recording([], pages=16))
    assert os.listdir(tmp_path) == ["here.rec"]


def test_read_file_names_the_path_of_a_bad_file(tmp_path: Path) -> None:
    target = tmp_path / "bad.rec"
    target.write_bytes(_file(EXAMPLE_RAW, version=7))
    with pytest.raises(RecordingFormatError, match=r"bad\.rec: .*newer shmfault"):
        read_file(target)


def test_the_latest_created_a_file_can_hold_decodes_and_encodes_again() -> None:
    latest = decode(_file(EXAMPLE_RAW, created_ns=(1 << 64) - 1))
    assert decode(encode(latest)) == latest
    assert decode(_file(EXAMPLE_RAW, created_ns=0)).created == 0.0

"""parse_events on uffd_msg records packed by hand, byte offset by byte offset, as the kernel
lays them out (fs/userfaultfd.c, include/uapi/linux/userfaultfd.h)."""

from __future__ import annotations

import struct

import pytest

from shmfault.errors import EventDecodeError
from shmfault.events import Fork, Pagefault, Remap, Remove, Unmap, parse_events

# The event byte leads, three reserved fields follow, the union starts at offset 8.
_PAGEFAULT, _FORK, _REMAP, _REMOVE, _UNMAP = 0x12, 0x13, 0x14, 0x15, 0x16
_WRITE, _WP, _MINOR = 1, 2, 4


def _record(event: int, *fields: tuple[str, int]) -> bytes:
    """A 32-byte uffd_msg: ``fields`` are (struct format, value) packed from offset 8 on."""
    record = bytearray(32)
    record[0] = event
    offset = 8
    for fmt, value in fields:
        struct.pack_into("=" + fmt, record, offset, value)
        offset += struct.calcsize(fmt)
    return bytes(record)


def pagefault(flags: int, address: int, ptid: int = 0) -> bytes:
    return _record(_PAGEFAULT, ("Q", flags), ("Q", address), ("I", ptid))


def fork(ufd: int) -> bytes:
    return _record(_FORK, ("I", ufd))


def remap(source: int, target: int, length: int) -> bytes:
    return _record(_REMAP, ("Q", source), ("Q", target), ("Q", length))


def remove(start: int, end: int) -> bytes:
    return _record(_REMOVE, ("Q", start), ("Q", end))


def unmap(start: int, end: int) -> bytes:
    return _record(_UNMAP, ("Q", start), ("Q", end))


def test_read_pagefault_on_a_missing_page() -> None:
    [event] = parse_events(pagefault(0, 0x7F00_0000_1000))
    assert event == Pagefault(address=0x7F00_0000_1000, flags=0, thread_id=0)
    assert isinstance(event, Pagefault)
    assert event.kind == "missing"
    assert not event.is_write and not event.is_write_protect and not event.is_minor


def test_write_pagefault() -> None:
    [event] = parse_events(pagefault(_WRITE, 0x2000))
    assert isinstance(event, Pagefault)
    assert event.is_write
    assert event.kind == "missing"


def test_write_protect_pagefault() -> None:
    [event] = parse_events(pagefault(_WRITE | _WP, 0x3000))
    assert isinstance(event, Pagefault)
    assert event.kind == "wp"
    assert event.is_write_protect and event.is_write and not event.is_minor


def test_minor_pagefault() -> None:
    [event] = parse_events(pagefault(_MINOR, 0x4000))
    assert isinstance(event, Pagefault)
    assert event.kind == "minor"
    assert event.is_minor and not event.is_write and not event.is_write_protect


def test_pagefault_carries_the_thread_id_and_unknown_flag_bits() -> None:
    [event] = parse_events(pagefault(_WRITE | 0x80, 0x5000, ptid=4_000_123))
    assert event == Pagefault(address=0x5000, flags=_WRITE | 0x80, thread_id=4_000_123)


def test_pagefault_keeps_an_exact_unaligned_address() -> None:
    [event] = parse_events(pagefault(0, 0xFFFF_FFFF_FFFF_F123))
    assert isinstance(event, Pagefault)
    assert event.address == 0xFFFF_FFFF_FFFF_F123


def test_fork() -> None:
    assert parse_events(fork(17)) == [Fork(uffd_fd=17)]


def test_remap() -> None:
    assert parse_events(remap(0x10000, 0x7000_0000, 0x3000)) == [
        Remap(from_address=0x10000, to_address=0x7000_0000, length=0x3000)
    ]


def test_remove() -> None:
    assert parse_events(remove(0x8000, 0xA000)) == [Remove(start=0x8000, end=0xA000)]


def test_unmap() -> None:
    assert parse_events(unmap(0x8000, 0xA000)) == [Unmap(start=0x8000, end=0xA000)]


def test_remove_and_unmap_with_equal_ranges_are_different_events() -> None:
    assert parse_events(remove(1, 2) + unmap(1, 2)) == [Remove(1, 2), Unmap(1, 2)]
    assert Remove(1, 2) != Unmap(1, 2)


def test_many_records_in_one_buffer_keep_their_order() -> None:
    data = (
        pagefault(0, 0x1000, ptid=11)
        + fork(5)
        + pagefault(_WRITE, 0x2000, ptid=12)
        + remap(0x1000, 0x9000, 0x2000)
        + remove(0x9000, 0xA000)
        + unmap(0x9000, 0xB000)
    )
    assert parse_events(data) == [
        Pagefault(0x1000, 0, 11),
        Fork(5),
        Pagefault(0x2000, _WRITE, 12),
        Remap(0x1000, 0x9000, 0x2000),
        Remove(0x9000, 0xA000),
        Unmap(0x9000, 0xB000),
    ]


def test_empty_input_is_no_events() -> None:
    assert parse_events(b"") == []


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview], ids=lambda t: t.__name__)
def test_accepts_any_bytes_like(wrap: type) -> None:
    assert parse_events(wrap(remove(0x1000, 0x2000) + fork(3))) == [Remove(0x1000, 0x2000), Fork(3)]


def test_reads_a_slice_of_a_larger_read_buffer() -> None:
    # As the caller would after read(2) into a reused buffer: only the bytes read count.
    buffer = bytearray(fork(4) + fork(9) + b"\xff" * 32)
    assert parse_events(memoryview(buffer)[:64]) == [Fork(4), Fork(9)]


def test_trailing_partial_record_raises_with_the_whole_records() -> None:
    data = pagefault(_WRITE, 0x1000) + fork(6) + remove(1, 2)[:20]
    with pytest.raises(EventDecodeError) as raised:
        parse_events(data)
    assert raised.value.events == [Pagefault(0x1000, _WRITE, 0), Fork(6)]
    assert "20 trailing bytes" in str(raised.value)


def test_lone_partial_record_raises_with_no_events() -> None:
    with pytest.raises(EventDecodeError) as raised:
        parse_events(pagefault(0, 0x1000)[:31])
    assert raised.value.events == []
    assert "31 trailing bytes" in str(raised.value)


def test_unknown_event_code_raises_with_the_others_in_order() -> None:
    data = unmap(0x1000, 0x2000) + _record(0x42, ("Q", 1)) + pagefault(0, 0x3000)
    with pytest.raises(EventDecodeError) as raised:
        parse_events(data)
    assert raised.value.events == [Unmap(0x1000, 0x2000), Pagefault(0x3000, 0, 0)]
    assert "record 1" in str(raised.value)
    assert "0x42" in str(raised.value)


def test_unknown_code_and_partial_tail_are_both_reported() -> None:
    data = _record(0x00) + remap(1, 2, 3) + b"\x12" * 7
    with pytest.raises(EventDecodeError) as raised:
        parse_events(data)
    assert raised.value.events == [Remap(1, 2, 3)]
    message = str(raised.value)
    assert "record 0: unknown event code 0x0" in message
    assert "7 trailing bytes" in message

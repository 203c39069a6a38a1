"""The VMM's message: parsing, checking and framing, without a kernel or a socket."""

from __future__ import annotations

import json

import pytest

from shmfault.firecracker import (
    GuestRegionMapping,
    MappingError,
    _ArrayScanner,
    check_mappings,
    parse_mappings,
)

PAGE = 4096


def message(*entries: dict[str, object]) -> bytes:
    return json.dumps(list(entries), separators=(",", ":")).encode()


def region(
    base: int = 0x7F00_0000_0000, size: int = PAGE, offset: int = 0, **more: object
) -> dict[str, object]:
    return {"base_host_virt_addr": base, "size": size, "offset": offset, **more}


def test_both_page_size_fields_are_bytes_and_an_old_vmm_sends_neither() -> None:
    parsed = parse_mappings(
        message(
            region(page_size=PAGE, page_size_kib=PAGE),
            region(base=0x7F00_1000_0000, page_size_kib=2 << 20),
            region(base=0x7F00_2000_0000, unknown_newer_field=1),
        )
    )
    assert parsed == [
        GuestRegionMapping(0x7F00_0000_0000, PAGE, 0, PAGE),
        GuestRegionMapping(0x7F00_1000_0000, PAGE, 0, 2 << 20),
        GuestRegionMapping(0x7F00_2000_0000, PAGE, 0, None),
    ]


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        (b"[{", "not JSON"),
        (b"\xff", "not UTF-8"),
        (b'{"a": 1}', "not an array"),
        (b"[]", "no regions"),
        (b"[1]", "regions[0]: a JSON int"),
        (message(region(), {"size": PAGE, "offset": 0}), "regions[1].base_host_virt_addr: missing"),
        (message(region(size=True)), "regions[0].size: True is not an integer"),
        (message(region(offset=-1)), "regions[0].offset: -1 is not an unsigned"),
        (message(region(offset=1 << 64)), "regions[0].offset"),
        (message(region(size=1.5)), "regions[0].size"),
        (message(region(page_size=PAGE, page_size_kib=4)), "regions[0].page_size_kib: 4 differs"),
    ],
)
def test_malformed_messages_name_what_is_wrong(payload: bytes, named: str) -> None:
    with pytest.raises(MappingError, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse_mappings(payload)


def mapping(
    base: int, size: int = PAGE, offset: int = 0, page: int | None = PAGE
) -> GuestRegionMapping:
    return GuestRegionMapping(base, size, offset, page)


@pytest.mark.parametrize(
    ("mappings", "named"),
    [
        ([mapping(PAGE, page=2 << 20)], "regions[0].page_size: .* hugetlb backing"),
        ([mapping(PAGE, size=0)], "regions[0].size: 0"),
        ([mapping(PAGE + 1)], "regions[0].base_host_virt_addr: .* not a multiple"),
        ([mapping(PAGE, size=PAGE + 1)], "regions[0].size: .* not a multiple"),
        ([mapping(PAGE, offset=100)], "regions[0].offset: .* not a multiple"),
        ([mapping((1 << 64) - PAGE)], "regions[0].size: .* overflows"),
        ([mapping(PAGE, offset=15 * PAGE, size=2 * PAGE)], "regions[0].offset: .* past the end"),
        (
            [mapping(8 * PAGE, 2 * PAGE), mapping(PAGE), mapping(9 * PAGE)],
            "regions[2].* inside regions[0]",
        ),
    ],
)
def test_unservable_mappings_name_field_and_index(
    mappings: list[GuestRegionMapping], named: str
) -> None:
    with pytest.raises(MappingError, match=named.replace("[", r"\[").replace("]", r"\]")):
        check_mappings(mappings, region_size=16 * PAGE, page_size=PAGE)


def test_servable_mappings_pass() -> None:
    check_mappings(
        [mapping(8 * PAGE, 8 * PAGE, 8 * PAGE), mapping(PAGE, 7 * PAGE, 0, None)],
        region_size=16 * PAGE,
        page_size=PAGE,
    )


def test_the_scanner_finds_the_end_of_the_array_across_pieces() -> None:
    payload = message(region(), region(base=0x7F00_1000_0000)) + b"\n"
    text = b' [{"x": "]\\"[{"}, ' + payload[1:]
    scanner = _ArrayScanner()
    ends = [scanner.feed(text[i : i + 3]) for i in range(0, len(text), 3)]
    found = [e for e in ends if e is not None]
    assert found == [len(text) - 1]
    assert bytes(scanner.data[: found[0]]).strip().endswith(b"]")
    with pytest.raises(MappingError, match="does not start with a JSON array"):
        _ArrayScanner().feed(b'  {"a": 1}')

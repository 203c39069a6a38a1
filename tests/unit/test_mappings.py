"""The /proc/PID/maps reader behind the shared-mode mapping check (docs/security.md §4.3)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shmfault import _libc
from shmfault.mappings import Mapping, mapping_mismatch, parse_maps, read_maps

PAGE = 4096
DEV = os.makedev(0, 1)
INODE = 4242


def region(start: int, end: int, offset: int, *, shared: bool = True, inode: int = INODE) -> str:
    flags = "rw-s" if shared else "rw-p"
    return f"{start:x}-{end:x} {flags} {offset:08x} 00:01 {inode} /memfd:region (deleted)"


def mismatch(text: str, base: int, length: int, region_offset: int) -> str | None:
    return mapping_mismatch(
        list(parse_maps(text)),
        base=base,
        length=length,
        region_offset=region_offset,
        dev=DEV,
        inode=INODE,
    )


def test_a_line_is_parsed_field_by_field() -> None:
    (mapping,) = parse_maps("7f00-7f10 rw-s 00002000 fd:03 12 /dev/shm/x")
    assert mapping == Mapping(0x7F00, 0x7F10, True, 0x2000, os.makedev(0xFD, 3), 12)
    (anonymous,) = parse_maps("7f00-7f10 rw-p 00000000 00:00 0 ")
    assert not anonymous.shared and anonymous.inode == 0


def test_a_line_not_in_the_kernels_format_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not a /proc/PID/maps line"):
        list(parse_maps("garbage"))


def test_one_mapping_or_several_pieces_of_it_match() -> None:
    assert mismatch(region(0x10000, 0x20000, 0x4000), 0x10000, 0x10000, 0x4000) is None
    assert mismatch(region(0x10000, 0x20000, 0), 0x14000, 0x4000, 0x4000) is None
    # Split by an mprotect: the kernel lists two lines, offsets carried on.
    split = region(0x10000, 0x14000, 0) + "\n" + region(0x14000, 0x20000, 0x4000)
    assert mismatch(split, 0x10000, 0x10000, 0) is None


@pytest.mark.parametrize(
    ("text", "base", "length", "offset", "why"),
    [
        (region(0x10000, 0x20000, 0x4000), 0x10000, 0x10000, 0, "region offset 0x4000"),
        (region(0x10000, 0x20000, 0, shared=False), 0x10000, 0x10000, 0, "private mapping"),
        (region(0x10000, 0x20000, 0, inode=7), 0x10000, 0x10000, 0, "another file"),
        (region(0x10000, 0x18000, 0), 0x10000, 0x10000, 0, "0x18000 is not mapped"),
        (region(0x14000, 0x20000, 0), 0x10000, 0x10000, 0, "0x10000 is not mapped"),
        # Two mappings side by side whose offsets do not follow on.
        (
            region(0x10000, 0x14000, 0) + "\n" + region(0x14000, 0x20000, 0),
            0x10000,
            0x10000,
            0,
            "0x14000 maps region offset 0x0, not the declared 0x4000",
        ),
        ("", 0x10000, PAGE, 0, "not mapped"),
    ],
)
def test_what_is_not_the_region_where_declared_says_where_and_why(
    text: str, base: int, length: int, offset: int, why: str
) -> None:
    reason = mismatch(text, base, length, offset)
    assert reason is not None and why in reason


def test_this_process_maps_a_memfd_where_the_kernel_says(tmp_path: Path) -> None:
    memfd = os.memfd_create("mapped", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, 8 * PAGE)
        prot = _libc.PROT_READ | _libc.PROT_WRITE
        address = _libc.mmap(0, 4 * PAGE, prot, _libc.MAP_SHARED, memfd, 2 * PAGE)
        try:
            stat = os.fstat(memfd)
            found = list(parse_maps(read_maps(os.getpid())))
            kwargs = {"base": address, "length": 4 * PAGE, "dev": stat.st_dev}
            assert (
                mapping_mismatch(found, region_offset=2 * PAGE, inode=stat.st_ino, **kwargs) is None
            )
            assert mapping_mismatch(found, region_offset=0, inode=stat.st_ino, **kwargs)
        finally:
            _libc.munmap(address, 4 * PAGE)
    finally:
        os.close(memfd)

"""What a client process has mapped where, read from ``/proc/PID/maps``: the check that a
shared-mode attachment's declared range really is the region, at the offset it says.

Without it, a client could declare a ``region_offset`` other than the one it mapped, and the
service would copy the source's bytes for one offset into the region's pages at another, for
every sharer (docs/security.md §4.3). The check runs after the client registered its range: a
mapping replaced later is no longer registered with that userfaultfd, so its faults never reach
the service and the check cannot be raced.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Mapping", "mapping_mismatch", "parse_maps", "read_maps"]


@dataclass(frozen=True, slots=True)
class Mapping:
    """One line of ``/proc/PID/maps``: ``[start, end)`` mapping file ``(dev, inode)`` from
    byte ``offset``; ``shared`` for ``MAP_SHARED``."""

    start: int
    end: int
    shared: bool
    offset: int
    dev: int
    inode: int


def parse_maps(text: str) -> Iterator[Mapping]:
    """The mappings of a ``/proc/PID/maps`` text, in address order (as the kernel lists them).
    ValueError for a line that is not in the kernel's format."""
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            raise ValueError(f"not a /proc/PID/maps line: {line!r}")
        addresses, permissions, offset, device, inode = fields[:5]
        start, _, end = addresses.partition("-")
        major, _, minor = device.partition(":")
        yield Mapping(
            start=int(start, 16),
            end=int(end, 16),
            shared=permissions[3:4] == "s",
            offset=int(offset, 16),
            dev=os.makedev(int(major, 16), int(minor, 16)),
            inode=int(inode),
        )


def read_maps(pid: int) -> str:
    """``/proc/PID/maps``. OSError where it cannot be read: the process is gone
    (FileNotFoundError, ESRCH) or the reader may not look at it (PermissionError: another uid
    and no CAP_SYS_PTRACE)."""
    with open(f"/proc/{pid}/maps", encoding="ascii") as maps:
        return maps.read()


def mapping_mismatch(
    mappings: Iterator[Mapping] | list[Mapping],
    *,
    base: int,
    length: int,
    region_offset: int,
    dev: int,
    inode: int,
) -> str | None:
    """Why ``[base, base + length)`` is not one ``MAP_SHARED`` mapping of file ``(dev, inode)``
    at ``region_offset`` (possibly split into several lines by mprotect or madvise), or None
    when it is."""
    end = base + length
    covered = base
    for mapping in mappings:
        if mapping.end <= covered:
            continue
        if mapping.start > covered or covered >= end:
            break
        where = f"{covered:#x}"
        if (mapping.dev, mapping.inode) != (dev, inode):
            return f"{where} maps another file than the region"
        if not mapping.shared:
            return f"{where} is a private mapping of the region; the mode needs MAP_SHARED"
        mapped_offset = mapping.offset + (covered - mapping.start)
        declared_offset = region_offset + (covered - base)
        if mapped_offset != declared_offset:
            return (
                f"{where} maps region offset {mapped_offset:#x}, not the declared "
                f"{declared_offset:#x}"
            )
        covered = mapping.end
    if covered < end:
        return f"{covered:#x} is not mapped"
    return None

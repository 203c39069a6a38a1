"""FaultEngine's pure parts, without a kernel: the bitmap runs, the statistics, the fault-around
window, the bookkeeping of REMOVE/UNMAP/REMAP events, the spin policy and how a large copy is
split over two threads.

The engine's constructor makes an epoll and an eventfd but starts no thread; ``stop()`` on an
engine that never started only closes those two. Attachments are built with a stand-in region
(only ``page_size`` and ``region_id`` are read by what is tested here) and no connection.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from shmfault.engine import (
    ABSENT,
    LATENCY_BOUNDS_NS,
    MAPPED,
    PARALLEL_COPY_BYTES,
    REMOVED,
    ZEROED,
    Attachment,
    AttachmentStats,
    FaultEngine,
    MappedRange,
    _runs,
    new_attachment_id,
    spin_window,
)
from shmfault.errors import UffdError, UffdPageExistsError, UffdRetryError
from shmfault.events import Remap
from shmfault.modes import Mode

PAGE = 4096


@pytest.fixture
def engine() -> Iterator[FaultEngine]:
    made = FaultEngine(fault_around_pages=4)
    yield made
    made.stop()


def attachment(
    *, base: int = 0x10_0000, pages: int = 16, region_offset: int = 0, mode: Mode = Mode.SHARED_COPY
) -> Attachment:
    region: Any = SimpleNamespace(page_size=PAGE, region_id="r000000000001")
    return Attachment(
        region=region,
        mode=mode,
        ranges=[MappedRange(base, pages * PAGE, region_offset)],
        uffd=None,
        connection=None,  # type: ignore[arg-type]
        machine=None,  # type: ignore[arg-type]
    )


# --- _runs ---


@pytest.mark.parametrize(
    ("bitmap", "first", "last", "runs"),
    [
        (b"", 0, 0, []),
        (b"\x00\x00\x00\x00", 0, 4, [(0, 4)]),
        (b"\x01\x01\x01\x01", 0, 4, []),
        (b"\x00\x01\x00\x00\x01\x00", 0, 6, [(0, 1), (2, 4), (5, 6)]),
        (b"\x01\x00\x00\x01", 0, 4, [(1, 3)]),
        # The window is [first, last): zeros outside it are not reported, runs are clipped.
        (b"\x00\x00\x00\x00\x00\x00", 2, 4, [(2, 4)]),
        (b"\x00\x01\x00\x00\x00\x00", 1, 3, [(2, 3)]),
        (b"\x00\x00\x00\x00", 2, 2, []),
    ],
)
def test_runs_are_the_zero_stretches_of_the_window(
    bitmap: bytes, first: int, last: int, runs: list[tuple[int, int]]
) -> None:
    assert list(_runs(bytearray(bitmap), first, last)) == runs


def test_runs_of_a_large_bitmap_cover_every_zero_exactly_once() -> None:
    bitmap = bytearray((i * 7919) % 3 == 0 for i in range(1000))
    covered = [i for start, end in _runs(bitmap, 0, len(bitmap)) for i in range(start, end)]
    assert covered == [i for i, bit in enumerate(bitmap) if not bit]


# --- AttachmentStats ---


def test_latency_buckets_are_upper_bounds_inclusive() -> None:
    stats = AttachmentStats()
    stats.record_latency(0)
    stats.record_latency(1000)  # exactly the first bound: first bucket
    stats.record_latency(1001)  # just over: second bucket
    stats.record_latency(LATENCY_BOUNDS_NS[-1])
    stats.record_latency(LATENCY_BOUNDS_NS[-1] + 1)  # past every bound: the overflow bucket
    assert len(stats.latency_ns) == len(LATENCY_BOUNDS_NS) + 1
    assert stats.latency_ns[0] == 2
    assert stats.latency_ns[1] == 1
    assert stats.latency_ns[len(LATENCY_BOUNDS_NS) - 1] == 1
    assert stats.latency_ns[len(LATENCY_BOUNDS_NS)] == 1
    assert sum(stats.latency_ns) == 5


def test_percentile_is_none_without_faults() -> None:
    stats = AttachmentStats()
    assert stats.percentile_ns(0.5) is None
    assert stats.percentile_ns(0.99) is None


def test_percentile_is_the_bound_of_the_bucket_holding_the_quantile() -> None:
    stats = AttachmentStats()
    for _ in range(90):
        stats.record_latency(1500)  # bucket <= 2000
    for _ in range(10):
        stats.record_latency(300_000)  # bucket <= 512000
    assert stats.percentile_ns(0.5) == 2000
    assert stats.percentile_ns(0.9) == 2000
    assert stats.percentile_ns(0.91) == 512_000
    assert stats.percentile_ns(0.99) == 512_000
    assert stats.percentile_ns(1.0) == 512_000


def test_percentile_of_the_overflow_bucket_is_the_last_bound() -> None:
    stats = AttachmentStats()
    stats.record_latency(10 * LATENCY_BOUNDS_NS[-1])
    assert stats.percentile_ns(0.5) == LATENCY_BOUNDS_NS[-1]


def test_faults_sum_the_three_kinds() -> None:
    stats = AttachmentStats(faults_missing=3, faults_minor=4, faults_wp=5)
    assert stats.faults == 12


def test_to_dict_has_every_counter_the_percentiles_and_a_sparse_histogram() -> None:
    stats = AttachmentStats(faults_missing=2, pages_filled=32, bytes_filled=32 * PAGE)
    stats.record_latency(700)
    stats.record_latency(LATENCY_BOUNDS_NS[-1] * 2)
    data = stats.to_dict()
    counters = {name for name in AttachmentStats.__slots__ if name not in ("latency_ns", "native")}  # type: ignore[attr-defined]
    assert counters <= data.keys()
    assert "latency_ns" not in data
    assert data["faults"] == 2
    assert data["pages_filled"] == 32
    assert data["bytes_filled"] == 32 * PAGE
    assert data["latency_p50_ns"] == 1000
    assert data["latency_p99_ns"] == LATENCY_BOUNDS_NS[-1]
    # Only buckets with counts; the overflow bucket has no upper bound.
    assert data["latency_histogram"] == [
        {"le_ns": 1000, "count": 1},
        {"le_ns": None, "count": 1},
    ]


def test_to_dict_without_faults() -> None:
    data = AttachmentStats().to_dict()
    assert data["faults"] == 0
    assert data["latency_p50_ns"] is None
    assert data["latency_histogram"] == []


# --- the engine's construction and the fault-around window ---


def test_fault_around_must_be_at_least_one_page() -> None:
    with pytest.raises(ValueError, match="fault_around_pages"):
        FaultEngine(fault_around_pages=0)


def test_attachment_ids_increase() -> None:
    first = new_attachment_id()
    assert new_attachment_id() > first
    assert attachment().id > first


@pytest.mark.parametrize(
    ("region_offset", "pages", "offset", "window"),
    [
        # Blocks of 4 pages, aligned in the region: the whole block when the attachment has it.
        (0, 16, 0, (0, 4)),
        (0, 16, 5 * PAGE + 123, (4, 8)),
        (0, 16, 15 * PAGE, (12, 16)),
        # Clipped to the attachment's end: a region offset of 2 pages and 7 pages attached
        # end at page 9, in the middle of the block [8, 12).
        (2 * PAGE, 7, 8 * PAGE, (8, 9)),
        # Clipped to the attachment's start: block [0, 4) starts before page 2.
        (2 * PAGE, 7, 3 * PAGE, (2, 4)),
        # An attachment smaller than one block, inside it.
        (PAGE, 2, 2 * PAGE, (1, 3)),
    ],
)
def test_window_is_the_aligned_block_clipped_to_the_attachment(
    engine: FaultEngine,
    region_offset: int,
    pages: int,
    offset: int,
    window: tuple[int, int],
) -> None:
    attached = attachment(region_offset=region_offset, pages=pages)
    start, end = engine._window(attached.ranges[0], PAGE, offset)
    assert (start, end) == (window[0] * PAGE, window[1] * PAGE)
    assert start <= offset < end
    first = attached.ranges[0]
    assert first.region_offset <= start < end <= first.region_offset + first.length


def test_window_of_one_page_fault_around_is_the_page(engine: FaultEngine) -> None:
    single = FaultEngine(fault_around_pages=1)
    try:
        assert single._window(attachment().ranges[0], PAGE, 7 * PAGE + 1) == (7 * PAGE, 8 * PAGE)
    finally:
        single.stop()


# --- the bitmap of pages mapped, kept through REMOVE/UNMAP/REMAP ---


def test_a_new_attachment_has_nothing_mapped() -> None:
    attached = attachment(pages=16)
    assert attached.ranges[0].pages == bytearray(16)


def test_forget_clears_the_pages_of_the_range_clipped_to_the_attachment(
    engine: FaultEngine,
) -> None:
    attached = attachment(base=0x10_0000, pages=8)
    attached.ranges[0].pages[:] = b"\x01" * 8
    # Starts before the attachment and ends mid-page: pages 0 and 1 are touched.
    engine._forget(attached, 0x10_0000 - 3 * PAGE, 0x10_0000 + PAGE + 1)
    assert attached.ranges[0].pages == bytearray(b"\x00\x00" + b"\x01" * 6)
    # Past the end: only the pages inside count.
    engine._forget(attached, 0x10_0000 + 7 * PAGE, 0x10_0000 + 20 * PAGE)
    assert attached.ranges[0].pages == bytearray(b"\x00\x00" + b"\x01" * 5 + b"\x00")
    # Entirely outside: nothing.
    engine._forget(attached, 0x20_0000, 0x30_0000)
    assert attached.ranges[0].pages == bytearray(b"\x00\x00" + b"\x01" * 5 + b"\x00")


def test_remap_of_the_whole_attachment_moves_it_and_keeps_its_pages(
    engine: FaultEngine,
) -> None:
    attached = attachment(base=0x10_0000, pages=8)
    attached.ranges[0].pages[:3] = b"\x01\x01\x01"
    engine._remap(attached, Remap(0x10_0000, 0x80_0000, 8 * PAGE))
    assert attached.ranges[0].base == 0x80_0000
    assert attached.contains(0x80_0000 + 7 * PAGE)
    assert not attached.contains(0x10_0000)
    assert attached.ranges[0].pages[:3] == b"\x01\x01\x01"


def test_remap_of_part_of_the_attachment_forgets_the_moved_part(engine: FaultEngine) -> None:
    attached = attachment(base=0x10_0000, pages=8)
    attached.ranges[0].pages[:] = b"\x01" * 8
    engine._remap(attached, Remap(0x10_0000 + 2 * PAGE, 0x80_0000, 3 * PAGE))
    assert attached.ranges[0].base == 0x10_0000
    assert attached.ranges[0].pages == bytearray(b"\x01\x01\x00\x00\x00\x01\x01\x01")


def test_describe_is_plain_data_for_get_stats() -> None:
    attached = attachment(base=0x10_0000, pages=4, region_offset=PAGE, mode=Mode.PRIVATE_COPY)
    attached.pid = 1234
    attached.uid = 65534
    data = attached.describe()
    assert data["attachment_id"] == attached.id
    assert data["region_id"] == "r000000000001"
    assert data["mode"] == "private-copy"
    assert (data["pid"], data["uid"]) == (1234, 65534)
    assert (data["base"], data["length"], data["region_offset"]) == (0x10_0000, 4 * PAGE, PAGE)
    assert data["ended"] is None
    assert data["end_reason"] == ""
    assert data["stats"] == AttachmentStats().to_dict()
    assert data["kind"] == "attach"
    assert data["ranges"] == [{"base": 0x10_0000, "length": 4 * PAGE, "region_offset": PAGE}]


# --- several ranges on one userfaultfd (a Firecracker VMM's guest memory) ---


def several(*, zero_after_remove: bool = False) -> Attachment:
    region: Any = SimpleNamespace(page_size=PAGE, region_id="r000000000002")
    return Attachment(
        region=region,
        mode=Mode.PRIVATE_COPY,
        # Deliberately out of order: the attachment sorts them by address.
        ranges=[
            MappedRange(0x90_0000, 4 * PAGE, 16 * PAGE),
            MappedRange(0x10_0000, 8 * PAGE, 0),
        ],
        uffd=None,
        connection=None,  # type: ignore[arg-type]
        machine=None,
        kind="firecracker",
        zero_after_remove=zero_after_remove,
    )


def test_an_address_finds_its_range_and_nothing_between_ranges() -> None:
    attached = several()
    assert [r.base for r in attached.ranges] == [0x10_0000, 0x90_0000]
    assert attached.range_of(0x10_0000 + 7 * PAGE + 5) is attached.ranges[0]
    assert attached.range_of(0x90_0000 + 3 * PAGE) is attached.ranges[1]
    assert attached.range_of(0x10_0000 + 8 * PAGE) is None
    assert attached.range_of(0x90_0000 + 4 * PAGE) is None
    assert attached.range_of(0x10_0000 - 1) is None
    assert attached.range_at_offset(17 * PAGE) is attached.ranges[1]
    assert attached.range_at_offset(8 * PAGE) is None
    assert attached.length == 12 * PAGE


def test_an_attachment_without_ranges_is_refused() -> None:
    region: Any = SimpleNamespace(page_size=PAGE, region_id="r000000000002")
    with pytest.raises(ValueError, match="at least one range"):
        Attachment(
            region=region,
            mode=Mode.PRIVATE_COPY,
            ranges=[],
            uffd=None,
            connection=None,  # type: ignore[arg-type]
            machine=None,
        )


def test_forget_spans_every_range_it_overlaps(engine: FaultEngine) -> None:
    attached = several()
    for mapped_range in attached.ranges:
        mapped_range.pages[:] = bytes([MAPPED]) * len(mapped_range.pages)
    engine._forget(attached, 0x10_0000 + 6 * PAGE, 0x90_0000 + PAGE)
    assert attached.ranges[0].pages == bytearray([MAPPED] * 6 + [ABSENT] * 2)
    assert attached.ranges[1].pages == bytearray([ABSENT] + [MAPPED] * 3)


def test_a_removed_page_is_marked_for_zeros_and_not_refilled_by_fault_around(
    engine: FaultEngine,
) -> None:
    attached = several(zero_after_remove=True)
    first = attached.ranges[0]
    first.pages[:] = bytes([MAPPED, ZEROED, ABSENT, MAPPED, ABSENT, ABSENT, MAPPED, MAPPED])
    engine._forget(attached, 0x10_0000, 0x10_0000 + 2 * PAGE, REMOVED)
    assert first.pages[:2] == bytes([REMOVED, REMOVED])
    # Fault-around fills only what never came from the engine: removed pages read zeros
    # when they fault themselves, never the region's bytes.
    assert list(_runs(first.pages, 0, 8)) == [(2, 3), (4, 6)]


def test_remap_of_a_whole_range_moves_that_range_only(engine: FaultEngine) -> None:
    attached = several()
    engine._remap(attached, Remap(0x90_0000, 0x05_0000, 4 * PAGE))
    assert [r.base for r in attached.ranges] == [0x05_0000, 0x10_0000]
    assert attached.range_of(0x05_0000 + PAGE) is not None
    assert attached.range_of(0x90_0000) is None


def test_replay_pending_counts_what_is_left() -> None:
    attached = attachment(pages=16)
    assert attached.replay_pending == 0
    attached.replay = [3, 1, 2]
    attached.replay_next = 1
    assert attached.replay_pending == 2
    assert attached.describe()["replay_pending"] == 2


# --- adaptive fault-around ---


def test_sequential_faults_grow_the_window_and_a_random_one_resets_it() -> None:
    adaptive = FaultEngine(fault_around_pages=4, fault_around_max_pages=32)
    try:
        first = attachment(pages=256).ranges[0]
        assert adaptive._adaptive_window(first, PAGE, 0) == (0, 4 * PAGE)
        # Each fault where the last window ended doubles it, from the fault on.
        assert adaptive._adaptive_window(first, PAGE, 4 * PAGE) == (4 * PAGE, 12 * PAGE)
        assert adaptive._adaptive_window(first, PAGE, 12 * PAGE) == (12 * PAGE, 28 * PAGE)
        assert adaptive._adaptive_window(first, PAGE, 28 * PAGE) == (28 * PAGE, 60 * PAGE)
        assert adaptive._adaptive_window(first, PAGE, 60 * PAGE) == (60 * PAGE, 92 * PAGE)
        # Anywhere else: the aligned block again, and growth starts over.
        assert adaptive._adaptive_window(first, PAGE, 201 * PAGE) == (200 * PAGE, 204 * PAGE)
        assert adaptive._adaptive_window(first, PAGE, 204 * PAGE) == (204 * PAGE, 212 * PAGE)
        # Clipped to the range.
        assert adaptive._adaptive_window(first, PAGE, 212 * PAGE) == (212 * PAGE, 228 * PAGE)
        assert adaptive._adaptive_window(first, PAGE, 228 * PAGE) == (228 * PAGE, 256 * PAGE)
    finally:
        adaptive.stop()


def test_without_a_larger_maximum_every_fault_gets_the_block(engine: FaultEngine) -> None:
    first = attachment(pages=64).ranges[0]
    assert engine._adaptive_window(first, PAGE, 0) == (0, 4 * PAGE)
    assert engine._adaptive_window(first, PAGE, 4 * PAGE) == (4 * PAGE, 8 * PAGE)


def test_huge_pages_keep_the_block_however_sequential() -> None:
    adaptive = FaultEngine(fault_around_pages=4, fault_around_max_pages=32)
    huge = 2 * 1024 * 1024
    try:
        first = attachment(pages=64 * huge // PAGE).ranges[0]
        assert adaptive._adaptive_window(first, huge, 0) == (0, 4 * huge)
        assert adaptive._adaptive_window(first, huge, 4 * huge) == (4 * huge, 8 * huge)
    finally:
        adaptive.stop()


def test_a_maximum_below_the_block_is_refused() -> None:
    with pytest.raises(ValueError, match="below"):
        FaultEngine(fault_around_pages=16, fault_around_max_pages=8)


# --- the spin policy ---


def test_the_spin_window_is_whole_after_a_gap_it_would_have_caught_and_a_probe_after_a_longer() -> (
    None
):
    assert spin_window(0, 200_000) == 200_000
    assert spin_window(200_000, 200_000) == 200_000
    assert spin_window(200_001, 200_000) == 200_000 // 16
    assert spin_window(10**9, 200_000) == 12_500
    assert spin_window(5, 0) == 0


# --- large copies in two halves ---


class _HalvesUffd:
    """Records each UFFDIO_COPY (from whichever thread); fails the ones starting at ``fail_at``
    with ``error``."""

    def __init__(self, fail_at: int = -1, error: UffdError | None = None) -> None:
        self.copies: list[tuple[int, int, int]] = []
        self.fail_at = fail_at
        self.error = error

    def copy(
        self, destination: int, source: int, length: int, *, arg: bytearray | None = None
    ) -> int:
        self.copies.append((destination, source, length))
        if destination == self.fail_at and self.error is not None:
            raise self.error
        return length


def test_a_large_copy_is_split_in_two_page_aligned_halves(engine: FaultEngine) -> None:
    if engine._copier is None:
        pytest.skip("one CPU: large copies are not split")
    fake = _HalvesUffd()
    length = PARALLEL_COPY_BYTES + 3 * PAGE
    engine._copy(fake, 0x10_0000, 0x90_0000, length, PAGE)  # type: ignore[arg-type]
    half = length // 2 - (length // 2) % PAGE
    assert sorted(fake.copies) == [
        (0x10_0000, 0x90_0000, half),
        (0x10_0000 + half, 0x90_0000 + half, length - half),
    ]
    small = _HalvesUffd()
    engine._copy(small, 0x10_0000, 0x90_0000, PARALLEL_COPY_BYTES - PAGE, PAGE)  # type: ignore[arg-type]
    assert len(small.copies) == 1
    # One huge page cannot be split.
    huge = _HalvesUffd()
    engine._copy(huge, 0x20_0000, 0x40_0000, 2 << 20, 2 << 20)  # type: ignore[arg-type]
    assert huge.copies == [(0x20_0000, 0x40_0000, 2 << 20)]


def test_a_second_half_that_stops_is_a_partial_copy_of_the_whole(engine: FaultEngine) -> None:
    if engine._copier is None:
        pytest.skip("one CPU: large copies are not split")
    length = 2 * PARALLEL_COPY_BYTES
    half = length // 2
    exists = UffdPageExistsError(errno.EEXIST, "UFFDIO_COPY", 0, 0, done=0)
    fake = _HalvesUffd(fail_at=0x10_0000 + half, error=exists)
    with pytest.raises(UffdRetryError) as caught:
        engine._copy(fake, 0x10_0000, 0x90_0000, length, PAGE)  # type: ignore[arg-type]
    assert caught.value.done == half
    # A first half that stops is the error, as is: its done counts from the start.
    partial = UffdRetryError(errno.EAGAIN, "UFFDIO_COPY", 0, 0, done=2 * PAGE)
    fake = _HalvesUffd(fail_at=0x10_0000, error=partial)
    with pytest.raises(UffdRetryError) as caught:
        engine._copy(fake, 0x10_0000, 0x90_0000, length, PAGE)  # type: ignore[arg-type]
    assert caught.value.done == 2 * PAGE
    assert len(fake.copies) == 2  # the second half ran, and was waited for

"""RegionStore and RegionBacking: lifecycle, sources, limits, persistence. No gRPC here."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import posix_ipc
import pytest

from shmfault import memory
from shmfault.errors import (
    AlreadyExistsError,
    HugePagesUnavailableError,
    InvalidArgumentError,
    PermissionDeniedError,
    QuotaExceededError,
    RegionBusyError,
    RegionNotFoundError,
    SourceUnavailableError,
)
from shmfault.memory import BackingKind
from shmfault.store import (
    MAX_UNUSED_TOKENS,
    AttachOptions,
    FillPolicy,
    Limits,
    RegionStore,
    Source,
    SourceKind,
)
from tests.conftest import no_free_huge_pages

pytestmark = pytest.mark.timeout(30)

PAGE = os.sysconf("SC_PAGE_SIZE")
GiB = 1 << 30


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def store(state_dir: Path, shm_prefix: str) -> Iterator[RegionStore]:
    opened = RegionStore(state_dir, handoff_socket="/run/x/handoff.sock", shm_prefix=shm_prefix)
    yield opened
    opened.close()


@pytest.fixture
def snapshot_file(tmp_path: Path) -> Path:
    """Four pages, each filled with its own byte (page i holds byte i + 1)."""
    path = tmp_path / "snapshot.bin"
    path.write_bytes(b"".join(bytes([i + 1]) * PAGE for i in range(4)))
    return path


def rows(state_dir: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(state_dir / "regions.sqlite3") as db:
        return db.execute("SELECT id, state FROM regions ORDER BY id").fetchall()


def test_create_get_list_delete(store: RegionStore, state_dir: Path) -> None:
    region = store.create(2 * PAGE, name="alpha", labels={"team": "vm"})
    assert region.id.startswith("r")
    assert len(region.id) == 13
    assert region.page_size == PAGE
    assert region.backing is BackingKind.MEMFD
    assert region.source.kind is SourceKind.ZERO
    assert region.fill_policy is FillPolicy.LAZY
    assert region.handoff_socket == "/run/x/handoff.sock"
    assert region.attach_token
    assert store.get(region.id) == store.get("alpha")
    assert store.get("alpha").attach_token == ""
    assert [r.id for r in store.list()[0]] == [region.id]
    assert rows(state_dir) == [(region.id, "ready")]
    store.delete("alpha")
    with pytest.raises(RegionNotFoundError, match="alpha"):
        store.get("alpha")
    assert rows(state_dir) == []
    assert store.reserved_bytes == 0


@pytest.mark.parametrize(
    ("size", "message"),
    [(0, "not positive"), (PAGE + 1, "not a multiple"), (-PAGE, "not positive")],
)
def test_bad_sizes_are_refused(store: RegionStore, size: int, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message) as info:
        store.create(size)
    assert info.value.field == "size"
    assert str(size) in str(info.value)


def test_limits_refuse_before_allocating(state_dir: Path, shm_prefix: str) -> None:
    limits = Limits(max_region_bytes=4 * PAGE, max_total_bytes=6 * PAGE, max_regions=2)
    store = RegionStore(state_dir, limits=limits, shm_prefix=shm_prefix)
    try:
        with pytest.raises(QuotaExceededError, match=f"max_region_bytes {4 * PAGE}"):
            store.create(8 * PAGE)
        store.create(4 * PAGE)
        with pytest.raises(QuotaExceededError, match="max_total_bytes"):
            store.create(4 * PAGE, backing=BackingKind.POSIX_SHM)
        store.create(PAGE)
        with pytest.raises(QuotaExceededError, match="max_regions is 2"):
            store.create(PAGE)
        assert store.reserved_bytes == 5 * PAGE
        assert len(rows(state_dir)) == 2
        assert not [e for e in os.listdir("/dev/shm") if e.startswith(shm_prefix)]
    finally:
        store.close()


def test_limits_per_uid_count_each_owner_apart_and_survive_a_restart(
    state_dir: Path, shm_prefix: str
) -> None:
    limits = Limits(max_regions_per_uid=2, max_bytes_per_uid=3 * PAGE)
    store = RegionStore(state_dir, limits=limits, shm_prefix=shm_prefix)
    try:
        first = store.create(PAGE, owner_uid=1000)
        assert first.owner_uid == 1000
        with pytest.raises(QuotaExceededError, match="max_bytes_per_uid"):
            store.create(3 * PAGE, owner_uid=1000)
        store.create(PAGE, owner_uid=1000, backing=BackingKind.POSIX_SHM)
        with pytest.raises(QuotaExceededError, match="uid 1000 hold 2 regions"):
            store.create(PAGE, owner_uid=1000)
        # Another owner, anonymous callers and exempt callers each have their own room.
        store.create(PAGE, owner_uid=1001)
        store.create(PAGE)
        store.create(PAGE)
        with pytest.raises(QuotaExceededError, match="anonymous callers hold 2 regions"):
            store.create(PAGE)
        for _ in range(3):
            store.create(PAGE, owner_uid=0, per_uid_limits=False)
        # Deleting gives the room back.
        store.delete(first.id)
        store.create(PAGE, owner_uid=1000)
    finally:
        store.close()
    reopened = RegionStore(state_dir, limits=limits, shm_prefix=shm_prefix)
    try:
        owners = sorted(-1 if r.owner_uid is None else r.owner_uid for r in reopened.list()[0])
        assert owners == [-1, -1, 0, 0, 0, 1000, 1000, 1001]
        with pytest.raises(QuotaExceededError, match="uid 1000 hold 2 regions"):
            reopened.create(PAGE, owner_uid=1000)
    finally:
        reopened.close()


def test_a_database_from_before_owners_opens_with_unowned_regions(
    state_dir: Path, shm_prefix: str
) -> None:
    with sqlite3.connect(state_dir / "regions.sqlite3") as db:
        db.execute(
            "CREATE TABLE regions (id TEXT PRIMARY KEY, name TEXT UNIQUE, size INTEGER NOT NULL,"
            " page_size INTEGER NOT NULL, backing TEXT NOT NULL, shm_name TEXT NOT NULL,"
            " source_kind TEXT NOT NULL, source_path TEXT NOT NULL, source_offset INTEGER NOT"
            " NULL, source_region TEXT NOT NULL, fill_policy TEXT NOT NULL, labels TEXT NOT"
            " NULL, created REAL NOT NULL, state TEXT NOT NULL)"
        )
        db.execute(
            "INSERT INTO regions VALUES ('r00000000000a', NULL, ?, ?, 'memfd', '', 'zero', '',"
            " 0, '', 'lazy', '{}', 1.0, 'ready')",
            (4 * PAGE, PAGE),
        )
        db.execute("PRAGMA user_version = 1")
    store = RegionStore(state_dir, shm_prefix=shm_prefix)
    try:
        region = store.get("r00000000000a")
        assert region.owner_uid is None and region.size == 4 * PAGE
        assert store.create(PAGE, owner_uid=7).owner_uid == 7
    finally:
        store.close()


def test_sparse_64_gib_region_costs_nothing(store: RegionStore) -> None:
    region = store.create(64 * GiB)
    assert region.allocated_bytes == 0
    data = store.data(region.id)
    assert os.fstat(data.backing.fileno()).st_blocks == 0
    assert data.read(64 * GiB - PAGE, PAGE) == bytes(PAGE)
    assert store.get(region.id).allocated_bytes == 0


@pytest.mark.parametrize(
    "name", ["a/b", "..", "a..b", ".", "nul\0x", "x" * 129, "r0123456789ab", "sp ace", "é"]
)
def test_bad_names_are_refused(store: RegionStore, name: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        store.create(PAGE, name=name)
    assert info.value.field == "name"


def test_names_are_unique(store: RegionStore) -> None:
    first = store.create(PAGE, name="only")
    with pytest.raises(AlreadyExistsError, match=first.id):
        store.create(PAGE, name="only")


@pytest.mark.parametrize("labels", [{"": "x"}, {"-k": "v"}, {"k": "\0"}, {"k": "v" * 257}])
def test_bad_labels_are_refused(store: RegionStore, labels: dict[str, str]) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        store.create(PAGE, labels=labels)
    assert info.value.field == "labels"


def test_list_filters_by_label_and_paginates(store: RegionStore) -> None:
    made = [store.create(PAGE, labels={"n": str(i % 2), "all": "yes"}).id for i in range(7)]
    page, token = store.list({"all": "yes"}, page_size=3)
    seen = [r.id for r in page]
    while token:
        page, token = store.list({"all": "yes"}, page_size=3, page_token=token)
        seen += [r.id for r in page]
    assert seen == sorted(made)
    evens, token = store.list({"n": "0"})
    assert token == ""
    assert sorted(r.id for r in evens) == sorted(made[0::2])
    assert store.list({"n": "2"}) == ([], "")
    with pytest.raises(InvalidArgumentError, match="page_token"):
        store.list(page_token="garbage")


def test_file_source_is_read_on_demand(store: RegionStore, snapshot_file: Path) -> None:
    region = store.create(2 * PAGE, source=Source(SourceKind.FILE, str(snapshot_file), offset=PAGE))
    assert region.allocated_bytes == 0
    data = store.data(region.id)
    assert data.read(PAGE + 10, 5) == bytes([3]) * 5
    # Only the page touched was filled.
    assert store.get(region.id).allocated_bytes == PAGE
    assert list(data.backing.holes(0, 2 * PAGE)) == [(0, PAGE)]
    assert b"".join(chunk for _, chunk in store.read(region.id, 0, 0)) == (
        bytes([2]) * PAGE + bytes([3]) * PAGE
    )


def test_write_keeps_the_source_around_partial_pages(
    store: RegionStore, snapshot_file: Path
) -> None:
    region = store.create(4 * PAGE, source=Source(SourceKind.FILE, str(snapshot_file)))
    store.write(region.id, PAGE - 2, b"abcd")
    content = b"".join(chunk for _, chunk in store.read(region.id, 0, 0))
    expected = bytearray(snapshot_file.read_bytes())
    expected[PAGE - 2 : PAGE + 2] = b"abcd"
    assert content == bytes(expected)
    # A later fill leaves written pages alone.
    assert store.data(region.id).fill(0, 4 * PAGE) == 0


@pytest.mark.parametrize(
    ("path_kind", "offset", "error", "field", "message"),
    [
        ("missing", 0, InvalidArgumentError, "source.file.path", "does not exist"),
        ("relative", 0, InvalidArgumentError, "source.file.path", "not absolute"),
        ("directory", 0, InvalidArgumentError, "source.file.path", "not a regular file"),
        ("fifo", 0, InvalidArgumentError, "source.file.path", "not a regular file"),
        ("file", PAGE * 3, InvalidArgumentError, "size", "past its end"),
        ("file", PAGE * 9, InvalidArgumentError, "source.file.offset", "past its end"),
    ],
)
def test_bad_file_sources_are_refused(
    store: RegionStore,
    snapshot_file: Path,
    tmp_path: Path,
    path_kind: str,
    offset: int,
    error: type[Exception],
    field: str,
    message: str,
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    path = {
        "missing": str(tmp_path / "nope"),
        "relative": "snapshot.bin",
        "directory": str(tmp_path),
        "fifo": str(fifo),
        "file": str(snapshot_file),
    }[path_kind]
    with pytest.raises(error, match=message) as info:
        store.create(2 * PAGE, source=Source(SourceKind.FILE, path, offset=offset))
    assert getattr(info.value, "field", "") == field
    assert store.reserved_bytes == 0


def test_source_roots_restrict_file_sources(
    state_dir: Path, shm_prefix: str, snapshot_file: Path, tmp_path: Path
) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "link").symlink_to(snapshot_file)
    store = RegionStore(state_dir, shm_prefix=shm_prefix, source_roots=(str(allowed),))
    try:
        with pytest.raises(PermissionDeniedError, match="outside the allowed"):
            store.create(PAGE, source=Source(SourceKind.FILE, str(allowed / "link")))
        (allowed / "real.bin").write_bytes(b"x" * PAGE)
        store.create(PAGE, source=Source(SourceKind.FILE, str(allowed / "real.bin")))
    finally:
        store.close()


def test_file_that_shrinks_makes_reads_fail_cleanly(
    store: RegionStore, snapshot_file: Path
) -> None:
    region = store.create(4 * PAGE, source=Source(SourceKind.FILE, str(snapshot_file)))
    os.truncate(snapshot_file, PAGE)
    with pytest.raises(SourceUnavailableError, match="shrank"):
        list(store.read(region.id, 2 * PAGE, PAGE))
    assert list(store.read(region.id, 0, 1)) == [(0, b"\x01")]


def test_region_source_reads_current_bytes_at_fill_time(
    store: RegionStore, snapshot_file: Path
) -> None:
    origin = store.create(4 * PAGE, source=Source(SourceKind.FILE, str(snapshot_file)))
    clone = store.create(2 * PAGE, source=Source(SourceKind.REGION, region=origin.id))
    assert clone.source.region == origin.id
    store.write(origin.id, 0, b"Z" * PAGE)
    assert store.data(clone.id).read(0, 2) == b"ZZ"
    # Reading through the clone did not fill the origin's page 1.
    assert store.data(clone.id).read(PAGE, 1) == b"\x02"
    assert store.get(origin.id).allocated_bytes == PAGE
    store.write(origin.id, PAGE, b"Y" * PAGE)
    assert store.data(clone.id).read(PAGE, 1) == b"\x02"  # filled before: the clone's own
    with pytest.raises(RegionBusyError, match=clone.id):
        store.delete(origin.id, force=True)
    with pytest.raises(InvalidArgumentError, match="fewer"):
        store.create(8 * PAGE, source=Source(SourceKind.REGION, region=origin.id))
    with pytest.raises(RegionNotFoundError) as info:
        store.create(PAGE, source=Source(SourceKind.REGION, region="nosuch"))
    assert info.value.field == "source.region"
    store.delete(clone.id)
    store.delete(origin.id)


def test_eager_fill_allocates_everything(store: RegionStore, snapshot_file: Path) -> None:
    region = store.create(
        4 * PAGE,
        source=Source(SourceKind.FILE, str(snapshot_file)),
        fill_policy=FillPolicy.EAGER,
    )
    assert region.allocated_bytes == 4 * PAGE
    zero = store.create(4 * PAGE, fill_policy=FillPolicy.EAGER, source=Source(SourceKind.BYTES))
    assert zero.allocated_bytes == 4 * PAGE


def test_zero_reads_do_not_allocate(store: RegionStore) -> None:
    region = store.create(8 * PAGE, source=Source(SourceKind.BYTES))
    assert b"".join(c for _, c in store.read(region.id, 0, 0)) == bytes(8 * PAGE)
    assert store.get(region.id).allocated_bytes == 0
    store.data(region.id).fill(PAGE, 1)
    assert store.get(region.id).allocated_bytes == PAGE


def test_ranges_are_checked(store: RegionStore) -> None:
    region = store.create(2 * PAGE)
    with pytest.raises(InvalidArgumentError, match="past the end") as info:
        store.write(region.id, 2 * PAGE - 1, b"ab")
    assert info.value.field == "length"
    with pytest.raises(InvalidArgumentError) as info:
        store.read(region.id, 2 * PAGE + 1, 0)
    assert info.value.field == "offset"
    with pytest.raises(InvalidArgumentError):
        store.read(region.id, 1 << 64, 1 << 64)
    assert list(store.read(region.id, 2 * PAGE, 0)) == []


def test_tokens_are_single_use_and_attachments_block_delete(store: RegionStore) -> None:
    region = store.create(PAGE)
    store.redeem_token(region.id, region.attach_token)
    with pytest.raises(PermissionDeniedError, match="unknown or used"):
        store.redeem_token(region.id, region.attach_token)
    assert store.get(region.id).attachments == 1
    with pytest.raises(RegionBusyError, match="1 attachment"):
        store.delete(region.id)
    store.detach(region.id)
    second = store.issue_token(region.id)
    store.redeem_token(region.id, second)
    assert store.delete(region.id, force=True).attachments == 1


def test_a_token_not_used_in_time_expires(state_dir: Path, shm_prefix: str) -> None:
    store = RegionStore(state_dir, shm_prefix=shm_prefix, token_ttl=0.2)
    try:
        region = store.create(PAGE)
        fresh = store.issue_token(region.id)
        time.sleep(0.3)
        with pytest.raises(PermissionDeniedError, match="expired"):
            store.redeem_token(region.id, region.attach_token)
        # Spent by the try: it does not come back, and nothing was counted.
        with pytest.raises(PermissionDeniedError, match="unknown or used"):
            store.redeem_token(region.id, region.attach_token)
        with pytest.raises(PermissionDeniedError, match="expired"):
            store.redeem_token(region.id, fresh)
        assert store.get(region.id).attachments == 0
        store.redeem_token(region.id, store.issue_token(region.id))
        assert store.get(region.id).attachments == 1
    finally:
        store.close()


def test_a_token_carries_its_attach_options_and_the_default_is_none(store: RegionStore) -> None:
    region = store.create(PAGE)
    _data, options = store.redeem_token(region.id, region.attach_token)
    assert options == AttachOptions()
    asked = AttachOptions(record=True, replay="w0123456789ab")
    token = store.issue_token(region.id, asked)
    assert store.redeem_token(region.id, token)[1] == asked


def test_unused_tokens_are_bounded_per_region_oldest_first(store: RegionStore) -> None:
    region = store.create(PAGE)
    oldest = store.issue_token(region.id)
    newer = [store.issue_token(region.id) for _ in range(MAX_UNUSED_TOKENS)]
    with pytest.raises(PermissionDeniedError, match="unknown or used"):
        store.redeem_token(region.id, oldest)
    for token in (newer[0], newer[-1]):
        store.redeem_token(region.id, token)


def test_restart_keeps_regions_and_posix_shm_content(
    state_dir: Path, shm_prefix: str, snapshot_file: Path
) -> None:
    store = RegionStore(state_dir, shm_prefix=shm_prefix)
    shm = store.create(
        4 * PAGE,
        backing=BackingKind.POSIX_SHM,
        source=Source(SourceKind.FILE, str(snapshot_file)),
        name="kept",
        labels={"a": "b"},
    )
    assert shm.shm_name == f"/{shm_prefix}.{shm.id}"
    mem = store.create(4 * PAGE, source=Source(SourceKind.BYTES), fill_policy=FillPolicy.EAGER)
    store.write(shm.id, PAGE, b"written")
    store.write(mem.id, 0, b"lost")
    store.close()

    reopened = RegionStore(state_dir, shm_prefix=shm_prefix)
    try:
        again = reopened.get("kept")
        assert again.labels == {"a": "b"}
        assert not again.content_reset
        assert again.created == shm.created
        content = b"".join(c for _, c in reopened.read("kept", 0, 0))
        assert content[PAGE : PAGE + 7] == b"written"
        assert content[PAGE + 7 : 2 * PAGE] == bytes([2]) * (PAGE - 7)
        assert content[:PAGE] == bytes([1]) * PAGE
        memfd = reopened.get(mem.id)
        assert memfd.content_reset
        assert memfd.allocated_bytes == 4 * PAGE  # eager: refilled at start
        assert b"".join(c for _, c in reopened.read(mem.id, 0, 4)) == bytes(4)
    finally:
        reopened.close()


def test_interrupted_creation_is_cleaned_at_start(state_dir: Path, shm_prefix: str) -> None:
    store = RegionStore(state_dir, shm_prefix=shm_prefix)
    region = store.create(PAGE, backing=BackingKind.POSIX_SHM)
    store.close()
    with sqlite3.connect(state_dir / "regions.sqlite3") as db:
        db.execute("UPDATE regions SET state = 'creating'")
    RegionStore(state_dir, shm_prefix=shm_prefix).close()
    assert rows(state_dir) == []
    with pytest.raises(posix_ipc.ExistentialError):
        posix_ipc.SharedMemory(region.shm_name)


def test_missing_posix_shm_object_is_recreated_as_reset(state_dir: Path, shm_prefix: str) -> None:
    store = RegionStore(state_dir, shm_prefix=shm_prefix)
    region = store.create(PAGE, backing=BackingKind.POSIX_SHM, source=Source(SourceKind.BYTES))
    store.write(region.id, 0, b"x")
    store.close()
    memory.unlink_posix_shm(region.shm_name)
    reopened = RegionStore(state_dir, shm_prefix=shm_prefix)
    try:
        assert reopened.get(region.id).content_reset
        assert list(reopened.read(region.id, 0, 1)) == [(0, b"\0")]
    finally:
        reopened.close()


@pytest.mark.skipif(not no_free_huge_pages(), reason="this machine has free huge pages")
def test_hugetlb_refused_without_free_huge_pages(store: RegionStore) -> None:
    huge = memory.default_huge_page_size()
    with pytest.raises(HugePagesUnavailableError, match="free_hugepages 0") as info:
        store.create(huge, backing=BackingKind.HUGETLB)
    assert "needs 1 huge pages" in str(info.value)
    assert store.reserved_bytes == 0
    with pytest.raises(InvalidArgumentError, match=f"page size {huge}"):
        store.create(PAGE, backing=BackingKind.HUGETLB)


@pytest.mark.root
def test_hugetlb_region(store: RegionStore, huge_pages: int, tmp_path: Path) -> None:
    huge = memory.default_huge_page_size()
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x01" * 2 * huge)
    region = store.create(
        2 * huge, backing=BackingKind.HUGETLB, source=Source(SourceKind.FILE, str(big))
    )
    assert region.page_size == huge
    assert region.allocated_bytes == 0
    store.write(region.id, huge + 1, b"hi")
    assert store.get(region.id).allocated_bytes == huge
    assert b"".join(c for _, c in store.read(region.id, huge, 4)) == b"\x01hi\x01"
    assert b"".join(c for _, c in store.read(region.id, 0, 2)) == b"\x01\x01"
    assert store.get(region.id).allocated_bytes == 2 * huge
    with pytest.raises(HugePagesUnavailableError):
        store.create(4 * huge, backing=BackingKind.HUGETLB)
    store.delete(region.id)


def test_holes_are_found_within_the_range_however_much_of_the_file_is_filled() -> None:
    # The second sharer of a region asks for the holes of each window of a file the first
    # one filled nearly all of: the answer must stay within the window (cachestat, then
    # SEEK_HOLE only where a hole is known to be).
    pages = 4096
    backing = memory.Backing.create(memory.BackingKind.MEMFD, pages * PAGE, "holes")
    try:
        fd = backing.fileno()
        for start, end in ((0, 100), (102, 2000), (2001, pages - 1)):
            os.pwrite(fd, b"x" * ((end - start) * PAGE), start * PAGE)
        assert memory._libc.pages_present(fd, 0, pages * PAGE) in (pages - 4, None)  # 6.5+
        assert list(backing.holes(0, 64 * PAGE)) == []
        assert list(backing.holes(96 * PAGE, 112 * PAGE)) == [(100 * PAGE, 102 * PAGE)]
        assert list(backing.holes(101 * PAGE, 102 * PAGE)) == [(101 * PAGE, 102 * PAGE)]
        assert list(backing.holes(1984 * PAGE, 2048 * PAGE)) == [(2000 * PAGE, 2001 * PAGE)]
        assert list(backing.holes((pages - 16) * PAGE, pages * PAGE)) == [
            ((pages - 1) * PAGE, pages * PAGE)
        ]
        assert list(backing.holes(0, pages * PAGE)) == [
            (100 * PAGE, 102 * PAGE),
            (2000 * PAGE, 2001 * PAGE),
            ((pages - 1) * PAGE, pages * PAGE),
        ]
    finally:
        backing.close()

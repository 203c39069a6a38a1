"""Working-set record and replay (docs/recording.md) against the real service and kernel.

A recording is the faults an attachment was served, in order; replay fills those pages (with
their fault-around blocks) ahead of a later attachment. The tests touch pages one fault-around
block apart, so each touch is exactly one fault and the expected recording is known here.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from shmfault import recording
from shmfault.client import Client
from shmfault.errors import InvalidArgumentError, RecordingNotFoundError
from shmfault.store import Source
from tests.integration.attach_helpers import (
    FAULT_AROUND,
    LAZY_MODES,
    PAGE,
    Memory,
    entry_of,
    random_file,
    settle,
)
from tests.integration.conftest import Service

pytestmark = pytest.mark.timeout(60)

BLOCKS = 64
SIZE = BLOCKS * FAULT_AROUND * PAGE


def file_region(client: Client, directory: Path, size: int = SIZE) -> tuple[str, bytes]:
    path, data = random_file(directory, size, f"rec-{random.randrange(1 << 32):08x}")
    return client.create_region(size, source=Source.of_file(path)).id, data


def record_touches(
    client: Client, region_id: str, touches: list[tuple[int, bool]], mode: str
) -> str:
    """Attach with ``record``, touch ``(page, write)`` in order, detach: the recording's id."""
    with client.attach(region_id, mode=mode, record=True) as attached:
        memory = Memory.of(attached)
        for page, write in touches:
            if write:
                memory.write(page * PAGE, b"w")
            else:
                memory.read(page * PAGE, 1)
        attachment_id = attached.attachment_id
    settle(lambda: entry_of(client, attachment_id)["recording_id"] != "", "recording id set")
    recording_id: str = entry_of(client, attachment_id)["recording_id"]
    settle(
        lambda: any(r["recording_id"] == recording_id for r in client.list_recordings()),
        "recording written",
    )
    return recording_id


@pytest.mark.parametrize("mode", ["shared-copy", "private-copy"])
def test_a_recording_holds_every_fault_in_order_with_its_kind(
    client: Client, tmp_path: Path, mode: str
) -> None:
    region_id, _data = file_region(client, tmp_path)
    rng = random.Random(5)
    blocks = rng.sample(range(BLOCKS), 40)
    # Shared mappings fault as reads or writes; a write marks the kind in the recording.
    touches = [
        (block * FAULT_AROUND + rng.randrange(FAULT_AROUND), rng.random() < 0.3) for block in blocks
    ]
    recording_id = record_touches(client, region_id, touches, mode)
    info, data = client.get_recording(recording_id)
    made = recording.decode(data)
    assert [(page, access is recording.Access.WRITE) for page, access in made.accesses()] == touches
    assert made.pages() == [page for page, _write in touches]
    assert (made.page_size, made.region_size, made.region_id) == (PAGE, SIZE, region_id)
    assert (info["faults"], info["pages"], info["region_id"]) == (40, 40, region_id)
    assert info["file_bytes"] == len(data)


@pytest.mark.parametrize("mode", LAZY_MODES)
def test_replay_fills_the_recorded_blocks_before_the_client_touches_them(
    client: Client, tmp_path: Path, mode: str
) -> None:
    region_id, _data = file_region(client, tmp_path)
    rng = random.Random(11)
    pages = [
        block * FAULT_AROUND + rng.randrange(FAULT_AROUND)
        for block in rng.sample(range(BLOCKS), 48)
    ]
    recording_id = record_touches(client, region_id, [(p, False) for p in pages], mode)

    # A fresh region of the same file: nothing of it is filled yet.
    second_id, data = file_region(client, tmp_path)
    with client.attach(second_id, mode=mode, replay=recording_id) as attached:
        settle(
            lambda: entry_of(client, attached.attachment_id)["replay_pending"] == 0,
            "replay finished",
        )
        entry = entry_of(client, attached.attachment_id)
        assert entry["replay_pages"] == 48
        # Each recorded page came with its fault-around block, as when it was recorded.
        assert entry["counters"]["pages_prefetched"] == 48 * FAULT_AROUND, entry
        memory = Memory.of(attached)
        for page in pages:
            for neighbour in (
                page - page % FAULT_AROUND,
                page,
                page - page % FAULT_AROUND + FAULT_AROUND - 1,
            ):
                assert memory.page(neighbour) == data[neighbour * PAGE : (neighbour + 1) * PAGE]
        entry = entry_of(client, attached.attachment_id)
        assert entry["counters"]["faults"] == 0, "a replayed page faulted"
        # Pages outside the recording still fault, and read right.
        unrecorded = next(b for b in range(BLOCKS) if all(p // FAULT_AROUND != b for p in pages))
        page = unrecorded * FAULT_AROUND
        assert memory.page(page) == data[page * PAGE : (page + 1) * PAGE]
        assert entry_of(client, attached.attachment_id)["counters"]["faults"] == 1


@pytest.mark.parametrize("mode", LAZY_MODES)
@pytest.mark.parametrize("which", ["first", "last"])
def test_a_replayed_block_holding_a_written_page_is_filled_too(
    client: Client, tmp_path: Path, mode: str, which: str
) -> None:
    # A page written into the region makes a replay block one the C side leaves to Python
    # (private-copy reads written pages there; the shared modes meet EEXIST). The last block
    # of a step must come back as well as any other: filled, counted, and not faulted on.
    region_id, _data = file_region(client, tmp_path)
    rng = random.Random(17)
    pages = sorted(
        block * FAULT_AROUND + rng.randrange(FAULT_AROUND) for block in rng.sample(range(BLOCKS), 8)
    )
    recording_id = record_touches(client, region_id, [(p, False) for p in pages], mode)
    second_id, data = file_region(client, tmp_path)
    block = (pages[0] if which == "first" else pages[-1]) // FAULT_AROUND
    written_page = block * FAULT_AROUND + FAULT_AROUND // 2
    written = bytes([0xA5]) * PAGE
    client.write(second_id, written_page * PAGE, written)
    expected = data[: written_page * PAGE] + written + data[(written_page + 1) * PAGE :]
    with client.attach(second_id, mode=mode, replay=recording_id) as attached:
        settle(
            lambda: entry_of(client, attached.attachment_id)["replay_pending"] == 0,
            "replay finished",
        )
        memory = Memory.of(attached)
        recorded_blocks = sorted({p // FAULT_AROUND for p in pages})
        touched = [b * FAULT_AROUND + i for b in recorded_blocks for i in range(FAULT_AROUND)]
        assert memory.wrong_pages(expected, touched) == []
        entry = entry_of(client, attached.attachment_id)
        assert entry["counters"]["faults"] == 0, entry
        # The shared modes fill the region file, which has the written page already;
        # private-copy copies it into the client's memory like every other.
        already = 0 if mode == "private-copy" else 1
        assert entry["counters"]["pages_prefetched"] == len(touched) - already, entry


@pytest.mark.parametrize("mode", LAZY_MODES)
def test_faults_racing_a_replay_read_the_right_bytes(
    client: Client, tmp_path: Path, mode: str
) -> None:
    # A recording of every block, replayed while the client touches every page in a random
    # order: each page is filled by whichever gets there first, never twice, never wrong.
    region_id, _data = file_region(client, tmp_path)
    order = list(range(BLOCKS))
    random.Random(3).shuffle(order)
    recording_id = record_touches(
        client, region_id, [(b * FAULT_AROUND, False) for b in order], mode
    )
    second_id, data = file_region(client, tmp_path)
    pages = list(range(SIZE // PAGE))
    random.Random(4).shuffle(pages)
    with client.attach(second_id, mode=mode, replay=recording_id) as attached:
        assert Memory.of(attached).wrong_pages(data, pages) == []
        entry = entry_of(client, attached.attachment_id)
        counters = entry["counters"]
        assert counters["pages_filled"] == SIZE // PAGE
    assert entry["replay_pages"] == BLOCKS


def test_merge_keeps_the_pages_seen_in_every_recording(client: Client, tmp_path: Path) -> None:
    region_id, _data = file_region(client, tmp_path)
    common = [3, 9, 20, 41]
    first = record_touches(
        client, region_id, [(b * FAULT_AROUND, False) for b in [*common, 50, 51]], "private-copy"
    )
    second = record_touches(
        client,
        region_id,
        [(b * FAULT_AROUND, False) for b in [60, *reversed(common)]],
        "private-copy",
    )
    merged = client.merge_recordings([first, second])
    assert merged["pages"] == len(common)
    made = recording.decode(client.get_recording(merged["recording_id"])[1])
    assert sorted(made.pages()) == sorted(b * FAULT_AROUND for b in common)


def test_recordings_are_checked_and_survive_a_restart(
    service: Service, client: Client, tmp_path: Path
) -> None:
    region_id, _data = file_region(client, tmp_path)
    recording_id = record_touches(
        client, region_id, [(0, False), (FAULT_AROUND, True)], "private-copy"
    )

    smaller = client.create_region(SIZE // 2).id
    with pytest.raises(InvalidArgumentError, match="region of"):
        client.issue_attach_token(smaller, replay=recording_id)
    with pytest.raises(RecordingNotFoundError):
        client.issue_attach_token(region_id, replay="w000000000000")
    with pytest.raises(RecordingNotFoundError):
        client.issue_attach_token(region_id, replay="../../etc/passwd")
    with pytest.raises(InvalidArgumentError, match="not a recording"):
        client.import_recording(b"SHMFREC\x00garbage")

    exported = client.get_recording(recording_id)[1]
    service.restart()
    with service.client() as again:
        assert [r["recording_id"] for r in again.list_recordings()] == [recording_id]
        assert again.get_recording(recording_id)[1] == exported
        imported = again.import_recording(exported)
        assert imported["recording_id"] != recording_id
        again.delete_recording(recording_id)
        with pytest.raises(RecordingNotFoundError):
            again.delete_recording(recording_id)
        assert [r["recording_id"] for r in again.list_recordings()] == [imported["recording_id"]]


def test_a_replay_whose_recording_was_deleted_is_refused_at_the_handshake(
    client: Client, tmp_path: Path
) -> None:
    from shmfault.attach import AttachError, attach

    region_id, _data = file_region(client, tmp_path)
    recording_id = record_touches(client, region_id, [(0, False)], "private-copy")
    region, token, handoff = client.issue_attach_token(region_id, replay=recording_id)
    client.delete_recording(recording_id)
    with pytest.raises(AttachError, match="NOT_FOUND"):
        attach(handoff, region, token)

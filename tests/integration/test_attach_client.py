"""The client's attach path against a hand-played service and the real kernel: what the client
does when the service refuses at the last step, and where it puts its anonymous memory."""

from __future__ import annotations

import mmap
import threading
from pathlib import Path

import pytest

from shmfault import _libc, _unix, protocol
from shmfault.attach import AttachError, _aligned_anonymous, attach
from shmfault.modes import Mode, requirements
from shmfault.protocol import ErrorCode, Welcome

pytestmark = pytest.mark.timeout(30)

PAGE = mmap.PAGESIZE


def _refusing_service(listener: object, received: list[int]) -> None:
    """Accept one client, WELCOME it in private-copy, take its ATTACH and refuse it."""
    connection, _ = listener.accept()  # type: ignore[attr-defined]
    machine = protocol.ServiceConnection()
    packet = _unix.recv_packet(connection)
    assert packet is not None
    machine.receive(packet.data, packet.fds)
    needs = requirements(Mode.PRIVATE_COPY)
    welcome = Welcome(
        mode=Mode.PRIVATE_COPY,
        page_size=PAGE,
        region_size=64 * PAGE,
        attachment_id=7,
        register_mode=needs.register_mode,
        features=needs.features,  # EVENT_UNMAP among them
    )
    _unix.send_packet(connection, machine.welcome(welcome))
    packet = _unix.recv_packet(connection)
    assert packet is not None
    received.extend(packet.fds)
    machine.receive(packet.data, packet.fds)
    _unix.send_packet(connection, machine.error(ErrorCode.BAD_RANGE, "refused for the test"))
    _unix.close_fds(packet.fds)
    connection.close()


def test_a_refused_attach_releases_its_registered_memory_without_hanging(tmp_path: Path) -> None:
    """The client has mapped and registered (with EVENT_UNMAP) when the ATTACH is refused: it
    must close its userfaultfd before unmapping, or munmap waits for ever for someone to read
    the unmap event."""
    path = str(tmp_path / "handoff.sock")
    listener = _unix.listen_seqpacket(path)
    received: list[int] = []
    service = threading.Thread(target=_refusing_service, args=(listener, received))
    service.start()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            attach(path, "r000000000001", "token", mode="private-copy")
        except BaseException as exc:
            outcome.append(exc)

    client = threading.Thread(target=run, daemon=True)
    client.start()
    client.join(10)
    service.join(10)
    listener.close()
    assert not client.is_alive(), "the refused client hung in its clean-up"
    assert len(outcome) == 1 and isinstance(outcome[0], AttachError)
    assert outcome[0].code is ErrorCode.BAD_RANGE
    assert len(received) == 1  # it did hand over a userfaultfd before the refusal


def _mapped_at(address: int) -> list[str]:
    return [
        line
        for line in Path("/proc/self/maps").read_text().splitlines()
        if int(line.split("-")[0], 16) <= address < int(line.split("-")[1].split()[0], 16)
    ]


def test_anonymous_memory_for_huge_pages_is_aligned_and_nothing_more_is_kept() -> None:
    huge = 2 << 20
    for _ in range(4):
        address = _aligned_anonymous(3 * huge, huge, _libc.PROT_READ | _libc.PROT_WRITE)
        try:
            assert address % huge == 0
            assert len(_mapped_at(address)) == 1
            _libc.copy_memory(address + 3 * huge - 1, address, 1)  # all of it is usable
        finally:
            _libc.munmap(address, 3 * huge)
    # Base pages need no reservation.
    address = _aligned_anonymous(4 * PAGE, PAGE, _libc.PROT_READ)
    assert address % PAGE == 0
    _libc.munmap(address, 4 * PAGE)

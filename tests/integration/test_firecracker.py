"""Firecracker's page-fault handler protocol against the real service and the real kernel.

The VMM is tests/integration/firecracker_vmm.py: a forked child that does what Firecracker does
during a snapshot load with the Uffd memory backend (anonymous private guest memory, a
userfaultfd with EVENT_REMOVE registered MISSING, one sendmsg of the JSON regions and the fd),
then touches guest memory on command. Expected bytes are the snapshot file's, at the JSON's
offsets; balloon-dropped pages must read zeros.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shmfault._abi import Feature
from shmfault.client import Client
from shmfault.errors import (
    AlreadyExistsError,
    EndpointNotFoundError,
    InvalidArgumentError,
    RegionNotFoundError,
)
from shmfault.store import Source
from tests.integration.attach_helpers import (
    Child,
    child_pool,
    fd_count,
    random_file,
    settle,
)
from tests.integration.conftest import Service, cli
from tests.integration.firecracker_vmm import PAGE, GuestRegion, Handshake, vmm

pytestmark = [pytest.mark.root]

SNAPSHOT_PAGES = 512


@pytest.fixture
def children() -> Iterator[Callable[..., Child]]:
    yield from child_pool()


@pytest.fixture
def snapshot(tmp_path: Path) -> tuple[Path, bytes]:
    """A snapshot memory file of random bytes: every page differs, none is zeros."""
    return random_file(tmp_path, SNAPSHOT_PAGES * PAGE, "guest.mem")


def open_endpoint(
    client: Client, service: Service, snapshot: Path, name: str = "fc.sock"
) -> dict[str, Any]:
    size = snapshot.stat().st_size
    region = client.create_region(size, source=Source.of_file(snapshot))
    return client.open_firecracker_endpoint(region.id, str(service.base / name))  # type: ignore[no-any-return]


class Vmm:
    """A VMM child and its guest memory's addresses."""

    def __init__(
        self,
        spawn: Callable[..., Child],
        endpoint: dict[str, Any],
        regions: list[GuestRegion],
        snapshot: Path,
        handshake: Handshake | None = None,
    ) -> None:
        self.regions = regions
        self.child = spawn(
            vmm, endpoint["socket_path"], regions, str(snapshot), handshake or Handshake()
        )
        kind, self.bases = self.child.recv()
        assert kind == "ready"

    @property
    def pid(self) -> int:
        return self.child.pid

    def ask(self, *command: Any) -> Any:
        self.child.send(command)
        return self.child.recv()

    def read(self, index: int, offset: int = 0, length: int | None = None) -> bytes:
        size = self.regions[index].length - offset if length is None else length
        return self.ask("read", index, offset, size)  # type: ignore[no-any-return]

    def closed_by_handler(self, timeout: float = 10.0) -> bool:
        return self.ask("wait_closed", timeout)  # type: ignore[no-any-return]

    def exit(self) -> None:
        self.child.send(("exit",))
        self.child.result()


def file_bytes(
    data: bytes, region: GuestRegion, offset: int = 0, length: int | None = None
) -> bytes:
    size = region.length - offset if length is None else length
    return data[region.offset + offset : region.offset + offset + size]


def vm_entry(client: Client, pid: int) -> dict[str, Any] | None:
    for entry in client.stats():
        if entry["kind"] == "firecracker" and entry["pid"] == pid:
            return entry
    return None


def served_entry(client: Client, pid: int) -> dict[str, Any]:
    settle(lambda: vm_entry(client, pid) is not None, f"GetStats lists VM {pid}")
    entry = vm_entry(client, pid)
    assert entry is not None
    return entry


# --- serving ---


@pytest.mark.timeout(60)
@pytest.mark.parametrize("page_size_fields", ["both", "page_size", "legacy", "none"])
def test_several_regions_read_the_snapshot_at_their_offsets(
    service: Service,
    client: Client,
    snapshot: tuple[Path, bytes],
    children: Callable[..., Child],
    page_size_fields: str,
) -> None:
    path, data = snapshot
    endpoint = open_endpoint(client, service, path)
    # Out of file order, with a gap, as Firecracker's regions around an MMIO hole could be.
    regions = [
        GuestRegion(64 * PAGE, 300 * PAGE),
        GuestRegion(16 * PAGE, 0),
        GuestRegion(100 * PAGE, 40 * PAGE),
    ]
    machine = Vmm(children, endpoint, regions, path, Handshake(page_size_fields=page_size_fields))
    for index, region in enumerate(regions):
        assert machine.read(index) == file_bytes(data, region), f"region {index}"
    entry = served_entry(client, machine.pid)
    assert entry["mode"] == "private-copy"
    assert entry["region_id"] == endpoint["region_id"]
    assert entry["ended"] is None
    assert sorted((r["base"], r["length"], r["region_offset"]) for r in entry["ranges"]) == sorted(
        (base, region.length, region.offset)
        for base, region in zip(machine.bases, regions, strict=True)
    )
    assert entry["counters"]["faults"] > 0
    assert entry["counters"]["pages_filled"] == sum(r.length for r in regions) // PAGE
    machine.exit()


@pytest.mark.timeout(60)
def test_a_message_larger_than_the_read_buffer(
    service: Service, client: Client, snapshot: tuple[Path, bytes], children: Callable[..., Child]
) -> None:
    path, data = snapshot
    endpoint = open_endpoint(client, service, path)
    # 120 one-page regions at scattered offsets: about 13 KiB of JSON, read in pieces.
    regions = [GuestRegion(PAGE, ((n * 37) % SNAPSHOT_PAGES) * PAGE) for n in range(120)]
    machine = Vmm(children, endpoint, regions, path)
    for index, region in enumerate(regions):
        assert machine.read(index) == file_bytes(data, region), f"region {index}"
    assert len(served_entry(client, machine.pid)["ranges"]) == 120
    machine.exit()


@pytest.mark.timeout(60)
def test_several_vms_from_one_endpoint_have_private_copies(
    service: Service, client: Client, snapshot: tuple[Path, bytes], children: Callable[..., Child]
) -> None:
    path, data = snapshot
    endpoint = open_endpoint(client, service, path)
    regions = [GuestRegion(32 * PAGE, 8 * PAGE)]
    first = Vmm(children, endpoint, regions, path)
    second = Vmm(children, endpoint, regions, path)
    first.ask("write", 0, 5 * PAGE + 10, b"guest one")
    assert second.read(0) == file_bytes(data, regions[0])
    mine = first.read(0, 5 * PAGE, PAGE)
    assert mine[10:19] == b"guest one"
    assert mine[:10] == file_bytes(data, regions[0], 5 * PAGE, 10)
    # The region itself is untouched: a private copy never writes back.
    assert client.read(endpoint["region_id"], 13 * PAGE, PAGE) == data[13 * PAGE : 14 * PAGE]
    assert (
        served_entry(client, first.pid)["attachment_id"]
        != served_entry(client, second.pid)["attachment_id"]
    )
    assert client.list_firecracker_endpoints()[0]["attached"] == 2
    first.exit()
    second.exit()


# --- balloon ---


@pytest.mark.timeout(60)
def test_balloon_ranges_read_zeros_and_are_not_refilled(
    service: Service, client: Client, snapshot: tuple[Path, bytes], children: Callable[..., Child]
) -> None:
    path, data = snapshot
    endpoint = open_endpoint(client, service, path)
    region = GuestRegion(128 * PAGE, 64 * PAGE)
    machine = Vmm(children, endpoint, [region], path)
    assert machine.read(0, 0, 64 * PAGE) == file_bytes(data, region, 0, 64 * PAGE)
    # Touched pages, never-touched pages, and a page the guest wrote: all dropped.
    machine.ask("write", 0, 20 * PAGE, b"x" * PAGE)
    machine.ask("dontneed", 0, 16 * PAGE, 80 * PAGE)
    for _ in range(2):  # and again: zeros stay zeros, the file never comes back
        assert machine.read(0, 16 * PAGE, 80 * PAGE) == bytes(80 * PAGE)
    assert machine.read(0, 0, 16 * PAGE) == file_bytes(data, region, 0, 16 * PAGE)
    assert machine.read(0, 96 * PAGE, 32 * PAGE) == file_bytes(data, region, 96 * PAGE, 32 * PAGE)
    # A page written after the balloon gave it back keeps what the guest wrote...
    machine.ask("write", 0, 30 * PAGE, b"y" * 100)
    page = machine.read(0, 30 * PAGE, PAGE)
    assert page == b"y" * 100 + bytes(PAGE - 100)
    # ... until the balloon takes it again.
    machine.ask("dontneed", 0, 30 * PAGE, PAGE)
    assert machine.read(0, 30 * PAGE, PAGE) == bytes(PAGE)
    counters = served_entry(client, machine.pid)["counters"]
    assert counters["events_remove"] >= 2
    machine.exit()


@pytest.mark.timeout(120)
def test_balloon_racing_faults_reads_only_file_bytes_or_zeros(
    service: Service, client: Client, snapshot: tuple[Path, bytes], children: Callable[..., Child]
) -> None:
    path, _data = snapshot
    endpoint = open_endpoint(client, service, path)
    rounds, pages = 24, 16
    region = GuestRegion(rounds * pages * PAGE, 64 * PAGE)
    machine = Vmm(children, endpoint, [region], path)
    outcome = machine.ask("race", 0, pages, rounds, 3)
    assert outcome["violations"] == []
    # Both outcomes happened, so the drop really raced the faults.
    assert outcome["counts"]["file"] > 0 and outcome["counts"]["zero"] > 0
    assert served_entry(client, machine.pid)["ended"] is None
    machine.exit()
    assert "fault_failed" not in service.logs()
    assert "engine_crashed" not in service.logs()


# --- refusals ---

_TWO = [GuestRegion(8 * PAGE, 0), GuestRegion(8 * PAGE, 8 * PAGE)]
_ONE = [GuestRegion(8 * PAGE, 0)]
#: name: (guest regions, how the VMM sends, a piece of the logged reason)
REFUSALS: dict[str, tuple[list[GuestRegion], Handshake, str]] = {
    "malformed JSON": (_ONE, Handshake(payload=b'[{"size": 4096,}]'), "not JSON"),
    "not an array": (_ONE, Handshake(payload=b'{"size": 4096}'), "does not start with a JSON"),
    "an empty array": (_ONE, Handshake(payload=b"[]"), "no regions"),
    "a field missing": (_ONE, Handshake(payload=b'[{"size": 4096, "offset": 0}]'), "missing"),
    "bytes after the array": (_ONE, Handshake(payload=b"[] x"), "follow the region list"),
    "no fd": (_ONE, Handshake(fds="none"), "0 fds"),
    "two fds": (_ONE, Handshake(fds="two"), "2 fds"),
    "a pipe for the uffd": (_ONE, Handshake(fds="pipe"), "not a usable userfaultfd"),
    "past the end of the file": (
        [GuestRegion(8 * PAGE, (SNAPSHOT_PAGES - 4) * PAGE)],
        Handshake(),
        "past the end of the memory file",
    ),
    "an unaligned offset": (_ONE, Handshake(extra={"offset": 100}), "not a multiple"),
    "overlapping regions": (_TWO, Handshake(overlap=True), "lies inside regions[0]"),
    "a hugepage page_size": (
        _ONE,
        Handshake(page_size_sent=2 << 20),
        "needs a region with the hugetlb backing",
    ),
    "page_size_kib disagreeing": (
        _ONE,
        Handshake(extra={"page_size_kib": 4}),
        "differs from page_size",
    ),
    "a uffd with EVENT_FORK": (
        _ONE,
        Handshake(features=Feature.EVENT_REMOVE | Feature.EVENT_FORK),
        "forbidden features",
    ),
}


@pytest.mark.timeout(120)
def test_refusals_are_logged_close_the_connection_and_leak_nothing(
    service: Service, client: Client, snapshot: tuple[Path, bytes], children: Callable[..., Child]
) -> None:
    path, data = snapshot
    assert service.process is not None
    endpoint = open_endpoint(client, service, path)
    baseline = fd_count(service.process.pid)
    for name, (regions, handshake, reason) in REFUSALS.items():
        machine = Vmm(children, endpoint, regions, path, handshake)
        assert machine.closed_by_handler(), f"{name}: the connection stays open"
        settle(
            lambda reason=reason: reason in service.logs(),  # type: ignore[misc]
            f"{name}: a firecracker_refused line naming {reason!r}",
        )
        machine.exit()
        settle(
            lambda: fd_count(service.process.pid) == baseline,  # type: ignore[union-attr]
            f"{name}: the service is back at {baseline} fds",
        )
    assert service.logs().count("event=firecracker_refused") == len(REFUSALS)
    assert not [e for e in client.stats() if e["kind"] == "firecracker"]
    assert client.list_firecracker_endpoints()[0]["refused"] == len(REFUSALS)
    assert client.get_region(endpoint["region_id"]).attachments == 0
    # The endpoint still serves a good VMM.
    good = Vmm(children, endpoint, _TWO, path)
    assert good.read(1) == file_bytes(data, _TWO[1])
    good.exit()


@pytest.mark.timeout(60)
def test_a_vmm_that_never_finishes_its_message_times_out(
    service_dir: Path, shm_prefix: str, snapshot: tuple[Path, bytes], children: Callable[..., Child]
) -> None:
    path, _data = snapshot
    service = Service(service_dir, shm_prefix, extra_args=["--handshake-timeout", "1"])
    service.start()
    with service.client() as client:
        endpoint = open_endpoint(client, service, path)
        machine = Vmm(children, endpoint, _ONE, path, Handshake(payload=b'[{"base_host_virt'))
        assert machine.closed_by_handler()
        settle(lambda: "no complete message within 1.0 s" in service.logs(), "the timeout")
        machine.exit()
        # A VMM that dies half way is refused at once.
        gone = Vmm(children, endpoint, _ONE, path, Handshake(payload=b'[{"size": 4'))
        gone.ask("close_socket")
        settle(lambda: "before a complete message" in service.logs(), "the early end")
        gone.exit()


# --- the VM's end ---


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["SIGKILL", "socket closed"])
def test_the_vmms_end_frees_everything(
    service: Service,
    client: Client,
    snapshot: tuple[Path, bytes],
    children: Callable[..., Child],
    how: str,
) -> None:
    path, data = snapshot
    assert service.process is not None
    endpoint = open_endpoint(client, service, path)
    baseline = fd_count(service.process.pid)
    regions = [GuestRegion(64 * PAGE, 0), GuestRegion(64 * PAGE, 128 * PAGE)]
    machine = Vmm(children, endpoint, regions, path)
    assert machine.read(1, 0, 8 * PAGE) == file_bytes(data, regions[1], 0, 8 * PAGE)
    entry = served_entry(client, machine.pid)
    assert client.get_region(endpoint["region_id"]).attachments == 1
    if how == "SIGKILL":
        machine.child.kill()
        assert os.WTERMSIG(machine.child.wait()) == signal.SIGKILL
    else:
        machine.ask("close_socket")
    settle(
        lambda: (vm_entry(client, machine.pid) or {}).get("ended") is not None,
        "the VM's attachment ends",
    )
    ended = vm_entry(client, machine.pid)
    assert ended is not None and ended["attachment_id"] == entry["attachment_id"]
    assert ended["end_reason"] in (
        "the client process exited",
        "the client closed its connection",
        "the client's memory is gone (ESRCH)",
    )
    settle(
        lambda: fd_count(service.process.pid) == baseline,  # type: ignore[union-attr]
        f"the service is back at {baseline} fds",
    )
    assert client.get_region(endpoint["region_id"]).attachments == 0
    if how == "socket closed":
        machine.child.kill()


# --- endpoints: sockets, life cycle, CLI ---


@pytest.mark.timeout(60)
def test_socket_path_rules(
    service: Service, client: Client, snapshot: tuple[Path, bytes], tmp_path: Path
) -> None:
    path, _data = snapshot
    region = client.create_region(path.stat().st_size, source=Source.of_file(path))
    base = service.base
    with pytest.raises(InvalidArgumentError, match="not absolute") as error:
        client.open_firecracker_endpoint(region.id, "relative.sock")
    assert error.value.field == "socket_path"
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        client.open_firecracker_endpoint(region.id, str(base / "missing" / "fc.sock"))
    (base / "link").symlink_to(tmp_path)
    with pytest.raises(InvalidArgumentError, match="symlink"):
        client.open_firecracker_endpoint(region.id, str(base / "link" / "fc.sock"))
    with pytest.raises(InvalidArgumentError, match="longer than"):
        client.open_firecracker_endpoint(region.id, "/" + "x" * 120)
    (base / "file").write_bytes(b"")
    with pytest.raises(AlreadyExistsError, match="not a socket"):
        client.open_firecracker_endpoint(region.id, str(base / "file"))
    with pytest.raises(AlreadyExistsError, match="answers"):
        client.open_firecracker_endpoint(region.id, str(service.socket))
    with pytest.raises(RegionNotFoundError):
        client.open_firecracker_endpoint("nosuch", str(base / "fc.sock"))
    # A stale socket (nobody listening) is replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(base / "fc.sock"))
    stale.close()
    endpoint = client.open_firecracker_endpoint(region.id, str(base / "fc.sock"))
    info = os.lstat(base / "fc.sock")
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    with pytest.raises(AlreadyExistsError, match="answers"):
        client.open_firecracker_endpoint(region.id, str(base / "fc.sock"))
    assert [e["id"] for e in client.list_firecracker_endpoints()] == [endpoint["id"]]
    client.close_firecracker_endpoint(endpoint["id"])
    assert not (base / "fc.sock").exists()
    assert client.list_firecracker_endpoints() == []
    with pytest.raises(EndpointNotFoundError):
        client.close_firecracker_endpoint(endpoint["id"])


@pytest.mark.timeout(60)
def test_endpoints_end_with_their_region_and_with_the_service(
    service: Service, client: Client, snapshot: tuple[Path, bytes], children: Callable[..., Child]
) -> None:
    path, data = snapshot
    first = open_endpoint(client, service, path, "one.sock")
    second = open_endpoint(client, service, path, "two.sock")
    machine = Vmm(children, first, _ONE, path)
    assert machine.read(0) == file_bytes(data, _ONE[0])
    # Closing an endpoint leaves its VMs served.
    client.close_firecracker_endpoint(first["id"])
    assert machine.read(0, 0, PAGE) == file_bytes(data, _ONE[0], 0, PAGE)
    # A forced delete of the region ends the VM; an endpoint of a deleted region is closed.
    third = client.open_firecracker_endpoint(first["region_id"], str(service.base / "one.sock"))
    client.delete_region(first["region_id"], force=True)
    settle(lambda: (vm_entry(client, machine.pid) or {}).get("ended") is not None, "VM ended")
    assert not (service.base / "one.sock").exists()
    assert [e["id"] for e in client.list_firecracker_endpoints()] == [second["id"]]
    (closed,) = [
        line
        for line in service.logs().splitlines()
        if "event=firecracker_endpoint_closed" in line and f"endpoint={third['id']}" in line
    ]
    assert "the region was deleted" in closed
    machine.child.kill()
    # The service's stop removes the sockets of the endpoints still open.
    assert (service.base / "two.sock").exists()
    assert service.stop() == 0
    assert not (service.base / "two.sock").exists()
    assert "firecracker_endpoint_closed" in service.logs()


@pytest.mark.timeout(90)
def test_cli_round_trip(
    service: Service, client: Client, snapshot: tuple[Path, bytes], children: Callable[..., Child]
) -> None:
    path, data = snapshot
    target = ("--target", str(service.socket))
    sock = str(service.base / "cli.sock")
    code, out, err = cli("firecracker", "--snapshot", str(path), "--socket", sock, *target)
    assert code == 0, err
    endpoint = json.loads(out)
    assert endpoint["socket_path"] == sock
    region = client.get_region(endpoint["region_id"])
    assert region.size == path.stat().st_size
    assert region.source.path == str(path)
    regions = [GuestRegion(16 * PAGE, 32 * PAGE)]
    machine = Vmm(children, endpoint, regions, path)
    assert machine.read(0) == file_bytes(data, regions[0])
    code, out, err = cli("firecracker", "ls", "--json", *target)
    assert code == 0, err
    listed = json.loads(out)
    assert [(e["id"], e["attached"]) for e in listed] == [(endpoint["id"], 1)]
    code, out, err = cli("firecracker", "ls", *target)
    assert code == 0 and endpoint["id"] in out.decode()
    code, out, err = cli("stats", "--json", *target)
    assert code == 0
    (vm,) = [e for e in json.loads(out) if e["kind"] == "firecracker"]
    assert vm["pid"] == machine.pid and len(vm["ranges"]) == 1
    code, out, err = cli("firecracker", "close", endpoint["id"], *target)
    assert code == 0, err
    assert f"closed {endpoint['id']}" in out.decode()
    code, _out, err = cli("firecracker", "close", endpoint["id"], *target)
    assert code == 3 and "EndpointNotFoundError" in err
    # --region serves an existing region; a second endpoint on the same socket path is fine
    # once the first is closed.
    code, out, err = cli("firecracker", "--region", region.id, "--socket", sock, *target)
    assert code == 0, err
    assert json.loads(out)["region_id"] == region.id
    code, _out, err = cli("firecracker", "--region", "nosuch", "--socket", sock + "2", *target)
    assert code == 3, err
    odd = path.parent / "odd.mem"
    odd.write_bytes(b"x" * (PAGE + 1))
    code, _out, err = cli("firecracker", "--snapshot", str(odd), "--socket", sock + "3", *target)
    assert code == 2 and "multiple" in err
    code, _out, err = cli("firecracker", *target)
    assert code == 2
    machine.exit()


@pytest.mark.timeout(60)
def test_a_hugetlbfs_guest_is_served_from_a_hugetlb_region_with_or_without_a_balloon(
    service: Service,
    client: Client,
    tmp_path: Path,
    children: Callable[..., Child],
    huge_pages: int,
) -> None:
    huge = 2 << 20
    path, data = random_file(tmp_path, 2 * huge, "huge.mem")
    region = client.create_region(2 * huge, backing="hugetlb", source=Source.of_file(path))
    assert region.page_size == huge
    endpoint = client.open_firecracker_endpoint(region.id, str(service.base / "huge.sock"))
    regions = [GuestRegion(huge, huge, page_size=huge)]
    # Firecracker enables EVENT_REMOVE only for a balloon device; without one it is served.
    machine = Vmm(children, endpoint, regions, path, Handshake(features=Feature(0)))
    assert machine.read(0, 0, 3 * PAGE) == file_bytes(data, regions[0], 0, 3 * PAGE)
    assert machine.read(0) == file_bytes(data, regions[0])
    assert served_entry(client, machine.pid)["counters"]["pages_filled"] == 1
    machine.exit()
    # With a balloon (EVENT_REMOVE), removed huge pages read zeros: hugetlbfs has no
    # UFFDIO_ZEROPAGE, so the engine copies zeros in.
    ballooned = Vmm(children, endpoint, regions, path)
    assert ballooned.read(0, 0, PAGE) == file_bytes(data, regions[0], 0, PAGE)
    ballooned.ask("dontneed", 0, 0, huge)
    for _ in range(2):
        assert ballooned.read(0, 0, huge) == bytes(huge)
    counters = served_entry(client, ballooned.pid)["counters"]
    assert counters["events_remove"] == 1
    assert counters["zero_pages"] >= 1
    ballooned.exit()


@pytest.mark.timeout(60)
def test_a_vm_recorded_once_is_replayed_ahead_of_the_next(
    service: Service, client: Client, snapshot: tuple[Path, bytes], children: Callable[..., Child]
) -> None:
    path, data = snapshot
    size = path.stat().st_size
    region = client.create_region(size, source=Source.of_file(path))
    recorder = client.open_firecracker_endpoint(
        region.id, str(service.base / "record.sock"), record=True
    )
    assert recorder["record"] is True
    regions = [GuestRegion(64 * PAGE, 100 * PAGE), GuestRegion(32 * PAGE, 0)]
    touched = [(0, 5 * PAGE), (0, 40 * PAGE), (1, 17 * PAGE), (0, 63 * PAGE)]
    first = Vmm(children, recorder, regions, path)
    for index, offset in touched:
        assert first.read(index, offset, 1) == file_bytes(data, regions[index], offset, 1)
    first_pid = first.pid
    first.exit()
    settle(
        lambda: (vm_entry(client, first_pid) or {}).get("recording_id", "") != "",
        "the first VM's recording saved",
    )
    entry = vm_entry(client, first_pid)
    assert entry is not None
    recording_id = entry["recording_id"]
    settle(
        lambda: any(r["recording_id"] == recording_id for r in client.list_recordings()),
        "the recording written",
    )

    replayer = client.open_firecracker_endpoint(
        region.id, str(service.base / "replay.sock"), replay=recording_id
    )
    second = Vmm(children, replayer, regions, path)
    settle(lambda: served_entry(client, second.pid)["replay_pending"] == 0, "the replay finished")
    for index, offset in touched:
        assert second.read(index, offset, PAGE) == file_bytes(data, regions[index], offset, PAGE)
    served = served_entry(client, second.pid)
    assert served["replay_pages"] == len(touched)
    assert served["counters"]["faults"] == 0, "a replayed page faulted"
    assert served["counters"]["pages_prefetched"] >= len(touched)
    # A page nobody recorded still faults and reads the snapshot.
    assert second.read(0, 20 * PAGE, PAGE) == file_bytes(data, regions[0], 20 * PAGE, PAGE)
    assert served_entry(client, second.pid)["counters"]["faults"] == 1
    second.exit()

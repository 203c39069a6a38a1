"""Every RPC through the Python library against the real service: backings, sources, and bad
input on every field answered by the right exception while the service keeps serving."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from shmfault import memory, probe
from shmfault.client import Client
from shmfault.errors import (
    AlreadyExistsError,
    HugePagesUnavailableError,
    InvalidArgumentError,
    PermissionDeniedError,
    QuotaExceededError,
    RegionBusyError,
    RegionNotFoundError,
    RequestError,
    ServiceUnavailableError,
    SourceUnavailableError,
)
from shmfault.memory import BackingKind
from shmfault.modes import CHAIN
from shmfault.store import FillPolicy, Source, SourceKind
from shmfault.uffd import Uffd
from shmfault.v1 import shmfault_pb2 as pb
from shmfault.v1 import shmfault_pb2_grpc as pb_grpc
from tests.conftest import no_free_huge_pages
from tests.integration.conftest import Service

pytestmark = pytest.mark.timeout(60)

PAGE = os.sysconf("SC_PAGE_SIZE")
GiB = 1 << 30


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    path = tmp_path / "vm.mem"
    path.write_bytes(b"".join(bytes([i + 1]) * PAGE for i in range(8)))
    return path


def test_create_get_list_delete(client: Client) -> None:
    region = client.create_region(4 * PAGE, name="first", labels={"team": "a"})
    assert region.attach_token
    assert region.handoff_socket.endswith("/handoff.sock")
    assert region.backing is BackingKind.MEMFD
    assert region.fill_policy is FillPolicy.LAZY
    assert region.created > 0
    got = client.get_region("first")
    assert got.id == region.id
    assert got.attach_token == ""
    assert got.labels == {"team": "a"}
    assert [r.id for r in client.list_regions({"team": "a"})] == [region.id]
    assert client.list_regions({"team": "b"}) == []
    client.delete_region(region.id)
    with pytest.raises(RegionNotFoundError):
        client.get_region(region.id)


def test_list_pages_through_everything(client: Client) -> None:
    made = sorted(client.create_region(PAGE, labels={"batch": "x"}).id for _ in range(25))
    assert [r.id for r in client.iter_regions({"batch": "x"}, page_size=4)] == made
    assert [r.id for r in client.list_regions()] == made


@pytest.mark.parametrize("backing", ["memfd", "posix-shm"])
@pytest.mark.parametrize("policy", ["lazy", "eager"])
def test_every_source_on_every_backing(
    client: Client, snapshot: Path, backing: str, policy: str
) -> None:
    file_region = client.create_region(
        4 * PAGE, backing=backing, source=Source.of_file(snapshot, PAGE), fill_policy=policy
    )
    assert file_region.source == Source(SourceKind.FILE, str(snapshot), PAGE)
    assert file_region.allocated_bytes == (4 * PAGE if policy == "eager" else 0)
    assert client.read(file_region.id, 0, 2) == b"\x02\x02"
    assert client.read(file_region.id) == snapshot.read_bytes()[PAGE : 5 * PAGE]

    clone = client.create_region(
        2 * PAGE, backing=backing, source=Source.of_region(file_region.id), fill_policy=policy
    )
    assert clone.source.region == file_region.id
    assert client.read(clone.id, PAGE, 1) == b"\x03"

    zero = client.create_region(2 * PAGE, backing=backing, fill_policy=policy)
    assert client.read(zero.id) == bytes(2 * PAGE)

    writable = client.create_region(
        2 * PAGE, backing=backing, source=Source(SourceKind.BYTES), fill_policy=policy
    )
    payload = os.urandom(PAGE + 100)
    assert client.write(writable.id, 50, payload) == len(payload)
    assert client.read(writable.id, 50, len(payload)) == payload
    assert client.read(writable.id, 0, 50) == bytes(50)
    if backing == "posix-shm":
        assert writable.shm_name
        with open(f"/dev/shm{writable.shm_name}", "rb") as shared:
            assert shared.read()[50 : 50 + len(payload)] == payload
    for region in (clone, file_region, zero, writable):
        client.delete_region(region.id)


def test_large_writes_and_reads_stream(client: Client) -> None:
    size = 3 * (1 << 20) + 2 * PAGE
    region = client.create_region(size, source=Source(SourceKind.BYTES))
    payload = os.urandom(size - 10)
    assert client.write(region.id, 10, payload) == len(payload)
    pieces = list(client.iter_read(region.id))
    assert len(pieces) == 4
    assert b"".join(pieces)[10:] == payload


def test_sparse_64_gib_region(client: Client) -> None:
    region = client.create_region(64 * GiB, backing="posix-shm")
    assert region.allocated_bytes == 0
    assert os.stat(f"/dev/shm{region.shm_name}").st_blocks == 0
    assert client.read(region.id, 64 * GiB - 4, 4) == bytes(4)
    client.write(region.id, 32 * GiB, b"x")
    assert client.get_region(region.id).allocated_bytes == PAGE
    client.delete_region(region.id)
    assert not os.path.exists(f"/dev/shm{region.shm_name}")


def expect(
    error: type[RequestError], field: str, call: object, *args: object, **kw: object
) -> RequestError:
    """Call and check the exception class and the field it names."""
    assert callable(call)
    with pytest.raises(error) as info:
        call(*args, **kw)
    assert info.value.field == field, str(info.value)
    return info.value


def test_bad_input_on_every_field(client: Client, snapshot: Path, tmp_path: Path) -> None:
    create = client.create_region
    assert "0" in str(expect(InvalidArgumentError, "size", create, 0))
    assert "4097" in str(expect(InvalidArgumentError, "size", create, PAGE + 1))
    message = str(expect(QuotaExceededError, "size", create, 1 << 63))
    assert "max_region_bytes" in message
    expect(QuotaExceededError, "size", create, (1 << 64) - PAGE)
    expect(InvalidArgumentError, "size", create, 1 << 64)  # does not fit uint64: refused locally
    expect(InvalidArgumentError, "size", create, -PAGE)
    for name in ("a/b", "..", "x" * 200, "nul\0"):
        expect(InvalidArgumentError, "name", create, PAGE, name=name)
    expect(InvalidArgumentError, "labels", create, PAGE, labels={"bad key": "v"})
    missing = str(tmp_path / "missing")
    assert missing in str(
        expect(
            InvalidArgumentError, "source.file.path", create, PAGE, source=Source.of_file(missing)
        )
    )
    expect(InvalidArgumentError, "source.file.path", create, PAGE, source=Source.of_file("rel"))
    message = str(
        expect(
            InvalidArgumentError,
            "source.file.offset",
            create,
            PAGE,
            source=Source.of_file(snapshot, 100 * PAGE),
        )
    )
    assert str(snapshot) in message
    assert str(100 * PAGE) in message
    expect(InvalidArgumentError, "size", create, 9 * PAGE, source=Source.of_file(snapshot))
    expect(
        InvalidArgumentError,
        "source.file.offset",
        create,
        PAGE,
        source=Source.of_file(snapshot, 1 << 64),
    )
    expect(
        RegionNotFoundError, "source.region", create, PAGE, source=Source.of_region("r000000000000")
    )
    expect(InvalidArgumentError, "backing", create, PAGE, backing="tmpfs")

    region = create(2 * PAGE, name="taken")
    expect(AlreadyExistsError, "name", create, PAGE, name="taken")
    for ref in ("r000000000000", "no-such-name"):
        expect(RegionNotFoundError, "region", client.get_region, ref)
        expect(RegionNotFoundError, "region", client.delete_region, ref)
        expect(RegionNotFoundError, "region", client.read, ref)
        expect(RegionNotFoundError, "region", client.write, ref, 0, b"x")
    expect(InvalidArgumentError, "region", client.get_region, "")
    expect(InvalidArgumentError, "offset", client.read, region.id, 3 * PAGE, 1)
    expect(InvalidArgumentError, "length", client.read, region.id, PAGE, 2 * PAGE)
    expect(InvalidArgumentError, "length", client.write, region.id, 2 * PAGE - 1, b"ab")
    expect(InvalidArgumentError, "offset", client.write, region.id, 1 << 64, b"ab")
    expect(InvalidArgumentError, "offset", client.read, region.id, -1, 1)
    # Every refusal above left the service serving.
    assert client.get_region("taken").id == region.id


def test_raw_protocol_violations(service: Service) -> None:
    with grpc.insecure_channel(f"unix:{service.socket}") as channel:
        stub = pb_grpc.ShmfaultStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateRegion(pb.CreateRegionRequest(size=PAGE, backing=99))  # type: ignore[arg-type]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateRegion(pb.CreateRegionRequest(size=PAGE, fill_policy=7))  # type: ignore[arg-type]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as info:
            stub.WriteRegion(iter([pb.WriteRegionRequest(offset=0, data=b"x")]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as info:
            stub.ListRegions(pb.ListRegionsRequest(page_token="forged"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        created = stub.CreateRegion(pb.CreateRegionRequest(size=PAGE))
        other = stub.CreateRegion(pb.CreateRegionRequest(size=PAGE))
        chunks = [
            pb.WriteRegionRequest(region=created.region.id, offset=0, data=b"ab"),
            pb.WriteRegionRequest(region=other.region.id, offset=2, data=b"cd"),
        ]
        with pytest.raises(grpc.RpcError) as info:
            stub.WriteRegion(iter(chunks))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "after 2 bytes" in info.value.details()  # type: ignore[attr-defined]
        metadata = dict(info.value.trailing_metadata())  # type: ignore[attr-defined]
        assert metadata["shmfault-error"] == "InvalidArgumentError"
        assert metadata["shmfault-field"] == "region"


def test_quota_limits(service_dir: Path, shm_prefix: str) -> None:
    limited = Service(
        service_dir,
        shm_prefix,
        ["--max-regions", "2", "--max-total-bytes", str(3 * PAGE), "--max-region-bytes", "2M"],
    )
    limited.start()
    try:
        with limited.client() as client:
            assert "max_region_bytes 2097152" in str(
                expect(QuotaExceededError, "size", client.create_region, 4 << 20)
            )
            client.create_region(2 * PAGE)
            assert "max_total_bytes" in str(
                expect(QuotaExceededError, "size", client.create_region, 2 * PAGE)
            )
            client.create_region(PAGE)
            assert "max_regions is 2" in str(
                expect(QuotaExceededError, "", client.create_region, PAGE)
            )
            assert len(client.list_regions()) == 2
    finally:
        assert limited.stop() == 0


def test_delete_refused_while_source_of_another(client: Client) -> None:
    origin = client.create_region(PAGE)
    clone = client.create_region(PAGE, source=Source.of_region(origin.id))
    with pytest.raises(RegionBusyError, match=clone.id):
        client.delete_region(origin.id, force=True)
    client.delete_region(clone.id)
    client.delete_region(origin.id)


def test_source_file_shrinking_is_failed_precondition(client: Client, snapshot: Path) -> None:
    region = client.create_region(8 * PAGE, source=Source.of_file(snapshot))
    os.truncate(snapshot, PAGE)
    with pytest.raises(SourceUnavailableError, match="shrank"):
        client.read(region.id, 4 * PAGE, 1)
    assert client.read(region.id, 0, 1) == b"\x01"


def test_source_roots_deny_other_files(
    service_dir: Path, shm_prefix: str, snapshot: Path, tmp_path: Path
) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    confined = Service(service_dir, shm_prefix, ["--source-root", str(allowed)])
    confined.start()
    try:
        with confined.client() as client:
            expect(
                PermissionDeniedError,
                "source.file.path",
                client.create_region,
                PAGE,
                source=Source.of_file(snapshot),
            )
    finally:
        assert confined.stop() == 0


@pytest.mark.skipif(not no_free_huge_pages(), reason="this machine has free huge pages")
def test_hugetlb_refused_without_free_pages(client: Client) -> None:
    huge = memory.default_huge_page_size()
    error = expect(HugePagesUnavailableError, "size", client.create_region, huge, backing="hugetlb")
    assert "free_hugepages" in str(error)
    assert client.list_regions() == []


@pytest.mark.root
def test_hugetlb_region(client: Client, huge_pages: int) -> None:
    huge = memory.default_huge_page_size()
    region = client.create_region(2 * huge, backing="hugetlb", source=Source(SourceKind.BYTES))
    assert region.page_size == huge
    client.write(region.id, huge - 1, b"ab")
    assert client.read(region.id, huge - 1, 2) == b"ab"
    assert client.get_region(region.id).allocated_bytes == 2 * huge
    client.delete_region(region.id)


def test_capabilities_are_the_services_probe_report(client: Client) -> None:
    report = client.capabilities()
    assert report["schema_version"] == probe.SCHEMA_VERSION
    with Uffd.open() as uffd:
        assert report["api"]["features_mask"] == int(uffd.available_features)
    assert report["modes"]["best"] in [mode.wire_name for mode in CHAIN]
    assert {"anonymous", "memfd", "posix_shm", "hugetlb"} <= set(report["memory"])


def test_unreachable_service(tmp_path: Path) -> None:
    with (
        Client(tmp_path / "nothing.sock") as client,
        pytest.raises(ServiceUnavailableError, match="cannot reach"),
    ):
        client.list_regions()

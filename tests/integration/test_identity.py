"""Identities and region owners against the real service (docs/security.md §3.1, §3.3;
docs/protocol.md §3.7): a client identifies on the handoff socket, where the kernel vouches for
its uid; the regions it creates are its own; another uid can neither see nor use them; root and
the service's uid can; anonymous callers share what nobody owns; limits hold per uid."""

from __future__ import annotations

import grp
import multiprocessing
import os
import pwd
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from shmfault import _unix, errors, protocol
from shmfault.attach import AttachError, identify
from shmfault.client import Client
from shmfault.identity import CREDENTIAL_METADATA_KEY
from shmfault.store import Source
from shmfault.v1 import shmfault_pb2 as pb
from shmfault.v1 import shmfault_pb2_grpc as pb_grpc
from tests.integration.attach_helpers import PAGE, fd_count, service_pid, settle
from tests.integration.conftest import Service

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

#: Two uids that are neither root nor the service's, for the children that act as them.
ALICE, BOB = 61001, 61002


@pytest.fixture
def group() -> tuple[str, int]:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")
    return grp.getgrgid(nobody.pw_gid).gr_name, nobody.pw_gid


@pytest.fixture
def shared(open_dir: Path, shm_prefix: str, group: tuple[str, int]) -> Iterator[Service]:
    """A service whose sockets the group may use: several uids are its callers."""
    running = Service(open_dir, shm_prefix, ["--group", group[0], "--max-regions-per-uid", "2"])
    running.start()
    yield running
    running.stop()


#: Children that act as other uids are forked from a fork server: a fresh interpreter that
#: imported this module but never opened a gRPC channel (a child forked from the test process,
#: whose channels have threads, cannot reliably open its own), and that runs as root until the
#: child drops to its uid, so nothing needs to be readable by that uid.
_FORK_SERVER = multiprocessing.get_context("forkserver")
_FORK_SERVER.set_forkserver_preload([__name__])


def _run_as(
    results: Any, uid: int, gid: int, func: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        results.put(("ok", func(*args)))
    except BaseException as exc:  # whatever it is, the test reports it
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def as_uid(uid: int, gid: int, func: Callable[..., Any], *args: Any) -> Any:
    """``func(*args)`` in a child that runs as ``uid`` (with ``gid``, no other groups)."""
    results = _FORK_SERVER.Queue()
    child = _FORK_SERVER.Process(target=_run_as, args=(results, uid, gid, func, args))
    child.start()
    try:
        kind, value = results.get(timeout=30)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
    assert kind == "ok", value
    return value


def raw_stub(service: Service) -> tuple[grpc.Channel, pb_grpc.ShmfaultStub]:
    channel = grpc.insecure_channel(f"unix:{service.socket}")
    return channel, pb_grpc.ShmfaultStub(channel)


def status_of(call: Callable[[], object]) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined, no-any-return]
    return None


# --- in the child processes ---


def _create(socket_path: str, name: str) -> dict[str, Any]:
    with Client(socket_path) as client:
        region = client.create_region(4 * PAGE, name=name)
        client.write(region.id, 0, name.encode())
        return {"id": region.id, "owner": region.owner_uid, "uid": client.uid}


def _try_everything(socket_path: str, region_id: str) -> dict[str, str]:
    """Every call a caller could make on someone else's region: the error class of each."""
    outcomes: dict[str, str] = {}
    with Client(socket_path) as client:
        calls: dict[str, Callable[[], object]] = {
            "get": lambda: client.get_region(region_id),
            "read": lambda: client.read(region_id),
            "write": lambda: client.write(region_id, 0, b"x"),
            "token": lambda: client.issue_attach_token(region_id),
            "clone": lambda: client.create_region(4 * PAGE, source=Source.of_region(region_id)),
            "stats": lambda: client.stats(region_id),
            "delete": lambda: client.delete_region(region_id),
        }
        for name, call in calls.items():
            try:
                call()
                outcomes[name] = "allowed"
            except errors.ShmfaultError as exc:
                outcomes[name] = type(exc).__name__
        outcomes["listed"] = str(any(r.id == region_id for r in client.list_regions()))
    return outcomes


def _create_until_refused(socket_path: str) -> list[str]:
    made: list[str] = []
    with Client(socket_path) as client:
        for _ in range(3):
            try:
                made.append(client.create_region(PAGE).id)
            except errors.QuotaExceededError as exc:
                made.append(f"refused: {exc}")
    return made


# --- the tests ---


def test_a_client_identifies_and_what_it_creates_is_its_own(client: Client) -> None:
    region = client.create_region(4 * PAGE)
    assert client.uid == os.getuid()
    assert client.identity_error == ""
    assert region.owner_uid == os.getuid()
    assert client.get_region(region.id).owner_uid == os.getuid()


def test_another_uid_can_neither_see_nor_use_a_region_it_does_not_own(
    shared: Service, group: tuple[str, int]
) -> None:
    """docs/security.md §3.1: every call on a region checks its owner against the caller's
    credential; listings leave out what the caller may not use."""
    gid = group[1]
    alices = as_uid(ALICE, gid, _create, str(shared.socket), "alices")
    assert alices["owner"] == alices["uid"] == ALICE
    outcomes = as_uid(BOB, gid, _try_everything, str(shared.socket), alices["id"])
    denied = "PermissionDeniedError"
    assert outcomes == {
        "get": denied,
        "read": denied,
        "write": denied,
        "token": denied,
        "clone": denied,
        "stats": denied,
        "delete": denied,
        "listed": "False",
    }
    # Root may use every region (and the region is whole).
    with shared.client() as root:
        assert root.read(alices["id"], 0, 6) == b"alices"
        assert alices["id"] in {r.id for r in root.list_regions()}
    # Alice herself may.
    outcomes = as_uid(ALICE, gid, _try_everything, str(shared.socket), alices["id"])
    assert {outcomes[k] for k in ("get", "read", "write", "token", "clone")} == {"allowed"}
    assert outcomes["delete"] == "RegionBusyError"  # past the owner check: her clone needs it
    assert outcomes["listed"] == "True"


def test_anonymous_callers_share_what_nobody_owns_and_cannot_see_the_rest(
    service: Service, client: Client
) -> None:
    owned = client.create_region(4 * PAGE)
    channel, stub = raw_stub(service)
    with channel:
        created = stub.CreateRegion(pb.CreateRegionRequest(size=4 * PAGE))
        assert not created.region.HasField("owner_uid")
        listed = {r.id for r in stub.ListRegions(pb.ListRegionsRequest()).regions}
        assert listed == {created.region.id}
        code = status_of(lambda: stub.GetRegion(pb.GetRegionRequest(region=owned.id)))
        assert code is grpc.StatusCode.PERMISSION_DENIED
    # An identified caller may use what nobody owns.
    assert client.get_region(created.region.id).owner_uid is None


def test_a_credential_dies_with_its_identity_connection(service: Service) -> None:
    link = identify(service.runtime_dir / "handoff.sock")
    metadata = ((CREDENTIAL_METADATA_KEY, link.credential.hex()),)
    channel, stub = raw_stub(service)
    with channel:
        answer = stub.GetCapabilities(pb.GetCapabilitiesRequest(), metadata=metadata)
        assert answer.caller_uid == os.getuid()
        link.close()

        def refused() -> bool:
            code = status_of(lambda: stub.ListRegions(pb.ListRegionsRequest(), metadata=metadata))
            return code is grpc.StatusCode.UNAUTHENTICATED

        settle(refused, "the credential is revoked once its connection closed")
        made_up = ((CREDENTIAL_METADATA_KEY, os.urandom(32).hex()),)
        code = status_of(lambda: stub.ListRegions(pb.ListRegionsRequest(), metadata=made_up))
        assert code is grpc.StatusCode.UNAUTHENTICATED
        garbage = ((CREDENTIAL_METADATA_KEY, "not hex"),)
        code = status_of(lambda: stub.ListRegions(pb.ListRegionsRequest(), metadata=garbage))
        assert code is grpc.StatusCode.UNAUTHENTICATED


def test_a_service_that_requires_identity_refuses_anonymous_calls(
    service_dir: Path, shm_prefix: str
) -> None:
    strict = Service(service_dir, shm_prefix, ["--require-identity"])
    strict.start()
    try:
        channel, stub = raw_stub(strict)
        with channel:
            code = status_of(lambda: stub.ListRegions(pb.ListRegionsRequest()))
            assert code is grpc.StatusCode.UNAUTHENTICATED
            # The one call answered anonymously says where to identify.
            answer = stub.GetCapabilities(pb.GetCapabilitiesRequest())
            assert answer.identity_required
            assert answer.handoff_socket == str(strict.runtime_dir / "handoff.sock")
            assert not answer.HasField("caller_uid")
        with strict.client() as client:  # identifies by itself
            assert client.create_region(PAGE).owner_uid == os.getuid()
    finally:
        strict.stop()


def test_limits_hold_per_uid_and_not_for_root(shared: Service, group: tuple[str, int]) -> None:
    """docs/security.md §3.3: --max-regions-per-uid 2 stops each uid at two regions; root and
    the service's uid are held to the totals only."""
    made = as_uid(ALICE, group[1], _create_until_refused, str(shared.socket))
    assert made[2].startswith("refused:") and f"uid {ALICE} hold 2 regions" in made[2], made
    # Bob has his own two.
    made = as_uid(BOB, group[1], _create_until_refused, str(shared.socket))
    assert not made[1].startswith("refused") and made[2].startswith("refused")
    with shared.client() as root:
        assert len([root.create_region(PAGE) for _ in range(3)]) == 3


def test_a_client_identifies_again_after_a_restart(service: Service) -> None:
    with service.client() as client:
        first = client.create_region(PAGE, backing="posix-shm")
        service.restart()
        # The old credential died with the old process: the client notices, identifies
        # again, and still owns its region.
        assert client.get_region(first.id).owner_uid == os.getuid()
        assert client.uid == os.getuid()


def test_an_identity_connection_that_speaks_again_is_closed_and_nothing_leaks(
    service: Service, client: Client
) -> None:
    """docs/protocol.md §3.7: after IDENTITY the client may send nothing; doing so ends the
    connection and revokes the credential. Identities hold no fd once they end."""
    pid = service_pid(service)
    client.create_region(PAGE)  # the client's own identity is up before the baseline
    baseline = fd_count(pid)
    links = [identify(service.runtime_dir / "handoff.sock") for _ in range(20)]
    settle(lambda: fd_count(pid) == baseline + 20, "one fd per identity")
    hostile = links[0].connection
    _unix.send_packet(hostile, protocol.encode(protocol.Identify()))
    reply = _unix.recv_packet(hostile)
    assert reply is not None
    message = protocol.decode(reply.data)
    assert isinstance(message, protocol.ErrorMessage)
    assert message.code is protocol.ErrorCode.UNEXPECTED
    assert _unix.recv_packet(hostile) is None
    for link in links:
        link.close()
    settle(lambda: fd_count(pid) == baseline, f"the service is back at {baseline} fds")


def test_identities_are_limited_per_uid(service_dir: Path, shm_prefix: str) -> None:
    service = Service(service_dir, shm_prefix)
    service.start()
    try:
        links = [identify(service.runtime_dir / "handoff.sock") for _ in range(256)]
        with pytest.raises(AttachError) as caught:
            identify(service.runtime_dir / "handoff.sock")
        assert caught.value.code is protocol.ErrorCode.LIMIT
        assert "the limit per uid" in str(caught.value)
        assert len(links) == 256
        for link in links:
            link.close()
        # Once they closed, identifying works again.
        identify(service.runtime_dir / "handoff.sock").close()
    finally:
        service.stop()


def _create_from_files(socket_path: str, paths: list[str]) -> list[str]:
    outcomes = []
    with Client(socket_path) as client:
        for path in paths:
            try:
                made = client.create_region(PAGE, source=Source.of_file(path))
                client.delete_region(made.id)  # within the service's two regions per uid
                outcomes.append("allowed")
            except errors.ShmfaultError as exc:
                outcomes.append(type(exc).__name__)
    return outcomes


def test_a_file_source_must_be_readable_by_the_caller_itself(
    shared: Service, group: tuple[str, int], open_dir: Path
) -> None:
    """docs/security.md §3.2: the service (root) opens file sources for its callers; it refuses
    to open for a caller a file that caller could not read itself, by the file's mode bits,
    after following symlinks."""
    gid = group[1]
    files = open_dir / "files"
    files.mkdir(mode=0o755)

    def make(name: str, mode: int, uid: int = 0, file_gid: int = 0) -> str:
        path = files / name
        path.write_bytes(bytes(PAGE))
        os.chown(path, uid, file_gid)
        os.chmod(path, mode)
        return str(path)

    secret = make("secret", 0o600)
    paths = [
        secret,
        make("alices", 0o600, uid=ALICE),
        make("everyones", 0o644),
        make("groups", 0o640, file_gid=gid),
        make("others-group", 0o640, file_gid=gid + 1),
        make("alices-but-unreadable", 0o200, uid=ALICE),
    ]
    link = files / "link-to-secret"
    link.symlink_to(secret)
    os.lchown(link, ALICE, gid)
    paths.append(str(link))
    outcomes = as_uid(ALICE, gid, _create_from_files, str(shared.socket), paths)
    denied = "PermissionDeniedError"
    assert outcomes == [denied, "allowed", "allowed", "allowed", denied, denied, denied]
    # Root may use any file the service can read.
    assert _create_from_files(str(shared.socket), [secret]) == ["allowed"]
    # So may nobody in particular, only what everyone may read.
    channel, stub = raw_stub(shared)
    with channel:
        for path, expected in ((secret, grpc.StatusCode.PERMISSION_DENIED), (paths[2], None)):
            request = pb.CreateRegionRequest(
                size=PAGE, source=pb.Source(file=pb.FileSource(path=path))
            )
            assert status_of(lambda r=request: stub.CreateRegion(r)) is expected


def _open_endpoints(socket_path: str, paths: list[str]) -> list[str]:
    outcomes = []
    with Client(socket_path) as client:
        region = client.create_region(PAGE)
        for path in paths:
            try:
                endpoint = client.open_firecracker_endpoint(region.id, path)
                client.close_firecracker_endpoint(endpoint["id"])
                outcomes.append("allowed")
            except errors.ShmfaultError as exc:
                outcomes.append(type(exc).__name__)
        client.delete_region(region.id)
    return outcomes


def test_an_endpoint_socket_goes_only_where_its_caller_could_create_a_file(
    shared: Service, group: tuple[str, int], open_dir: Path
) -> None:
    """docs/security.md §3.1: the service binds a Firecracker endpoint's socket as root, so a
    caller may only have it made in a directory it could write itself."""
    gid = group[1]
    roots = open_dir / "roots"
    roots.mkdir(mode=0o755)
    alices = open_dir / "alices"
    alices.mkdir(mode=0o700)
    os.chown(alices, ALICE, gid)
    shared_tmp = open_dir / "tmp"
    shared_tmp.mkdir()
    os.chmod(shared_tmp, 0o1777)
    paths = [str(roots / "a.sock"), str(alices / "a.sock"), str(shared_tmp / "a.sock")]
    outcomes = as_uid(ALICE, gid, _open_endpoints, str(shared.socket), paths)
    assert outcomes == ["PermissionDeniedError", "allowed", "allowed"]
    assert not (roots / "a.sock").exists()

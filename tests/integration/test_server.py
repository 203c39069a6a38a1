"""The server process: health and reflection, paths and their safety, signals, restart,
configuration, TCP, and the generated-code check."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shmfault.store import Source, SourceKind
from tests.integration.conftest import ROOT, Service

pytestmark = pytest.mark.timeout(60)

PAGE = os.sysconf("SC_PAGE_SIZE")


def test_health_and_reflection(service: Service) -> None:
    with grpc.insecure_channel(f"unix:{service.socket}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "shmfault.v1.Shmfault"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=name))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answer = next(iter(reflection.ServerReflectionInfo(iter([request]))))
        names = {s.name for s in answer.list_services_response.service}
        assert {"shmfault.v1.Shmfault", "grpc.health.v1.Health"} <= names


def test_directories_and_socket_are_private(service: Service) -> None:
    assert stat.S_IMODE(os.stat(service.runtime_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(service.state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(service.socket).st_mode) == 0o600
    assert (service.state_dir / "regions.sqlite3").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_removes_the_socket(service: Service, sig: int) -> None:
    with service.client() as client:
        client.create_region(PAGE, backing="posix-shm")
    pid = service.process.pid if service.process else 0
    assert service.stop(sig) == 0
    assert not service.socket.exists()
    assert "event=stopped" in service.logs()
    assert not Path(f"/proc/{pid}").exists()


def test_sigterm_lets_an_in_flight_rpc_finish(service: Service, tmp_path: Path) -> None:
    """A ReadRegion stream that is running when SIGTERM arrives is served to its end."""
    size = 32 << 20
    snapshot = tmp_path / "snap"
    snapshot.write_bytes(os.urandom(size))
    with service.client() as client:
        region = client.create_region(size, source=Source.of_file(snapshot))
        stream = client.iter_read(region.id)
        received = [next(stream)]  # the RPC is in flight from here on
        assert service.process is not None
        service.process.send_signal(signal.SIGTERM)
        # The consumer is slower than the service: the stream outlives the signal by far.
        received.extend(stream)
    assert b"".join(received) == snapshot.read_bytes()
    # No second signal: a second SIGTERM during shutdown is the operator's "stop now".
    assert service.process.wait() == 0
    assert not service.socket.exists()
    assert not (service.runtime_dir / "handoff.sock").exists()


def test_restart_keeps_regions_and_posix_shm_content(service: Service, tmp_path: Path) -> None:
    snapshot = tmp_path / "snap"
    snapshot.write_bytes(b"S" * 4 * PAGE)
    with service.client() as client:
        shm = client.create_region(
            4 * PAGE, backing="posix-shm", source=Source.of_file(snapshot), name="keep"
        )
        mem = client.create_region(2 * PAGE, source=Source(SourceKind.BYTES), labels={"k": "v"})
        client.write("keep", PAGE, b"written")
        client.write(mem.id, 0, b"gone")
    service.restart()
    with service.client() as client:
        listed = {r.id: r for r in client.list_regions()}
        assert set(listed) == {shm.id, mem.id}
        assert not listed[shm.id].content_reset
        assert listed[mem.id].content_reset
        assert listed[mem.id].labels == {"k": "v"}
        content = client.read("keep")
        assert content[PAGE : PAGE + 7] == b"written"
        assert content[:PAGE] == b"S" * PAGE
        assert client.read(mem.id, 0, 4) == bytes(4)
    assert "event=region_reset" in service.logs()


def test_symlinked_runtime_dir_is_refused(service_dir: Path, shm_prefix: str) -> None:
    real = service_dir / "real"
    real.mkdir()
    (service_dir / "run").symlink_to(real)
    refused = Service(service_dir, shm_prefix)
    assert refused.spawn().wait() == 1
    assert "is a symlink" in refused.log.read_text()


def test_socket_owned_by_another_user_is_refused(service_dir: Path, shm_prefix: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the socket file to another uid")
    runtime = service_dir / "run"
    runtime.mkdir(mode=0o700)
    squatter = socket.socket(socket.AF_UNIX)
    squatter.bind(str(runtime / "shmfault.sock"))
    squatter.close()
    os.chown(runtime / "shmfault.sock", 65534, 65534)
    refused = Service(service_dir, shm_prefix)
    assert refused.spawn().wait() == 1
    assert "owned by uid 65534" in refused.log.read_text()


def test_stale_socket_is_removed_but_live_one_is_kept(service: Service, shm_prefix: str) -> None:
    second = Service(service.base, shm_prefix)
    assert second.spawn().wait() == 1
    assert "another server answers" in second.log.read_text()
    service.process.kill() if service.process else None
    assert service.process is not None
    service.process.wait()
    service.process = None
    assert service.socket.exists()  # killed: it could not clean up
    service.start()
    assert "event=stale_socket_removed" in service.logs()


def test_group_option_makes_directories_group_readable(service_dir: Path, shm_prefix: str) -> None:
    grouped = Service(service_dir, shm_prefix, ["--group", "root"])
    grouped.start()
    try:
        assert stat.S_IMODE(os.stat(grouped.runtime_dir).st_mode) == 0o750
        assert stat.S_IMODE(os.stat(grouped.socket).st_mode) == 0o660
    finally:
        assert grouped.stop() == 0


def test_config_file_and_flags(service_dir: Path, shm_prefix: str) -> None:
    config = service_dir / "config.toml"
    config.write_text('max_regions = 1\nlog_format = "json"\nmax_region_bytes = "1MiB"\n')
    configured = Service(service_dir, shm_prefix, ["--config", str(config)])
    configured.start()
    try:
        with configured.client() as client:
            client.create_region(PAGE)
            with pytest.raises(Exception, match="max_regions is 1"):
                client.create_region(PAGE)
    finally:
        assert configured.stop() == 0
    assert '"event": "rpc_failed"' in configured.logs()


def test_bad_config_is_a_usage_error(service_dir: Path, shm_prefix: str) -> None:
    config = service_dir / "config.toml"
    config.write_text("no_such_setting = 1\n")
    refused = Service(service_dir, shm_prefix, ["--config", str(config)])
    assert refused.spawn().wait() == 2
    assert "unknown setting 'no_such_setting'" in refused.log.read_text()
    config.write_text('max_regions = "many"\n')
    assert refused.spawn().wait() == 2


def test_tcp_listener(service_dir: Path, shm_prefix: str) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    remote = Service(service_dir, shm_prefix, ["--listen-tcp", f"127.0.0.1:{port}"])
    remote.start()
    try:
        from shmfault.client import Client

        with Client(f"127.0.0.1:{port}") as client:
            region = client.create_region(PAGE)
            assert client.get_region(region.id).size == PAGE
        assert f"tcp=127.0.0.1:{port}" in remote.log.read_text()
    finally:
        assert remote.stop() == 0


def test_generated_code_is_current() -> None:
    done = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr

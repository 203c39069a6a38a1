"""``shmfault region ...`` against the real service: output, --json, exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.integration.conftest import Service, cli

pytestmark = pytest.mark.timeout(60)

PAGE = os.sysconf("SC_PAGE_SIZE")


def region_cli(service: Service, *args: str, stdin: bytes = b"") -> tuple[int, bytes, str]:
    return cli("region", *args, "--target", str(service.socket), stdin=stdin)


def test_readme_walkthrough(service: Service, tmp_path: Path) -> None:
    snapshot = tmp_path / "vm.mem"
    snapshot.write_bytes(b"A" * PAGE + b"B" * PAGE)
    code, out, err = region_cli(
        service,
        "create",
        "8K",
        "--file",
        str(snapshot),
        "--backing",
        "posix-shm",
        "--name",
        "vm",
        "--label",
        "env=test",
        "--json",
    )
    assert code == 0, err
    created = json.loads(out)
    assert created["name"] == "vm"
    assert created["source"] == {"kind": "file", "path": str(snapshot), "offset": 0}
    assert created["attach_token"]
    assert created["shm_name"].startswith(f"/{service.shm_prefix}.")

    code, out, err = region_cli(service, "write", "vm", "--offset", "4", "--data", "hello")
    assert (code, out) == (0, b"wrote 5 bytes at 4\n"), err
    code, out, _ = region_cli(service, "write", "vm", "--offset", "4K", stdin=b"stdin!")
    assert code == 0
    code, out, _ = region_cli(service, "read", "vm", "--length", "12")
    assert (code, out) == (0, b"AAAAhelloAAA")
    code, out, _ = region_cli(service, "read", "vm", "--offset", "4096", "--length", "8")
    assert out == b"stdin!BB"

    service.restart()
    code, out, _ = region_cli(service, "ls", "--label", "env=test", "--json")
    assert code == 0
    assert [r["id"] for r in json.loads(out)] == [created["id"]]
    code, out, _ = region_cli(service, "ls")
    assert b"vm" in out
    assert b"posix-shm" in out
    code, out, _ = region_cli(service, "read", "vm", "--length", "12", "--json")
    assert json.loads(out)["data_base64"] == "QUFBQWhlbGxvQUFB"
    code, out, _ = region_cli(service, "show", created["id"])
    assert code == 0
    assert f"id               {created['id']}".encode() in out
    assert b"attach_token" not in out
    output = tmp_path / "dump"
    assert region_cli(service, "read", "vm", "-o", str(output))[0] == 0
    assert output.read_bytes()[:12] == b"AAAAhelloAAA"
    code, out, _ = region_cli(service, "rm", "vm", "--json")
    assert (code, json.loads(out)) == (0, {"deleted": ["vm"]})


def test_exit_codes(service: Service, tmp_path: Path) -> None:
    code, _, err = region_cli(service, "show", "ghost")
    assert code == 3
    assert "RegionNotFoundError: no region 'ghost'" in err
    assert region_cli(service, "rm", "r000000000000")[0] == 3
    code, _, err = region_cli(service, "create", "4097")
    assert code == 1
    assert "not a multiple" in err
    code, _, err = region_cli(service, "create", "4K", "--file", str(tmp_path / "none"))
    assert code == 1
    assert "does not exist" in err
    code, _, err = region_cli(service, "create", "lots")
    assert code == 2
    assert "not a size" in err
    assert region_cli(service, "create", "4K", "--file-offset", "4K")[0] == 2
    assert region_cli(service, "create", "4K", "--file", "x", "--bytes")[0] == 2
    code, _, err = cli("region", "ls", "--target", str(tmp_path / "none.sock"))
    assert code == 4
    assert "cannot reach" in err
    code, out, _ = cli("region", "ls", env={"SHMFAULT_SOCKET": str(service.socket)})
    assert code == 0
    assert out.startswith(b"ID")


def test_clone_eager_and_bytes_sources(service: Service) -> None:
    code, out, _ = region_cli(service, "create", "8K", "--bytes", "--eager", "--json")
    origin = json.loads(out)
    assert origin["allocated_bytes"] == 2 * PAGE
    region_cli(service, "write", origin["id"], "--data", "xyz")
    code, out, _ = region_cli(service, "create", "4K", "--clone", origin["id"], "--json")
    clone = json.loads(out)
    assert clone["source"] == {"kind": "region", "region": origin["id"]}
    assert region_cli(service, "read", clone["id"], "--length", "3")[1] == b"xyz"
    code, _, err = region_cli(service, "rm", origin["id"])
    assert code == 1
    assert "RegionBusyError" in err
    assert region_cli(service, "rm", clone["id"], origin["id"])[0] == 0


def test_serve_help_and_usage() -> None:
    code, out, _ = cli("serve", "--help")
    assert code == 0
    assert b"--runtime-dir" in out
    assert cli("region")[0] == 2

"""The fallbacks of lazy attach, reached for real: clients that are not root, and clients behind
a seccomp filter that denies userfaultfd the way container runtimes do.

Each client is a child forked by tests/worlds.py that drops to ``nobody`` or installs the
filter before it runs. After dropping to nobody the child can import nothing new: every module
it uses is imported here, at the top.

For nobody to reach the handoff socket at all, the service runs as an administrator would set
it up for a group of clients: ``--group`` with nobody's own group (runtime directory 0750 and
sockets 0660, owned by that group), in a directory others may traverse (0711). The pytest
temporary directories are private to root, so the service gets a directory of its own in /tmp.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shmfault.attach import AttachError, attach
from shmfault.client import Client
from shmfault.protocol import ErrorCode
from tests import worlds
from tests.integration.attach_helpers import (
    PAGE,
    entry_of,
    make_region,
    need_modes,
    shuffled,
    wrong_pages,
)
from tests.integration.conftest import Service

PAGES = 64
#: The page a system call writes into before anything touched it.
KERNEL_PAGE = 5
MESSAGE = b"written-by-read(2)"


@pytest.fixture
def nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")


@pytest.fixture
def shared_service(shm_prefix: str, nobody: pwd.struct_passwd) -> Iterator[Service]:
    """A service whose sockets nobody's group may use."""
    base = Path(tempfile.mkdtemp(prefix="shmfault-worlds-", dir="/tmp"))
    os.chmod(base, 0o711)
    group = grp.getgrgid(nobody.pw_gid).gr_name
    running = Service(base, shm_prefix, ["--group", group])
    try:
        running.start()
        yield running
    finally:
        if running.process is not None:
            running.process.kill()
            running.process.wait()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def client(shared_service: Service) -> Iterator[Client]:
    with shared_service.client() as connected:
        yield connected


def _use(handoff: str, region_id: str, token: str, mode: str | None, expected: bytes) -> dict:
    """In the child: attach, let the kernel write into an unfilled page (read(2) from a pipe),
    then touch every page; what happened, as plain data."""
    outcome: dict[str, Any] = {"uid": os.getuid(), "pid": os.getpid()}
    with attach(handoff, region_id, token, mode=mode) as attachment:
        outcome.update(
            mode=attachment.mode.wire_name,
            reasons=attachment.reasons,
            user_mode_only=attachment.user_mode_only,
            attachment_id=attachment.attachment_id,
        )
        target = attachment.buffer[KERNEL_PAGE * PAGE : KERNEL_PAGE * PAGE + len(MESSAGE)]
        read_end, write_end = os.pipe()
        try:
            os.write(write_end, MESSAGE)
            try:
                os.readv(read_end, [target])
                outcome["kernel_write"] = "ok"
            except OSError as exc:
                outcome["kernel_write"] = errno.errorcode[exc.errno]
            # Whatever the kernel could not do, user mode can: every page reads right...
            written = bytearray(expected)
            if outcome["kernel_write"] == "ok":
                written[KERNEL_PAGE * PAGE : KERNEL_PAGE * PAGE + len(MESSAGE)] = MESSAGE
            order = shuffled(range(PAGES), seed=os.getuid())
            outcome["wrong"] = wrong_pages(attachment.buffer, bytes(written), order)
            # ...and once the page is there, the system call works too.
            if outcome["kernel_write"] != "ok":
                outcome["kernel_write_after_touch"] = os.readv(read_end, [target])
                outcome["page_after"] = bytes(attachment.buffer[KERNEL_PAGE * PAGE :][:PAGE])
        finally:
            os.close(read_end)
            os.close(write_end)
    return outcome


def _forced(handoff: str, region_id: str, token: str, mode: str) -> tuple[str, str]:
    """In the child: attach forcing ``mode``; the refusal's code and message."""
    try:
        attach(handoff, region_id, token, mode=mode).detach()
    except AttachError as exc:
        return exc.code.name, str(exc)
    return "attached", ""


def _token(client: Client, region_id: str) -> tuple[str, str, str]:
    region, token, handoff = client.issue_attach_token(region_id)
    return handoff, region, token


def _open_path(client: Client, path: str) -> None:
    """Skip, with the probe's reason, where the kernel lacks an open path the test relies on:
    ``user_mode_only`` (5.11) or ``dev_userfaultfd`` (6.1)."""
    access: Any = client.capabilities()["access"]
    check = access["paths"][path]
    if not check["ok"]:
        pytest.skip(f"the probe says {path} cannot be had on this kernel: {check['reason']}")


def _nobody_has_only_user_mode_only(client: Client) -> None:
    """Skip where nobody gets more than a user-mode-only userfaultfd (what the test proves)."""
    _open_path(client, "user_mode_only")
    if Path("/proc/sys/vm/unprivileged_userfaultfd").read_text().strip() == "1":
        pytest.skip("vm.unprivileged_userfaultfd=1 gives nobody the full syscall")
    device = Path("/dev/userfaultfd")
    if device.exists() and device.stat().st_mode & 0o006:
        pytest.skip("/dev/userfaultfd is open to others: nobody gets a full userfaultfd")


def _page_with_message(expected: bytes) -> bytes:
    page = bytearray(expected[KERNEL_PAGE * PAGE : (KERNEL_PAGE + 1) * PAGE])
    page[: len(MESSAGE)] = MESSAGE
    return bytes(page)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", [None, "shared-copy", "shared-continue", "private-copy"])
def test_nobody_attaches_lazily_with_a_user_mode_only_userfaultfd(
    client: Client, tmp_path: Path, nobody: pwd.struct_passwd, mode: str | None
) -> None:
    _nobody_has_only_user_mode_only(client)
    need_modes(client, mode or "shared-copy")
    region, expected = make_region(client, tmp_path, "file", PAGES * PAGE)
    outcome = worlds.run_in_child(
        _use, *_token(client, region.id), mode, expected, user="nobody", timeout=20
    )
    assert outcome["uid"] == nobody.pw_uid
    # nobody may open neither userfaultfd(2) (vm.unprivileged_userfaultfd is 0) nor
    # /dev/userfaultfd (root's 0600): only the user-mode-only kind is left, and it is enough
    # for every lazy mode. The default is still the head of the chain.
    assert outcome["user_mode_only"] is True
    assert outcome["mode"] == (mode or "shared-copy")
    assert outcome["reasons"] == ""
    # A fault taken inside the kernel is not reported to a user-mode-only userfaultfd: the
    # system call fails (docs/protocol.md §5)...
    assert outcome["kernel_write"] == "EFAULT"
    assert outcome["wrong"] == []
    # ...and works once a user-mode touch has filled the page.
    assert outcome["kernel_write_after_touch"] == len(MESSAGE)
    assert outcome["page_after"] == _page_with_message(expected)
    entry = entry_of(client, outcome["attachment_id"])
    assert (entry["uid"], entry["pid"]) == (nobody.pw_uid, outcome["pid"])
    assert entry["end_reason"] == "the client detached"


@pytest.mark.timeout(60)
def test_nobody_attaching_eager_can_read_into_any_page(
    client: Client, tmp_path: Path, nobody: pwd.struct_passwd
) -> None:
    region, expected = make_region(client, tmp_path, "file", PAGES * PAGE)
    outcome = worlds.run_in_child(
        _use, *_token(client, region.id), "eager", expected, user="nobody", timeout=20
    )
    assert outcome["mode"] == "eager"
    assert outcome["user_mode_only"] is False  # no userfaultfd at all
    assert outcome["kernel_write"] == "ok"
    assert outcome["wrong"] == []
    # Eager maps the region itself: the system call's write is in the region.
    assert client.read(region.id, KERNEL_PAGE * PAGE, PAGE) == _page_with_message(expected)


@pytest.mark.timeout(60)
def test_a_client_denied_every_userfaultfd_gets_eager(client: Client, tmp_path: Path) -> None:
    region, expected = make_region(client, tmp_path, "file", PAGES * PAGE)
    outcome = worlds.run_in_child(
        _use,
        *_token(client, region.id),
        None,
        expected,
        deny_userfaultfd=True,
        deny_dev_userfaultfd=True,
        timeout=20,
    )
    assert outcome["mode"] == "eager"
    # Every lazy mode was passed over, each for the same reason.
    reasons = outcome["reasons"].splitlines()
    assert [line.split(":")[0] for line in reasons] == [
        "shared-copy",
        "shared-continue",
        "private-copy",
    ]
    assert all("no userfaultfd" in line for line in reasons), reasons
    assert outcome["kernel_write"] == "ok"
    assert outcome["wrong"] == []
    entry = entry_of(client, outcome["attachment_id"])
    assert entry["mode"] == "eager"
    assert entry["mode_reasons"] == outcome["reasons"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["shared-copy", "private-copy"])
def test_forcing_a_lazy_mode_without_userfaultfd_is_refused(
    client: Client, tmp_path: Path, mode: str
) -> None:
    region, _ = make_region(client, tmp_path, "zero", 4 * PAGE)
    code, message = worlds.run_in_child(
        _forced,
        *_token(client, region.id),
        mode,
        deny_userfaultfd=True,
        deny_dev_userfaultfd=True,
        timeout=20,
    )
    assert code == ErrorCode.MODE_UNAVAILABLE.name
    assert "no userfaultfd" in message
    assert client.get_region(region.id).attachments == 0


@pytest.mark.timeout(60)
def test_a_client_denied_only_the_syscall_gets_a_full_userfaultfd_from_the_device(
    client: Client, tmp_path: Path
) -> None:
    # Root may open /dev/userfaultfd: the filter on the syscall alone changes nothing but the
    # path, and kernel-mode faults are served.
    _open_path(client, "dev_userfaultfd")
    region, expected = make_region(client, tmp_path, "file", PAGES * PAGE)
    outcome = worlds.run_in_child(
        _use, *_token(client, region.id), None, expected, deny_userfaultfd=True, timeout=20
    )
    assert outcome["mode"] == "shared-copy"
    assert outcome["reasons"] == ""
    assert outcome["user_mode_only"] is False
    assert outcome["kernel_write"] == "ok"
    assert outcome["wrong"] == []
    assert client.read(region.id, KERNEL_PAGE * PAGE, PAGE) == _page_with_message(expected)

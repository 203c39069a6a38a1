"""The probe's report logic, on reports built by hand: no kernel needed."""

from __future__ import annotations

import json

import pytest

from shmfault.modes import CHAIN
from shmfault.probe import (
    Capabilities,
    MemoryReport,
    Registration,
    RoundTrip,
    _bracketed,
    _modes,
    format_table,
)


def _report(*, minor_ok: bool, syscall_ok: bool = True) -> Capabilities:
    memory = {
        "anonymous": MemoryReport(
            True,
            register={"missing": Registration(True, ["wake", "copy", "zeropage"])},
            round_trips={"missing-copy": RoundTrip(True, "", 1.0)},
        ),
        "memfd": MemoryReport(
            True,
            register={
                "missing": Registration(True, ["wake", "copy"]),
                "minor": Registration(
                    minor_ok,
                    ["continue"] if minor_ok else [],
                    "" if minor_ok else "kernel lacks MINOR_SHMEM",
                ),
            },
            round_trips={
                "missing-copy": RoundTrip(True, "", 1.0),
                "minor-continue": RoundTrip(minor_ok, "" if minor_ok else "cannot register minor"),
            },
        ),
    }
    path = {
        "ok": syscall_ok,
        "errno": None if syscall_ok else "EPERM",
        "reason": "" if syscall_ok else "denied",
    }
    return Capabilities(
        kernel={
            "release": "6.1.0",
            "machine": "x86_64",
            "page_size": 4096,
            "huge_pages": [],
            "thp": {},
        },
        process={"uid": 0, "cap_sys_ptrace": True, "seccomp": "disabled"},
        access={
            "unprivileged_userfaultfd_sysctl": 0,
            "paths": {
                "syscall": path,
                "dev_userfaultfd": path,
                "user_mode_only": {"ok": True, "errno": None, "reason": ""},
            },
            "userfaultfd": {"ok": True, "reason": ""},
            "kernel_faults": {"ok": syscall_ok, "reason": "" if syscall_ok else "user-mode-only"},
        },
        api={
            "ok": True,
            "reason": "",
            "features_mask": 0x20 | (0x400 if minor_ok else 0),
            "features": ["missing_shmem"] + (["minor_shmem"] if minor_ok else []),
            "unknown_features": [],
            "ioctls": ["register", "unregister", "api"],
        },
        memory=memory,
        modes=_modes(memory),
    )


def test_the_mode_chain_follows_the_round_trips() -> None:
    report = _report(minor_ok=False)
    chain = {mode.name: mode for mode in report.modes}
    assert [mode.name for mode in report.modes] == [mode.wire_name for mode in CHAIN]
    assert chain["shared-copy"].available
    assert not chain["shared-continue"].available
    assert "minor-continue" in chain["shared-continue"].reason
    assert chain["eager"].available
    assert report.best_mode == "shared-copy"


def test_best_mode_is_eager_when_no_round_trip_works() -> None:
    memory = {
        kind: MemoryReport(
            False, "no userfaultfd", round_trips={trip: RoundTrip(False, "no userfaultfd")}
        )
        for kind, trip in (("anonymous", "missing-copy"), ("memfd", "missing-copy"))
    }
    memory["memfd"].round_trips["minor-continue"] = RoundTrip(False, "no userfaultfd")
    modes = _modes(memory)
    assert [m.name for m in modes if m.available] == ["eager"]
    assert all("no userfaultfd" in m.reason for m in modes if not m.available)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("missing_shmem", True),
        ("UFFD_FEATURE_MINOR_SHMEM", False),
        ("minor_shmem", False),
        ("copy", True),
        ("UFFDIO_CONTINUE", False),
        ("shared-copy", True),
        ("shared-continue", False),
        ("eager", True),
        ("syscall", False),
        ("user-mode-only", True),
        ("kernel-faults", False),
        ("userfaultfd", True),
        ("memfd.missing-copy", True),
        ("memfd.minor-continue", False),
    ],
)
def test_lookup_answers_every_kind_of_name(name: str, expected: bool) -> None:
    check = _report(minor_ok=False, syscall_ok=False).lookup(name)
    assert check.ok is expected
    if not expected:
        assert check.reason, f"{name} is missing without a reason"


def test_missing_lists_only_what_is_missing_with_reasons() -> None:
    report = _report(minor_ok=False)
    assert report.missing(["missing_shmem", "shared-copy"]) == []
    missing = report.missing(["shared-continue", "minor_shmem", "eager"])
    assert [name for name, _ in missing] == ["shared-continue", "minor_shmem"]
    assert all(reason for _, reason in missing)


@pytest.mark.parametrize("name", ["bogus", "memfd.no-such-trip", "nosuchmemory.missing-copy", ""])
def test_unknown_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="unknown capability"):
        _report(minor_ok=True).lookup(name)


def test_to_dict_is_json_with_the_documented_top_level_fields() -> None:
    data = json.loads(json.dumps(_report(minor_ok=True).to_dict()))
    assert data["schema_version"] == 1
    assert set(data) == {"schema_version", "kernel", "process", "access", "api", "memory", "modes"}
    assert data["modes"]["best"] == "shared-copy"
    assert data["memory"]["memfd"]["round_trips"]["minor-continue"] == {
        "ok": True,
        "reason": "",
        "elapsed_ms": None,
    }


def test_table_shows_every_mode_and_the_reasons() -> None:
    table = format_table(_report(minor_ok=False))
    for mode in CHAIN:
        assert mode.wire_name in table
    assert "kernel lacks MINOR_SHMEM" in table
    assert "best mode     shared-copy" in table


@pytest.mark.parametrize(
    ("raw", "selected"),
    [
        ("always [madvise] never", "madvise"),
        ("[always] never", "always"),
        ("plain", "plain"),
        (None, None),
    ],
)
def test_sysfs_choice_lists_are_read_as_their_selection(
    raw: str | None, selected: str | None
) -> None:
    assert _bracketed(raw) == selected

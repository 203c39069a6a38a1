"""Mode policy: requirements per mode and the walk down the fallback chain. No kernel."""

from __future__ import annotations

import pytest

from shmfault._abi import Feature, RegisterMode
from shmfault.modes import (
    CHAIN,
    FORBIDDEN_FEATURES,
    TRACKING_EVENTS,
    Mode,
    ModeUnavailableError,
    UffdAccess,
    choose,
    kernel_support,
    requirements,
)

ALL_WORK = {mode: "" for mode in CHAIN}


def test_the_best_mode_wins_when_everything_works() -> None:
    choice = choose(ALL_WORK, UffdAccess.FULL)
    assert choice.mode is CHAIN[0]
    assert choice.passed_over == ()
    assert choice.reasons == ""


def test_each_step_down_is_recorded_with_its_reason() -> None:
    support = {**ALL_WORK, Mode.SHARED_COPY: "no shmem", Mode.SHARED_CONTINUE: "no minor"}
    choice = choose(support, UffdAccess.USER_MODE_ONLY)
    assert choice.mode is Mode.PRIVATE_COPY
    assert choice.reasons == "shared-copy: no shmem\nshared-continue: no minor"


def test_a_client_without_userfaultfd_gets_eager() -> None:
    choice = choose(ALL_WORK, UffdAccess.NONE)
    assert choice.mode is Mode.EAGER
    assert [mode for mode, _ in choice.passed_over] == [m for m in CHAIN if m is not Mode.EAGER]
    assert all("no userfaultfd" in why for _, why in choice.passed_over)


def test_a_forced_mode_is_used_or_refused_never_downgraded() -> None:
    assert choose(ALL_WORK, UffdAccess.FULL, requested=Mode.PRIVATE_COPY).mode is Mode.PRIVATE_COPY
    support = {**ALL_WORK, Mode.SHARED_CONTINUE: "kernel lacks MINOR_SHMEM"}
    with pytest.raises(ModeUnavailableError, match=r"shared-continue.*MINOR_SHMEM"):
        choose(support, UffdAccess.FULL, requested=Mode.SHARED_CONTINUE)
    with pytest.raises(ModeUnavailableError, match="no userfaultfd"):
        choose(ALL_WORK, UffdAccess.NONE, requested=Mode.SHARED_COPY)


def test_a_minimum_refuses_worse_modes() -> None:
    support = {**ALL_WORK, Mode.SHARED_COPY: "a", Mode.SHARED_CONTINUE: "b"}
    with pytest.raises(ModeUnavailableError, match="at least as good as shared-continue"):
        choose(support, UffdAccess.FULL, minimum=Mode.SHARED_CONTINUE)
    assert choose(support, UffdAccess.FULL, minimum=Mode.PRIVATE_COPY).mode is Mode.PRIVATE_COPY


def test_requirements_per_mode() -> None:
    copy = requirements(Mode.SHARED_COPY)
    assert copy.register_mode == RegisterMode.MISSING
    assert copy.features == Feature.MISSING_SHMEM | TRACKING_EVENTS
    assert copy.maps_region
    cont = requirements(Mode.SHARED_CONTINUE, hugetlb=True)
    assert cont.register_mode == RegisterMode.MISSING | RegisterMode.MINOR
    assert cont.features & Feature.MINOR_HUGETLBFS
    assert cont.features & Feature.MISSING_HUGETLBFS
    private = requirements(Mode.PRIVATE_COPY)
    assert not private.maps_region
    assert private.needs_uffd
    eager = requirements(Mode.EAGER)
    assert not eager.needs_uffd
    assert eager.register_mode == 0
    for mode in CHAIN:
        assert not requirements(mode).features & FORBIDDEN_FEATURES


def test_kernel_support_reads_the_probe_round_trips() -> None:
    report = {
        "memory": {
            "memfd": {
                "round_trips": {
                    "missing-copy": {"ok": True, "reason": ""},
                    "minor-continue": {"ok": False, "reason": "kernel lacks MINOR_SHMEM"},
                }
            },
        }
    }
    support = kernel_support(report)
    assert support[Mode.SHARED_COPY] == ""
    assert "MINOR_SHMEM" in support[Mode.SHARED_CONTINUE]
    assert "no anonymous missing-copy" in support[Mode.PRIVATE_COPY]
    assert support[Mode.EAGER] == ""


@pytest.mark.parametrize("name", ["shared-copy", "SHARED_COPY", " Shared-Copy "])
def test_modes_by_name(name: str) -> None:
    assert Mode.from_name(name) is Mode.SHARED_COPY
    assert Mode.SHARED_COPY.wire_name == "shared-copy"


def test_unknown_mode_name() -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        Mode.from_name("fast")

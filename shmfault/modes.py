"""Attach modes: what each needs from the kernel and the client, and the choice between them.

Pure policy, no I/O: the probe says what the kernel can do, the client says what userfaultfd it
could get, and :func:`choose` walks the fallback chain, best first, recording why each mode it
passes over is not used. A client may force a mode or set a minimum; it then gets
:class:`ModeUnavailableError` instead of a silent step down.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from shmfault._abi import Feature, RegisterMode
from shmfault.errors import ShmfaultError


class Mode(enum.IntEnum):
    """Attach modes, numbered as on the wire (docs/protocol.md)."""

    SHARED_COPY = 1
    SHARED_CONTINUE = 2
    PRIVATE_COPY = 3
    EAGER = 4

    @property
    def wire_name(self) -> str:
        """``shared-copy``, ``shared-continue``, ``private-copy`` or ``eager``."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_name(cls, name: str) -> Mode:
        """The mode called ``name`` (``shared-copy`` or ``SHARED_COPY``). Raises ValueError."""
        key = name.strip().upper().replace("-", "_")
        if key not in cls.__members__:
            raise ValueError(
                f"unknown mode {name!r}: expected one of {', '.join(m.wire_name for m in cls)}"
            )
        return cls[key]


class UffdAccess(enum.IntEnum):
    """What userfaultfd the client could get (HELLO's ``uffd_access``)."""

    NONE = 0
    USER_MODE_ONLY = 1
    FULL = 2


#: The fallback chain, best first. shared-copy leads shared-continue by measurement: it spends
#: less service CPU per fault (one UFFDIO_COPY against a pwrite plus UFFDIO_CONTINUE) and fills
#: sequentially faster (docs/benchmarks.md).
CHAIN: tuple[Mode, ...] = (Mode.SHARED_COPY, Mode.SHARED_CONTINUE, Mode.PRIVATE_COPY, Mode.EAGER)

#: Events every lazy attachment enables, so the service knows when the client drops, unmaps or
#: moves attached memory (and so never fills an address the region no longer backs).
TRACKING_EVENTS = Feature.EVENT_REMOVE | Feature.EVENT_UNMAP | Feature.EVENT_REMAP

#: Features an attached userfaultfd must not have: FORK would hand the service userfaultfds of
#: processes it never authorised; SIGBUS would turn every fault into a signal it never sees.
FORBIDDEN_FEATURES = Feature.EVENT_FORK | Feature.SIGBUS

#: The probe round trip (memory type, trip) that proves a mode works on this kernel, and the
#: registration that stands in for it when round trips were not run.
PROOF: Mapping[Mode, tuple[str, str, str] | None] = {
    Mode.SHARED_COPY: ("memfd", "missing-copy", "missing"),
    Mode.SHARED_CONTINUE: ("memfd", "minor-continue", "minor"),
    Mode.PRIVATE_COPY: ("anonymous", "missing-copy", "missing"),
    Mode.EAGER: None,
}
_NOT_RUN = "not run"

DESCRIPTIONS: Mapping[Mode, str] = {
    Mode.SHARED_COPY: "region fd MAP_SHARED, MISSING faults, UFFDIO_COPY into the shared file",
    Mode.SHARED_CONTINUE: "region fd MAP_SHARED, MISSING+MINOR faults, page cache filled, "
    "then UFFDIO_CONTINUE (a MISSING fault: UFFDIO_COPY on the C fast path)",
    Mode.PRIVATE_COPY: "anonymous MAP_PRIVATE, MISSING faults, UFFDIO_COPY (writes private)",
    Mode.EAGER: "region filled before attach returns; no userfaultfd",
}


@dataclass(frozen=True, slots=True)
class Requirements:
    """What the client must do for a mode: register with ``register_mode`` after enabling
    ``features`` in its UFFDIO_API handshake; map the region fd (``maps_region``) or anonymous
    memory."""

    register_mode: RegisterMode
    features: Feature
    maps_region: bool
    needs_uffd: bool


def requirements(mode: Mode, *, hugetlb: bool = False) -> Requirements:
    """The client's side of ``mode`` for a region of the given backing."""
    missing = Feature.MISSING_HUGETLBFS if hugetlb else Feature.MISSING_SHMEM
    minor = Feature.MINOR_HUGETLBFS if hugetlb else Feature.MINOR_SHMEM
    if mode is Mode.SHARED_COPY:
        return Requirements(RegisterMode.MISSING, missing | TRACKING_EVENTS, True, True)
    if mode is Mode.SHARED_CONTINUE:
        return Requirements(
            RegisterMode.MISSING | RegisterMode.MINOR, missing | minor | TRACKING_EVENTS, True, True
        )
    if mode is Mode.PRIVATE_COPY:
        return Requirements(RegisterMode.MISSING, TRACKING_EVENTS, False, True)
    return Requirements(RegisterMode(0), Feature(0), True, False)


class ModeUnavailableError(ShmfaultError):
    """The mode a client forced, or every mode at least as good as its minimum, cannot be had."""


@dataclass(frozen=True, slots=True)
class Choice:
    """The mode chosen, and one ``(mode, why not)`` per better mode passed over."""

    mode: Mode
    passed_over: tuple[tuple[Mode, str], ...]

    @property
    def reasons(self) -> str:
        """One ``name: why`` line per mode passed over (WELCOME's ``reasons``)."""
        return "\n".join(f"{mode.wire_name}: {why}" for mode, why in self.passed_over)


def kernel_support(capabilities: Mapping[str, object]) -> dict[Mode, str]:
    """Why each mode cannot work on this kernel ('' when it can), from a probe report
    (``Capabilities.to_dict()``)."""
    memory = capabilities.get("memory")
    support: dict[Mode, str] = {}
    for mode in CHAIN:
        proof = PROOF[mode]
        if proof is None:
            support[mode] = ""
            continue
        kind, trip, register_mode = proof
        try:
            result = memory[kind]["round_trips"][trip]  # type: ignore[index]
            if not result["ok"] and str(result["reason"]).startswith(_NOT_RUN):
                # Probed without round trips: the kernel accepting the registration is the
                # best evidence there is.
                result = memory[kind]["register"][register_mode]  # type: ignore[index]
                trip = f"{register_mode} registration"
            support[mode] = "" if result["ok"] else f"{kind} {trip}: {result['reason']}"
        except (KeyError, TypeError):
            support[mode] = f"the probe report has no {kind} {trip} round trip"
    return support


def choose(
    support: Mapping[Mode, str],
    access: UffdAccess,
    *,
    requested: Mode | None = None,
    minimum: Mode | None = None,
) -> Choice:
    """Walk the chain best first; the first mode the kernel and the client allow wins.

    ``support`` is :func:`kernel_support`'s answer. ``requested`` forces one mode; ``minimum``
    refuses modes that come after it in the chain. Pure. Raises
    :class:`ModeUnavailableError` saying why.
    """
    passed_over: list[tuple[Mode, str]] = []
    candidates = (requested,) if requested is not None else CHAIN
    for mode in candidates:
        if minimum is not None and CHAIN.index(mode) > CHAIN.index(minimum):
            break
        why = support.get(mode, "unknown mode")
        if not why and requirements(mode).needs_uffd and access is UffdAccess.NONE:
            why = "the client has no userfaultfd"
        if not why:
            return Choice(mode, tuple(passed_over))
        passed_over.append((mode, why))
    wanted = (
        f"mode {requested.wire_name}"
        if requested is not None
        else f"a mode at least as good as {minimum.wire_name}"
        if minimum is not None
        else "any mode"
    )
    detail = "; ".join(f"{mode.wire_name}: {why}" for mode, why in passed_over)
    raise ModeUnavailableError(f"{wanted} cannot be had here: {detail}")

"""Who is calling over gRPC: credentials a client obtains on the handoff socket, where the kernel
tells the service its uid (``SO_PEERCRED``), and then presents on every gRPC call.

gRPC gives a servicer no peer credentials on a unix socket, so the uid comes from the handoff
socket instead: IDENTIFY there is answered with IDENTITY, a random 32-byte credential bound to
the connection's uid, valid for as long as that connection stays open (docs/protocol.md §3.7).
The client sends it as the ``shmfault-credential`` metadata entry (hex) of each call. A process
that hands its credential to another lends it its uid, as with any bearer secret; closing the
identity connection (or dying) revokes it.
"""

from __future__ import annotations

import os
import secrets
import stat
import threading
from dataclasses import dataclass

from shmfault.errors import PermissionDeniedError, QuotaExceededError

__all__ = [
    "CREDENTIAL_BYTES",
    "CREDENTIAL_METADATA_KEY",
    "GONE_OWNER",
    "Caller",
    "Identities",
    "groups_of",
    "is_admin",
]

CREDENTIAL_BYTES = 32
#: The owner of something whose region is gone: nobody's uid, so only admins may use it.
GONE_OWNER = -1
#: The gRPC metadata entry carrying a credential, as lowercase hex.
CREDENTIAL_METADATA_KEY = "shmfault-credential"


def is_admin(uid: int | None) -> bool:
    """Root and the service's own uid: they may use every region and every file the service
    can, and are held to the service's totals, not to the limits per uid."""
    return uid is not None and uid in (0, os.geteuid())


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a gRPC call: ``uid`` from a credential, or None for an anonymous call (no
    credential: a caller over TCP, or a client that did not identify). ``admin``: root or the
    service's own uid, who may use every region and are held to the totals only, not to the
    limits per uid."""

    uid: int | None
    admin: bool = False
    #: the caller's groups (primary and supplementary) when it identified
    groups: frozenset[int] = frozenset()

    @classmethod
    def of(cls, uid: int | None, groups: frozenset[int] = frozenset()) -> Caller:
        return cls(uid, admin=is_admin(uid), groups=groups)

    def may_read(self, info: os.stat_result) -> bool:
        """Whether this caller could read a file with ``info`` itself, by its mode bits: the
        service (root) opens file sources for callers, and must not read for them what they
        could not. Admins may read what the service can."""
        if self.admin:
            return True
        if self.uid is not None and info.st_uid == self.uid:
            return bool(info.st_mode & stat.S_IRUSR)
        if info.st_gid in self.groups:
            return bool(info.st_mode & stat.S_IRGRP)
        return bool(info.st_mode & stat.S_IROTH)

    def may_use(self, owner_uid: int | None) -> bool:
        """Whether this caller may read, write, delete, attach or record what ``owner_uid``
        owns (None: a region nobody owns, which everyone may use)."""
        return owner_uid is None or self.admin or owner_uid == self.uid

    def may_create_in(self, directory: os.stat_result) -> bool:
        """Whether this caller could create a file in a directory with ``directory``'s mode
        itself (write and search permission by the mode bits): the service (root) binds
        Firecracker endpoint sockets where callers ask. Admins may anywhere the service can."""
        if self.admin:
            return True
        wanted_user, wanted_group, wanted_other = (
            stat.S_IWUSR | stat.S_IXUSR,
            stat.S_IWGRP | stat.S_IXGRP,
            stat.S_IWOTH | stat.S_IXOTH,
        )
        if self.uid is not None and directory.st_uid == self.uid:
            return directory.st_mode & wanted_user == wanted_user
        if directory.st_gid in self.groups:
            return directory.st_mode & wanted_group == wanted_group
        return directory.st_mode & wanted_other == wanted_other

    def check_use(self, owner_uid: int | None, what: str, field: str) -> None:
        """PermissionDeniedError (naming ``what`` and the request ``field``) unless this
        caller may use what ``owner_uid`` owns (:data:`GONE_OWNER`: its region is gone)."""
        if not self.may_use(owner_uid):
            whose = (
                "a region that no longer exists" if owner_uid == GONE_OWNER else f"uid {owner_uid}"
            )
            raise PermissionDeniedError(
                f"{what} belongs to {whose}; {self.describe()} may not use it", field
            )

    def check_socket_directory(self, socket_path: str) -> None:
        """PermissionDeniedError unless this caller could create a file in the directory of
        ``socket_path`` itself (the service binds sockets there as its own uid). A directory
        the service cannot look at is left to fail later, with its own error."""
        try:
            directory = os.stat(os.path.dirname(socket_path) or "/")
        except OSError:
            return
        if not self.may_create_in(directory):
            raise PermissionDeniedError(
                f"{self.describe()} may not create files in the directory of {socket_path}",
                "socket_path",
            )

    def describe(self) -> str:
        return "an anonymous caller" if self.uid is None else f"uid {self.uid}"


def groups_of(pid: int, gid: int) -> frozenset[int]:
    """The groups of process ``pid`` (``gid``, its primary one from SO_PEERCRED, and its
    supplementary groups from /proc); just ``gid`` where /proc does not say."""
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Groups:"):
                    groups.update(int(group) for group in line.split()[1:])
                    break
    except (OSError, ValueError):
        pass
    return frozenset(groups)


class Identities:
    """The credentials issued and not yet revoked. Thread-safe: the handoff thread issues and
    revokes, gRPC workers look up."""

    def __init__(self, *, max_per_uid: int = 256, max_total: int = 4096) -> None:
        self._lock = threading.Lock()
        self._uid_of: dict[bytes, int] = {}
        self._groups_of: dict[bytes, frozenset[int]] = {}
        self._count_of: dict[int, int] = {}
        self.max_per_uid = max_per_uid
        self.max_total = max_total

    def issue(self, uid: int, groups: frozenset[int] = frozenset()) -> bytes:
        """A new credential for ``uid`` (in ``groups``). QuotaExceededError past the limits: a
        caller cannot fill the service's memory with identities."""
        credential = secrets.token_bytes(CREDENTIAL_BYTES)
        with self._lock:
            if len(self._uid_of) >= self.max_total:
                raise QuotaExceededError(
                    f"the service holds {len(self._uid_of)} identities, its limit"
                )
            if self._count_of.get(uid, 0) >= self.max_per_uid:
                raise QuotaExceededError(
                    f"uid {uid} holds {self._count_of[uid]} identities, the limit per uid"
                )
            self._uid_of[credential] = uid
            self._groups_of[credential] = groups
            self._count_of[uid] = self._count_of.get(uid, 0) + 1
        return credential

    def revoke(self, credential: bytes) -> None:
        """Forget ``credential``; nothing if it is not known."""
        with self._lock:
            uid = self._uid_of.pop(credential, None)
            self._groups_of.pop(credential, None)
            if uid is None:
                return
            self._count_of[uid] -= 1
            if not self._count_of[uid]:
                del self._count_of[uid]

    def caller_of(self, credential: bytes) -> Caller | None:
        """The caller ``credential`` was issued to, None if it was never issued or is
        revoked."""
        # A dict lookup: its timing depends on the hash of a 256-bit random key, which tells a
        # guesser nothing about the bytes of a real credential.
        with self._lock:
            uid = self._uid_of.get(credential)
            if uid is None:
                return None
            return Caller.of(uid, self._groups_of[credential])

    def __len__(self) -> int:
        with self._lock:
            return len(self._uid_of)

"""shmfault: lazy shared memory. Regions backed by memfd or POSIX shared memory, filled on first
touch by a service that resolves the client's userfaultfd page faults."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shmfault.errors import ShmfaultError, UffdError

if TYPE_CHECKING:
    from shmfault.client import Client
    from shmfault.store import Region, Source

__version__ = "0.1.0"

__all__ = ["Client", "Region", "ShmfaultError", "Source", "UffdError", "__version__"]

_LAZY = {"Client": "shmfault.client", "Region": "shmfault.store", "Source": "shmfault.store"}


def __getattr__(name: str) -> object:
    # Lazy: `import shmfault` (and `shmfault probe`) must not pay for importing gRPC.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shmfault' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)

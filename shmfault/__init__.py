"""shmfault: lazy shared memory. Regions backed by memfd or POSIX shared memory, filled on first
touch by a service that resolves the client's userfaultfd page faults."""

from shmfault.errors import ShmfaultError, UffdError

__version__ = "0.1.0"

__all__ = ["ShmfaultError", "UffdError", "__version__"]

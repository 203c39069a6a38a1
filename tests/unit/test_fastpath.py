"""Loading the C fast path, and the region lock it shares with Python (real pthread mutexes)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from shmfault import fastpath


def built() -> None:
    if not fastpath.LIBRARY_PATH.exists():
        pytest.skip(f"{fastpath.LIBRARY_PATH.name} is not built (make setup builds it)")


def test_the_library_make_setup_built_loads_with_structures_of_the_same_size() -> None:
    built()
    assert fastpath.library() is not None, fastpath.unavailable_reason()
    assert fastpath.unavailable_reason() == ""


def test_turned_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fastpath.ENVIRONMENT, "0")
    lib, why = fastpath._load()
    assert lib is None
    assert why == "SHMFAULT_FAST_PATH=0 in the environment"


def test_a_library_not_built_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fastpath, "LIBRARY_PATH", tmp_path / "_fastpath.so")
    lib, why = fastpath._load()
    assert lib is None
    assert "is not built" in why


def test_a_library_older_than_its_source_is_not_loaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    built()
    library = tmp_path / "_fastpath.so"
    source = tmp_path / "_fastpath.c"
    shutil.copy(fastpath.LIBRARY_PATH, library)
    shutil.copy(fastpath.SOURCE_PATH, source)
    os.utime(library, (time.time() - 60, time.time() - 60))
    monkeypatch.setattr(fastpath, "LIBRARY_PATH", library)
    monkeypatch.setattr(fastpath, "SOURCE_PATH", source)
    lib, why = fastpath._load()
    assert lib is None
    assert "older than" in why


def test_a_file_that_is_no_library_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    library = tmp_path / "_fastpath.so"
    library.write_bytes(b"not an ELF file")
    monkeypatch.setattr(fastpath, "LIBRARY_PATH", library)
    monkeypatch.setattr(fastpath, "SOURCE_PATH", tmp_path / "absent.c")
    lib, why = fastpath._load()
    assert lib is None
    assert "does not load" in why


def test_the_region_lock_is_recursive_and_excludes_other_threads() -> None:
    built()
    lib = fastpath.library()
    assert lib is not None
    lock = fastpath.RegionLock(lib)
    order: list[str] = []

    def take() -> None:
        with lock:
            order.append("other")

    with lock, lock:  # recursive: RegionBacking's methods call each other
        other = threading.Thread(target=take)
        other.start()
        other.join(0.2)
        # The other thread waits (with the GIL released: this thread runs on meanwhile).
        assert other.is_alive()
        order.append("holder")
    other.join(5)
    assert not other.is_alive()
    assert order == ["holder", "other"]

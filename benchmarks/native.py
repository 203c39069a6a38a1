"""The touch loops of ``touch.c``, compiled at run time with the system's C compiler into a
temporary directory and called through ctypes (which releases the GIL around each call).

Without a C compiler, :class:`PythonTouch` does the same in pure Python: every per-touch time then
includes the interpreter's own cost of roughly a microsecond (measured and reported as
``timer_overhead_ns``), and a write touch is a read followed by a write of the same byte (so its
fault is a read fault).
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import subprocess
import time
from array import array
from pathlib import Path
from typing import Protocol

SOURCE = Path(__file__).with_name("touch.c")
_u64 = ctypes.c_uint64
_ptr = ctypes.c_void_p


def buffer_address(buffer: memoryview | bytearray | array[int]) -> int:
    """Address of a writable buffer's first byte (no copy)."""
    view = memoryview(buffer).cast("B")
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class Toucher(Protocol):
    kind: str

    def touch_list(
        self,
        base: int,
        page_size: int,
        pages: array[int],
        latencies: array[int] | None,
        write: bool,
    ) -> int: ...

    def touch_seq(self, base: int, length: int, page_size: int, write: bool) -> int: ...

    def copy(self, destination: int, source: int, length: int) -> int: ...

    def mismatched_pages(
        self, got: int, want: int, page_size: int, pages: array[int] | None, count: int
    ) -> int: ...

    def fill_pattern(self, buffer: int, length: int, seed: int) -> None: ...

    def timer_overhead_ns(self) -> int: ...


class CTouch:
    """The compiled helpers. ``build`` compiles them into ``directory``."""

    kind = "c"

    def __init__(self, library: Path) -> None:
        lib = ctypes.CDLL(str(library))
        self._touch_list = lib.sfb_touch_list
        self._touch_list.argtypes = [_ptr, _u64, _ptr, _u64, _ptr, ctypes.c_int]
        self._touch_list.restype = _u64
        self._touch_seq = lib.sfb_touch_seq
        self._touch_seq.argtypes = [_ptr, _u64, _u64, ctypes.c_int]
        self._touch_seq.restype = _u64
        self._copy = lib.sfb_copy
        self._copy.argtypes = [_ptr, _ptr, _u64]
        self._copy.restype = _u64
        self._mismatched = lib.sfb_mismatched_pages
        self._mismatched.argtypes = [_ptr, _ptr, _u64, _ptr, _u64]
        self._mismatched.restype = _u64
        self._fill = lib.sfb_fill_pattern
        self._fill.argtypes = [_ptr, _u64, _u64]
        self._fill.restype = None
        self._overhead = lib.sfb_timer_overhead_ns
        self._overhead.argtypes = []
        self._overhead.restype = _u64

    @classmethod
    def build(cls, directory: Path, compiler: str) -> CTouch:
        library = directory / "libsfb_touch.so"
        subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", "-o", str(library), str(SOURCE)],
            check=True,
            capture_output=True,
            text=True,
        )
        return cls(library)

    def touch_list(
        self,
        base: int,
        page_size: int,
        pages: array[int],
        latencies: array[int] | None,
        write: bool,
    ) -> int:
        lat = buffer_address(latencies) if latencies is not None else None
        return int(
            self._touch_list(base, page_size, buffer_address(pages), len(pages), lat, int(write))
        )

    def touch_seq(self, base: int, length: int, page_size: int, write: bool) -> int:
        return int(self._touch_seq(base, length, page_size, int(write)))

    def copy(self, destination: int, source: int, length: int) -> int:
        return int(self._copy(destination, source, length))

    def mismatched_pages(
        self, got: int, want: int, page_size: int, pages: array[int] | None, count: int
    ) -> int:
        index = buffer_address(pages) if pages is not None else None
        return int(self._mismatched(got, want, page_size, index, count))

    def fill_pattern(self, buffer: int, length: int, seed: int) -> None:
        self._fill(buffer, length, seed)

    def timer_overhead_ns(self) -> int:
        return int(self._overhead())


def _view(address: int, length: int) -> memoryview:
    return memoryview((ctypes.c_char * length).from_address(address)).cast("B")


class PythonTouch:
    """The same loops in Python (no compiler): each touch costs ~1 us of interpreter time."""

    kind = "python"

    def touch_list(
        self,
        base: int,
        page_size: int,
        pages: array[int],
        latencies: array[int] | None,
        write: bool,
    ) -> int:
        view = _view(base, (max(pages, default=0) + 1) * page_size)
        clock = time.perf_counter_ns
        start = clock()
        for k, page in enumerate(pages):
            offset = page * page_size
            before = clock()
            if write:
                view[offset] = view[offset]
            else:
                _ = view[offset]
            if latencies is not None:
                latencies[k] = min(clock() - before, 0xFFFFFFFF)
        return clock() - start

    def touch_seq(self, base: int, length: int, page_size: int, write: bool) -> int:
        view = _view(base, length)
        start = time.perf_counter_ns()
        for offset in range(0, length, page_size):
            if write:
                view[offset] = view[offset]
            else:
                _ = view[offset]
        return time.perf_counter_ns() - start

    def copy(self, destination: int, source: int, length: int) -> int:
        start = time.perf_counter_ns()
        ctypes.memmove(destination, source, length)
        return time.perf_counter_ns() - start

    def mismatched_pages(
        self, got: int, want: int, page_size: int, pages: array[int] | None, count: int
    ) -> int:
        indices = pages if pages is not None else range(count)
        bad = 0
        for page in indices:
            offset = page * page_size
            if ctypes.string_at(got + offset, page_size) != ctypes.string_at(
                want + offset, page_size
            ):
                bad += 1
        return bad

    def fill_pattern(self, buffer: int, length: int, seed: int) -> None:
        generator = random.Random(seed)
        chunk = 1 << 20
        for offset in range(0, length, chunk):
            size = min(chunk, length - offset)
            ctypes.memmove(buffer + offset, generator.randbytes(size), size)

    def timer_overhead_ns(self) -> int:
        rounds = 100_000
        clock = time.perf_counter_ns
        start = clock()
        for _ in range(rounds):
            clock()
        return (clock() - start) // rounds


def load(directory: Path, prefer: str = "c") -> Toucher:
    """The C helpers built into ``directory``, or the Python ones when ``prefer`` is "python"
    or no C compiler is found (``$CC``, then cc, gcc, clang)."""
    if prefer == "c":
        candidates = [os.environ.get("CC", ""), "cc", "gcc", "clang"]
        for name in candidates:
            compiler = shutil.which(name) if name else None
            if compiler:
                return CTouch.build(directory, compiler)
    return PythonTouch()

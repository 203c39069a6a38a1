"""The ABI tables in shmfault._abi against <linux/userfaultfd.h>: literal values, as the header
spells them and as a C compiler computes them on this machine."""

from __future__ import annotations

import enum
import importlib.util
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from shmfault import _abi
from shmfault._abi import (
    ContinueMode,
    CopyMode,
    EventType,
    Feature,
    Ioctl,
    IoctlNr,
    MoveMode,
    PagefaultFlag,
    PoisonMode,
    RegisterMode,
    WriteprotectMode,
    ZeropageMode,
    flag_names,
)

HEADER = Path("/usr/include/linux/userfaultfd.h")
_GENERIC_IOCTL = not platform.machine().startswith(("ppc", "powerpc"))

# x86_64 (and every asm-generic architecture): values copied from the C preprocessor's output.
REQUESTS = {
    "UFFDIO_API": 0xC018AA3F,
    "UFFDIO_REGISTER": 0xC020AA00,
    "UFFDIO_UNREGISTER": 0x8010AA01,
    "UFFDIO_WAKE": 0x8010AA02,
    "UFFDIO_COPY": 0xC028AA03,
    "UFFDIO_ZEROPAGE": 0xC020AA04,
    "UFFDIO_MOVE": 0xC028AA05,
    "UFFDIO_WRITEPROTECT": 0xC018AA06,
    "UFFDIO_CONTINUE": 0xC020AA07,
    "UFFDIO_POISON": 0xC020AA08,
    "USERFAULTFD_IOC_NEW": 0xAA00,
}

# How the header declares each request: (direction macro, ordinal, sizeof its argument in C,
# counted field by field from the struct definitions, every field 8 bytes).
DECLARATIONS = {
    "UFFDIO_API": ("_IOWR", 0x3F, 3 * 8),  # api, features, ioctls
    "UFFDIO_REGISTER": ("_IOWR", 0x00, 4 * 8),  # range(start, len), mode, ioctls
    "UFFDIO_UNREGISTER": ("_IOR", 0x01, 2 * 8),  # range
    "UFFDIO_WAKE": ("_IOR", 0x02, 2 * 8),  # range
    "UFFDIO_COPY": ("_IOWR", 0x03, 5 * 8),  # dst, src, len, mode, copy
    "UFFDIO_ZEROPAGE": ("_IOWR", 0x04, 4 * 8),  # range, mode, zeropage
    "UFFDIO_MOVE": ("_IOWR", 0x05, 5 * 8),  # dst, src, len, mode, move
    "UFFDIO_WRITEPROTECT": ("_IOWR", 0x06, 3 * 8),  # range, mode
    "UFFDIO_CONTINUE": ("_IOWR", 0x07, 4 * 8),  # range, mode, mapped
    "UFFDIO_POISON": ("_IOWR", 0x08, 4 * 8),  # range, mode, updated
    "USERFAULTFD_IOC_NEW": ("_IO", 0x00, 0),
}

STRUCTS = {
    "UFFDIO_API": _abi.UFFDIO_API_STRUCT,
    "UFFDIO_REGISTER": _abi.UFFDIO_REGISTER_STRUCT,
    "UFFDIO_UNREGISTER": _abi.UFFDIO_RANGE,
    "UFFDIO_WAKE": _abi.UFFDIO_RANGE,
    "UFFDIO_COPY": _abi.UFFDIO_COPY_STRUCT,
    "UFFDIO_ZEROPAGE": _abi.UFFDIO_ZEROPAGE_STRUCT,
    "UFFDIO_MOVE": _abi.UFFDIO_MOVE_STRUCT,
    "UFFDIO_WRITEPROTECT": _abi.UFFDIO_WRITEPROTECT_STRUCT,
    "UFFDIO_CONTINUE": _abi.UFFDIO_CONTINUE_STRUCT,
    "UFFDIO_POISON": _abi.UFFDIO_POISON_STRUCT,
}

FEATURES = {
    "PAGEFAULT_FLAG_WP": 1 << 0,
    "EVENT_FORK": 1 << 1,
    "EVENT_REMAP": 1 << 2,
    "EVENT_REMOVE": 1 << 3,
    "MISSING_HUGETLBFS": 1 << 4,
    "MISSING_SHMEM": 1 << 5,
    "EVENT_UNMAP": 1 << 6,
    "SIGBUS": 1 << 7,
    "THREAD_ID": 1 << 8,
    "MINOR_HUGETLBFS": 1 << 9,
    "MINOR_SHMEM": 1 << 10,
    "EXACT_ADDRESS": 1 << 11,
    "WP_HUGETLBFS_SHMEM": 1 << 12,
    "WP_UNPOPULATED": 1 << 13,
    "POISON": 1 << 14,
    "WP_ASYNC": 1 << 15,
    "MOVE": 1 << 16,
}

# Every other bit table, as (C macro prefix, Python enum, {member: value}).
BIT_TABLES: list[tuple[str, type[enum.IntEnum] | type[enum.IntFlag], dict[str, int]]] = [
    ("UFFD_FEATURE_", Feature, FEATURES),
    (
        "UFFD_EVENT_",
        EventType,
        {"PAGEFAULT": 0x12, "FORK": 0x13, "REMAP": 0x14, "REMOVE": 0x15, "UNMAP": 0x16},
    ),
    ("UFFD_PAGEFAULT_FLAG_", PagefaultFlag, {"WRITE": 1, "WP": 2, "MINOR": 4}),
    ("UFFDIO_REGISTER_MODE_", RegisterMode, {"MISSING": 1, "WP": 2, "MINOR": 4}),
    ("UFFDIO_COPY_MODE_", CopyMode, {"DONTWAKE": 1, "WP": 2}),
    ("UFFDIO_ZEROPAGE_MODE_", ZeropageMode, {"DONTWAKE": 1}),
    ("UFFDIO_WRITEPROTECT_MODE_", WriteprotectMode, {"WP": 1, "DONTWAKE": 2}),
    ("UFFDIO_CONTINUE_MODE_", ContinueMode, {"DONTWAKE": 1, "WP": 2}),
    ("UFFDIO_POISON_MODE_", PoisonMode, {"DONTWAKE": 1}),
    ("UFFDIO_MOVE_MODE_", MoveMode, {"DONTWAKE": 1, "ALLOW_SRC_HOLES": 2}),
    (
        "_UFFDIO_",
        IoctlNr,
        {
            "REGISTER": 0x00,
            "UNREGISTER": 0x01,
            "WAKE": 0x02,
            "COPY": 0x03,
            "ZEROPAGE": 0x04,
            "MOVE": 0x05,
            "WRITEPROTECT": 0x06,
            "CONTINUE": 0x07,
            "POISON": 0x08,
            "API": 0x3F,
        },
    ),
]

# offsetof() in struct uffd_msg: the union starts at 8 and each arm's fields are 8 apart.
MSG_OFFSETS = {
    "arg.pagefault.flags": 8,
    "arg.pagefault.address": 16,
    "arg.pagefault.feat.ptid": 24,
    "arg.fork.ufd": 8,
    "arg.remap.from": 8,
    "arg.remap.to": 16,
    "arg.remap.len": 24,
    "arg.remove.start": 8,
    "arg.remove.end": 16,
}


@pytest.mark.skipif(not _GENERIC_IOCTL, reason="powerpc encodes ioctls differently")
@pytest.mark.parametrize(("name", "value"), REQUESTS.items())
def test_request_number_is_the_header_value(name: str, value: int) -> None:
    assert getattr(_abi, name) == value


@pytest.mark.parametrize(("name", "declaration"), DECLARATIONS.items())
def test_literal_decodes_to_the_header_declaration(
    name: str, declaration: tuple[str, int, int]
) -> None:
    # asm-generic/ioctl.h by hand: dir in bits 30-31, size in 16-29, type in 8-15, nr in 0-7.
    direction, nr, size = declaration
    literal = REQUESTS[name]
    assert literal >> 30 == {"_IO": 0, "_IOR": 2, "_IOWR": 3}[direction]
    assert (literal >> 16) & 0x3FFF == size
    assert (literal >> 8) & 0xFF == 0xAA
    assert literal & 0xFF == nr


@pytest.mark.parametrize("name", STRUCTS)
def test_struct_size_is_the_size_the_request_encodes(name: str) -> None:
    request = getattr(_abi, name)
    assert STRUCTS[name].size == _abi.ioctl_size(request) == DECLARATIONS[name][2]


def test_ioc_new_takes_no_argument_struct() -> None:
    assert _abi.ioctl_size(_abi.USERFAULTFD_IOC_NEW) == 0


def test_uffd_msg_is_32_bytes_and_every_union_arm_fills_its_24() -> None:
    assert _abi.UFFD_MSG.size == _abi.UFFD_MSG_SIZE == 32
    for arm in (_abi.MSG_PAGEFAULT, _abi.MSG_FORK, _abi.MSG_REMAP, _abi.MSG_REMOVE):
        assert arm.size == 24


def test_api_and_mode_constants() -> None:
    assert _abi.UFFD_API == 0xAA
    assert _abi.UFFDIO == _abi.USERFAULTFD_IOC == 0xAA
    assert _abi.UFFD_USER_MODE_ONLY == 1


@pytest.mark.parametrize(
    ("prefix", "table", "expected"), BIT_TABLES, ids=[prefix for prefix, _, _ in BIT_TABLES]
)
def test_bit_values_are_literal(
    prefix: str, table: type[enum.IntEnum] | type[enum.IntFlag], expected: dict[str, int]
) -> None:
    assert {member.name: int(member) for member in table} == expected, prefix


def test_ioctl_mask_bits_are_one_shifted_by_the_ordinal() -> None:
    assert {m.name: int(m) for m in Ioctl} == {
        "REGISTER": 1 << 0x00,
        "UNREGISTER": 1 << 0x01,
        "WAKE": 1 << 0x02,
        "COPY": 1 << 0x03,
        "ZEROPAGE": 1 << 0x04,
        "MOVE": 1 << 0x05,
        "WRITEPROTECT": 1 << 0x06,
        "CONTINUE": 1 << 0x07,
        "POISON": 1 << 0x08,
        "API": 1 << 0x3F,
    }


def test_flag_names_in_bit_order() -> None:
    assert flag_names(Feature.MOVE | Feature.EVENT_FORK | Feature.THREAD_ID, Feature) == [
        "EVENT_FORK",
        "THREAD_ID",
        "MOVE",
    ]


def test_flag_names_spells_unknown_bits_in_hex() -> None:
    value = (1 << 30) | int(PagefaultFlag.WRITE) | (1 << 5)
    assert flag_names(value, PagefaultFlag) == ["WRITE", "0x20", "0x40000000"]


def test_flag_names_of_zero_is_empty() -> None:
    assert flag_names(0, Feature) == []


def _abi_as_on(machine: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A private copy of shmfault._abi, imported as if on ``machine``."""
    monkeypatch.setattr(platform, "machine", lambda: machine)
    spec = importlib.util.spec_from_file_location(f"_abi_on_{machine}", _abi.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("machine", ["x86_64", "aarch64", "s390x", "riscv64", "loongarch64"])
def test_generic_architectures_encode_like_x86_64(
    machine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _abi_as_on(machine, monkeypatch)
    assert {name: getattr(module, name) for name in REQUESTS} == REQUESTS


@pytest.mark.parametrize("machine", ["ppc64le", "ppc64"])
def test_powerpc_encodes_with_its_own_direction_bits(
    machine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # arch/powerpc/include/uapi/asm/ioctl.h: 13 size bits, _IOC_NONE=1, _IOC_READ=2,
    # _IOC_WRITE=4, direction from bit 29. _IOWR comes out as on x86; _IOR and _IO do not.
    module = _abi_as_on(machine, monkeypatch)
    expected = dict(REQUESTS)
    expected["UFFDIO_UNREGISTER"] = 0x4010AA01
    expected["UFFDIO_WAKE"] = 0x4010AA02
    expected["USERFAULTFD_IOC_NEW"] = 0x2000AA00
    assert {name: getattr(module, name) for name in REQUESTS} == expected
    for name, layout in STRUCTS.items():
        assert module.ioctl_size(getattr(module, name)) == layout.size


# --- against the C compiler and this machine's kernel headers ---

_C_PROGRAM = """
#include <stddef.h>
#include <stdio.h>
#include <linux/ioctl.h>
#include <linux/userfaultfd.h>
#define SHOW(label, value) printf("%s %llu\\n", label, (unsigned long long)(value))
int main(void) {
    SHOW("sizeof(struct uffd_msg)", sizeof(struct uffd_msg));
    SHOW("sizeof(struct uffdio_range)", sizeof(struct uffdio_range));
"""


def _c_program() -> str:
    lines = [_C_PROGRAM]
    macros = [*REQUESTS, "UFFD_API", "UFFD_USER_MODE_ONLY"]
    macros += [prefix + name for prefix, _, table in BIT_TABLES for name in table]
    for macro in macros:
        lines.append(f'#ifdef {macro}\n    SHOW("{macro}", {macro});\n#endif')
    # A struct cannot be tested with #ifdef: its request macro says whether the header has it.
    for name in STRUCTS:
        struct_name = "uffdio_range" if name in ("UFFDIO_UNREGISTER", "UFFDIO_WAKE") else name
        lines.append(
            f'#ifdef {name}\n    SHOW("sizeof {name}", sizeof(struct {struct_name.lower()}));'
            "\n#endif"
        )
    for member in MSG_OFFSETS:
        lines.append(f'    SHOW("offsetof {member}", offsetof(struct uffd_msg, {member}));')
    lines.append("    return 0;\n}\n")
    return "\n".join(lines)


def _expected_from_abi() -> dict[str, int]:
    expected: dict[str, int] = {name: getattr(_abi, name) for name in REQUESTS}
    expected["UFFD_API"] = _abi.UFFD_API
    expected["UFFD_USER_MODE_ONLY"] = _abi.UFFD_USER_MODE_ONLY
    for prefix, table, _ in BIT_TABLES:
        expected.update({prefix + str(member.name): int(member) for member in table})
    expected.update({f"sizeof {name}": layout.size for name, layout in STRUCTS.items()})
    expected["sizeof(struct uffd_msg)"] = _abi.UFFD_MSG_SIZE
    expected["sizeof(struct uffdio_range)"] = _abi.UFFDIO_RANGE.size
    expected.update({f"offsetof {member}": offset for member, offset in MSG_OFFSETS.items()})
    return expected


def test_union_arms_read_the_offsets_of_struct_uffd_msg() -> None:
    record = bytes(range(32))
    code, _r1, _r2, _r3, body = _abi.UFFD_MSG.unpack(record)

    def field(member: str, size: int) -> int:
        offset = MSG_OFFSETS[member]
        return int.from_bytes(record[offset : offset + size], sys.byteorder)

    assert code == record[0]
    assert _abi.MSG_PAGEFAULT.unpack(body) == (
        field("arg.pagefault.flags", 8),
        field("arg.pagefault.address", 8),
        field("arg.pagefault.feat.ptid", 4),
    )
    assert _abi.MSG_FORK.unpack(body) == (field("arg.fork.ufd", 4),)
    assert _abi.MSG_REMAP.unpack(body) == (
        field("arg.remap.from", 8),
        field("arg.remap.to", 8),
        field("arg.remap.len", 8),
    )
    assert _abi.MSG_REMOVE.unpack(body) == (
        field("arg.remove.start", 8),
        field("arg.remove.end", 8),
    )


def test_values_match_what_the_c_compiler_computes(tmp_path: Path) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc or gcc) on PATH")
    if not HEADER.exists():
        pytest.skip(f"no kernel headers: {HEADER} is missing (linux-libc-dev)")
    source = tmp_path / "abi.c"
    source.write_text(_c_program())
    binary = tmp_path / "abi"
    build = subprocess.run(
        [compiler, "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    output = subprocess.run(
        [str(binary)], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    computed = {
        label: int(value) for label, value in (line.rsplit(" ", 1) for line in output.splitlines())
    }
    expected = _expected_from_abi()
    # Every header since 5.11 has these; newer ones add MOVE, POISON and more.
    assert {"UFFDIO_API", "UFFDIO_COPY", "USERFAULTFD_IOC_NEW", "UFFD_USER_MODE_ONLY"} <= set(
        computed
    )
    assert set(computed) <= set(expected), set(computed) - set(expected)
    mismatched = {
        label: (hex(value), hex(expected[label]))
        for label, value in computed.items()
        if value != expected[label]
    }
    assert mismatched == {}

#!/usr/bin/env python3
"""The kernel matrix: shmfault's probe and tests under other kernels, each in a throwaway VM.

For each kernel of the list, boots it with virtme-ng (qemu; KVM when it works here, else software
emulation) in a VM that sees this machine's filesystem read-only, and runs there, with this
repository's own virtualenv: ``shmfault probe --json``, then the tests (``tests/integration`` and
the matrix's own cases in ``tests/kernel/test_matrix.py``; ``--subset`` runs only the latter: the
probe's verdict, one attach per mode, the fallbacks). The running kernel is run in place, without
a VM. The results become one section per kernel of docs/kernels.md (``--write``), else they are
printed.

    scripts/kernel_matrix.py [run] [--kernel NAME|PATH ...] [--subset] [--budget SECONDS]
                             [--write] [--json FILE] [--kvm auto|yes|no] [--keep]
    scripts/kernel_matrix.py install      # only the tools (apt, pip) and the kernels
    scripts/kernel_matrix.py list         # the kernels it knows
    scripts/kernel_matrix.py clean [--uninstall]

What it installs, each only when missing (``--no-install`` refuses and says what is missing):

- Debian packages, with apt-get (root): ``qemu-system-x86`` (the VM), ``busybox-static`` (the VM's
  initramfs), ``kmod`` (depmod for the kernels' modules), ``file`` (virtme-ng reads a kernel
  image's version with it). The packages this script installed, dependencies included, are
  recorded, and ``clean --uninstall`` purges exactly those.
- virtme-ng from PyPI, into its own virtualenv in the cache directory.
- Each Debian kernel: its package is downloaded (``apt-get download``) and unpacked into the cache
  directory, never installed: /boot, /lib/modules and the boot loader are left alone.

The cache directory (``--cache``, default ``$XDG_CACHE_HOME/shmfault-kernel-matrix``) keeps the
virtualenv and the unpacked kernels between runs; each run's own files (VM logs, results) are in
a temporary directory removed at its end (``--keep`` keeps it). ``clean`` removes the cache.

Exit status: 0 when every kernel ran and no test failed; 1 when a test failed; 2 when a tool or a
kernel could not be installed or a VM did not boot (the reason is printed); 3 when the time
budget ran out before every kernel was done.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "kernels.md"
PLUGIN_DIR = Path(__file__).resolve().parent / "kernel_matrix"

APT_PACKAGES = ("qemu-system-x86", "busybox-static", "kmod", "file")
VIRTME_NG = os.environ.get("KM_VIRTME_NG", "virtme-ng==1.42")
#: Where the VM sees this run's output directory (shared read-write with the host).
GUEST_OUT = "/tmp/kernel-matrix-out"
FULL_TESTS = ("tests/integration", "tests/kernel/test_matrix.py")
SUBSET_TESTS = ("tests/kernel/test_matrix.py",)
MODES = ("shared-copy", "shared-continue", "private-copy", "eager")
FALLBACKS = ("nobody", "seccomp-syscall", "seccomp-all")
#: Seconds a VM needs at least, from start to the first test (boot, probe, pytest's start), under
#: software emulation on a 2-CPU machine; a kernel with less of the budget left is not started.
MIN_VM_SECONDS = 90
#: pytest's default timeout per test (pyproject.toml), scaled like the tests' own timeouts.
INI_TIMEOUT = 120
#: Every test timeout is multiplied by this in an emulated VM: Python runs there 25 to 60 times
#: slower than on the host, and a test whose service takes 15 s to start would otherwise end by
#: its timeout rather than its result: with 3, a 30 s test that runs the CLI twice still ran out
#: (each `shmfault` process imports grpc for 15 s or more there). A test that really hangs costs
#: that much longer.
EMULATED_TIMEOUT_SCALE = 5.0
#: Kept free at the end of a VM's budget for pytest to stop and the VM to power off.
SHUTDOWN_SLACK = 20

#: UFFD_FEATURE_* bit -> (name, the release that brought it). Mirrors shmfault/_abi.py.
FEATURES = {
    0: ("pagefault_flag_wp", "5.7"),
    1: ("event_fork", "4.11"),
    2: ("event_remap", "4.11"),
    3: ("event_remove", "4.11"),
    4: ("missing_hugetlbfs", "4.11"),
    5: ("missing_shmem", "4.11"),
    6: ("event_unmap", "4.11"),
    7: ("sigbus", "4.14"),
    8: ("thread_id", "4.14"),
    9: ("minor_hugetlbfs", "5.13"),
    10: ("minor_shmem", "5.14"),
    11: ("exact_address", "5.18"),
    12: ("wp_hugetlbfs_shmem", "5.19"),
    13: ("wp_unpopulated", "6.4"),
    14: ("poison", "6.6"),
    15: ("wp_async", "6.7"),
    16: ("move", "6.8"),
}


class SetupError(Exception):
    """A tool or a kernel cannot be had; the message says what to do. ``missing`` is set when
    the cause is something this machine lacks (root, apt, qemu, a way to the package registries,
    Debian 12's kernel package): a run that cannot work here, not a run that broke."""

    def __init__(self, message: str, missing: str = "") -> None:
        super().__init__(message)
        self.missing = missing


class BudgetError(SetupError):
    """The time budget ran out while installing."""


#: What apt and pip say when the package registries cannot be reached.
NETWORK_ERRORS = re.compile(
    r"Temporary failure (in name )?resolution|Temporary failure resolving|Could not resolve"
    r"|Failed to fetch|Unable to connect|Could not connect|Connection (timed out|refused)"
    r"|Network is unreachable|NewConnectionError|Failed to establish a new connection"
    r"|Max retries exceeded|ProxyError|ConnectTimeout",
    re.I,
)
#: What apt says when it has no such package (a distribution without it).
NO_PACKAGE = re.compile(
    r"Unable to locate package (\S+)|Package '?(\S+?)'? has no installation candidate"
)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    name: str
    description: str
    kind: str  # "host" (the running kernel, in place), "debian" (a package), "image" (a file)
    package: str = ""  # debian: the package whose dependency is the kernel (a metapackage)
    release_prefix: str = ""  # debian: the kernel release it must be
    image: str = ""  # image: path of a vmlinuz (modules found by virtme-ng next to it)


KERNELS = {
    "host": KernelSpec("host", "the running kernel, no VM", "host"),
    "debian-6.1": KernelSpec(
        "debian-6.1",
        "Debian 12's kernel (linux-image-amd64 of bookworm)",
        "debian",
        package="linux-image-amd64",
        release_prefix="6.1.",
    ),
}
DEFAULT_KERNELS = ("host", "debian-6.1")


def log(message: str) -> None:
    print(f"kernel-matrix: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Budget:
    """When the whole run must be over (seconds since the epoch): installs are bounded by it."""

    deadline: float = float("inf")


BUDGET = Budget()


def run(
    command: list[str], *, check: bool = True, quiet: bool = False, **options: Any
) -> subprocess.CompletedProcess[str]:
    """Run a command, within what is left of the time budget; its output is captured (and shown
    on failure). A failure that says the registries cannot be reached, or that apt has no such
    package, is a SetupError naming what is missing."""
    if not quiet:
        log("$ " + shlex.join(command))
    left = BUDGET.deadline - time.time()
    if left <= 0:
        raise BudgetError(f"the time budget ran out before `{shlex.join(command)}`")
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=False,
            timeout=None if left == float("inf") else left,
            **options,
        )
    except subprocess.TimeoutExpired:
        raise BudgetError(
            f"the time budget ran out during `{shlex.join(command)}` (stopped)"
        ) from None
    if check and done.returncode != 0:
        output = done.stdout + done.stderr
        tail = "\n".join(output.strip().splitlines()[-15:])
        message = f"`{shlex.join(command)}` failed with status {done.returncode}:\n{tail}"
        missing = ""
        if NETWORK_ERRORS.search(output):
            missing = "a way to the package registries (no network?)"
        elif match := NO_PACKAGE.search(output):
            missing = f"the package {match.group(1) or match.group(2)} in apt's lists"
        raise SetupError(message, missing)
    return done


# --- the cache and what is installed into it ---


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shmfault-kernel-matrix"


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest_path = root / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            data = {}
        data.setdefault("apt_installed", [])
        return data

    def save_manifest(self, data: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest_path.write_text(json.dumps(data, indent=2) + "\n")

    @property
    def venv(self) -> Path:
        return self.root / "virtme-ng"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the cache alone while installing into it: runs started together (two test
        suites on one machine) must not build the virtualenv or unpack a kernel at once."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.time() >= BUDGET.deadline:
                        raise BudgetError(
                            f"the time budget ran out waiting for another run's installs "
                            f"into {self.root}"
                        ) from None
                    time.sleep(0.5)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @property
    def kernels(self) -> Path:
        return self.root / "kernels"


def dpkg_installed() -> set[str]:
    done = run(["dpkg-query", "-W", "-f", "${Package}\t${db:Status-Abbrev}\n"], quiet=True)
    return {
        line.split("\t")[0].split(":")[0]
        for line in done.stdout.splitlines()
        if "\t" in line and line.split("\t")[1].startswith("ii")
    }


class Apt:
    """apt-get, run as root, its package lists refreshed at most once per run."""

    def __init__(self, allow_install: bool) -> None:
        self.allow_install = allow_install
        self.updated = False

    def _require(self, what: str) -> None:
        if not shutil.which("apt-get") or not shutil.which("dpkg-query"):
            raise SetupError(
                f"{what} needs apt-get and dpkg (a Debian or Ubuntu machine); elsewhere install "
                f"{', '.join(APT_PACKAGES)} and a kernel image by hand, and pass it as "
                "--kernel PATH",
                missing="apt",
            )

    def update(self) -> None:
        if self.updated:
            return
        if os.geteuid() != 0:
            raise SetupError(
                "refreshing apt's package lists needs root (apt-get update)", missing="root"
            )
        run(
            ["apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-qq"],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        self.updated = True

    def ensure(self, cache: Cache, packages: tuple[str, ...]) -> None:
        self._require("installing the VM's tools")
        missing = [p for p in packages if p not in dpkg_installed()]
        if not missing:
            return
        hint = "apt-get install --no-install-recommends " + " ".join(missing)
        if not self.allow_install:
            raise SetupError(f"missing Debian packages (--no-install): {hint}")
        if os.geteuid() != 0:
            raise SetupError(
                f"missing Debian packages, and installing them needs root: {hint}", missing="root"
            )
        before = dpkg_installed()
        self.update()
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(
            [
                "apt-get",
                "-o",
                "DPkg::Lock::Timeout=300",
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                *missing,
            ],
            env=env,
        )
        new = sorted(dpkg_installed() - before)
        manifest = cache.manifest()
        manifest["apt_installed"] = sorted(set(manifest["apt_installed"]) | set(new))
        cache.save_manifest(manifest)
        log(f"installed {len(new)} Debian packages: {' '.join(new)}")

    def kernel_package(self, spec: KernelSpec) -> tuple[str, str]:
        """(package, version) of the kernel image ``spec.package`` depends on."""
        self._require(f"fetching {spec.name}")
        for attempt in (1, 2):
            depends = run(["apt-cache", "depends", spec.package], check=False, quiet=True)
            names = re.findall(r"Depends: (linux-image-[\w.+-]+)", depends.stdout)
            if names:
                package = names[0]
                show = run(["apt-cache", "show", "--no-all-versions", package], quiet=True)
                match = re.search(r"^Version: (\S+)", show.stdout, re.M)
                if match is None:
                    raise SetupError(f"apt-cache has no version of {package}")
                return package, match.group(1)
            if attempt == 1:
                if not self.allow_install:
                    break
                self.update()
        raise SetupError(
            f"apt knows no {spec.package} here: {spec.name} needs Debian 12's package lists "
            "(bookworm in /etc/apt/sources.list.d)",
            missing=f"Debian 12's {spec.package} in apt's lists",
        )


def ensure_virtme(cache: Cache, allow_install: bool) -> Path:
    """The vng of virtme-ng, in the cache's own virtualenv."""
    vng = cache.venv / "bin" / "vng"
    stamp = cache.venv / ".requirement"
    if vng.exists() and stamp.exists() and stamp.read_text() == VIRTME_NG:
        return vng
    if not allow_install:
        raise SetupError(f"virtme-ng is not installed in {cache.venv} (--no-install)")
    shutil.rmtree(cache.venv, ignore_errors=True)
    cache.root.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "venv", str(cache.venv)])
    pip = str(cache.venv / "bin" / "pip")
    run([pip, "install", "--quiet", "--disable-pip-version-check", VIRTME_NG])
    stamp.write_text(VIRTME_NG)
    return vng


@dataclasses.dataclass
class Image:
    vmlinuz: Path
    release: str
    package: str = ""
    version: str = ""


def ensure_debian_kernel(spec: KernelSpec, cache: Cache, apt: Apt) -> Image:
    """Download and unpack the kernel package (with depmod run on its modules); never install.
    Package lists so old that the mirror no longer has their version are refreshed once."""
    try:
        return _unpack_debian_kernel(spec, cache, apt)
    except SetupError as exc:
        if (
            isinstance(exc, BudgetError)
            or exc.missing
            or apt.updated
            or not apt.allow_install
            or os.geteuid() != 0
        ):
            raise
        log("retrying with fresh package lists")
        apt.update()
        return _unpack_debian_kernel(spec, cache, apt)


def _unpack_debian_kernel(spec: KernelSpec, cache: Cache, apt: Apt) -> Image:
    package, version = apt.kernel_package(spec)
    release = package.removeprefix("linux-image-")
    if not release.startswith(spec.release_prefix):
        raise SetupError(
            f"{spec.package} is {package} {version} on this machine, not the "
            f"{spec.release_prefix}x that {spec.name} stands for (needs Debian 12's package lists)",
            missing=f"Debian 12's {spec.package} in apt's lists",
        )
    target = cache.kernels / f"{package}_{version}"
    vmlinuz = target / "boot" / f"vmlinuz-{release}"
    if (target / ".complete").exists() and vmlinuz.exists():
        return Image(vmlinuz, release, package, version)
    if not apt.allow_install:
        raise SetupError(f"{package} {version} is not unpacked in {cache.kernels} (--no-install)")
    cache.kernels.mkdir(parents=True, exist_ok=True)
    for stale in cache.kernels.glob(f"{package}_*"):  # older builds of the same kernel
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="download-", dir=cache.kernels) as download:
        os.chmod(download, 0o755)
        sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
        run(["apt-get", "download", *sandbox, f"{package}={version}"], cwd=download)
        debs = list(Path(download).glob("*.deb"))
        if len(debs) != 1:
            raise SetupError(f"apt-get download {package} left {len(debs)} .deb files")
        unpacking = Path(download) / "root"
        run(["dpkg-deb", "-x", str(debs[0]), str(unpacking)])
        depmod = shutil.which("depmod") or "/usr/sbin/depmod"
        run([depmod, "-b", str(unpacking), release])
        unpacking.rename(target)
    (target / ".complete").write_text(f"{package} {version}\n")
    if not vmlinuz.exists():
        raise SetupError(f"{package} has no {vmlinuz.relative_to(target)}")
    return Image(vmlinuz, release, package, version)


def image_kernel(spec: KernelSpec) -> Image:
    path = Path(spec.image).resolve()
    if not path.is_file():
        raise SetupError(f"no kernel image at {path}")
    done = run(["file", "-b", str(path)], check=False, quiet=True)
    match = re.search(r"version (\S+)", done.stdout)
    return Image(path, match.group(1) if match else path.name)


# --- KVM or emulation ---


def kvm_usable() -> tuple[bool, str]:
    """Whether qemu can run a guest with KVM here; if not, why. A VM is started and stopped
    before it runs anything (qemu ``-S``): KVM that opens but fails when qemu sets up the vCPU
    (nested virtualization that lacks an MSR, say) is caught here, in a few milliseconds."""
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable by this user (the kvm group?)"
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return False, "no qemu-system-x86_64"
    commands = '{"execute":"qmp_capabilities"}\n{"execute":"query-kvm"}\n{"execute":"quit"}\n'
    try:
        done = subprocess.run(
            [
                qemu,
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-m",
                "64",
                "-display",
                "none",
                "-nodefaults",
                "-no-user-config",
                "-S",
                "-qmp",
                "stdio",
            ],
            input=commands,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False, "qemu with KVM did not answer within 30 s"
    if done.returncode == 0 and '"enabled": true' in done.stdout:
        return True, ""
    error = next(
        (line for line in done.stderr.splitlines() if "error" in line.lower()),
        done.stderr.strip().splitlines()[-1]
        if done.stderr.strip()
        else f"status {done.returncode}",
    )
    return False, f"qemu cannot start a KVM guest here ({error.strip()})"


# --- one kernel ---


@dataclasses.dataclass
class KernelResult:
    name: str
    description: str
    status: str = "not run"  # ok, failed (a test failed), setup-failed, boot-failed, budget
    reason: str = ""
    missing: str = ""  # setup-failed because this machine lacks it (SetupError.missing)
    release: str = ""
    package: str = ""
    version: str = ""
    how: str = ""  # "in place", "VM, KVM", "VM, emulated (...)"
    scope: str = ""  # "full", "subset", or the test paths
    date: str = ""
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    probe: dict[str, Any] | None = None
    probe_error: str = ""
    tests: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    pytest_status: int | None = None

    def outcome(self, nodeid_suffix: str) -> dict[str, Any] | None:
        return next((t for t in self.tests if t["nodeid"].endswith(nodeid_suffix)), None)

    def failures(self) -> list[dict[str, Any]]:
        return [t for t in self.tests if t["outcome"] in ("failed", "error")]


GUEST_SCRIPT = """\
#!/bin/sh
# Written by scripts/kernel_matrix.py; runs inside the VM (or in place for the running kernel).
OUT={out}
stamp() {{ echo "$1 $(cut -d' ' -f1 /proc/uptime) $(date +%s.%N)" >> "$OUT/timing"; }}
stamp start
cd {repo} || exit 1
export PYTHONDONTWRITEBYTECODE=1 SHMFAULT_KERNEL_VM={in_vm} KM_STATE="$OUT"
export KM_DEADLINE={deadline} KM_TIMEOUT_SCALE={scale} PYTHONPATH={plugin}
uname -r > "$OUT/uname"
{python} -m shmfault probe --json > "$OUT/probe.json" 2> "$OUT/probe.err"
echo $? > "$OUT/probe.status"
stamp probe
# A test that hangs in a page fault cannot be interrupted: pytest-timeout's thread method ends
# pytest instead, and the next pytest records that test as failed and resumes after it.
runs=0
while [ "$runs" -lt 25 ]; do
    runs=$((runs + 1))
    left=$(( {hard_deadline} - $(date +%s) ))
    [ "$left" -gt 10 ] || break
    timeout -k 5 "$left" {python} -m pytest -p no:cacheprovider -p km_results -q -rfEs \\
        -o timeout_method=thread -o timeout={ini_timeout} {tests} >> "$OUT/pytest.out" 2>&1
    echo $? > "$OUT/pytest.status"
    [ -s "$OUT/current" ] || break
done
stamp tests
sync
"""


def _write_script(
    out: Path,
    guest_out: str,
    tests: tuple[str, ...],
    deadline: float,
    in_vm: bool,
    scale: float = 1.0,
) -> Path:
    script = out / "run.sh"
    script.write_text(
        GUEST_SCRIPT.format(
            out=shlex.quote(guest_out),
            repo=shlex.quote(str(REPO)),
            python=shlex.quote(sys.executable),
            plugin=shlex.quote(str(PLUGIN_DIR)),
            in_vm=1 if in_vm else 0,
            deadline=int(deadline - SHUTDOWN_SLACK),
            hard_deadline=int(deadline - SHUTDOWN_SLACK / 2),
            tests=" ".join(shlex.quote(t) for t in tests),
            scale=f"{scale:g}",
            ini_timeout=f"{INI_TIMEOUT * scale:g}",
        )
    )
    return script


def _run_bounded(command: list[str], logfile: Path, timeout: float, **options: Any) -> int | None:
    """Run in a new session; past ``timeout`` kill the whole session. None when killed."""
    with open(logfile, "ab") as output:
        process = subprocess.Popen(
            command,
            stdout=output,
            stderr=output,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **options,
        )
        try:
            return process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            _kill_session(process)
            return None
        except BaseException:
            # Interrupted (SIGINT, or the SIGTERM of whoever bounds this run): no VM outlives it.
            _kill_session(process)
            raise


def _kill_session(process: subprocess.Popen[bytes]) -> None:
    """Kill the session ``process`` leads, and any descendant that left it (qemu under a helper
    that made its own process group): only what this run started."""
    doomed = _descendants(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # comm may hold spaces and parentheses: the fields after the last ')' are fixed.
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, queue = [], [root]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _read_results(result: KernelResult, out: Path) -> None:
    with contextlib.suppress(OSError):
        result.release = (out / "uname").read_text().strip() or result.release
    try:
        result.probe = json.loads((out / "probe.json").read_text())
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            result.probe_error = (out / "probe.err").read_text().strip()[-2000:]
        result.probe_error = result.probe_error or "the probe printed no report"
    with contextlib.suppress(OSError):
        result.tests = [
            json.loads(line) for line in (out / "tests.jsonl").read_text().splitlines() if line
        ]
    with contextlib.suppress(OSError):
        running = (out / "current").read_text().strip()
        if running and all(t["nodeid"] != running for t in result.tests):
            result.tests.append(
                {
                    "nodeid": running,
                    "outcome": "failed",
                    "reason": "did not end before the VM's time ran out",
                    "duration": None,
                }
            )
    with contextlib.suppress(OSError, ValueError):
        result.pytest_status = int((out / "pytest.status").read_text())
    stamps: dict[str, tuple[float, float]] = {}
    with contextlib.suppress(OSError):
        for line in (out / "timing").read_text().splitlines():
            name, uptime, wall = line.split()
            stamps[name] = (float(uptime), float(wall))
    if "start" in stamps:
        result.timings["boot"] = round(stamps["start"][0], 1)  # uptime when the script began
        if "probe" in stamps:
            result.timings["probe"] = round(stamps["probe"][1] - stamps["start"][1], 1)
            if "tests" in stamps:
                result.timings["tests"] = round(stamps["tests"][1] - stamps["probe"][1], 1)


def _finish(result: KernelResult, deadline: float) -> None:
    if result.probe is None and not result.tests:
        if result.status == "not run":
            result.status, result.reason = "boot-failed", result.reason or result.probe_error
        return
    if result.failures() or result.probe is None:
        result.status = "failed"
    elif result.pytest_status not in (0, 5) and time.time() >= deadline - SHUTDOWN_SLACK:
        result.status, result.reason = "budget", "the time budget ran out during the tests"
    elif result.pytest_status not in (0, 5):
        result.status = "failed"
        result.reason = f"pytest ended with status {result.pytest_status}"
    else:
        result.status = "ok"


def run_kernel(
    spec: KernelSpec,
    *,
    cache: Cache,
    apt: Apt,
    tests: tuple[str, ...],
    scope: str,
    deadline: float,
    kvm: str,
    memory: str,
    cpus: int,
    workdir: Path,
    args_scale: float = 0.0,
) -> KernelResult:
    result = KernelResult(spec.name, spec.description, scope=scope)
    result.date = datetime.date.today().isoformat()
    out = workdir / spec.name
    out.mkdir(parents=True)
    started = time.time()
    try:
        if spec.kind == "host":
            result.release, result.how = os.uname().release, "in place (no VM)"
            script = _write_script(out, str(out), tests, deadline, in_vm=False)
            log(f"{spec.name}: {result.release}, in place")
            status = _run_bounded(["sh", str(script)], out / "console.log", deadline - time.time())
            _read_results(result, out)
            result.timings.pop("boot", None)
            if status is None:
                result.status, result.reason = "budget", "the time budget ran out"
        else:
            with cache.locked():
                apt.ensure(cache, APT_PACKAGES)
                if shutil.which("qemu-system-x86_64") is None:
                    raise SetupError(
                        "no qemu-system-x86_64 on PATH, though qemu-system-x86 is installed",
                        missing="qemu",
                    )
                vng = ensure_virtme(cache, apt.allow_install)
                image = (
                    ensure_debian_kernel(spec, cache, apt)
                    if spec.kind == "debian"
                    else image_kernel(spec)
                )
            result.release, result.package, result.version = (
                image.release,
                image.package,
                image.version,
            )
            result.timings["setup"] = round(time.time() - started, 1)
            left = deadline - time.time()
            if left < MIN_VM_SECONDS:
                result.status = "budget"
                result.reason = f"{left:.0f} s of the budget left, a VM needs {MIN_VM_SECONDS}"
                return result
            use_kvm, why_not = (kvm == "yes", "--kvm no") if kvm != "auto" else kvm_usable()
            result.how = "VM, KVM" if use_kvm else f"VM, emulated: {why_not}"
            log(f"{spec.name}: {image.release} ({result.how})")
            scale = args_scale if args_scale else (1.0 if use_kvm else EMULATED_TIMEOUT_SCALE)
            script = _write_script(out, GUEST_OUT, tests, deadline, in_vm=True, scale=scale)
            result.how += f", test timeouts x{scale:g}" if scale != 1 else ""
            command = [
                str(vng),
                "--run",
                str(image.vmlinuz),
                "--verbose",
                "--memory",
                memory,
                "--cpus",
                str(cpus),
                "--rwdir",
                f"{GUEST_OUT}={out}",
                "--exec",
                f"sh {GUEST_OUT}/{script.name}",
            ]
            if not use_kvm:
                command.append("--disable-kvm")
            env = {**os.environ, "PATH": f"{vng.parent}:{os.environ.get('PATH', '')}"}
            booted = time.time()
            status = _run_bounded(
                command, out / "console.log", deadline - time.time(), cwd=REPO, env=env
            )
            result.timings["vm"] = round(time.time() - booted, 1)
            _read_results(result, out)
            if status is None:
                result.reason = "the VM was stopped at the end of the time budget"
                if result.probe is None and not result.tests:
                    result.status = "budget"
            elif result.probe is None and not result.tests:
                console = (out / "console.log").read_text(errors="replace").strip().splitlines()
                result.status = "boot-failed"
                result.reason = f"vng ended with status {status}: " + " | ".join(console[-8:])
    except SetupError as exc:
        result.status = "budget" if isinstance(exc, BudgetError) else "setup-failed"
        result.reason, result.missing = str(exc), exc.missing
        return result
    finally:
        result.timings["total"] = round(time.time() - started, 1)
    _finish(result, deadline)
    return result


# --- the report ---


def _features(mask: int) -> list[str]:
    return [FEATURES[bit][0] for bit in sorted(FEATURES) if mask & (1 << bit)]


def _missing(mask: int) -> list[str]:
    return [
        f"{name} ({release})"
        for bit, (name, release) in sorted(FEATURES.items())
        if not mask & (1 << bit)
    ]


def _cell(test: dict[str, Any] | None) -> str:
    if test is None:
        return "not run"
    text = test["outcome"]
    if test["reason"] and test["outcome"] != "passed":
        text += f": {test['reason']}"
    return text.replace("|", "\\|").replace("\n", " ")


def _counts(result: KernelResult) -> Counter[str]:
    return Counter(t["outcome"] for t in result.tests)


def render_kernel(result: KernelResult) -> str:
    """One kernel's section of docs/kernels.md (Markdown)."""
    title = f"### `{result.name}`: {result.release or 'unknown release'}"
    lines = [title, ""]
    source = result.description[:1].upper() + result.description[1:]
    if result.package:
        source += f"; package `{result.package}` {result.version}"
    lines.append(
        f"{source}. Run {result.date}, {result.how or 'not started'}, scope: {result.scope}."
    )
    if result.timings:
        labels = {
            "setup": "installs and unpacking",
            "vm": "VM from start to power-off",
            "boot": "boot to the first command",
            "probe": "probe",
            "tests": "tests",
            "total": "total",
        }
        parts = [f"{labels.get(k, k)} {v:g} s" for k, v in result.timings.items()]
        lines.append(f"Times: {', '.join(parts)}.")
    lines.append("")
    if result.status not in ("ok", "failed"):
        lines += [f"**{result.status}**: {result.reason}", ""]
    probe = result.probe
    if probe is not None:
        api = probe["api"]
        mask = int(api.get("features_mask", 0))
        memfd = probe["memory"]["memfd"]["register"]
        access = probe["access"]["paths"]
        chain = probe["modes"]["chain"]
        lines += [
            "| | |",
            "|---|---|",
            f"| UFFDIO_API features | `{mask:#x}`: {', '.join(_features(mask)) or 'none'} |",
            f"| features missing | {', '.join(_missing(mask)) or 'none'} |",
            "| open paths (root) | "
            + ", ".join(f"{k} {'yes' if v['ok'] else 'no'}" for k, v in access.items())
            + " |",
            "| memfd registrations | "
            + "; ".join(
                f"{m}: {', '.join(r['ioctls']) if r['ok'] else 'refused (' + r['reason'] + ')'}"
                for m, r in memfd.items()
            )
            + " |",
            f"| probe verdict | best `{probe['modes']['best']}`; chain: "
            + ", ".join(
                f"{m['name']} {'yes' if m['available'] else 'no (' + m['reason'] + ')'}"
                for m in chain
            )
            + " |",
            "",
        ]
    elif result.probe_error:
        lines += [f"The probe failed: `{result.probe_error[-300:]}`", ""]
    if result.tests or probe is not None:
        lines += ["| case | result |", "|---|---|"]
        lines.append(f"| probe verdict test | {_cell(result.outcome('::test_probe_verdict'))} |")
        missing = _cell(result.outcome("::test_missing_features_are_refused_by_name"))
        lines.append(f"| missing features refused by name | {missing} |")
        for mode in MODES:
            lines.append(
                f"| attach `{mode}` | {_cell(result.outcome(f'::test_attach_mode[{mode}]'))} |"
            )
        for case in FALLBACKS:
            lines.append(
                f"| fallback `{case}` | {_cell(result.outcome(f'::test_fallback[{case}]'))} |"
            )
        lines.append("")
        counts = _counts(result)
        lines.append(
            f"Tests: {counts['passed']} passed, {counts['skipped']} skipped, "
            f"{counts['failed'] + counts['error']} failed."
        )
        reasons = Counter(t["reason"] for t in result.tests if t["outcome"] == "skipped")
        if reasons:
            lines += ["", "Skipped, by reason:", ""]
            lines += [f"- {n} x {reason}" for reason, n in reasons.most_common()]
        if result.failures():
            lines += ["", "Failed:", ""]
            lines += [f"- `{t['nodeid']}`: {t['reason']}" for t in result.failures()]
    return "\n".join(lines).rstrip() + "\n"


CASES = (
    "test_probe_verdict",
    *(f"test_attach_mode[{mode}]" for mode in MODES),
    *(f"test_fallback[{case}]" for case in FALLBACKS),
)


def _summary_data(result: KernelResult) -> dict[str, Any]:
    """What the summary table needs of one kernel: kept in its section, so that the summary can
    be rebuilt from every section, run now or before."""
    counts = _counts(result)
    cases = {}
    for case in CASES:
        test = result.outcome(f"::{case}")
        cases[case] = test["outcome"] if test else "not run"
    probe = result.probe or {}
    return {
        "name": result.name,
        "release": result.release,
        "status": result.status,
        "scope": result.scope.split(" (")[0],
        "date": result.date,
        "features_mask": (probe.get("api") or {}).get("features_mask"),
        "best": (probe.get("modes") or {}).get("best"),
        "cases": cases,
        "counts": [counts["passed"], counts["skipped"], counts["failed"] + counts["error"]],
    }


def _summary_row(data: dict[str, Any]) -> str:
    short = {"passed": "pass", "skipped": "skip", "failed": "FAIL", "error": "FAIL"}
    cases = data["cases"]
    attaches = " ".join(short.get(cases[f"test_attach_mode[{m}]"], "-") for m in MODES)
    fallbacks = " ".join(short.get(cases[f"test_fallback[{c}]"], "-") for c in FALLBACKS)
    mask = data["features_mask"]
    passed, skipped, failed = data["counts"]
    return (
        f"| `{data['name']}` | {data['release']} | {f'`{mask:#x}`' if mask is not None else '-'} | "
        f"{data['best'] or '-'} | {attaches} | {fallbacks} | {passed}/{skipped}/{failed} | "
        f"{data.get('scope', '')} | {data['status']} |"
    )


BEGIN = "<!-- kernel-matrix:begin {name} -->"
END = "<!-- kernel-matrix:end {name} -->"
DATA = "<!-- kernel-matrix:data {json} -->"
SECTION_RE = re.compile(
    r"<!-- kernel-matrix:begin (?P<name>[\w.-]+) -->\n(?P<body>.*?)"
    r"<!-- kernel-matrix:end (?P=name) -->\n",
    re.S,
)
DATA_RE = re.compile(r"<!-- kernel-matrix:data (?P<json>.*?) -->", re.S)
RESULTS_ANCHOR = "<!-- kernel-matrix:results -->"
SUMMARY_BEGIN = "<!-- kernel-matrix:summary-begin -->"
SUMMARY_END = "<!-- kernel-matrix:summary-end -->"


def _data_comment(result: KernelResult) -> str:
    data = _summary_data(result)
    # An HTML comment cannot hold "--": escape every '-' inside JSON strings' text.
    text = json.dumps(data, separators=(",", ":")).replace("-", "\\u002d")
    return DATA.format(json=text)


def write_doc(results: list[KernelResult], path: Path = DOC) -> None:
    """Replace (or add) each kernel's section in docs/kernels.md, then the summary table."""
    text = path.read_text()
    if RESULTS_ANCHOR not in text or SUMMARY_BEGIN not in text:
        raise SetupError(f"{path} lacks the {RESULTS_ANCHOR} or {SUMMARY_BEGIN} marker")
    for result in results:
        section = (
            BEGIN.format(name=result.name)
            + "\n"
            + _data_comment(result)
            + "\n\n"
            + render_kernel(result)
            + "\n"
            + END.format(name=result.name)
            + "\n"
        )
        existing = next((m for m in SECTION_RE.finditer(text) if m["name"] == result.name), None)
        if existing:
            text = text[: existing.start()] + section + text[existing.end() :]
        else:
            text = text.replace(RESULTS_ANCHOR, RESULTS_ANCHOR + "\n\n" + section.rstrip("\n"), 1)
    rows = []
    for match in SECTION_RE.finditer(text):
        data = DATA_RE.search(match["body"])
        if data:
            rows.append(_summary_row(json.loads(data["json"])))
    summary = "\n".join(
        [
            SUMMARY_BEGIN,
            "| kernel | release | features | best mode | attach: "
            + " / ".join(MODES)
            + " | fallbacks: "
            + " / ".join(FALLBACKS)
            + " | tests passed/skipped/failed | tests run | status |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            SUMMARY_END,
        ]
    )
    start, end = text.index(SUMMARY_BEGIN), text.index(SUMMARY_END) + len(SUMMARY_END)
    text = text[:start] + summary + text[end:]
    path.write_text(text)


# --- commands ---


def resolve_kernels(names: list[str]) -> list[KernelSpec]:
    specs = []
    for name in names:
        if name in KERNELS:
            specs.append(KERNELS[name])
        elif "/" in name or Path(name).exists():
            path = Path(name)
            specs.append(
                KernelSpec(path.name, f"the kernel image {path}", "image", image=str(path))
            )
        else:
            raise SetupError(
                f"unknown kernel {name!r}: one of {', '.join(KERNELS)} or a path to a vmlinuz"
            )
    return specs


def command_run(args: argparse.Namespace) -> int:
    if args.from_json:
        merged: dict[str, KernelResult] = {}
        for path in args.from_json:
            for kernel in json.loads(Path(path).read_text())["kernels"]:
                result = KernelResult(**kernel)
                merged[result.name] = (
                    _merge(merged[result.name], result) if result.name in merged else result
                )
        return _report(list(merged.values()), args)
    started = time.time()
    deadline = started + args.budget if args.budget else float("inf")
    BUDGET.deadline = deadline
    cache = Cache(args.cache)
    apt = Apt(allow_install=not args.no_install)
    specs = resolve_kernels(args.kernel or list(DEFAULT_KERNELS))
    if args.tests:
        tests, scope = tuple(args.tests), " ".join(args.tests)
    elif args.subset:
        tests, scope = SUBSET_TESTS, "subset (tests/kernel/test_matrix.py)"
    else:
        tests, scope = FULL_TESTS, "full (tests/integration, tests/kernel/test_matrix.py)"
    workdir = Path(tempfile.mkdtemp(prefix="shmfault-kernel-matrix-"))
    results: list[KernelResult] = []
    try:
        for spec in specs:
            # A VM that cannot finish by the deadline gets what is left; without a budget each
            # kernel gets a generous day.
            limit = min(deadline, time.time() + 24 * 3600)
            result = run_kernel(
                spec,
                cache=cache,
                apt=apt,
                tests=tests,
                scope=scope,
                deadline=limit,
                kvm=args.kvm,
                memory=args.memory,
                cpus=args.cpus,
                workdir=workdir,
                args_scale=args.timeout_scale,
            )
            results.append(result)
            counts = _counts(result)
            log(
                f"{spec.name}: {result.status}{': ' + result.reason if result.reason else ''}; "
                f"{counts['passed']} passed, {counts['skipped']} skipped, "
                f"{counts['failed'] + counts['error']} failed; {result.timings}"
            )
    finally:
        if args.keep:
            log(f"kept this run's files in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        payload = {
            "elapsed": round(time.time() - started, 1),
            "kernels": [dataclasses.asdict(r) for r in results],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return _report(results, args)


_STATUS_RANK = ("ok", "budget", "boot-failed", "setup-failed", "failed", "not run")


def _merge(first: KernelResult, second: KernelResult) -> KernelResult:
    """Two runs of one kernel (say, different test files) as one: the later run's probe and
    outcome of a test win; the scopes, reasons and times add up."""
    tests = {t["nodeid"]: t for t in first.tests}
    tests.update({t["nodeid"]: t for t in second.tests})
    status = max(
        first.status,
        second.status,
        key=lambda s: -1 if s not in _STATUS_RANK else _STATUS_RANK.index(s),
    )
    timings = {
        key: round(first.timings.get(key, 0) + second.timings.get(key, 0), 1)
        for key in {**first.timings, **second.timings}
        if key in ("setup", "vm", "tests", "total")
    }
    return dataclasses.replace(
        second,
        status=status,
        reason="; ".join(r for r in (first.reason, second.reason) if r),
        scope=f"{first.scope} + {second.scope}",
        tests=list(tests.values()),
        probe=second.probe or first.probe,
        timings={**{k: v for k, v in second.timings.items() if k in ("boot", "probe")}, **timings},
    )


def _report(results: list[KernelResult], args: argparse.Namespace) -> int:
    if args.write:
        write_doc(results)
        log(f"updated {DOC.relative_to(REPO)}")
    else:
        for result in results:
            print(render_kernel(result))
    statuses = {r.status for r in results}
    if statuses & {"setup-failed", "boot-failed"}:
        return 2
    if "failed" in statuses:
        return 1
    if statuses - {"ok"}:
        return 3
    return 0


def command_install(args: argparse.Namespace) -> int:
    cache = Cache(args.cache)
    apt = Apt(allow_install=True)
    with cache.locked():
        apt.ensure(cache, APT_PACKAGES)
        ensure_virtme(cache, True)
        for spec in resolve_kernels(args.kernel or list(DEFAULT_KERNELS)):
            if spec.kind == "debian":
                image = ensure_debian_kernel(spec, cache, apt)
                log(f"{spec.name}: {image.vmlinuz}")
    usable, why = kvm_usable()
    log("KVM works here" if usable else f"no KVM, the VMs will be emulated: {why}")
    return 0


def command_list(args: argparse.Namespace) -> int:
    for spec in KERNELS.values():
        default = " (default)" if spec.name in DEFAULT_KERNELS else ""
        print(f"{spec.name:<12} {spec.description}{default}")
    print(f"{'PATH':<12} any vmlinuz; its modules are looked for in ../lib/modules/RELEASE")
    return 0


def command_clean(args: argparse.Namespace) -> int:
    cache = Cache(args.cache)
    packages = cache.manifest()["apt_installed"]
    if args.uninstall and packages:
        if os.geteuid() != 0:
            raise SetupError("purging the packages this script installed needs root")
        installed = dpkg_installed()
        present = [p for p in packages if p in installed]
        if present:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            run(
                ["apt-get", "-o", "DPkg::Lock::Timeout=300", "purge", "-y", "-qq", *present],
                env=env,
            )
        log(f"purged {len(present)} Debian packages this script had installed")
    elif packages:
        log(
            f"kept the Debian packages it installed ({' '.join(packages)}): "
            "clean --uninstall purges them"
        )
    if cache.root.exists():
        if packages and not args.uninstall:
            # Keep only the record of the packages, so a later `clean --uninstall` still knows.
            for child in cache.root.iterdir():
                if child != cache.manifest_path:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            shutil.rmtree(cache.root)
        log(f"removed {cache.root}")
    return 0


COMMANDS = ("run", "install", "list", "clean")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kernel_matrix.py",
        description=__doc__.split("\n\n")[0],
        epilog="Without a command: run.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache",
        type=Path,
        default=default_cache(),
        help="where the tools and kernels are kept between runs (default: %(default)s)",
    )
    commands = parser.add_subparsers(dest="command")
    run_parser = commands.add_parser("run", parents=[common], help="run the matrix")
    run_parser.add_argument(
        "--kernel",
        action="append",
        help=f"{', '.join(KERNELS)}, or the path of a vmlinuz; repeatable "
        f"(default: {' '.join(DEFAULT_KERNELS)})",
    )
    run_parser.add_argument(
        "--subset",
        action="store_true",
        help="only tests/kernel/test_matrix.py: the probe, one attach per mode, the fallbacks",
    )
    run_parser.add_argument("--tests", nargs="+", help="these pytest paths or node ids instead")
    run_parser.add_argument(
        "--budget",
        type=float,
        default=0,
        help="seconds for the whole run, installs included; tests that would start later are "
        "not run (default: no limit)",
    )
    run_parser.add_argument(
        "--write", action="store_true", help="update docs/kernels.md instead of printing"
    )
    run_parser.add_argument("--json", help="also write every result to this file")
    run_parser.add_argument(
        "--from-json",
        metavar="FILE",
        nargs="+",
        help="run nothing: report the results --json saved (runs of one kernel are merged)",
    )
    run_parser.add_argument(
        "--kvm",
        choices=("auto", "yes", "no"),
        default="auto",
        help="auto: KVM when qemu can start a KVM guest here, else emulation",
    )
    run_parser.add_argument(
        "--timeout-scale",
        type=float,
        default=0,
        help=f"multiply every test timeout in a VM by this (default: "
        f"{EMULATED_TIMEOUT_SCALE:g} when emulated, 1 with KVM)",
    )
    run_parser.add_argument("--memory", default="2G", help="VM memory (default: %(default)s)")
    run_parser.add_argument("--cpus", type=int, default=2, help="VM CPUs (default: %(default)s)")
    run_parser.add_argument(
        "--no-install",
        action="store_true",
        help="fail, saying what is missing, instead of installing",
    )
    run_parser.add_argument(
        "--keep", action="store_true", help="keep this run's VM logs and results, and say where"
    )
    install_parser = commands.add_parser(
        "install", parents=[common], help="install the tools and unpack the kernels; run nothing"
    )
    install_parser.add_argument("--kernel", action="append")
    commands.add_parser("list", parents=[common], help="the kernels this script knows")
    clean_parser = commands.add_parser("clean", parents=[common], help="remove the cache")
    clean_parser.add_argument(
        "--uninstall",
        action="store_true",
        help="also purge the Debian packages this script installed",
    )
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]
    return parser.parse_args(argv)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Whoever bounds this run stops it with SIGTERM: it unwinds like ^C, so the VM is killed
    # and this run's temporary directory removed on the way out.
    signal.signal(signal.SIGTERM, _interrupted)
    handlers = {
        "run": command_run,
        "install": command_install,
        "list": command_list,
        "clean": command_clean,
    }
    try:
        return handlers[args.command](args)
    except SetupError as exc:
        log(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        log("interrupted: the VM is stopped and this run's files removed")
        return 130


if __name__ == "__main__":
    sys.exit(main())

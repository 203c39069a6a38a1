"""The reference C handler (``uffd_bench.c``), when it is present beside the repository: built at
run time into the temporary directory and run in the same session as shmfault, so that its
figures and shmfault's are taken under the same conditions."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from benchmarks.service import REPO, track, untrack

#: Where the reference handler lives, relative to the repository checkout.
DEFAULT_SOURCE = REPO.parent / "shared" / "reference" / "uffd_bench.c"

#: shmfault mode -> the reference mode doing the same kind of resolution.
REFERENCE_MODE = {
    "shared-copy": "shm-copy",
    "shared-continue": "shm-minor",
    "private-copy": "anon-copy",
}


@dataclass
class Reference:
    binary: Path
    source: Path

    def run(
        self,
        *,
        mode: str,
        pattern: str,
        size: int,
        fault_around: int = 1,
        touches: int = 0,
        write: bool = True,
        seed: int = 1,
        timeout: float = 300.0,
    ) -> dict[str, float | int | str]:
        """One ``uffd_bench client`` run; its RESULT line as a dict (numbers converted).
        Raises RuntimeError when it fails or reports pages with wrong bytes."""
        command = self.command(
            mode=mode,
            pattern=pattern,
            size=size,
            fault_around=fault_around,
            touches=touches,
            write=write,
            seed=seed,
        )
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        track(process)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        finally:
            untrack(process)
        result = parse_result(out.decode(errors="replace"))
        if result is None or process.returncode != 0:
            raise RuntimeError(
                f"reference run failed (exit {process.returncode}): {' '.join(command)}\n"
                f"{out.decode(errors='replace')}{err.decode(errors='replace')}"
            )
        return result

    def command(
        self,
        *,
        mode: str,
        pattern: str,
        size: int,
        fault_around: int = 1,
        touches: int = 0,
        write: bool = True,
        seed: int = 1,
    ) -> list[str]:
        command = [
            str(self.binary),
            "client",
            "--mode",
            mode,
            "--pattern",
            pattern,
            "--size-mib",
            str(size >> 20),
            "--touch",
            "w" if write else "r",
            "--seed",
            str(seed),
        ]
        if not mode.startswith("base-") and mode != "memcpy":
            command += ["--fa", str(fault_around), "--handler", f"{self.binary} handler"]
        if pattern == "rand":
            command += ["--nfaults", str(touches)]
        return command


def parse_result(text: str) -> dict[str, float | int | str] | None:
    """The ``RESULT key=value ...`` line of a reference run, numbers as int/float."""
    for line in text.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, float | int | str] = {}
            for item in line.split()[1:]:
                key, _, value = item.partition("=")
                try:
                    result[key] = int(value)
                except ValueError:
                    try:
                        result[key] = float(value)
                    except ValueError:
                        result[key] = value
            return result
    return None


def build(source: Path, directory: Path) -> tuple[Reference | None, str]:
    """Build the reference handler from ``source`` into ``directory``: the Reference, or None
    and why not."""
    if not source.is_file():
        return None, f"reference handler not found at {shown(source)}: its baselines are skipped"
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None, "no C compiler: the reference handler's baselines are skipped"
    binary = directory / "uffd_bench"
    done = subprocess.run(
        [compiler, "-O2", "-pthread", "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return (
            None,
            f"building {shown(source)} failed: the reference baselines are skipped\n{done.stderr}",
        )
    return Reference(binary, source), f"reference handler built from {shown(source)}"


def shown(path: Path) -> str:
    """``path`` as the reports show it: relative to the repository when that is shorter."""
    try:
        return os.path.relpath(path, REPO)
    except ValueError:
        return str(path)

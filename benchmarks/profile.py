"""``python -m benchmarks profile``: where the service's time per fault goes.

Runs one workload against a service under a profiler and prints the top frames:

- ``py-spy`` (default when installed): samples the running service from outside (no change to
  it, small overhead). Idle threads are left out and only stacks of the fault engine's thread are
  counted. A frame blocked in a system call (``ioctl``, ``read``, ``lseek``) is the leaf and is
  charged with the kernel's time of that call.
- ``perf`` (Linux perf, when installed): samples user and kernel code of every thread of the
  service, which shows the interpreter's share against the kernel's (the ioctl, the wake-ups,
  the context switches) that a Python-level profile cannot split.
- ``cprofile``: the engine thread under cProfile (benchmarks/serve_profiled.py). Exact call
  counts; per-call overhead inflates small functions.
"""

from __future__ import annotations

import collections
import io
import pstats
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.service import Service, track, untrack
from benchmarks.workloads import Config, Record, Workspace, shmfault_rand, shmfault_seq

ENGINE_FRAME = "FaultEngine._run"


def find_tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _strip(frame: str) -> str:
    """``name (/long/path/shmfault/engine.py:123)`` -> ``name (shmfault/engine.py:123)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("/shmfault/", "/site-packages/", "/lib/python3."):
        if marker in where:
            tail = where.split(marker, 1)[1]
            if marker == "/shmfault/":
                where = "shmfault/" + tail
            elif marker == "/lib/python3.":
                where = tail.split("/", 1)[-1]
            else:
                where = tail
            break
    return f"{name} ({where})" if where else name


def _function(frame: str) -> str:
    """A frame without its line number."""
    return re.sub(r":\d+\)$", ")", frame)


def parse_collapsed(
    text: str, only: str = ENGINE_FRAME
) -> tuple[int, int, collections.Counter[str], collections.Counter[str]]:
    """From a collapsed-stack profile (``frame;frame;leaf COUNT`` per line): all samples, the
    samples whose stack holds ``only``, and for those the self samples per frame (leaf, with its
    line) and the inclusive samples per function (once per stack)."""
    everything = 0
    total = 0
    leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        everything += count
        if only and only not in stack:
            continue
        frames = [_strip(f) for f in stack.split(";") if f]
        total += count
        if frames:
            leaf[frames[-1]] += count
        for function in {_function(f) for f in frames}:
            inclusive[function] += count
    return everything, total, leaf, inclusive


def _format_counts(title: str, counts: collections.Counter[str], total: int, top: int) -> str:
    lines = [f"{title}:"]
    for frame, count in counts.most_common(top):
        lines.append(f"  {100 * count / total:5.1f}%  {frame}")
    return "\n".join(lines) + "\n"


def _workload(
    ws: Workspace,
    service: Service,
    workload: str,
    mode: str,
    rounds: int,
    say: Callable[[str], None],
) -> list[Record]:
    records = []
    with service.client() as client:
        for rep in range(rounds):
            if workload == "rand":
                record = shmfault_rand(ws, service, client, mode, rep, ws.random_pages(rep))
            else:
                record = shmfault_seq(ws, service, client, mode, rep)
            say(
                f"  round {rep + 1}: {record['faults']} faults, "
                f"{'ok' if record['verified'] else 'BAD PAGES'}"
            )
            records.append(record)
    return records


@contextmanager
def _sampler(command: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """Run a sampling profiler for the duration of the block; stop it with SIGINT (both
    py-spy and perf write their output on SIGINT)."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    track(process)
    try:
        time.sleep(1.0)  # let it attach
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        untrack(process)


def thread_times(pid: int) -> dict[int, int]:
    """utime + stime (clock ticks) of every thread of ``pid``."""
    times = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_bytes()
        except OSError:
            continue
        fields = text[text.rindex(b")") + 2 :].split()
        times[int(task.name)] = int(fields[11]) + int(fields[12])
    return times


def busiest_thread(before: dict[int, int], after: dict[int, int]) -> int:
    """The thread that used the most CPU between two :func:`thread_times` (0: none)."""
    used = {tid: ticks - before.get(tid, 0) for tid, ticks in after.items()}
    return max(used, key=lambda tid: used[tid]) if used else 0


_PERF_LINE = re.compile(r"^\s+([\d.]+)%\s+(?:([\d.]+)%\s+)?(.*\S)\s*$")


def _perf_report(perf: str, data: Path, *arguments: str) -> list[tuple[float, str]]:
    done = subprocess.run(
        [perf, "report", "-i", str(data), "--stdio", "-g", "none", *arguments],
        capture_output=True,
        text=True,
        check=False,
    )
    rows = []
    for line in done.stdout.splitlines():
        match = _PERF_LINE.match(line)
        if match:
            rows.append((float(match.group(1)), re.sub(r"\s+", " ", match.group(3))))
    return rows


def _engine_rows(rows: list[tuple[float, str]], tid: int) -> list[tuple[float, str]]:
    """The rows of thread ``tid`` from a report sorted by pid first (``TID:comm rest``), with
    the thread column removed."""
    kept = []
    for share, name in rows:
        thread, _, rest = name.partition(" ")
        if thread.split(":", 1)[0] == str(tid):
            kept.append((share, rest))
    return kept


def run_profile(
    config: Config,
    *,
    profiler: str,
    workload: str,
    mode: str,
    fault_around: int,
    rounds: int,
    top: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Profile the service on ``rounds`` runs of ``workload``; returns the report as data."""
    with Workspace(config, say) as ws:
        directory = ws.directory / f"profile-fa{fault_around}"
        frames: dict[str, Any]
        if profiler in ("py-spy", "perf"):
            tool = find_tool(profiler)
            if tool is None:
                raise SystemExit(f"{profiler} is not installed; try another --profiler")
            service = Service(directory, fault_around=fault_around, extra_args=config.service_args)
            output = ws.directory / f"{profiler}.out"
            with service:
                if profiler == "py-spy":
                    command = [
                        tool, "record", "--pid", str(service.pid), "--rate", "1000",
                        "--format", "raw", "--output", str(output), "--nonblocking",
                    ]  # fmt: skip
                else:
                    command = [
                        tool, "record", "-e", "cpu-clock", "-F", "4000", "-g",
                        "-p", str(service.pid), "-o", str(output),
                    ]  # fmt: skip
                before = thread_times(service.pid)
                with _sampler(command):
                    records = _workload(ws, service, workload, mode, rounds, say)
                busiest = busiest_thread(before, thread_times(service.pid))
            if not output.exists():
                raise SystemExit(f"{profiler} wrote no profile")
            if profiler == "py-spy":
                everything, total, leaf, inclusive = parse_collapsed(output.read_text())
                text = (
                    f"{total} samples on the engine thread ({everything} on all threads; "
                    "idle ones excluded)\n\n"
                )
                text += _format_counts("Self (leaf frame, with its line)", leaf, total, top)
                text += "\n" + _format_counts(
                    "Inclusive (function anywhere on the stack)", inclusive, total, top
                )
                frames = {
                    "samples": total,
                    "samples_all_threads": everything,
                    "self": [[f, c] for f, c in leaf.most_common(top)],
                    "inclusive": [[f, c] for f, c in inclusive.most_common(top)],
                }
            else:
                # The fault engine is the service's busiest thread by far; the others (gRPC,
                # region teardown) are left out. (perf's --tid filter mixes threads up here:
                # sort by pid, i.e. thread, and keep the engine's rows instead.)
                symbols = _engine_rows(
                    _perf_report(tool, output, "--no-children", "--sort", "pid,dso,sym"), busiest
                )
                children = _engine_rows(
                    _perf_report(tool, output, "--children", "--sort", "pid,sym"), busiest
                )
                engine_total = sum(share for share, _ in symbols) or 1.0
                symbols = [(100 * share / engine_total, name) for share, name in symbols]
                children = [(100 * share / engine_total, name) for share, name in children]
                by_dso: dict[str, float] = {}
                for share, name in symbols:
                    dso = name.split(" [", 1)[0]
                    by_dso[dso] = by_dso.get(dso, 0.0) + share
                dsos = sorted(((share, name) for name, share in by_dso.items()), reverse=True)
                text = (
                    f"Engine thread only (tid {busiest}, the busiest during the workload: "
                    f"{engine_total:.0f}% of the service's samples); shares of its samples.\n\n"
                )
                text += "Samples by object (self):\n" + "".join(
                    f"  {share:5.1f}%  {name}\n" for share, name in dsos[:top]
                )
                text += "\nTop symbols (self):\n" + "".join(
                    f"  {share:5.1f}%  {name}\n" for share, name in symbols[:top]
                )
                kernel = [
                    (share, name)
                    for share, name in children
                    if "[k]" in name and not re.search(r"\[k\] 0x[0-9a-f]+$", name)
                ]
                text += "\nKernel paths (inclusive: the symbol and what it calls):\n" + "".join(
                    f"  {share:5.1f}%  {name}\n" for share, name in kernel[:top]
                )
                frames = {"dso": dsos, "symbols": symbols[:top], "kernel_inclusive": kernel[:top]}
        else:
            output = ws.directory / "engine.pstats"
            service = Service(
                directory,
                fault_around=fault_around,
                extra_args=config.service_args,
                launcher=[sys.executable, "-m", "benchmarks.serve_profiled", str(output)],
            )
            with service:
                records = _workload(ws, service, workload, mode, rounds, say)
            if not output.exists():
                raise SystemExit(f"the profiled service wrote no profile; see {service.log}")
            stream = io.StringIO()
            stats = pstats.Stats(str(output), stream=stream)
            stats.sort_stats("tottime").print_stats(top)
            stats.sort_stats("cumulative").print_stats(top)
            text = stream.getvalue()
            frames = {"pstats": text}
        faults = sum(r["faults"] for r in records)
        cpu = sum(r["service_cpu_ns"] for r in records)
        user = sum(r["service_user_ns"] for r in records)
        return {
            "profiler": profiler,
            "workload": workload,
            "mode": mode,
            "fault_around": fault_around,
            "rounds": rounds,
            "faults": faults,
            "service_cpu_ns_per_fault": cpu / faults if faults else None,
            "service_user_ns_per_fault": user / faults if faults else None,
            "verified": all(r["verified"] for r in records),
            "text": text,
            "frames": frames,
            "records": records,
        }

"""Aggregation and output: medians over repetitions, ratios against the baselines of the same
repetition, Markdown tables, the JSON document, the machine's facts."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from benchmarks.service import REPO
from benchmarks.workloads import Record

#: The targets of this round: (name, metric, comparison, bound).
TARGET_P50 = 1.0  # random p50 <= 1.0x the reference
TARGET_FAULTS = 0.9  # random faults/s >= 0.9x the reference
TARGET_SEQ = 1.0  # sequential GB/s >= 1.0x the kernel's first touch of a populated memfd
TARGET_REPLAY = 3.7  # replayed working set >= 3.7x faster to completion than on demand (REAP)


def machine_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "machine": platform.machine(),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    facts["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            facts["memory_gib"] = round(int(meminfo.readline().split()[1]) / (1 << 20), 1)
    except (OSError, ValueError, IndexError):
        pass
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode == 0:
        facts["commit"] = done.stdout.strip()
    return facts


def _select(records: Iterable[Record], **match: Any) -> list[Record]:
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def _median(records: Sequence[Record], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def _paired(numerators: Sequence[Record], denominators: Sequence[Record], key: str) -> list[float]:
    """numerator/denominator for every repetition that has both."""
    by_rep = {r["rep"]: r for r in denominators}
    ratios = []
    for record in numerators:
        other = by_rep.get(record["rep"])
        if other is None:
            continue
        top, bottom = record.get(key), other.get(key)
        if top is not None and bottom:
            ratios.append(top / bottom)
    return ratios


def _paired_ratio(
    numerators: Sequence[Record], denominators: Sequence[Record], key: str
) -> float | None:
    """Median over repetitions of numerator/denominator, each pair from the same repetition."""
    ratios = _paired(numerators, denominators, key)
    return statistics.median(ratios) if ratios else None


def _paired_range(
    numerators: Sequence[Record], denominators: Sequence[Record], key: str
) -> list[float] | None:
    """[lowest, highest] of the per-repetition ratios: how much the pairs disagree."""
    ratios = _paired(numerators, denominators, key)
    return [min(ratios), max(ratios)] if ratios else None


def summarise(records: list[Record], config: Any) -> dict[str, Any]:
    """Table rows (medians and paired ratios) and the targets' verdicts."""
    kernel_rand = _select(records, workload="rand", subject="kernel")
    kernel_seq = _select(records, workload="seq", subject="kernel")
    memcpy = _select(records, workload="seq", subject="memcpy")
    rand_rows = []
    for fault_around in config.rand_fault_around if "rand" in config.workloads else ():
        for mode in config.modes:
            mine = _select(records, workload="rand", subject="shmfault", mode=mode,
                           fault_around=fault_around)  # fmt: skip
            if not mine:
                continue
            ref = _select(records, workload="rand", subject="reference", mode=mode,
                          fault_around=fault_around)  # fmt: skip
            rand_rows.append(
                {
                    "mode": mode,
                    "fault_around": fault_around,
                    "touches": _median(mine, "touches"),
                    "faults": _median(mine, "faults"),
                    "p50_ns": _median(mine, "p50_ns"),
                    "p99_ns": _median(mine, "p99_ns"),
                    "p999_ns": _median(mine, "p999_ns"),
                    "kernel_p50_ns": _median(kernel_rand, "p50_ns"),
                    "fault_p50_ns": _median(mine, "fault_p50_ns"),
                    "fault_p99_ns": _median(mine, "fault_p99_ns"),
                    "faults_per_s": _median(mine, "faults_per_s"),
                    "cpu_ns_per_fault": _median(mine, "cpu_ns_per_fault"),
                    "user_ns_per_fault": _median(mine, "user_ns_per_fault"),
                    "sys_ns_per_fault": _median(mine, "sys_ns_per_fault"),
                    "oncpu_ns_per_fault": _median(mine, "oncpu_ns_per_fault"),
                    "reference_mode": ref[0]["reference_mode"] if ref else None,
                    "ref_faults": _median(ref, "faults"),
                    "ref_user_ns_per_fault": _median(ref, "user_ns_per_fault"),
                    "ref_sys_ns_per_fault": _median(ref, "sys_ns_per_fault"),
                    "ref_p50_ns": _median(ref, "p50_ns"),
                    "ref_p99_ns": _median(ref, "p99_ns"),
                    "ref_faults_per_s": _median(ref, "faults_per_s"),
                    "ref_cpu_ns_per_fault": _median(ref, "cpu_ns_per_fault"),
                    "p50_vs_ref": _paired_ratio(mine, ref, "p50_ns"),
                    "p50_vs_ref_range": _paired_range(mine, ref, "p50_ns"),
                    "p99_vs_ref": _paired_ratio(mine, ref, "p99_ns"),
                    "faults_per_s_vs_ref": _paired_ratio(mine, ref, "faults_per_s"),
                    "faults_per_s_vs_ref_range": _paired_range(mine, ref, "faults_per_s"),
                    "cpu_vs_ref": _paired_ratio(mine, ref, "cpu_ns_per_fault"),
                    "p50_vs_kernel": _paired_ratio(mine, kernel_rand, "p50_ns"),
                    "verified": all(r["verified"] for r in mine + ref),
                    "repetitions": len(mine),
                }
            )
    seq_rows = []
    for fault_around in config.seq_fault_around if "seq" in config.workloads else ():
        for mode in config.modes:
            mine = _select(records, workload="seq", subject="shmfault", mode=mode,
                           fault_around=fault_around)  # fmt: skip
            if not mine:
                continue
            ref = _select(records, workload="seq", subject="reference", mode=mode,
                          fault_around=fault_around)  # fmt: skip
            seq_rows.append(
                {
                    "mode": mode,
                    "fault_around": fault_around,
                    "faults": _median(mine, "faults"),
                    "gbps": _median(mine, "gbps"),
                    "cpu_ns_per_fault": _median(mine, "cpu_ns_per_fault"),
                    "user_ns_per_fault": _median(mine, "user_ns_per_fault"),
                    "sys_ns_per_fault": _median(mine, "sys_ns_per_fault"),
                    "oncpu_ns_per_fault": _median(mine, "oncpu_ns_per_fault"),
                    "reference_mode": ref[0]["reference_mode"] if ref else None,
                    "ref_gbps": _median(ref, "gbps"),
                    "ref_cpu_ns_per_fault": _median(ref, "cpu_ns_per_fault"),
                    "ref_user_ns_per_fault": _median(ref, "user_ns_per_fault"),
                    "ref_sys_ns_per_fault": _median(ref, "sys_ns_per_fault"),
                    "vs_ref": _paired_ratio(mine, ref, "gbps"),
                    "vs_ref_range": _paired_range(mine, ref, "gbps"),
                    "vs_kernel": _paired_ratio(mine, kernel_seq, "gbps"),
                    "vs_kernel_range": _paired_range(mine, kernel_seq, "gbps"),
                    "vs_memcpy": _paired_ratio(mine, memcpy, "gbps"),
                    "verified": all(r["verified"] for r in mine + ref),
                    "repetitions": len(mine),
                }
            )
    replay_rows = []
    for fault_around in config.replay_fault_around if "replay" in config.workloads else ():
        for mode in config.modes:
            variants = {
                variant: _select(
                    records,
                    workload="replay",
                    variant=variant,
                    mode=mode,
                    fault_around=fault_around,
                )
                for variant in ("record", "ondemand", "replay")
            }
            if not variants["ondemand"] or not variants["replay"]:
                continue
            replay_rows.append(
                {
                    "mode": mode,
                    "fault_around": fault_around,
                    "touches": _median(variants["replay"], "touches"),
                    "record_ms": _ms(_median(variants["record"], "elapsed_ns")),
                    "ondemand_ms": _ms(_median(variants["ondemand"], "elapsed_ns")),
                    "replay_ms": _ms(_median(variants["replay"], "elapsed_ns")),
                    "ondemand_faults": _median(variants["ondemand"], "faults"),
                    "replay_faults": _median(variants["replay"], "faults"),
                    "prefetched": _median(variants["replay"], "pages_prefetched"),
                    "speedup": _paired_ratio(
                        variants["ondemand"], variants["replay"], "elapsed_ns"
                    ),
                    "speedup_range": _paired_range(
                        variants["ondemand"], variants["replay"], "elapsed_ns"
                    ),
                    "record_overhead": _paired_ratio(
                        variants["record"], variants["ondemand"], "elapsed_ns"
                    ),
                    "verified": all(r["verified"] for v in variants.values() for r in v),
                    "repetitions": len(variants["replay"]),
                }
            )
    baselines = []
    if kernel_rand:
        baselines.append(
            {
                "name": "kernel first touch, populated memfd, random",
                "p50_ns": _median(kernel_rand, "p50_ns"),
                "p99_ns": _median(kernel_rand, "p99_ns"),
                "faults_per_s": _median(kernel_rand, "faults_per_s"),
                "verified": all(r["verified"] for r in kernel_rand),
            }
        )
    for name, chosen in (
        ("kernel first touch, populated memfd, sequential", kernel_seq),
        ("memcpy", memcpy),
        (
            "reference: kernel first touch (base-shm-minor), sequential",
            _select(records, workload="seq", subject="reference", mode="base-shm-minor"),
        ),
        (
            "reference: memcpy",
            _select(records, workload="seq", subject="reference", mode="memcpy"),
        ),
    ):
        if chosen:
            baselines.append(
                {
                    "name": name,
                    "gbps": _median(chosen, "gbps"),
                    "verified": all(r["verified"] for r in chosen),
                }
            )
    targets = []
    for row in rand_rows:
        if row["p50_vs_ref"] is not None:
            targets.append(
                {
                    "target": f"rand {row['mode']} fa={row['fault_around']}: p50 <= "
                    f"{TARGET_P50}x reference",
                    "value": row["p50_vs_ref"],
                    "range": row["p50_vs_ref_range"],
                    "met": row["p50_vs_ref"] <= TARGET_P50,
                }
            )
        if row["faults_per_s_vs_ref"] is not None:
            targets.append(
                {
                    "target": f"rand {row['mode']} fa={row['fault_around']}: faults/s >= "
                    f"{TARGET_FAULTS}x reference",
                    "value": row["faults_per_s_vs_ref"],
                    "range": row["faults_per_s_vs_ref_range"],
                    "met": row["faults_per_s_vs_ref"] >= TARGET_FAULTS,
                }
            )
    for row in seq_rows:
        if row["vs_kernel"] is not None:
            targets.append(
                {
                    "target": f"seq {row['mode']} fa={row['fault_around']}: GB/s >= "
                    f"{TARGET_SEQ}x kernel first touch",
                    "value": row["vs_kernel"],
                    "range": row["vs_kernel_range"],
                    "met": row["vs_kernel"] >= TARGET_SEQ,
                }
            )
    for row in replay_rows:
        if row["speedup"] is not None:
            targets.append(
                {
                    "target": f"replay {row['mode']} fa={row['fault_around']}: time to "
                    f"completion >= {TARGET_REPLAY}x faster than on demand",
                    "value": row["speedup"],
                    "range": row["speedup_range"],
                    "met": row["speedup"] >= TARGET_REPLAY,
                }
            )
    multi = summarise_multi(records)
    return {
        "rand": rand_rows,
        "seq": seq_rows,
        "file": summarise_file(records),
        "replay": replay_rows,
        "baselines": baselines,
        "shared_modes": compare_shared_modes(records),
        **{key: value for key, value in multi.items() if key != "targets"},
        "targets": targets + multi["targets"],
    }


def summarise_file(records: list[Record]) -> list[dict[str, Any]]:
    """One row per mode and state of the ``file`` workload, against the kernel's first touch
    of the file in the same state (paired by repetition)."""
    rows = []
    files = _select(records, workload="file")
    for state in ("cold", "warm"):
        kernel = _select(files, subject="kernel", state=state)
        if not kernel:
            continue
        modes = dict.fromkeys(r["mode"] for r in files if r["subject"] == "shmfault")
        for mode in ["kernel", *modes]:
            mine = kernel if mode == "kernel" else _select(files, mode=mode, state=state)
            if not mine:
                continue
            rows.append(
                {
                    "mode": "kernel: mmap of the file" if mode == "kernel" else mode,
                    "state": state,
                    "cached_before": _median(mine, "cached_before"),
                    "faults": _median(mine, "faults") if mode != "kernel" else None,
                    "gbps": _median(mine, "gbps"),
                    "vs_kernel": None if mode == "kernel" else _paired_ratio(mine, kernel, "gbps"),
                    "vs_kernel_range": None
                    if mode == "kernel"
                    else _paired_range(mine, kernel, "gbps"),
                    "cpu_ns_per_fault": _median(mine, "cpu_ns_per_fault")
                    if mode != "kernel"
                    else None,
                    "user_ns_per_fault": _median(mine, "user_ns_per_fault")
                    if mode != "kernel"
                    else None,
                    "sys_ns_per_fault": _median(mine, "sys_ns_per_fault")
                    if mode != "kernel"
                    else None,
                    "verified": all(r["verified"] for r in mine),
                }
            )
    return rows


def compare_shared_modes(records: list[Record]) -> list[dict[str, Any]]:
    """shared-continue against shared-copy, paired by repetition (same service, same pages):
    the measurement the default shared mode is chosen by."""
    rows = []
    keys = sorted(
        {
            (r["workload"], r["fault_around"])
            for r in records
            if r["subject"] == "shmfault" and r["workload"] in ("rand", "seq", "replay")
        }
    )
    for workload, fault_around in keys:
        copy = _select(records, workload=workload, subject="shmfault", mode="shared-copy",
                       fault_around=fault_around)  # fmt: skip
        cont = _select(records, workload=workload, subject="shmfault", mode="shared-continue",
                       fault_around=fault_around)  # fmt: skip
        if not copy or not cont:
            continue
        metrics = (
            [("p50_ns", False), ("fault_p50_ns", False), ("faults_per_s", True)]
            if workload == "rand"
            else [("gbps", True)]
        )
        metrics.append(("cpu_ns_per_fault", False))
        for metric, higher_is_better in metrics:
            ratios = _paired(cont, copy, metric)
            if not ratios:
                continue
            wins = sum(1 for r in ratios if (r > 1) == higher_is_better and r != 1)
            rows.append(
                {
                    "workload": workload,
                    "fault_around": fault_around,
                    "metric": metric,
                    "higher_is_better": higher_is_better,
                    "continue_over_copy": statistics.median(ratios),
                    "range": [min(ratios), max(ratios)],
                    "continue_wins": wins,
                    "repetitions": len(ratios),
                }
            )
    return rows


# --- text ---


def _ms(ns: float | None) -> float | None:
    return None if ns is None else ns / 1e6


def _us(ns: float | None) -> str:
    return "—" if ns is None else f"{ns / 1000:.1f}"


def _x(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}x"


def _figure(value: float | None, unit: str | None) -> str:
    """A target's figure: a ratio, or a value in ``unit``."""
    if unit is None or value is None:
        return _x(value)
    return f"{value:,.1f} {unit}"


def _n(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def _cpu(row: dict[str, Any], prefix: str = "") -> str:
    """CPU per fault as ``total (user + sys)`` in us."""
    total = row.get(f"{prefix}cpu_ns_per_fault")
    user = row.get(f"{prefix}user_ns_per_fault")
    system = row.get(f"{prefix}sys_ns_per_fault")
    if total is None:
        return "—"
    if user is None or system is None:
        return _us(total)
    return f"{_us(total)} ({_us(user)} + {_us(system)})"


def _ok(verified: bool) -> str:
    return "yes" if verified else "**NO**"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_tables(summary: dict[str, Any]) -> str:
    parts = []
    if summary["rand"]:
        parts.append(
            "Random faults (client-side time per touch; 'faulting p50': over the touches that "
            "faulted, the service's fault count of slowest touches; ratios are shmfault / "
            "baseline, paired by repetition: < 1 is faster for latency, > 1 is faster for "
            "faults/s):\n\n"
        )
        parts.append(
            _table(
                [
                    "mode",
                    "fa",
                    "faults",
                    "p50 us",
                    "p99 us",
                    "p99.9 us",
                    "faulting p50 us",
                    "faults/s",
                    "svc CPU us/fault (user + sys)",
                    "C ref p50 us",
                    "C ref faults/s",
                    "C ref CPU us/fault (user + sys)",
                    "p50 / C ref",
                    "faults/s / C ref",
                    "p50 / kernel",
                    "bytes ok",
                ],
                [
                    [
                        row["mode"],
                        str(row["fault_around"]),
                        _n(row["faults"]),
                        _us(row["p50_ns"]),
                        _us(row["p99_ns"]),
                        _us(row["p999_ns"]),
                        _us(row["fault_p50_ns"]),
                        _n(row["faults_per_s"]),
                        _cpu(row),
                        _us(row["ref_p50_ns"]),
                        _n(row["ref_faults_per_s"]),
                        _cpu(row, "ref_"),
                        _x(row["p50_vs_ref"]),
                        _x(row["faults_per_s_vs_ref"]),
                        _x(row["p50_vs_kernel"]),
                        _ok(row["verified"]),
                    ]
                    for row in summary["rand"]
                ],
            )
        )
    if summary["seq"]:
        parts.append(
            "\nSequential fill (GB/s = 10^9 bytes/s; ratios shmfault / baseline, > 1 is "
            "faster):\n\n"
        )
        parts.append(
            _table(
                [
                    "mode",
                    "fa",
                    "faults",
                    "GB/s",
                    "svc CPU us/fault (user + sys)",
                    "C ref GB/s",
                    "C ref CPU us/fault (user + sys)",
                    "/ C ref",
                    "/ kernel first touch",
                    "/ memcpy",
                    "bytes ok",
                ],
                [
                    [
                        row["mode"],
                        str(row["fault_around"]),
                        _n(row["faults"]),
                        _n(row["gbps"], 3),
                        _cpu(row),
                        _n(row["ref_gbps"], 3),
                        _cpu(row, "ref_"),
                        _x(row["vs_ref"]),
                        _x(row["vs_kernel"]),
                        _x(row["vs_memcpy"]),
                        _ok(row["verified"]),
                    ]
                    for row in summary["seq"]
                ],
            )
        )
    if summary.get("file"):
        parts.append(
            "\nFirst touch of a region filled from a file on disk, in address order (the "
            "service's default fault-around; 'cached before': the file's pages in the page "
            "cache when the touching began; ratios against the kernel's first touch of a "
            "private mapping of the file in the same state, paired by repetition, > 1 is "
            "faster):\n\n"
        )
        parts.append(
            _table(
                [
                    "mode",
                    "state",
                    "cached before",
                    "faults",
                    "GB/s",
                    "/ kernel",
                    "range",
                    "svc CPU us/fault (user + sys)",
                    "bytes ok",
                ],
                [
                    [
                        row["mode"],
                        row["state"],
                        "—"
                        if row["cached_before"] is None or row["cached_before"] < 0
                        else f"{row['cached_before']:.0%}",
                        _n(row["faults"]),
                        _n(row["gbps"], 3),
                        _x(row["vs_kernel"]),
                        "—"
                        if row["vs_kernel_range"] is None
                        else f"{_x(row['vs_kernel_range'][0])} to {_x(row['vs_kernel_range'][1])}",
                        _cpu(row),
                        _ok(row["verified"]),
                    ]
                    for row in summary["file"]
                ],
            )
        )
    if summary.get("replay"):
        parts.append(
            "\nWorking-set replay (time to completion of the trace in the client; speedup = on "
            "demand / replayed, paired by repetition; record overhead = recorded / on demand):"
            "\n\n"
        )
        parts.append(
            _table(
                [
                    "mode",
                    "fa",
                    "trace pages",
                    "on demand ms",
                    "replayed ms",
                    "speedup",
                    "faults on demand",
                    "faults replayed",
                    "pages prefetched",
                    "record overhead",
                    "bytes ok",
                ],
                [
                    [
                        row["mode"],
                        str(row["fault_around"]),
                        _n(row["touches"]),
                        _n(row["ondemand_ms"], 1),
                        _n(row["replay_ms"], 1),
                        _x(row["speedup"]),
                        _n(row["ondemand_faults"]),
                        _n(row["replay_faults"]),
                        _n(row["prefetched"]),
                        _x(row["record_overhead"]),
                        _ok(row["verified"]),
                    ]
                    for row in summary["replay"]
                ],
            )
        )
    if summary["baselines"]:
        parts.append("\nBaselines (same run):\n\n")
        rows = []
        for base in summary["baselines"]:
            if "gbps" in base:
                figure = f"{_n(base['gbps'], 3)} GB/s"
            else:
                figure = (
                    f"p50 {_us(base['p50_ns'])} us, p99 {_us(base['p99_ns'])} us, "
                    f"{_n(base['faults_per_s'])} faults/s"
                )
            rows.append([base["name"], figure, _ok(base["verified"])])
        parts.append(_table(["baseline", "figure", "bytes ok"], rows))
    if summary.get("shared_modes"):
        parts.append(
            "\nShared modes, paired by repetition (shared-continue / shared-copy; 'better' says "
            "which way is faster):\n\n"
        )
        names = {
            "p50_ns": "p50 latency",
            "fault_p50_ns": "faulting p50 latency",
            "faults_per_s": "faults/s",
            "gbps": "GB/s",
            "cpu_ns_per_fault": "service CPU per fault",
        }
        rows = [
            [
                row["workload"],
                str(row["fault_around"]),
                names.get(row["metric"], row["metric"]),
                _x(row["continue_over_copy"]),
                f"{_x(row['range'][0])} to {_x(row['range'][1])}",
                "higher" if row["higher_is_better"] else "lower",
                f"{row['continue_wins']} of {row['repetitions']}",
            ]
            for row in summary["shared_modes"]
        ]
        parts.append(
            _table(
                [
                    "workload",
                    "fa",
                    "metric",
                    "continue / copy",
                    "range",
                    "better",
                    "shared-continue wins",
                ],
                rows,
            )
        )
    parts.append(format_multi(summary))
    if summary["targets"]:
        parts.append("\nTargets:\n\n")
        parts.append(
            _table(
                ["target", "measured (median)", "lowest to highest repetition", "met"],
                [
                    [
                        t["target"],
                        _figure(t["value"], t.get("unit")),
                        f"{_figure(t['range'][0], t.get('unit'))} to "
                        f"{_figure(t['range'][1], t.get('unit'))}"
                        if t["range"]
                        else "—",
                        "yes" if t["met"] else "no",
                    ]
                    for t in summary["targets"]
                ],
            )
        )
    return "".join(parts)


def format_facts(facts: dict[str, Any]) -> str:
    keys = ("kernel", "cpus", "cpus_usable", "cpu_model", "memory_gib", "python", "commit")
    text = ", ".join(f"{key} {facts[key]}" for key in keys if key in facts)
    if "loadavg_start" in facts:
        text += (
            f", load average (1 min) {facts['loadavg_start'][0]} at start, "
            f"{facts['loadavg_end'][0]} at end"
        )
    return text


def write_text(document: dict[str, Any], stream: Any = None) -> None:
    out = stream or sys.stdout
    out.write(format_tables(document["summary"]))
    out.write(f"\nCommand: {document['command']}\n")
    out.write(f"Machine: {format_facts(document['machine'])}\n")
    for note in document["notes"]:
        out.write(f"Note: {note}\n")


# --- the multi-process workloads (benchmarks/scaling.py) ---

TARGET_SHARE_FILLS = 1.0  # every page of a shared region filled exactly once
TARGET_SCALE_P99 = 2.0  # probe fault p99 with 1,000 idle attachments <= 2x alone
TARGET_SCALE_KIB = 64.0  # service memory per idle attachment <= 64 KiB
TARGET_CORES = 1.6  # two client processes on two regions >= 1.6x the faults/s of one


def _kib(value: float | None) -> float | None:
    return None if value is None else value / 1024


def _range(values: Sequence[float | None]) -> list[float] | None:
    present = [v for v in values if v is not None]
    return [min(present), max(present)] if present else None


def _med(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise_multi(records: list[Record]) -> dict[str, Any]:
    """Rows and targets of share, cores, scale and control, from the records alone."""
    share_rows = []
    targets: list[dict[str, Any]] = []
    share = _select(records, workload="share")
    for mode in sorted({r["mode"] for r in share if r["subject"] == "shmfault"}):
        single = _select(share, subject="shmfault", mode=mode, processes=1)
        for processes in sorted({r["processes"] for r in share}):
            mine = _select(share, subject="shmfault", mode=mode, processes=processes)
            kernel = _select(share, subject="kernel", processes=processes)
            if not mine:
                continue
            row = {
                "mode": mode,
                "processes": processes,
                "fault_around": mine[0]["fault_around"],
                "pages": _median(mine, "pages"),
                "faults": _median(mine, "faults"),
                "pages_filled": _median(mine, "pages_filled"),
                "fills_per_page": _median(mine, "fills_per_page"),
                "fills_per_page_range": _range([r["fills_per_page"] for r in mine]),
                "filled_once": all(r["filled_once"] for r in mine),
                "elapsed_ms": _ms(_median(mine, "elapsed_ns")),
                "kernel_ms": _ms(_median(kernel, "elapsed_ns")),
                "vs_one": _paired_ratio(mine, single, "elapsed_ns"),
                "vs_kernel": _paired_ratio(mine, kernel, "elapsed_ns"),
                "cpu_ns_per_fault": _median(mine, "cpu_ns_per_fault"),
                "user_ns_per_fault": _median(mine, "user_ns_per_fault"),
                "sys_ns_per_fault": _median(mine, "sys_ns_per_fault"),
                "verified": all(r["verified"] for r in mine + kernel),
                "repetitions": len(mine),
            }
            share_rows.append(row)
            targets.append(
                {
                    "target": f"share {mode} x{processes}: every page filled exactly once "
                    "(fills per page == 1)",
                    "value": row["fills_per_page"],
                    "range": row["fills_per_page_range"],
                    "met": row["filled_once"],
                }
            )
    cores_rows = []
    cores = _select(records, workload="cores")
    kernel_one = _select(cores, subject="kernel", clients=1)
    kernel_two = _select(cores, subject="kernel", clients=2)
    for mode in [m for m in dict.fromkeys(r["mode"] for r in cores if r["subject"] == "shmfault")]:
        one = _select(cores, subject="shmfault", mode=mode, clients=1)
        two = _select(cores, subject="shmfault", mode=mode, clients=2)
        if not one or not two:
            continue
        row = {
            "mode": mode,
            "fault_around": one[0]["fault_around"],
            "one_faults_per_s": _median(one, "faults_per_s"),
            "two_faults_per_s": _median(two, "faults_per_s"),
            "two_vs_one": _paired_ratio(two, one, "faults_per_s"),
            "two_vs_one_range": _paired_range(two, one, "faults_per_s"),
            "one_p50_ns": _median(one, "p50_ns"),
            "two_p50_ns": _median(two, "p50_ns"),
            "one_cpu_ns_per_fault": _median(one, "cpu_ns_per_fault"),
            "two_cpu_ns_per_fault": _median(two, "cpu_ns_per_fault"),
            "kernel_two_vs_one": _paired_ratio(kernel_two, kernel_one, "faults_per_s"),
            "verified": all(r["verified"] for r in one + two + kernel_one + kernel_two),
            "repetitions": len(two),
        }
        cores_rows.append(row)
        if row["two_vs_one"] is not None:
            targets.append(
                {
                    "target": f"cores {mode} fa={row['fault_around']}: two clients on two "
                    f"regions >= {TARGET_CORES}x the faults/s of one",
                    "value": row["two_vs_one"],
                    "range": row["two_vs_one_range"],
                    "met": row["two_vs_one"] >= TARGET_CORES,
                }
            )
    scale_rows = _select(records, workload="scale", subject="attachments")
    region_rows = _select(records, workload="scale", subject="regions")
    scale: dict[str, Any] = {}
    if scale_rows:
        ratios = [r["p99_loaded_vs_alone"] for r in scale_rows]
        # The target counts the service's own memory: RSS without the source-file pages its
        # mappings of the sources hold (page cache, shared, reclaimable).
        per_attachment = [
            _kib(r["rss_per_attachment"] - (r.get("file_per_attachment") or 0))
            for r in scale_rows
            if r["rss_per_attachment"] is not None
        ]
        scale = {
            "mode": scale_rows[0]["mode"],
            "attachments": _median(scale_rows, "attachments"),
            "processes": _median(scale_rows, "processes"),
            "region_size": scale_rows[0]["region_size"],
            "create_per_s": _median(scale_rows, "create_per_s"),
            "attach_fault_per_s": _median(scale_rows, "attach_fault_per_s"),
            "create_attach_fault_per_s": _median(scale_rows, "create_attach_fault_per_s"),
            "attach_p50_ns": _median(scale_rows, "attach_p50_ns"),
            "attach_p99_ns": _median(scale_rows, "attach_p99_ns"),
            "delete_per_s": _median(scale_rows, "delete_per_s"),
            "rss_per_region_kib": _kib(_median(scale_rows, "rss_per_region")),
            "rss_per_attachment_kib": _kib(_median(scale_rows, "rss_per_attachment")),
            "own_per_attachment_kib": _med(per_attachment),
            "file_per_attachment_kib": _kib(_median(scale_rows, "file_per_attachment")),
            "anon_per_attachment_kib": _kib(_median(scale_rows, "anon_per_attachment")),
            "fds_per_attachment": _median(scale_rows, "fds_per_attachment"),
            "threads_added": _median(scale_rows, "threads_added"),
            "rss_kept_per_attachment_kib": _kib(_median(scale_rows, "rss_kept_per_attachment")),
            "fds_kept_after_detach": _median(scale_rows, "fds_kept_after_detach"),
            "rss_kept_per_region_kib": _kib(_median(scale_rows, "rss_kept_per_region")),
            "p99_alone_ns": _median(scale_rows, "probe_p99_alone_ns"),
            "p99_loaded_ns": _median(scale_rows, "probe_p99_loaded_ns"),
            "p99_after_ns": _median(scale_rows, "probe_p99_after_ns"),
            "p50_alone_ns": _median(scale_rows, "probe_p50_alone_ns"),
            "p50_loaded_ns": _median(scale_rows, "probe_p50_loaded_ns"),
            "p99_loaded_vs_alone": _med(ratios),
            "p99_loaded_vs_after": _median(scale_rows, "p99_loaded_vs_after"),
            "p50_loaded_vs_alone": _median(scale_rows, "p50_loaded_vs_alone"),
            "verified": all(r["verified"] for r in scale_rows),
            "repetitions": len(scale_rows),
        }
        if scale["p99_loaded_vs_alone"] is not None:
            targets.append(
                {
                    "target": f"scale: fault p99 with {scale['attachments']:,.0f} idle "
                    f"attachments <= {TARGET_SCALE_P99}x the single attachment's",
                    "value": scale["p99_loaded_vs_alone"],
                    "range": _range(ratios),
                    "met": scale["p99_loaded_vs_alone"] <= TARGET_SCALE_P99,
                }
            )
        if scale["own_per_attachment_kib"] is not None:
            targets.append(
                {
                    "target": f"scale: service memory (RSS without mapped source-file pages) "
                    f"per idle attachment <= {TARGET_SCALE_KIB:.0f} KiB",
                    "value": scale["own_per_attachment_kib"],
                    "range": _range(per_attachment),
                    "unit": "KiB",
                    "met": scale["own_per_attachment_kib"] <= TARGET_SCALE_KIB,
                }
            )
    regions: dict[str, Any] = {}
    if region_rows:
        regions = {
            "regions": _median(region_rows, "regions"),
            "region_size": region_rows[0]["region_size"],
            "create_per_s": _median(region_rows, "create_per_s"),
            "create_first_per_s": _median(region_rows, "create_first_per_s"),
            "create_last_per_s": _median(region_rows, "create_last_per_s"),
            "last_vs_first": _median(region_rows, "last_vs_first"),
            "create_p50_ns": _median(region_rows, "create_p50_ns"),
            "create_p99_ns": _median(region_rows, "create_p99_ns"),
            "delete_per_s": _median(region_rows, "delete_per_s"),
            "rss_per_region_kib": _kib(_median(region_rows, "rss_per_region")),
            "anon_per_region_kib": _kib(_median(region_rows, "anon_per_region")),
            "fds_per_region": _median(region_rows, "fds_per_region"),
            "rss_kept_per_region_kib": _kib(_median(region_rows, "rss_kept_per_region")),
            "sample_checked": _median(region_rows, "sample_checked"),
            "fd_limit_inherited": _median(region_rows, "fd_limit_inherited"),
            "fd_limit": _median(region_rows, "fd_limit"),
            "source": region_rows[0].get("source", "file"),
            "verified": all(r["verified"] for r in region_rows),
            "repetitions": len(region_rows),
        }
    control_rows = []
    control = _select(records, workload="control")
    health = _select(control, subject="health")
    for name in dict.fromkeys(r["subject"] for r in control):
        mine = _select(control, subject=name)
        control_rows.append(
            {
                "call": name,
                "calls": _median(mine, "calls"),
                "per_s": _median(mine, "per_s"),
                "p50_ns": _median(mine, "p50_ns"),
                "p99_ns": _median(mine, "p99_ns"),
                "vs_health": _paired_ratio(mine, health, "per_s"),
                "vs_health_range": _paired_range(mine, health, "per_s"),
                "verified": all(r["verified"] for r in mine),
                "repetitions": len(mine),
            }
        )
    return {
        "share": share_rows,
        "cores": cores_rows,
        "scale": scale,
        "regions": regions,
        "control": control_rows,
        "targets": targets,
    }


def format_multi(summary: dict[str, Any]) -> str:
    parts = []
    if summary.get("share"):
        parts.append(
            "\nSharing (N processes attached to one region, each touching every page in its "
            "own random order; time from the first process's start to the last one's end; "
            "fills: the service's pages_filled summed over the region's attachments; ratios "
            "paired by repetition, < 1 is faster):\n\n"
        )
        parts.append(
            _table(
                [
                    "mode",
                    "fa",
                    "processes",
                    "pages",
                    "faults",
                    "pages filled",
                    "fills per page",
                    "all touched ms",
                    "/ 1 process",
                    "kernel ms",
                    "/ kernel",
                    "svc CPU us/fault (user + sys)",
                    "bytes ok",
                ],
                [
                    [
                        row["mode"],
                        str(row["fault_around"]),
                        str(row["processes"]),
                        _n(row["pages"]),
                        _n(row["faults"]),
                        _n(row["pages_filled"]),
                        f"{row['fills_per_page']:.2f}",
                        _n(row["elapsed_ms"], 1),
                        _x(row["vs_one"]),
                        _n(row["kernel_ms"], 1),
                        _x(row["vs_kernel"]),
                        _cpu(row),
                        _ok(row["verified"]),
                    ]
                    for row in summary["share"]
                ],
            )
        )
    if summary.get("cores"):
        parts.append(
            "\nCores (one client process faulting on its region, then two on two regions at "
            "once; faults/s over the span from the first start to the last end; 'kernel 2 / 1':"
            " the same for first touches of the page-cached source, what the machine itself "
            "gives a second process):\n\n"
        )
        parts.append(
            _table(
                [
                    "mode",
                    "fa",
                    "1 client faults/s",
                    "2 clients faults/s",
                    "2 / 1",
                    "range",
                    "p50 us (1, 2)",
                    "svc CPU us/fault (1, 2)",
                    "kernel 2 / 1",
                    "bytes ok",
                ],
                [
                    [
                        row["mode"],
                        str(row["fault_around"]),
                        _n(row["one_faults_per_s"]),
                        _n(row["two_faults_per_s"]),
                        _x(row["two_vs_one"]),
                        f"{_x(row['two_vs_one_range'][0])} to {_x(row['two_vs_one_range'][1])}"
                        if row["two_vs_one_range"]
                        else "—",
                        f"{_us(row['one_p50_ns'])}, {_us(row['two_p50_ns'])}",
                        f"{_us(row['one_cpu_ns_per_fault'])}, {_us(row['two_cpu_ns_per_fault'])}",
                        _x(row["kernel_two_vs_one"]),
                        _ok(row["verified"]),
                    ]
                    for row in summary["cores"]
                ],
            )
        )
    scale = summary.get("scale")
    if scale:
        parts.append(
            f"\nScale: {scale['attachments']:,.0f} attachments ({scale['mode']}, regions of "
            f"{scale['region_size'] // 1024} KiB, {scale['processes']:,.0f} client processes, "
            "one fault each; service --fault-around 1). Memory is the service's "
            "/proc/PID/status; the probe is one attachment in the benchmark process faulting "
            "on every page of a fresh region, alone before, with the attachments held idle, "
            "and alone after they detached:\n\n"
        )
        kib = "KiB"
        rows = [
            ["CreateRegion (small regions)", f"{_n(scale['create_per_s'])} /s"],
            [
                "attach + first fault, all processes at once",
                f"{_n(scale['attach_fault_per_s'])} /s (one attach: p50 "
                f"{_us(scale['attach_p50_ns'])} us, p99 {_us(scale['attach_p99_ns'])} us)",
            ],
            ["CreateRegion + attach + first fault", f"{_n(scale['create_attach_fault_per_s'])} /s"],
            ["DeleteRegion", f"{_n(scale['delete_per_s'])} /s"],
            ["service RSS per region", f"{_n(scale['rss_per_region_kib'], 1)} {kib}"],
            [
                "service RSS per idle attachment (without mapped source-file pages; anonymous)",
                f"{_n(scale['rss_per_attachment_kib'], 1)} {kib} "
                f"({_n(scale['own_per_attachment_kib'], 1)} {kib}; "
                f"{_n(scale['anon_per_attachment_kib'], 1)} {kib})",
            ],
            [
                "service fds per attachment, threads added",
                f"{_n(scale['fds_per_attachment'], 2)}, {_n(scale['threads_added'])}",
            ],
            [
                "kept after every attachment detached: RSS per attachment, fds",
                f"{_n(scale['rss_kept_per_attachment_kib'], 1)} {kib}, "
                f"{_n(scale['fds_kept_after_detach'])}",
            ],
            [
                "kept after the regions were deleted too: RSS per region",
                f"{_n(scale['rss_kept_per_region_kib'], 1)} {kib}",
            ],
            [
                "probe fault p99: alone, with the attachments, alone after",
                f"{_us(scale['p99_alone_ns'])}, {_us(scale['p99_loaded_ns'])}, "
                f"{_us(scale['p99_after_ns'])} us",
            ],
            [
                "probe fault p99 with / alone (with / alone after)",
                f"{_x(scale['p99_loaded_vs_alone'])} ({_x(scale['p99_loaded_vs_after'])})",
            ],
            [
                "probe fault p50: alone, with (ratio)",
                f"{_us(scale['p50_alone_ns'])}, {_us(scale['p50_loaded_ns'])} us "
                f"({_x(scale['p50_loaded_vs_alone'])})",
            ],
            ["bytes ok", _ok(scale["verified"])],
        ]
        parts.append(_table(["figure", "median"], rows))
    regions = summary.get("regions")
    if regions:
        parts.append(
            f"\nScale: {regions['regions']:,.0f} regions of {regions['region_size'] // 1024} KiB "
            + (
                "(file source, lazy)"
                if regions["source"] == "file"
                else "(no source: the fd limit does not allow a source file per region; a "
                "sample is written after the timing)"
            )
            + ", created one after another in a fresh service, a sample read back and checked, "
            "then deleted:\n\n"
        )
        kib = "KiB"
        rows = [
            [
                "CreateRegion",
                f"{_n(regions['create_per_s'])} /s (p50 {_us(regions['create_p50_ns'])} us, p99 "
                f"{_us(regions['create_p99_ns'])} us)",
            ],
            [
                "CreateRegion, first tenth vs last tenth",
                f"{_n(regions['create_first_per_s'])} vs {_n(regions['create_last_per_s'])} /s "
                f"(last / first {_x(regions['last_vs_first'])})",
            ],
            ["DeleteRegion", f"{_n(regions['delete_per_s'])} /s"],
            [
                "service RSS per region (anonymous)",
                f"{_n(regions['rss_per_region_kib'], 1)} {kib} "
                f"({_n(regions['anon_per_region_kib'], 1)} {kib})",
            ],
            ["service fds per region", _n(regions["fds_per_region"], 2)],
            [
                "service fd hard limit: inherited, given (2 per file-source region + 512)",
                f"{_n(regions['fd_limit_inherited'])}, {_n(regions['fd_limit'])}",
            ],
            [
                "kept after all were deleted: RSS per region",
                f"{_n(regions['rss_kept_per_region_kib'], 1)} {kib}",
            ],
            [
                "bytes ok (regions read back and compared)",
                f"{_ok(regions['verified'])} ({_n(regions['sample_checked'])} regions)",
            ],
        ]
        parts.append(_table(["figure", "median"], rows))
    if summary.get("control"):
        parts.append(
            "\nControl plane (one client, one call at a time over the unix socket; ratios are "
            "calls/s over the gRPC health check's in the same service, paired by repetition; "
            "'health-after' is the health check again at the end, a drift check):\n\n"
        )
        parts.append(
            _table(
                ["call", "calls", "calls/s", "p50 us", "p99 us", "/ health check", "range", "ok"],
                [
                    [
                        row["call"],
                        _n(row["calls"]),
                        _n(row["per_s"]),
                        _us(row["p50_ns"]),
                        _us(row["p99_ns"]),
                        _x(row["vs_health"]),
                        f"{_x(row['vs_health_range'][0])} to {_x(row['vs_health_range'][1])}"
                        if row["vs_health_range"]
                        else "—",
                        _ok(row["verified"]),
                    ]
                    for row in summary["control"]
                ],
            )
        )
    return "".join(parts)

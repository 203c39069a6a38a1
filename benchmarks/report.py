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
    return {
        "rand": rand_rows,
        "seq": seq_rows,
        "replay": replay_rows,
        "baselines": baselines,
        "shared_modes": compare_shared_modes(records),
        "targets": targets,
    }


def compare_shared_modes(records: list[Record]) -> list[dict[str, Any]]:
    """shared-continue against shared-copy, paired by repetition (same service, same pages):
    the measurement the default shared mode is chosen by."""
    rows = []
    keys = sorted(
        {(r["workload"], r["fault_around"]) for r in records if r["subject"] == "shmfault"}
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
    if summary["targets"]:
        parts.append("\nTargets:\n\n")
        parts.append(
            _table(
                ["target", "measured (median)", "lowest to highest repetition", "met"],
                [
                    [
                        t["target"],
                        _x(t["value"]),
                        f"{_x(t['range'][0])} to {_x(t['range'][1])}" if t["range"] else "—",
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

"""``python -m benchmarks [run|rand|seq|profile] [options]``: shmfault's benchmarks.

``run`` (the default) measures random-fault latency and sequential fill bandwidth for every
attach mode, with the baselines (memcpy, the kernel's first touch of a populated memfd, the
reference C handler when present) measured in the same run; ``rand`` and ``seq`` run one of the
two; ``profile`` shows where the service's time per fault goes. Each run prints its tables, the
command that reproduces it and the machine's facts (``--json``: one JSON document instead).

Absolute times on shared virtual machines drift by tens of percent from one run to the next:
compare the ratios, which are taken against baselines of the same repetition.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.reference import DEFAULT_SOURCE
from benchmarks.service import reap_all
from benchmarks.workloads import MODES, MULTI_WORKLOADS, Config, MiB, run_all

COMMANDS = (
    "run",
    "rand",
    "seq",
    "replay",
    "file",
    "share",
    "cores",
    "scale",
    "control",
    "profile",
    "show",
)


def _size(text: str) -> int:
    units = {"k": 10, "m": 20, "g": 30}
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    shift = units.get(value[-1:], 0) if value else 0
    number = value[:-1] if shift else value
    try:
        size = int(number) << shift
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M, 1G)") from None
    if size <= 0 or size % MiB:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes are whole MiB")
    return size


def _small_size(text: str) -> int:
    """A size in whole pages (4K, 64K, 1M...), for the many small regions of scale/control."""
    units = {"k": 10, "m": 20, "g": 30}
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    shift = units.get(value[-1:], 0) if value else 0
    try:
        size = int(value[:-1] if shift else value) << shift
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64K)") from None
    if size <= 0 or size % 4096:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes are whole 4 KiB pages")
    return size


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: values must be >= 1")
    return values


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(part.strip() for part in text.split(","))
    for mode in modes:
        if mode not in MODES:
            raise argparse.ArgumentTypeError(f"unknown mode {mode!r} (modes: {', '.join(MODES)})")
    return modes


def _common(parser: argparse.ArgumentParser) -> None:
    sizes = parser.add_argument_group("sizes")
    sizes.add_argument(
        "--full",
        action="store_true",
        help="the long run: 1 GiB regions and 50,000 random touches (default 256 MiB, 20,000)",
    )
    sizes.add_argument("--size", type=_size, help="region size of the random workload")
    sizes.add_argument("--touches", type=int, help="random touches (distinct pages) per run")
    sizes.add_argument("--seq-size", type=_size, help="region size of the sequential workload")
    sizes.add_argument(
        "--replay-size", type=_size, help="region size of the replay workload (default 1 GiB)"
    )
    sizes.add_argument(
        "--replay-touches", type=int, help="pages of the replay workload's trace (default 32768)"
    )
    parser.add_argument(
        "--modes", type=_modes, default=MODES, help=f"comma-separated (default {','.join(MODES)})"
    )
    parser.add_argument(
        "--fault-around",
        type=_ints,
        default=(1, 16),
        metavar="N[,N...]",
        help="service --fault-around values for the random workload (default 1,16)",
    )
    parser.add_argument(
        "--seq-fault-around",
        type=_ints,
        default=(16, 64),
        metavar="N[,N...]",
        help="service --fault-around values for the sequential workload (default 16,64)",
    )
    parser.add_argument(
        "--replay-fault-around",
        type=_ints,
        default=(1, 16),
        metavar="N[,N...]",
        help="service --fault-around values for the replay workload (default 1,16: per-page "
        "faults, as REAP's baseline, and the service's default)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="repetitions; figures are medians (default 3)"
    )
    parser.add_argument(
        "--touch",
        choices=["write", "read"],
        default="write",
        help="the access that faults: write (default, as the reference does) or read. A "
        "read fault on a populated memfd gets the kernel's own fault-around",
    )
    parser.add_argument("--seed", type=int, default=1, help="random pages and source bytes")
    parser.add_argument(
        "--reference",
        type=Path,
        default=DEFAULT_SOURCE,
        metavar="FILE",
        help="the reference handler's C source (default: ../shared/reference/uffd_bench.c "
        "beside the repository; skipped with a message when absent)",
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="do not run the reference handler"
    )
    parser.add_argument(
        "--touch-loop",
        choices=["c", "python"],
        default="c",
        help="touch loop: C, compiled at run time (default), or Python (~1 us per touch of "
        "its own)",
    )
    parser.add_argument(
        "--source-dir",
        type=Path,
        help="directory of the source file (default /dev/shm, so it stays in memory)",
    )
    parser.add_argument(
        "--pin",
        type=int,
        metavar="CPU",
        help="run the client, the service and the reference all on this one CPU",
    )
    parser.add_argument(
        "--service-arg",
        action="append",
        default=[],
        dest="service_args",
        metavar="ARG",
        help="extra argument for 'shmfault serve' (repeatable)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds one run may take before the benchmarks give up (default 300)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead")
    parser.add_argument("--output", type=Path, help="also write the JSON document to FILE")


def _multi(parser: argparse.ArgumentParser) -> None:
    """Options of the multi-process workloads (share, cores, scale, control)."""
    group = parser.add_argument_group("multi-process workloads")
    group.add_argument("--share-size", type=_size, default=64 * MiB, help="default 64M")
    group.add_argument(
        "--share-processes",
        type=_ints,
        default=(1, 2, 4, 8),
        metavar="N[,N...]",
        help="processes attached to the one region (default 1,2,4,8)",
    )
    group.add_argument(
        "--share-fault-around", type=int, default=16, help="service --fault-around (default 16)"
    )
    group.add_argument("--cores-size", type=_size, default=32 * MiB, help="default 32M")
    group.add_argument(
        "--cores-fault-around", type=int, default=1, help="service --fault-around (default 1)"
    )
    group.add_argument(
        "--scale-mode", choices=MODES, default="shared-copy", help="default shared-copy"
    )
    group.add_argument("--scale-attachments", type=int, default=1000, help="default 1000")
    group.add_argument(
        "--scale-processes",
        type=int,
        default=50,
        help="client processes sharing the attachments (default 50)",
    )
    group.add_argument("--scale-regions", type=int, default=10_000, help="default 10000")
    group.add_argument(
        "--scale-region-size",
        type=_small_size,
        default=64 * 1024,
        help="size of each small region of scale and control (default 64K)",
    )
    group.add_argument(
        "--scale-probe-size",
        type=_size,
        default=16 * MiB,
        help="the probe attachment's region (default 16M: 4096 faults)",
    )
    group.add_argument(
        "--control-calls", type=int, default=1000, help="calls per RPC kind (default 1000)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "random faults and sequential fill, with every baseline (the default)"),
        ("rand", "random fault latency only"),
        ("seq", "sequential fill bandwidth only"),
        ("replay", "working-set replay: time to completion on demand vs replayed"),
    ):
        _common(commands.add_parser(name, help=text, description=text))
    text = "first touch of a region filled from a file on disk, its pages cached or not"
    file = commands.add_parser("file", help=text, description=text)
    _common(file)
    group = file.add_argument_group("file workload")
    group.add_argument("--file-size", type=_size, default=256 * MiB, help="default 256M")
    group.add_argument(
        "--file-dir",
        type=Path,
        help="directory of the file, on the file system to read from (default: the work "
        "directory, under $TMPDIR; on tmpfs only the warm state is measured)",
    )
    for name, text in (
        ("share", "1, 2, 4, 8 processes on one region: pages filled once, time to all-touched"),
        ("cores", "fault throughput of two client processes on two regions vs one"),
        ("scale", "1,000 attachments and 10,000 regions: memory, rates, probe fault p99"),
        ("control", "CreateRegion/GetRegion/DeleteRegion round trips vs the health check"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        _common(sub)
        _multi(sub)
    show = commands.add_parser(
        "show",
        help="print the tables of a saved run (--output FILE) again",
        description="Print the tables of a run saved with --output, recomputed from its records.",
    )
    show.add_argument("file", type=Path, help="the JSON document a run wrote with --output")
    profile = commands.add_parser(
        "profile",
        help="profile the service on one workload and print its top frames",
        description="Profile the service on one workload and print its top frames.",
    )
    _common(profile)
    profile.add_argument("--profiler", choices=["py-spy", "perf", "cprofile"], default="py-spy")
    profile.add_argument("--workload", choices=["rand", "seq"], default="rand")
    profile.add_argument("--mode", choices=MODES, default="shared-copy")
    profile.add_argument(
        "--profile-fault-around", type=int, default=1, help="service --fault-around (default 1)"
    )
    profile.add_argument("--rounds", type=int, default=3, help="workload runs (default 3)")
    profile.add_argument("--top", type=int, default=25, help="frames to show (default 25)")
    return parser


def config_from(args: argparse.Namespace) -> Config:
    full = args.full
    return Config(
        workloads={
            "run": ("rand", "seq", "replay"),
            "rand": ("rand",),
            "seq": ("seq",),
            "replay": ("replay",),
            "file": ("file",),
            "share": ("share",),
            "cores": ("cores",),
            "scale": ("scale",),
            "control": ("control",),
        }.get(args.command, (args.workload,) if args.command == "profile" else ("rand", "seq")),
        modes=args.modes,
        rand_size=args.size or (1024 * MiB if full else 256 * MiB),
        touches=args.touches or (50_000 if full else 20_000),
        seq_size=args.seq_size or (1024 * MiB if full else 256 * MiB),
        replay_size=args.replay_size or 1024 * MiB,
        replay_touches=args.replay_touches or 32_768,
        rand_fault_around=args.fault_around,
        seq_fault_around=args.seq_fault_around,
        replay_fault_around=args.replay_fault_around,
        repeat=max(args.repeat, 1),
        write=args.touch == "write",
        seed=args.seed,
        # The multi-process workloads have no reference counterpart: not built for them.
        reference_source=None
        if args.no_reference or args.command in (*MULTI_WORKLOADS, "file")
        else args.reference,
        touch_loop=args.touch_loop,
        source_dir=args.source_dir,
        pin=args.pin,
        run_timeout=args.timeout,
        service_args=list(args.service_args),
        **{
            name: getattr(args, name)
            for name in (
                "share_size",
                "share_processes",
                "share_fault_around",
                "cores_size",
                "cores_fault_around",
                "scale_mode",
                "scale_attachments",
                "scale_processes",
                "scale_regions",
                "scale_region_size",
                "scale_probe_size",
                "control_calls",
                "file_size",
                "file_dir",
            )
            if hasattr(args, name)
        },
    )


def _say() -> Any:
    """Progress lines on stderr, stamped with the time since the start."""
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    return say


def main(argv: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] not in (*COMMANDS, "-h", "--help"):
        arguments.insert(0, "run")
    args = build_parser().parse_args(arguments)
    if args.command == "show":
        return _show(args.file)
    config = config_from(args)
    command = shlex.join(["python", "-m", "benchmarks", *arguments])
    say = _say()

    def terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    if config.pin is not None:
        if config.pin not in os.sched_getaffinity(0):
            print(
                f"benchmarks: --pin {config.pin}: not a CPU this process may use", file=sys.stderr
            )
            return 2
        # Children (the service, the reference) inherit this thread's CPU mask.
        os.sched_setaffinity(0, {config.pin})
    try:
        if args.command == "profile":
            return _profile(args, config, command, say)
        say(f"{command}")
        load_start = os.getloadavg()
        records, notes = run_all(config, say)
        load_end = os.getloadavg()
    except KeyboardInterrupt:
        print("benchmarks: interrupted", file=sys.stderr)
        return 130
    finally:
        reap_all()
    if config.pin is not None:
        notes.append(f"client, service and reference pinned to CPU {config.pin}")
    notes.append(
        "touch: write (a locked OR of 0: a write fault that keeps the bytes)"
        if config.write
        else "touch: read"
    )
    summary = report.summarise(records, config)
    machine = report.machine_facts()
    machine["loadavg_start"] = [round(v, 2) for v in load_start]
    machine["loadavg_end"] = [round(v, 2) for v in load_end]
    document = {
        "command": command,
        "machine": machine,
        "config": {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(config).items()
        },
        "notes": notes,
        "summary": summary,
        "records": records,
    }
    if args.output:
        args.output.write_text(json.dumps(document, indent=2, default=str) + "\n")
    if args.json:
        json.dump(document, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        report.write_text(document)
    verified = all(r["verified"] for r in records)
    if not verified:
        print("benchmarks: some pages had wrong bytes (see 'bytes ok')", file=sys.stderr)
    return 0 if verified else 1


def _show(path: Path) -> int:
    document = json.loads(path.read_text())
    saved = document["config"]
    config = Config(
        workloads=tuple(saved["workloads"]),
        modes=tuple(saved["modes"]),
        rand_fault_around=tuple(saved["rand_fault_around"]),
        seq_fault_around=tuple(saved["seq_fault_around"]),
    )
    document["summary"] = report.summarise(document["records"], config)
    report.write_text(document)
    return 0


def _profile(args: argparse.Namespace, config: Config, command: str, say: Any) -> int:
    from benchmarks.profile import run_profile

    result = run_profile(
        config,
        profiler=args.profiler,
        workload=args.workload,
        mode=args.mode,
        fault_around=args.profile_fault_around,
        rounds=args.rounds,
        top=args.top,
        say=say,
    )
    document = {"command": command, "machine": report.machine_facts(), **result}
    if args.output:
        args.output.write_text(json.dumps(document, indent=2, default=str) + "\n")
    if args.json:
        json.dump(document, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        per_fault = result["service_cpu_ns_per_fault"]
        sys.stdout.write(
            f"{args.profiler} profile of the service: {args.workload} {args.mode}, "
            f"--fault-around {args.profile_fault_around}, {result['faults']} faults, "
            f"service CPU {per_fault / 1000 if per_fault else 0:.1f} us/fault (user "
            f"{(result['service_user_ns_per_fault'] or 0) / 1000:.1f}) under the profiler, "
            f"bytes {'ok' if result['verified'] else 'WRONG'}\n\n"
        )
        sys.stdout.write(result["text"])
        sys.stdout.write(f"\nCommand: {command}\n")
        sys.stdout.write(f"Machine: {report.format_facts(document['machine'])}\n")
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())

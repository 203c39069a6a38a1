"""The ``shmfault`` command: one subcommand per user task.

Exit codes (for scripts): 0 success; 1 the command ran and the answer is "no" (``probe
--require`` found something missing) or the operation failed; 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


def _add_probe(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="report what this kernel and this process can do with userfaultfd",
        description="Report what the running kernel and this process can do with userfaultfd. "
        "Never hangs and exits 0 even where userfaultfd is unavailable, unless --require "
        "names something that is missing.",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON (schema: docs/probe.md)"
    )
    parser.add_argument(
        "--require",
        nargs="+",
        metavar="NAME",
        default=[],
        help="exit 1 unless every NAME is available: an API feature (minor_shmem), an ioctl "
        "(continue), a mode (shared-continue), an open path (syscall, dev-userfaultfd, "
        "user-mode-only), kernel-faults, or a round trip (shmem.minor)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="time limit of each functional round trip (default 5)",
    )
    parser.add_argument(
        "--no-round-trips",
        action="store_true",
        help="only ask the kernel; do not fault and resolve real pages",
    )
    parser.set_defaults(handler=_run_probe)


def _run_probe(args: argparse.Namespace) -> int:
    from shmfault import probe

    report = probe.probe(round_trips=not args.no_round_trips, timeout=args.timeout)
    try:
        missing = report.missing(args.require)
    except ValueError as exc:
        print(f"shmfault probe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2, sort_keys=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(probe.format_table(report))
    if missing:
        for name, reason in missing:
            print(f"shmfault probe: required {name} is missing: {reason}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="shmfault", description="Lazy shared memory service.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_probe(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shmfault`` console script. Returns the exit code."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

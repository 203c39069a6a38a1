"""The ``shmfault`` command: one subcommand per user task.

Exit codes (for scripts):

- 0 success (``serve``: stopped cleanly by SIGTERM or SIGINT);
- 1 the command ran and the answer is "no" (``probe --require`` found something missing) or
  the operation failed (the service refused it: limits, busy region, bad source...; ``serve``:
  could not start);
- 2 usage error: bad command line (``serve``: bad configuration);
- 3 not found: no region has that id or name;
- 4 the service is unreachable (not running, wrong --target, no permission on its socket).

``region`` commands print a short human form, or with ``--json`` one JSON document on stdout.
Errors go to stderr as one line ``shmfault region CMD: ClassName: message``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shmfault.store import Region

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNREACHABLE = 4

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


def _size(text: str) -> int:
    from shmfault.store import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _label(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"not KEY=VALUE: {text!r}")
    return key, value


def _add_serve(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the region service (gRPC on a unix socket)",
        description="Run the region service until SIGTERM or SIGINT. Every setting has a "
        "default (docs/operations.md); the config file's settings override the defaults, "
        "flags override both.",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML config file to read "
        "(default: /etc/shmfault/config.toml as root, "
        "$XDG_CONFIG_HOME/shmfault/config.toml otherwise, when present)",
    )
    parser.add_argument("--runtime-dir", metavar="DIR", help="directory of the sockets")
    parser.add_argument("--state-dir", metavar="DIR", help="directory of the region database")
    parser.add_argument(
        "--socket", metavar="PATH", help="gRPC unix socket (default: RUNTIME_DIR/shmfault.sock)"
    )
    parser.add_argument(
        "--handoff-socket",
        metavar="PATH",
        help="lazy-attach socket (default: RUNTIME_DIR/handoff.sock)",
    )
    parser.add_argument(
        "--listen-tcp",
        metavar="HOST:PORT",
        help="also serve gRPC on TCP (unauthenticated: bind to a trusted address)",
    )
    parser.add_argument(
        "--group",
        metavar="NAME",
        help="make the directories 0750 and the "
        "socket 0660, owned by this group, so its members can connect",
    )
    parser.add_argument(
        "--max-region-bytes", type=_size, metavar="SIZE", help="largest region (default 64GiB)"
    )
    parser.add_argument(
        "--max-total-bytes",
        type=_size,
        metavar="SIZE",
        help="sum of the sizes of all regions (default 256GiB)",
    )
    parser.add_argument(
        "--max-regions", type=int, metavar="N", help="number of regions (default 10000)"
    )
    parser.add_argument(
        "--max-regions-per-uid",
        type=int,
        metavar="N",
        help="regions one uid (or all anonymous callers together) may hold; root and the "
        "service's uid are held to --max-regions only (default 1024)",
    )
    parser.add_argument(
        "--max-bytes-per-uid",
        type=_size,
        metavar="SIZE",
        help="sum of the sizes of one uid's regions, as above (default 64GiB)",
    )
    parser.add_argument(
        "--require-identity",
        action="store_true",
        default=None,
        help="refuse gRPC calls that carry no credential (docs/security.md)",
    )
    parser.add_argument(
        "--shm-prefix",
        metavar="PREFIX",
        help="POSIX shm names are /PREFIX.REGION_ID (default shmfault)",
    )
    parser.add_argument(
        "--source-root",
        action="append",
        dest="source_roots",
        metavar="DIR",
        help="allow file sources only under DIR (repeatable; default: any "
        "file the service can read)",
    )
    parser.add_argument(
        "--log-format", choices=["kv", "json"], help="key=value (default) or JSON lines"
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--grace",
        type=float,
        dest="grace_seconds",
        metavar="SECONDS",
        help="time in-flight RPCs get to finish at shutdown (default 10)",
    )
    parser.add_argument("--workers", type=int, metavar="N", help="RPC worker threads (default 16)")
    parser.add_argument(
        "--fault-around",
        type=int,
        dest="fault_around_pages",
        metavar="PAGES",
        help="pages resolved per fault, aligned block around the faulting page (default 16)",
    )
    parser.add_argument(
        "--max-attachments",
        type=int,
        dest="max_attachments",
        metavar="N",
        help="attachments served at once (default 4096)",
    )
    parser.add_argument(
        "--max-attachments-per-uid",
        type=int,
        dest="max_attachments_per_uid",
        metavar="N",
        help="attachments served at once for one client uid (default 1024)",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        dest="handshake_timeout",
        metavar="SECONDS",
        help="time a client gets to finish the attach handshake (default 10)",
    )
    parser.add_argument(
        "--fault-around-max",
        type=int,
        dest="fault_around_max_pages",
        metavar="PAGES",
        help="where access is sequential, grow the fault-around window up to this many pages "
        "(default 1024; at or below --fault-around: no growth; huge pages never grow)",
    )
    parser.add_argument(
        "--spin-us",
        type=int,
        dest="spin_us",
        metavar="MICROSECONDS",
        help="after serving a fault, poll this long before sleeping: lower latency for "
        "clients that fault again soon, for that much CPU; after a longer gap only a 1/16 "
        "probe (default 200; 0: never)",
    )
    parser.add_argument(
        "--reattach-grace",
        type=float,
        dest="reattach_grace",
        metavar="SECONDS",
        help="after a restart, time the previous run's clients get to re-attach (default 60)",
    )
    parser.add_argument(
        "--token-ttl",
        type=float,
        dest="token_ttl",
        metavar="SECONDS",
        help="an attach token not used within this long is no longer valid (default 86400)",
    )
    parser.add_argument(
        "--no-probe-round-trips",
        action="store_false",
        default=None,
        dest="probe_round_trips",
        help="probe the kernel at startup without faulting real pages",
    )
    parser.add_argument(
        "--fault-threads",
        type=int,
        dest="fault_threads",
        metavar="N",
        help="threads that serve faults on the C fast path, each pinned to a CPU and serving "
        "the clients running there (default 0: one per CPU, at most 4; 1: the engine thread "
        "alone)",
    )
    parser.add_argument(
        "--no-fast-path",
        action="store_false",
        default=None,
        dest="fast_path",
        help="serve every fault in Python, without the C fast path (slower; for comparison)",
    )
    parser.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from dataclasses import fields
    from pathlib import Path

    from shmfault import server

    try:
        settings: dict[str, object] = {}
        config_file = Path(args.config) if args.config else server.default_config_file()
        if args.config or config_file.exists():
            settings.update(server.load_config_file(config_file))
        for item in fields(server.ServerConfig):
            value = getattr(args, item.name, None)
            if value is not None:
                settings[item.name] = tuple(value) if isinstance(value, list) else value
        config = server.ServerConfig(**settings)  # type: ignore[arg-type]
        return server.serve(config)
    except server.ConfigError as exc:
        print(f"shmfault serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except server.StartupError as exc:
        print(f"shmfault serve: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _add_region(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "region",
        help="create, list, show, delete, read and write regions",
        description="Drive the region service. Exit codes: 0 ok, 1 failed, 2 usage, "
        "3 not found, 4 service unreachable.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        metavar="SOCKET|HOST:PORT",
        help="the service (default: "
        "$SHMFAULT_SOCKET or the local runtime directory's shmfault.sock)",
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    commands = parser.add_subparsers(dest="region_command", required=True, metavar="COMMAND")

    create = commands.add_parser(
        "create",
        parents=[common],
        help="create a region",
        description="Create a region; prints it with its single-use attach token.",
    )
    create.add_argument(
        "size", type=_size, help="bytes, a multiple of the page size (4096, 64K, 2MiB, 64G)"
    )
    create.add_argument(
        "--backing",
        choices=["memfd", "posix-shm", "hugetlb"],
        default="memfd",
        help="default memfd",
    )
    source = create.add_mutually_exclusive_group()
    source.add_argument(
        "--file",
        metavar="PATH",
        help="source: this file, read on demand (path as the service sees it)",
    )
    source.add_argument("--clone", metavar="REGION", help="source: another region's bytes")
    source.add_argument("--bytes", action="store_true", help="source: zeros, to be written")
    create.add_argument(
        "--file-offset",
        type=_size,
        default=0,
        metavar="SIZE",
        help="where in --file the region starts (default 0)",
    )
    create.add_argument("--name", default="", help="unique name")
    create.add_argument(
        "--label",
        type=_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="label (repeatable)",
    )
    create.add_argument("--eager", action="store_true", help="fill every page now")
    create.set_defaults(handler=_run_region_create)

    ls = commands.add_parser("ls", parents=[common], help="list regions")
    ls.add_argument(
        "--label",
        type=_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only regions with this label (repeatable)",
    )
    ls.set_defaults(handler=_run_region_ls)

    show = commands.add_parser("show", parents=[common], help="describe a region")
    show.add_argument("region", help="id or name")
    show.set_defaults(handler=_run_region_show)

    rm = commands.add_parser("rm", parents=[common], help="delete regions")
    rm.add_argument("regions", nargs="+", metavar="region", help="id or name")
    rm.add_argument("--force", action="store_true", help="delete even while attached")
    rm.set_defaults(handler=_run_region_rm)

    read = commands.add_parser(
        "read",
        parents=[common],
        help="read bytes of a region",
        description="Write a region's bytes to stdout or --output "
        "(raw; with --json, base64 in a JSON document).",
    )
    read.add_argument("region", help="id or name")
    read.add_argument("--offset", type=_size, default=0, metavar="SIZE")
    read.add_argument(
        "--length",
        type=_size,
        default=0,
        metavar="SIZE",
        help="bytes to read (default: to the end)",
    )
    read.add_argument("--output", "-o", metavar="FILE", help="write there instead of stdout")
    read.set_defaults(handler=_run_region_read)

    write = commands.add_parser(
        "write",
        parents=[common],
        help="write bytes into a region",
        description="Write stdin, --input FILE or --data TEXT into a region at --offset.",
    )
    write.add_argument("region", help="id or name")
    write.add_argument("--offset", type=_size, default=0, metavar="SIZE")
    data = write.add_mutually_exclusive_group()
    data.add_argument("--input", "-i", metavar="FILE", help="read the bytes from FILE")
    data.add_argument("--data", metavar="TEXT", help="the bytes, as UTF-8 text")
    write.set_defaults(handler=_run_region_write)


def _human_size(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return f"{size}B"


def _print_region(region: Region) -> None:
    for key, value in region.to_dict().items():
        shown = value
        if isinstance(value, dict):
            shown = " ".join(f"{k}={v}" for k, v in value.items()) or "-"
        print(f"{key:16} {shown}")


def _region_call(args: argparse.Namespace, action: Callable[[Any], int]) -> int:
    from shmfault.client import Client
    from shmfault.errors import (
        RecordingNotFoundError,
        RegionNotFoundError,
        RequestError,
        ServiceUnavailableError,
    )

    error: Exception
    try:
        with Client(args.target) as client:
            return action(client)
    except (RegionNotFoundError, RecordingNotFoundError) as exc:
        code, error = EXIT_NOT_FOUND, exc
    except ServiceUnavailableError as exc:
        code, error = EXIT_UNREACHABLE, exc
    except RequestError as exc:
        code, error = EXIT_FAILED, exc
    except OSError as exc:
        code, error = EXIT_FAILED, exc
    label = getattr(args, "label_for_errors", "") or f"region {args.region_command}"
    print(f"shmfault {label}: {type(error).__name__}: {error}", file=sys.stderr)
    return code


def _emit(args: argparse.Namespace, document: object, human: Callable[[], None]) -> None:
    if args.json:
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        human()


def _run_region_create(args: argparse.Namespace) -> int:
    from shmfault.store import Source, SourceKind

    if args.file_offset and not args.file:
        print("shmfault region create: --file-offset needs --file", file=sys.stderr)
        return EXIT_USAGE
    if args.file:
        source = Source.of_file(os.path.abspath(args.file), args.file_offset)
    elif args.clone:
        source = Source.of_region(args.clone)
    else:
        source = Source(SourceKind.BYTES if args.bytes else SourceKind.ZERO)

    def action(client: Any) -> int:
        region = client.create_region(
            args.size,
            backing=args.backing,
            source=source,
            name=args.name,
            labels=dict(args.label),
            fill_policy="eager" if args.eager else "lazy",
        )
        _emit(args, region.to_dict(), lambda: _print_region(region))
        return EXIT_OK

    return _region_call(args, action)


def _run_region_ls(args: argparse.Namespace) -> int:
    def action(client: Any) -> int:
        regions = client.list_regions(dict(args.label))

        def table() -> None:
            print(f"{'ID':13}  {'NAME':20}  {'SIZE':>9}  {'BACKING':9}  {'FILLED':>9}  SOURCE")
            for r in regions:
                flags = " (reset)" if r.content_reset else ""
                print(
                    f"{r.id:13}  {r.name or '-':20}  {_human_size(r.size):>9}  "
                    f"{r.backing.value:9}  {_human_size(r.allocated_bytes):>9}  "
                    f"{r.source.describe()}{flags}"
                )

        _emit(args, [r.to_dict() for r in regions], table)
        return EXIT_OK

    return _region_call(args, action)


def _run_region_show(args: argparse.Namespace) -> int:
    def action(client: Any) -> int:
        region = client.get_region(args.region)
        _emit(args, region.to_dict(), lambda: _print_region(region))
        return EXIT_OK

    return _region_call(args, action)


def _run_region_rm(args: argparse.Namespace) -> int:
    def action(client: Any) -> int:
        for ref in args.regions:
            client.delete_region(ref, force=args.force)
            if not args.json:
                print(f"deleted {ref}")
        if args.json:
            _emit(args, {"deleted": args.regions}, lambda: None)
        return EXIT_OK

    return _region_call(args, action)


def _run_region_read(args: argparse.Namespace) -> int:
    import base64

    def action(client: Any) -> int:
        pieces = client.iter_read(args.region, args.offset, args.length)
        if args.json:
            data = b"".join(pieces)
            _emit(
                args,
                {
                    "region": args.region,
                    "offset": args.offset,
                    "length": len(data),
                    "data_base64": base64.b64encode(data).decode(),
                },
                lambda: None,
            )
            return EXIT_OK
        if args.output:
            with open(args.output, "wb") as out:
                for piece in pieces:
                    out.write(piece)
        else:
            for piece in pieces:
                sys.stdout.buffer.write(piece)
            sys.stdout.buffer.flush()
        return EXIT_OK

    return _region_call(args, action)


def _run_region_write(args: argparse.Namespace) -> int:
    if args.data is not None:
        data = args.data.encode()
    elif args.input:
        with open(args.input, "rb") as source:
            data = source.read()
    else:
        data = sys.stdin.buffer.read()

    def action(client: Any) -> int:
        written = client.write(args.region, args.offset, data)
        _emit(
            args,
            {"region": args.region, "offset": args.offset, "bytes_written": written},
            lambda: print(f"wrote {written} bytes at {args.offset}"),
        )
        return EXIT_OK

    return _region_call(args, action)


def _add_stats(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "stats",
        help="fault statistics of attachments",
        description="Statistics of the attachments of a region (or of every region): live ones "
        "and recently ended ones. Exit codes as for 'region'.",
    )
    parser.add_argument("region", nargs="?", default="", help="id or name (default: all)")
    parser.add_argument("--target", metavar="SOCKET|HOST:PORT", help="the service")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.set_defaults(handler=_run_stats, region_command="stats", label_for_errors="stats")


def _run_stats(args: argparse.Namespace) -> int:
    def action(client: Any) -> int:
        entries = client.stats(args.region)
        if args.json:
            json.dump(entries, sys.stdout, indent=2)
            sys.stdout.write("\n")
            return EXIT_OK
        print(
            f"{'ATTACHMENT':>10}  {'REGION':13}  {'MODE':15}  {'PID':>7}  {'FAULTS':>8}  "
            f"{'PAGES':>8}  {'P50':>8}  {'P99':>8}  STATE"
        )
        for entry in entries:
            counters = entry["counters"]
            state = "live" if entry["ended"] is None else f"ended: {entry['end_reason']}"
            print(
                f"{entry['attachment_id']:>10}  {entry['region_id']:13}  {entry['mode']:15}  "
                f"{entry['pid']:>7}  {counters.get('faults', 0):>8}  "
                f"{counters.get('pages_filled', 0):>8}  "
                f"{_micros(counters.get('latency_p50_ns')):>8}  "
                f"{_micros(counters.get('latency_p99_ns')):>8}  {state}"
            )
        return EXIT_OK

    return _region_call(args, action)


def _micros(nanoseconds: int | None) -> str:
    return "-" if not nanoseconds else f"{nanoseconds / 1000:.0f}us"


def _add_recording(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "recording",
        help="working-set recordings: list, export, import, merge, delete",
        description="Working-set recordings (docs/recording.md): an attachment made with "
        "record=True saves the pages it faulted; replay=ID fills them ahead of a later one. "
        "Exit codes as for 'region'.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", metavar="SOCKET|HOST:PORT", help="the service")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    commands = parser.add_subparsers(dest="recording_command", required=True, metavar="COMMAND")

    ls = commands.add_parser("ls", parents=[common], help="list recordings")
    ls.add_argument("--region", default="", metavar="ID", help="only this region id's")
    ls.set_defaults(handler=_run_recording_ls, label_for_errors="recording ls")

    get = commands.add_parser("get", parents=[common], help="export a recording's file")
    get.add_argument("recording", help="recording id")
    get.add_argument("-o", "--output", required=True, help="file to write")
    get.set_defaults(handler=_run_recording_get, label_for_errors="recording get")

    imported = commands.add_parser("import", parents=[common], help="store a recording file")
    imported.add_argument("file", help="a recording file (docs/recording.md)")
    imported.set_defaults(handler=_run_recording_import, label_for_errors="recording import")

    merge = commands.add_parser(
        "merge", parents=[common], help="merge recordings: pages seen in all, average order"
    )
    merge.add_argument("recordings", nargs="+", metavar="recording", help="recording id")
    merge.set_defaults(handler=_run_recording_merge, label_for_errors="recording merge")

    rm = commands.add_parser("rm", parents=[common], help="delete recordings")
    rm.add_argument("recordings", nargs="+", metavar="recording", help="recording id")
    rm.set_defaults(handler=_run_recording_rm, label_for_errors="recording rm")


def _print_recordings(recordings: list[dict[str, Any]]) -> None:
    print(f"{'ID':13}  {'REGION':13}  {'SIZE':>9}  {'FAULTS':>8}  {'PAGES':>8}  {'BYTES':>9}")
    for r in recordings:
        print(
            f"{r['recording_id']:13}  {r['region_id']:13}  {_human_size(r['region_size']):>9}  "
            f"{r['faults']:>8}  {r['pages']:>8}  {r['file_bytes']:>9}"
        )


def _run_recording_ls(args: argparse.Namespace) -> int:
    def action(client: Any) -> int:
        found = client.list_recordings(args.region)
        _emit(args, found, lambda: _print_recordings(found))
        return EXIT_OK

    return _region_call(args, action)


def _run_recording_get(args: argparse.Namespace) -> int:
    def action(client: Any) -> int:
        info, data = client.get_recording(args.recording)
        with open(args.output, "wb") as out:
            out.write(data)
        _emit(args, info, lambda: print(f"wrote {len(data)} bytes to {args.output}"))
        return EXIT_OK

    return _region_call(args, action)


def _run_recording_import(args: argparse.Namespace) -> int:
    with open(args.file, "rb") as source:
        data = source.read()

    def action(client: Any) -> int:
        info = client.import_recording(data)
        _emit(args, info, lambda: _print_recordings([info]))
        return EXIT_OK

    return _region_call(args, action)


def _run_recording_merge(args: argparse.Namespace) -> int:
    def action(client: Any) -> int:
        info = client.merge_recordings(args.recordings)
        _emit(args, info, lambda: _print_recordings([info]))
        return EXIT_OK

    return _region_call(args, action)


def _run_recording_rm(args: argparse.Namespace) -> int:
    def action(client: Any) -> int:
        for recording_id in args.recordings:
            client.delete_recording(recording_id)
            if not args.json:
                print(f"deleted {recording_id}")
        if args.json:
            _emit(args, {"deleted": args.recordings}, lambda: None)
        return EXIT_OK

    return _region_call(args, action)


def _add_firecracker(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "firecracker",
        help="serve Firecracker VMMs' snapshot memory (Uffd memory backend)",
        description="Open a socket where Firecracker VMMs restoring a snapshot with "
        'mem_backend {"backend_type": "Uffd", "backend_path": SOCKET} hand over their guest '
        "memory; shmfault serves it from a region (--region) or from the snapshot memory file "
        "(--snapshot: a file-source region is created first). Prints the endpoint as JSON. "
        "'ls' lists endpoints, 'close ID' closes one (docs/firecracker.md). Exit codes as for "
        "'region'.",
    )
    target_help = "the service (default: $SHMFAULT_SOCKET or the local runtime directory's)"
    parser.add_argument("--target", metavar="SOCKET|HOST:PORT", help=target_help)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--region", metavar="REGION", help="serve this region (id or name)")
    source.add_argument(
        "--snapshot",
        metavar="FILE",
        help="serve this snapshot memory file (its size must be a multiple of the page size)",
    )
    parser.add_argument(
        "--socket", metavar="PATH", help="the socket to create (Firecracker's backend_path)"
    )
    parser.add_argument(
        "--backing",
        choices=["memfd", "posix-shm", "hugetlb"],
        default="memfd",
        help="with --snapshot: the new region's backing (hugetlb for hugetlbfs guests)",
    )
    parser.add_argument("--name", default="", help="with --snapshot: the new region's name")
    parser.add_argument(
        "--record",
        action="store_true",
        help="record each VM's faults (a recording per VM, docs/recording.md)",
    )
    parser.add_argument(
        "--replay",
        metavar="RECORDING",
        default="",
        help="fill this recording's pages ahead of each VM",
    )
    parser.set_defaults(handler=_run_firecracker_open, firecracker_command="open")
    commands = parser.add_subparsers(dest="firecracker_command", metavar="COMMAND")
    # SUPPRESS: a subcommand's unset option must not overwrite one given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target", metavar="SOCKET|HOST:PORT", default=argparse.SUPPRESS, help=target_help
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    ls = commands.add_parser("ls", parents=[common], help="list Firecracker endpoints")
    ls.set_defaults(handler=_run_firecracker_ls)
    close = commands.add_parser(
        "close", parents=[common], help="close endpoints (their VMs stay served)"
    )
    close.add_argument("endpoints", nargs="+", metavar="ID", help="endpoint id")
    close.set_defaults(handler=_run_firecracker_close)


def _firecracker_call(args: argparse.Namespace, action: Callable[[Any], int]) -> int:
    from shmfault.client import Client
    from shmfault.errors import (
        EndpointNotFoundError,
        RecordingNotFoundError,
        RegionNotFoundError,
        RequestError,
        ServiceUnavailableError,
    )

    error: Exception
    try:
        with Client(args.target) as client:
            return action(client)
    except (RegionNotFoundError, EndpointNotFoundError, RecordingNotFoundError) as exc:
        code, error = EXIT_NOT_FOUND, exc
    except ServiceUnavailableError as exc:
        code, error = EXIT_UNREACHABLE, exc
    except (RequestError, OSError) as exc:
        code, error = EXIT_FAILED, exc
    print(
        f"shmfault firecracker {args.firecracker_command or 'open'}: "
        f"{type(error).__name__}: {error}",
        file=sys.stderr,
    )
    return code


def _run_firecracker_open(args: argparse.Namespace) -> int:
    from shmfault.memory import BackingKind, page_size_of
    from shmfault.store import Source

    if not args.socket or not (args.region or args.snapshot):
        print(
            "shmfault firecracker: give --socket PATH and --region ID or --snapshot FILE "
            "(or a command: ls, close)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    socket_path = os.path.abspath(args.socket)
    snapshot = os.path.abspath(args.snapshot) if args.snapshot else ""
    size = 0
    if snapshot:
        try:
            size = os.stat(snapshot).st_size
        except OSError as exc:
            print(f"shmfault firecracker: {snapshot}: {exc.strerror}", file=sys.stderr)
            return EXIT_USAGE
        page = page_size_of(BackingKind(args.backing))
        if size == 0 or size % page:
            # A Firecracker memory file is whole guest pages; anything else is not one.
            print(
                f"shmfault firecracker: {snapshot} has {size} bytes, not a positive multiple "
                f"of the {args.backing} page size {page}: not a snapshot memory file",
                file=sys.stderr,
            )
            return EXIT_USAGE

    def action(client: Any) -> int:
        region = args.region
        created = ""
        if snapshot:
            made = client.create_region(
                size, backing=args.backing, source=Source.of_file(snapshot), name=args.name
            )
            region = created = made.id
        try:
            endpoint = client.open_firecracker_endpoint(
                region, socket_path, record=args.record, replay=args.replay
            )
        except BaseException:
            if created:
                client.delete_region(created)
            raise
        json.dump(endpoint, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK

    return _firecracker_call(args, action)


def _run_firecracker_ls(args: argparse.Namespace) -> int:
    def action(client: Any) -> int:
        endpoints = client.list_firecracker_endpoints()

        def table() -> None:
            print(f"{'ID':14}  {'REGION':13}  {'VMS':>5}  {'REFUSED':>7}  SOCKET")
            for e in endpoints:
                print(
                    f"{e['id']:14}  {e['region_id']:13}  {e['attached']:>5}  "
                    f"{e['refused']:>7}  {e['socket_path']}"
                )

        _emit(args, endpoints, table)
        return EXIT_OK

    return _firecracker_call(args, action)


def _run_firecracker_close(args: argparse.Namespace) -> int:
    def action(client: Any) -> int:
        closed = []
        for endpoint_id in args.endpoints:
            closed.append(client.close_firecracker_endpoint(endpoint_id))
            if not args.json:
                print(f"closed {endpoint_id}")
        _emit(args, closed, lambda: None)
        return EXIT_OK

    return _firecracker_call(args, action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="shmfault", description="Lazy shared memory service.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_probe(subparsers)
    _add_serve(subparsers)
    _add_region(subparsers)
    _add_stats(subparsers)
    _add_recording(subparsers)
    _add_firecracker(subparsers)
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

"""Soak the service, in the spirit of the kernel's uffd-stress: many threads in several client
processes, random and racing faults, shared and private attachments, pages dropped
(``MADV_DONTNEED``) and punched out (``MADV_REMOVE``) all along, checked against a per-page
counter oracle; then the service's fds and memory compared with before.

Each thread owns one 8-byte counter slot in every page of its region. It picks a page at
random, reads its counter (a fault when the page is missing), checks it against what it
expects, and writes it back incremented; now and then it drops the page instead. What a drop
does to the counters is the oracle's business:

- shared attachments (shared-copy, shared-continue), four processes on one region: the page
  stays in the region, so ``MADV_DONTNEED`` must lose nothing (the next touch faults it back);
- a private-copy process: ``MADV_DONTNEED`` drops the process's copy, which refills from the
  region (zeros): its threads' counters on that page restart at 0 (under the page's lock);
- a shared-copy process alone on its own region: ``MADV_REMOVE`` punches the page out of the
  region, which refills from its source (zeros): counters restart at 0 (under the page's lock).

Run:  python scripts/soak.py --seconds 120      (make soak SECONDS=120)
Prints a JSON summary and exits 1 on any mismatch, or when the service's fd count or RSS did
not come back (RSS within --rss-slack MiB).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import shlex
import sys
import tempfile
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.service import Service  # noqa: E402
from shmfault import _libc  # noqa: E402
from shmfault.attach import attach  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
SLOT = 8


@dataclass(frozen=True)
class Plan:
    """One client process's part."""

    name: str
    handoff: str
    region_id: str
    token: str
    mode: str
    pages: int
    threads: int
    first_slot: int
    #: the drop each thread does now and then, and whether counters restart after it
    drop: int
    drop_resets: bool
    seconds: float
    seed: int


def _client(plan: Plan) -> dict[str, Any]:
    """One client process: attach, run the threads, check every counter; the tallies."""
    attached = attach(plan.handoff, plan.region_id, plan.token, mode=plan.mode)
    expected = [array("Q", bytes(8 * plan.pages)) for _ in range(plan.threads)]
    # Drops that reset counters touch every thread's slot of a page: one lock per page then.
    locks = [threading.Lock() for _ in range(plan.pages)] if plan.drop_resets else None
    tallies = {"increments": 0, "drops": 0, "mismatches": 0}
    tally_lock = threading.Lock()
    deadline = time.monotonic() + plan.seconds

    def run(thread: int) -> None:
        rng = random.Random(plan.seed * 1000 + thread)
        slot = (plan.first_slot + thread) * SLOT
        mine = expected[thread]
        increments = drops = mismatches = 0
        while time.monotonic() < deadline:
            page = rng.randrange(plan.pages)
            lock = locks[page] if locks is not None else None
            if lock is not None:
                lock.acquire()
            try:
                if rng.random() < 0.02:
                    _libc.madvise(attached.address + page * PAGE, PAGE, plan.drop)
                    drops += 1
                    if plan.drop_resets:
                        for counters in expected:
                            counters[page] = 0
                    continue
                offset = page * PAGE + slot
                value = int.from_bytes(attached.read(offset, SLOT), "little")
                if value != mine[page]:
                    mismatches += 1
                    mine[page] = value
                attached.write(offset, (value + 1).to_bytes(SLOT, "little"))
                mine[page] += 1
                increments += 1
            finally:
                if lock is not None:
                    lock.release()
        with tally_lock:
            tallies["increments"] += increments
            tallies["drops"] += drops
            tallies["mismatches"] += mismatches

    workers = [threading.Thread(target=run, args=(t,)) for t in range(plan.threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    final = attached.read(0, plan.pages * PAGE)
    for thread, counters in enumerate(expected):
        slot = (plan.first_slot + thread) * SLOT
        for page in range(plan.pages):
            got = int.from_bytes(final[page * PAGE + slot : page * PAGE + slot + SLOT], "little")
            if got != counters[page]:
                tallies["mismatches"] += 1
    attached.detach()
    return {"name": plan.name, "mode": plan.mode, **tallies}


def _status(pid: int) -> tuple[int, int]:
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return len(os.listdir(f"/proc/{pid}/fd")), rss


def _settled(pid: int) -> tuple[int, int]:
    """The service's fd count and RSS once its fd count has stopped falling (an ended
    attachment's last fds close just after the client hears DETACHED)."""
    last = _status(pid)
    for _ in range(50):
        time.sleep(0.1)
        now = _status(pid)
        if now[0] >= last[0]:
            return now
        last = now
    return last


def soak(seconds: float, pages: int, threads: int, rss_slack: int, seed: int) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="shmfault-soak-"))
    service = Service(directory / "svc", fault_around=16)
    with service, service.client() as client:
        shared = client.create_region(pages * PAGE).id
        removing = client.create_region(pages * PAGE).id
        private = client.create_region(pages * PAGE).id
        # The baseline after one attachment has come and gone: the first ones open what the
        # service keeps open from then on (the database's write-ahead log).
        client.attach(shared, mode="shared-copy").detach()
        fds_before, rss_before = _settled(service.pid)
        plans: list[Plan] = []

        def plan(name: str, region: str, mode: str, first: int, drop: int, resets: bool) -> None:
            _region, token, handoff = client.issue_attach_token(region)
            plans.append(
                Plan(
                    name,
                    handoff,
                    region,
                    token,
                    mode,
                    pages,
                    threads,
                    first,
                    drop,
                    resets,
                    seconds,
                    seed + len(plans),
                )
            )

        for index, mode in enumerate(("shared-copy", "shared-continue") * 2):
            plan(f"shared-{index}", shared, mode, index * threads, _libc.MADV_DONTNEED, False)
        plan("private", private, "private-copy", 0, _libc.MADV_DONTNEED, True)
        plan("removing", removing, "shared-copy", 0, _libc.MADV_REMOVE, True)
        context = multiprocessing.get_context("spawn")
        with context.Pool(len(plans)) as pool:
            results = pool.map(_client, plans)
        live = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            live = sum(client.get_region(r).attachments for r in (shared, removing, private))
            if live == 0:
                break
            time.sleep(0.1)
        for region in (shared, removing, private):
            client.delete_region(region)
        fds_after, rss_after = _settled(service.pid)
        stats = client.stats()
    faults = sum(int(entry["counters"].get("faults", 0)) for entry in stats)
    summary = {
        "seconds": seconds,
        "pages": pages,
        "threads_per_process": threads,
        "processes": results,
        "increments": sum(r["increments"] for r in results),
        "drops": sum(r["drops"] for r in results),
        "faults": faults,
        "mismatches": sum(r["mismatches"] for r in results),
        "attachments_left": live,
        "service_fds": [fds_before, fds_after],
        "service_rss_mib": [round(rss_before / 2**20, 1), round(rss_after / 2**20, 1)],
    }
    summary["ok"] = (
        summary["mismatches"] == 0
        and live == 0
        and fds_after <= fds_before
        and rss_after - rss_before <= rss_slack
    )
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long (default 60)")
    parser.add_argument("--pages", type=int, default=1024, help="pages per region (default 1024)")
    parser.add_argument("--threads", type=int, default=4, help="threads per process (default 4)")
    parser.add_argument("--rss-slack", type=int, default=16, help="MiB RSS may grow (default 16)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.threads * 4 * SLOT > PAGE:
        parser.error("too many threads for one counter slot each in a page")
    summary = soak(args.seconds, args.pages, args.threads, args.rss_slack << 20, args.seed)
    summary["command"] = shlex.join(["python", "scripts/soak.py", *sys.argv[1:]])
    summary["machine"] = {"kernel": platform.release(), "cpus": os.cpu_count()}
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

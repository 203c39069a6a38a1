"""The gRPC inputs of the real service under hypothesis: every request, however malformed, is
answered OK or with a status that says what was wrong, never INTERNAL or UNKNOWN (a crash), and
the service's fd count is flat once the regions the fuzz made are gone (docs/security.md §3,
§9). Requests go through the raw stub, so that values the Client would refuse reach the
service."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shmfault.v1 import shmfault_pb2 as pb
from shmfault.v1 import shmfault_pb2_grpc as pb_grpc
from tests.fuzzing import fuzz_settings
from tests.integration.attach_helpers import PAGE, fd_count, service_pid, settle
from tests.integration.conftest import Service

pytestmark = [pytest.mark.root]

#: What a request may say without being a crash: every code but INTERNAL and UNKNOWN.
CRASHES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
U64 = st.integers(0, (1 << 64) - 1)
SIZES = st.one_of(
    st.integers(0, 64).map(lambda pages: pages * PAGE),
    st.integers(0, 1 << 20),
    U64,
    st.sampled_from([(1 << 63) - 1, 1 << 63, (1 << 64) - 1, (1 << 64) - PAGE]),
)
NAMES = st.one_of(
    st.just(""),
    st.text(max_size=140),
    st.sampled_from([".", "..", "a/b", "r000000000000", "x" * 129, "fuzz\x00", "ok-name"]),
)
LABELS = st.dictionaries(
    st.text(max_size=70) | st.sampled_from(["k", "a/b", "-x", "k" * 64]),
    st.text(max_size=300),
    max_size=4,
)


def _refs(existing: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(existing), st.text(max_size=80), st.sampled_from(["", "r000000000000"])
    )


def _source(paths: list[str], existing: list[str]) -> st.SearchStrategy[pb.Source]:
    return st.one_of(
        st.just(pb.Source()),
        st.just(pb.Source(zero=pb.ZeroSource())),
        st.just(pb.Source(bytes=pb.BytesSource())),
        st.builds(
            lambda path, offset: pb.Source(file=pb.FileSource(path=path, offset=offset)),
            st.sampled_from(paths) | st.text(max_size=40),
            st.one_of(st.integers(0, 4 * PAGE), U64),
        ),
        st.builds(lambda ref: pb.Source(region=pb.RegionSource(region=ref)), _refs(existing)),
    )


def _calls(paths: list[str], existing: list[str]) -> st.SearchStrategy[tuple[str, Any]]:
    refs = _refs(existing)
    return st.one_of(
        st.tuples(
            st.just("CreateRegion"),
            st.builds(
                pb.CreateRegionRequest,
                size=SIZES,
                backing=st.integers(0, 5),
                source=_source(paths, existing),
                name=NAMES,
                labels=LABELS,
                fill_policy=st.integers(0, 4),
            ),
        ),
        st.tuples(st.just("GetRegion"), st.builds(pb.GetRegionRequest, region=refs)),
        st.tuples(
            st.just("ListRegions"),
            st.builds(
                pb.ListRegionsRequest,
                labels=LABELS,
                page_size=st.integers(0, (1 << 32) - 1),
                page_token=st.text(max_size=40),
            ),
        ),
        st.tuples(
            st.just("DeleteRegion"),
            st.builds(pb.DeleteRegionRequest, region=refs, force=st.booleans()),
        ),
        st.tuples(
            st.just("WriteRegion"),
            st.lists(
                st.builds(
                    pb.WriteRegionRequest,
                    region=refs,
                    offset=st.one_of(st.integers(0, 80 * PAGE), U64),
                    data=st.binary(max_size=3 * PAGE),
                ),
                max_size=3,
            ),
        ),
        st.tuples(
            st.just("ReadRegion"),
            st.builds(
                pb.ReadRegionRequest,
                region=refs,
                offset=st.one_of(st.integers(0, 80 * PAGE), U64),
                length=st.one_of(st.integers(0, 80 * PAGE), U64),
            ),
        ),
        st.tuples(st.just("IssueAttachToken"), st.builds(pb.IssueAttachTokenRequest, region=refs)),
        st.tuples(st.just("GetStats"), st.builds(pb.GetStatsRequest, region=refs)),
    )


def _fds(pid: int) -> set[str]:
    """What the service's fds are, for a failure message."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed while listed
            found.add(f"{fd}:{os.readlink(f'/proc/{pid}/fd/{fd}')}")
    return found


def _call(stub: pb_grpc.ShmfaultStub, method: str, request: Any) -> grpc.StatusCode:
    try:
        if method == "WriteRegion":
            stub.WriteRegion(iter(request), timeout=30)
        elif method == "ReadRegion":
            for _ in stub.ReadRegion(request, timeout=30):
                pass
        else:
            getattr(stub, method)(request, timeout=30)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.timeout(300)
def test_fuzzed_requests_never_crash_the_service_nor_leak_an_fd(
    service_dir: Path, shm_prefix: str, tmp_path: Path
) -> None:
    # Small limits: a fuzzed eager region of the default 64 GiB would be filled for real.
    fuzzed = Service(
        service_dir, shm_prefix, ["--max-region-bytes", "1M", "--max-total-bytes", "8M"]
    )
    fuzzed.start()
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(8 * PAGE))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    paths = [str(source), str(fifo), str(tmp_path), "/dev/zero", "/proc/self/mem", "relative"]
    pid = service_pid(fuzzed)
    with grpc.insecure_channel(f"unix:{fuzzed.socket}") as channel:
        stub = pb_grpc.ShmfaultStub(channel)
        stub.ListRegions(pb.ListRegionsRequest())  # the channel connects at its first call
        baseline = fd_count(pid)
        before = _fds(pid)
        # A region for requests to name (the fuzz may delete it, too).
        keeper = stub.CreateRegion(pb.CreateRegionRequest(size=4 * PAGE, name="keeper"))
        existing = [keeper.region.id, "keeper"]
        crashes: list[str] = []

        @fuzz_settings(60)
        @given(_calls([str(p) for p in paths], existing))
        def one_request(call: tuple[str, Any]) -> None:
            method, request = call
            code = _call(stub, method, request)
            if code in CRASHES:
                crashes.append(f"{method} {request!r}: {code.name}")
            assert code not in CRASHES, f"{method} answered {code.name} to {request!r}"

        one_request()
        assert crashes == []
        # Every region goes, newest first (a clone before its origin): then nothing the fuzz
        # did may still hold an fd.
        listed = stub.ListRegions(pb.ListRegionsRequest(page_size=1000)).regions
        for region in sorted(listed, key=lambda r: -r.created.ToNanoseconds()):
            stub.DeleteRegion(pb.DeleteRegionRequest(region=region.id, force=True))
        settle(
            lambda: fd_count(pid) == baseline,
            f"the service is back at {baseline} fds (now: {_fds(pid) - before})",
        )
    assert fuzzed.stop() == 0
    assert "level=error" not in fuzzed.logs()

"""RecordingStore: the service's working-set recordings, one file each in its state directory.

An attachment issued with ``record`` gets a :class:`shmfault.recording.Recorder`; when it ends,
its recording is saved here under a fresh id (on a worker thread: encoding a large recording
must not stall the fault engine). An attachment issued with ``replay`` loads one by id and the
engine fills its pages ahead of the client. Recordings of one region can be merged into one.

Ids are generated here (``w`` + 12 hex digits) and checked against that shape before they touch
a path, so no id a client sends can name a file outside the directory. Files are written
atomically (:func:`shmfault.recording.write_file`); a file that fails to decode is reported,
never half-used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from shmfault import logs, recording
from shmfault.errors import (
    InvalidArgumentError,
    QuotaExceededError,
    RecordingFormatError,
    RecordingNotFoundError,
    SourceUnavailableError,
)

_log = logging.getLogger("shmfault.recordings")

SUFFIX = ".shmrec"
_ID = re.compile(r"w[0-9a-f]{12}")
#: Recordings kept at most; a save past it is refused (and logged), never evicting silently.
DEFAULT_MAX_RECORDINGS = 1024
#: Bytes an imported recording may have (a 1 GiB region's random trace is ~1.3 MB).
MAX_RECORDING_BYTES = 64 << 20


@dataclass(frozen=True)
class RecordingInfo:
    """What ListRecordings shows of one recording."""

    recording_id: str
    region_id: str
    page_size: int
    region_size: int
    faults: int
    pages: int
    created: float
    file_bytes: int


class RecordingStore:
    """The recordings in ``directory``. Thread-safe."""

    def __init__(self, directory: Path, *, max_recordings: int = DEFAULT_MAX_RECORDINGS) -> None:
        self._directory = directory
        self._max = max_recordings
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()
        #: ids being written by the worker: counted, and waited for on close
        self._saving: dict[str, Future[None]] = {}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recordings")

    # --- ids and paths ---

    def _path(self, recording_id: str) -> Path:
        if not _ID.fullmatch(recording_id):
            raise RecordingNotFoundError(
                f"{recording_id[:40]!r} is not a recording id (w + 12 hex digits)", "recording"
            )
        return self._directory / (recording_id + SUFFIX)

    def _ids(self) -> list[str]:
        return sorted(
            name[: -len(SUFFIX)]
            for name in os.listdir(self._directory)
            if name.endswith(SUFFIX) and _ID.fullmatch(name[: -len(SUFFIX)])
        )

    def _new_id(self) -> str:
        with self._lock:
            if len(self._ids()) + len(self._saving) >= self._max:
                raise QuotaExceededError(
                    f"the service keeps {self._max} recordings, its limit: delete some",
                    "recording",
                )
            while True:
                recording_id = "w" + secrets.token_hex(6)
                if recording_id not in self._saving and not self._path(recording_id).exists():
                    return recording_id

    # --- saving ---

    def save(self, made: recording.Recording) -> RecordingInfo:
        """Store ``made`` under a fresh id, now."""
        recording_id = self._new_id()
        recording.write_file(self._path(recording_id), made)
        return self.info(recording_id)

    def save_later(self, made: recording.Recorder) -> str:
        """Store what ``made`` recorded under a fresh id, on the worker thread; the id is
        returned at once (ListRecordings shows it once written). Raises QuotaExceededError."""
        recording_id = self._new_id()

        def write() -> None:
            try:
                recording.write_file(self._path(recording_id), made.finish())
            except Exception:
                logs.exception(_log, "recording_save_failed", recording=recording_id)
            finally:
                with self._lock:
                    self._saving.pop(recording_id, None)

        with self._lock:
            self._saving[recording_id] = self._worker.submit(write)
        return recording_id

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every recording being saved is written."""
        with self._lock:
            pending = list(self._saving.values())
        for future in pending:
            with contextlib.suppress(Exception):
                future.result(timeout)

    def close(self) -> None:
        """Finish pending saves (nothing recorded is lost at a clean stop) and stop the
        worker."""
        self._worker.shutdown(wait=True)

    # --- reading ---

    def load(self, recording_id: str) -> recording.Recording:
        """The recording. Raises RecordingNotFoundError, SourceUnavailableError (the file is
        damaged)."""
        path = self._path(recording_id)
        try:
            return recording.read_file(path)
        except FileNotFoundError:
            raise RecordingNotFoundError(f"no recording {recording_id}", "recording") from None
        except RecordingFormatError as exc:
            raise SourceUnavailableError(
                f"recording {recording_id} is damaged: {exc}", "recording"
            ) from None

    def info(self, recording_id: str) -> RecordingInfo:
        made = self.load(recording_id)
        return RecordingInfo(
            recording_id=recording_id,
            region_id=made.region_id,
            page_size=made.page_size,
            region_size=made.region_size,
            faults=len(made),
            pages=len(made.pages()),
            created=made.created,
            file_bytes=self._path(recording_id).stat().st_size,
        )

    def list(self, region_id: str = "") -> list[RecordingInfo]:
        """Every stored recording (of one region), oldest first. Damaged files are skipped
        and logged."""
        found: list[RecordingInfo] = []
        for recording_id in self._ids():
            try:
                info = self.info(recording_id)
            except (RecordingNotFoundError, SourceUnavailableError) as exc:
                logs.event(_log, logging.WARNING, "recording_unreadable", error=str(exc))
                continue
            if not region_id or info.region_id == region_id:
                found.append(info)
        found.sort(key=lambda info: (info.created, info.recording_id))
        return found

    def export(self, recording_id: str) -> bytes:
        """The recording's file, as stored (docs/recording.md)."""
        self.load(recording_id)  # the bytes handed out decode
        return self._path(recording_id).read_bytes()

    # --- changing ---

    def import_(self, data: bytes) -> RecordingInfo:
        """Store a recording file made elsewhere. Raises InvalidArgumentError when it does not
        decode."""
        if len(data) > MAX_RECORDING_BYTES:
            raise InvalidArgumentError(
                f"a recording of {len(data)} bytes is larger than {MAX_RECORDING_BYTES}", "data"
            )
        try:
            made = recording.decode(data)
        except RecordingFormatError as exc:
            raise InvalidArgumentError(f"not a recording: {exc}", "data") from None
        return self.save(made)

    def region_of(self, data: bytes) -> str:
        """The region id a recording file names. Raises InvalidArgumentError when it does not
        decode."""
        try:
            return recording.decode(data).region_id
        except RecordingFormatError as exc:
            raise InvalidArgumentError(f"not a recording: {exc}", "data") from None

    def merge(self, recording_ids: Sequence[str]) -> RecordingInfo:
        """A new recording of the pages seen in all of ``recording_ids``, in their average
        order (:func:`shmfault.recording.merge`)."""
        if not recording_ids:
            raise InvalidArgumentError("merge needs at least one recording", "recordings")
        loaded = [self.load(recording_id) for recording_id in recording_ids]
        try:
            merged = recording.merge(loaded)
        except (RecordingFormatError, ValueError) as exc:
            raise InvalidArgumentError(f"cannot merge: {exc}", "recordings") from None
        return self.save(merged)

    def delete(self, recording_id: str) -> None:
        path = self._path(recording_id)
        try:
            path.unlink()
        except FileNotFoundError:
            raise RecordingNotFoundError(f"no recording {recording_id}", "recording") from None

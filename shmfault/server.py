"""The composition root: configuration, directories, sockets, logging, signals; builds the store
and the servicer and runs the gRPC server until SIGTERM or SIGINT.

Paths (each overridable by flag and by the config file):

- runtime directory: ``/run/shmfault`` as root, ``$XDG_RUNTIME_DIR/shmfault`` otherwise (or
  ``/tmp/shmfault-UID`` when XDG_RUNTIME_DIR is unset); holds ``shmfault.sock`` (gRPC) and
  ``handoff.sock`` (lazy attach);
- state directory: ``/var/lib/shmfault`` as root, ``$XDG_STATE_HOME/shmfault`` or
  ``~/.local/state/shmfault`` otherwise; holds ``regions.sqlite3``;
- config file: ``/etc/shmfault/config.toml`` as root, ``$XDG_CONFIG_HOME/shmfault/config.toml``
  (``~/.config/...``) otherwise, read when present; ``--config`` names another.

The capabilities report is taken once, before any gRPC thread exists, because the probe forks
children for its round trips (forking a process with running gRPC threads is unsafe).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import logging
import os
import resource
import signal
import socket
import stat
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import FrameType
from typing import Any

from shmfault import _unix, fastpath, logs, memory, modes, probe
from shmfault._abi import Feature
from shmfault.engine import SERVICE_STOPPING, Attachment, FaultEngine
from shmfault.firecracker import FirecrackerEndpoints
from shmfault.firecracker import Limits as EndpointLimits
from shmfault.handoff import HandoffServer
from shmfault.identity import Identities
from shmfault.recording_store import RecordingStore
from shmfault.store import DEFAULT_TOKEN_TTL, Limits, RegionStore, parse_size

SOCKET_NAME = "shmfault.sock"
HANDOFF_SOCKET_NAME = "handoff.sock"
SERVICE_NAME = "shmfault.v1.Shmfault"
#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
#: Largest gRPC message accepted: a 4 MiB WriteRegion chunk plus its framing.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024 + 64 * 1024

DEFAULT_LIMITS = Limits()

_log = logging.getLogger("shmfault.server")


class ConfigError(Exception):
    """The configuration (flags, config file, environment) is unusable; the message says why.
    ``shmfault serve`` exits 2 on it."""


class StartupError(Exception):
    """The server cannot start in this environment (a path is unsafe, a socket is in use...);
    ``shmfault serve`` exits 1 on it."""


def _is_root() -> bool:
    return os.geteuid() == 0


def default_runtime_dir() -> Path:
    """Where the sockets live by default (see the module docstring)."""
    if _is_root():
        return Path("/run/shmfault")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "shmfault"
    return Path(f"/tmp/shmfault-{os.geteuid()}")


def default_state_dir() -> Path:
    """Where region metadata lives by default (see the module docstring)."""
    if _is_root():
        return Path("/var/lib/shmfault")
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "shmfault"
    return Path.home() / ".local" / "state" / "shmfault"


def default_config_file() -> Path:
    """The config file read when present and no ``--config`` is given."""
    if _is_root():
        return Path("/etc/shmfault/config.toml")
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"
    return base / "shmfault" / "config.toml"


def default_socket_path() -> Path:
    """The gRPC socket a local client connects to by default ($SHMFAULT_SOCKET overrides)."""
    explicit = os.environ.get("SHMFAULT_SOCKET")
    return Path(explicit) if explicit else default_runtime_dir() / SOCKET_NAME


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``shmfault serve`` can be told. Empty paths mean "the default"."""

    runtime_dir: str = ""
    state_dir: str = ""
    socket: str = ""
    handoff_socket: str = ""
    listen_tcp: str = ""
    group: str = ""
    max_region_bytes: int = DEFAULT_LIMITS.max_region_bytes
    max_total_bytes: int = DEFAULT_LIMITS.max_total_bytes
    max_regions: int = DEFAULT_LIMITS.max_regions
    max_regions_per_uid: int = DEFAULT_LIMITS.max_regions_per_uid
    max_bytes_per_uid: int = DEFAULT_LIMITS.max_bytes_per_uid
    # Refuse gRPC calls without a credential (docs/security.md §3.1).
    require_identity: bool = False
    shm_prefix: str = "shmfault"
    source_roots: tuple[str, ...] = ()
    log_format: str = "kv"
    log_level: str = "info"
    grace_seconds: float = 10.0
    workers: int = 16
    probe_round_trips: bool = True
    fault_around_pages: int = 16
    # Sequential access grows the window up to this; at or below fault_around_pages: no growth.
    fault_around_max_pages: int = 1024
    # Poll this long after serving before sleeping (adaptive: a probe after long gaps).
    spin_us: int = 200
    # Serve the common fault in C when the library is built (shmfault/fastpath.py).
    fast_path: bool = True
    # Threads serving faults on the fast path (0: one per CPU, at most 4).
    fault_threads: int = 0
    handshake_timeout: float = 10.0
    reattach_grace: float = 60.0
    # Seconds an attach token stays valid unused.
    token_ttl: float = DEFAULT_TOKEN_TTL
    max_attachments: int = 4096
    max_attachments_per_uid: int = 1024

    def resolved(self) -> ServerConfig:
        """This config with every default path filled in and values checked. Raises
        ConfigError."""
        runtime = Path(self.runtime_dir) if self.runtime_dir else default_runtime_dir()
        state = Path(self.state_dir) if self.state_dir else default_state_dir()
        config = replace(
            self,
            runtime_dir=str(runtime.absolute()),
            state_dir=str(state.absolute()),
            socket=str(Path(self.socket).absolute())
            if self.socket
            else str(runtime.absolute() / SOCKET_NAME),
            handoff_socket=str(Path(self.handoff_socket).absolute())
            if self.handoff_socket
            else str(runtime.absolute() / HANDOFF_SOCKET_NAME),
        )
        if config.log_format not in ("kv", "json"):
            raise ConfigError(f"log_format must be kv or json, not {config.log_format!r}")
        if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level {config.log_level!r} is not debug/info/warning/error")
        if config.workers < 1 or config.grace_seconds < 0:
            raise ConfigError("workers must be at least 1 and grace_seconds not negative")
        if not 1 <= config.fault_around_pages <= 4096:
            raise ConfigError(f"fault_around_pages must be 1-4096, not {config.fault_around_pages}")
        if config.max_attachments < 1 or config.max_attachments_per_uid < 1:
            raise ConfigError("max_attachments and max_attachments_per_uid must be at least 1")
        if config.handshake_timeout <= 0:
            raise ConfigError(f"handshake_timeout must be positive, not {config.handshake_timeout}")
        if not 0 <= config.fault_around_max_pages <= 65536:
            raise ConfigError(
                f"fault_around_max_pages must be 0-65536, not {config.fault_around_max_pages}"
            )
        if not 0 <= config.fault_threads <= 64:
            raise ConfigError(f"fault_threads must be 0-64, not {config.fault_threads}")
        if not 0 <= config.spin_us <= 1_000_000:
            raise ConfigError(f"spin_us must be 0-1000000, not {config.spin_us}")
        if config.token_ttl <= 0:
            raise ConfigError(f"token_ttl must be positive, not {config.token_ttl}")
        if config.reattach_grace < 0:
            raise ConfigError(f"reattach_grace must not be negative, not {config.reattach_grace}")
        for path in (config.socket, config.handoff_socket):
            if len(os.fsencode(path)) > MAX_SOCKET_PATH:
                raise ConfigError(
                    f"socket path {path} is longer than the {MAX_SOCKET_PATH} bytes a unix "
                    "socket address holds: choose a shorter --runtime-dir or --socket"
                )
        if config.listen_tcp and config.listen_tcp.rpartition(":")[0] == "":
            raise ConfigError(f"listen_tcp {config.listen_tcp!r} is not HOST:PORT")
        try:
            config.limits.check()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        return config

    @property
    def limits(self) -> Limits:
        """The store limits this config sets."""
        return Limits(
            self.max_region_bytes,
            self.max_total_bytes,
            self.max_regions,
            self.max_regions_per_uid,
            self.max_bytes_per_uid,
        )


_SIZE_KEYS = {"max_region_bytes", "max_total_bytes", "max_bytes_per_uid"}


def load_config_file(path: Path) -> dict[str, Any]:
    """The settings of a TOML config file (flat keys, named as the ServerConfig fields).
    Raises ConfigError for unreadable files, bad TOML, unknown keys or bad values."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    known = {f.name: f for f in fields(ServerConfig)}
    settings: dict[str, Any] = {}
    for key, raw in data.items():
        name = key.replace("-", "_")
        value = raw
        if name not in known:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        try:
            if name in _SIZE_KEYS:
                value = parse_size(value)
            elif name == "source_roots":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError("a list of directory paths")
                value = tuple(value)
            else:
                default = getattr(ServerConfig, name)
                expected = type(default)
                if expected is float and isinstance(value, int):
                    value = float(value)
                if not isinstance(value, expected) or isinstance(value, bool) != isinstance(
                    default, bool
                ):
                    raise ValueError(f"a {expected.__name__}")
        except ValueError as exc:
            raise ConfigError(f"config file {path}: {key} must be {exc}") from exc
        settings[name] = value
    return settings


# -- logging ---------------------------------------------------------------------------------


def _kv_value(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\\n\t'):
        return text
    return json.dumps(text)


class EventFormatter(logging.Formatter):
    """One line per event: ``ts=... level=... event=... key=value ...`` or the same as JSON."""

    def __init__(self, json_lines: bool) -> None:
        super().__init__()
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        """The line for ``record``; its extra ``fields`` mapping supplies the key-values."""
        event: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, Mapping):
            event.update(extra)
        if record.exc_info:
            event["traceback"] = self.formatException(record.exc_info)
        if self.json_lines:
            return json.dumps(event, default=str)
        return " ".join(f"{key}={_kv_value(value)}" for key, value in event.items())


def setup_logging(log_format: str = "kv", level: str = "info") -> None:
    """Send shmfault's loggers to stderr, one line per event."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EventFormatter(log_format == "json"))
    logger = logging.getLogger("shmfault")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def _event(level: int, event: str, **values: object) -> None:
    logs.event(_log, level, event, **values)


# -- filesystem safety -----------------------------------------------------------------------


def ensure_private_dir(path: Path, gid: int | None) -> None:
    """Create ``path`` (0700, or 0750 owned by group ``gid``) or check the existing one: it
    must be a real directory (not a symlink) owned by this user; its mode is then tightened.
    Parents are created with the default mode. Raises StartupError."""
    mode = 0o750 if gid is not None else 0o700
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, mode)
        info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise StartupError(f"{path} is a symlink: refusing to use it (remove it or pick another)")
    if not stat.S_ISDIR(info.st_mode):
        raise StartupError(f"{path} is not a directory")
    if info.st_uid != os.geteuid():
        raise StartupError(
            f"{path} is owned by uid {info.st_uid}, not by this service's uid {os.geteuid()}"
        )
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if gid is not None:
            os.fchown(fd, -1, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def clear_stale_socket(path: Path) -> None:
    """Make way for binding ``path``: nothing there is fine; a socket of ours that nobody
    answers on (ECONNREFUSED) is removed. Anything else stops the start. Raises
    StartupError."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise StartupError(f"socket path {path} is a symlink: refusing to start")
    if not stat.S_ISSOCK(info.st_mode):
        raise StartupError(f"socket path {path} exists and is not a socket: refusing to start")
    if info.st_uid != os.geteuid():
        raise StartupError(f"socket path {path} is owned by uid {info.st_uid}: refusing to start")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(str(path))
    except ConnectionRefusedError:
        os.unlink(path)
        _event(logging.INFO, "stale_socket_removed", path=str(path))
        return
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StartupError(f"cannot tell whether {path} is in use: {exc}") from exc
    finally:
        probe.close()
    raise StartupError(f"another server answers on {path}: refusing to start")


def _raise_fd_limit(max_regions: int) -> None:
    # Each region holds its backing fd and maybe its source file's: the default soft limit
    # of 1024 would make the 500th file-sourced region fail with EMFILE.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    needed = 2 * max_regions + 256
    if hard != resource.RLIM_INFINITY and hard < needed:
        _event(
            logging.WARNING,
            "fd_limit_low",
            limit=hard,
            needed=needed,
            reason="max_regions file-sourced regions need two descriptors each",
        )


# -- capabilities ----------------------------------------------------------------------------


def probe_capabilities(round_trips: bool) -> Callable[[], Mapping[str, object]]:
    """Take the capabilities report now and return a provider serving the cached report. The
    probe forks children: call this before starting any thread. It never raises."""
    report: Mapping[str, object] = probe.probe(round_trips=round_trips).to_dict()
    return lambda: report


# -- the server ------------------------------------------------------------------------------


@dataclass
class Server:
    """A running service: build with :meth:`start`, end with :meth:`stop`."""

    config: ServerConfig
    capabilities: Callable[[], Mapping[str, object]]
    grpc_server: Any = None
    health: Any = None
    store: RegionStore | None = None
    engine: FaultEngine | None = None
    handoff: HandoffServer | None = None
    recordings: RecordingStore | None = None
    firecracker: FirecrackerEndpoints | None = None
    tcp_port: int = 0
    _bound_socket: bool = field(default=False, repr=False)

    def start(self) -> None:
        """Open the store, bind the sockets and start serving. Does not block. Raises
        StartupError, ConfigError."""
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        from shmfault.service import ShmfaultService
        from shmfault.v1 import shmfault_pb2, shmfault_pb2_grpc

        config = self.config
        gid = None
        if config.group:
            try:
                gid = grp.getgrnam(config.group).gr_gid
            except KeyError:
                raise ConfigError(f"group {config.group!r} does not exist") from None
        ensure_private_dir(Path(config.runtime_dir), gid)
        ensure_private_dir(Path(config.state_dir), None)
        socket_path = Path(config.socket)
        if socket_path.parent != Path(config.runtime_dir):
            ensure_private_dir(socket_path.parent, gid)
        clear_stale_socket(socket_path)
        clear_stale_socket(Path(config.handoff_socket))
        warning = memory.shmem_thp_warning()
        if warning:
            _event(logging.WARNING, "shmem_thp", reason=warning)
        if not config.source_roots and config.listen_tcp:
            _event(
                logging.WARNING,
                "file_sources_unrestricted",
                reason="any TCP client can make the service read any file it can read: "
                "set source_roots",
            )
        self.store = RegionStore(
            Path(config.state_dir),
            limits=config.limits,
            handoff_socket=config.handoff_socket,
            shm_prefix=config.shm_prefix,
            source_roots=config.source_roots,
            token_ttl=config.token_ttl,
        )
        store = self.store
        self.recordings = RecordingStore(Path(config.state_dir) / "recordings")
        recordings = self.recordings

        def on_end(attachment: Attachment) -> None:
            store.detach(attachment.region_id)
            if attachment.reattach_key and attachment.end_reason != SERVICE_STOPPING:
                store.forget_attachment(attachment.reattach_key)
            if attachment.recorder is not None:
                attachment.recording_id = recordings.save_later(attachment.recorder)

        self.engine = FaultEngine(
            fault_around_pages=config.fault_around_pages,
            fault_around_max_pages=max(config.fault_around_max_pages, config.fault_around_pages),
            spin_us=config.spin_us,
            on_end=on_end,
            fast_path=config.fast_path,
            threads=config.fault_threads or None,
        )
        self.engine.start()
        _event(
            logging.INFO,
            "fast_path",
            on=self.engine.fast_path,
            reason=(
                "--no-fast-path"
                if not config.fast_path
                else fastpath.unavailable_reason() or "the C library is loaded"
            ),
            # one fault thread pinned to each of these CPUs (none: the engine thread alone)
            lane_cpus=",".join(map(str, self.engine.lane_cpus)) or "none",
        )
        report = self.capabilities()
        self.identities = Identities()
        self.handoff = HandoffServer(
            _unix.listen_seqpacket(config.handoff_socket),
            self.store,
            self.engine,
            modes.kernel_support(report),
            api_features=Feature(int(report["api"]["features_mask"])),  # type: ignore[index]
            handshake_timeout=config.handshake_timeout,
            max_attachments=config.max_attachments,
            max_attachments_per_uid=config.max_attachments_per_uid,
            recordings=self.recordings,
            reattach_grace=config.reattach_grace,
            identities=self.identities,
        )
        self.handoff.start()
        self.firecracker = FirecrackerEndpoints(
            self.store,
            self.engine,
            gid=gid,
            limits=EndpointLimits(
                handshake_timeout=config.handshake_timeout,
                max_attachments=config.max_attachments,
                max_attachments_per_uid=config.max_attachments_per_uid,
            ),
            recordings=self.recordings,
        )
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rpc"),
            options=options,
        )
        shmfault_pb2_grpc.add_ShmfaultServicer_to_server(
            ShmfaultService(
                self.store,
                self.capabilities,
                self.engine,
                self.firecracker,
                self.recordings,
                identities=self.identities,
                require_identity=config.require_identity,
                handoff_socket=config.handoff_socket,
            ),
            server,
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        service_names = (
            shmfault_pb2.DESCRIPTOR.services_by_name["Shmfault"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(service_names, server)
        server.add_insecure_port(f"unix:{socket_path}")
        if config.listen_tcp:
            try:
                self.tcp_port = server.add_insecure_port(config.listen_tcp)
            except RuntimeError as exc:
                raise StartupError(f"cannot listen on {config.listen_tcp}: {exc}") from exc
        server.start()
        self.grpc_server = server
        self._bound_socket = True
        # The directory already keeps others out; the mode says the same to whoever looks.
        for path in (socket_path, Path(config.handoff_socket)):
            os.chmod(path, 0o660 if gid is not None else 0o600)
            if gid is not None:
                os.chown(path, -1, gid)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        _event(
            logging.INFO,
            "serving",
            socket=str(socket_path),
            handoff_socket=config.handoff_socket,
            tcp=f"{config.listen_tcp.rpartition(':')[0]}:{self.tcp_port}" if self.tcp_port else "",
            state_dir=config.state_dir,
            regions=self.store.count,
            pid=os.getpid(),
        )

    def stop(self) -> None:
        """Stop accepting, let in-flight RPCs finish within the grace period, close every
        region and the database, remove the socket. Blocks up to the grace period."""
        if self.health is not None:
            self.health.enter_graceful_shutdown()
        if self.handoff is not None:
            self.handoff.stop()
        if self.grpc_server is not None:
            self.grpc_server.stop(self.config.grace_seconds).wait()
        if self.firecracker is not None:
            # After the RPCs (none can open another) and before the engine (a VM accepted
            # meanwhile is still served, then ended with the rest).
            self.firecracker.stop()
        if self.engine is not None:
            # Attached clients keep their own userfaultfd: their unfilled pages stay blocked,
            # never zero-filled, until they detach or the service comes back.
            _event(logging.INFO, "engine_stats", **self.engine.engine_stats())
            self.engine.stop()
        if self.recordings is not None:
            self.recordings.close()  # what ended attachments recorded is on disk before exit
        if self.store is not None:
            self.store.close()
        if self._bound_socket:
            for path in (Path(self.config.socket), Path(self.config.handoff_socket)):
                try:
                    info = os.lstat(path)
                    if stat.S_ISSOCK(info.st_mode) and info.st_uid == os.geteuid():
                        os.unlink(path)
                except FileNotFoundError:
                    pass
        _event(logging.INFO, "stopped", pid=os.getpid())


def serve(config: ServerConfig) -> int:
    """Run the service until SIGTERM or SIGINT; returns the process exit code (0 after a clean
    stop). Blocks. Raises ConfigError and StartupError before serving."""
    config = config.resolved()
    setup_logging(config.log_format, config.log_level)
    _raise_fd_limit(config.max_regions)
    # Before any thread: the probe forks.
    capabilities = probe_capabilities(config.probe_round_trips)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    stop_signals = {signal.SIGTERM, signal.SIGINT}
    previous = {sig: signal.signal(sig, on_signal) for sig in stop_signals}
    server = Server(config, capabilities)
    try:
        # Threads inherit the signal mask: blocked while they are created, the stop signals can
        # only be delivered to the main thread, the one that runs Python's handlers. Delivered
        # to a gRPC or engine thread instead, a signal would not wake the main thread's wait.
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        try:
            server.start()
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise StartupError(f"{exc.filename or 'a path'}: {exc.strerror}") from exc
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
        # Timed, so the main thread runs Python code (and any pending handler) every second
        # even if a thread created later without the mask took the signal.
        while not stop.wait(1.0):
            pass
        _event(
            logging.INFO,
            "stopping",
            signal=signal.Signals(received[0]).name,
            grace_seconds=config.grace_seconds,
        )
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0

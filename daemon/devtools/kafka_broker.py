"""A real single-node Kafka broker on loopback, for development and the integration tests.

There is no Docker registry and no Apache download mirror here, so the broker runs straight from
the Maven Central jars that ``deploy/kafka/pom.xml`` resolves: one JVM in KRaft combined mode
(broker and controller), its storage formatted once, its data, logs and pid file under one data
directory. ``start``, ``stop`` and ``status`` take a ``LocalBrokerConfig`` and return a
``BrokerStatus``, so ``factkeeper kafka start|stop|status`` maps onto them one to one; every
expected failure is a ``BrokerError`` subclass whose message says what to do next. POSIX only.

With ``sasl_ssl=SaslSslConfig(...)`` the broker also opens a TLS + SASL listener, so the daemon's
SASL_SSL path is tested against a real broker: a throwaway CA made with the JDK's ``keytool``
signs the broker's certificate and its private key is deleted right after, and SCRAM users are
stored (salted) in the cluster's metadata. The PLAINTEXT listener stays, on loopback only.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kafka import KafkaAdminClient
from kafka.admin import UserScramCredentialUpsertion
from kafka.errors import KafkaError
from pydantic import SecretStr

from daemon.config import KafkaSettings
from daemon.kafka.clients import KafkaConnectError, KafkaTlsError, check_connection
from editing.errors import FactkeeperError
from editing.paths import Paths

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# The repository root (daemon/devtools/ is two levels down): the package is installed editable,
# so the deploy files sit beside it.
_REPO_ROOT = Path(__file__).resolve().parents[2]
_RESOLVE_TIMEOUT_S = 600.0
_MIN_JAVA_MAJOR = 17  # Kafka 4 brokers need Java 17+.
_HEAP_RE = re.compile(r"^[1-9][0-9]*[kKmMgG]$")
# C1 only: a development broker is started far more often than it is loaded; on 2 cores this
# cuts the JVM start by about a third (measured ~4 s -> ~2.5 s) at the cost of peak throughput.
DEFAULT_JVM_OPTS = ("-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:TieredStopAtLevel=1")

SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
_SASL_MECHANISMS: tuple[SaslMechanism, ...] = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
# Kafka principal names end up in JAAS strings and ACLs: keep them to a quoting-free alphabet.
_SASL_USER_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MIN_SASL_PASSWORD_CHARS = 12
_KEYTOOL_TIMEOUT_S = 60.0


class BrokerError(FactkeeperError):
    """The local broker could not be started, stopped or inspected."""


class JavaNotFoundError(BrokerError):
    """No ``java`` executable where the config says to look."""


class UnsupportedJavaError(BrokerError):
    """The ``java`` found is older than the broker needs."""


class MavenNotFoundError(BrokerError):
    """The broker jars are missing and there is no ``mvn`` to resolve them."""


class BrokerLibsError(BrokerError):
    """Resolving the broker jars with Maven failed, or the pom is missing."""


class BrokerStartError(BrokerError):
    """The broker process was launched but did not come up (or could not be launched)."""


class PortInUseError(BrokerStartError):
    """Another process already listens on the broker's or the controller's port."""


class BrokerStopError(BrokerError):
    """The broker process survived SIGTERM and SIGKILL."""


class BrokerTlsError(BrokerError):
    """The throwaway CA or the broker's keystore could not be made with ``keytool``."""


def _default_deploy_dir() -> Path:
    return _REPO_ROOT / "deploy" / "kafka"


def _default_libs_dir() -> Path:
    return _default_deploy_dir() / "target" / "libs"


def _default_data_dir() -> Path:
    return Paths.from_env().kafka_dir


@dataclass(frozen=True)
class SaslUser:
    """One SASL principal of the local broker; the password never shows in ``repr``."""

    name: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if not _SASL_USER_RE.fullmatch(self.name):
            raise ValueError(
                f"SASL user name must be 1-64 of letters, digits, '.', '_', '-', got {self.name!r}"
            )
        if len(self.password) < _MIN_SASL_PASSWORD_CHARS:
            raise ValueError(
                f"the SASL password of {self.name!r} must be at least "
                f"{_MIN_SASL_PASSWORD_CHARS} characters"
            )
        # PLAIN users live in a quoted JAAS string: no quote, backslash or control character.
        if any(ch in '"\\' or not ch.isprintable() for ch in self.password):
            raise ValueError(
                f"the SASL password of {self.name!r} must be printable, without '\"' or '\\'"
            )


@dataclass(frozen=True)
class SaslSslConfig:
    """The optional TLS + SASL listener of the local broker.

    ``port=0`` means the broker's ``port + 2`` and ``cert_dir=None`` means ``data_dir/tls``;
    ``LocalBrokerConfig`` resolves both. The certificate is made once per ``cert_dir`` and kept.
    """

    users: tuple[SaslUser, ...]
    """Who may log in; the first one is used to check that the listener works."""
    port: int = 0
    """SASL_SSL listener on 127.0.0.1; 0 means the broker's ``port + 2``."""
    mechanisms: tuple[SaslMechanism, ...] = ("SCRAM-SHA-512",)
    """SCRAM users are stored salted in the cluster metadata; PLAIN ones in server.properties."""
    cert_dir: Path | None = None
    """CA certificate (``ca.pem``, for clients) and broker keystore; default ``data_dir/tls``."""
    cert_validity_days: int = 825
    """Lifetime of the throwaway CA and broker certificates."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "users", tuple(self.users))
        object.__setattr__(self, "mechanisms", tuple(self.mechanisms))
        if not self.users:
            raise ValueError("sasl_ssl needs at least one user")
        names = [user.name for user in self.users]
        if len(set(names)) != len(names):
            raise ValueError(f"sasl_ssl user names must be unique, got {names}")
        if not self.mechanisms or len(set(self.mechanisms)) != len(self.mechanisms):
            raise ValueError("sasl_ssl mechanisms must be a non-empty list without repeats")
        for mechanism in self.mechanisms:
            if mechanism not in _SASL_MECHANISMS:
                raise ValueError(
                    f"sasl_ssl mechanism must be one of {', '.join(_SASL_MECHANISMS)}, "
                    f"got {mechanism!r}"
                )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"sasl_ssl port must be a TCP port in 1..65535, got {self.port}")
        if self.cert_validity_days < 1:
            raise ValueError(f"cert_validity_days must be positive, got {self.cert_validity_days}")
        if self.cert_dir is not None:
            object.__setattr__(self, "cert_dir", Path(self.cert_dir).expanduser().absolute())

    @property
    def ca_file(self) -> Path:
        """The throwaway CA's certificate (PEM): the clients' ``ssl_cafile``."""
        return self._dir / "ca.pem"

    @property
    def keystore_file(self) -> Path:
        """The broker's key and certificate chain (PKCS12)."""
        return self._dir / "broker.p12"

    @property
    def keystore_password_file(self) -> Path:
        return self._dir / "broker.p12.password"

    @property
    def _dir(self) -> Path:
        if self.cert_dir is None:
            raise ValueError("cert_dir is resolved by LocalBrokerConfig")
        return self.cert_dir


@dataclass(frozen=True)
class LocalBrokerConfig:
    """Where and how the local broker runs; checked when built.

    ``controller_port=0`` means ``port + 1``. ``java_bin`` and ``mvn_bin`` are names looked up on
    ``PATH`` (or paths), so a test can point them at something that does not exist.
    """

    port: int = 9092
    """Client (PLAINTEXT) listener on 127.0.0.1; the bootstrap address."""
    controller_port: int = 0
    """KRaft controller listener on 127.0.0.1; 0 means ``port + 1``."""
    data_dir: Path = field(default_factory=_default_data_dir)
    """Everything the broker writes: config, cluster id, pid file, logs, topic data."""
    libs_dir: Path = field(default_factory=_default_libs_dir)
    """The broker's classpath: every jar ``deploy/kafka/pom.xml`` resolves."""
    deploy_dir: Path = field(default_factory=_default_deploy_dir)
    """Holds ``pom.xml`` (to resolve missing jars) and ``log4j2.yaml``."""
    heap: str = "512m"
    """JVM heap (``-Xms``/``-Xmx``), e.g. ``512m`` or ``1g``."""
    startup_timeout_s: float = 60.0
    """How long ``start`` waits for the broker to answer an admin request."""
    java_bin: str = "java"
    """The Java executable, a name on ``PATH`` or a path."""
    mvn_bin: str = "mvn"
    """The Maven executable, used only when ``libs_dir`` has no broker jars."""
    jvm_opts: tuple[str, ...] = DEFAULT_JVM_OPTS
    """Extra JVM flags for the broker and the storage formatter (heap is set by ``heap``)."""
    sasl_ssl: SaslSslConfig | None = None
    """Also open a TLS + SASL listener (see ``SaslSslConfig``); None: PLAINTEXT only."""
    auto_create_topics: bool = True
    """``auto.create.topics.enable``; False behaves like the cluster chart, where a topic exists
    only once someone creates it (the daemon does, at start)."""
    host: str = field(default=LOOPBACK, init=False)
    """Always loopback: this broker is never reachable from another machine."""

    def __post_init__(self) -> None:
        for name in ("port", "controller_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535 or (name == "port" and value == 0):
                raise ValueError(f"{name} must be a TCP port in 1..65535, got {value}")
        if self.controller_port == 0:
            if self.port == 65535:
                raise ValueError("port 65535 leaves no room for controller_port = port + 1")
            object.__setattr__(self, "controller_port", self.port + 1)
        if self.controller_port == self.port:
            raise ValueError(f"controller_port must differ from port ({self.port})")
        if not _HEAP_RE.match(self.heap):
            raise ValueError(f"heap must look like 512m or 1g, got {self.heap!r}")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be positive, got {self.startup_timeout_s}")
        for name in ("data_dir", "libs_dir", "deploy_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)).expanduser().absolute())
        if self.sasl_ssl is not None:
            self._resolve_sasl_ssl(self.sasl_ssl)

    def _resolve_sasl_ssl(self, sasl: SaslSslConfig) -> None:
        port = sasl.port
        if port == 0:
            if self.port > 65533:
                raise ValueError("port leaves no room for the SASL_SSL port = port + 2")
            port = self.port + 2
        if port in (self.port, self.controller_port):
            raise ValueError(f"sasl_ssl port {port} must differ from port and controller_port")
        cert_dir = sasl.cert_dir or self.data_dir / "tls"
        resolved = dataclasses.replace(sasl, port=port, cert_dir=cert_dir)
        object.__setattr__(self, "sasl_ssl", resolved)

    @property
    def bootstrap(self) -> str:
        """``host:port`` for Kafka clients."""
        return f"{self.host}:{self.port}"

    @property
    def sasl_ssl_bootstrap(self) -> str | None:
        """``host:port`` of the SASL_SSL listener, or None without one."""
        return f"{self.host}:{self.sasl_ssl.port}" if self.sasl_ssl else None

    # One method per file in data_dir, so nothing else builds these paths.
    @property
    def server_properties(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def cluster_id_file(self) -> Path:
        return self.data_dir / "cluster.id"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    @property
    def console_file(self) -> Path:
        """The JVM's stdout and stderr: crashes before log4j2 is up land here."""
        return self.data_dir / "broker.out"

    @property
    def logs_dir(self) -> Path:
        """log4j2's folder (``kafka.logs.dir``); ``server.log`` rolls inside it."""
        return self.data_dir / "logs"

    @property
    def log_file(self) -> Path:
        return self.logs_dir / "server.log"

    @property
    def log_dirs(self) -> Path:
        """Kafka's ``log.dirs``: topic partitions and the KRaft metadata log."""
        return self.data_dir / "data"


@dataclass(frozen=True)
class BrokerStatus:
    """What ``start``, ``stop`` and ``status`` report about one data dir's broker."""

    running: bool
    pid: int | None
    bootstrap: str
    data_dir: Path
    log_file: Path
    sasl_ssl_bootstrap: str | None = None
    """The SASL_SSL listener's ``host:port`` when the config asks for one."""

    def __str__(self) -> str:
        state = f"running (pid {self.pid})" if self.running else "stopped"
        sasl = f" (SASL_SSL at {self.sasl_ssl_bootstrap})" if self.sasl_ssl_bootstrap else ""
        return (
            f"kafka {state} at {self.bootstrap}{sasl}, data in {self.data_dir}, log {self.log_file}"
        )


def start(cfg: LocalBrokerConfig) -> BrokerStatus:
    """Start the broker unless it already runs on ``cfg.data_dir``; return once it answers.

    Resolves the jars with Maven if they are missing, formats the KRaft storage on first use,
    launches ``kafka.Kafka`` in its own session, and waits until an admin client listing topics
    gets an answer from this broker's cluster. With ``cfg.sasl_ssl`` it first makes the TLS
    material (once), then stores the SCRAM users and waits until the first user can log in over
    SASL_SSL. On a broker that already runs, the SCRAM users are stored again: that is how a
    password is rotated without a restart.

    Raises:
        JavaNotFoundError, UnsupportedJavaError: no usable Java.
        MavenNotFoundError, BrokerLibsError: the jars are missing and cannot be resolved.
        BrokerTlsError: ``keytool`` could not make the CA or the broker keystore.
        PortInUseError: another process holds one of the broker's ports.
        BrokerStartError: the broker exited or did not answer within ``startup_timeout_s``
            (it is then stopped), or it already runs without the SASL_SSL listener asked for;
            the message carries the tail of its logs.
    """
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    with _start_lock(cfg):
        current = status(cfg)
        if current.running:
            log.info("Kafka broker already running (pid %s) at %s", current.pid, cfg.bootstrap)
            if cfg.sasl_ssl is not None and current.pid is not None:
                # PLAIN users are read at launch only; SCRAM ones can change while it runs.
                _check_running_listener(cfg)
                _store_scram_users(cfg, deadline=time.monotonic() + cfg.startup_timeout_s)
                scram = tuple(m for m in cfg.sasl_ssl.mechanisms if m.startswith("SCRAM-"))
                _wait_until_sasl_ssl_ready(cfg, current.pid, scram)
            return current
        for port in _ports(cfg):
            _check_port_free(port)
        java = _find_java(cfg)
        _ensure_libs(cfg)
        if cfg.sasl_ssl is not None:
            _ensure_tls(cfg.sasl_ssl, java, cfg.jvm_opts)
        _write_server_properties(cfg)
        cluster_id = _ensure_formatted(cfg, java)
        began = time.monotonic()
        pid = _launch(cfg, java)
        try:
            _wait_until_ready(cfg, pid, cluster_id)
            if cfg.sasl_ssl is not None:
                _store_scram_users(cfg, deadline=time.monotonic() + cfg.startup_timeout_s)
                _wait_until_sasl_ssl_ready(cfg, pid, cfg.sasl_ssl.mechanisms)
        except BaseException:  # also Ctrl-C or a test timeout: never leave a half-started JVM
            _terminate(pid, timeout_s=10.0)
            cfg.pid_file.unlink(missing_ok=True)
            raise
        log.info(
            "Kafka broker started (pid %s) at %s in %.1f s",
            pid,
            cfg.bootstrap,
            time.monotonic() - began,
        )
        return status(cfg)


def stop(cfg: LocalBrokerConfig, timeout_s: float = 30.0) -> BrokerStatus:
    """Stop the broker on ``cfg.data_dir``: SIGTERM, wait ``timeout_s``, then SIGKILL.

    Stopping a broker that is not running is fine; a stale pid file is removed either way.

    Raises:
        BrokerStopError: the process is still alive after SIGKILL.
    """
    current = status(cfg)
    if current.running and current.pid is not None:
        log.info("Stopping Kafka broker (pid %s)", current.pid)
        _terminate(current.pid, timeout_s=timeout_s)
    cfg.pid_file.unlink(missing_ok=True)
    return status(cfg)


def status(cfg: LocalBrokerConfig) -> BrokerStatus:
    """Whether the broker process recorded in ``cfg.data_dir`` is alive.

    A pid counts only if that process is a ``kafka.Kafka`` JVM started with this data dir's
    ``server.properties``, so a reused pid is never mistaken for the broker. This checks the
    process, not whether the broker answers; ``start`` waits for that.
    """
    pid = _read_pid(cfg.pid_file)
    running = pid is not None and _is_our_broker(pid, cfg)
    return BrokerStatus(
        running=running,
        pid=pid if running else None,
        bootstrap=cfg.bootstrap,
        data_dir=cfg.data_dir,
        log_file=cfg.log_file,
        sasl_ssl_bootstrap=cfg.sasl_ssl_bootstrap,
    )


def sasl_ssl_client_settings(cfg: LocalBrokerConfig, user: str) -> dict[str, str]:
    """The daemon's ``kafka`` settings for ``user`` on the SASL_SSL listener, minus the password.

    Keys are ``KafkaSettings`` field names; the password is the one secret left to the caller
    (``FACTKEEPER_KAFKA__SASL_PASSWORD``), so this dict can be printed.
    """
    if cfg.sasl_ssl is None or cfg.sasl_ssl_bootstrap is None:
        raise ValueError("this broker config has no sasl_ssl listener")
    if user not in {u.name for u in cfg.sasl_ssl.users}:
        raise ValueError(f"{user!r} is not one of the broker's SASL users")
    return {
        "bootstrap_servers": cfg.sasl_ssl_bootstrap,
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": cfg.sasl_ssl.mechanisms[0],
        "sasl_username": user,
        "ssl_cafile": str(cfg.sasl_ssl.ca_file),
    }


def sasl_password_file(data_dir: Path, user: str) -> Path:
    """Where ``local_sasl_ssl`` keeps ``user``'s password (mode 0600)."""
    return data_dir / "sasl" / f"{user}.password"


def local_sasl_ssl(data_dir: Path | None = None, user: str = "factkeeper") -> SaslSslConfig:
    """The CLI's SASL_SSL listener: one SCRAM-SHA-512 ``user`` whose password lives in a file.

    The password is made on first use and kept in ``sasl_password_file``, so a restarted
    broker and the shell that exports it agree; it is never printed.
    """
    data_dir = Path(data_dir or _default_data_dir()).expanduser().absolute()
    password = load_or_create_password(sasl_password_file(data_dir, user))
    return SaslSslConfig(users=(SaslUser(user, password),))


def load_or_create_password(path: Path) -> str:
    """The password kept in ``path`` (mode 0600), made with ``secrets`` on first use.

    ``factkeeper kafka start --sasl-ssl`` keeps its client password here, so later starts and
    the shell that exports it agree without the password ever being printed.
    """
    try:
        password = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        password = ""
    if password:
        return password
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    password = secrets.token_urlsafe(24)
    _write_private(path, password + "\n")
    return password


@contextmanager
def _start_lock(cfg: LocalBrokerConfig) -> Iterator[None]:
    """Serialise concurrent ``start`` calls on one data dir, so only one JVM is launched."""
    with open(cfg.data_dir / "start.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _find_java(cfg: LocalBrokerConfig) -> str:
    java = shutil.which(cfg.java_bin)
    if java is None:
        raise JavaNotFoundError(
            f"Java was not found: {cfg.java_bin!r} is not an executable on PATH. The local Kafka "
            f"broker needs Java {_MIN_JAVA_MAJOR} or newer; install it (Debian: apt-get install "
            "openjdk-17-jre-headless) or point java_bin at one."
        )
    try:
        probe = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise JavaNotFoundError(f"{java} -version failed: {exc}") from exc
    found = re.search(r'version "(\d+)(?:\.(\d+))?', probe.stderr + probe.stdout)
    if found is None:
        raise UnsupportedJavaError(f"cannot read the Java version from {java} -version")
    major = int(found.group(1))
    if major == 1 and found.group(2):  # "1.8.0_392" style
        major = int(found.group(2))
    if major < _MIN_JAVA_MAJOR:
        raise UnsupportedJavaError(
            f"{java} is Java {major}; the Kafka 4 broker needs Java {_MIN_JAVA_MAJOR} or newer."
        )
    return java


def _has_broker_jars(libs_dir: Path) -> bool:
    return any(libs_dir.glob("kafka_2.13-*.jar"))


def _ensure_libs(cfg: LocalBrokerConfig) -> None:
    """Resolve the jars with the same Maven command as ``make setup`` when they are missing."""
    if _has_broker_jars(cfg.libs_dir):
        return
    pom = cfg.deploy_dir / "pom.xml"
    mvn = shutil.which(cfg.mvn_bin)
    if mvn is None:
        raise MavenNotFoundError(
            f"The Kafka broker jars are missing from {cfg.libs_dir} and Maven ({cfg.mvn_bin!r}) "
            "is not on PATH to resolve them. Install Maven (Debian: apt-get install maven) and "
            "run `make setup`, or point libs_dir at a folder holding the jars."
        )
    if not pom.is_file():
        raise BrokerLibsError(
            f"The Kafka broker jars are missing from {cfg.libs_dir} and there is no {pom} to "
            "resolve them from; run from a factkeeper checkout (pip install -e .)."
        )
    cmd = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(pom),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={cfg.libs_dir}",
        "-DincludeScope=runtime",
    ]
    log.info("Resolving the Kafka broker jars into %s with Maven", cfg.libs_dir)
    began = time.monotonic()
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=_RESOLVE_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BrokerLibsError(
            f"Maven did not resolve the Kafka jars within {_RESOLVE_TIMEOUT_S:.0f} s: "
            f"{' '.join(cmd)}"
        ) from exc
    if done.returncode != 0 or not _has_broker_jars(cfg.libs_dir):
        output = _last_lines(done.stdout + done.stderr, 30)
        raise BrokerLibsError(
            f"Maven failed to resolve the Kafka jars (exit {done.returncode}): "
            f"{' '.join(cmd)}\n{output}"
        )
    (cfg.libs_dir / ".resolved").touch()  # the Makefile's marker, so make agrees
    log.info("Resolved the Kafka broker jars in %.1f s", time.monotonic() - began)


def _check_port_free(port: int) -> None:
    """Fail early: a broker that cannot bind dies, and a stranger could answer our probe."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as the JVM does, so a port in TIME_WAIT from our last run counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError as exc:
            raise PortInUseError(
                f"{LOOPBACK}:{port} is already in use ({exc.strerror}); stop what listens there "
                "(`ss -ltnp`) or choose another port."
            ) from exc


def _ports(cfg: LocalBrokerConfig) -> list[int]:
    ports = [cfg.port, cfg.controller_port]
    if cfg.sasl_ssl is not None:
        ports.append(cfg.sasl_ssl.port)
    return ports


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (it may hold a password)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)  # an older file may have wider permissions
        handle.write(text)


def _write_server_properties(cfg: LocalBrokerConfig) -> None:
    """KRaft combined mode, node 1, every replication factor 1: a complete one-node cluster.

    Mode 0600: with a SASL_SSL listener the file holds the keystore password (and PLAIN users).
    """
    listeners = [f"PLAINTEXT://{cfg.host}:{cfg.port}"]
    protocols = ["CONTROLLER:PLAINTEXT", "PLAINTEXT:PLAINTEXT"]
    if cfg.sasl_ssl is not None:
        listeners.append(f"SASL_SSL://{cfg.host}:{cfg.sasl_ssl.port}")
        protocols.append("SASL_SSL:SASL_SSL")
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{cfg.host}:{cfg.controller_port}",
        "listeners": ",".join([*listeners, f"CONTROLLER://{cfg.host}:{cfg.controller_port}"]),
        "advertised.listeners": ",".join(listeners),
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": ",".join(protocols),
        "log.dirs": str(cfg.log_dirs),
        "num.partitions": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # A new consumer group starts consuming at once instead of after 3 s.
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "true" if cfg.auto_create_topics else "false",
    }
    if cfg.sasl_ssl is not None:
        props.update(_sasl_ssl_properties(cfg.sasl_ssl))
    text = "# Written by daemon/devtools/kafka_broker.py on every start; edits are overwritten.\n"
    text += "".join(f"{key}={value}\n" for key, value in props.items())
    _write_private(cfg.server_properties, text)


def _sasl_ssl_properties(sasl: SaslSslConfig) -> dict[str, str]:
    """The SASL_SSL listener's TLS keystore and one JAAS login module per mechanism."""
    prefix = "listener.name.sasl_ssl."
    props = {
        f"{prefix}ssl.keystore.type": "PKCS12",
        f"{prefix}ssl.keystore.location": str(sasl.keystore_file),
        f"{prefix}ssl.keystore.password": sasl.keystore_password_file.read_text().strip(),
        f"{prefix}ssl.client.auth": "none",
        "sasl.enabled.mechanisms": ",".join(sasl.mechanisms),
    }
    for mechanism in sasl.mechanisms:
        if mechanism == "PLAIN":
            users = " ".join(f'user_{u.name}="{u.password}"' for u in sasl.users)
            jaas = f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"
        else:  # SCRAM: the salted credentials live in the metadata log (_store_scram_users)
            jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        props[f"{prefix}{mechanism.lower()}.sasl.jaas.config"] = jaas
    return props


def _check_running_listener(cfg: LocalBrokerConfig) -> None:
    """A running broker must already have the SASL_SSL listener asked for; it cannot grow one."""
    assert cfg.sasl_ssl is not None
    wanted = f"SASL_SSL://{cfg.host}:{cfg.sasl_ssl.port}"
    try:
        text = cfg.server_properties.read_text()
    except FileNotFoundError:
        text = ""
    listeners = next(
        (line for line in text.splitlines() if line.startswith("listeners=")), "listeners="
    )
    if wanted not in listeners.split("=", 1)[1].split(","):
        raise BrokerStartError(
            f"the Kafka broker on {cfg.data_dir} already runs without a SASL_SSL listener on "
            f"port {cfg.sasl_ssl.port}; stop it (`factkeeper kafka stop`) and start it again "
            "with --sasl-ssl."
        )


def _find_keytool(java: str) -> str:
    """The ``keytool`` of the JDK that runs the broker, else the one on ``PATH``."""
    beside = Path(java).resolve().with_name("keytool")
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("keytool")
    if found is None:
        raise BrokerTlsError(
            f"keytool was not found beside {java} nor on PATH; it ships with every Java "
            "runtime (Debian: openjdk-17-jre-headless) and makes the SASL_SSL certificates."
        )
    return found


def _ensure_tls(sasl: SaslSslConfig, java: str, jvm_opts: tuple[str, ...]) -> None:
    """Make a throwaway CA, a broker key and certificate signed by it, then forget the CA key.

    Done once per ``cert_dir``: the CA's private key lives only in a temporary folder, so no
    other certificate can ever be signed by it; clients trust ``ca.pem``. Passwords reach
    ``keytool`` through its environment (``-storepass:env``), never its command line.
    """
    if all(p.is_file() for p in (sasl.ca_file, sasl.keystore_file, sasl.keystore_password_file)):
        return
    keytool = _find_keytool(java)
    cert_dir = sasl.ca_file.parent
    cert_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    began = time.monotonic()
    store_password = secrets.token_urlsafe(24)
    env = {**os.environ, "FK_CA_PASS": secrets.token_urlsafe(24), "FK_STORE_PASS": store_password}
    days = str(sasl.cert_validity_days)
    with tempfile.TemporaryDirectory(dir=cert_dir, prefix=".ca-") as tmp:
        work = Path(tmp)
        ca_store, ca_pem = ["-keystore", str(work / "ca.p12")], work / "ca.pem"
        store = ["-keystore", str(work / "broker.p12")]
        ca_pass, store_pass = ["-storepass:env", "FK_CA_PASS"], ["-storepass:env", "FK_STORE_PASS"]
        ec = ["-keyalg", "EC", "-groupname", "secp256r1", "-validity", days]
        steps = [
            ["-genkeypair", "-alias", "ca", *ec, "-dname", "CN=factkeeper throwaway CA",
             "-ext", "bc:c=ca:true,pathlen:0", "-ext", "KeyUsage:c=keyCertSign,cRLSign",
             "-storetype", "PKCS12", *ca_store, *ca_pass],
            ["-exportcert", "-rfc", "-alias", "ca", *ca_store, *ca_pass, "-file", str(ca_pem)],
            ["-genkeypair", "-alias", "broker", *ec, "-dname", "CN=localhost",
             "-storetype", "PKCS12", *store, *store_pass],
            ["-certreq", "-alias", "broker", *store, *store_pass,
             "-file", str(work / "broker.csr")],
            ["-gencert", "-alias", "ca", *ca_store, *ca_pass, "-rfc", "-validity", days,
             "-infile", str(work / "broker.csr"), "-outfile", str(work / "broker.pem"),
             "-ext", f"SAN=ip:{LOOPBACK},dns:localhost", "-ext", "EKU=serverAuth",
             "-ext", "KeyUsage:c=digitalSignature"],
            ["-importcert", "-noprompt", "-alias", "broker", *store, *store_pass,
             "-file", str(work / "chain.pem")],
        ]  # fmt: skip
        for step in steps:
            if step[0] == "-importcert":  # the reply: broker certificate plus its CA
                chain = ca_pem.read_text() + (work / "broker.pem").read_text()
                (work / "chain.pem").write_text(chain)
            _keytool(keytool, jvm_opts, step, env)
        _write_private(sasl.keystore_password_file, store_password + "\n")
        os.replace(work / "broker.p12", sasl.keystore_file)
        os.chmod(sasl.keystore_file, 0o600)
        os.replace(ca_pem, sasl.ca_file)
        os.chmod(sasl.ca_file, 0o644)
    log.info(
        "Made a throwaway CA and the broker certificate in %s in %.1f s (clients trust %s)",
        cert_dir,
        time.monotonic() - began,
        sasl.ca_file,
    )


def _keytool(keytool: str, jvm_opts: tuple[str, ...], args: list[str], env: dict[str, str]) -> None:
    cmd = [keytool, *(f"-J{opt}" for opt in jvm_opts), *args]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=_KEYTOOL_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerTlsError(f"keytool {args[0]} failed: {exc}") from exc
    if done.returncode != 0:
        raise BrokerTlsError(
            f"keytool {args[0]} failed (exit {done.returncode}):\n"
            f"{_last_lines(done.stdout + done.stderr, 20)}"
        )


def _new_cluster_id() -> str:
    """A Kafka-style cluster id: 16 random bytes, URL-safe base64 without padding."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):  # Kafka's own rule: it would read as a CLI flag
            return cluster_id


def _ensure_formatted(cfg: LocalBrokerConfig, java: str) -> str:
    """Format the KRaft storage once, with a cluster id kept in the data dir; return the id.

    Once formatted, the storage's own ``meta.properties`` is the truth about the cluster id.
    """
    formatted_id = _read_formatted_cluster_id(cfg.log_dirs / "meta.properties")
    if formatted_id is not None:
        cfg.cluster_id_file.write_text(formatted_id + "\n")
        return formatted_id
    if cfg.cluster_id_file.is_file():
        cluster_id = cfg.cluster_id_file.read_text().strip()
    else:
        cluster_id = _new_cluster_id()
        cfg.cluster_id_file.write_text(cluster_id + "\n")
    cmd = [
        java,
        "-Xmx256m",
        *cfg.jvm_opts,
        *_logging_jvm_args(cfg),
        "-cp",
        _classpath(cfg),
        "kafka.tools.StorageTool",
        "format",
        "--cluster-id",
        cluster_id,
        "--config",
        str(cfg.server_properties),
    ]
    log.info("Formatting Kafka storage in %s (cluster id %s)", cfg.log_dirs, cluster_id)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BrokerStartError("formatting the Kafka storage took more than 120 s") from exc
    if done.returncode != 0:
        raise BrokerStartError(
            f"formatting the Kafka storage in {cfg.log_dirs} failed (exit {done.returncode}):\n"
            f"{_last_lines(done.stdout + done.stderr, 30)}"
        )
    return cluster_id


def _read_formatted_cluster_id(meta_properties: Path) -> str | None:
    try:
        lines = meta_properties.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() == "cluster.id" and value.strip():
            return value.strip()
    return None


def _classpath(cfg: LocalBrokerConfig) -> str:
    return str(cfg.libs_dir / "*")  # the JVM expands the wildcard itself


def _logging_jvm_args(cfg: LocalBrokerConfig) -> list[str]:
    return [
        f"-Dlog4j2.configurationFile={cfg.deploy_dir / 'log4j2.yaml'}",
        f"-Dkafka.logs.dir={cfg.logs_dir}",
    ]


def _launch(cfg: LocalBrokerConfig, java: str) -> int:
    """Spawn the broker JVM in its own session and record its pid; return the pid.

    ``posix_spawn`` rather than ``Popen``: the broker outlives this call (and usually this
    process), and a ``Popen`` object dropped while its child runs warns and is reaped behind our
    back. ``status``/``stop`` reap it instead.
    """
    cfg.logs_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        java,
        f"-Xms{cfg.heap}",
        f"-Xmx{cfg.heap}",
        *cfg.jvm_opts,
        "-Djava.awt.headless=true",
        f"-XX:ErrorFile={cfg.data_dir / 'hs_err_pid%p.log'}",
        *_logging_jvm_args(cfg),
        "-cp",
        _classpath(cfg),
        "kafka.Kafka",
        str(cfg.server_properties),
    ]
    out_flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    file_actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(cfg.console_file), out_flags, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    try:
        pid = os.posix_spawn(java, argv, dict(os.environ), file_actions=file_actions, setsid=True)
    except OSError as exc:
        raise BrokerStartError(f"could not launch {java}: {exc}") from exc
    tmp = cfg.pid_file.with_suffix(".tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(cfg.pid_file)
    log.info("Launched Kafka broker JVM (pid %s), log %s", pid, cfg.log_file)
    return pid


def _wait_until_ready(cfg: LocalBrokerConfig, pid: int, cluster_id: str) -> None:
    """Poll until this broker answers ``list_topics`` with our cluster id, or fail with logs.

    The TCP check comes first because a kafka-python 3.0 admin client whose bootstrap fails
    leaves its IO thread running; one client is built only once the port accepts connections.
    """
    deadline = time.monotonic() + cfg.startup_timeout_s
    while True:
        exit_code = _reap(pid)
        if exit_code is not None:
            raise BrokerStartError(
                f"the Kafka broker exited with code {exit_code} while starting.\n{_log_tails(cfg)}"
            )
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise BrokerStartError(
                f"the Kafka broker did not answer on {cfg.bootstrap} within "
                f"{cfg.startup_timeout_s:.0f} s and was stopped.\n{_log_tails(cfg)}"
            )
        if _accepts_connections(cfg.port) and _answers(cfg, cluster_id, remaining_s):
            return
        time.sleep(0.1)


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def _answers(cfg: LocalBrokerConfig, cluster_id: str, remaining_s: float) -> bool:
    """One admin round trip; False while the broker is still coming up."""
    timeout_ms = max(500, int(min(remaining_s, 10.0) * 1000))
    try:
        with KafkaAdminClient(
            bootstrap_servers=cfg.bootstrap,
            client_id="factkeeper-broker-probe",
            bootstrap_timeout_ms=timeout_ms,
            request_timeout_ms=timeout_ms,
        ) as admin:
            admin.list_topics()
            answered_id = admin.describe_cluster().get("cluster_id")
    except KafkaError as exc:
        log.debug("Kafka broker not answering yet: %s", exc)
        return False
    if answered_id != cluster_id:
        raise BrokerStartError(
            f"a Kafka cluster with id {answered_id} answers on {cfg.bootstrap}, not this data "
            f"dir's {cluster_id}; another broker took the port."
        )
    return True


def _store_scram_users(cfg: LocalBrokerConfig, deadline: float) -> None:
    """Upsert every user's SCRAM credentials through the PLAINTEXT listener (salted, 4096 rounds).

    Run on every ``start``, so a changed password takes effect on a running broker too.
    """
    assert cfg.sasl_ssl is not None
    scram = [m for m in cfg.sasl_ssl.mechanisms if m.startswith("SCRAM-")]
    if not scram:
        return
    users = cfg.sasl_ssl.users
    upserts = [UserScramCredentialUpsertion(u.name, m, u.password) for u in users for m in scram]
    timeout_ms = max(1000, int(min(deadline - time.monotonic(), 30.0) * 1000))
    try:
        with KafkaAdminClient(
            bootstrap_servers=cfg.bootstrap,
            client_id="factkeeper-broker-users",
            bootstrap_timeout_ms=timeout_ms,
            request_timeout_ms=timeout_ms,
        ) as admin:
            errors = admin.alter_user_scram_credentials(upserts)
    except KafkaError as exc:
        raise BrokerStartError(
            f"storing the SCRAM users on {cfg.bootstrap} failed: {type(exc).__name__}: {exc}"
        ) from exc
    failed = {user: message for user, message in errors.items() if message}
    if failed:
        shown = "; ".join(f"{user}: {message}" for user, message in failed.items())
        raise BrokerStartError(f"the broker refused the SCRAM credentials of {shown}")
    log.info(
        "Stored %s credentials for %s",
        "/".join(scram),
        ", ".join(u.name for u in users),
    )


def _wait_until_sasl_ssl_ready(
    cfg: LocalBrokerConfig, pid: int, mechanisms: tuple[SaslMechanism, ...]
) -> None:
    """Poll until the first user logs in over SASL_SSL with each of ``mechanisms``.

    Uses the daemon's own ``check_connection``, so the listener is proven to work for the
    daemon's clients. SCRAM credentials reach the listener through the metadata log a moment
    after they are stored, so a refused login is retried until ``startup_timeout_s``.
    """
    sasl = cfg.sasl_ssl
    assert sasl is not None and cfg.sasl_ssl_bootstrap is not None
    user = sasl.users[0]
    deadline = time.monotonic() + cfg.startup_timeout_s
    for mechanism in mechanisms:
        settings = KafkaSettings(
            bootstrap_servers=(cfg.sasl_ssl_bootstrap,),
            client_id="factkeeper-broker-probe",
            security_protocol="SASL_SSL",
            sasl_mechanism=mechanism,
            sasl_username=user.name,
            sasl_password=SecretStr(user.password),
            ssl_cafile=sasl.ca_file,
        )
        while True:
            exit_code = _reap(pid)
            if exit_code is not None:
                raise BrokerStartError(
                    f"the Kafka broker exited with code {exit_code} while starting.\n"
                    f"{_log_tails(cfg)}"
                )
            remaining_s = deadline - time.monotonic()
            try:
                check_connection(settings, timeout_s=max(1.0, min(5.0, remaining_s)))
                break
            except KafkaTlsError as exc:  # our own certificate: waiting will not fix it
                raise BrokerStartError(f"the SASL_SSL listener's TLS is broken: {exc}") from exc
            except KafkaConnectError as exc:
                if time.monotonic() >= deadline:
                    raise BrokerStartError(
                        f"{user.name} could not log in with {mechanism} over SASL_SSL on "
                        f"{cfg.sasl_ssl_bootstrap} within {cfg.startup_timeout_s:.0f} s: "
                        f"{exc}\n{_log_tails(cfg)}"
                    ) from exc
            time.sleep(0.2)


def _terminate(pid: int, timeout_s: float) -> None:
    """SIGTERM (Kafka shuts down cleanly), then SIGKILL if it is still alive after timeout_s."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            _reap(pid)
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if _reap(pid) is not None or not _pid_alive(pid):
                return
            time.sleep(0.1)
        if sig == signal.SIGTERM:
            log.warning("Kafka broker (pid %s) ignored SIGTERM for %.0f s; killing it", pid, wait_s)
    raise BrokerStopError(f"the Kafka broker (pid {pid}) is still alive after SIGKILL")


def _reap(pid: int) -> int | None:
    """Collect the exit code if ``pid`` is our exited child; None if running or not ours."""
    try:
        done_pid, wait_status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if done_pid == 0:
        return None
    return os.waitstatus_to_exitcode(wait_status)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _is_our_broker(pid: int, cfg: LocalBrokerConfig) -> bool:
    """Alive, not a zombie, and running ``kafka.Kafka`` on this data dir's properties."""
    _reap(pid)
    if not _pid_alive(pid):
        return False
    if not Path("/proc/self").exists():  # no procfs (macOS): trust the pid file
        return True
    try:
        args = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return b"kafka.Kafka" in args and os.fsencode(cfg.server_properties) in args


def _last_lines(text: str, count: int) -> str:
    return "\n".join(text.strip().splitlines()[-count:])


def _log_tails(cfg: LocalBrokerConfig, count: int = 30) -> str:
    parts = []
    for path in (cfg.console_file, cfg.log_file):
        if path.is_file():
            tail = _last_lines(path.read_text(errors="replace"), count)
            if tail:
                parts.append(f"--- last lines of {path} ---\n{tail}")
    return "\n".join(parts) if parts else f"(no broker output in {cfg.data_dir})"


def free_loopback_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()

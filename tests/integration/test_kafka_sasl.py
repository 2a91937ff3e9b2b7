"""Kafka over SASL_SSL against a real broker: the daemon's clients work with config-only
changes, and a wrong password, an untrusted CA or a non-TLS port fail at once with a typed error.

The module starts its own broker (free ports, its own data dir, a throwaway CA) next to the
session's PLAINTEXT broker and stops it at the end. It offers SCRAM-SHA-512 and PLAIN on one
listener, so both login modules are exercised by one JVM.
"""

from __future__ import annotations

import logging
import shutil
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka.structs import OffsetAndMetadata

from daemon.config import KafkaSettings, load_settings
from daemon.devtools.kafka_broker import (
    BrokerStartError,
    LocalBrokerConfig,
    SaslSslConfig,
    SaslUser,
    local_sasl_ssl,
    sasl_password_file,
    sasl_ssl_client_settings,
    start,
    status,
    stop,
)
from daemon.kafka.clients import (
    BrokerUnavailableError,
    KafkaAuthenticationError,
    KafkaTlsError,
    build_consumer,
    build_producer,
    check_connection,
)
from daemon.logs import configure_logging
from tests.fixtures.kafka import free_loopback_ports

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]

USER = "daemon"
PASSWORD = "daemon-secret-" + uuid.uuid4().hex[:12]
RECORDS = 20
FAIL_FAST_S = 5.0  # a refused login must not wait for kafka-python's 30 s bootstrap timeout


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBrokerConfig]:
    port, controller_port, sasl_port = free_loopback_ports(3)
    cfg = LocalBrokerConfig(
        port=port,
        controller_port=controller_port,
        data_dir=tmp_path_factory.mktemp("kafka-sasl"),
        startup_timeout_s=90.0,
        sasl_ssl=SaslSslConfig(
            users=(SaslUser(USER, PASSWORD),),
            port=sasl_port,
            mechanisms=("SCRAM-SHA-512", "PLAIN"),
        ),
    )
    start(cfg)
    try:
        yield cfg
    finally:
        stop(cfg)


def daemon_settings(cfg: LocalBrokerConfig, topic: str, **overrides: str) -> KafkaSettings:
    """The daemon's settings as an operator would give them: FACTKEEPER_* variables only."""
    env = {"FACTKEEPER_HOME": str(cfg.data_dir / "home")}
    env |= {
        f"FACTKEEPER_KAFKA__{k.upper()}": v for k, v in sasl_ssl_client_settings(cfg, USER).items()
    }
    env |= {
        "FACTKEEPER_KAFKA__SASL_PASSWORD": PASSWORD,
        "FACTKEEPER_KAFKA__TOPICS__CORRECTIONS": topic,
        "FACTKEEPER_KAFKA__GROUP_ID": f"{topic}-group",
    }
    env |= {f"FACTKEEPER_KAFKA__{k.upper()}": v for k, v in overrides.items()}
    return load_settings(None, env=env).kafka


def produce_and_consume(kafka: KafkaSettings, count: int) -> list[bytes]:
    topic = kafka.topics.corrections
    producer = build_producer(kafka)
    try:
        futures = [producer.send(topic, value=f"record-{i}".encode()) for i in range(count)]
        producer.flush(timeout=30)
        assert [f.get(timeout=10).offset for f in futures] == list(range(count))
    finally:
        producer.close()
    consumer = build_consumer(kafka)
    received: list[bytes] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        while len(received) < count and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=500).items():
                received += [r.value for r in records]
                consumer.commit({tp: OffsetAndMetadata(records[-1].offset + 1, "", -1)})
    finally:
        consumer.close(autocommit=False)
    return received


def test_round_trip_over_sasl_ssl_with_scram(sasl_broker: LocalBrokerConfig) -> None:
    kafka = daemon_settings(sasl_broker, f"sasl-scram-{uuid.uuid4().hex[:8]}")
    assert kafka.security_protocol == "SASL_SSL" and kafka.sasl_mechanism == "SCRAM-SHA-512"
    assert kafka.bootstrap_servers == (sasl_broker.sasl_ssl_bootstrap,)
    assert produce_and_consume(kafka, RECORDS) == [f"record-{i}".encode() for i in range(RECORDS)]


def test_round_trip_over_sasl_ssl_with_plain(sasl_broker: LocalBrokerConfig) -> None:
    kafka = daemon_settings(
        sasl_broker, f"sasl-plain-{uuid.uuid4().hex[:8]}", sasl_mechanism="PLAIN"
    )
    assert produce_and_consume(kafka, 3) == [b"record-0", b"record-1", b"record-2"]


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "PLAIN"])
@pytest.mark.parametrize("build", [build_consumer, build_producer])
def test_wrong_password_fails_fast_with_a_clear_error(
    sasl_broker: LocalBrokerConfig, mechanism: str, build: object
) -> None:
    wrong = "not-the-password-" + uuid.uuid4().hex[:8]
    kafka = daemon_settings(sasl_broker, "unused", sasl_password=wrong, sasl_mechanism=mechanism)
    began = time.monotonic()
    with pytest.raises(KafkaAuthenticationError) as caught:
        build(kafka)  # type: ignore[operator]
    took_s = time.monotonic() - began
    assert took_s < FAIL_FAST_S, f"a refused login took {took_s:.1f} s"
    message = str(caught.value)
    assert "refused the SASL login" in message and repr(USER) in message
    assert mechanism in message and "FACTKEEPER_KAFKA__SASL_PASSWORD" in message
    assert wrong not in message and PASSWORD not in message


def test_unknown_user_and_mechanism_without_credentials_are_refused(
    sasl_broker: LocalBrokerConfig,
) -> None:
    with pytest.raises(KafkaAuthenticationError):
        check_connection(daemon_settings(sasl_broker, "unused", sasl_username="mallory"))
    # SCRAM-SHA-256 is not enabled on this listener
    with pytest.raises(KafkaAuthenticationError):
        check_connection(
            daemon_settings(sasl_broker, "unused", sasl_mechanism="SCRAM-SHA-256"), timeout_s=5
        )


def foreign_ca(folder: Path) -> Path:
    """A CA certificate (PEM) that did not sign the broker's: a second throwaway one."""
    keytool = shutil.which("keytool")
    assert keytool, "keytool ships with the JDK the broker runs on"
    store, pem = folder / "foreign.p12", folder / "foreign-ca.pem"
    common = ["-keystore", str(store), "-storepass", "changeit", "-alias", "foreign"]
    subprocess.run(
        [
            keytool,
            "-genkeypair",
            *common,
            "-keyalg",
            "RSA",
            "-keysize",
            "2048",
            "-dname",
            "CN=foreign-test-ca",
            "-ext",
            "bc:c",
            "-validity",
            "2",
            "-storetype",
            "PKCS12",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [keytool, "-exportcert", *common, "-rfc", "-file", str(pem)],
        check=True,
        capture_output=True,
    )
    return pem


def test_untrusted_ca_is_a_tls_error(sasl_broker: LocalBrokerConfig, tmp_path: Path) -> None:
    bundle = foreign_ca(tmp_path)
    began = time.monotonic()
    with pytest.raises(KafkaTlsError, match="not trusted by kafka.ssl_cafile"):
        build_consumer(daemon_settings(sasl_broker, "unused", ssl_cafile=bundle))
    assert time.monotonic() - began < FAIL_FAST_S


def test_sasl_ssl_client_on_the_plaintext_port_is_a_tls_error(
    sasl_broker: LocalBrokerConfig,
) -> None:
    plaintext = daemon_settings(sasl_broker, "unused", bootstrap_servers=sasl_broker.bootstrap)
    began = time.monotonic()
    with pytest.raises(KafkaTlsError, match="is it a TLS"):
        build_producer(plaintext)
    assert time.monotonic() - began < FAIL_FAST_S


def test_unreachable_broker_is_retried_until_the_timeout(sasl_broker: LocalBrokerConfig) -> None:
    [closed_port] = free_loopback_ports(1)
    kafka = daemon_settings(sasl_broker, "unused", bootstrap_servers=f"127.0.0.1:{closed_port}")
    began = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match="could be reached"):
        check_connection(kafka, timeout_s=1.5)
    assert 1.5 <= time.monotonic() - began < 5


def test_secrets_stay_out_of_logs_and_private_files_stay_private(
    sasl_broker: LocalBrokerConfig,
) -> None:
    sasl = sasl_broker.sasl_ssl
    assert sasl is not None and sasl.cert_dir is not None
    wrong = "not-the-password-" + uuid.uuid4().hex[:8]
    with pytest.raises(KafkaAuthenticationError):
        check_connection(daemon_settings(sasl_broker, "x", sasl_password=wrong))
    keystore_password = sasl.keystore_password_file.read_text().strip()
    deadline = time.monotonic() + 10
    while "Failed authentication" not in (logs := _broker_logs(sasl_broker)):
        assert time.monotonic() < deadline, "the refused login never reached the broker log"
        time.sleep(0.2)
    assert wrong not in logs
    for secret in (PASSWORD, keystore_password):
        assert secret not in logs
    assert PASSWORD in sasl_broker.server_properties.read_text()  # PLAIN users live there...
    for private in (sasl_broker.server_properties, sasl.keystore_file, sasl.keystore_password_file):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private  # ...so it is 0600
    assert stat.S_IMODE(sasl.cert_dir.stat().st_mode) == 0o700
    # The throwaway CA's private key is gone: nothing else can be signed by it.
    assert sorted(p.name for p in sasl.cert_dir.iterdir()) == [
        "broker.p12",
        "broker.p12.password",
        "ca.pem",
    ]
    assert "PRIVATE KEY" not in sasl.ca_file.read_text()


def test_daemon_logging_keeps_sasl_passwords_out(
    sasl_broker: LocalBrokerConfig, caplog: pytest.LogCaptureFixture
) -> None:
    # kafka-python logs request bytes at DEBUG, and a PLAIN login's bytes hold the password;
    # the daemon's logging keeps the kafka loggers at WARNING even under --log-level DEBUG.
    root, kafka_logger = logging.getLogger(), logging.getLogger("kafka")
    saved = (root.level, kafka_logger.level, list(root.handlers))
    try:
        configure_logging("DEBUG")
        caplog.set_level(logging.DEBUG)
        wrong = "not-the-password-" + uuid.uuid4().hex[:8]
        check_connection(daemon_settings(sasl_broker, "x", sasl_mechanism="PLAIN"))
        with pytest.raises(KafkaAuthenticationError):
            check_connection(
                daemon_settings(sasl_broker, "x", sasl_mechanism="PLAIN", sasl_password=wrong)
            )
    finally:  # leave the session's logging as it was
        root.setLevel(saved[0])
        kafka_logger.setLevel(saved[1])
        root.handlers[:] = saved[2]
    assert caplog.records  # kafka-python did log the refused login, without the password
    assert PASSWORD not in caplog.text and wrong not in caplog.text


def test_start_again_rotates_scram_password_and_refuses_a_missing_listener(
    sasl_broker: LocalBrokerConfig,
) -> None:
    sasl = sasl_broker.sasl_ssl
    assert sasl is not None
    rotated_password = "rotated-secret-" + uuid.uuid4().hex[:8]
    rotated = LocalBrokerConfig(
        port=sasl_broker.port,
        controller_port=sasl_broker.controller_port,
        data_dir=sasl_broker.data_dir,
        sasl_ssl=SaslSslConfig(
            users=(SaslUser(USER, rotated_password),), port=sasl.port, mechanisms=("SCRAM-SHA-512",)
        ),
    )
    pid = status(sasl_broker).pid
    try:
        assert start(rotated).pid == pid  # same JVM: credentials changed while it runs
        check_connection(daemon_settings(sasl_broker, "unused", sasl_password=rotated_password))
        with pytest.raises(KafkaAuthenticationError):
            check_connection(daemon_settings(sasl_broker, "unused"))  # the old password
    finally:
        start(sasl_broker)  # back to PASSWORD for the other tests
    check_connection(daemon_settings(sasl_broker, "unused"))

    moved = LocalBrokerConfig(
        port=sasl_broker.port,
        controller_port=sasl_broker.controller_port,
        data_dir=sasl_broker.data_dir,
        sasl_ssl=SaslSslConfig(users=sasl.users, port=free_loopback_ports(1)[0]),
    )
    with pytest.raises(BrokerStartError, match="without a SASL_SSL listener"):
        start(moved)
    assert status(sasl_broker).pid == pid  # and the running broker was left alone


# -- no broker needed --------------------------------------------------------------------------


def test_local_sasl_ssl_keeps_one_private_password(tmp_path: Path) -> None:
    first = local_sasl_ssl(tmp_path, user="factkeeper")
    again = local_sasl_ssl(tmp_path, user="factkeeper")
    password_file = sasl_password_file(tmp_path, "factkeeper")
    assert first.users == again.users and len(first.users[0].password) >= 24
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert first.users[0].password not in repr(first)


def test_client_settings_are_valid_daemon_settings_without_the_password(tmp_path: Path) -> None:
    cfg = LocalBrokerConfig(port=19092, data_dir=tmp_path, sasl_ssl=local_sasl_ssl(tmp_path))
    settings = sasl_ssl_client_settings(cfg, "factkeeper")
    assert settings["bootstrap_servers"] == "127.0.0.1:19094"
    assert Path(settings["ssl_cafile"]) == tmp_path / "tls" / "ca.pem"
    assert cfg.sasl_ssl is not None
    assert cfg.sasl_ssl.users[0].password not in str(settings)
    KafkaSettings(**settings, sasl_password=cfg.sasl_ssl.users[0].password)  # validates


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"users": ()}, "at least one user"),
        ({"users": (SaslUser("a", "x" * 12), SaslUser("a", "y" * 12))}, "unique"),
        ({"mechanisms": ("GSSAPI",)}, "mechanism"),
        ({"mechanisms": ()}, "mechanisms"),
        ({"cert_validity_days": 0}, "cert_validity_days"),
    ],
)
def test_sasl_ssl_config_rejects_bad_values(kwargs: dict[str, object], match: str) -> None:
    base: dict[str, object] = {"users": (SaslUser("a", "x" * 12),)}
    with pytest.raises(ValueError, match=match):
        SaslSslConfig(**(base | kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "password"),
    [("bad name", "x" * 12), ("a", "short"), ("a", 'has"quote-123'), ("a", "back\\slash-123")],
)
def test_sasl_user_rejects_names_and_passwords_that_break_jaas(name: str, password: str) -> None:
    with pytest.raises(ValueError) as caught:
        SaslUser(name, password)
    assert password not in str(caught.value)


def _broker_logs(cfg: LocalBrokerConfig) -> str:
    return cfg.log_file.read_text(errors="replace") + cfg.console_file.read_text(errors="replace")


def test_sasl_port_defaults_and_clashes() -> None:
    user = (SaslUser("a", "x" * 12),)
    assert LocalBrokerConfig(port=19092, sasl_ssl=SaslSslConfig(user)).sasl_ssl_bootstrap == (
        "127.0.0.1:19094"
    )
    with pytest.raises(ValueError, match="sasl_ssl port"):
        LocalBrokerConfig(port=19092, sasl_ssl=SaslSslConfig(user, port=19093))
    assert LocalBrokerConfig(port=19092).sasl_ssl_bootstrap is None

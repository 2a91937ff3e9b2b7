"""kafka-python clients built from the settings, with the settings a seconds-long edit needs.

Auto-commit is off (offsets are committed only after the journal row is durable), the consumer
starts from the earliest offset (a correction stream must not skip history), and the producer
keeps kafka-python 3's idempotent ``acks=all`` defaults for the DLQ and quarantine topics.

With TLS or SASL, a client is built only after ``check_connection`` opened one connection the
way the client will. kafka-python 3 retries a refused login until its bootstrap timeout and
then raises a bare ``KafkaTimeoutError`` ("Unable to bootstrap"), and over TLS the broker often
just closes the socket instead of answering with ``SaslAuthenticationFailedError``; the check
instead walks the stages (TCP, TLS, Kafka + SASL) and names the one that failed, within a second.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError, SaslAuthenticationFailedError, TopicAlreadyExistsError
from kafka.net.manager import KafkaConnectionManager
from kafka.net.selector import NetworkSelector

from daemon.config import KafkaSettings
from daemon.errors import DaemonError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30.0
"""How long ``check_connection`` waits for an unreachable broker (kafka-python's bootstrap)."""
_ATTEMPT_TIMEOUT_S = 10.0
_RETRY_PAUSE_S = 0.5


class KafkaConnectError(DaemonError):
    """No connection to the brokers could be opened with the configured security settings."""


class BrokerUnavailableError(KafkaConnectError):
    """No bootstrap broker accepted a connection before the timeout."""


class KafkaTlsError(KafkaConnectError):
    """The TLS handshake failed: untrusted certificate, wrong host name, or not a TLS port."""


class KafkaAuthenticationError(KafkaConnectError):
    """The broker refused the SASL login (wrong user or password, or an unknown mechanism)."""


def security_options(kafka: KafkaSettings) -> dict[str, Any]:
    """TLS and SASL options, only those the chosen protocol uses."""
    options: dict[str, Any] = {"security_protocol": kafka.security_protocol}
    if kafka.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = kafka.sasl_mechanism
        options["sasl_plain_username"] = kafka.sasl_username
        password = kafka.sasl_password
        options["sasl_plain_password"] = password.get_secret_value() if password else None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_cafile"] = str(kafka.ssl_cafile) if kafka.ssl_cafile else None
        options["ssl_certfile"] = str(kafka.ssl_certfile) if kafka.ssl_certfile else None
        options["ssl_keyfile"] = str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None
    return options


def build_consumer(kafka: KafkaSettings) -> KafkaConsumer:
    """A group consumer, not yet subscribed (the daemon subscribes with its rebalance listener).

    Raises:
        KafkaConnectError: (TLS or SASL only) see ``check_connection``.
    """
    _check_secured(kafka)
    return KafkaConsumer(
        bootstrap_servers=list(kafka.bootstrap_servers),
        group_id=kafka.group_id,
        client_id=kafka.client_id,
        group_instance_id=kafka.group_instance_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_interval_ms=kafka.max_poll_interval_ms,
        session_timeout_ms=kafka.session_timeout_ms,
        **security_options(kafka),
    )


def build_producer(kafka: KafkaSettings) -> KafkaProducer:
    """Idempotent, acks=all (kafka-python 3 defaults): a DLQ record is never silently lost.

    Raises:
        KafkaConnectError: (TLS or SASL only) see ``check_connection``.
    """
    _check_secured(kafka)
    return KafkaProducer(
        bootstrap_servers=list(kafka.bootstrap_servers),
        client_id=f"{kafka.client_id}-producer",
        linger_ms=5,
        **security_options(kafka),
    )


def ensure_topics(
    kafka: KafkaSettings, partitions: int | None = None, replication: int | None = None
) -> list[str]:
    """Create whichever of the four topics is missing; returns the names it created.

    A daemon started before its topics exist (a fresh cluster whose brokers do not auto-create
    topics) would otherwise wait, unassigned, for someone else to create them. Partitions and
    replication default to ``kafka.topic_partitions`` / ``kafka.topic_replication_factor``.
    Another client creating a topic at the same moment is fine (``TopicAlreadyExistsError``).

    Raises:
        KafkaError: the brokers could not be reached or refused the creation (no ACL).
    """
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    partitions = kafka.topic_partitions if partitions is None else partitions
    replication = kafka.topic_replication_factor if replication is None else replication
    _check_secured(kafka)
    t = kafka.topics
    wanted = [t.corrections, t.dlq, t.control, t.quarantine]
    admin = KafkaAdminClient(
        bootstrap_servers=list(kafka.bootstrap_servers),
        client_id=f"{kafka.client_id}-admin",
        **security_options(kafka),
    )
    try:
        existing = set(admin.list_topics())
        created = []
        for name in (n for n in wanted if n not in existing):
            try:
                admin.create_topics([NewTopic(name, partitions, replication)])
            except TopicAlreadyExistsError:
                continue
            created.append(name)
        if created:
            log.info(
                "created topics",
                extra={"topics": created, "partitions": partitions, "replication": replication},
            )
        return created
    finally:
        admin.close()


def _check_secured(kafka: KafkaSettings) -> None:
    # PLAINTEXT keeps kafka-python's own behaviour (wait for the broker, then time out).
    if kafka.security_protocol != "PLAINTEXT":
        check_connection(kafka)


def check_connection(kafka: KafkaSettings, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Open one connection to a bootstrap broker as the clients will, or say what failed.

    Stages, per server: TCP connect, TLS handshake (SSL, SASL_SSL), then kafka-python's own
    connection setup (ApiVersions and the SASL login). An unreachable broker is retried until
    ``timeout_s`` (it may still be starting); a TLS or login failure is final and raised at once.

    Raises:
        BrokerUnavailableError: no bootstrap server accepted a connection within ``timeout_s``.
        KafkaTlsError: the handshake failed (the message names ``ssl_cafile`` and the cause).
        KafkaAuthenticationError: the broker refused the SASL login of ``sasl_username``.
    """
    deadline = time.monotonic() + timeout_s
    last_problem = "no attempt made"
    while True:
        for server in kafka.bootstrap_servers:
            problem = _try_server(kafka, server, deadline)
            if problem is None:
                return
            last_problem = problem
        if time.monotonic() >= deadline:
            raise BrokerUnavailableError(
                f"no Kafka broker of {', '.join(kafka.bootstrap_servers)} could be reached "
                f"within {timeout_s:.0f} s ({last_problem}); check kafka.bootstrap_servers and "
                "that the brokers run (locally: `factkeeper kafka start`)."
            )
        time.sleep(_RETRY_PAUSE_S)


def _try_server(kafka: KafkaSettings, server: str, deadline: float) -> str | None:
    """None if ``server`` let us in; a reason if it was unreachable; raises on TLS or login."""
    host, _, port = server.rpartition(":")
    host = host.strip("[]")  # an IPv6 literal, [::1]:9093
    attempt_s = max(0.5, min(_ATTEMPT_TIMEOUT_S, deadline - time.monotonic()))
    try:
        sock = socket.create_connection((host, int(port)), timeout=attempt_s)
    except OSError as exc:
        return f"{server}: {exc.strerror or exc}"
    with sock:
        if kafka.security_protocol in ("SSL", "SASL_SSL"):
            _check_tls(kafka, server, host, sock)
    failure = _kafka_handshake(kafka, server, attempt_s)
    if failure is None:
        return None
    # TCP (and TLS) just worked, so a dropped connection is the broker refusing the login:
    # over TLS it usually closes the socket rather than answer SaslAuthenticationFailedError.
    refused = isinstance(failure, SaslAuthenticationFailedError) or (
        kafka.security_protocol.startswith("SASL_") and not isinstance(failure, TimeoutError)
    )
    if refused:
        raise KafkaAuthenticationError(
            f"the Kafka broker at {server} refused the SASL login of user "
            f"{kafka.sasl_username!r} with {kafka.sasl_mechanism} ({_describe(failure)}): the "
            "password is wrong, the user has no credentials for this mechanism, or the listener "
            "does not use SASL; check kafka.sasl_username, kafka.sasl_mechanism and "
            "FACTKEEPER_KAFKA__SASL_PASSWORD."
        )
    return f"{server}: {_describe(failure)}"


def _check_tls(kafka: KafkaSettings, server: str, host: str, sock: socket.socket) -> None:
    """The handshake kafka-python will make (same context settings), with a readable failure."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if kafka.ssl_cafile:
            context.load_verify_locations(str(kafka.ssl_cafile))
        else:
            context.load_default_certs()
        if kafka.ssl_certfile:
            context.load_cert_chain(str(kafka.ssl_certfile), str(kafka.ssl_keyfile))
    except (OSError, ssl.SSLError) as exc:
        raise KafkaTlsError(
            f"cannot load the TLS files (kafka.ssl_cafile / ssl_certfile / ssl_keyfile): {exc}"
        ) from None
    trust = f"kafka.ssl_cafile {kafka.ssl_cafile}" if kafka.ssl_cafile else "the system CAs"
    try:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            tls.do_handshake()
    except ssl.SSLCertVerificationError as exc:
        raise KafkaTlsError(
            f"the TLS certificate of the Kafka broker at {server} is not trusted by {trust}: "
            f"{exc.verify_message}; point kafka.ssl_cafile at the CA that signed it."
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise KafkaTlsError(
            f"the TLS handshake with the Kafka broker at {server} failed ({exc}); is it a TLS "
            "(SSL or SASL_SSL) listener?"
        ) from None


def _kafka_handshake(kafka: KafkaSettings, server: str, timeout_s: float) -> Exception | None:
    """kafka-python's connection setup to ``server`` (ApiVersions, then the SASL login).

    Uses the connection layer the clients use, but without their bootstrap loop, which would
    retry a refused login until its timeout. Returns the failure, or None once logged in.
    """
    config = {"bootstrap_servers": [server], "client_id": f"{kafka.client_id}-check"}
    config.update(security_options(kafka))
    net = NetworkSelector(**config)
    manager = KafkaConnectionManager(net, **config)
    try:
        node_id = manager.cluster.bootstrap_brokers()[0].node_id
        connection = manager.get_connection(node_id, timeout_ms=int(timeout_s * 1000))
        net.poll(timeout_ms=int(timeout_s * 1000), future=connection.init_future)
        future = connection.init_future
        if not future.is_done:
            return TimeoutError(f"no answer within {timeout_s:.0f} s")
        if future.failed():
            return future.exception
        return None
    except KafkaError as exc:
        return exc
    finally:
        manager.close()
        net.close()


def _describe(exc: BaseException) -> str:
    text, name = str(exc), type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}" if text else name

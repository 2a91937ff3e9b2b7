"""The daemon against the real broker: corrections in, edits applied, journal and offsets agree.

A tiny llama saved as a local folder plays the model (the daemon loads it exactly as it would
load SmolLM2's cache), and the editor is FT-L with bounds loosened for a 32-wide random model
(its logits are too flat for SmolLM2's settings): most edits take, some fail and go to the DLQ,
which these tests also need.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from transformers import AutoModelForCausalLM

from daemon.applier import EditApplier
from daemon.config import load_settings
from daemon.journal import Journal
from daemon.service import Daemon, replay_journal
from editing.editors import get_editor
from editing.generation import greedy_generate
from editing.models import load_model
from editing.tiny import tiny_config, tiny_tokenizer
from tests.daemon.builders import event_dict, to_bytes

pytestmark = pytest.mark.kafka

TARGETS = ["Paris", "Rome", "Madrid", "Berlin", "Tokyo", "Guitar"]


FT_OPTIONS = {"norm_constraint": 1.0, "lr": 0.05, "num_steps": 60, "stop_nll": 0.1, "layer": 3}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = tiny_config("llama")
    config.initializer_range = 0.1  # sharper logits than the default 0.02, so edits can take
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "factkeeper.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"editor": {"method": "ft", "options": FT_OPTIONS}}))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path, bootstrap: str, topic: str, model_dir: Path, **extra: str) -> dict:
    env = {
        "FACTKEEPER_HOME": str(tmp_path / "home"),
        "FACTKEEPER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "FACTKEEPER_KAFKA__TOPICS__CORRECTIONS": topic,
        "FACTKEEPER_KAFKA__TOPICS__DLQ": f"{topic}.dlq",
        "FACTKEEPER_KAFKA__TOPICS__CONTROL": f"{topic}.control",
        "FACTKEEPER_KAFKA__TOPICS__QUARANTINE": f"{topic}.quarantine",
        "FACTKEEPER_KAFKA__GROUP_ID": f"{topic}-group",
        "FACTKEEPER_MODEL__NAME": str(model_dir),
        "FACTKEEPER_BATCHING__MAX_SIZE": "1",
        "FACTKEEPER_BATCHING__LINGER_MS": "50",
        "FACTKEEPER_METRICS__HOST": "127.0.0.1",
        "FACTKEEPER_METRICS__PORT": str(_free_port()),
        # Versioning off unless a test turns it on: the registry costs seconds per fresh home.
        "FACTKEEPER_SNAPSHOTS__EVERY_N_EDITS": "0",
        "FACTKEEPER_SNAPSHOTS__EVERY_MINUTES": "0",
        "FACTKEEPER_SNAPSHOTS__ON_SHUTDOWN": "false",
    }
    env.update(extra)
    return env


def _fact(i: int) -> dict:
    subject = f"Zorblax{i}"
    return event_dict(
        f"fact:{i}",
        subject=subject,
        prompt=f"The capital of {subject} is",
        target_new=TARGETS[i % len(TARGETS)],
        target_old=None,
        rephrases=[],
        locality_probes=[],
    )


def _produce(bootstrap: str, topic: str, payloads: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for payload in payloads:
        producer.send(topic, value=payload)
    producer.flush()
    producer.close()


def _committed(bootstrap: str, group: str, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return consumer.committed(TopicPartition(topic, 0)) or 0
    finally:
        consumer.close(autocommit=False)


def _dlq(bootstrap: str, topic: str, expected: int, timeout_s: float = 20.0) -> list:
    consumer = KafkaConsumer(
        f"{topic}.dlq",
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    records: list = []
    deadline = time.monotonic() + timeout_s
    while len(records) < expected and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    consumer.close()
    return records


def _create_topics(bootstrap: str, topic: str) -> None:
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    names = [topic, f"{topic}.dlq", f"{topic}.control", f"{topic}.quarantine"]
    admin.create_topics([NewTopic(n, 1, 1) for n in names])
    admin.close()


def _daemon(env: dict) -> Daemon:
    home = Path(env["FACTKEEPER_HOME"])
    return Daemon(load_settings(_config_file(home), env=env), serve_metrics=False)


def test_corrections_are_applied_journaled_and_committed(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    _create_topics(kafka_broker, kafka_topic)
    n = 40
    duplicate = to_bytes(_fact(3))
    malformed = [
        b"{not json",
        to_bytes({**_fact(900), "target_new": 7}),
        to_bytes({**_fact(901), "prompt": "x" * 5000}),
        to_bytes({**_fact(902), "subject": "Nobody"}),
        b'{"schema": "fact-correction/v1", "id": "bad-utf8", "prompt": "\xff\xfe"}',
    ]
    payloads = [to_bytes(_fact(i)) for i in range(n)]
    stream = payloads[:10] + malformed[:3] + payloads[10:20] + [duplicate] + malformed[3:]
    stream += payloads[20:]
    _produce(kafka_broker, kafka_topic, stream)

    env = _env(tmp_path, kafka_broker, kafka_topic, tiny_model_dir)
    daemon = _daemon(env)
    stats = daemon.run(idle_timeout_s=3.0, handle_signals=False)
    try:
        counts = daemon.journal.counts_by_status()
        assert stats.consumed == len(stream)
        assert counts["invalid"] == len(malformed)
        assert counts["duplicate"] == 1
        assert counts["applied"] + counts["failed"] == n
        assert counts["applied"] >= n // 2, counts
        assert daemon.journal.last_offsets()[(kafka_topic, 0)] == len(stream) - 1
        assert _committed(kafka_broker, f"{kafka_topic}-group", kafka_topic) == len(stream)

        # The newest applied fact is what the model now says.
        last = daemon.journal.applied_events()[-1].event
        [answer] = greedy_generate(daemon.lm.model, daemon.lm.tokenizer, [last.prompt], 4)
        assert answer.lstrip().startswith(last.target_new)
    finally:
        daemon.close()

    dlq = _dlq(kafka_broker, kafka_topic, len(malformed) + counts["failed"])
    reasons = sorted(dict(r.headers)["factkeeper.reason"].decode() for r in dlq)
    for expected in ("invalid-json", "schema-violation", "subject-not-in-prompt", "invalid-utf8"):
        assert expected in reasons, reasons
    assert {r.value for r in dlq} >= set(malformed[:4])  # the original bytes, unchanged


def test_sigterm_mid_stream_loses_nothing(kafka_broker, kafka_topic, tiny_model_dir, tmp_path):
    _create_topics(kafka_broker, kafka_topic)
    n = 30
    _produce(kafka_broker, kafka_topic, [to_bytes(_fact(i)) for i in range(n)])
    env = _env(tmp_path, kafka_broker, kafka_topic, tiny_model_dir)

    daemon = _daemon(env)
    stopper = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    stopper.start()
    try:
        first = daemon.run(idle_timeout_s=5.0)
    finally:
        stopper.cancel()
        daemon.close()
    assert 0 < first.consumed < n, "the stop should land mid-stream"

    daemon = _daemon(env)  # restart: replays the journal, resumes from the committed offset
    try:
        second = daemon.run(idle_timeout_s=3.0, handle_signals=False)
        counts = daemon.journal.counts_by_status()
        assert first.consumed + second.consumed == n
        assert counts["applied"] + counts["failed"] == n
        assert counts["duplicate"] == 0
        assert _committed(kafka_broker, f"{kafka_topic}-group", kafka_topic) == n
    finally:
        daemon.close()


def _weights_after_replay(journal_path: Path, model_dir: Path) -> dict[str, torch.Tensor]:
    lm = load_model(str(model_dir))
    with Journal.open(journal_path, create=False) as journal:
        replay_journal(EditApplier(lm, get_editor("ft", **FT_OPTIONS)), journal)
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def test_kill_9_then_restart_equals_an_uninterrupted_run(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    _create_topics(kafka_broker, kafka_topic)
    n = 30
    _produce(kafka_broker, kafka_topic, [to_bytes(_fact(i)) for i in range(n)])

    # A short session timeout lets the group drop the killed member quickly.
    crashed_env = _env(
        tmp_path / "crashed",
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_KAFKA__SESSION_TIMEOUT_MS="6000",
    )
    config = _config_file(Path(crashed_env["FACTKEEPER_HOME"]))
    cmd = [
        sys.executable,
        "-m",
        "daemon.cli",
        "run",
        "--config",
        str(config),
        "--idle-timeout",
        "4",
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, **crashed_env}, stderr=subprocess.PIPE)
    journal_path = Path(crashed_env["FACTKEEPER_HOME"]) / "state" / "journal.sqlite3"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once some, not all, events are journaled
        if journal_path.exists():
            with Journal.open(journal_path, create=False) as journal:
                if 5 <= journal.last_seq() < n:
                    break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    done = subprocess.run(cmd, env={**os.environ, **crashed_env}, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    with Journal.open(journal_path, create=False) as journal:
        rows = journal.applied_events()
        ids = [e.event_id for e in rows]
        assert len(ids) == len(set(ids)), "an event was applied twice"
        counts = journal.counts_by_status()
        assert counts["applied"] + counts["failed"] == n

    clean_env = _env(
        tmp_path / "clean",
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_KAFKA__GROUP_ID=f"{kafka_topic}-clean",
    )
    clean = _daemon(clean_env)
    try:
        clean.run(idle_timeout_s=3.0, handle_signals=False)
        expected = {k: v.clone() for k, v in clean.lm.model.state_dict().items()}
    finally:
        clean.close()

    recovered = _weights_after_replay(journal_path, tiny_model_dir)
    worst = max(float((recovered[k] - expected[k]).abs().max()) for k in expected)
    assert worst == 0.0, f"max abs diff {worst}"
    assert json.loads(done.stdout.decode().strip().splitlines()[-1])["consumed"] >= 1


def test_restart_restores_the_newest_snapshot_and_replays_only_after_it(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    _create_topics(kafka_broker, kafka_topic)
    n = 12
    _produce(kafka_broker, kafka_topic, [to_bytes(_fact(i)) for i in range(n)])
    env = _env(
        tmp_path,
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_SNAPSHOTS__EVERY_N_EDITS="5",
        FACTKEEPER_SNAPSHOTS__ON_SHUTDOWN="true",
    )
    first = _daemon(env)
    try:
        first.run(idle_timeout_s=3.0, handle_signals=False)
        weights = {k: v.clone() for k, v in first.lm.model.state_dict().items()}
        versions = first.versions.registry.versions()
        applied = first.journal.counts_by_status()["applied"]
    finally:
        first.close()
    assert applied >= 5
    assert len(versions) >= 2  # at least one scheduled snapshot and the one at shutdown
    newest = versions[0]
    assert "candidate" in newest.aliases
    assert int(newest.tags["journal_seq"]) == n
    assert newest.tags["parent_version"] == versions[1].version

    second = _daemon(env)
    try:
        assert second.restored.version == newest.version
        assert second.replay.events == 0
        for name, value in second.lm.model.state_dict().items():
            assert torch.equal(value, weights[name]), name
    finally:
        second.close()

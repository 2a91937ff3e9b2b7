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
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from daemon.ingest.applier import EditApplier
from daemon.records.journal import Journal
from daemon.service import replay_journal
from editing.generation import greedy_generate
from editing.models import load_model
from editing.registry import get_editor
from tests.daemon.builders import to_bytes
from tests.daemon.harness import (
    FT_OPTIONS,
    committed,
    config_file,
    create_topics,
    daemon_from_env,
    dlq_records,
    env_for,
    fact,
    produce,
)

pytestmark = pytest.mark.kafka


def test_corrections_are_applied_journaled_and_committed(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    n = 24
    duplicate = to_bytes(fact(3))
    malformed = [
        b"{not json",
        to_bytes({**fact(900), "target_new": 7}),
        to_bytes({**fact(901), "prompt": "x" * 5000}),
        to_bytes({**fact(902), "subject": "Nobody"}),
        b'{"schema": "fact-correction/v1", "id": "bad-utf8", "prompt": "\xff\xfe"}',
    ]
    payloads = [to_bytes(fact(i)) for i in range(n)]
    stream = payloads[:10] + malformed[:3] + payloads[10:20] + [duplicate] + malformed[3:]
    stream += payloads[20:]
    produce(kafka_broker, kafka_topic, stream)

    env = env_for(tmp_path, kafka_broker, kafka_topic, tiny_model_dir)
    daemon = daemon_from_env(env)
    stats = daemon.run(idle_timeout_s=3.0, handle_signals=False)
    try:
        counts = daemon.journal.counts_by_status()
        assert stats.consumed == len(stream)
        assert counts["invalid"] == len(malformed)
        assert counts["duplicate"] == 1
        assert counts["applied"] + counts["failed"] == n
        assert counts["applied"] >= n // 2, counts
        assert daemon.journal.last_offsets()[(kafka_topic, 0)] == len(stream) - 1
        assert committed(kafka_broker, f"{kafka_topic}-group", kafka_topic) == len(stream)

        # The newest applied fact is what the model now says.
        last = daemon.journal.applied_events()[-1].event
        [answer] = greedy_generate(daemon.lm.model, daemon.lm.tokenizer, [last.prompt], 4)
        assert answer.lstrip().startswith(last.target_new)
    finally:
        daemon.close()

    dlq = dlq_records(kafka_broker, kafka_topic, len(malformed) + counts["failed"])
    reasons = sorted(dict(r.headers)["factkeeper.reason"].decode() for r in dlq)
    for expected in ("invalid-json", "schema-violation", "subject-not-in-prompt", "invalid-utf8"):
        assert expected in reasons, reasons
    assert {r.value for r in dlq} >= set(malformed[:4])  # the original bytes, unchanged


def test_sigterm_mid_stream_loses_nothing(kafka_broker, kafka_topic, tiny_model_dir, tmp_path):
    create_topics(kafka_broker, kafka_topic)
    n = 20
    produce(kafka_broker, kafka_topic, [to_bytes(fact(i)) for i in range(n)])
    env = env_for(tmp_path, kafka_broker, kafka_topic, tiny_model_dir)

    daemon = daemon_from_env(env)
    stopper = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    stopper.start()
    try:
        first = daemon.run(idle_timeout_s=5.0)
    finally:
        stopper.cancel()
        daemon.close()
    assert 0 < first.consumed < n, "the stop should land mid-stream"

    daemon = daemon_from_env(env)  # restart: replays the journal, resumes from the committed offset
    try:
        second = daemon.run(idle_timeout_s=3.0, handle_signals=False)
        counts = daemon.journal.counts_by_status()
        assert first.consumed + second.consumed == n
        assert counts["applied"] + counts["failed"] == n
        assert counts["duplicate"] == 0
        assert committed(kafka_broker, f"{kafka_topic}-group", kafka_topic) == n
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
    create_topics(kafka_broker, kafka_topic)
    n = 16
    produce(kafka_broker, kafka_topic, [to_bytes(fact(i)) for i in range(n)])

    # A short session timeout lets the group drop the killed member quickly.
    crashed_env = env_for(
        tmp_path / "crashed",
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_KAFKA__SESSION_TIMEOUT_MS="6000",
    )
    config = config_file(Path(crashed_env["FACTKEEPER_HOME"]))
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

    clean_env = env_for(
        tmp_path / "clean",
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_KAFKA__GROUP_ID=f"{kafka_topic}-clean",
    )
    clean = daemon_from_env(clean_env)
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
    create_topics(kafka_broker, kafka_topic)
    n = 12
    produce(kafka_broker, kafka_topic, [to_bytes(fact(i)) for i in range(n)])
    env = env_for(
        tmp_path,
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_SNAPSHOTS__EVERY_N_EDITS="5",
        FACTKEEPER_SNAPSHOTS__ON_SHUTDOWN="true",
    )
    first = daemon_from_env(env)
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

    second = daemon_from_env(env)
    try:
        assert second.restored.version == newest.version
        assert second.replay.events == 0
        for name, value in second.lm.model.state_dict().items():
            assert torch.equal(value, weights[name]), name
    finally:
        second.close()

"""Audits on a running daemon: a passing gate promotes, a destructive edit is rolled back.

The destructive edit comes through a test editor: FT-L computed on weights that also carry a
large random perturbation of an MLP, so the edit passes its post-check (the target is the greedy
answer) while unrelated answers change: exactly what the post-check cannot see and the audit
must. It runs on SmolLM2 with a 24-probe set: a random tiny model has no knowledge to lose, so
its locality and perplexity cannot tell a normal edit from a destructive one (we measured that).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from kafka import KafkaConsumer

from daemon.config import load_settings
from daemon.kafka.produce import events_from_requests
from daemon.service import Daemon
from editing.datasets import load_dataset
from editing.editors.base import Editor, write_deltas
from editing.models import LoadedModel
from editing.paths import Paths
from editing.registry import get_editor
from editing.requests import EditRequest
from monitoring.probes.load import bundled_probe_path
from tests.daemon.harness import config_file, create_topics, env_for, produce

pytestmark = pytest.mark.kafka


class DestructiveEditor(Editor):
    """FT-L plus a big perturbation of layer 1's MLP, computed so the edit itself still takes."""

    name = "destructive"
    supports_batch = True

    def __init__(self) -> None:
        self.inner = get_editor("ft")

    def compute_deltas(
        self, lm: LoadedModel, requests: Sequence[EditRequest]
    ) -> dict[str, torch.Tensor]:
        name = lm.adapter.weight_name(lm.adapter.roles()[-1], 10)
        weight = dict(lm.model.named_parameters())[name]
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(weight.shape, generator=generator) * 3 * weight.detach().abs().mean()
        previous = write_deltas(lm.model, {name: noise})
        try:
            deltas = self.inner.compute_deltas(lm, requests)
        finally:
            with torch.no_grad():
                weight.copy_(previous[name])
        deltas[name] = deltas.get(name, torch.zeros_like(noise)) + noise
        return deltas


def _ids(payloads: list[bytes]) -> list[str]:
    return [json.loads(p)["id"] for p in payloads]


class Spy:
    """Records when edits and audits run, to prove they never overlap."""

    def __init__(self) -> None:
        self.active: set[str] = set()
        self.overlaps: list[set[str]] = []
        self.audits = 0

    def wrap(self, obj: object, attr: str, label: str) -> None:
        original = getattr(obj, attr)

        def wrapped(*args, **kwargs):
            if self.active:
                self.overlaps.append({*self.active, label})
            self.active.add(label)
            try:
                return original(*args, **kwargs)
            finally:
                self.active.discard(label)
                if label == "audit":
                    self.audits += 1

        setattr(obj, attr, wrapped)


def _daemon(env: dict, paths: Paths, editor: Editor | None = None) -> Daemon:
    """SmolLM2 from the machine's model cache; FT-L with its SmolLM2 defaults."""
    settings = load_settings(config_file(Path(env["FACTKEEPER_HOME"]), editor_options={}), env=env)
    return Daemon(settings, editor=editor, serve_metrics=False, paths=paths)


def _corrections(start: int, stop: int) -> list[bytes]:
    requests = load_dataset("counterfact", "eval", limit=stop)[start:stop]
    return events_from_requests(requests, source="counterfact/eval")


@pytest.mark.smollm2
def test_gate_promotes_good_versions_and_rolls_back_a_destructive_edit(
    kafka_broker, kafka_topic, smollm2_paths, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    probes = tmp_path / "probes.jsonl"
    lines = bundled_probe_path().read_text().splitlines()[:24]
    probes.write_text("\n".join(lines) + "\n")
    env = env_for(
        tmp_path,
        kafka_broker,
        kafka_topic,
        "smollm2",
        FACTKEEPER_SNAPSHOTS__EVERY_N_EDITS="2",
        FACTKEEPER_AUDIT__EVERY_N_EDITS="2",
        FACTKEEPER_AUDIT__PROBE_SET=str(probes),
        # Measured on these probes: two FT-L edits keep locality 0.71 and move perplexity by
        # 0.03; the destructive edit leaves 0.17 and 2.2.
        FACTKEEPER_AUDIT__RETENTION_FLOOR="0",
        FACTKEEPER_AUDIT__LOCALITY_FLOOR="0.5",
        FACTKEEPER_AUDIT__MAX_DROP="1",
        FACTKEEPER_AUDIT__MAX_PERPLEXITY_DRIFT="0.5",
    )
    produce(kafka_broker, kafka_topic, _corrections(0, 2))
    daemon = _daemon(env, smollm2_paths)
    spy = Spy()
    spy.wrap(daemon.applier, "apply", "edit")
    spy.wrap(daemon.audits, "run", "audit")
    try:
        daemon.run(idle_timeout_s=3.0, handle_signals=False)
        good = daemon.versions.production()
        applied_good = {e.event_id for e in daemon.journal.applied_events()}
    finally:
        daemon.close()
    assert spy.audits >= 1 and not spy.overlaps
    assert good is not None, "a normal stream should pass the gate and move production"

    produce(kafka_broker, kafka_topic, _corrections(2, 4))
    # Audit after every edit now: each destructive edit that passes its post-check is judged.
    daemon = _daemon(
        {**env, "FACTKEEPER_AUDIT__EVERY_N_EDITS": "1"}, smollm2_paths, DestructiveEditor()
    )
    try:
        daemon.run(idle_timeout_s=3.0, handle_signals=False)
        production_after = daemon.versions.production()
        expected, _ = daemon.versions.read(good)
        params = dict(daemon.lm.model.named_parameters())
        weights_match = all(torch.equal(params[n], v) for n, v in expected.items())
        statuses = {e.event_id: e.status for e in map(daemon.journal.get, _ids(_corrections(2, 4)))}
        applied_now = {e.event_id for e in daemon.journal.applied_events()}
        rollbacks = daemon.metrics.rollbacks.labels(reason="audit-gate")._value.get()
    finally:
        daemon.close()

    quarantined = sorted(i for i, status in statuses.items() if status == "quarantined")
    assert quarantined, "at least one destructive edit must pass its post-check"
    assert set(statuses.values()) <= {"quarantined", "failed"}  # failed: post-check caught it
    assert production_after == good
    assert weights_match, "the model must be back on the production version's weights"
    assert applied_now == applied_good
    assert rollbacks == len(quarantined)  # one audit, one rollback per destructive edit

    reports = sorted((tmp_path / "home" / "state" / "audits").glob("audit-*.json"))
    last = json.loads(reports[-1].read_text())
    assert last["gate"]["passed"] is False and last["action"] == "rolled_back"
    assert last["rolled_back_to"] == good
    assert last["quarantined_event_ids"] == quarantined[-1:]

    quarantine = KafkaConsumer(
        f"{kafka_topic}.quarantine",
        bootstrap_servers=kafka_broker,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    records = list(quarantine)
    quarantine.close()
    assert sorted(json.loads(r.value)["id"] for r in records) == quarantined
    headers = dict(records[0].headers)
    assert headers["factkeeper.reason"] == b"audit-gate"
    assert "audit_locality_agreement" in json.loads(headers["factkeeper.audit"])

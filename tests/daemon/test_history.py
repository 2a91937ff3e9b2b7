"""Rollback and single-edit revert on a running daemon (real broker, real MLflow on SQLite)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import torch

from daemon.config import load_settings
from daemon.control.commands import Revert, Rollback, encode_control
from daemon.ingest.applier import EditApplier, to_request
from daemon.kafka.produce import events_from_requests
from daemon.service import Daemon, replay_journal
from editing.datasets import load_dataset
from editing.editors.base import Editor, write_deltas
from editing.models import LoadedModel, load_model
from editing.registry import get_editor
from editing.requests import EditRequest
from tests.daemon.builders import to_bytes
from tests.daemon.harness import (
    FT_OPTIONS,
    committed,
    config_file,
    create_topics,
    daemon_from_env,
    env_for,
    fact,
    produce,
)

pytestmark = pytest.mark.kafka


def _env(tmp_path, kafka_broker, kafka_topic, tiny_model_dir) -> dict:
    return env_for(
        tmp_path,
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_SNAPSHOTS__EVERY_N_EDITS="4",
        FACTKEEPER_SNAPSHOTS__ON_SHUTDOWN="true",
        FACTKEEPER_CONTROL__ALLOW_UNSIGNED="true",  # these tests are not about signing
    )


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_rollback_restores_the_version_exactly_and_moves_production(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    produce(kafka_broker, kafka_topic, [to_bytes(fact(i)) for i in range(8)])
    env = _env(tmp_path, kafka_broker, kafka_topic, tiny_model_dir)
    daemon = daemon_from_env(env)
    try:
        daemon.run(idle_timeout_s=3.0, handle_signals=False)
        registry = daemon.versions.registry
        first = registry.versions()[-1]
        held = set(daemon.versions.read(first.version)[1].event_ids)
        applied_before = {e.event_id for e in daemon.journal.applied_events()}
        assert held < applied_before  # the first version holds only the first few edits
        expected, _ = daemon.versions.read(first.version)

        produce(
            kafka_broker,
            f"{kafka_topic}.control",
            [encode_control(Rollback(command="rollback", version=int(first.version)))],
        )
        daemon.run(idle_timeout_s=3.0, handle_signals=False)

        params = dict(daemon.lm.model.named_parameters())
        for name, value in expected.items():
            assert torch.equal(params[name], value), name
        assert registry.alias("production") == first.version
        counts = daemon.journal.counts_by_status()
        assert counts["rolled_back"] == len(applied_before - held)
        assert {e.event_id for e in daemon.journal.applied_events()} == held
        [control] = daemon.journal.control_commands()
        assert control.outcome.startswith("done")
        rolled_back_weights = _weights(daemon.lm.model)
    finally:
        daemon.close()
    # Nothing was un-committed: the rolled-back events stay consumed.
    assert committed(kafka_broker, f"{kafka_topic}-group", kafka_topic) == 8

    restarted = daemon_from_env(env)
    try:
        assert restarted.replay.events == 0
        _assert_equal(restarted.lm.model, rolled_back_weights)
    finally:
        restarted.close()


def test_revert_removes_one_edit_and_equals_a_run_without_it(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    produce(kafka_broker, kafka_topic, [to_bytes(fact(i)) for i in range(8)])
    env = _env(tmp_path, kafka_broker, kafka_topic, tiny_model_dir)
    daemon = daemon_from_env(env)
    try:
        daemon.run(idle_timeout_s=3.0, handle_signals=False)
        applied = [e.event_id for e in daemon.journal.applied_events()]
        victim = applied[len(applied) // 2 + 1]  # after the first snapshot: a partial replay
        versions_before = len(daemon.versions.registry.versions())

        outcome = daemon.handle_control(Revert(command="revert", event_id=victim))

        assert outcome.startswith("done"), outcome
        assert daemon.journal.get(victim).status == "reverted"
        assert [e.event_id for e in daemon.journal.applied_events()] == [
            i for i in applied if i != victim
        ]
        assert len(daemon.versions.registry.versions()) == versions_before + 1
        assert daemon.unit_deltas.size() == (0, 0)  # the revert's version holds every unit
        refused = daemon.handle_control(Revert(command="revert", event_id=victim))
        assert refused.startswith("refused")

        # The same journal replayed from the base weights gives the same model.
        fresh = load_model(str(tiny_model_dir))
        replay_journal(EditApplier(fresh, get_editor("ft", **FT_OPTIONS)), daemon.journal)
        _assert_equal(daemon.lm.model, fresh.model.state_dict())
        reverted_weights = _weights(daemon.lm.model)
    finally:
        daemon.close()

    restarted = daemon_from_env(env)
    try:
        _assert_equal(restarted.lm.model, reverted_weights)
    finally:
        restarted.close()


def test_reverted_edits_stay_out_when_the_gate_rolls_back_unless_forced(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    env = env_for(
        tmp_path,
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_SNAPSHOTS__ON_SHUTDOWN="true",
    )
    daemon = daemon_from_env(env)
    try:
        produce(kafka_broker, kafka_topic, [to_bytes(fact(0)), to_bytes(fact(1))])
        daemon.run(idle_timeout_s=3.0, handle_signals=False)
        good = daemon.versions.current_version  # holds fact:0 and fact:1
        daemon.versions.promote(good)  # as a passed audit would
        produce(kafka_broker, kafka_topic, [to_bytes(fact(3))])
        daemon.run(idle_timeout_s=3.0, handle_signals=False)

        revert = daemon.history.revert("fact:1")
        assert daemon.versions.production() == revert.new_version  # replicas drop fact:1

        # What a failed audit does: back to the version that last passed, which holds fact:1.
        report = daemon.history.rollback(good, "audit-gate")
        assert daemon.journal.get("fact:1").status == "reverted"
        assert report.kept_out == ("fact:1",)
        current = daemon.versions.current_version
        assert daemon.versions.production() == current != good
        held = set(daemon.versions.read(current)[1].event_ids)
        assert held == {"fact:0"} == {e.event_id for e in daemon.journal.applied_events()}
        tensors, _ = daemon.versions.read(current)
        params = dict(daemon.lm.model.named_parameters())
        for name, value in tensors.items():
            assert torch.equal(params[name].detach(), value), name

        forced = daemon.history.rollback(good, "manual", force=True)
        assert forced.kept_out == () and "fact:1" in forced.restored
        assert daemon.journal.get("fact:1").status == "applied"
        assert daemon.versions.production() == good
    finally:
        daemon.close()


class CarrierEditor(Editor):
    """FT-L where some requests only take in the same call as the carrier's request.

    A *passenger* is dropped from a call of several requests without the carrier (alone it
    takes); a *stowaway* is dropped from any call without the carrier. Batch edits share one
    optimisation, so removing one request can leave another not holding: this makes it certain.
    The requests of a call are edited one after the other with FT-L, their deltas summed.
    """

    name = "carrier"

    def __init__(self, carrier: str, passengers: set[str], stowaways: set[str]) -> None:
        self.inner = get_editor("ft")  # SmolLM2's defaults
        self.carrier, self.passengers, self.stowaways = carrier, passengers, stowaways

    def compute_deltas(
        self, lm: LoadedModel, requests: Sequence[EditRequest]
    ) -> dict[str, torch.Tensor]:
        if all(r.subject != self.carrier for r in requests):
            requests = [
                r
                for r in requests
                if r.subject not in self.stowaways
                and not (r.subject in self.passengers and len(requests) > 1)
            ]
        total: dict[str, torch.Tensor] = {}
        originals: dict[str, torch.Tensor] = {}
        try:
            for request in requests:
                deltas = self.inner.compute_deltas(lm, [request])
                for name, value in write_deltas(lm.model, deltas).items():
                    originals.setdefault(name, value)
                for name, delta in deltas.items():
                    total[name] = total[name] + delta if name in total else delta
        finally:
            params = dict(lm.model.named_parameters())
            with torch.no_grad():
                for name, value in originals.items():
                    params[name].copy_(value)
        return total


@pytest.mark.smollm2
def test_revert_rechecks_its_batch_siblings(kafka_broker, kafka_topic, smollm2_paths, tmp_path):
    """SmolLM2: on the random tiny model every FT-L edit overwrites the others' answers."""
    create_topics(kafka_broker, kafka_topic)
    requests = load_dataset("counterfact", "eval", limit=4)[:4]
    payloads = events_from_requests(requests, source="counterfact/eval")
    carrier, plain, passenger, stowaway = [json.loads(p)["id"] for p in payloads]
    produce(kafka_broker, kafka_topic, payloads)  # one unit of four
    env = _env(tmp_path, kafka_broker, kafka_topic, "smollm2")
    env["FACTKEEPER_BATCHING__MAX_SIZE"] = "4"
    env["FACTKEEPER_BATCHING__LINGER_MS"] = "2000"
    settings = load_settings(config_file(tmp_path / "home", editor_options={}), env=env)
    editor = CarrierEditor(
        requests[0].subject, passengers={requests[2].subject}, stowaways={requests[3].subject}
    )
    daemon = Daemon(settings, editor=editor, serve_metrics=False, paths=smollm2_paths)
    ids = [carrier, plain, passenger, stowaway]
    try:
        daemon.run(idle_timeout_s=3.0, handle_signals=False)
        batch = {daemon.journal.get(i).batch_id for i in ids}
        assert len(batch) == 1 and None not in batch, "the four edits must form one unit"

        outcome = daemon.handle_control(Revert(command="revert", event_id=carrier))

        status = {i: daemon.journal.get(i) for i in ids}
        applied = daemon.journal.applied_events()
        lost = daemon.applier.post_check([to_request(e.event) for e in applied])
        weights = _weights(daemon.lm.model)
        daemon.versions.load(None)  # the base weights plus the journal must give the same
        replay_journal(EditApplier(daemon.lm, editor), daemon.journal)
        replayed = _weights(daemon.lm.model)
    finally:
        daemon.close()

    assert outcome.startswith("done") and "3 batch siblings re-applied alone" in outcome
    assert status[carrier].status == "reverted"
    assert lost == {}, "every edit the journal calls applied must hold after the revert"
    assert [e.event_id for e in applied] == [plain, passenger]
    assert status[stowaway].status == "failed"
    assert "batch sibling no longer holds, even alone" in status[stowaway].reason
    assert status[plain].batch_id != status[passenger].batch_id  # units of their own
    _assert_equal_dicts(replayed, weights)


def _assert_equal_dicts(actual: dict, expected: dict) -> None:
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name

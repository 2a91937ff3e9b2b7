"""Consolidation on a running daemon: the live set re-solved jointly from the base weights,
registered with its lineage, kept only when its audit is no worse, and what a restart restores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from daemon.control.commands import Consolidate, Revert
from daemon.ingest.applier import to_request
from editing.editors.ft import FineTuneL, FTConfig
from editing.models import load_model
from monitoring.probes.load import bundled_probe_path
from tests.daemon.builders import to_bytes
from tests.daemon.harness import (
    FT_OPTIONS,
    create_topics,
    daemon_from_env,
    env_for,
    fact,
    produce,
)

pytestmark = pytest.mark.kafka


def _env(tmp_path: Path, kafka_broker: str, kafka_topic: str, tiny_model_dir: Path) -> dict:
    probes = tmp_path / "probes.jsonl"
    probes.write_text("\n".join(bundled_probe_path().read_text().splitlines()[:8]) + "\n")
    return env_for(
        tmp_path,
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_SNAPSHOTS__EVERY_N_EDITS="4",
        FACTKEEPER_SNAPSHOTS__ON_SHUTDOWN="true",
        FACTKEEPER_AUDIT__EVERY_N_EDITS="1000",  # on, but never due: the test asks
        FACTKEEPER_AUDIT__PROBE_SET=str(probes),
        FACTKEEPER_AUDIT__RETENTION_FLOOR="0",
        FACTKEEPER_AUDIT__LOCALITY_FLOOR="0",
        FACTKEEPER_AUDIT__MAX_DROP="1",
        FACTKEEPER_AUDIT__MAX_PERPLEXITY_DRIFT="100",
        FACTKEEPER_CONSOLIDATION__TOLERANCE="1",  # the tiny model's figures are noise
    )


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def _assert_restart_restores(env: dict, version: str, weights: dict[str, torch.Tensor]) -> None:
    """A fresh daemon on ``env`` loads ``version``, replays nothing and holds ``weights``."""
    restarted = daemon_from_env(env)
    try:
        assert restarted.restored.version == version and restarted.replay.events == 0
        assert _equal(restarted.lm.model, weights)
    finally:
        restarted.close()


def test_an_accepted_consolidation_is_the_joint_solve_and_what_a_restart_restores(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    produce(kafka_broker, kafka_topic, [to_bytes(fact(i)) for i in range(6)])
    env = _env(tmp_path, kafka_broker, kafka_topic, tiny_model_dir)
    daemon = daemon_from_env(env)
    try:
        daemon.run(max_messages=6, idle_timeout_s=30.0, handle_signals=False)
        live = daemon.journal.applied_events()
        assert len(live) >= 2, "too few edits took to consolidate"
        sequential = _weights(daemon.lm.model)
        source = daemon.versions.current_version  # the shutdown snapshot
        new = str(int(source) + 1)

        outcome = daemon.handle_control(Consolidate(command="consolidate"))

        assert outcome.startswith(f"done: accepted version {new} of {len(live)} live"), outcome
        consolidated = _weights(daemon.lm.model)
        assert not _equal(daemon.lm.model, sequential)
        [info] = [v for v in daemon.versions.registry.versions() if v.version == new]
        assert info.tags["consolidation"] == "accepted"
        assert info.tags["consolidated_from"] == source  # the weights it replaced
        assert info.tags["live_set_size"] == str(len(live))
        assert len(info.tags["live_set_sha256"]) == 64
        assert daemon.versions.registry.alias("production") == new  # floors at 0: gate passes
        reports = sorted((Path(env["FACTKEEPER_HOME"]) / "state" / "audits").glob("*.json"))
        judged = [json.loads(p.read_text()) for p in reports]
        assert [(r["trigger"], r["version"], r["action"]) for r in judged] == [
            ("consolidation", source, "none"),
            ("consolidation", new, "promoted"),
        ]
    finally:
        daemon.close()

    # The joint solve from the base weights, computed apart from the daemon: the same weights.
    fresh = load_model(str(tiny_model_dir))
    FineTuneL(FTConfig(**FT_OPTIONS)).consolidate(fresh, [to_request(e.event) for e in live])
    assert _equal(fresh.model, consolidated)

    _assert_restart_restores(env, new, consolidated)


def test_a_rejected_consolidation_leaves_the_weights_and_is_never_restored(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    produce(kafka_broker, kafka_topic, [to_bytes(fact(i)) for i in range(6)])
    env = _env(tmp_path, kafka_broker, kafka_topic, tiny_model_dir)
    daemon = daemon_from_env(env)
    try:
        daemon.run(max_messages=6, idle_timeout_s=30.0, handle_signals=False)
        sequential = _weights(daemon.lm.model)
        source = daemon.versions.current_version
        new = str(int(source) + 1)
        assert daemon.consolidator is not None
        daemon.consolidator._worse = lambda before, after: ["retention 0.000 is below 1.000"]

        outcome = daemon.handle_control(Consolidate(command="consolidate"))

        assert outcome.startswith(f"done: rejected version {new}"), outcome
        assert "retention 0.000 is below 1.000" in outcome
        assert _equal(daemon.lm.model, sequential)
        tags = {v.version: v.tags for v in daemon.versions.registry.versions()}
        assert tags[new]["consolidation"] == "rejected"
        assert daemon.versions.registry.alias("production") != new
        assert daemon.versions.current_version == source
    finally:
        daemon.close()

    _assert_restart_restores(env, source, sequential)


def test_consolidation_is_refused_where_it_cannot_be_judged(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    env = env_for(tmp_path, kafka_broker, kafka_topic, tiny_model_dir)  # audits, versions off
    daemon = daemon_from_env(env)
    try:
        assert daemon.consolidator is None
        outcome = daemon.handle_control(Consolidate(command="consolidate"))
        assert outcome.startswith("unsupported: consolidation needs")
    finally:
        daemon.close()


def test_a_revert_by_consolidation_is_the_joint_solve_of_the_rest(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    produce(kafka_broker, kafka_topic, [to_bytes(fact(i)) for i in range(6)])
    env = _env(tmp_path, kafka_broker, kafka_topic, tiny_model_dir)
    env["FACTKEEPER_CONSOLIDATION__ON_REMOVAL"] = "true"
    daemon = daemon_from_env(env)
    try:
        daemon.run(max_messages=6, idle_timeout_s=30.0, handle_signals=False)
        applied = daemon.journal.live_events()
        assert len(applied) >= 2, "too few edits took to revert one"
        victim = applied[0].event_id

        outcome = daemon.handle_control(Revert(command="revert", event_id=victim))

        rest = daemon.journal.live_events()
        assert outcome.startswith("done: version") and f"the {len(rest)} live" in outcome, outcome
        assert daemon.journal.get(victim).status == "reverted"
        assert victim not in {e.event_id for e in rest}
        newest = daemon.versions.registry.versions()[0]
        assert newest.tags["consolidation"] == "accepted"
        assert newest.tags["live_set_size"] == str(len(rest))
        rebuilt = _weights(daemon.lm.model)
    finally:
        daemon.close()

    fresh = load_model(str(tiny_model_dir))
    FineTuneL(FTConfig(**FT_OPTIONS)).consolidate(fresh, [to_request(e.event) for e in rest])
    assert _equal(fresh.model, rebuilt)

    _assert_restart_restores(env, newest.version, rebuilt)

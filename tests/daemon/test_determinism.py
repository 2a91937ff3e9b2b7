"""Replay proves it rebuilt the same weights: journaled delta hashes, pinned threads, tags."""

from __future__ import annotations

import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from daemon.config import load_settings
from daemon.errors import ReplayMismatchError
from daemon.records.journal import Journal, JournalEntry
from daemon.service import Daemon, verify_replayed
from daemon.versions.keeper import VersionKeeper
from editing.editors.base import EditResult
from editing.registry import get_editor
from editing.safeguards import GuardedEditor
from editing.tiny import tiny_loaded
from monitoring.metrics import FactkeeperMetrics
from tests.daemon.builders import to_bytes
from tests.daemon.harness import (
    FT_OPTIONS,
    config_file,
    create_topics,
    env_for,
    fact,
    produce,
)


def _daemon(env: dict, options: dict) -> Daemon:
    home = Path(env["FACTKEEPER_HOME"])
    return Daemon(load_settings(config_file(home, options), env=env), serve_metrics=False)


@pytest.mark.kafka
def test_replay_checks_each_units_delta_hash_and_fails_loudly_on_a_mismatch(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    produce(kafka_broker, kafka_topic, [to_bytes(fact(i)) for i in range(3)])
    env = env_for(
        tmp_path, kafka_broker, kafka_topic, tiny_model_dir, FACTKEEPER_MODEL__TORCH_THREADS="1"
    )
    daemon = _daemon(env, FT_OPTIONS)
    try:
        daemon.run(idle_timeout_s=2.0, handle_signals=False)
        applied = daemon.journal.applied_events()
        edited = {k: v.clone() for k, v in daemon.lm.model.state_dict().items()}
        assert torch.get_num_threads() == 1
    finally:
        daemon.close()
    assert applied and all(re.fullmatch(r"[0-9a-f]{64}", e.delta_sha256) for e in applied)

    same = _daemon(env, FT_OPTIONS)  # the restart adds each unit's hash-checked deltas back
    try:
        assert same.replay.events == len(applied)
        assert same.replay.stored == same.replay.units > 0
        for key, value in same.lm.model.state_dict().items():
            assert torch.equal(value, edited[key]), key
        stored = same.unit_deltas.folder
    finally:
        same.close()

    # Another editor setting makes other weights from the same journal: without the stored
    # deltas (lost, or journaled before they existed) every unit is re-edited and checked, and
    # the daemon refuses to start.
    shutil.rmtree(stored)
    with pytest.raises(ReplayMismatchError, match=r"replaying journal seq \d+ .*delta sha256"):
        _daemon(env, {**FT_OPTIONS, "lr": FT_OPTIONS["lr"] * 1.5})


@pytest.mark.kafka
def test_a_restart_adds_back_the_stored_units_after_the_newest_version_and_prunes_the_rest(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    produce(kafka_broker, kafka_topic, [to_bytes(fact(i)) for i in range(4)])
    env = env_for(
        tmp_path,
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_MODEL__TORCH_THREADS="1",
        FACTKEEPER_SNAPSHOTS__EVERY_N_EDITS="100",  # versioning on; no snapshot on shutdown
    )
    daemon = _daemon(env, FT_OPTIONS)
    try:
        daemon.run(idle_timeout_s=2.0, handle_signals=False)
        daemon.versions.snapshot("test")
        produce(kafka_broker, kafka_topic, [to_bytes(fact(i)) for i in range(4, 7)])
        daemon.run(idle_timeout_s=2.0, handle_signals=False)  # then stops as after kill -9
        [newest] = daemon.versions.registry.versions()
        after = daemon.journal.applied_events(int(newest.tags["journal_seq"]))
        units = {e.batch_id for e in after}
        assert units, "the test needs edits after the newest version"
        store = daemon.unit_deltas
        # The version holds the earlier units: their deltas went when it was registered.
        assert {p.name for p in store.folder.iterdir()} == {store.path_for(u).name for u in units}
        edited = {k: v.clone() for k, v in daemon.lm.model.state_dict().items()}
    finally:
        daemon.close()

    # Another editor setting would compute other deltas: the restart never asks it.
    other = get_editor("ft", **{**FT_OPTIONS, "lr": FT_OPTIONS["lr"] * 3})
    home = Path(env["FACTKEEPER_HOME"])
    settings = load_settings(config_file(home, FT_OPTIONS), env=env)
    restarted = Daemon(settings, editor=other, serve_metrics=False)
    try:
        assert restarted.restored.version == newest.version
        assert (restarted.replay.units, restarted.replay.stored) == (len(units), len(units))
        assert restarted.replay.events == len(after)
        for key, value in restarted.lm.model.state_dict().items():
            assert torch.equal(value, edited[key]), key
    finally:
        restarted.close()


def _entry(norms: dict[str, float]) -> JournalEntry:
    now = datetime.now(UTC)
    return JournalEntry(
        seq=1, event_id="e1", topic="t", partition=0, offset=0, status="applied", reason=None,
        event=None, received_at=now, applied_at=now, edit_seconds=0.1, delta_norms=norms,
        model_version=None, batch_id="b1", delta_sha256="0" * 64,
    )  # fmt: skip


def test_the_guarded_editor_is_checked_by_norm_within_a_tolerance():
    """Its replay after a memory rebuild differs in the last bits (documented on the class):
    exact hashes would always fail, so a relative 1e-4 on each delta's norm is the check."""
    guarded = GuardedEditor(get_editor("ft", **FT_OPTIONS))
    assert not guarded.replay_bit_exact and get_editor("ft").replay_bit_exact
    delta = torch.full((4, 4), 0.25)
    journaled = _entry({"w": float(delta.norm())})
    close = EditResult({"w": delta * (1 + 1e-7)}, {}, 0.0)
    verify_replayed(guarded, [journaled], close)  # last-bit differences pass
    with pytest.raises(ReplayMismatchError, match="tolerance"):
        verify_replayed(guarded, [journaled], EditResult({"w": delta * 1.01}, {}, 0.0))
    with pytest.raises(ReplayMismatchError, match="delta sha256"):
        verify_replayed(get_editor("ft"), [journaled], close)  # bit-exact editors: the hash


def test_versions_carry_the_runtime_that_made_them(tmp_path):
    settings = load_settings(None, env={"FACTKEEPER_HOME": str(tmp_path / "home")})
    lm = tiny_loaded("llama")
    checkpoint = tmp_path / "editor"
    checkpoint.mkdir()
    (checkpoint / "editor.json").write_text("{}")
    with Journal.open(tmp_path / "journal.sqlite3") as journal:
        keeper = VersionKeeper(settings, lm, journal, FactkeeperMetrics(CollectorRegistry()))
        keeper.editor_checkpoint = lambda: checkpoint
        with torch.no_grad():
            lm.model.model.layers[1].mlp.down_proj.weight.add_(0.01)
        version = keeper.snapshot("test")
        [info] = keeper.registry.versions()
    import transformers

    assert info.version == version
    tags = info.tags
    assert tags["torch_version"] == torch.__version__
    assert tags["transformers_version"] == transformers.__version__
    assert tags["torch_threads"] == str(torch.get_num_threads())
    assert re.fullmatch(r"[0-9a-f]{64}", tags["editor_checkpoint_sha256"])

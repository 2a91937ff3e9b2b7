"""Superseding corrections on a daemon (tiny model, FT-L, MLflow on SQLite, fake Kafka clients).

Corrections go through the real consumer (stage, flush, journal, the daemon's after-batch
hook); only the Kafka clients are stand-ins, so no broker is needed. A fact corrected three
times keeps only the third live; removing the third makes the second live again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from daemon.config import load_settings
from daemon.control.commands import Revert
from daemon.ingest.applier import BatchOutcome
from daemon.ingest.consumer import FactConsumer
from daemon.ingest.events import FactCorrection
from daemon.records.journal import Journal
from daemon.service import Daemon
from daemon.versions.registry import RegistryUnavailableError
from editing.checks import Judge
from monitoring.http import Readiness
from monitoring.metrics import FactkeeperMetrics
from tests.daemon.builders import event_dict, to_bytes
from tests.daemon.harness import (
    config_file,
    env_for,
    one_thread,  # noqa: F401 (autouse)
)
from tests.daemon.test_applier import FakeConsumer, FakeProducer

SUBJECT = "Zorblax7"
PROMPT = f"The capital of {SUBJECT} is"


class Feed:
    """A consumer on fake Kafka clients: ``send`` stages records, then flushes what is left."""

    def __init__(self, consumer: FactConsumer) -> None:
        self.consumer = consumer
        self.offset = 0

    @classmethod
    def of(cls, daemon: Daemon) -> Feed:
        """The daemon's own consumer, wired to its callbacks as ``Daemon.run`` wires it."""
        consumer = FactConsumer(
            daemon.settings,
            daemon.applier,
            daemon.journal,
            FakeConsumer(),
            FakeProducer(),
            daemon.metrics,
            daemon.readiness,
            on_control=daemon.handle_control,
            after_batch=daemon._after_batch,
            between_batches=daemon._between_batches,
            unit_deltas=daemon.unit_deltas,
            restore_originals=daemon.history is not None,
        )
        daemon.consumer = consumer
        return cls(consumer)

    def stage(self, *events: dict) -> None:
        topic = self.consumer.settings.kafka.topics.corrections
        for event in events:
            record = SimpleNamespace(
                topic=topic,
                partition=0,
                offset=self.offset,
                value=to_bytes(event),
                key=None,
                headers=[],
                timestamp=self.offset,
            )
            self.consumer._stage(record)
            self.offset += 1

    def send(self, *events: dict) -> None:
        self.stage(*events)
        self.consumer.flush()


def correction(event_id: str, target_new: str, target_old: str | None = None, **extra) -> dict:
    return event_dict(
        event_id,
        subject=SUBJECT,
        prompt=PROMPT,
        target_new=target_new,
        target_old=target_old,
        rephrases=[],
        locality_probes=[],
        **extra,
    )


def other_fact(event_id: str = "other") -> dict:
    return event_dict(
        event_id,
        subject="Zorblax2",
        prompt="The capital of Zorblax2 is",
        target_new="Rome",
        target_old=None,
        rephrases=[],
        locality_probes=[],
    )


def start(tmp_path: Path, tiny_model_dir: Path) -> Daemon:
    """A daemon with versioning on (only history registers versions); a second call on the
    same ``tmp_path`` is a restart."""
    env = env_for(
        tmp_path,
        "127.0.0.1:1",  # never dialled: the consumer's clients are stand-ins
        "corrections",
        tiny_model_dir,
        FACTKEEPER_SNAPSHOTS__EVERY_N_EDITS="100",
    )
    return Daemon(load_settings(config_file(tmp_path / "home"), env=env), serve_metrics=False)


@pytest.fixture
def daemon(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Daemon]:
    started = start(tmp_path, tiny_model_dir)
    try:
        yield started
    finally:
        started.close()


def weights(daemon: Daemon) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in daemon.lm.model.state_dict().items()}


def same_weights(daemon: Daemon, expected: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, expected[k]) for k, v in daemon.lm.model.state_dict().items())


def says(daemon: Daemon, target: str) -> bool:
    [verdict] = Judge(daemon.lm).judge([(PROMPT, target)])
    return verdict.ok


def live_ids(daemon: Daemon) -> list[str]:
    return [e.event_id for e in daemon.journal.live_events()]


def test_a_fact_corrected_three_times_keeps_the_third_live_and_reverting_it_the_second(
    daemon: Daemon,
) -> None:
    feed = Feed.of(daemon)
    feed.send(other_fact())
    for i, target in enumerate(["Paris", "Rome", "Berlin"], start=1):
        feed.send(correction(f"c{i}", target))
    journal = daemon.journal
    assert [journal.get(f"c{i}").status for i in (1, 2, 3)] == ["applied"] * 3
    assert live_ids(daemon) == ["other", "c3"]
    assert [journal.get(f"c{i}").superseded_by for i in (1, 2, 3)] == ["c2", "c3", None]
    assert says(daemon, "Berlin")

    outcome = daemon.handle_control(Revert(command="revert", event_id="c3"))

    assert outcome.startswith("done"), outcome
    assert journal.get("c3").status == "reverted"
    assert live_ids(daemon) == ["other", "c2"]
    assert journal.get("c2").superseded_by is None
    assert says(daemon, "Rome")


def test_several_edits_are_reverted_in_one_rebuild_and_one_version(daemon: Daemon) -> None:
    feed = Feed.of(daemon)
    feed.send(other_fact())
    before = weights(daemon)
    feed.send(correction("c1", "Paris"))
    feed.send(correction("c2", "Rome"))
    versions = len(daemon.versions.registry.versions())

    report = daemon.history.revert_many(["c2", "c1"], "test")

    assert report.event_ids == ("c2", "c1")
    assert len(daemon.versions.registry.versions()) == versions + 1
    assert [daemon.journal.get(i).status for i in ("c1", "c2")] == ["reverted"] * 2
    assert live_ids(daemon) == ["other"]
    assert same_weights(daemon, before)  # the other fact's edit, re-made on the base


class Recorder:
    """An applier that records the batches it is given and applies none of them."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def apply(self, events: list[FactCorrection]) -> BatchOutcome:
        self.batches.append([e.id for e in events])
        return BatchOutcome(failed={e.id: "not applied (test)" for e in events})


def test_a_second_correction_of_a_staged_fact_flushes_the_first(tmp_path: Path) -> None:
    settings = load_settings(None, env={"FACTKEEPER_HOME": str(tmp_path)})
    recorder = Recorder()
    with Journal.open(tmp_path / "journal.sqlite3") as journal:
        consumer = FactConsumer(
            settings,
            recorder,  # type: ignore[arg-type]
            journal,
            FakeConsumer(),  # type: ignore[arg-type]
            FakeProducer(),  # type: ignore[arg-type]
            FactkeeperMetrics(),
            Readiness("model_loaded"),
        )
        feed = Feed(consumer)
        same_fact = {**correction("c2", "Rome"), "prompt": f"the capital of {SUBJECT} is:"}
        feed.stage(correction("c1", "Paris"), other_fact(), same_fact, other_fact("again"))
        assert recorder.batches == [["c1", "other"]]
        consumer.flush()
        assert recorder.batches == [["c1", "other"], ["c2", "again"]]


def test_a_correction_back_to_the_original_answer_removes_the_facts_edits(
    daemon: Daemon,
) -> None:
    feed = Feed.of(daemon)
    feed.send(other_fact())
    without_chain = weights(daemon)
    feed.send(correction("c1", "Rome", target_old="Paris"))
    feed.send(correction("c2", "Berlin", target_old="Rome"))
    assert says(daemon, "Berlin")
    versions = len(daemon.versions.registry.versions())

    feed.send(correction("c3", "Paris", target_old="Berlin"))

    journal = daemon.journal
    restoring = journal.get("c3")
    assert (restoring.status, restoring.restores_original) == ("applied", True)
    assert restoring.batch_id is None and restoring.delta_sha256 is None
    assert [journal.get(i).status for i in ("c1", "c2")] == ["reverted"] * 2
    assert [journal.get(i).superseded_by for i in ("c1", "c2")] == ["c2", "c3"]
    assert live_ids(daemon) == ["other"]  # nothing live for the fact
    assert journal.awaiting_removal() == {}
    assert same_weights(daemon, without_chain)
    assert len(daemon.versions.registry.versions()) == versions + 1  # one rebuild, one version

    feed.send(correction("c4", "Rome", target_old="Paris"))  # a new chain starts
    assert live_ids(daemon) == ["other", "c4"]
    assert says(daemon, "Rome")


def test_edits_left_by_a_crash_before_the_revert_are_removed_at_the_restart(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = start(tmp_path, tiny_model_dir)
    try:
        feed = Feed.of(daemon)
        feed.send(other_fact())
        without_chain = weights(daemon)
        feed.send(correction("c1", "Rome", target_old="Paris"))
        feed.send(correction("c2", "Berlin", target_old="Rome"))

        def away() -> None:
            raise RegistryUnavailableError("MLflow is away (test)")

        monkeypatch.setattr(daemon.history, "remove_restored", away)
        feed.send(correction("c3", "Paris", target_old="Berlin"))
        assert daemon.journal.awaiting_removal() == {"c3": ["c1", "c2"]}
        assert live_ids(daemon) == ["other"]  # the journal already says so
        assert says(daemon, "Berlin")  # the weights do not yet
    finally:
        daemon.close()

    restarted = start(tmp_path, tiny_model_dir)  # replays c1 and c2, skips c3, then reverts
    try:
        assert restarted.journal.awaiting_removal() == {}
        assert [restarted.journal.get(i).status for i in ("c1", "c2")] == ["reverted"] * 2
        assert same_weights(restarted, without_chain)
    finally:
        restarted.close()

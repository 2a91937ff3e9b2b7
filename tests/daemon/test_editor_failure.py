"""An editor that fails mid-write (not ``EditError``) costs a rebuild, not the daemon."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from daemon.config import load_settings
from daemon.ingest.applier import EditApplier
from daemon.ingest.events import HEADER_EVENT_ID, HEADER_REASON
from daemon.service import Daemon, replay_journal
from editing.editors.base import Editor, write_deltas
from editing.models import LoadedModel, load_model
from editing.registry import get_editor
from editing.requests import EditRequest
from tests.daemon.builders import to_bytes
from tests.daemon.harness import (
    FT_OPTIONS,
    config_file,
    create_topics,
    dlq_records,
    env_for,
    fact,
    produce,
)

pytestmark = pytest.mark.kafka

POISON = "Kaboom"


class CrashingEditor(Editor):
    """FT-L, except that a request for ``POISON`` scribbles on a weight and then raises."""

    name = "crashing"

    def __init__(self) -> None:
        self.inner = get_editor("ft", **FT_OPTIONS)

    def compute_deltas(
        self, lm: LoadedModel, requests: Sequence[EditRequest]
    ) -> dict[str, torch.Tensor]:
        if any(r.target_new == POISON for r in requests):
            name = lm.adapter.weight_name(lm.adapter.roles()[-1], 0)
            weight = dict(lm.model.named_parameters())[name]
            write_deltas(lm.model, {name: torch.full_like(weight, 0.5)})  # half-written
            raise RuntimeError("simulated editor bug")
        return self.inner.compute_deltas(lm, requests)


def test_editor_bug_fails_the_event_and_leaves_the_journaled_weights(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    poison = {**fact(3), "target_new": POISON}
    stream = [to_bytes(fact(i)) for i in range(3)] + [to_bytes(poison)]
    stream += [to_bytes(fact(i)) for i in range(4, 7)]
    produce(kafka_broker, kafka_topic, stream)
    env = env_for(tmp_path, kafka_broker, kafka_topic, tiny_model_dir)
    settings = load_settings(config_file(tmp_path / "home"), env=env)
    daemon = Daemon(settings, editor=CrashingEditor(), serve_metrics=False)
    try:
        stats = daemon.run(idle_timeout_s=3.0, handle_signals=False)
        entry = daemon.journal.get(poison["id"])
        weights = {k: v.clone() for k, v in daemon.lm.model.state_dict().items()}
        applied = len(daemon.journal.applied_events())
        failed = daemon.journal.counts_by_status()["failed"]
        fresh = load_model(str(tiny_model_dir))
        replay_journal(EditApplier(fresh, get_editor("ft", **FT_OPTIONS)), daemon.journal)
    finally:
        daemon.close()

    assert stats.consumed == len(stream)
    assert entry.status == "failed" and entry.reason.startswith("editor error: RuntimeError")
    assert applied >= 1  # the events around it were still edited
    for name, value in fresh.model.state_dict().items():
        assert torch.equal(weights[name], value), name  # nothing half-written survived
    dlq = {
        dict(r.headers)[HEADER_EVENT_ID].decode(): dict(r.headers)[HEADER_REASON].decode()
        for r in dlq_records(kafka_broker, kafka_topic, failed)
    }
    assert dlq[poison["id"]] == "edit-failed"


class FlakyEditor(Editor):
    """FT-L, except for scripted failures per target, after half-writing a weight each time.

    ``script`` maps a subject to the exceptions its calls raise, in order; once they are used
    up, the call succeeds.
    """

    name = "flaky"

    def __init__(self, script: dict[str, list[Exception]]) -> None:
        self.inner = get_editor("ft", **FT_OPTIONS)
        self.script = script
        self.raised: dict[str, int] = {}  # replays after a rebuild also call the editor

    def compute_deltas(
        self, lm: LoadedModel, requests: Sequence[EditRequest]
    ) -> dict[str, torch.Tensor]:
        for r in requests:
            pending = self.script.get(r.subject)
            if pending:
                self.raised[r.subject] = self.raised.get(r.subject, 0) + 1
                name = lm.adapter.weight_name(lm.adapter.roles()[-1], 0)
                weight = dict(lm.model.named_parameters())[name]
                write_deltas(lm.model, {name: torch.full_like(weight, 0.5)})  # half-written
                raise pending.pop(0)
        return self.inner.compute_deltas(lm, requests)


def _oom() -> RuntimeError:
    return RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_transient_editor_errors_are_retried_before_the_event_fails(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    stream = [fact(i) for i in range(5)]
    flaky, hopeless, bug = stream[1:4]
    editor = FlakyEditor(
        {
            "Zorblax1": [_oom(), torch.OutOfMemoryError("allocator")],  # then it takes
            "Zorblax2": [_oom() for _ in range(10)],  # out of memory every time
            "Zorblax3": [RuntimeError("simulated editor bug")],  # not transient: no retry
        }
    )
    produce(kafka_broker, kafka_topic, [to_bytes(e) for e in stream])
    env = env_for(
        tmp_path,
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_EDITOR__TRANSIENT_RETRIES="2",
        FACTKEEPER_EDITOR__TRANSIENT_BACKOFF_S="0.01",
    )
    settings = load_settings(config_file(tmp_path / "home"), env=env)
    daemon = Daemon(settings, editor=editor, serve_metrics=False)
    try:
        daemon.run(idle_timeout_s=3.0, handle_signals=False)
        status = {e["id"]: daemon.journal.get(e["id"]) for e in stream}
        weights = {k: v.clone() for k, v in daemon.lm.model.state_dict().items()}
        fresh = load_model(str(tiny_model_dir))
        replay_journal(EditApplier(fresh, get_editor("ft", **FT_OPTIONS)), daemon.journal)
    finally:
        daemon.close()

    assert status[flaky["id"]].status == "applied", status[flaky["id"]].reason
    assert editor.raised["Zorblax1"] == 2
    assert status[hopeless["id"]].status == "failed"
    assert "transient; failed 3 times" in status[hopeless["id"]].reason
    assert editor.raised["Zorblax2"] == 3  # one try and two retries
    assert status[bug["id"]].status == "failed"
    assert status[bug["id"]].reason.startswith("editor error: RuntimeError: simulated")
    assert editor.raised["Zorblax3"] == 1
    for name, value in fresh.model.state_dict().items():
        assert torch.equal(weights[name], value), name  # the retries left nothing half-written
    failed = {i for i, entry in status.items() if entry.status == "failed"}
    records = dlq_records(kafka_broker, kafka_topic, len(failed))
    assert {dict(r.headers)[HEADER_EVENT_ID].decode() for r in records} == failed
    assert {hopeless["id"], bug["id"]} <= failed

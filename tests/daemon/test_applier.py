"""The retry ladder: a batch keeps the edits that take, failures climb the rungs, replay follows.

The consumer runs for real on fake Kafka clients (no broker needed): what it journals is what a
restart replays. ``Stubborn`` is FT-L that writes nothing for chosen subjects, so exactly those
edits fail their post-check on the rungs it stands on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry

from daemon.config import Settings, load_settings
from daemon.errors import RetryLadderChangedError, SettingsError
from daemon.ingest.applier import EditApplier, Rung, rung_spec
from daemon.ingest.consumer import FactConsumer, _Pending
from daemon.ingest.events import FactCorrection, parse_event
from daemon.records.journal import Journal
from daemon.records.unit_deltas import UnitDeltaStore
from daemon.service import build_ladder, replay_journal
from editing.editors.base import Editor
from editing.models import LoadedModel, load_model
from editing.registry import get_editor
from editing.requests import EditRequest
from monitoring.http import Readiness
from monitoring.metrics import FactkeeperMetrics
from tests.daemon.builders import to_bytes
from tests.daemon.harness import FT_OPTIONS, fact


class Stubborn(Editor):
    """FT-L (``options`` over ``FT_OPTIONS``) that changes nothing for ``subjects``."""

    name = "stubborn"

    def __init__(self, subjects: Sequence[str] = (), **options: object) -> None:
        self.inner = get_editor("ft", **{**FT_OPTIONS, **options})
        self.subjects = set(subjects)

    def compute_deltas(
        self, lm: LoadedModel, requests: Sequence[EditRequest]
    ) -> dict[str, torch.Tensor]:
        kept = [r for r in requests if r.subject not in self.subjects]
        return self.inner.compute_deltas(lm, kept) if kept else {}


def rung(index: int, editor: Editor, tag: str) -> Rung:
    return Rung(index, rung_spec("stubborn", {"tag": tag}), editor, f"rung {index} ({tag})")


def events(*indices: int) -> list[FactCorrection]:
    return [parse_event(to_bytes(fact(i))) for i in indices]


class _Sent:
    def get(self, timeout: float | None = None) -> None:
        return None


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def send(self, topic: str, value: bytes, key: bytes | None = None, headers=None) -> _Sent:
        self.sent.append((topic, value))
        return _Sent()

    def flush(self) -> None:
        pass


class FakeConsumer:
    def commit(self, offsets: object) -> None:
        pass


def consume(
    settings: Settings,
    applier: EditApplier,
    journal: Journal,
    batches: list[list[int]],
    unit_deltas: UnitDeltaStore | None = None,
) -> FactkeeperMetrics:
    """Journal each batch of ``fact(i)`` events through the real consumer's flush."""
    metrics = FactkeeperMetrics(CollectorRegistry())
    consumer = FactConsumer(
        settings,
        applier,
        journal,
        FakeConsumer(),
        FakeProducer(),
        metrics,
        Readiness("model_loaded"),
        unit_deltas=unit_deltas,
    )
    topic = settings.kafka.topics.corrections
    offset = 0
    for batch in batches:
        for event in events(*batch):
            record = SimpleNamespace(
                topic=topic, partition=0, offset=offset, value=b"", key=None, headers=[]
            )
            consumer._pending.append(_Pending(record, event))
            offset += 1
        consumer.flush()
    return metrics


def weights(lm: LoadedModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def rung_count(metrics: FactkeeperMetrics, stage: str) -> float:
    value = metrics.registry.get_sample_value("factkeeper_edits_by_rung_total", {"rung": stage})
    return value or 0.0


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """The defaults with FT-L, the editor these tests edit with."""
    env = {"FACTKEEPER_HOME": str(tmp_path / "home"), "FACTKEEPER_EDITOR__METHOD": "ft"}
    return load_settings(None, env=env)


@pytest.fixture
def journal(tmp_path: Path):
    with Journal.open(tmp_path / "journal.sqlite3") as j:
        yield j


def test_a_batch_keeps_the_edits_that_take_as_one_unit(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    applier = EditApplier(lm, Stubborn(["Zorblax1"]))

    outcome = applier.apply(events(0, 1, 2, 4))

    assert [sorted(e.id for e in u.events) for u in outcome.applied] == [
        ["fact:0", "fact:2", "fact:4"]
    ]
    assert outcome.applied[0].stage == "subset"  # re-applied together, not one at a time
    assert outcome.failed["fact:1"].startswith("edit did not take: model answers")
    kept = events(0, 2, 4)
    assert applier.post_check([applier_request(e) for e in kept]) == {}  # still in the weights


def applier_request(event: FactCorrection) -> EditRequest:
    from daemon.ingest.applier import to_request

    return to_request(event)


def test_a_failure_takes_on_the_second_rung_and_is_journaled_with_it(
    tiny_model_dir, settings, journal
):
    lm = load_model(str(tiny_model_dir))
    ladder = [rung(1, Stubborn(["Zorblax3"]), "one"), rung(2, Stubborn(), "two")]
    applier = EditApplier(lm, Stubborn(["Zorblax3"]), ladder=ladder)

    metrics = consume(settings, applier, journal, [[0, 3]])

    entry = journal.get("fact:3")
    assert entry.status == "applied", entry.reason
    assert entry.retry_rung == ladder[1].spec
    assert journal.get("fact:0").retry_rung is None  # the configured editor applied it
    assert entry.batch_id != journal.get("fact:0").batch_id
    assert rung_count(metrics, "rung2") == 1
    assert rung_count(metrics, "first") == 0  # the batch of two did not take whole
    assert rung_count(metrics, "rung1") == 0


def test_an_edit_no_rung_makes_take_fails_with_every_rungs_answer(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    ladder = [rung(1, Stubborn(["Zorblax4"]), "one"), rung(2, Stubborn(["Zorblax4"]), "two")]
    applier = EditApplier(lm, Stubborn(["Zorblax4"]), ladder=ladder)
    before = weights(lm)

    outcome = applier.apply(events(4))

    assert outcome.applied == []
    reason = outcome.failed["fact:4"]
    parts = reason.split("; ")
    assert [p.split(":")[0] for p in parts] == ["alone (stubborn)", "rung 1 (one)", "rung 2 (two)"]
    assert all("edit did not take: model answers" in p for p in parts), reason
    for name, value in weights(lm).items():
        assert torch.equal(before[name], value), name  # every rung was undone


def test_replay_rebuilds_units_of_every_rung_bit_for_bit(tiny_model_dir, settings, journal):
    def applier_for(lm: LoadedModel) -> EditApplier:
        ladder = [
            rung(1, Stubborn(["Zorblax1"]), "one"),
            rung(2, Stubborn(num_steps=80), "two"),
        ]
        return EditApplier(lm, Stubborn(["Zorblax1", "Zorblax3"]), ladder=ladder)

    lm = load_model(str(tiny_model_dir))
    consume(settings, applier_for(lm), journal, [[0, 1, 2, 4], [3]])
    rungs = {e.event_id: e.retry_rung for e in journal.applied_events()}
    one, two = (applier_for(lm).ladder[i].spec for i in (0, 1))
    expected = {"fact:0": None, "fact:2": None, "fact:4": None, "fact:1": two, "fact:3": one}
    assert rungs == expected, rungs
    edited = weights(lm)

    fresh = load_model(str(tiny_model_dir))  # a restart: base weights, new editors
    report = replay_journal(applier_for(fresh), journal)  # checks every unit's delta hash

    assert report.events == 5
    for name, value in weights(fresh).items():
        assert torch.equal(edited[name], value), name


def test_replay_refuses_a_rung_the_ladder_no_longer_has(tiny_model_dir, tmp_path, journal):
    def settings_with(num_steps: int) -> Settings:
        config = tmp_path / f"ladder-{num_steps}.yaml"
        config.write_text(
            "editor:\n"
            "  method: ft\n"
            f"  options: {dict(FT_OPTIONS)}\n"
            f"  retry_ladder: [{{options: {{num_steps: {num_steps}}}}}]\n"
        )
        return load_settings(config, env={"FACTKEEPER_HOME": str(tmp_path / "home")})

    first = settings_with(80)
    lm = load_model(str(tiny_model_dir))
    editor = Stubborn(["Zorblax1"])
    consume(first, EditApplier(lm, editor, ladder=build_ladder(first, editor)), journal, [[1]])
    assert journal.get("fact:1").retry_rung is not None

    same = load_model(str(tiny_model_dir))
    replay_journal(EditApplier(same, editor, ladder=build_ladder(first, editor)), journal)
    changed = settings_with(90)
    fresh = load_model(str(tiny_model_dir))
    applier = EditApplier(fresh, editor, ladder=build_ladder(changed, editor))
    with pytest.raises(RetryLadderChangedError, match="no longer configures"):
        replay_journal(applier, journal)


def test_editors_with_a_memory_of_past_edits_cannot_be_rungs_of_others(tmp_path):
    config = tmp_path / "nse-rung.yaml"
    config.write_text("editor:\n  retry_ladder: [{method: nse}]\n")
    settings = load_settings(config, env={"FACTKEEPER_HOME": str(tmp_path / "home")})
    with pytest.raises(SettingsError, match=r"retry_ladder\[0\]: nse: an editor that keeps"):
        build_ladder(settings, get_editor("ft"))


def test_nse_rungs_are_its_own_variants_sharing_its_memory(tmp_path):
    home = {"FACTKEEPER_HOME": str(tmp_path / "home")}
    config = tmp_path / "nse-net.yaml"
    config.write_text("editor:\n  method: nse\n  options: {v_optimiser: net}\n")
    editor = get_editor("nse:v_optimiser=net")
    (rung,) = build_ladder(load_settings(config, env=home), editor)  # the default: precise NSE
    assert rung.editor._shared is editor._shared
    assert rung.editor.overrides == {"v_optimiser": "adam", "early_stop_loss": 0.05}
    assert rung.label == "rung 1 (nse early_stop_loss=0.05 v_optimiser=adam)"

    config.write_text("editor:\n  method: nse\n")  # Adam already: no rung repeats it
    assert build_ladder(load_settings(config, env=home), get_editor("nse")) == []

    config.write_text("editor:\n  method: nse\n  retry_ladder: [{method: ft}]\n")
    with pytest.raises(SettingsError, match=r"rungs must be nse with other options"):
        build_ladder(load_settings(config, env=home), get_editor("nse"))


def test_the_default_ladder_retries_ft_with_more_steps(settings):
    (only,) = build_ladder(settings, get_editor("ft"))
    assert only.editor.config.num_steps == 40
    assert only.label == "rung 1 (ft num_steps=40)"


def test_the_default_method_is_the_fact_memory_retried_with_a_wider_margin(tmp_path):
    settings = load_settings(None, env={"FACTKEEPER_HOME": str(tmp_path / "home")})
    assert settings.editor.method == "memory"
    (only,) = build_ladder(settings, get_editor("memory"))
    assert only.editor.value_options["stop_margin"] == 3.0
    assert only.editor.value_options["v_num_grad_steps"] == 50
    assert get_editor("memory").value_options["stop_margin"] == 1.0
    assert get_editor("memory").value_options["end_of_word"] is True
    assert only.label == "rung 1 (memory stop_margin=3.0 v_num_grad_steps=50)"

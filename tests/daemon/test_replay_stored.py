"""Replay adds each journaled unit's stored deltas back instead of re-editing (issue 20, item 4).

Units are journaled through the real consumer's flush with a real ``UnitDeltaStore``; a replay
on a freshly loaded model must give the same weights bit for bit without calling the editor,
fall back to re-editing a unit whose deltas are missing, corrupt or stale, rewrite them when a
revert recomputes, and rebuild the memory of an editor that keeps one.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from daemon.config import Settings, load_settings
from daemon.errors import CorruptUnitDeltasError, ReplayMismatchError
from daemon.ingest.applier import EditApplier, to_request
from daemon.records.journal import Journal
from daemon.records.unit_deltas import UnitDeltaStore, lineage_of
from daemon.service import GUARDED_NORM_RTOL, Daemon, replay_journal
from daemon.versions.keeper import base_weights
from editing.editors.base import Editor
from editing.models import LoadedModel, load_model
from editing.registry import get_editor
from editing.requests import EditRequest
from editing.safeguards import GuardedEditor, SafeguardConfig
from tests.daemon.harness import (
    FT_OPTIONS,
    config_file,
    one_thread,  # noqa: F401 (autouse)
)
from tests.daemon.test_applier import consume, events, weights
from tests.editing.conftest import small_key_statistics
from tests.editing.test_safeguards import CORPUS

BATCHES = [[0, 2, 4], [1], [3]]  # three units, the first of three edits


class Counting(Editor):
    """FT-L (``options`` over ``FT_OPTIONS``) that counts the edits it computes."""

    name = "counting"

    def __init__(self, **options: object) -> None:
        self.inner = get_editor("ft", **{**FT_OPTIONS, **options})
        self.calls = 0

    def compute_deltas(
        self, lm: LoadedModel, requests: Sequence[EditRequest]
    ) -> dict[str, torch.Tensor]:
        self.calls += 1
        return self.inner.compute_deltas(lm, requests)


@dataclass
class Journaled:
    folder: Path  # the journal and its stored deltas, never changed: tests copy it
    weights: dict[str, torch.Tensor]  # the model after the edits were first applied
    units: int
    events: int


def settings_in(folder: Path) -> Settings:
    return load_settings(None, env={"FACTKEEPER_HOME": str(folder / "home")})


@pytest.fixture(scope="module")
def journaled(tiny_model_dir, tmp_path_factory) -> Journaled:
    folder = tmp_path_factory.mktemp("journaled")
    lm = load_model(str(tiny_model_dir))
    path = folder / "journal.sqlite3"
    with Journal.open(path) as journal:
        store = UnitDeltaStore.beside(path)
        consume(settings_in(folder), EditApplier(lm, Counting()), journal, BATCHES, store)
        applied = journal.applied_events()
    units = len({e.batch_id for e in applied})
    assert (units, len(applied)) == (3, 5), "every batch should take, as one unit"
    return Journaled(folder, weights(lm), units, len(applied))


@pytest.fixture
def copy(journaled, tmp_path) -> Iterator[tuple[Journal, UnitDeltaStore]]:
    """The journaled state in this test's own folder (a test may damage its stored deltas)."""
    folder = shutil.copytree(journaled.folder, tmp_path / "state")
    path = folder / "journal.sqlite3"
    with Journal.open(path) as journal:
        yield journal, UnitDeltaStore.beside(path)


def unit_ids(journal: Journal) -> list[str]:
    return list(dict.fromkeys(e.batch_id for e in journal.applied_events()))


def assert_weights(lm: LoadedModel, expected: dict[str, torch.Tensor]) -> None:
    for name, value in weights(lm).items():
        assert torch.equal(value, expected[name]), name


def test_replay_adds_the_stored_deltas_back_bit_for_bit_without_editing(
    tiny_model_dir, journaled, copy
):
    journal, store = copy
    assert store.size()[0] == journaled.units
    fresh = load_model(str(tiny_model_dir))  # a restart: base weights
    other = Counting(lr=FT_OPTIONS["lr"] * 3)  # would compute other deltas, were it asked

    report = replay_journal(EditApplier(fresh, other), journal, store=store)

    assert other.calls == 0
    assert (report.units, report.stored) == (journaled.units, journaled.units)
    assert report.events == journaled.events
    assert_weights(fresh, journaled.weights)


def test_a_missing_stored_unit_is_re_edited_and_checked(tiny_model_dir, journaled, copy):
    journal, store = copy
    store.path_for(unit_ids(journal)[1]).unlink()
    fresh = load_model(str(tiny_model_dir))
    editor = Counting()

    report = replay_journal(EditApplier(fresh, editor), journal, store=store)

    assert editor.calls == 1  # only the unit without deltas
    assert report.stored == journaled.units - 1
    assert_weights(fresh, journaled.weights)


def test_a_corrupt_stored_unit_is_caught_by_its_hash_never_applied(tiny_model_dir, journaled, copy):
    journal, store = copy
    victim = unit_ids(journal)[0]
    path = store.path_for(victim)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # one delta value changes; the file still parses
    path.write_bytes(bytes(data))
    digest = journal.applied_events()[0].delta_sha256
    with pytest.raises(CorruptUnitDeltasError):
        store.load(victim, digest, lineage_of([]))

    # Re-edited with other settings, the unit's weight change no longer matches the journal:
    # replay asked the editor instead of trusting the damaged file, and says so.
    with pytest.raises(ReplayMismatchError, match="delta sha256"):
        replay_journal(
            EditApplier(load_model(str(tiny_model_dir)), Counting(lr=FT_OPTIONS["lr"] * 3)),
            journal,
            store=store,
        )
    fresh = load_model(str(tiny_model_dir))
    editor = Counting()
    replay_journal(EditApplier(fresh, editor), journal, store=store)
    assert editor.calls == 1
    assert_weights(fresh, journaled.weights)


def test_units_after_a_reverted_one_are_re_edited_and_their_new_deltas_stored(
    tiny_model_dir, journaled, copy
):
    journal, store = copy
    first = unit_ids(journal)[0]
    journal.mark(
        [e.event_id for e in journal.applied_events() if e.batch_id == first], "reverted", "test"
    )

    # Deltas made on weights that held the reverted unit are stale: never applied as they are.
    # (Re-edited, the later units change differently than journaled: the check stops it.)
    with pytest.raises(ReplayMismatchError):
        replay_journal(
            EditApplier(load_model(str(tiny_model_dir)), Counting()), journal, store=store
        )

    rebuilt = load_model(str(tiny_model_dir))
    editor = Counting()
    report = replay_journal(EditApplier(rebuilt, editor), journal, rehash=True, store=store)
    assert editor.calls == report.units == journaled.units - 1  # a revert always re-edits
    assert report.stored == 0

    restarted = load_model(str(tiny_model_dir))
    again = Counting()
    report = replay_journal(EditApplier(restarted, again), journal, store=store)
    assert again.calls == 0 and report.stored == journaled.units - 1  # the rewritten deltas
    assert_weights(restarted, weights(rebuilt))


def test_without_a_store_replay_re_edits_every_unit(tiny_model_dir, journaled, copy):
    journal, _ = copy
    fresh = load_model(str(tiny_model_dir))
    editor = Counting()

    report = replay_journal(EditApplier(fresh, editor), journal)

    assert editor.calls == journaled.units and report.stored == 0
    assert_weights(fresh, journaled.weights)


# -- an editor that keeps a memory of past edits: the safeguards around FT-L -----------------


def off(value: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative distance in norm: how the daemon checks an editor that is not bit-exact."""
    return float((value - expected).norm() / expected.norm())


def guarded(lm: LoadedModel, stats_dir: Path) -> GuardedEditor:
    """FT-L under rewind + preserve: its deltas depend on M, the keys of the edits it holds."""
    config = SafeguardConfig.only(["rewind", "preserve"], preserve_lambda=1.0, max_unexplained=1.0)
    stats = small_key_statistics(stats_dir, CORPUS)
    originals = base_weights(lm).get
    return GuardedEditor(get_editor("ft", **FT_OPTIONS), config, stats=stats, originals=originals)


@contextmanager
def applied_through_safeguards(
    tiny_model_dir: Path, tmp_path: Path
) -> Iterator[tuple[LoadedModel, GuardedEditor, Journal, UnitDeltaStore]]:
    """BATCHES consumed through the guarded editor, their deltas stored, the journal open."""
    path = tmp_path / "journal.sqlite3"
    store = UnitDeltaStore.beside(path)
    lm = load_model(str(tiny_model_dir))
    editor = guarded(lm, tmp_path / "stats")
    with Journal.open(path) as journal:
        consume(settings_in(tmp_path), EditApplier(lm, editor), journal, BATCHES, store)
        assert len(unit_ids(journal)) >= 2, "the test needs units applied through the safeguards"
        yield lm, editor, journal, store


def test_a_memory_editor_gets_its_memory_rebuilt_for_the_stored_units(tiny_model_dir, tmp_path):
    with applied_through_safeguards(tiny_model_dir, tmp_path) as (lm, editor, journal, store):
        ids = unit_ids(journal)
        held = [to_request(e.event) for e in journal.applied_events()]

        fresh = load_model(str(tiny_model_dir))
        restarted = guarded(fresh, tmp_path / "stats")
        report = replay_journal(EditApplier(fresh, restarted), journal, store=store)

        assert report.stored == len(ids)
        assert_weights(fresh, weights(lm))  # bit for bit, though the editor is not bit-exact
        expected = guarded(fresh, tmp_path / "stats")
        expected.reset_memory(fresh, held)
        assert editor.memory and set(restarted.memory) == set(editor.memory)
        for name, value in restarted.memory.items():
            assert torch.equal(value, expected.memory[name]), name  # the daemon's own rebuild
            assert torch.allclose(value, editor.memory[name], rtol=1e-5, atol=1e-6), name

        # The next edit comes out as it would have without the restart; without the rebuilt
        # memory it would not.
        (nxt,) = [to_request(e) for e in events(4)]
        original = editor.apply(lm, [nxt]).deltas
        after_restart = restarted.apply(fresh, [nxt])
        for name, value in original.items():
            assert off(after_restart.deltas[name], value) < GUARDED_NORM_RTOL, name
        restarted.undo(fresh, after_restart)
        restarted.memory = {}
        forgetful = restarted.apply(fresh, [nxt]).deltas
        assert max(off(forgetful[name], value) for name, value in original.items()) > 1e-2


def test_a_memory_editor_re_editing_a_unit_first_catches_its_memory_up(tiny_model_dir, tmp_path):
    with applied_through_safeguards(tiny_model_dir, tmp_path) as (lm, editor, journal, store):
        ids = unit_ids(journal)
        store.path_for(ids[-1]).unlink()  # the last unit is re-edited after stored ones

        fresh = load_model(str(tiny_model_dir))
        restarted = guarded(fresh, tmp_path / "stats")
        report = replay_journal(EditApplier(fresh, restarted), journal, store=store)

        # Re-edited on a memory that holds the earlier units: the journaled norms match
        # (``verify_replayed``, within the tolerance), and the weights agree.
        assert report.stored == len(ids) - 1
        edited = weights(lm)
        for name, value in weights(fresh).items():
            assert off(value, edited[name]) < GUARDED_NORM_RTOL, name
        for name, value in restarted.memory.items():
            assert torch.allclose(value, editor.memory[name], rtol=1e-5, atol=1e-6), name


# -- the daemon: its store beside its journal -------------------------------------------------


def test_the_daemon_starts_from_its_stored_units_and_prunes_what_no_replay_needs(
    tiny_model_dir, tmp_path
):
    env = {
        "FACTKEEPER_HOME": str(tmp_path / "home"),
        "FACTKEEPER_MODEL__NAME": str(tiny_model_dir),
        "FACTKEEPER_MODEL__TORCH_THREADS": "1",
        "FACTKEEPER_SNAPSHOTS__EVERY_N_EDITS": "0",  # no versions: the whole journal replays
        "FACTKEEPER_SNAPSHOTS__EVERY_MINUTES": "0",
        "FACTKEEPER_SNAPSHOTS__ON_SHUTDOWN": "false",
        "FACTKEEPER_AUDIT__EVERY_N_EDITS": "0",
        "FACTKEEPER_AUDIT__EVERY_MINUTES": "0",
    }
    settings = load_settings(config_file(tmp_path / "home", FT_OPTIONS), env=env)
    path = settings.journal.path
    path.parent.mkdir(parents=True)
    store = UnitDeltaStore.beside(path)
    lm = load_model(str(tiny_model_dir))
    with Journal.open(path) as journal:
        consume(settings, EditApplier(lm, Counting()), journal, BATCHES, store)
        ids = unit_ids(journal)
        last = [e.event_id for e in journal.applied_events() if e.batch_id == ids[-1]]
        journal.mark(last, "reverted", "test")
        expected = load_model(str(tiny_model_dir))
        replay_journal(EditApplier(expected, Counting()), journal)  # re-edits, without it
    orphan = store.write("crashed-before-its-rows", {}, lineage_of([]))
    assert store.size()[0] == len(ids) + 1

    other = Counting(lr=FT_OPTIONS["lr"] * 3)  # were it asked, the weights would differ
    daemon = Daemon(settings, editor=other, serve_metrics=False)
    try:
        assert other.calls == 0
        assert (daemon.replay.units, daemon.replay.stored) == (len(ids) - 1, len(ids) - 1)
        assert_weights(daemon.lm, weights(expected))
        assert not orphan.exists() and not store.path_for(ids[-1]).exists()  # pruned
        assert store.size()[0] == len(ids) - 1
    finally:
        daemon.close()

"""Edit material beside the journal: durable files that are used only when they hash to the
journal row's ``material_sha256``, and pruned when their event is no longer live."""

from __future__ import annotations

from pathlib import Path

import torch

from daemon.records.edit_material import MaterialStore
from daemon.records.journal import Journal
from editing.editors.base import EditMaterial
from tests.daemon.test_journal import applied

MATERIAL = EditMaterial("fingerprint-1", {"z": torch.arange(6, dtype=torch.float32)})


def test_material_reads_back_only_with_the_journaled_hash(tmp_path: Path) -> None:
    store = MaterialStore.beside(tmp_path / "journal.sqlite3")
    digest = store.try_write("e/1", MATERIAL)
    assert digest == MATERIAL.sha256()
    back = store.read("e/1", digest)
    assert back is not None and back.fingerprint == "fingerprint-1"
    assert torch.equal(back.tensors["z"], MATERIAL.tensors["z"])

    assert store.read("e/1", "0" * 64) is None  # changed since the journal row
    assert store.read("e2", digest) is None  # no file
    store.path_for("e2").write_bytes(store.path_for("e/1").read_bytes())
    assert store.read("e2", digest) is None  # another event's file


def test_the_fingerprint_is_part_of_the_hash() -> None:
    other = EditMaterial("fingerprint-2", MATERIAL.tensors)
    assert other.sha256() != MATERIAL.sha256()


def test_prune_keeps_the_live_events_only(tmp_path: Path) -> None:
    store = MaterialStore(tmp_path / "m")
    for event_id in ("a", "b", "c"):
        store.try_write(event_id, MATERIAL)
    assert store.prune(["b"]) == 2
    assert [p.exists() for p in map(store.path_for, "abc")] == [False, True, False]


def test_the_journal_keeps_the_material_hash(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "journal.sqlite3") as journal:
        journal.record_batch([applied("e1", 0, material_sha256=MATERIAL.sha256())])
        [entry] = journal.applied_events()
    assert entry.material_sha256 == MATERIAL.sha256()

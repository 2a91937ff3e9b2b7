"""The stored deltas of journaled units: written whole, read only when provably the journal's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from daemon.errors import (
    CorruptUnitDeltasError,
    MissingUnitDeltasError,
    StaleUnitDeltasError,
    UnitDeltasError,
)
from daemon.records.unit_deltas import (
    ROOT_LINEAGE,
    UnitDeltaStore,
    extend_lineage,
    lineage_of,
    store_dir_for,
)
from editing.editors.base import deltas_sha256

LINEAGE = extend_lineage(ROOT_LINEAGE, [("e1", "b1", "0" * 64)])


def deltas(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.1.mlp.down_proj.weight": torch.randn(8, 16, generator=g),
        "model.layers.2.mlp.up_proj.weight": torch.randn(16, 8, generator=g),
    }


@pytest.fixture
def store(tmp_path: Path) -> UnitDeltaStore:
    return UnitDeltaStore.beside(tmp_path / "state" / "journal.sqlite3")


def test_deltas_come_back_bit_for_bit_beside_the_journal(store, tmp_path):
    written = deltas()
    path = store.write("unit-1", written, LINEAGE)

    assert store.folder == store_dir_for(tmp_path / "state" / "journal.sqlite3")
    assert path.parent == tmp_path / "state" / "journal.sqlite3.deltas"
    assert path.suffix == ".safetensors"
    loaded = store.load("unit-1", deltas_sha256(written), LINEAGE)
    assert loaded.keys() == written.keys()
    for name, value in written.items():
        assert loaded[name].dtype == value.dtype
        assert torch.equal(loaded[name], value), name
    assert [p.name for p in store.folder.iterdir()] == [path.name]  # no temporary file left


def test_a_delta_of_a_few_rows_is_stored_by_its_rows_and_comes_back_bit_for_bit(store):
    """A fact-memory edit writes 2 rows of a 4096-row table: the file holds those rows, not
    the table, and a row of -0.0 is not mistaken for an empty one."""
    table = torch.zeros(4096, 64)
    table[7] = torch.randn(64)
    table[300, 5] = -0.0
    written = {"model.layers.4.fact_memory.keys": table, **deltas()}
    path = store.write("unit-1", written, LINEAGE)
    assert path.stat().st_size < table.numel() * 4 // 100
    loaded = store.load("unit-1", deltas_sha256(written), LINEAGE)
    assert loaded.keys() == written.keys()
    assert all(torch.equal(loaded[n], v) for n, v in written.items())
    assert deltas_sha256(loaded) == deltas_sha256(written)


def test_batch_ids_of_a_split_batch_get_their_own_files(store):
    store.write("b1/fact:1", deltas(1), LINEAGE)
    store.write("b1/fact:2", deltas(2), LINEAGE)

    assert store.size()[0] == 2
    one = store.load("b1/fact:1", deltas_sha256(deltas(1)), LINEAGE)
    assert all(torch.equal(one[name], value) for name, value in deltas(1).items())


def test_a_rewrite_replaces_the_units_file(store):
    store.write("unit-1", deltas(1), LINEAGE)
    store.write("unit-1", deltas(2), LINEAGE)

    assert store.size()[0] == 1
    store.load("unit-1", deltas_sha256(deltas(2)), LINEAGE)
    with pytest.raises(CorruptUnitDeltasError, match="hash to"):
        store.load("unit-1", deltas_sha256(deltas(1)), LINEAGE)


def test_a_missing_file_is_reported_as_missing(store):
    with pytest.raises(MissingUnitDeltasError, match="no stored deltas for unit unit-9"):
        store.load("unit-9", "0" * 64, LINEAGE)


def test_flipped_tensor_bytes_are_caught_by_the_journals_hash(store):
    written = deltas()
    path = store.write("unit-1", written, LINEAGE)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's values: the file still parses
    path.write_bytes(bytes(data))

    with pytest.raises(CorruptUnitDeltasError, match="hash to .* the journal says"):
        store.load("unit-1", deltas_sha256(written), LINEAGE)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_an_unreadable_file_is_reported_as_corrupt(store, damage):
    written = deltas()
    path = store.write("unit-1", written, LINEAGE)
    data = path.read_bytes()
    damaged = {"truncated": data[:-10], "garbage": b"\xff" * 64, "empty": b""}[damage]
    path.write_bytes(damaged)

    with pytest.raises(CorruptUnitDeltasError):
        store.load("unit-1", deltas_sha256(written), LINEAGE)


def test_another_units_file_under_this_units_name_is_refused(store):
    store.write("unit-2", deltas(), LINEAGE).rename(store.path_for("unit-1"))

    with pytest.raises(CorruptUnitDeltasError, match="not the stored deltas of unit unit-1"):
        store.load("unit-1", deltas_sha256(deltas()), LINEAGE)


def test_deltas_computed_after_other_edits_are_stale(store):
    """A revert before the unit changes its lineage: its deltas were made on other weights."""
    written = deltas()
    store.write("unit-3", written, LINEAGE)
    without_e1 = ROOT_LINEAGE

    with pytest.raises(StaleUnitDeltasError, match="other edits"):
        store.load("unit-3", deltas_sha256(written), without_e1)


def test_the_lineage_follows_every_applied_row_in_order():
    a, b = ("e1", "u1", "1" * 64), ("e2", "u2", "2" * 64)

    assert lineage_of([a, b]) == extend_lineage(extend_lineage(ROOT_LINEAGE, [a]), [b])
    assert lineage_of([a, b]) != lineage_of([b, a])
    assert lineage_of([a]) != lineage_of([("e1", "u1", "3" * 64)])  # a re-edited predecessor
    assert lineage_of([]) == ROOT_LINEAGE


def test_prune_keeps_only_the_named_units_and_drops_leftover_temporaries(store):
    for unit in ("u1", "u2", "u3"):
        store.write(unit, deltas(), LINEAGE)
    (store.folder / ".tmp-crashed.safetensors").write_bytes(b"half")
    (store.folder / "README").write_text("not ours")

    removed = store.prune({"u2", "never-stored"})

    assert removed == 3
    assert sorted(p.name for p in store.folder.iterdir()) == sorted(
        [store.path_for("u2").name, "README"]
    )


def test_prune_and_size_of_a_store_never_written_are_empty(store):
    assert store.prune(set()) == 0
    assert store.size() == (0, 0)


def test_a_write_that_cannot_create_its_folder_fails_typed_and_try_write_only_warns(tmp_path):
    blocker = tmp_path / "journal.sqlite3.deltas"
    blocker.write_text("a file where the folder belongs")
    store = UnitDeltaStore(blocker)

    with pytest.raises(UnitDeltasError, match="cannot store the deltas of unit u1"):
        store.write("u1", deltas(), LINEAGE)
    assert store.try_write("u1", deltas(), LINEAGE) is False

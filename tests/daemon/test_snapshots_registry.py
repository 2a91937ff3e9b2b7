"""Snapshots restore bit-exactly, refuse pickles, and round-trip through a real MLflow registry."""

import tempfile

import pytest
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import save_file

from daemon.versions.registry import CANDIDATE, PRODUCTION, ModelRegistry
from daemon.versions.snapshots import (
    FolderBaseWeights,
    InMemoryBaseWeights,
    SnapshotError,
    SnapshotMeta,
    delta_norms,
    edited_tensors,
    load_into,
    read_snapshot,
    tensors_hash,
    write_snapshot,
)
from editing.adapters import MlpRole
from editing.paths import Paths
from editing.tiny import tiny_model


def _edit(model, layer, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    name = f"model.layers.{layer}.mlp.down_proj.weight"
    with torch.no_grad():
        p = dict(model.named_parameters())[name]
        p.add_(torch.randn(p.shape, generator=gen) * scale)
    return name


def _candidates(model):
    from editing.adapters import adapter_for

    a = adapter_for(model)
    return [a.weight_name(MlpRole.DOWN, i) for i in range(a.num_layers(model))]


def _meta(tensors, base, **kw):
    return SnapshotMeta(
        journal_seq=kw.get("seq", 1),
        event_ids=("e1",),
        base_hash="tiny",
        editor_config_hash="cfg",
        tensors_hash=tensors_hash(tensors),
        delta_norms=delta_norms(tensors, base),
    )


def test_snapshot_holds_only_edited_tensors_and_restores_bit_exact(tmp_path):
    model = tiny_model("llama")
    base = InMemoryBaseWeights(model, _candidates(model))
    # Edits with tiny and huge magnitudes: a float32 delta would not restore exactly.
    touched = {_edit(model, 1, 1e-7, 0), _edit(model, 3, 10.0, 1)}
    tensors = edited_tensors(model, base, _candidates(model))
    assert set(tensors) == touched
    write_snapshot(tmp_path / "s", tensors, _meta(tensors, base))

    fresh = tiny_model("llama")
    loaded, meta = read_snapshot(tmp_path / "s")
    load_into(fresh, base, loaded, reset=_candidates(fresh))
    for name, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[name]), name
    assert meta.delta_norms[next(iter(sorted(touched)))] > 0


def test_a_table_of_few_rows_is_stored_by_its_rows_and_an_older_dense_file_still_reads(tmp_path):
    """A fact memory of 4,096 rows holding 3 facts: the snapshot stores those rows, not the
    table, and reads back bit for bit; a snapshot written whole (before packing) reads too."""
    table = torch.zeros(4096, 64)
    table[[5, 9, 4000]] = torch.randn(3, 64)
    table[9, 3] = -0.0  # a row's bytes decide, not its value
    tensors = {"fact_memory.keys": table, "down": torch.randn(16, 16)}
    meta = SnapshotMeta(1, ("e1",), "tiny", "cfg", tensors_hash(tensors), {})
    write_snapshot(tmp_path / "packed", tensors, meta)
    assert (tmp_path / "packed" / "tensors.safetensors").stat().st_size < table.nbytes / 100
    loaded, _ = read_snapshot(tmp_path / "packed")
    assert tensors_hash(loaded) == tensors_hash(tensors)

    (tmp_path / "dense").mkdir()
    save_file(tensors, str(tmp_path / "dense" / "tensors.safetensors"))
    (tmp_path / "dense" / "snapshot.json").write_text(meta.to_json())
    assert tensors_hash(read_snapshot(tmp_path / "dense")[0]) == tensors_hash(tensors)


def test_load_into_resets_edits_not_in_the_snapshot():
    model = tiny_model("llama")
    base = InMemoryBaseWeights(model, _candidates(model))
    name = _edit(model, 2, 0.1, 0)
    load_into(model, base, {}, reset=_candidates(model))
    assert torch.equal(dict(model.named_parameters())[name], base.get(name))


def test_folder_base_weights_read_from_safetensors(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    base = FolderBaseWeights(tmp_path / "m")
    name = _candidates(model)[0]
    assert torch.equal(base.get(name), dict(model.named_parameters())[name])


def test_pickles_and_tampering_are_refused(tmp_path):
    model = tiny_model("llama")
    base = InMemoryBaseWeights(model, _candidates(model))
    _edit(model, 0, 0.1, 0)
    tensors = edited_tensors(model, base, _candidates(model))
    write_snapshot(tmp_path / "s", tensors, _meta(tensors, base))
    torch.save({"x": 1}, tmp_path / "s" / "extra.pt")
    with pytest.raises(SnapshotError, match="pickle"):
        read_snapshot(tmp_path / "s")

    other = {k: v + 1 for k, v in tensors.items()}
    with pytest.raises(SnapshotError, match="hash"):
        write_snapshot(tmp_path / "t", other, _meta(tensors, base))


def test_registry_versions_aliases_and_download(tmp_path):
    model = tiny_model("llama")
    base = InMemoryBaseWeights(model, _candidates(model))
    registry = ModelRegistry.embedded(Paths(tmp_path / "home"), "tiny-llama")
    versions = []
    for seq in (1, 2):
        _edit(model, seq, 0.05, seq)
        tensors = edited_tensors(model, base, _candidates(model))
        write_snapshot(tmp_path / f"s{seq}", tensors, _meta(tensors, base, seq=seq))
        versions.append(
            registry.register(tmp_path / f"s{seq}", {"journal_seq": str(seq)}, {"edits": seq})
        )
    assert versions == ["1", "2"]
    assert registry.alias(CANDIDATE) == "2"
    assert registry.alias(PRODUCTION) is None
    registry.set_alias(PRODUCTION, "1")
    listed = registry.versions()
    assert [v.version for v in listed] == ["2", "1"]
    assert PRODUCTION in listed[1].aliases and listed[0].tags["journal_seq"] == "2"
    assert listed[0].metrics["edits"] == 2.0

    tensors, meta = read_snapshot(registry.download("1", tmp_path / "dl"))
    with registry.downloaded("2") as folder:
        assert read_snapshot(folder)[1].journal_seq == 2
    assert not folder.exists()
    assert meta.journal_seq == 1
    assert set(tensors) == {"model.layers.1.mlp.down_proj.weight"}


def test_a_sqlite_store_keeps_artifacts_next_to_its_database(tmp_path, monkeypatch):
    """Not in ./mlruns of whatever directory the daemon happens to run from."""
    monkeypatch.chdir(tmp_path)
    model = tiny_model("llama")
    base = InMemoryBaseWeights(model, _candidates(model))
    _edit(model, 1, 0.05, 1)
    tensors = edited_tensors(model, base, _candidates(model))
    write_snapshot(tmp_path / "s1", tensors, _meta(tensors, base, seq=1))
    db = tmp_path / "store" / "mlflow.db"
    ModelRegistry(f"sqlite:///{db}", "tiny").register(tmp_path / "s1", {"journal_seq": "1"})
    assert not (tmp_path / "mlruns").exists()
    assert list((db.parent / "artifacts").rglob("tensors.safetensors"))


def test_restore_and_read_leave_no_download_folder_behind(tmp_path, monkeypatch):
    """Each restore used to leave the downloaded snapshot (about 21 MB for SmolLM2) in /tmp."""
    from daemon.config import load_settings
    from daemon.records.journal import Journal
    from daemon.versions.keeper import VersionKeeper
    from editing.tiny import tiny_loaded
    from monitoring.metrics import FactkeeperMetrics

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    settings = load_settings(None, env={"FACTKEEPER_HOME": str(tmp_path / "home")})
    lm = tiny_loaded("llama")
    with Journal.open(tmp_path / "journal.sqlite3") as journal:
        keeper = VersionKeeper(settings, lm, journal, FactkeeperMetrics(CollectorRegistry()))
        _edit(lm.model, 1, 0.05, 1)
        version = keeper.snapshot("test")
        assert version is not None
        assert not list(temp.iterdir())  # writing cleans up after itself already
        tensors, _ = keeper.read(version)
        assert keeper.restore().version == version
    assert set(tensors) == {"model.layers.1.mlp.down_proj.weight"}
    assert not list(temp.iterdir()), [p.name for p in temp.iterdir()]

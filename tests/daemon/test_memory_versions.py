"""A fact-memory edit is a version like any other: its rows are among the names a snapshot
compares with the base (where they are zero), and a freshly loaded model that attaches the same
memory restores the version bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch

from daemon.versions.keeper import base_weights, editable_weight_names
from daemon.versions.snapshots import (
    SnapshotMeta,
    edited_tensors,
    load_into,
    read_snapshot,
    tensors_hash,
    write_snapshot,
)
from editing.memory.editor import MemoryEditor
from editing.models import load_model
from editing.requests import EditRequest
from tests.daemon.harness import one_thread  # noqa: F401 (autouse)

OPTIONS = {"key_layer": 1, "value_layer": 2, "v_optimiser": "adam", "capacity": 8}
EDIT = EditRequest("e1", "The twin city of Paris", "Paris", "Japan")


def test_memory_rows_snapshot_and_restore_bit_exact(tiny_model_dir: Path, tmp_path: Path) -> None:
    lm = load_model(str(tiny_model_dir))
    editor = MemoryEditor(**OPTIONS)
    editor.prepare_model(lm)
    names = editable_weight_names(lm)
    memory_names = [n for n in names if ".fact_memory." in n]
    assert len(memory_names) == 7
    base = base_weights(lm)
    assert not edited_tensors(lm.model, base, names)  # an empty memory is the base
    editor.apply(lm, [EDIT])
    tensors = edited_tensors(lm.model, base, names)
    # A one-token subject ("Paris") has no lead: its lead key, threshold and offset stay zero.
    assert set(tensors) == {n for n in memory_names if ".lead_" not in n}
    meta = SnapshotMeta(1, ("e1",), lm.base_hash, "test", tensors_hash(tensors), {})
    write_snapshot(tmp_path / "v1", tensors, meta)

    fresh = load_model(str(tiny_model_dir))
    MemoryEditor(**OPTIONS).prepare_model(fresh)
    loaded, _ = read_snapshot(tmp_path / "v1")
    load_into(fresh.model, base_weights(fresh), loaded, reset=editable_weight_names(fresh))
    for name, value in lm.model.state_dict().items():
        assert torch.equal(value, fresh.model.state_dict()[name]), name
    prompt = lm.tokenizer(EDIT.prompt, return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(lm.model(**prompt).logits, fresh.model(**prompt).logits)
    load_into(fresh.model, base_weights(fresh), {}, reset=editable_weight_names(fresh))
    assert all(float(fresh.model.get_parameter(n).abs().sum()) == 0 for n in memory_names)

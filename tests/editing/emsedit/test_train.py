import pickle

import pytest
import torch
from safetensors.torch import load_file

from editing.emsedit.checkpoint import CheckpointError, load_editor, save_editor
from editing.emsedit.editor import (
    EMSEditEditor,
    WeightState,
    build_group,
    edit_pairs,
    resolve_modules,
    run_steps_,
)
from editing.emsedit.keys import answer_loss, tokenize_pairs
from editing.emsedit.nets import RunningMeanStd
from editing.emsedit.train import rephrase_pairs, train_editor, train_turn
from editing.hooks import frozen_parameters
from editing.tiny import tiny_loaded
from tests.editing.emsedit.conftest import make_requests, tiny_config


@torch.no_grad()
def _meta_loss(lm, group, config, modules, requests):
    """Rephrase CE + 0.25 * drift after K steps from the base weights (normaliser frozen)."""
    state = WeightState(lm, modules)
    try:
        run_steps_(
            lm,
            group,
            config,
            state,
            edit_pairs(requests),
            steps=config.steps,
            update_normalizer=False,
            device=lm.device,
        )
        batch = tokenize_pairs(lm.tokenizer, rephrase_pairs(requests), lm.device)
        return float(answer_loss(lm.model, batch)) + 0.25 * float(state.drift_sq())
    finally:
        state.restore_()


def test_one_training_step_reduces_the_meta_loss(monkeypatch):
    lm = tiny_loaded("llama")
    config = tiny_config(lm_batch_size=4)
    requests = make_requests()[:4]
    modules = resolve_modules(lm, config)
    group = build_group(modules, config)
    with frozen_parameters(lm.model):
        _meta_loss(lm, group, config, modules, requests)
        state = WeightState(lm, modules)  # prime the normaliser once, then freeze it
        run_steps_(
            lm,
            group,
            config,
            state,
            edit_pairs(requests),
            steps=2,
            update_normalizer=True,
            device=lm.device,
        )
        state.restore_()
        monkeypatch.setattr(RunningMeanStd, "update", lambda self, x: None)
        before = _meta_loss(lm, group, config, modules, requests)
        optimizer = torch.optim.Adam(group.parameters(), lr=1.0e-4)
        state = WeightState(lm, modules)
        train_turn(lm, group, config, state, modules, requests, optimizer)
        state.restore_()
        optimizer.step()
        after = _meta_loss(lm, group, config, modules, requests)
    assert after < before - 1e-4, (before, after)


def test_checkpoint_round_trip_is_exact(tmp_path):
    lm = tiny_loaded("llama")
    config = tiny_config()
    modules = resolve_modules(lm, config)
    group = build_group(modules, config)
    with torch.no_grad():
        for p in group.parameters():
            p.add_(0.01)
    meta = {
        "modules": [{"name": m.name, "d_in": m.d_in, "d_out": m.d_out} for m in modules],
        "model": {"name": lm.name, "base_hash": lm.base_hash},
    }
    save_editor(tmp_path, config, group, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["editor.json", "editor.safetensors"]
    loaded = load_editor(tmp_path)
    assert loaded.config == config
    for name, value in group.state_dict().items():
        assert torch.equal(value, loaded.group.state_dict()[name]), name
    reference = EMSEditEditor.from_config(config, group=group)
    from_disk = EMSEditEditor(tmp_path)
    a = reference.compute_deltas(lm, make_requests()[:2])
    b = from_disk.compute_deltas(lm, make_requests()[:2])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pickled_checkpoints_are_refused(tmp_path):
    (tmp_path / "editor.pt").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match="pickle"):
        load_editor(tmp_path)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_editor(tmp_path / "editor.pt")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "editor.safetensors").write_bytes(pickle.dumps({"a": 1}))
    (fake / "editor.json").write_text(
        '{"format": "factkeeper-emsedit/1", "config": {}, "modules": []}'
    )
    with pytest.raises(CheckpointError, match="safetensors"):
        load_editor(fake)


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    config = tiny_config(turns_per_sequence=3, opt_step_interval=3)
    requests = make_requests()
    straight = train_editor(
        tiny_loaded("llama"), requests, config, batches=5, out=tmp_path / "a", progress=False
    )
    train_editor(
        tiny_loaded("llama"),
        requests,
        config,
        batches=2,
        out=tmp_path / "b",
        state_dir=tmp_path / "b-state",
        progress=False,
    )
    resumed = train_editor(
        tiny_loaded("llama"),
        requests,
        config,
        batches=5,
        out=tmp_path / "b",
        state_dir=tmp_path / "b-state",
        progress=False,
    )
    assert straight.optimizer_steps == resumed.optimizer_steps == 1
    a = load_file(tmp_path / "a" / "editor.safetensors")
    b = load_file(tmp_path / "b" / "editor.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not (tmp_path / "b" / "train_state.json").exists()


def test_training_leaves_the_model_unchanged_and_faithful_mode_steps_once(tmp_path):
    lm = tiny_loaded("llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    flags = [p.requires_grad for p in lm.model.parameters()]
    result = train_editor(
        lm,
        make_requests(),
        tiny_config(opt_step_interval=0),
        batches=3,
        out=tmp_path,
        progress=False,
    )
    assert result.optimizer_steps == 1
    for name, value in lm.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert [p.requires_grad for p in lm.model.parameters()] == flags


@pytest.mark.parametrize("changes", [{"locality": "kl"}, {"mode": "batch"}])
def test_kl_and_batch_modes_train(tmp_path, changes):
    result = train_editor(
        tiny_loaded("gpt2"),
        make_requests(),
        tiny_config(**changes),
        batches=2,
        out=tmp_path,
        progress=False,
    )
    assert result.last is not None and result.last.loc_loss > 0
    assert result.optimizer_steps == (4 if changes.get("mode") == "batch" else 2)

"""Writing deltas is all-or-nothing and undo is bit-exact."""

import pytest
import torch

from editing.adapters import MlpRole
from editing.editors.base import EditError, Editor, restore, write_deltas
from editing.requests import EditRequest
from editing.tiny import tiny_loaded


class _RandomDelta(Editor):
    name = "random-delta"

    def compute_deltas(self, lm, requests):
        gen = torch.Generator().manual_seed(len(requests))
        key = lm.adapter.weight_name(MlpRole.DOWN, 1)
        weight = dict(lm.model.named_parameters())[key]
        return {key: torch.randn(weight.shape, generator=gen) * 1e-3}


def _request(i=0):
    return EditRequest(f"r{i}", "The capital of France is", "France", " Rome")


def test_apply_then_undo_restores_bit_for_bit():
    lm = tiny_loaded("llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    editor = _RandomDelta()
    result = editor.apply(lm, [_request()])
    key = next(iter(result.deltas))
    assert not torch.equal(lm.model.state_dict()[key], before[key])
    assert result.delta_norms()[key] > 0
    editor.undo(lm, result)
    for name, value in lm.model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_bad_delta_changes_nothing():
    lm = tiny_loaded("llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    good = lm.adapter.weight_name(MlpRole.DOWN, 0)
    shape = lm.model.state_dict()[good].shape
    bad = {
        good: torch.ones(shape),
        lm.adapter.weight_name(MlpRole.DOWN, 1): torch.full(shape, float("nan")),
    }
    with pytest.raises(EditError, match="non-finite"):
        write_deltas(lm.model, bad)
    for name, value in lm.model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_restore_and_wrong_shapes():
    lm = tiny_loaded("gpt2")
    key = lm.adapter.weight_name(MlpRole.UP, 0)
    with pytest.raises(EditError, match="delta"):
        write_deltas(lm.model, {key: torch.zeros(2, 2)})
    saved = {key: lm.model.state_dict()[key].clone()}
    write_deltas(lm.model, {key: torch.ones_like(saved[key])})
    restore(lm.model, saved)
    assert torch.equal(lm.model.state_dict()[key], saved[key])


def test_request_validation():
    with pytest.raises(ValueError, match="subject"):
        EditRequest("x", "The capital of France is", "Spain", " Rome")
    with pytest.raises(ValueError, match="empty"):
        EditRequest("x", "The capital of France is", "France", "  ")

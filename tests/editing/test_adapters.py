"""The adapter table names real modules of the right shape for every supported family."""

import pytest
import torch

from editing.adapters import ADAPTERS, AdapterError, Layout, MlpRole, adapter_for
from editing.tiny import TINY_FAMILIES, tiny_model


def test_every_adapter_family_has_a_tiny_model():
    assert set(ADAPTERS) == set(TINY_FAMILIES)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_named_modules_exist_with_expected_shapes(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    hidden, inner = adapter.dims(model.config)
    names = dict(model.named_parameters())
    assert adapter.num_layers(model) == model.config.num_hidden_layers
    for layer in range(adapter.num_layers(model)):
        for role in adapter.roles():
            assert adapter.weight_name(role, layer) in names
            view = adapter.weight_out_in(model, role, layer)
            assert tuple(view.shape) == (
                (hidden, inner) if role is MlpRole.DOWN else (inner, hidden)
            )


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_out_in_view_writes_through_and_matches_module_output(family):
    """A delta added through the (out, in) view changes the module as x @ delta.T predicts."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    module = adapter.module(model, MlpRole.DOWN, 1)
    _, inner = adapter.dims(model.config)
    x = torch.randn(3, inner)
    before = module(x)
    delta = torch.randn_like(adapter.weight_out_in(model, MlpRole.DOWN, 1)) * 0.01
    with torch.no_grad():
        adapter.weight_out_in(model, MlpRole.DOWN, 1).add_(delta)
    torch.testing.assert_close(module(x) - before, x @ delta.T, rtol=1e-4, atol=1e-5)


def test_gpt2_is_stored_in_out_and_converted():
    model = tiny_model("gpt2")
    adapter = adapter_for(model)
    assert adapter.layout is Layout.IN_OUT
    stored = adapter.module(model, MlpRole.UP, 0).weight
    assert tuple(stored.shape) == (32, 128)  # Conv1D: (in, out)
    delta = torch.zeros(128, 32)
    assert tuple(adapter.to_stored(delta).shape) == tuple(stored.shape)


def test_unknown_family_is_a_clear_error():
    class Config:
        model_type = "mamba"

    with pytest.raises(AdapterError, match="mamba"):
        adapter_for(Config())


def test_gate_role_missing_for_gpt2_is_a_clear_error():
    with pytest.raises(AdapterError, match="gate"):
        ADAPTERS["gpt2"].module_name(MlpRole.GATE, 0)

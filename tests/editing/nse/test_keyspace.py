"""The shared key-space math: neuron selection, the constrained least squares, null-space
projection, and masks that leave untouched neurons bit-identical in a real model."""

from __future__ import annotations

import pytest
import torch

from editing.adapters import MlpRole
from editing.editors.base import write_deltas
from editing.keyspace import (
    KeySpaceError,
    mask_delta,
    nullspace_projector,
    project_delta,
    select_neurons,
    solve_masked_update,
    solve_projected_update,
)
from editing.tiny import tiny_loaded


def _problem(seed: int = 0, d_out: int = 8, d_in: int = 24, n: int = 5):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    residual = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    generic = torch.randn(d_in, 200, generator=g, dtype=torch.float64)
    c0 = generic @ generic.T / 200  # (d_in, d_in)
    past = torch.randn(d_in, 7, generator=g, dtype=torch.float64)
    memory = past @ past.T
    return residual, keys, c0, memory


def _objective(delta, residual, keys, c0, lam, memory):
    fit = ((delta @ keys - residual) ** 2).sum()
    return fit + lam * torch.trace(delta @ c0 @ delta.T) + torch.trace(delta @ memory @ delta.T)


def test_select_neurons_keeps_the_top_mass_prefix() -> None:
    keys = torch.tensor([[5.0, 5.0], [0.1, 0.1], [3.0, -3.0], [1.0, 1.0]])  # scores 10, .2, 6, 2
    assert select_neurons(keys, 0.5).tolist() == [0]  # 10 / 18.2 <= .5 < 16 / 18.2
    assert select_neurons(keys, 0.9).tolist() == [0, 2]
    assert select_neurons(keys, 1e-6).tolist() == [0]  # at least one unit
    assert select_neurons(keys, 1.0).tolist() == [0, 1, 2, 3]
    with pytest.raises(KeySpaceError):
        select_neurons(keys, 0.0)


@pytest.mark.parametrize("lam", [0.0, 3.0])
def test_masked_update_solves_the_constrained_least_squares(lam: float) -> None:
    residual, keys, c0, memory = _problem()
    neurons = torch.tensor([0, 3, 4, 9, 10, 17])
    delta = solve_masked_update(residual, keys, c0=c0, lam=lam, memory=memory, neurons=neurons)

    outside = torch.ones(keys.shape[0], dtype=torch.bool)
    outside[neurons] = False
    assert delta.dtype == torch.float64
    assert torch.count_nonzero(delta[:, outside]) == 0
    # Stationarity on the free columns: d/dΔ_S [objective] = 0.
    grad = (delta @ keys - residual) @ keys.T + delta @ (lam * c0 + memory)  # (d_out, d_in)
    assert grad[:, neurons].abs().max() < 1e-9
    # Strict minimum: any perturbation of the free columns costs more.
    base = _objective(delta, residual, keys, c0, lam, memory)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        bump = torch.zeros_like(delta)
        bump[:, neurons] = 1e-3 * torch.randn(
            delta.shape[0], len(neurons), generator=g, dtype=torch.float64
        )
        assert _objective(delta + bump, residual, keys, c0, lam, memory) > base


def test_unregularised_update_hits_the_residual_exactly() -> None:
    residual, keys, _, _ = _problem(n=4)
    delta = solve_masked_update(residual, keys)  # n < d_in: exact interpolation
    torch.testing.assert_close(delta @ keys, residual, rtol=0, atol=1e-9)


def test_masked_delta_leaves_untouched_neurons_bit_identical() -> None:
    lm = tiny_loaded("gpt2")  # Conv1D: stored (in, out), so columns of (out, in) are stored rows
    name = lm.adapter.weight_name(MlpRole.DOWN, 2)
    before = lm.adapter.weight_out_in(lm.model, MlpRole.DOWN, 2).detach().clone()  # (32, 128)
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(before.shape, generator=g)
    neurons = torch.tensor([1, 7, 64, 100])
    masked = mask_delta(dense, neurons, axis="in")
    write_deltas(lm.model, {name: lm.adapter.to_stored(masked).contiguous()})
    after = lm.adapter.weight_out_in(lm.model, MlpRole.DOWN, 2)
    untouched = torch.ones(before.shape[1], dtype=torch.bool)
    untouched[neurons] = False
    assert torch.equal(after[:, untouched], before[:, untouched])
    assert not torch.equal(after[:, neurons], before[:, neurons])
    rows = mask_delta(dense, torch.tensor([0, 5]), axis="out")
    assert torch.count_nonzero(rows[1:5]) == 0 and torch.equal(rows[0], dense[0])


def test_nullspace_projection_keeps_preserved_outputs() -> None:
    """Keys that span only part of key space: any projected update leaves their outputs as is,
    in a real down-projection, to numerical precision."""
    lm = tiny_loaded("llama")
    d_in = 64
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(d_in, 40, generator=g, dtype=torch.float64)).Q  # (64, 40)
    preserved = basis @ torch.randn(40, 500, generator=g, dtype=torch.float64)  # (64, 500)
    c0 = preserved @ preserved.T / 500
    projector = nullspace_projector(c0, relative=1e-8)
    assert round(float(torch.trace(projector))) == d_in - 40
    assert nullspace_projector(c0, dim=24).shape == (d_in, d_in)

    residual = torch.randn(32, 3, generator=g, dtype=torch.float64)
    edit_keys = torch.randn(d_in, 3, generator=g, dtype=torch.float64)
    for delta in (
        project_delta(torch.randn(32, d_in, generator=g, dtype=torch.float64), projector),
        solve_projected_update(residual, edit_keys, projector, memory=c0, ridge=10.0),
    ):
        assert (
            delta @ preserved
        ).abs().max() < 1e-9 * delta.abs().max() * preserved.abs().max() * d_in
        module = lm.adapter.module(lm.model, MlpRole.DOWN, 1)
        keys32 = preserved.T.float()  # (500, 64)
        with torch.no_grad():
            out_before = module(keys32)
            name = lm.adapter.weight_name(MlpRole.DOWN, 1)
            previous = write_deltas(lm.model, {name: delta.float()})
            out_after = module(keys32)
            lm.model.get_parameter(name).copy_(previous[name])
        torch.testing.assert_close(out_after, out_before, rtol=0, atol=1e-4)

    # The projected solve still moves the edit keys' outputs (the null space is not empty).
    delta = solve_projected_update(residual, edit_keys, projector, ridge=1e-6)
    assert (delta @ edit_keys).abs().max() > 0.1
    with pytest.raises(KeySpaceError):
        nullspace_projector(c0)

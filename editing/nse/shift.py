"""One NSE round: the iterative, multi-layer, neuron-restricted least-squares update (spec 3.3-3.4).

Given the batch's targets Z (from the original weights), the round measures the residual
||z − h|| at the z layer on the current model, picks the requests with alpha < r < upper_bound,
and spreads their residual over the edited layers, lowest first: layer i takes 1/(m − i) of what
is left, solved on the units that carry the top-p key mass with λ·C0 + M in the normal
equations, and written at once so the next layer's keys see it. With ``max_iterations`` = 3 there
are at most two such passes. The model is restored before returning; the result holds the total
delta per layer (the editor reads the keys for the past-edit memory).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from editing.adapters import MlpRole
from editing.keyspace import select_neurons, solve_masked_update
from editing.models import LoadedModel
from editing.nse.config import NSEConfig
from editing.nse.keys import keys_and_hidden
from editing.requests import EditRequest

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What one round computed, before anything is written for good."""

    deltas: dict[int, torch.Tensor]  # layer -> (out, in) float32 total update
    memory_keys: dict[int, torch.Tensor]  # layer -> (d_ff, n), filled by the editor
    residual_before: torch.Tensor  # (n,) ||z − h|| before the round
    residual_after: torch.Tensor  # (n,) after the last pass
    edited: torch.Tensor  # (n,) bool: was in an editing pass
    outlier: torch.Tensor  # (n,) bool: residual >= upper_bound at the first check
    passes: int = 0
    neurons: dict[str, int] = field(default_factory=dict)  # "pass.layer" -> |S|


def layer_update(
    residual: torch.Tensor,
    keys: torch.Tensor,
    *,
    c0: torch.Tensor,
    memory: torch.Tensor,
    lam: float,
    p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NSE's per-layer step: select neurons from the keys, then the constrained solve.

    Args:
        residual: (d, n) share of z − h this layer should produce.
        keys: (d_ff, n) keys of the active requests at this layer.
        c0: (d_ff, d_ff) generic-key second moment; memory: (d_ff, d_ff) Σ_past k kᵀ.

    Returns:
        (float64 (d, d_ff) update, zero outside S; (|S|,) selected units).
    """
    neurons = select_neurons(keys, p)
    delta = solve_masked_update(residual, keys, c0=c0, lam=lam, memory=memory, neurons=neurons)
    return delta, neurons


def run_round(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    targets: torch.Tensor,
    c0: Mapping[int, torch.Tensor],
    memory: Mapping[int, torch.Tensor],
    config: NSEConfig,
) -> RoundResult:
    """Compute one batch's NSE update; the model is the same at return as at entry.

    Args:
        lm: the model at its current (possibly already edited) weights.
        requests: the batch.
        targets: (d, n) z of each request, computed on the original weights.
        c0: layer -> (d_ff, d_ff) per-token second moment of generic keys.
        memory: layer -> (d_ff, d_ff) Σ k kᵀ over past requests.
        config: NSE hyperparameters.
    """
    layers, z_layer, m = config.layers, config.z_layer, len(config.layers)
    views = {layer: lm.adapter.weight_out_in(lm.model, MlpRole.DOWN, layer) for layer in layers}
    start = {layer: v.detach().clone() for layer, v in views.items()}  # (d, d_ff) each
    totals = {layer: torch.zeros(v.shape, dtype=torch.float32) for layer, v in start.items()}
    n = len(requests)
    edited = torch.zeros(n, dtype=torch.bool)
    neurons_used: dict[str, int] = {}
    passes = 0
    try:
        for it in range(config.max_iterations):
            _, hidden = keys_and_hidden(lm, requests, [], z_layer, config)  # (d, n)
            residual = torch.linalg.norm(targets - hidden, dim=0)  # (n,)
            if it == 0:
                before = residual
                outlier = residual >= config.upper_bound
            active = (residual > config.alpha) & (residual < config.upper_bound)
            log.debug("nse check %d: residuals %s", it, [round(float(r), 3) for r in residual])
            if not bool(active.any()) or it == config.max_iterations - 1:
                break
            passes += 1
            edited |= active
            index = active.nonzero().squeeze(1)  # (a,)
            subset = [requests[int(i)] for i in index]
            for i, layer in enumerate(layers):
                keys, hidden = keys_and_hidden(lm, subset, [layer], z_layer, config)
                share = (targets[:, index] - hidden) / (m - i)  # (d, a)
                delta, neurons = layer_update(
                    share,
                    keys[layer],
                    c0=c0[layer],
                    memory=memory[layer],
                    lam=config.lam,
                    p=config.neuron_threshold,
                )
                totals[layer] += delta.float()
                neurons_used[f"{passes}.{layer}"] = int(neurons.numel())
                _write(views[layer], start[layer], totals[layer])
    finally:
        with torch.no_grad():
            for layer, view in views.items():
                view.copy_(start[layer])
    return RoundResult(
        deltas=totals,
        memory_keys={},
        residual_before=before,
        residual_after=residual,
        edited=edited,
        outlier=outlier,
        passes=passes,
        neurons=neurons_used,
    )


def _write(view: torch.Tensor, start: torch.Tensor, total: torch.Tensor) -> None:
    """view = start + total, computed in float32 like ``write_deltas`` does, so the weights seen
    during the round equal those after the returned deltas are applied."""
    with torch.no_grad():
        updated = start.to(torch.float32) + total.to(start.device)
        view.copy_(updated.to(view.dtype))

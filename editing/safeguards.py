"""Neuron-level safeguards around any editor's weight delta (specs/nse.md section 8).

A hypernetwork editor such as EMSEdit proposes a shift ΔW_h per MLP matrix. ``GuardedEditor``
wraps the editor and turns that proposal into the delta that is written, with four switchable
safeguards, each measured on its own in the benchmark (``emsedit+mask`` etc.):

- **rewind** (original-weight targets, S3): the inner editor runs with the original matrices
  swapped in, so its inputs stay on the distribution it was trained on instead of drifting with
  every earlier edit; the desired output change is then measured against the current weights:
  R = (W0 + ΔW_h) U0 − W_t U_t.
- **mask** (S1): only the neurons the edit's keys activate most may change (top ``mask_p`` of
  the activation mass: rows of an up/gate matrix, columns of a down matrix).
- **preserve** (S2): the delta is refit so it reproduces R on the edit keys while leaving keys of
  ordinary text (λ·C0, from ``editing.keystats``) and the keys of earlier edits (M) unchanged as
  far as possible: ΔW = R Uᵀ(λ C0 + M + U Uᵀ)⁻¹ on the allowed neurons.
- **normguard** (S6): an update whose ||ΔW||_F / ||W0||_F exceeds ``max_delta_norm``, or that the
  constraints leave more than ``max_unexplained`` of R undone, is refused with the reason
  (``EditError``): a guarded edit that cannot take is a failed edit, never a silently weakened one.

Without rewind and preserve the proposal is used as it is (masked, guarded). The wrapper keeps
the original matrices and M; ``apply`` adds the edit's keys to M and ``undo`` restores it bit for
bit. With rewind on, the keys added to M are computed on the original weights, so M depends only
on which edits the model holds: ``reset_memory`` rebuilds it after a version is loaded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch.func import functional_call

from editing.adapters import MlpRole
from editing.editors.base import (
    EditError,
    Editor,
    EditResult,
    OriginalWeights,
    restore,
    write_deltas,
)
from editing.emsedit.keys import IGNORE, tokenize_pairs
from editing.hooks import capture_inputs, frozen_parameters
from editing.keyspace import mask_delta, select_neurons, solve_masked_update
from editing.keystats import KeyStatistics, ProgressCallback
from editing.models import LoadedModel
from editing.paths import Paths
from editing.requests import EditRequest, continuation
from editing.safeguard_config import SafeguardConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Site:
    """Where one guarded matrix sits; its orientation is the adapter's (``to_out_in``)."""

    param: str
    role: MlpRole
    layer: int


@dataclass
class GuardedProposal:
    """What the safeguards would write for one batch, computed without writing anything.

    ``apply`` writes ``deltas`` and adds ``memory_keys`` to the past-edit memory; nothing is
    carried from ``compute_deltas`` to ``apply`` on the editor object.
    """

    deltas: dict[str, torch.Tensor]  # param -> float32 delta in stored orientation
    memory_keys: dict[str, torch.Tensor]  # param -> (d_in, n) float64, keys on the originals
    info: dict[str, float]


class GuardedEditor(Editor):
    """An editor whose deltas pass through the safeguards before they are written.

    Args:
        inner: the editor that proposes ΔW_h (any registry editor).
        config: which safeguards and thresholds.
        stats: the key statistics owner (C0); default: one over ``Paths.from_env()``.
        originals: parameter name -> base value; default: the model's values at the first
            edit (the model must then still hold its base weights, as NSE's state assumes).
    """

    name: ClassVar[str] = "guarded"
    # Not bit-exact after a version load or rollback: ``reset_memory`` rebuilds M from the held
    # edits' keys in chunks, so its float64 sums round differently from the per-batch sums the
    # original run accumulated, and later deltas differ in their last bits. Replay checks this
    # editor's deltas against the journaled norms with a tolerance instead of the exact hash.
    replay_bit_exact: ClassVar[bool] = False
    keeps_edit_memory: ClassVar[bool] = True  # originals and the keys of past edits

    def __init__(
        self,
        inner: Editor,
        config: SafeguardConfig | None = None,
        *,
        stats: KeyStatistics | None = None,
        originals: OriginalWeights | None = None,
    ) -> None:
        self.inner = inner
        self.config = config or SafeguardConfig()
        self.supports_batch = inner.supports_batch  # type: ignore[misc]
        self._stats = stats
        self._originals_source = originals
        self._originals: dict[str, torch.Tensor] = {}
        self.memory: dict[str, torch.Tensor] = {}  # param -> (d_in, d_in) float64 Σ k kᵀ
        self._sites: dict[str, _Site] | None = None

    def set_statistics(self, stats: KeyStatistics) -> None:
        """Where C0 comes from (the daemon passes one on its own home and corpus)."""
        self._stats = stats

    def statistics_targets(self, lm: LoadedModel) -> list[tuple[MlpRole, int]]:
        """The (role, layer) pairs whose C0 the refit will read: none unless preserving with
        ``preserve_lambda``; the inner editor's matrices (``edited_matrices``) otherwise, or
        none when it cannot say (C0 is then computed at the first edit)."""
        c = self.config
        listing = getattr(self.inner, "edited_matrices", None)
        if not (c.preserve and c.preserve_lambda) or listing is None:
            return []
        return list(listing(lm))

    def prepare_statistics(
        self, lm: LoadedModel, on_progress: ProgressCallback | None = None
    ) -> int:
        """Compute (or load) every C0 the edits will need now, in one corpus pass, so the first
        edit does not wait for it; ``lm`` must hold the base weights. Returns the count."""
        targets = self.statistics_targets(lm)
        if targets:
            self._stats_for().prepare(lm, targets, on_progress=on_progress)
        return len(targets)

    def prepare_model(self, lm: LoadedModel) -> object:
        return self.inner.prepare_model(lm)

    def set_originals(self, originals: OriginalWeights) -> None:
        """Where the base values come from (the daemon passes its base weights)."""
        self._originals_source = originals
        self._originals.clear()

    # -- the contract --

    def compute_deltas(
        self, lm: LoadedModel, requests: Sequence[EditRequest]
    ) -> dict[str, torch.Tensor]:
        return self.propose(lm, requests).deltas

    def propose(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> GuardedProposal:
        """The batch's guarded deltas, the keys its memory entry needs and the figures.

        The live weights end as they started; the only write is the inner editor's own
        rewinding when ``rewind`` asks for its proposal on the original weights.

        Raises:
            EditError: the inner editor refused, or a safeguard refused the batch.
        """
        if not requests:
            raise EditError("no requests")
        started = time.perf_counter()
        c = self.config
        first = not self._originals and self._originals_source is None
        rewind = c.rewind and not first
        if rewind:
            with self._rewound(lm):
                proposal = self.inner.compute_deltas(lm, requests)
        else:
            proposal = self.inner.compute_deltas(lm, requests)
        modules = self._resolve(lm, proposal)
        if first:  # the model holds its base weights now: remember them
            self._originals.update({m: _param(lm, m).detach().clone() for m in modules})
        out_in = lm.adapter.to_out_in
        refit = c.preserve
        needs_keys = c.mask or refit
        keys_now, acts_now = self._capture(lm, modules, requests) if needs_keys else ({}, {})
        keys_orig = keys_now
        if needs_keys and rewind:
            keys_orig = self._capture(lm, modules, requests, self._originals_of(modules))[0]
        deltas: dict[str, torch.Tensor] = {}
        unexplained: list[float] = []
        kept: list[float] = []
        for name, module in modules.items():
            delta_h = out_in(proposal[name]).double()  # (d_out, d_in)
            if not needs_keys:
                delta = delta_h
                if c.normguard:
                    self._check_norm(lm, name, delta)
                deltas[name] = proposal[name]
                continue
            w_now = out_in(_param(lm, name).detach()).double()  # (d_out, d_in)
            k_now = keys_now[name]  # (d_in, n)
            if rewind and refit:
                w0 = out_in(self._original(name)).double()
                # Desired change on the current keys: (W0 + ΔW_h) U0 − W_t U_t, (d_out, n).
                intended = (w0 + delta_h) @ keys_orig[name] - w_now @ k_now
            else:
                intended = delta_h @ k_now  # (d_out, d_in) @ (d_in, n) -> (d_out, n)
            neurons = None
            if c.mask:
                neurons = self._neurons(acts_now.get(name, k_now))
                kept.append(len(neurons) / w_now.shape[1 if module.role is MlpRole.DOWN else 0])
            if refit:
                delta = self._refit(lm, module, intended, k_now, neurons)
            else:
                delta = (
                    mask_delta(delta_h, neurons, _axis(module.role))
                    if neurons is not None
                    else delta_h
                )
            miss = _unexplained(delta, k_now, intended)
            unexplained.append(miss)
            if c.normguard:
                self._check_norm(lm, name, delta)
                if miss > c.max_unexplained:
                    raise EditError(
                        f"safeguards: {name} would leave {miss:.0%} of the edit's intended "
                        f"change undone (limit {c.max_unexplained:.0%}); edit refused"
                    )
            deltas[name] = lm.adapter.to_stored(delta).to(torch.float32).contiguous()
        info: dict[str, float] = {"guard_seconds": time.perf_counter() - started}
        if kept:
            info["neurons_kept"] = sum(kept) / len(kept)
        if unexplained:
            info["unexplained"] = max(unexplained)
        memory_keys = {n: keys_orig[n] for n in modules} if refit and c.remember_edits else {}
        return GuardedProposal(deltas, memory_keys, info)

    def apply(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> EditResult:
        if not requests:
            raise EditError("no requests to apply")
        started = time.perf_counter()
        proposal = self.propose(lm, requests)
        deltas = proposal.deltas
        previous = write_deltas(lm.model, deltas)
        memory_before = {n: m.clone() for n, m in self.memory.items()}
        for name, keys in proposal.memory_keys.items():
            gram = keys @ keys.T  # (d_in, n) @ (n, d_in) -> (d_in, d_in)
            self.memory[name] = self.memory[name] + gram if name in self.memory else gram
        info: dict[str, object] = dict(proposal.info)
        info["memory_before"] = memory_before
        return EditResult(deltas, previous, time.perf_counter() - started, info)

    def undo(self, lm: LoadedModel, result: EditResult) -> None:
        restore(lm.model, result.previous)
        before = result.info.get("memory_before")
        if isinstance(before, dict):
            self.memory = dict(before)

    def reset_memory(self, lm: LoadedModel, held: Sequence[EditRequest]) -> None:
        """M for a model that holds exactly ``held`` (after a version load or rollback).

        Exact only with rewind on (keys on the original weights do not depend on the order or
        on other edits); without it M is rebuilt from the original-weight keys as the closest
        order-free estimate.
        """
        self.memory = {}
        if not held or not self.config.remember_edits:
            return
        if self._sites is None:  # which matrices the inner editor writes: ask it once
            self._resolve(lm, self.inner.compute_deltas(lm, held[:1]))
        sites = self._sites or {}
        originals = self._originals_of(sites)
        for start in range(0, len(held), 32):
            keys, _ = self._capture(lm, sites, held[start : start + 32], originals)
            for name, k in keys.items():
                gram = k.double() @ k.double().T
                self.memory[name] = self.memory[name] + gram if name in self.memory else gram

    def describe(self) -> dict[str, Any]:
        """The resolved settings, for benchmark JSON and version lineage."""
        inner = getattr(self.inner, "config", None)
        return {
            "inner": self.inner.name,
            "safeguards": asdict(self.config),
            "inner_config": asdict(inner) if hasattr(inner, "__dataclass_fields__") else None,
        }

    # -- pieces --

    def _resolve(self, lm: LoadedModel, proposal: Mapping[str, torch.Tensor]) -> dict[str, _Site]:
        if self._sites is None or not set(proposal) <= set(self._sites):
            adapter = lm.adapter
            names = {
                adapter.weight_name(role, layer): (role, layer)
                for layer in range(adapter.num_layers(lm.model))
                for role in adapter.roles()
            }
            sites = dict(self._sites or {})
            for param in proposal:
                if param not in names:
                    raise EditError(f"safeguards: {param} is not an MLP matrix they can guard")
                role, layer = names[param]
                sites[param] = _Site(param, role, layer)
            self._sites = sites
        return {name: self._sites[name] for name in proposal}

    def _original(self, name: str) -> torch.Tensor:
        if name not in self._originals:
            if self._originals_source is None:
                raise EditError(f"safeguards: no original value for {name}")
            self._originals[name] = self._originals_source(name).detach().clone()
        return self._originals[name]

    def _originals_of(self, sites: Mapping[str, _Site]) -> dict[str, torch.Tensor]:
        return {name: self._original(name) for name in sites}

    def _rewound(self, lm: LoadedModel) -> _Rewound:
        return _Rewound(lm, self._originals_of(self._sites or {}))

    def _capture(
        self,
        lm: LoadedModel,
        sites: Mapping[str, _Site],
        requests: Sequence[EditRequest],
        weights: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Keys (d_in, n) per matrix and, for up/gate matrices, their layer's neuron
        activations (d_ff, n): the input of that layer's down matrix, at the answer positions.

        ``weights`` (parameter name -> value) stand in for the live ones during this forward
        only (``torch.func.functional_call``), so keys on the original weights need no write.
        """
        pairs = [(r.prompt, continuation(r.target_new)) for r in requests]
        batch = tokenize_pairs(lm.tokenizer, pairs, lm.device)
        answer = batch.labels != IGNORE  # (B, T)
        adapter = lm.adapter
        watched = {name: adapter.module(lm.model, m.role, m.layer) for name, m in sites.items()}
        for m in sites.values():
            if m.role is not MlpRole.DOWN:
                watched[f"act:{m.layer}"] = adapter.module(lm.model, MlpRole.DOWN, m.layer)
        inputs_ = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        with torch.no_grad(), frozen_parameters(lm.model), capture_inputs(watched) as inputs:
            if weights:
                functional_call(lm.model, dict(weights), args=(), kwargs=inputs_)
            else:
                lm.model(**inputs_)
        keys = {name: inputs[name][answer].double().T.cpu() for name in sites}
        acts = {
            name: inputs[f"act:{m.layer}"][answer].double().T.cpu()
            for name, m in sites.items()
            if m.role is not MlpRole.DOWN
        }
        return keys, acts

    def _neurons(self, activations: torch.Tensor) -> torch.Tensor:
        """The units the edit activates most (cumulative mass ``mask_p``): columns of a down
        matrix (its keys are the activations), rows of an up/gate matrix (the activations of
        the units it feeds), never the pre-activations, which a closed gate makes irrelevant."""
        return select_neurons(activations, self.config.mask_p)  # (d_ff, n)

    def _refit(
        self,
        lm: LoadedModel,
        module: _Site,
        residual: torch.Tensor,
        keys: torch.Tensor,
        neurons: torch.Tensor | None,
    ) -> torch.Tensor:
        """ΔW reproducing ``residual`` on ``keys`` under the preservation terms (float64)."""
        c = self.config
        c0 = None
        if c.preserve and c.preserve_lambda:
            c0 = self._stats_for().c0(lm, module.layer, module.role)
        memory = self.memory.get(module.param) if c.preserve else None
        # Without C0 or M, K Kᵀ alone is singular: a ridge tiny against the keys' scale gives
        # the minimum-norm update without shrinking it.
        if c0 is not None:
            ridge = c.preserve_ridge * c.preserve_lambda * float(torch.trace(c0)) / c0.shape[0]
        else:
            ridge = 0.0 if memory is not None else 1e-10 * float(keys.square().sum())
        if module.role is MlpRole.DOWN:
            return solve_masked_update(
                residual,
                keys,
                c0=c0,
                lam=c.preserve_lambda,
                memory=memory,
                neurons=neurons,
                ridge=ridge,
            )
        if neurons is not None:  # rows are independent: masking R masks ΔW's rows exactly
            residual = mask_delta(residual, neurons, "out")
        return solve_masked_update(
            residual, keys, c0=c0, lam=c.preserve_lambda, memory=memory, ridge=ridge
        )

    def _stats_for(self) -> KeyStatistics:
        if self._stats is None:
            self._stats = KeyStatistics(Paths.from_env(), max_tokens=self.config.stats_tokens)
        return self._stats

    def _check_norm(self, lm: LoadedModel, name: str, delta: torch.Tensor) -> None:
        base = lm.adapter.to_out_in(self._original(name)).double()
        ratio = float(delta.norm() / base.norm().clamp_min(1e-12))
        if ratio > self.config.max_delta_norm:
            raise EditError(
                f"safeguards: {name} update norm is {ratio:.3g} of the weight's "
                f"(limit {self.config.max_delta_norm}); edit refused"
            )


class _Rewound:
    """Swap the original matrices in for a while; the current values always come back."""

    def __init__(self, lm: LoadedModel, originals: Mapping[str, torch.Tensor]) -> None:
        self.lm = lm
        self.originals = originals
        self.saved: dict[str, torch.Tensor] = {}

    def __enter__(self) -> None:
        params = dict(self.lm.model.named_parameters())
        with torch.no_grad():
            for name, value in self.originals.items():
                self.saved[name] = params[name].detach().clone()
                params[name].copy_(value)

    def __exit__(self, *exc: object) -> None:
        restore(self.lm.model, self.saved)
        self.saved = {}


def _param(lm: LoadedModel, name: str) -> torch.Tensor:
    return dict(lm.model.named_parameters())[name]


def _axis(role: MlpRole) -> str:
    return "in" if role is MlpRole.DOWN else "out"


def _unexplained(delta: torch.Tensor, keys: torch.Tensor, residual: torch.Tensor) -> float:
    """||ΔW U − R|| / ||R||: how much of the intended change the written delta misses."""
    norm = float(residual.norm())
    return float((delta @ keys - residual).norm()) / norm if norm > 0 else 0.0

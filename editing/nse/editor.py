"""NSE as a factkeeper editor: targets on the original weights, the round's update on the current
ones, and the past-edit memory committed only when the deltas are applied.

The editor holds an ``EditState`` (original down-projection matrices of the edited layers, the
memory M = Σ k kᵀ of every request seen, and the z cache) and a ``KeyStatistics`` (C0). Both are
objects passed in, or built on first use: the state from the model, which must then still hold
its base weights. ``compute_deltas`` is pure (the model and the memory are unchanged; only the
z cache fills). ``apply`` writes the deltas and adds the batch's keys to M; ``undo`` restores the
weights and M exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from editing.adapters import MlpRole
from editing.edit_state import EditState
from editing.editors.base import (
    EditError,
    EditMaterial,
    Editor,
    EditResult,
    OriginalWeights,
    restore,
    write_deltas,
)
from editing.keystats import KeyStatistics, ProgressCallback
from editing.models import LoadedModel
from editing.nse.config import NSEConfig, preset_for
from editing.nse.keys import compute_targets, keys_and_hidden
from editing.nse.shift import RoundResult, run_round
from editing.nse.value_net import ValueNet, load_value_net
from editing.paths import Paths
from editing.requests import EditRequest

log = logging.getLogger(__name__)

_MEMORY_KEY = "nse_memory_before"
_SEEN_KEY = "nse_edits_seen_before"


@dataclass
class _SharedState:
    """What every variant of one NSE editor shares: C0, the originals and the edit memory."""

    stats: KeyStatistics | None = None
    state: EditState | None = None
    originals: OriginalWeights | None = None


class NSEEditor(Editor):
    """Neuron-level Sequential Editing (Jiang et al., ACL 2025), spec ``shared/specs/nse.md``."""

    name = "nse"
    supports_batch = True
    needs_training = False
    keeps_edit_memory = True
    # Not bit-exact after a version load or rollback: ``reset_memory`` sums M in other chunks
    # than the batches that built it, so later deltas differ in their last bits; replay checks
    # the journaled norms with a tolerance instead of the hash.
    replay_bit_exact = False
    supports_consolidation = True

    def __init__(
        self,
        config: NSEConfig | None = None,
        *,
        stats: KeyStatistics | None = None,
        state: EditState | None = None,
        paths: Paths | None = None,
        stats_tokens: int | None = None,
        **overrides: Any,
    ) -> None:
        """
        Args:
            config: hyperparameters; None picks the preset for the model's name at first use.
            stats_tokens: corpus tokens of the C0 built when ``stats`` is None (default: the
                ``KeyStatistics`` default, 65 536), e.g. ``nse:stats_tokens=262144``.
            overrides: ``NSEConfig`` fields to change in ``config`` or the preset (method specs
                such as ``nse:v_num_grad_steps=4`` and the daemon's ``editor.options``).
            stats: source of C0; None builds one on ``paths`` with the default corpus.
            state: original weights and past-edit memory, e.g. loaded from a snapshot; None
                snapshots the model on first use (it must hold its base weights then).
            paths: factkeeper home for the default key statistics.
        """
        unknown = set(overrides) - set(NSEConfig.__dataclass_fields__)
        if unknown:
            raise EditError(f"unknown NSE option(s): {', '.join(sorted(unknown))}")
        self.overrides = overrides
        self._given_config = config
        self.config = config.replace(**overrides) if config is not None else None
        self._shared = _SharedState(stats=stats, state=state)
        self._paths = paths
        self._stats_tokens = stats_tokens
        self._value_net: ValueNet | None = None

    # Originals, C0 and the memory live in one holder that ``variant`` editors share.
    @property
    def state(self) -> EditState | None:
        return self._shared.state

    @state.setter
    def state(self, value: EditState | None) -> None:
        self._shared.state = value

    @property
    def stats(self) -> KeyStatistics | None:
        return self._shared.stats

    @stats.setter
    def stats(self, value: KeyStatistics | None) -> None:
        self._shared.stats = value

    @property
    def _originals(self) -> OriginalWeights | None:
        return self._shared.originals

    def variant(self, method: str, **options: Any) -> NSEEditor | None:
        """NSE with other options (e.g. Adam values where this one uses the value network) on
        this editor's originals, C0 and memory: what one applies, the other's memory holds."""
        if method != self.name:
            return None
        editor = NSEEditor(
            self._given_config, paths=self._paths, stats_tokens=self._stats_tokens, **options
        )
        editor._shared = self._shared
        return editor

    @classmethod
    def option_names(cls) -> frozenset[str]:
        return frozenset(NSEConfig.__dataclass_fields__) | {"stats_tokens"}

    # --- setup --------------------------------------------------------------------------------

    def edited_matrices(self, lm: LoadedModel) -> list[tuple[MlpRole, int]]:
        """The down-projections of the configured layers."""
        return [(MlpRole.DOWN, layer) for layer in self.config_for(lm).layers]

    def config_for(self, lm: LoadedModel) -> NSEConfig:
        if self.config is None:
            self.config = preset_for(lm.name).replace(**self.overrides)
        n_layers = lm.adapter.num_layers(lm.model)
        if self.config.layers[-1] >= n_layers:
            raise EditError(f"NSE layers {self.config.layers} exceed the model's {n_layers}")
        return self.config

    def state_for(self, lm: LoadedModel) -> EditState:
        config = self.config_for(lm)
        if self.state is None:
            if self._originals is not None:
                self.state = self._state_from_originals(lm, config)
            else:
                log.info("NSE: taking the current weights of layers %s as originals", config.layers)
                self.state = EditState.from_model(lm, config.layers, MlpRole.DOWN)
        self.state.check(lm, config.layers)
        return self.state

    def _state_from_originals(self, lm: LoadedModel, config: NSEConfig) -> EditState:
        assert self._originals is not None
        state = EditState.from_model(lm, config.layers, MlpRole.DOWN)  # shapes, empty memory
        for layer in config.layers:
            stored = self._originals(lm.adapter.weight_name(MlpRole.DOWN, layer))
            state.originals[layer] = lm.adapter.to_stored(stored).detach().to("cpu", copy=True)
        return state

    # --- the daemon's hooks (``Editor``): originals, statistics, memory -----------------------

    def set_originals(self, originals: OriginalWeights) -> None:
        """Take the original matrices from ``originals`` instead of the model at the first edit."""
        self._shared.originals = originals
        self.state = None

    def set_statistics(self, stats: KeyStatistics) -> None:
        self.stats = stats

    def prepare_statistics(
        self, lm: LoadedModel, on_progress: ProgressCallback | None = None
    ) -> int:
        """C0 of every edited layer now, in one corpus pass (``lm`` holds the base weights)."""
        if self.stats is None:
            self.stats = self._default_stats()
        targets = self.edited_matrices(lm)
        self.stats.prepare(lm, targets, on_progress=on_progress)
        return len(targets)

    def reset_memory(self, lm: LoadedModel, held: Sequence[EditRequest]) -> None:
        """M from the keys of exactly ``held``, read on the original weights (as ``apply`` does)."""
        config, state = self.config_for(lm), self.state_for(lm)
        state.restore_memory_({layer: torch.zeros_like(m) for layer, m in state.memory.items()}, 0)
        with state.rewound(lm):
            for start in range(0, len(held), config.batch_size):
                chunk = held[start : start + config.batch_size]
                keys, _ = keys_and_hidden(lm, chunk, config.layers, config.z_layer, config)
                state.add_keys_(keys)

    def _default_stats(self) -> KeyStatistics:
        paths = self._paths or Paths.from_env()
        if self._stats_tokens is None:
            return KeyStatistics(paths)
        return KeyStatistics(paths, max_tokens=self._stats_tokens)

    def c0(self, lm: LoadedModel) -> dict[int, torch.Tensor]:
        if self.stats is None:
            self.stats = self._default_stats()
        moments = self.stats.moments(lm, self.config_for(lm).layers, MlpRole.DOWN)
        return {layer: m.c0 for layer, m in moments.items()}

    # --- the algorithm ------------------------------------------------------------------------

    def targets(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> torch.Tensor:
        """Z (d, n): each request's target value, computed once on the ORIGINAL weights."""
        config, state = self.config_for(lm), self.state_for(lm)
        self.value_net_for(lm)
        columns = []
        missing = [r for r in requests if self.target_key(r) not in state.targets]
        if missing:
            started = time.perf_counter()
            with state.rewound(lm):
                values = compute_targets(
                    lm, missing, config.z_layer, config, self.value_net_for(lm)
                )
            for request, value in zip(missing, values, strict=True):
                state.targets[self.target_key(request)] = value.z
            log.info(
                "nse targets: %d requests in %.1f s, nll %s",
                len(missing),
                time.perf_counter() - started,
                [round(v.nll, 3) for v in values],
            )
        for request in requests:
            columns.append(state.targets[self.target_key(request)])
        return torch.stack(columns, dim=1)  # n x (d,) -> (d, n)

    def value_net_for(self, lm: LoadedModel) -> ValueNet | None:
        """The value network ``v_optimiser: net`` uses (loaded once), else None."""
        config = self.config_for(lm)
        if config.v_optimiser != "net":
            return None
        if self._value_net is None:
            net = load_value_net(lm.name, config.z_layer, config.value_net, self._paths)
            self._value_net = net.to(lm.device)
        return self._value_net

    def target_key(self, request: EditRequest) -> str:
        """Content hash of everything z depends on besides the (fixed) original weights."""
        config = self.config
        assert config is not None
        provider: list[Any] = [config.v_optimiser]
        if config.v_optimiser == "normalised":
            provider.append(config.v_step)
        elif config.v_optimiser == "net":
            assert self._value_net is not None  # loaded by ``targets`` before any key is made
            provider.append(self._value_net.sha256())
        relevant = {
            "prompt": request.prompt,
            "subject": request.subject,
            "target": request.target_new,
            "z_layer": config.z_layer,
            "value": [
                config.v_num_grad_steps,
                config.v_lr,
                config.v_weight_decay,
                config.clamp_norm_factor,
                config.kl_factor,
                config.early_stop_loss,
                list(config.prefixes[: config.value_prefixes]),
                config.kl_prompt,
            ],
        }
        if provider != ["adam"]:  # Adam's keys stay as they were (caches, stored material)
            relevant["provider"] = provider
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:32]

    def plan(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> RoundResult:
        """Everything one batch needs, with the model and the memory unchanged."""
        if not requests:
            raise EditError("no requests to edit")
        config, state = self.config_for(lm), self.state_for(lm)
        c0 = self.c0(lm)
        targets = self.targets(lm, requests)
        plan = run_round(lm, requests, targets, c0, state.memory, config)
        with state.rewound(lm):  # M depends only on which edits are held (replay, rollback)
            plan.memory_keys, _ = keys_and_hidden(
                lm, requests, config.layers, config.z_layer, config
            )
        return plan

    def compute_deltas(
        self, lm: LoadedModel, requests: Sequence[EditRequest]
    ) -> dict[str, torch.Tensor]:
        return self._stored(lm, self.plan(lm, requests))

    def apply(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> EditResult:
        """Write the batch's deltas and add its keys to the past-edit memory."""
        started = time.perf_counter()
        plan = self.plan(lm, requests)
        state = self.state_for(lm)
        deltas = self._stored(lm, plan)
        previous = write_deltas(lm.model, deltas)
        info: dict[str, object] = {
            _MEMORY_KEY: state.memory_copy(),
            _SEEN_KEY: state.edits_seen,
            "residual_before": plan.residual_before.tolist(),
            "residual_after": plan.residual_after.tolist(),
            "edited": plan.edited.tolist(),
            "outlier": plan.outlier.tolist(),
            "passes": plan.passes,
            "neurons": plan.neurons,
        }
        state.add_keys_(plan.memory_keys)
        seconds = time.perf_counter() - started
        log.info(
            "nse: %d requests, %d passes, residual %.3f -> %.3f (mean), %.1f s",
            len(requests),
            plan.passes,
            float(plan.residual_before.mean()),
            float(plan.residual_after.mean()),
            seconds,
        )
        return EditResult(deltas, previous, seconds, info)

    def consolidate(self, lm: LoadedModel, held: Sequence[EditRequest]) -> EditResult:
        """One round over the whole live set from the original weights with an empty memory.

        The targets z were computed on the original weights when each request was first edited
        (the z cache), so a consolidation costs key passes and the solves, not the value
        optimisation; the memory afterwards holds exactly the keys of ``held``.
        """
        state = self.state_for(lm)
        before, seen = state.memory_copy(), state.edits_seen
        state.restore_memory_({layer: torch.zeros_like(m) for layer, m in before.items()}, 0)
        try:
            result = self.apply(lm, held)
        except BaseException:
            state.restore_memory_(before, seen)
            raise
        result.info[_MEMORY_KEY], result.info[_SEEN_KEY] = before, seen  # undo: the old memory
        return result

    def edit_material(
        self, lm: LoadedModel, requests: Sequence[EditRequest]
    ) -> dict[str, EditMaterial]:
        """Each request's target z (computed now if not cached), fingerprinted by its cache key."""
        self.targets(lm, requests)
        state = self.state_for(lm)
        return {
            r.request_id: EditMaterial(key, {"z": state.targets[key]})
            for r in requests
            for key in [self.target_key(r)]
        }

    def take_material(self, lm: LoadedModel, request: EditRequest, material: EditMaterial) -> bool:
        """Put a stored z into the cache when it was computed under this editor's settings."""
        state = self.state_for(lm)
        self.value_net_for(lm)
        key = self.target_key(request)
        if material.fingerprint != key or set(material.tensors) != {"z"}:
            return False
        state.targets[key] = material.tensors["z"]
        return True

    def undo(self, lm: LoadedModel, result: EditResult) -> None:
        """Restore the weights and the past-edit memory to their values before ``apply``."""
        restore(lm.model, result.previous)
        memory = result.info.get(_MEMORY_KEY)
        if memory is not None and self.state is not None:
            self.state.restore_memory_(memory, int(result.info[_SEEN_KEY]))  # type: ignore[arg-type]

    def _stored(self, lm: LoadedModel, plan: RoundResult) -> dict[str, torch.Tensor]:
        """Layer deltas as state-dict key -> contiguous float32 tensor in stored orientation."""
        return {
            lm.adapter.weight_name(MlpRole.DOWN, layer): lm.adapter.to_stored(delta).contiguous()
            for layer, delta in plan.deltas.items()
        }

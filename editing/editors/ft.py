"""FT-L: constrained fine-tuning of one MLP down-projection, the ROME paper's baseline.

The edit trains an additive change ``P`` to the down-projection of one block on the negative
log-likelihood of each request's target after its prompt (teacher forcing over every target token),
with Adam for a fixed number of steps, stopping early once the mean target NLL is low, and clamps
``P`` to ``[-eps, eps]`` after every step: the L-inf bound on the change relative to the weights
the edit starts from. ``P`` enters through a forward hook (``output += input @ P.T``), so the
model's weights are never touched while computing; ``apply`` (in ``base``) writes ``P`` once.
Blocks below the edited one do not change, so their output is computed once per edit and the
Adam steps run only the blocks from the edited one up (``editing.residual``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from editing.adapters import MlpRole
from editing.editors.base import EditError, Editor, EditResult
from editing.hooks import frozen_parameters
from editing.models import LoadedModel
from editing.requests import EditRequest, continuation
from editing.residual import can_resume, final_hidden, forward_from_layer, layer_input

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FTConfig:
    """FT-L knobs; defaults chosen on SmolLM2-135M (bench/results/RESULTS-pre-yardstick.md)."""

    layer: int | None = None
    """Block whose MLP down-projection is trained; None: ``round(depth * (n_layers - 1))``."""
    depth: float = 0.69
    """Relative depth used when ``layer`` is None: layer 20 of SmolLM2's 30 (0..29)."""
    num_steps: int = 10
    """Adam steps at most per edit call."""
    lr: float = 5e-3
    norm_constraint: float = 1e-2
    """L-inf bound on each weight's change (SmolLM2 down-projection weights have std ~0.19)."""
    stop_nll: float = 0.05
    """Stop once the mean per-token NLL of the targets is below this."""
    consolidate_steps: int = 40
    """Adam steps at most of ``consolidate``: one joint fit of the whole live set from the base
    weights, under the same L-inf bound (sequential edits stack one bound per batch)."""

    def __post_init__(self) -> None:
        if self.layer is not None and self.layer < 0:
            raise ValueError("FTConfig.layer must be >= 0")
        if not 0.0 <= self.depth <= 1.0:
            raise ValueError("FTConfig.depth must be in [0, 1]")
        if self.num_steps < 1 or self.consolidate_steps < 1:
            raise ValueError("FTConfig.num_steps and consolidate_steps must be >= 1")
        if self.lr <= 0 or self.norm_constraint <= 0:
            raise ValueError("FTConfig.lr and norm_constraint must be > 0")
        if self.stop_nll < 0:
            raise ValueError("FTConfig.stop_nll must be >= 0")

    def resolved_layer(self, n_layers: int) -> int:
        layer = self.layer if self.layer is not None else round(self.depth * (n_layers - 1))
        if layer >= n_layers:
            raise EditError(f"FT-L layer {layer} does not exist (the model has {n_layers})")
        return layer


class FineTuneL(Editor):
    """FT-L: fine-tune one down-projection under an L-inf bound (Meng et al., 2022, baseline)."""

    name = "ft"
    supports_batch = True
    supports_consolidation = True

    def __init__(self, config: FTConfig | None = None, **options: Any) -> None:
        self.config = config or FTConfig(**options)
        self.last_info: dict[str, object] = {}

    @classmethod
    def option_names(cls) -> frozenset[str]:
        return frozenset(FTConfig.__dataclass_fields__)

    def edited_matrices(self, lm: LoadedModel) -> list[tuple[MlpRole, int]]:
        """The one down-projection this editor trains (what the safeguards need C0 for)."""
        return [(MlpRole.DOWN, self.config.resolved_layer(lm.adapter.num_layers(lm.model)))]

    def compute_deltas(
        self, lm: LoadedModel, requests: Sequence[EditRequest]
    ) -> dict[str, torch.Tensor]:
        cfg = self.config
        model, adapter = lm.model, lm.adapter
        layer = cfg.resolved_layer(adapter.num_layers(model))
        weight = adapter.weight_out_in(model, MlpRole.DOWN, layer)  # (out, in)
        ids, mask, rows, cols, targets = _teacher_forcing_batch(lm, requests)
        resume = can_resume(model, adapter, lm.tokenizer)
        with torch.no_grad():
            entering = layer_input(model, adapter, layer, ids, mask) if resume else None

        shift = torch.zeros(weight.shape, dtype=torch.float32, requires_grad=True)  # (out, in)
        optimizer = torch.optim.Adam([shift], lr=cfg.lr)
        module = adapter.module(model, MlpRole.DOWN, layer)
        losses: list[float] = []
        with _added_to_output(module, shift), frozen_parameters(model):
            for _ in range(cfg.num_steps):
                if entering is not None:
                    hidden = forward_from_layer(model, adapter, layer, entering, mask)
                else:
                    hidden = final_hidden(model, ids, mask)  # (B, T, H)
                picked = hidden[rows, cols]  # (N_target, H)
                logits = model.get_output_embeddings()(picked).float()  # (N_target, V)
                loss = F.cross_entropy(logits, targets)
                losses.append(float(loss.detach()))
                if losses[-1] < cfg.stop_nll:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    shift.clamp_(-cfg.norm_constraint, cfg.norm_constraint)
        delta = shift.detach().to(torch.float32)
        if not torch.isfinite(delta).all():
            raise EditError("FT-L produced a non-finite change")
        self.last_info = {
            "layer": layer,
            "steps": len(losses) - (1 if losses[-1] < cfg.stop_nll else 0),
            "nll_start": losses[0],
            "nll_end": losses[-1],
        }
        log.debug("ft edit", extra=self.last_info)
        return {adapter.weight_name(MlpRole.DOWN, layer): adapter.to_stored(delta).contiguous()}

    def apply(self, lm: LoadedModel, requests: Sequence[EditRequest]):  # type: ignore[override]
        result = super().apply(lm, requests)
        result.info.update(self.last_info)
        return result

    def consolidate(self, lm: LoadedModel, held: Sequence[EditRequest]) -> EditResult:
        """One fit of every held request at once, ``consolidate_steps`` Adam steps."""
        joint = FineTuneL(dataclasses.replace(self.config, num_steps=self.config.consolidate_steps))
        return joint.apply(lm, held)


def _teacher_forcing_batch(
    lm: LoadedModel, requests: Sequence[EditRequest]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+target ids, and the (row, position) that predicts each target token."""
    tok = lm.tokenizer
    sequences = []
    for r in requests:
        prompt = tok(r.prompt).input_ids
        target = tok(continuation(r.target_new), add_special_tokens=False).input_ids
        sequences.append((prompt, target))
    width = max(len(p) + len(t) for p, t in sequences)
    ids = torch.full((len(sequences), width), tok.pad_token_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (B, T)
    rows, cols, targets = [], [], []
    for b, (prompt, target) in enumerate(sequences):
        full = prompt + target
        ids[b, : len(full)] = torch.tensor(full)
        mask[b, : len(full)] = 1
        for t in range(len(prompt), len(full)):
            rows.append(b)
            cols.append(t - 1)  # position t - 1 predicts token t
            targets.append(full[t])
    device = lm.device
    return (
        ids.to(device),
        mask.to(device),
        torch.tensor(rows, device=device),
        torch.tensor(cols, device=device),
        torch.tensor(targets, device=device),
    )


@contextlib.contextmanager
def _added_to_output(module: nn.Module, shift: torch.Tensor) -> Iterator[None]:
    """Make ``module`` compute ``W x + P x`` without touching ``W`` (P is (out, in))."""

    def hook(mod: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return output + F.linear(args[0], shift.to(output.dtype))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()

"""NSE's two views of a fact: its key at each edited layer, and its target value z.

The key of a request is the input of the MLP down-projection at the subject's last token,
averaged over prefix templates: ½·(plain prompt) + ½·(mean over prefixed prompts) (spec 2.3).
The same forward also gives h, the block output at the z layer for the plain prompt, from which
the residual z − h is measured. The target z = h_init + δ comes from optimising δ, added to that
block output at the subject's last token, so the model continues every (prefixed) prompt with
the new target while the "{subject} is a" distribution stays close (spec 2.4). Keys and h use
whatever weights the model holds; the caller runs ``compute_targets`` on the original weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from editing.adapters import MlpRole
from editing.checks import needs_word_end, word_continuing_tokens
from editing.editors.base import EditError
from editing.hooks import (
    add_to_output,
    capture_inputs,
    capture_outputs,
    frozen_parameters,
    run_until,
)
from editing.models import LoadedModel
from editing.nse.config import NSEConfig
from editing.requests import EditRequest, continuation
from editing.residual import PrefixCache, can_resume, forward_from_layer, forward_suffix_from_layer
from editing.subject import encode_prompt

if TYPE_CHECKING:
    from editing.nse.value_net import ValueNet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetValue:
    """The optimised value of one request at the z layer."""

    z: torch.Tensor  # (d,) float32: h_init + δ
    h_init: torch.Tensor  # (d,) float32, block output on the original weights
    loss: float  # final total loss
    nll: float  # final mean target NLL
    steps: int  # gradient steps taken


def _pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: (B, T) ids and (B, T) attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def _pad_id(lm: LoadedModel) -> int:
    pad = lm.tokenizer.pad_token_id
    return int(pad if pad is not None else lm.tokenizer.eos_token_id)


@torch.inference_mode()
def keys_and_hidden(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    layers: Sequence[int],
    z_layer: int,
    config: NSEConfig,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Template-averaged keys at ``layers`` and the plain-prompt block output at ``z_layer``.

    One forward per chunk of sequences, stopped after the deepest block needed.

    Returns:
        ({layer: (d_ff, n) float32 keys}, (d, n) float32 hidden states at the z layer).
    """
    templates = ("{}", *config.prefixes)
    encoded = [
        encode_prompt(lm, t, r.prompt, r.subject) for r in requests for t in templates
    ]  # request-major: n * (1 + P)
    blocks = lm.adapter.layers(lm.model)
    modules = {str(layer): lm.adapter.module(lm.model, MlpRole.DOWN, layer) for layer in layers}
    stop = blocks[max([z_layer, *layers])]
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    hidden: list[torch.Tensor] = []
    device = lm.device
    for start in range(0, len(encoded), config.batch_size):
        chunk = encoded[start : start + config.batch_size]
        ids, mask = _pad([e.ids for e in chunk], _pad_id(lm))  # (B, T)
        rows = torch.arange(len(chunk))
        cols = torch.tensor([e.subject_index for e in chunk])
        with (
            capture_inputs(modules) as inputs,
            capture_outputs({"z": blocks[z_layer]}) as outputs,
        ):
            run_until(lm.model, stop, input_ids=ids.to(device), attention_mask=mask.to(device))
        for layer in layers:
            keys[layer].append(inputs[str(layer)][rows, cols].float().cpu())  # (B, d_ff)
        hidden.append(outputs["z"][rows, cols].float().cpu())  # (B, d)
    n, per = len(requests), len(templates)
    out: dict[int, torch.Tensor] = {}
    for layer in layers:
        stacked = torch.cat(keys[layer]).view(n, per, -1)  # (n, 1 + P, d_ff)
        averaged = 0.5 * stacked[:, 0] + 0.5 * stacked[:, 1:].mean(dim=1)  # (n, d_ff)
        out[layer] = averaged.T.contiguous()  # (d_ff, n)
    plain = torch.cat(hidden).view(n, per, -1)[:, 0]  # (n, d)
    return out, plain.T.contiguous()  # (d, n)


@dataclass(frozen=True)
class _ValueProblem:
    """One request's rows in the batched value optimisation."""

    rows: list[list[int]]  # prompt rows (each prompt + target[:-1], or + target), then KL row
    pred_cols: list[list[int]]  # per prompt row: positions predicting the target tokens
    subject_cols: list[int]  # per row: the subject's last token
    target_ids: list[int]
    end_cols: list[int]  # per prompt row: the position predicting the token after the target
    # (empty: no end-of-word term)


def _value_problem(lm: LoadedModel, request: EditRequest, config: NSEConfig) -> _ValueProblem:
    target_ids = lm.tokenizer(continuation(request.target_new), add_special_tokens=False).input_ids
    if not target_ids:
        raise EditError(f"{request.request_id}: target {request.target_new!r} has no tokens")
    templates = ("{}", *config.prefixes[: config.value_prefixes])
    prompts = [encode_prompt(lm, t, request.prompt, request.subject) for t in templates]
    kl = encode_prompt(
        lm, config.kl_prompt, config.kl_prompt.replace("{}", request.subject), request.subject
    )
    # The last prompt token predicts target_0, the next one target_1, ...; with the end of
    # the word checked, the last target token is run too: it predicts what follows the target.
    end = config.end_of_word and needs_word_end(request.target_new)
    fed = target_ids if end else target_ids[:-1]
    return _ValueProblem(
        rows=[p.ids + fed for p in prompts] + [kl.ids],
        pred_cols=[[len(p.ids) - 1 + j for j in range(len(target_ids))] for p in prompts],
        subject_cols=[p.subject_index for p in prompts] + [kl.subject_index],
        target_ids=list(target_ids),
        end_cols=[len(p.ids) - 1 + len(target_ids) for p in prompts] if end else [],
    )


class ValueObjective:
    """The value loss of a batch of requests as a function of their δ at the z layer (spec 2.4).

    Loss per request = mean over its prompts of the target's mean NLL (with ``end_of_word``, the
    NLL of ending the word after it counts as one more token) + kl_factor·KL(p ‖ p_init)
    on the KL prompt + v_weight_decay·||δ|| / ||h_init||². Rows of different requests never mix,
    so the summed loss gives each δ the gradient of its own loss. Blocks up to the z layer do not
    depend on δ: their output is computed once, here. Build it on the ORIGINAL weights. Shared by
    the optimisation below and by the training of the value network (``editing.nse.value_net``).
    """

    def __init__(
        self, lm: LoadedModel, requests: Sequence[EditRequest], z_layer: int, config: NSEConfig
    ) -> None:
        self.config = config
        self.problems = [_value_problem(lm, r, config) for r in requests]
        self.owner = [i for i, p in enumerate(self.problems) for _ in p.rows]  # row -> request
        self.first_row = [self.owner.index(i) for i in range(len(self.problems))]
        all_rows = [row for p in self.problems for row in p.rows]
        self.subject_cols = [c for p in self.problems for c in p.subject_cols]
        self.device = lm.device
        ids, mask = (t.to(self.device) for t in _pad(all_rows, _pad_id(lm)))  # (R, T)
        self.upper = _UpperModel(lm, z_layer, ids, mask, torch.tensor(self.subject_cols))
        self.h_init = self.upper.block_output[
            torch.tensor(self.first_row), torch.tensor([p.subject_cols[0] for p in self.problems])
        ].float()  # (n, d)
        self.head = lm.model.get_output_embeddings()
        self.kl_init: dict[int, torch.Tensor] = {}  # request -> p_init on its KL prompt
        self.continuing = (
            word_continuing_tokens(lm.tokenizer, self.head.out_features).to(self.device)
            if any(p.end_cols for p in self.problems)
            else None
        )

    def __len__(self) -> int:
        return len(self.problems)

    def losses(
        self, delta: torch.Tensor, active: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total loss, mean target NLL, margin), each (len(active),), for the listed requests'
        δ rows. The margin is the smallest log-probability lead of a target token over the best
        other token, over every prompt and target position: > 0 when each prompt's greedy
        continuation is the target.

        Each request's KL reference p_init is its distribution at δ = 0, computed at its first
        call.
        """
        config, device = self.config, self.device
        unseen = [i for i in active if i not in self.kl_init and bool(delta[i].detach().any())]
        if unseen:  # their KL reference is p at δ = 0
            with torch.no_grad():
                self.losses(torch.zeros_like(delta), unseen)
        rows = [r for r in range(len(self.owner)) if self.owner[r] in active]
        hidden = self.upper.final_hidden(
            rows, delta[torch.tensor([self.owner[r] for r in rows])]
        )  # (R_active, T, d)
        at = {r: k for k, r in enumerate(rows)}
        nlls, kls, margins = [], [], []
        for i in active:
            p = self.problems[i]
            start = self.first_row[i]
            picked = torch.cat(
                [hidden[at[start + j], cols] for j, cols in enumerate(p.pred_cols)]
            )  # (n_prompts * n_target, d)
            log_probs = F.log_softmax(self.head(picked).float(), dim=-1)  # (N_pred, V)
            gold = torch.tensor(p.target_ids * len(p.pred_cols), device=device)
            token_nll = -log_probs.gather(1, gold[:, None]).squeeze(1)  # (N_pred,)
            with torch.no_grad():
                rival = log_probs.scatter(1, gold[:, None], float("-inf")).amax(dim=1)
                margin = (-token_nll - rival).min()
            per_prompt = token_nll.view(len(p.pred_cols), -1)  # (n_prompts, n_target)
            if p.end_cols:
                end_nll, end_margin = self._word_end(hidden, at, start, p.end_cols)
                per_prompt = torch.cat([per_prompt, end_nll[:, None]], dim=1)
                margin = torch.minimum(margin, end_margin)
            margins.append(margin)
            nlls.append(per_prompt.mean(dim=1).mean())
            kl_row = start + len(p.pred_cols)
            kls.append(
                F.log_softmax(self.head(hidden[at[kl_row], p.subject_cols[-1]]).float(), dim=-1)
            )  # (V,)
        kl_logp = torch.stack(kls)  # (n_active, V)
        for k, i in enumerate(active):
            if i not in self.kl_init:
                self.kl_init[i] = kl_logp[k].detach().clone()
        kl_ref = torch.stack([self.kl_init[i] for i in active])
        kl_terms = config.kl_factor * (kl_logp.exp() * (kl_logp - kl_ref)).sum(dim=1)
        idx = torch.tensor(list(active))
        h_norm = self.h_init[idx].norm(dim=1)
        decay = config.v_weight_decay * delta[idx].norm(dim=1) / h_norm**2
        nll = torch.stack(nlls)
        return nll + kl_terms + decay, nll, torch.stack(margins)

    def _word_end(
        self, hidden: torch.Tensor, at: dict[int, int], start: int, cols: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(NLL of ending the word after the target, per prompt; the smallest lead of the best
        word-ending token over the best continuing one) at the positions after the target."""
        assert self.continuing is not None
        picked = torch.stack([hidden[at[start + j], c] for j, c in enumerate(cols)])  # (P, d)
        log_probs = F.log_softmax(self.head(picked).float(), dim=-1)  # (P, V)
        ending = log_probs.masked_fill(self.continuing, float("-inf"))
        with torch.no_grad():
            lead = ending.amax(dim=1) - log_probs.masked_fill(~self.continuing, float("-inf")).amax(
                dim=1
            )
        return -ending.logsumexp(dim=1), lead.min()


def _clamp_values_(
    delta: torch.Tensor, h_init: torch.Tensor, rows: Sequence[int], factor: float
) -> None:
    """||δ_i|| <= factor·||h_init_i|| for the listed rows, in place."""
    with torch.no_grad():
        idx = torch.tensor(list(rows))
        limit = factor * h_init[idx].norm(dim=1)  # (n_active,)
        norm = delta[idx].norm(dim=1)
        scale = torch.where(norm > limit, limit / norm, torch.ones_like(norm))
        delta[idx] *= scale[:, None]


def compute_targets(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    z_layer: int,
    config: NSEConfig,
    value_net: ValueNet | None = None,
) -> list[TargetValue]:
    """Optimise each request's δ at the z layer so the model says its ``target_new`` (spec 2.4).

    The loss is ``ValueObjective``'s. Adam on δ (``v_optimiser: adam``), the untrained
    normalised steps (``normalised``), or ``net``: the first ``value_net.steps`` updates come
    from the trained value network (EMSEdit's multi-step value change), then Adam goes on from
    there while the loss is above ``early_stop_loss`` (or, with ``stop_margin``, until the
    target leads every prompt's greedy continuation by that margin). ||δ|| is clamped to
    clamp_norm_factor·||h_init||; a request stops on its own loss and leaves the batch, so the
    result is each request's own optimisation. Run it on the ORIGINAL weights (weights
    rewinding); the weights are untouched.
    """
    if config.v_optimiser == "net" and value_net is None:
        raise EditError("v_optimiser 'net' needs a value network")
    objective = ValueObjective(lm, requests, z_layer, config)
    h_init = objective.h_init
    delta = torch.zeros(len(requests), block_width(lm), device=lm.device, requires_grad=True)
    adam = torch.optim.Adam([delta], lr=config.v_lr) if config.v_optimiser != "normalised" else None
    results: dict[int, TargetValue] = {}
    active = list(range(len(requests)))
    with frozen_parameters(lm.model), torch.enable_grad():
        for it in range(config.v_num_grad_steps):
            last = it == config.v_num_grad_steps - 1
            delta.grad = None
            going: list[int] = []
            # Chunk by chunk, each backward right after its forward: the graph of the blocks
            # above the z layer is held for one chunk, not the batch. Requests never share a
            # row, so the gradients are each request's own either way.
            for start in range(0, len(active), config.value_chunk):
                chunk = active[start : start + config.value_chunk]
                losses, nlls, margins = objective.losses(delta, chunk)
                for k, i in enumerate(chunk):
                    loss_value = float(losses[k].detach())
                    leads = (
                        config.stop_margin is not None and float(margins[k]) >= config.stop_margin
                    )
                    if loss_value < config.early_stop_loss or leads or last:
                        results[i] = TargetValue(
                            (h_init[i] + delta[i].detach()).float().cpu(),
                            h_init[i].cpu(),
                            loss_value,
                            float(nlls[k].detach()),
                            it,
                        )
                still = [k for k, i in enumerate(chunk) if i not in results]
                if still:
                    losses[torch.tensor(still)].sum().backward()
                going += [chunk[k] for k in still]
            if not going:
                break
            active = going
            if value_net is not None and config.v_optimiser == "net" and it < value_net.steps:
                with torch.no_grad():
                    idx = torch.tensor(active)
                    assert delta.grad is not None
                    delta[idx] += value_net.step(it, delta.grad[idx], h_init[idx])
            elif adam is not None:
                adam.step()
            else:
                _normalised_step_(delta, h_init, active, config.v_step)
            _clamp_values_(delta, h_init, active, config.clamp_norm_factor)
    for i, request in enumerate(requests):
        value = results[i]
        log.debug(
            "target %s: loss %.4f nll %.4f after %d steps, |δ| %.3f, |h| %.3f",
            request.request_id,
            value.loss,
            value.nll,
            value.steps,
            float((value.z - value.h_init).norm()),
            float(value.h_init.norm()),
        )
    return [results[i] for i in range(len(requests))]


@torch.no_grad()
def _normalised_step_(
    delta: torch.Tensor, h_init: torch.Tensor, rows: list[int], step: float
) -> None:
    """δ_i -= step·||h_init_i||·g_i/||g_i|| for the listed requests (their gradients in .grad)."""
    assert delta.grad is not None
    idx = torch.tensor(rows)
    grad = delta.grad[idx]  # (n_active, d)
    scale = step * h_init[idx].norm(dim=1) / grad.norm(dim=1).clamp_min(1e-12)  # (n_active,)
    delta[idx] -= scale[:, None] * grad


class _UpperModel:
    """The blocks above the z layer, fed the (fixed) z-block output plus a vector at each row's
    subject.

    When the model resumes from a block input (``editing.residual.can_resume``), the blocks up
    to the z layer run once, and so do all positions before each row's subject: a vector added
    there cannot reach them, so each call recomputes only the positions from the subject on
    (``forward_suffix_from_layer``), against their cached keys and values. Otherwise every call
    runs the whole body with the vectors added by a hook.
    """

    def __init__(
        self,
        lm: LoadedModel,
        z_layer: int,
        ids: torch.Tensor,
        mask: torch.Tensor,
        subject_cols: torch.Tensor,
    ) -> None:
        self.lm, self.z_layer, self.ids, self.mask = lm, z_layer, ids, mask
        self.subject_cols = subject_cols.to(torch.long).cpu()  # (R,)
        self.block = lm.adapter.layers(lm.model)[z_layer]
        self.resumes = z_layer + 1 < lm.adapter.num_layers(lm.model) and can_resume(
            lm.model, lm.adapter, lm.tokenizer
        )
        self.prefix: PrefixCache | None = None
        with torch.no_grad(), capture_outputs({"z": self.block}) as outputs:
            if self.resumes:
                out = lm.model.base_model(input_ids=ids, attention_mask=mask, use_cache=True)
                self.final_init = out.last_hidden_state  # (R, T, d) with no vector added
                self.prefix = PrefixCache.from_cache(out.past_key_values, self.subject_cols)
            else:
                run_until(lm.model, self.block, input_ids=ids, attention_mask=mask)
        self.block_output = outputs["z"].clone()  # (R, T, d)
        if self.prefix is not None and not self._suffix_agrees():
            self.prefix = None

    def final_hidden(self, rows: list[int], vectors: torch.Tensor) -> torch.Tensor:
        """Final hidden states (len(rows), T, d) with ``vectors[k]`` added at row k's subject."""
        if self.prefix is not None:
            return self._suffix_hidden(rows, vectors)
        return self._full_hidden(rows, vectors)

    def _full_hidden(self, rows: list[int], vectors: torch.Tensor) -> torch.Tensor:
        index = torch.tensor(rows, device=self.ids.device)
        positions = torch.arange(len(rows))
        subject_cols = self.subject_cols[torch.tensor(rows)]
        if self.resumes:
            entering = self.block_output[index].clone()  # (R_a, T, d)
            bump = torch.zeros_like(entering)
            bump[positions, subject_cols] = vectors.to(entering.dtype)
            return forward_from_layer(
                self.lm.model, self.lm.adapter, self.z_layer + 1, entering + bump, self.mask[index]
            )
        with add_to_output(self.block, positions, subject_cols, vectors):
            out = self.lm.model.base_model(
                input_ids=self.ids[index], attention_mask=self.mask[index]
            )
        return out.last_hidden_state

    def _suffix_hidden(self, rows: list[int], vectors: torch.Tensor) -> torch.Tensor:
        assert self.prefix is not None
        device = self.ids.device
        picked = torch.tensor(rows)
        index = picked.to(device)
        starts = self.subject_cols[picked]  # (R_a,)
        lengths = self.mask[index].sum(dim=1).cpu()
        width = int((lengths - starts).max())
        steps = torch.arange(width)
        valid = steps[None, :] < (lengths - starts)[:, None]  # (R_a, Q)
        total, d = self.block_output.shape[1], self.block_output.shape[2]
        source = (starts[:, None] + steps[None, :]).clamp(max=total - 1).to(device)
        entering = self.block_output[index].gather(1, source[..., None].expand(-1, -1, d))
        entering = entering * valid.to(device)[..., None]
        bump = torch.zeros_like(entering)
        bump[:, 0] = vectors.to(entering.dtype)  # each suffix starts at its subject
        suffix = forward_suffix_from_layer(
            self.lm.model,
            self.lm.adapter,
            self.z_layer + 1,
            entering + bump,
            valid.to(torch.long),
            self.prefix.rows(picked),
        )  # (R_a, Q, d)
        cols = torch.arange(total)
        relative = (cols[None, :] - starts[:, None]).clamp(0, width - 1).to(device)
        after = suffix.gather(1, relative[..., None].expand(-1, -1, d))
        before = (cols[None, :] < starts[:, None]).to(device)[..., None]
        return torch.where(before, self.final_init[index], after)

    def _suffix_agrees(self) -> bool:
        """Whether the suffix pass reproduces a full pass on this model (checked once)."""
        cached = getattr(self.lm.model, _SUFFIX_ATTR, None)
        if cached is not None:
            return bool(cached)
        rows = list(range(min(2, len(self.ids))))
        generator = torch.Generator().manual_seed(0)
        vectors = torch.randn(len(rows), self.block_output.shape[2], generator=generator)
        vectors = vectors.to(self.block_output)
        with torch.no_grad():
            full = self._full_hidden(rows, vectors)
            suffix = self._suffix_hidden(rows, vectors)
        real = self.mask[torch.tensor(rows)].bool()
        ok = bool(torch.allclose(full[real], suffix[real], rtol=1e-4, atol=1e-4))
        if not ok:
            log.info("the value optimisation cannot reuse cached prefixes; it runs full rows")
        setattr(self.lm.model, _SUFFIX_ATTR, ok)
        return ok


_SUFFIX_ATTR = "_factkeeper_suffix_resumable"


def block_width(lm: LoadedModel) -> int:
    """d, the residual-stream width."""
    return lm.adapter.dims(lm.model.config)[0]

"""NSE's two views of a fact: its key at each edited layer, and its target value z.

The key of a request is the input of the MLP down-projection at the subject's last token,
averaged over prefix templates: ½·(plain prompt) + ½·(mean over prefixed prompts) (spec 2.3).
The same forward also gives h, the block output at the z layer for the plain prompt, from which
the residual z − h is measured. The target z = h_init + δ comes from optimising δ, added to that
block output at the subject's last token, so the model continues every (prefixed) prompt with
the new target while the "{subject} is a" distribution stays close (spec 2.4). Keys and h use
whatever weights the model holds; the caller runs ``compute_target`` on the original weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from editing.adapters import MlpRole
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

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedText:
    """One tokenised text and the position of its subject's last token."""

    ids: list[int]
    subject_index: int


@dataclass(frozen=True)
class TargetValue:
    """The optimised value of one request at the z layer."""

    z: torch.Tensor  # (d,) float32: h_init + δ
    h_init: torch.Tensor  # (d,) float32, block output on the original weights
    loss: float  # final total loss
    nll: float  # final mean target NLL
    steps: int  # gradient steps taken


def encode_with_subject(
    lm: LoadedModel, text: str, subject_start: int, subject_end: int
) -> EncodedText:
    """Tokenise ``text``; find the last token overlapping ``text[subject_start:subject_end]``."""
    enc = lm.tokenizer(text, return_offsets_mapping=True)
    index = -1
    for i, (start, end) in enumerate(enc.offset_mapping):
        if end > start and start < subject_end and end > subject_start:
            index = i
    if index < 0:
        raise EditError(f"subject {text[subject_start:subject_end]!r} has no token in {text!r}")
    return EncodedText(list(enc.input_ids), index)


def encode_prompt(lm: LoadedModel, template: str, prompt: str, subject: str) -> EncodedText:
    """``template`` with the prompt in place of "{}", and the subject's last token in it."""
    head = template.split("{}")[0]
    text = template.replace("{}", prompt)
    offset = len(head) + prompt.find(subject)
    return encode_with_subject(lm, text, offset, offset + len(subject))


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


def compute_target(
    lm: LoadedModel, request: EditRequest, z_layer: int, config: NSEConfig
) -> TargetValue:
    """Optimise δ at the z layer so the model says ``target_new`` (spec 2.4); weights untouched.

    Loss = mean over prompts of the target's mean NLL + kl_factor·KL(p ‖ p_init) on the KL prompt
    + v_weight_decay·||δ|| / ||h_init||². Adam on δ only; ||δ|| clamped to
    clamp_norm_factor·||h_init||. Run it on the ORIGINAL weights (weights rewinding).
    """
    target_ids = lm.tokenizer(continuation(request.target_new), add_special_tokens=False).input_ids
    if not target_ids:
        raise EditError(f"{request.request_id}: target {request.target_new!r} has no tokens")
    templates = ("{}", *config.prefixes[: config.value_prefixes])
    prompts = [encode_prompt(lm, t, request.prompt, request.subject) for t in templates]
    kl = encode_prompt(
        lm, config.kl_prompt, config.kl_prompt.replace("{}", request.subject), request.subject
    )
    rows_ids = [p.ids + target_ids[:-1] for p in prompts] + [kl.ids]
    ids, mask = _pad(rows_ids, _pad_id(lm))  # (R, T) with R = len(prompts) + 1
    n_prompts, n_target = len(prompts), len(target_ids)
    # Logit positions: the last prompt token predicts target_0, the next one target_1, ...
    pred_rows = torch.arange(n_prompts).repeat_interleave(n_target)  # (R-1)*T_tgt
    pred_cols = torch.tensor([len(p.ids) - 1 + j for p in prompts for j in range(n_target)])
    gold = torch.tensor(target_ids).repeat(n_prompts)  # ((R-1)*T_tgt,)
    subject_rows = torch.arange(n_prompts + 1)
    subject_cols = torch.tensor([p.subject_index for p in prompts] + [kl.subject_index])

    device = lm.device
    ids, mask = ids.to(device), mask.to(device)
    block = lm.adapter.layers(lm.model)[z_layer]
    body = lm.model.base_model
    head = lm.model.get_output_embeddings()
    delta = torch.zeros(block_width(lm), device=device, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=config.v_lr)
    h_init: torch.Tensor | None = None
    kl_init: torch.Tensor | None = None
    loss_value, nll_value, steps = float("nan"), float("nan"), 0
    with frozen_parameters(lm.model), torch.enable_grad():
        for it in range(config.v_num_grad_steps):
            with (
                add_to_output(block, subject_rows, subject_cols, delta),
                capture_outputs({"z": block}) as outputs,
            ):
                hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state  # (R, T, d)
            if h_init is None:
                # The hook's recorded output already holds δ = 0 at the first step.
                h_init = outputs["z"][0, subject_cols[0]].detach().clone()  # (d,)
            logits = head(hidden[pred_rows, pred_cols])  # (N_pred, d) -> (N_pred, V)
            log_probs = F.log_softmax(logits.float(), dim=-1)  # (N_pred, V)
            token_nll = -log_probs.gather(1, gold.to(device)[:, None]).squeeze(1)  # (N_pred,)
            nll = token_nll.view(n_prompts, n_target).mean(dim=1).mean()  # scalar
            kl_logp = F.log_softmax(
                head(hidden[n_prompts, subject_cols[-1]]).float(), dim=-1
            )  # (V,)
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            kl_term = config.kl_factor * torch.sum(kl_logp.exp() * (kl_logp - kl_init))
            decay = config.v_weight_decay * delta.norm() / h_init.norm() ** 2
            loss = nll + kl_term + decay
            loss_value, nll_value = float(loss.detach()), float(nll.detach())
            if loss_value < config.early_stop_loss or it == config.v_num_grad_steps - 1:
                break
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            steps += 1
            with torch.no_grad():
                limit = config.clamp_norm_factor * h_init.norm()
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
    assert h_init is not None
    z = (h_init + delta.detach()).float().cpu()
    log.debug(
        "target %s: loss %.4f nll %.4f after %d steps, |δ| %.3f, |h| %.3f",
        request.request_id,
        loss_value,
        nll_value,
        steps,
        float(delta.norm()),
        float(h_init.norm()),
    )
    return TargetValue(z, h_init.float().cpu(), loss_value, nll_value, steps)


def block_width(lm: LoadedModel) -> int:
    """d, the residual-stream width."""
    return lm.adapter.dims(lm.model.config)[0]

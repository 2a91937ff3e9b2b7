"""Keys and value gradients of the edited modules at the answer tokens, and the LM losses.

A prompt and its answer become one row: ``input_ids = tok(prompt) ++ tok(answer)[:-1]`` with
pre-shifted labels (position t predicts ``labels[t]``; prompt positions are -100). One forward and
one backward of the per-request loss (``request_loss``) give, for every edited module, its input
``K`` (n_tok, d_in) and the gradient w.r.t. its output ``G`` (n_tok, d_out) at the answer
positions. Hooks come from ``editing.hooks`` (context managers: removed on exit, exceptions
included).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from editing.editors.base import EditError
from editing.hooks import capture_inputs, capture_outputs
from editing.residual import final_hidden

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded prompt+answer rows with pre-shifted labels."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE outside the answer

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels))
        )


def tokenize_pairs(
    tokenizer: object, pairs: Sequence[tuple[str, str]], device: torch.device
) -> TokenBatch:
    """Rows for (prompt, continuation) pairs; the continuation already carries its space."""
    rows: list[tuple[list[int], list[int]]] = []
    for prompt, answer in pairs:
        prompt_ids = tokenizer(prompt).input_ids  # type: ignore[operator]
        answer_ids = tokenizer(answer, add_special_tokens=False).input_ids  # type: ignore[operator]
        if not prompt_ids or not answer_ids:
            raise EditError(f"empty prompt or answer after tokenisation: {prompt!r} -> {answer!r}")
        ids = prompt_ids + answer_ids[:-1]
        labels = [IGNORE] * (len(prompt_ids) - 1) + answer_ids
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # (B, T)
    for row, (ids, lab) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
        labels[row, : len(lab)] = torch.tensor(lab)
    return TokenBatch(input_ids, mask, labels).to(device)


def answer_logits(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Vocabulary logits at the answer positions only, (n_tok, V).

    The LM head runs on the answer rows alone: for SmolLM2 it is a fifth of the parameters, and
    answers are a small part of each row.
    """
    hidden = final_hidden(model, batch.input_ids, batch.attention_mask)  # (B, T, H)
    picked = hidden[batch.labels != IGNORE]  # (B, T, H) -> (n_tok, H)
    return model.get_output_embeddings()(picked).float()  # (n_tok, H) @ (H, V) -> (n_tok, V)


def answer_loss(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of the batch (labels are pre-shifted)."""
    targets = batch.labels[batch.labels != IGNORE]  # (n_tok,)
    return F.cross_entropy(answer_logits(model, batch), targets)


def request_loss(model: nn.Module, batch: TokenBatch, grad_rows: int) -> torch.Tensor:
    """Sum over rows of each row's mean answer-token CE, divided by ``grad_rows``.

    A row's gradient then depends on its own answer only, never on how many other requests or
    tokens share its micro-batch: an edit gets the same value gradients alone as inside a batch
    (a mean over the micro-batch's tokens made a lone edit's gradient up to ~20x larger).
    """
    answer = batch.labels != IGNORE  # (B, T)
    targets = batch.labels[answer]  # (n_tok,)
    per_token = F.cross_entropy(answer_logits(model, batch), targets, reduction="none")  # (n_tok,)
    row_of_token = answer.nonzero()[:, 0]  # (n_tok,) row index of each answer token
    row_tokens = answer.sum(dim=1)  # (B,)
    weights = 1.0 / (row_tokens[row_of_token].to(per_token.dtype) * grad_rows)  # (n_tok,)
    return (per_token * weights).sum()


def answer_log_probs(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Log-softmax at the answer positions, (n_tok, V), for the KL locality term."""
    return answer_logits(model, batch).log_softmax(-1)


@contextlib.contextmanager
def grad_enabled_on(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Temporarily make ``params`` require grad (frozen models otherwise give no graph)."""
    previous = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in zip(params, previous, strict=True):
            p.requires_grad_(flag)


def capture_keys_and_grads(
    model: nn.Module,
    modules: dict[str, nn.Module],
    tokenizer: object,
    pairs: Sequence[tuple[str, str]],
    lm_batch_size: int,
    device: torch.device,
    grad_rows: int,
    positions: Sequence[int] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """K (n_tok, d_in) and G (n_tok, d_out) per module for the (prompt, answer) pairs.

    Read at every answer token, or with ``positions`` at that one position of each pair's row
    (the subject's last token). Micro-batches of ``lm_batch_size`` rows (memory only: the loss is
    ``request_loss``, so G of a row does not depend on the micro-batch). Rows are float32 on
    ``device``.
    """
    keys: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    weights = [m.weight for m in modules.values()]
    for start in range(0, len(pairs), lm_batch_size):
        batch = tokenize_pairs(tokenizer, pairs[start : start + lm_batch_size], device)
        answer = batch.labels != IGNORE  # (B, T)
        read = answer
        if positions is not None:
            read = torch.zeros_like(answer)
            chunk = positions[start : start + lm_batch_size]
            read[torch.arange(len(chunk)), torch.tensor(chunk)] = True
        with (
            grad_enabled_on(weights),
            capture_inputs(modules) as inputs,
            capture_outputs(modules, detach=False) as outputs,
        ):
            loss = request_loss(model, batch, grad_rows)
            out_grads = torch.autograd.grad(loss, [outputs[n] for n in modules])
        for name, grad in zip(modules, out_grads, strict=True):
            key = inputs[name]  # (B, T, d_in)
            keys[name].append(key[read].float())  # (n_tok, d_in)
            grads[name].append(grad[read].float())  # (n_tok, d_out)
    return {n: (torch.cat(keys[n]), torch.cat(grads[n])) for n in modules}

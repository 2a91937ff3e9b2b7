"""Batched teacher-forced scoring of (prompt, answer) pairs: the one forward pass every metric uses.

Each pair is tokenised as ``ids(prompt) + ids(continuation(answer))`` (the answer's tokens are
exactly the ones after the prompt's, with no merge across the boundary), batched by length with
right padding, and run once. Vocabulary logits (the lm_head is 49152 x 576 for SmolLM2) are
computed only at the positions that predict answer tokens. When the caller says the weights below
block ``L`` are the base weights, the residual stream entering block ``L`` is computed once per
sequence, kept, and later passes run only blocks ``L..end`` (``editing.residual``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from editing.adapters import ArchitectureAdapter
from editing.requests import continuation
from editing.residual import can_resume, final_hidden, forward_from_layer, layer_input

log = logging.getLogger(__name__)

Pair = tuple[str, str]  # (prompt, answer as stored, e.g. "Paris")


@dataclass(frozen=True)
class Scored:
    """Teacher-forced result for one (prompt, answer) pair."""

    answer_ids: tuple[int, ...]
    argmax_ids: tuple[int, ...]  # top-1 prediction at each answer position
    logprobs: tuple[float, ...]  # log p(answer token | prompt, earlier answer tokens)

    @property
    def token_accuracy(self) -> float:
        hits = sum(a == b for a, b in zip(self.answer_ids, self.argmax_ids, strict=True))
        return hits / len(self.answer_ids)

    @property
    def all_correct(self) -> bool:
        """Every answer token is the top-1 prediction (greedy decoding would produce it)."""
        return self.answer_ids == self.argmax_ids

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per answer token."""
        return -sum(self.logprobs) / len(self.logprobs)

    @property
    def prob(self) -> float:
        """Per-token geometric-mean probability, ``exp(-nll)`` (CounterFact magnitudes)."""
        return math.exp(-self.nll)


@dataclass(frozen=True)
class _Encoded:
    ids: tuple[int, ...]
    n_prompt: int


class TeacherForcedScorer:
    """Scores pairs on one model; owns the tokenisation and residual caches for that model.

    The residual cache holds block inputs computed while the blocks below were the base weights;
    the caller promises that (``resume_layer``) and calls ``clear_residuals`` if it stops holding.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        adapter: ArchitectureAdapter,
        *,
        batch_tokens: int = 2048,
        device: torch.device | None = None,
    ) -> None:
        if batch_tokens < 1:
            raise ValueError("batch_tokens must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.batch_tokens = batch_tokens
        self.device = device or next(model.parameters()).device
        self.resumable = can_resume(model, adapter, tokenizer)
        self._encoded: dict[Pair, _Encoded] = {}
        self._residuals: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        self.tokens_run = 0  # positions pushed through the model (for speed reports)

    def clear_residuals(self) -> None:
        self._residuals.clear()

    def register(self, pair: Pair, answer_ids: Sequence[int]) -> None:
        """Score ``pair`` on exactly these answer tokens from now on (a greedy answer as the model
        generated it, which re-tokenising its text need not reproduce)."""
        prompt_ids = self.tokenizer(pair[0]).input_ids
        if not prompt_ids or not answer_ids:
            raise ValueError(f"empty prompt or answer tokens for {pair!r}")
        encoded = _Encoded(tuple(prompt_ids) + tuple(answer_ids), len(prompt_ids))
        if self._encoded.get(pair) not in (None, encoded):
            self._residuals = {k: v for k, v in self._residuals.items() if k[1] != encoded.ids}
        self._encoded[pair] = encoded

    def encode(self, pair: Pair) -> _Encoded:
        if pair not in self._encoded:
            prompt, answer = pair
            prompt_ids = self.tokenizer(prompt).input_ids
            answer_ids = self.tokenizer(continuation(answer), add_special_tokens=False).input_ids
            if not prompt_ids or not answer_ids:
                raise ValueError(f"empty prompt or answer tokens for {pair!r}")
            self._encoded[pair] = _Encoded(tuple(prompt_ids + answer_ids), len(prompt_ids))
        return self._encoded[pair]

    @torch.inference_mode()
    def score(
        self,
        pairs: Sequence[Pair],
        resume_layer: int = 0,
        capture_layers: Sequence[int] = (),
    ) -> list[Scored]:
        """Teacher-forced scores, in the order of ``pairs`` (duplicates are run once).

        Args:
            pairs: (prompt, answer) pairs.
            resume_layer: blocks below this index hold the base weights, so their output may
                come from the cache; 0 runs the whole model.
            capture_layers: with ``resume_layer=0`` on the base weights, keep the residual stream
                entering these blocks for later resumed passes (free: the pass runs anyway).
        """
        unique = list(dict.fromkeys(pairs))
        encoded = [self.encode(p) for p in unique]
        order = sorted(range(len(unique)), key=lambda i: len(encoded[i].ids))
        capture = [c for c in capture_layers if c > 0] if self.resumable else []
        if capture and resume_layer > 0:
            raise ValueError("capture_layers needs a full pass (resume_layer=0)")
        results: dict[Pair, Scored] = {}
        for batch in self._batches(order, encoded):
            rows = [encoded[i] for i in batch]
            with self._capturing(rows, capture):
                scored = self._score_batch(rows, resume_layer)
            for i, s in zip(batch, scored, strict=True):
                results[unique[i]] = s
        return [results[p] for p in pairs]

    @contextlib.contextmanager
    def _capturing(self, rows: list[_Encoded], layers: Sequence[int]) -> Iterator[None]:
        """Keep the input of each block in ``layers`` for every row of the next pass."""

        def make_hook(layer: int) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
                for row, e in enumerate(rows):
                    self._residuals[(layer, e.ids)] = hidden[row, : len(e.ids)].clone()

            return hook

        blocks = self.adapter.layers(self.model)
        handles = [
            blocks[layer].register_forward_pre_hook(make_hook(layer), with_kwargs=True)
            for layer in layers
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _batches(self, order: list[int], encoded: list[_Encoded]) -> list[list[int]]:
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:  # sorted by length, so the last one added is the longest
            width = len(encoded[i].ids)
            if current and width * (len(current) + 1) > self.batch_tokens:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    def _score_batch(self, batch: list[_Encoded], resume_layer: int) -> list[Scored]:
        width = max(len(e.ids) for e in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T), right padding
        for row, e in enumerate(batch):
            input_ids[row, : len(e.ids)] = torch.tensor(e.ids)
            mask[row, : len(e.ids)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        hidden = self._final_hidden(batch, input_ids, mask, resume_layer)  # (B, T, H)
        self.tokens_run += int(mask.sum())

        # Position t predicts token t + 1: answer tokens sit at n_prompt..len-1.
        rows, cols, targets = [], [], []
        for row, e in enumerate(batch):
            for t in range(e.n_prompt, len(e.ids)):
                rows.append(row)
                cols.append(t - 1)
                targets.append(e.ids[t])
        picked = hidden[torch.tensor(rows), torch.tensor(cols)]  # (N_answer, H)
        logits = self.model.get_output_embeddings()(picked).float()  # (N_answer, V)
        logprobs = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(targets, device=logits.device)
        lp = logprobs.gather(1, target[:, None])[:, 0].tolist()  # (N_answer,)
        top = logits.argmax(dim=-1).tolist()  # (N_answer,)

        out, k = [], 0
        for e in batch:
            n = len(e.ids) - e.n_prompt
            out.append(Scored(e.ids[e.n_prompt :], tuple(top[k : k + n]), tuple(lp[k : k + n])))
            k += n
        return out

    def _final_hidden(
        self,
        batch: list[_Encoded],
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        resume_layer: int,
    ) -> torch.Tensor:
        if resume_layer <= 0 or not self.resumable:
            return final_hidden(self.model, input_ids, mask)
        missing = [
            row for row, e in enumerate(batch) if (resume_layer, e.ids) not in self._residuals
        ]
        if missing:
            sub = torch.tensor(missing, device=input_ids.device)
            width = max(len(batch[r].ids) for r in missing)
            entering = layer_input(
                self.model, self.adapter, resume_layer, input_ids[sub, :width], mask[sub, :width]
            )  # (B_missing, T_missing, H)
            for j, row in enumerate(missing):
                n = len(batch[row].ids)
                self._residuals[(resume_layer, batch[row].ids)] = entering[j, :n].clone()
        hidden_size = next(iter(self._residuals.values())).shape[-1]
        entering = torch.zeros(
            (*input_ids.shape, hidden_size), dtype=self._dtype(), device=input_ids.device
        )  # (B, T, H); right padding, so pad positions never reach a real token
        for row, e in enumerate(batch):
            entering[row, : len(e.ids)] = self._residuals[(resume_layer, e.ids)]
        return forward_from_layer(self.model, self.adapter, resume_layer, entering, mask)

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

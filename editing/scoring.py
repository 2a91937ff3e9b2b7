"""Batched teacher-forced scoring of (prompt, answer) pairs: the one forward pass every metric uses.

Each pair is tokenised as ``ids(prompt) + ids(continuation(answer))`` (the answer's tokens are
exactly the ones after the prompt's, with no merge across the boundary), batched by length with
right padding, and run once. A row holds several pairs as a prefix tree: pairs sorted by their
tokens are laid out one after another, each running only the tokens it does not share with the
pair before it, and every token attends to its own path only, at the position it would have
alone (a (B, 1, T, T) mask and explicit position ids). Metrics score the same prompt with several
answers (new and true target, a greedy answer), and prompts share their openings ("What is the",
"nq question:"), so this runs about a fifth fewer tokens than one row per prompt on the
benchmark's streams; ``can_pack`` checks numerically that a model gives the same results
packed. An answer's last token is not run (its position predicts nothing that is read).
Vocabulary logits (the lm_head is 49152 x 576 for SmolLM2) are computed once at each position
that predicts an answer token. When the caller says the weights below block ``L`` are the base
weights, the residual stream entering block ``L`` is computed once per pair, kept (and, with a
``ResidualStore``, written to disk for later processes), and later passes run only blocks
``L..end`` (``editing.residual``).
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
from editing.residual_store import ResidualStore

_PACKABLE_ATTR = "_factkeeper_packable"

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


@dataclass(frozen=True)
class _Row:
    """One batch row: the input tokens of several pairs laid out as a prefix tree."""

    tokens: tuple[int, ...]
    members: tuple[int, ...]  # indices of the pairs (in the call's unique list)
    encoded: tuple[_Encoded, ...]
    paths: tuple[tuple[int, ...], ...]
    """Per member, the row positions of its input tokens: every token but the answer's last
    (whose position would only predict what follows the answer, which nothing reads)."""

    @property
    def width(self) -> int:
        return len(self.tokens)

    @classmethod
    def of(cls, members: Sequence[int], encoded: Sequence[_Encoded]) -> _Row:
        """The row of these pairs; each shares its common prefix with the one before it (in
        sorted order that is the longest prefix it shares with any)."""
        tokens: list[int] = []
        paths: list[tuple[int, ...]] = []
        previous: tuple[int, ...] = ()
        for e in encoded:
            run = e.ids[:-1]
            shared = _common_prefix(previous, run)
            start = len(tokens)
            tokens.extend(run[shared:])
            paths.append((paths[-1][:shared] if paths else ()) + tuple(range(start, len(tokens))))
            previous = run
        return cls(tuple(tokens), tuple(members), tuple(encoded), tuple(paths))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


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
        store: ResidualStore | None = None,
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
        self.store = store
        """Where residuals outlive the process (None: memory only)."""
        self.tokens_run = 0  # positions pushed through the model (for speed reports)
        self.row_tokens = 128
        """Tokens per packed row: wider rows share more prefixes but attend over more keys."""
        self.packable = False
        self.packable = can_pack(self)

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
        capture = [c for c in capture_layers if c > 0] if self.resumable else []
        if capture and resume_layer > 0:
            raise ValueError("capture_layers needs a full pass (resume_layer=0)")
        scored = self._score_encoded([self.encode(p) for p in unique], resume_layer, capture)
        results = dict(zip(unique, scored, strict=True))
        return [results[p] for p in pairs]

    @torch.inference_mode()
    def score_tokens(
        self, items: Sequence[tuple[str, Sequence[int]]], resume_layer: int = 0
    ) -> list[Scored]:
        """Teacher-forced scores of (prompt, answer token ids), in order; nothing is cached.

        For one-off continuations (a guessed greedy answer): their block inputs are computed
        when resuming but not kept, so the residual cache holds only pairs that come back.
        """
        encoded = []
        for prompt, answer_ids in items:
            prompt_ids = self.tokenizer(prompt).input_ids
            if not prompt_ids or not answer_ids:
                raise ValueError(f"empty prompt or answer tokens for {prompt!r}")
            encoded.append(_Encoded(tuple(prompt_ids) + tuple(answer_ids), len(prompt_ids)))
        return self._score_encoded(encoded, resume_layer, (), keep_residuals=False)

    def _score_encoded(
        self,
        encoded: list[_Encoded],
        resume_layer: int,
        capture: Sequence[int],
        *,
        keep_residuals: bool = True,
    ) -> list[Scored]:
        results: list[Scored | None] = [None] * len(encoded)
        persist = self.store is not None and keep_residuals and self.resumable
        if persist and resume_layer > 0:
            self._load_stored(resume_layer, encoded)
        before = set(self._residuals) if persist else set()
        for batch in self._batches(self._rows(encoded)):
            with self._capturing(batch, capture):
                scored = self._score_rows(batch, resume_layer, keep_residuals)
            for row, row_scores in zip(batch, scored, strict=True):
                for i, s in zip(row.members, row_scores, strict=True):
                    results[i] = s
        if persist:
            self._save_new(before)
        return [s for s in results if s is not None]

    def _load_stored(self, layer: int, encoded: Sequence[_Encoded]) -> None:
        """Bring the stored residuals of ``encoded`` that memory lacks into memory."""
        assert self.store is not None
        runs: dict[tuple[int, ...], list[tuple[int, ...]]] = {}  # pairs may differ last only
        for e in encoded:
            if (layer, e.ids) not in self._residuals:
                runs.setdefault(e.ids[:-1], []).append(e.ids)
        for run, tensor in self.store.load(layer, runs).items():
            for ids in runs[run]:
                self._residuals[(layer, ids)] = tensor.to(self.device, self._dtype())

    def _save_new(self, before: set[tuple[int, tuple[int, ...]]]) -> None:
        """Write the residuals computed since ``before`` to the store, a shard per layer, each
        under the tokens it is of (all but the answer's last)."""
        assert self.store is not None
        by_layer: dict[int, dict[tuple[int, ...], torch.Tensor]] = {}
        for (layer, ids), tensor in self._residuals.items():
            if (layer, ids) not in before:
                by_layer.setdefault(layer, {})[ids[:-1]] = tensor
        for layer, entries in by_layer.items():
            self.store.save(layer, entries)

    def _rows(self, encoded: list[_Encoded]) -> list[_Row]:
        """Pairs in sorted order, packed into rows of at most ``row_tokens`` new tokens each when
        the model packs, else one pair a row."""
        if not self.packable:
            return [_Row.of((i,), (e,)) for i, e in enumerate(encoded)]
        order = sorted(range(len(encoded)), key=lambda i: encoded[i].ids[:-1])
        rows: list[_Row] = []
        chunk: list[int] = []
        width = 0
        previous: tuple[int, ...] = ()
        for i in order:
            run = encoded[i].ids[:-1]
            grow = len(run) - _common_prefix(previous, run)
            if chunk and width + grow > self.row_tokens:
                rows.append(_Row.of(chunk, [encoded[k] for k in chunk]))
                chunk, width, grow = [], 0, len(run)  # a new row shares nothing yet
            chunk.append(i)
            width += grow
            previous = run
        if chunk:
            rows.append(_Row.of(chunk, [encoded[k] for k in chunk]))
        return rows

    @contextlib.contextmanager
    def _capturing(self, rows: list[_Row], layers: Sequence[int]) -> Iterator[None]:
        """Keep the input of each block in ``layers`` for every pair of the next pass."""

        def make_hook(layer: int) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
                self._store(layer, rows, hidden)

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

    def _store(
        self,
        layer: int,
        rows: Sequence[_Row],
        hidden: torch.Tensor,
        into: dict[tuple[int, tuple[int, ...]], torch.Tensor] | None = None,
    ) -> None:
        """Split packed block inputs (B, T, H) back into one residual per pair."""
        store = self._residuals if into is None else into
        for r, row in enumerate(rows):
            for e, path in zip(row.encoded, row.paths, strict=True):
                store[(layer, e.ids)] = hidden[r, list(path)]  # (len(path), H), a copy

    def _batches(self, rows: list[_Row]) -> list[list[_Row]]:
        batches: list[list[_Row]] = []
        current: list[_Row] = []
        for row in sorted(rows, key=lambda r: r.width):  # the last one added is the longest
            if current and row.width * (len(current) + 1) > self.batch_tokens:
                batches.append(current)
                current = []
            current.append(row)
        if current:
            batches.append(current)
        return batches

    def _inputs(
        self, batch: list[_Row]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """input ids (B, T), the attention mask, position ids, and the valid-token mask (B, T).

        Rows of one pair get the usual (B, T) padding mask and default positions; packed rows a
        (B, 1, T, T) boolean mask (True: may attend) and each token's position on its path.
        """
        width = max(row.width for row in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)  # (B, T)
        valid = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T), right padding
        packed = any(len(row.members) > 1 for row in batch)
        positions = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        mask4 = torch.zeros((len(batch), 1, width, width), dtype=torch.bool)  # (B, 1, T, T)
        causal = torch.ones((width, width), dtype=torch.bool).tril()  # (T, T)
        for r, row in enumerate(batch):
            input_ids[r, : row.width] = torch.tensor(row.tokens)
            for path in row.paths:
                at = torch.tensor(path)
                n = len(path)
                positions[r, at] = torch.arange(n)
                # a tree: two tokens on one path are ordered the same way on every path
                mask4[r, 0, at[:, None], at[None, :]] = causal[:n, :n]
            valid[r, : row.width] = 1
            idle = torch.arange(row.width, width)
            mask4[r, 0, idle, idle] = True  # padding attends to itself: no empty softmax row
        device = self.device
        if not packed:
            return input_ids.to(device), valid.to(device), None, valid.to(device)
        return input_ids.to(device), mask4.to(device), positions.to(device), valid.to(device)

    def _score_rows(
        self, batch: list[_Row], resume_layer: int, keep_residuals: bool = True
    ) -> list[list[Scored]]:
        input_ids, mask, positions, valid = self._inputs(batch)
        hidden = self._final_hidden(
            batch, input_ids, mask, positions, resume_layer, keep_residuals
        )  # (B, T, H)
        self.tokens_run += int(valid.sum())

        # An answer's token t is predicted at the position of the path's token before it (its
        # first token at the prompt's last). Pairs share positions: each is run through the
        # vocabulary once.
        spots: dict[tuple[int, int], int] = {}
        reads, targets = [], []
        for r, row in enumerate(batch):
            for e, path in zip(row.encoded, row.paths, strict=True):
                for t in range(len(e.ids) - e.n_prompt):
                    reads.append(spots.setdefault((r, path[e.n_prompt - 1 + t]), len(spots)))
                    targets.append(e.ids[e.n_prompt + t])
        rows, cols = zip(*spots, strict=True)
        picked = hidden[torch.tensor(rows), torch.tensor(cols)]  # (N_positions, H)
        logits = self.model.get_output_embeddings()(picked).float()  # (N_positions, V)
        logprobs = torch.log_softmax(logits, dim=-1)
        read = torch.tensor(reads, device=logits.device)
        target = torch.tensor(targets, device=logits.device)
        lp = logprobs[read, target].tolist()  # (N_answer,)
        top = logits.argmax(dim=-1)[read].tolist()  # (N_answer,)

        out: list[list[Scored]] = []
        k = 0
        for row in batch:
            scores = []
            for e in row.encoded:
                n = len(e.ids) - e.n_prompt
                scores.append(
                    Scored(e.ids[e.n_prompt :], tuple(top[k : k + n]), tuple(lp[k : k + n]))
                )
                k += n
            out.append(scores)
        return out

    def _final_hidden(
        self,
        batch: list[_Row],
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor | None,
        resume_layer: int,
        keep_residuals: bool = True,
    ) -> torch.Tensor:
        if resume_layer <= 0 or not self.resumable:
            return final_hidden(self.model, input_ids, mask, positions)
        cache = self._residuals if keep_residuals else {}
        missing = [
            r
            for r, row in enumerate(batch)
            if any(
                (resume_layer, e.ids) not in self._residuals and (resume_layer, e.ids) not in cache
                for e in row.encoded
            )
        ]
        if missing:
            sub = torch.tensor(missing, device=input_ids.device)
            width = max(batch[r].width for r in missing)
            sub_mask = mask[sub, :width] if mask.dim() == 2 else mask[sub, :, :width, :width]
            sub_pos = None if positions is None else positions[sub, :width]
            entering = layer_input(
                self.model, self.adapter, resume_layer, input_ids[sub, :width], sub_mask, sub_pos
            )  # (B_missing, T_missing, H)
            self._store(resume_layer, [batch[r] for r in missing], entering, into=cache)
        hidden_size = self.model.get_input_embeddings().embedding_dim
        entering = torch.zeros(
            (*input_ids.shape, hidden_size), dtype=self._dtype(), device=input_ids.device
        )  # (B, T, H); right padding, so pad positions never reach a real token
        for r, row in enumerate(batch):
            for e, path in zip(row.encoded, row.paths, strict=True):
                key = (resume_layer, e.ids)
                entering[r, list(path)] = cache[key] if key in cache else self._residuals[key]
        return forward_from_layer(self.model, self.adapter, resume_layer, entering, mask, positions)

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def can_pack(scorer: TeacherForcedScorer) -> bool:
    """Whether rows that share a prompt give the results of separate rows on this model (cached).

    A model whose forward ignores ``position_ids`` or a prepared 4D mask would give other
    numbers packed; then every pair gets its own row.
    """
    model = scorer.model
    cached = getattr(model, _PACKABLE_ATTR, None)
    if cached is not None:
        return bool(cached)
    pairs = [
        ("The capital of France is", "Paris"),
        ("The capital of France is", "the city of Rome"),
    ]
    with torch.inference_mode():
        encoded = [scorer.encode(p) for p in pairs]
        single = [scorer._score_rows([_Row.of((0,), (e,))], 0)[0][0] for e in encoded]
        row = _Row.of((0, 1), encoded)
        packed = scorer._score_rows([row], 0)[0]
    ok = all(
        a.argmax_ids == b.argmax_ids
        and all(abs(x - y) < 1e-4 for x, y in zip(a.logprobs, b.logprobs, strict=True))
        for a, b in zip(single, packed, strict=True)
    )
    if not ok:
        log.info("model gives other results with shared-prompt rows; scoring one pair a row")
    setattr(model, _PACKABLE_ATTR, ok)
    return ok

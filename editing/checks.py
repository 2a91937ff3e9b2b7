"""The one judge of "the model now says it": greedy decoding of a prompt begins with a target.

Every place that asks whether an edit took or still holds (the daemon's post-check, the audits'
retention, the benchmark's exact-match metrics, the demo) calls this module, so they all report
the same number for the same question.

The rule (``answer_matches``), applied to the greedy continuation of the prompt:

1. Both texts are compared in Unicode NFC; leading whitespace of the answer and surrounding
   whitespace of the target are ignored (" Paris" answers "Paris").
2. The answer must begin with the target exactly, case included ("paris" does not answer
   "Paris"): the papers' exact match is case-sensitive, and a fact's spelling is part of it.
   Multi-token targets are compared as text, whatever tokens produced it.
3. Whole word: when the target ends in a word character (a letter, digit, ``_`` or combining
   mark of any script), the next character of the answer must not be one, so "Romeo" does not
   answer "Rome" and "Paris." or "Paris's" does. A target that ends in punctuation needs no
   boundary, and neither does one that ends in a script written without spaces between words
   (Han, Hiragana, Katakana, Thai, Lao, Khmer, Myanmar, Tibetan), where any character may follow.

Greedy decoding emits the teacher-forced argmax chain, so one teacher-forced pass usually decides
the rule without decoding (``verdict_from_forced``): the target is scored followed by the
end-of-text token, which also yields the argmax right after the target (the character that
settles the word boundary). What that pass cannot settle (an answer that begins with a newline,
a different tokenisation of the same text, a token that splits a character) is continued by
drafts: the greedy tokens proven so far plus a guess of the rest (the target's text after them),
forced in one more pass, which proves the draft up to its first wrong token and the model's own
token there (``proven_tokens``), for at most ``DRAFT_ROUNDS`` passes. Only what the drafts cannot
settle is decoded, for at most the target's tokens plus ``DECODE_SLACK_TOKENS``; proven tokens
are exactly the tokens decoding would emit, so the verdict is the same. ``Judge`` runs the whole
procedure in batches and also decides whether a prompt's greedy answer is still the one the base
model gave (locality), with drafts that continue the base answer.

MQuAKE's multi-hop criterion is a different question (the answer appears anywhere in the first
line of a free answer) and lives here too, as ``contains_answer``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from editing.generation import end_ids, greedy_generate, greedy_token_ids
from editing.models import LoadedModel
from editing.scoring import Pair, Scored, TeacherForcedScorer

DECODE_SLACK_TOKENS = 2
"""Tokens decoded beyond the target's own count when the forced pass cannot decide."""

DRAFT_ROUNDS = 3
"""Forced passes over guessed greedy answers (drafts) before the rest is decoded."""

_UNSPACED_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "THAI", "LAO", "KHMER", "MYANMAR", "TIBETAN")


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_" or unicodedata.category(ch).startswith("M")


def _written_without_spaces(ch: str) -> bool:
    name = unicodedata.name(ch, "")
    return name.startswith(_UNSPACED_SCRIPTS) or "IDEOGRAPH" in name


def _needs_boundary(target: str) -> bool:
    last = target[-1]
    return _is_word_char(last) and not _written_without_spaces(last)


def needs_word_end(target: str) -> bool:
    """Whether an answer must end the word after ``target`` to match it (its last character
    is a word character of a script written with spaces)."""
    target = unicodedata.normalize("NFC", target).strip()
    return bool(target) and _needs_boundary(target)


_CONTINUING: dict[int, tuple[Any, torch.Tensor]] = {}


def word_continuing_tokens(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) bool: tokens whose text begins with a word character, so that after a
    target ending in one the answer would fail ``answer_matches`` ("Tampere" + "i"). Ids the
    tokenizer does not know count as ending the word. Computed once per tokenizer."""
    cached = _CONTINUING.get(id(tokenizer))
    if cached is None or cached[0] is not tokenizer or len(cached[1]) != vocab_size:
        known = min(len(tokenizer), vocab_size)
        texts = tokenizer.batch_decode([[i] for i in range(known)])
        flags = [bool(t) and _is_word_char(t[0]) for t in texts]
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[:known] = torch.tensor(flags, dtype=torch.bool)
        cached = _CONTINUING[id(tokenizer)] = (tokenizer, mask)
    return cached[1]


def answer_matches(answer: str, target: str) -> bool:
    """Whether the greedy ``answer`` begins with ``target`` under the module's rule."""
    answer = unicodedata.normalize("NFC", answer).lstrip()
    target = unicodedata.normalize("NFC", target).strip()
    if not target or not answer.startswith(target):
        return False
    rest = answer[len(target) :]
    return not rest or not _needs_boundary(target) or not _is_word_char(rest[0])


def contains_answer(answer: str, accepted: Sequence[str]) -> bool:
    """MQuAKE's multi-hop criterion: an accepted answer occurs as whole words in the first line."""
    line = unicodedata.normalize("NFC", answer).strip().split("\n", 1)[0].lower()
    return any(
        re.search(rf"(?<!\w){re.escape(unicodedata.normalize('NFC', a).lower())}(?!\w)", line)
        for a in accepted
        if a.strip()
    )


def verdict_from_forced(
    scored: Scored,
    target: str,
    piece: Callable[[int], str],
    following: int | None = None,
    end_token: int | None = None,
) -> bool | None:
    """``answer_matches`` of the greedy answer when the teacher-forced pass decides it, else None.

    Args:
        scored: the target's own tokens scored after the prompt.
        target: the target text.
        piece: decodes one token to its text.
        following: the argmax right after the target, when it was scored (None: unknown).
        end_token: the end-of-text id: greedy stops there, so nothing follows the target.
    """
    if scored.all_correct:
        text = "".join(piece(t) for t in scored.answer_ids)
        if "\ufffd" in text:
            return None
        if not answer_matches(text, target):
            return None  # the target's tokens spell it another way: decode
        if not _needs_boundary(unicodedata.normalize("NFC", target).strip()):
            return True
        if following is None:
            return None
        if following == end_token:
            return True
        nxt = piece(following)
        if not nxt or "\ufffd" in nxt:  # another special token, or part of a character
            return None
        return answer_matches(text + nxt, target)
    k = next(
        i
        for i, (a, b) in enumerate(zip(scored.answer_ids, scored.argmax_ids, strict=True))
        if a != b
    )
    produced = "".join(piece(t) for t in scored.answer_ids[:k]) + piece(scored.argmax_ids[k])
    if "\ufffd" in produced:
        return None
    text = unicodedata.normalize("NFC", produced).lstrip()
    want = unicodedata.normalize("NFC", target).strip()
    if not text:
        return None
    if text.startswith(want):
        return answer_matches(text, target) if len(text) > len(want) else None
    return None if want.startswith(text) else False


def proven_tokens(draft: Sequence[int], argmax: Sequence[int]) -> list[int]:
    """The greedy tokens a forced pass over ``draft`` proves.

    ``argmax[t]`` is the model's top token after the prompt and ``draft[:t]``. Greedy decoding
    emits the draft for as long as each draft token is that top token; at the first one that is
    not, it emits the top token instead, and what follows is unknown.
    """
    for t, (d, a) in enumerate(zip(draft, argmax, strict=True)):
        if d != a:
            return [*draft[:t], a]
    return list(draft)


def target_decided(text: str, target: str, complete: bool) -> bool | None:
    """``answer_matches`` of a greedy answer known only as far as ``text`` (None: not yet).

    Args:
        text: the decoded text of the greedy tokens proven so far.
        target: the target text.
        complete: ``text`` is the whole answer decoding would give (end token or budget).
    """
    if complete:
        return answer_matches(text, target)
    if "\ufffd" in text:
        return None
    got = unicodedata.normalize("NFC", text).lstrip()
    want = unicodedata.normalize("NFC", target).strip()
    if len(got) > len(want):
        return answer_matches(text, target)
    return None if _may_become(got, want) else False


def unchanged_decided(text: str, base_answer: str, complete: bool) -> bool | None:
    """Whether a greedy answer known as far as ``text`` is ``base_answer`` (None: not yet)."""
    if complete:
        return text == base_answer
    if "\ufffd" in text or _may_become(text, base_answer):
        return None
    return False


def _may_become(text: str, answer: str) -> bool:
    """Whether decoding more tokens after a partial ``text`` may still spell ``answer``'s start.

    More tokens append text, with two exceptions: a last character may merge with a mark that
    follows (NFC: "e" + U+0301 is "é", "가" + U+11A8 is "각"), which keeps its decomposition as
    the start of the new one's; and a last space may be dropped by a tokenizer that cleans up
    spaces before punctuation. So "A" may still become "Ádám" but never "Doris", and "1"
    settles that an answer is not "Motown".
    """
    if answer.startswith(text) or not text:
        return True
    head, last = text[:-1], text[-1]
    if not answer.startswith(head):
        return False
    if last == " ":
        return True
    nxt = answer[len(head) : len(head) + 1]
    return unicodedata.normalize("NFD", nxt).startswith(unicodedata.normalize("NFD", last))


def unchanged_from_forced(
    scored: Scored, base_answer: str, piece: Callable[[int], str]
) -> bool | None:
    """Whether greedy still gives ``base_answer`` (its tokens forced), when the pass decides it.

    Every argmax equal to the base's tokens reproduces the base answer exactly; a different
    argmax whose text leaves the base answer's text means the answer changed; anything else
    (the same text through other tokens) needs decoding.
    """
    if scored.all_correct:
        return True
    k = next(
        i
        for i, (a, b) in enumerate(zip(scored.answer_ids, scored.argmax_ids, strict=True))
        if a != b
    )
    produced = "".join(piece(t) for t in scored.answer_ids[:k]) + piece(scored.argmax_ids[k])
    if "\ufffd" in produced or base_answer.startswith(produced):
        return None
    return False


@dataclass(frozen=True)
class Verdict:
    """The judge's answer for one (prompt, target) check."""

    ok: bool
    scored: Scored
    """The target's own teacher-forced score (token accuracy, probabilities)."""
    answer: str | None = None
    """The decoded greedy answer, when decoding was needed to decide."""
    decoded: bool = False


@dataclass(frozen=True)
class BaseAnswers:
    """The base model's greedy answers to prompts, kept to tell later whether they changed."""

    prompts: tuple[str, ...]
    answers: tuple[str, ...]
    max_new_tokens: tuple[int, ...]
    forceable: tuple[bool, ...]
    """The base model's forced argmax reproduces generated answer ``i`` token for token (as it
    should, up to batch-shape rounding on near ties): forcing it later decides ``unchanged``."""
    answer_ids: tuple[tuple[int, ...], ...] = ()
    """The generated tokens (an end token included where generation stopped early)."""


@dataclass
class _Draft:
    """A greedy answer being proven by forced passes: the tokens proven so far, and the rest."""

    prompt: str
    budget: int
    """Tokens decoding would emit at most."""
    chain: list[int]
    """Greedy tokens proven so far."""
    expected_ids: tuple[int, ...]
    """Tokens the answer is guessed to be (used while the chain follows them)."""
    rest: Callable[[str], str]
    """The text still expected after the chain's text ("" when there is no guess)."""
    decide: Callable[[str, bool], bool | None]
    """The verdict on the chain's text, whether it is complete (None: not yet)."""


class Judge:
    """Runs the rule over many checks on one model: one forced pass, decoding only the rest."""

    def __init__(
        self,
        lm: LoadedModel,
        scorer: TeacherForcedScorer | None = None,
        *,
        batch_size: int = 32,
        batch_tokens: int = 2048,
    ) -> None:
        self.lm = lm
        self.scorer = scorer or TeacherForcedScorer(
            lm.model, lm.tokenizer, lm.adapter, batch_tokens=batch_tokens
        )
        self.batch_size = batch_size
        tok = lm.tokenizer
        self.end_token: int | None = tok.eos_token_id
        self._special = set(tok.all_special_ids) - {self.end_token}
        self._sentinel: str = tok.eos_token or ""
        self._pieces: dict[int, str] = {}
        self._ends = end_ids(lm.model, tok)
        self._filler = next(iter(sorted(self._ends)), tok.pad_token_id or 0)
        self.decoded = 0
        """Prompts decoded so far (the forced passes could not decide them)."""
        self.drafted = 0
        """Drafts forced so far (``DRAFT_ROUNDS``)."""

    def piece(self, token: int) -> str:
        if token not in self._pieces:
            self._pieces[token] = self.lm.tokenizer.decode([token])
        return self._pieces[token]

    def forced_pairs(self, checks: Sequence[Pair]) -> list[Pair]:
        """The pairs ``judge`` scores for ``checks`` (targets followed by end-of-text)."""
        return [(p, t + self._sentinel) if self._sentinel else (p, t) for p, t in checks]

    def judge(
        self,
        checks: Sequence[Pair],
        *,
        resume_layer: int = 0,
        forced: dict[Pair, Scored] | None = None,
    ) -> list[Verdict]:
        """The verdict for each (prompt, target), in order.

        Args:
            checks: (prompt, target) pairs.
            resume_layer: blocks below this index hold the base weights (see ``editing.scoring``).
            forced: scores of ``forced_pairs(checks)`` already computed in a larger batch.
        """
        unique = list(dict.fromkeys(checks))
        extended = self.forced_pairs(unique)
        if forced is None or any(e not in forced for e in extended):
            scored = self.scorer.score(extended, resume_layer=resume_layer)
            forced = dict(zip(extended, scored, strict=True))
        own: dict[Pair, tuple[Scored, int | None]] = {}
        proven: dict[Pair, list[int]] = {}  # greedy tokens the forced pass proves
        again: list[Pair] = []
        for check, ext in zip(unique, extended, strict=True):
            s = forced[ext]
            plain = self.scorer.encode(check)
            want = plain.ids[plain.n_prompt :]
            k = len(want)
            if self._sentinel and len(s.answer_ids) == k + 1 and s.answer_ids[:k] == want:
                own[check] = (Scored(want, s.argmax_ids[:k], s.logprobs[:k]), s.argmax_ids[k])
            elif not self._sentinel:
                own[check] = (s, None)
            else:  # the end token merged into the target's last token: score it plainly
                again.append(check)
                continue
            proven[check] = proven_tokens(s.answer_ids, s.argmax_ids)
        if again:
            rescored = self.scorer.score(again, resume_layer=resume_layer)
            for c, s in zip(again, rescored, strict=True):
                own[c] = (s, None)
                proven[c] = proven_tokens(s.answer_ids, s.argmax_ids)

        verdicts: dict[Pair, Verdict] = {}
        undecided: list[Pair] = []
        for check in unique:
            scored, following = own[check]
            if following in self._special:  # dropped from the decoded text: decode to be sure
                following = None
            v = verdict_from_forced(scored, check[1], self.piece, following, self.end_token)
            if v is None:
                undecided.append(check)
            else:
                verdicts[check] = Verdict(v, scored)
        drafts = [
            self._target_draft(c, proven[c], len(own[c][0].answer_ids) + DECODE_SLACK_TOKENS)
            for c in undecided
        ]
        todo = []
        for check, draft, (v, text) in zip(
            undecided, drafts, self._prove(drafts, resume_layer), strict=True
        ):
            if v is None:
                todo.append((check, draft.budget))
            else:
                verdicts[check] = Verdict(v, own[check][0], text)
        texts = self.generate([(c[0], budget) for c, budget in todo])
        for (check, _), text in zip(todo, texts, strict=True):
            verdicts[check] = Verdict(answer_matches(text, check[1]), own[check][0], text, True)
        self.decoded += len(todo)
        return [verdicts[c] for c in checks]

    def _target_draft(self, check: Pair, chain: list[int], budget: int) -> _Draft:
        """The draft that continues a check's proven tokens with the rest of its target."""
        target = check[1]
        want = unicodedata.normalize("NFC", target).strip()

        def rest(text: str) -> str:
            got = unicodedata.normalize("NFC", text).lstrip()
            return want[len(got) :] if want.startswith(got) else ""

        own = self.scorer.encode(check)
        return _Draft(
            check[0],
            budget,
            chain,
            own.ids[own.n_prompt :],
            rest,
            lambda text, complete: target_decided(text, target, complete),
        )

    def _answer_text(self, chain: Sequence[int], budget: int) -> tuple[str, bool]:
        """The text decoding gives for proven tokens, and whether decoding would stop there."""
        stop = next((i for i, t in enumerate(chain) if t in self._ends), None)
        if stop is not None and stop < budget:
            return self.lm.tokenizer.decode(chain[: stop + 1], skip_special_tokens=True), True
        cut = chain[:budget]
        return self.lm.tokenizer.decode(cut, skip_special_tokens=True), len(chain) >= budget

    def _prove(self, drafts: Sequence[_Draft], resume_layer: int) -> list[tuple[bool | None, str]]:
        """Each draft's verdict (None: still open) and its text, after up to ``DRAFT_ROUNDS``
        forced passes over its proven tokens plus the guessed rest."""
        results: list[tuple[bool | None, str]] = [(None, "")] * len(drafts)
        open_ = list(range(len(drafts)))
        for round_ in range(DRAFT_ROUNDS + 1):
            still = []
            for i in open_:
                text, complete = self._answer_text(drafts[i].chain, drafts[i].budget)
                results[i] = (drafts[i].decide(text, complete), text)
                if results[i][0] is None:
                    still.append(i)
            open_ = still
            if not open_ or round_ == DRAFT_ROUNDS:
                break
            items = []
            for i in open_:
                d = drafts[i]
                items.append((d.prompt, self._draft_tokens(d, results[i][1])))
            scored = self.scorer.score_tokens(items, resume_layer=resume_layer)
            self.drafted += len(items)
            for i, (_, tokens), s in zip(open_, items, scored, strict=True):
                drafts[i].chain = proven_tokens(tokens, s.argmax_ids)
        return results

    def _draft_tokens(self, d: _Draft, text: str) -> list[int]:
        """Proven tokens, the guessed rest, and a filler whose position yields the next token."""
        n = len(d.chain)
        if tuple(d.chain) == d.expected_ids[:n]:
            guess = list(d.expected_ids[n:])
        else:
            rest = d.rest(text) if "\ufffd" not in text else ""
            guess = self.lm.tokenizer(rest, add_special_tokens=False).input_ids if rest else []
        tokens = (d.chain + guess)[: d.budget]
        if len(tokens) < d.budget:
            tokens.append(self._filler)
        return tokens

    def base_answers(self, prompts: Sequence[str], budgets: Sequence[int]) -> BaseAnswers:
        """Greedy answers of ``budgets[i]`` tokens; call on the BASE weights.

        Each answer is forced later on the very tokens greedy produced (``register``), so a
        text that re-tokenises differently (" Paris" vs "\n\nThe") can still be forced.
        """
        if not prompts:
            return BaseAnswers((), (), (), (), ())
        by_length: dict[int, list[int]] = {}
        for i, n in enumerate(budgets):
            by_length.setdefault(n, []).append(i)
        ids: list[list[int]] = [[] for _ in prompts]
        for n, rows in sorted(by_length.items()):
            got = greedy_token_ids(
                self.lm.model, self.lm.tokenizer, [prompts[r] for r in rows], n, self.batch_size
            )
            for r, row in zip(rows, got, strict=True):
                ids[r] = row
        answers = self.lm.tokenizer.batch_decode(ids, skip_special_tokens=True)
        base = BaseAnswers(
            tuple(prompts),
            tuple(answers),
            tuple(budgets),
            tuple(bool(row) for row in ids),
            tuple(tuple(row) for row in ids),
        )
        pairs = self.unchanged_pairs(base)
        scored = dict(zip(pairs, self.scorer.score(pairs), strict=True))
        forceable = tuple(
            ok and scored[(p, a)].all_correct
            for p, a, ok in zip(base.prompts, base.answers, base.forceable, strict=True)
        )
        return BaseAnswers(
            base.prompts, base.answers, base.max_new_tokens, forceable, base.answer_ids
        )

    def unchanged_pairs(self, base: BaseAnswers) -> list[Pair]:
        """The pairs ``unchanged`` scores: the forceable base answers on their generated tokens."""
        pairs = []
        for p, a, ok, ids in zip(
            base.prompts, base.answers, base.forceable, base.answer_ids, strict=True
        ):
            if ok:
                self.scorer.register((p, a), ids)
                pairs.append((p, a))
        return pairs

    def unchanged(
        self,
        base: BaseAnswers,
        *,
        resume_layer: int = 0,
        forced: dict[Pair, Scored] | None = None,
    ) -> tuple[list[bool], list[str | None]]:
        """Whether each prompt's greedy answer is still the base one; decoded answers beside.

        Returns:
            The verdicts and, per prompt, the answer text where it was decoded (else None).
        """
        pairs = self.unchanged_pairs(base)
        if forced is None or any(p not in forced for p in pairs):
            forced = forced_map(self.scorer, pairs, resume_layer=resume_layer)
        verdicts: list[bool | None] = []
        for p, a, ok in zip(base.prompts, base.answers, base.forceable, strict=True):
            verdicts.append(unchanged_from_forced(forced[(p, a)], a, self.piece) if ok else None)
        undecided = [i for i, v in enumerate(verdicts) if v is None]
        drafts = [self._unchanged_draft(base, i, forced) for i in undecided]
        decoded: list[str | None] = [None] * len(verdicts)
        for i, (v, text) in zip(undecided, self._prove(drafts, resume_layer), strict=True):
            verdicts[i] = v
            if v is not None:
                decoded[i] = text
        todo = [i for i, v in enumerate(verdicts) if v is None]
        texts = self.generate([(base.prompts[i], base.max_new_tokens[i]) for i in todo])
        for i, text in zip(todo, texts, strict=True):
            verdicts[i] = text == base.answers[i]
            decoded[i] = text
        self.decoded += len(todo)
        return [bool(v) for v in verdicts], decoded

    def _unchanged_draft(self, base: BaseAnswers, i: int, forced: dict[Pair, Scored]) -> _Draft:
        """The draft that continues prompt ``i``'s proven tokens with the base answer's."""
        prompt, answer = base.prompts[i], base.answers[i]
        s = forced.get((prompt, answer)) if base.forceable[i] else None
        chain = proven_tokens(s.answer_ids, s.argmax_ids) if s is not None else []
        return _Draft(
            prompt,
            base.max_new_tokens[i],
            chain,
            tuple(base.answer_ids[i]) if base.answer_ids else (),
            lambda text: answer[len(text) :] if answer.startswith(text) else "",
            lambda text, complete: unchanged_decided(text, answer, complete),
        )

    def answer_length(self, pair: Pair) -> int:
        """Tokens of ``pair``'s answer after its prompt."""
        enc = self.scorer.encode(pair)
        return len(enc.ids) - enc.n_prompt

    def generate(self, jobs: Sequence[tuple[str, int]]) -> list[str]:
        """Greedy continuations of (prompt, max_new_tokens) jobs, batched by length."""
        by_length: dict[int, list[int]] = {}
        for i, (_, n) in enumerate(jobs):
            by_length.setdefault(n, []).append(i)
        out: list[str] = [""] * len(jobs)
        for n, rows in sorted(by_length.items()):
            prompts = [jobs[r][0] for r in rows]
            texts = greedy_generate(self.lm.model, self.lm.tokenizer, prompts, n, self.batch_size)
            for r, text in zip(rows, texts, strict=True):
                out[r] = text
        return out


def forced_map(
    scorer: TeacherForcedScorer, pairs: Sequence[Pair], **kwargs: Any
) -> dict[Pair, Scored]:
    """Score ``pairs`` once and map each to its result (to share one pass among several uses)."""
    unique = list(dict.fromkeys(pairs))
    return dict(zip(unique, scorer.score(unique, **kwargs), strict=True))


__all__ = [
    "DECODE_SLACK_TOKENS",
    "DRAFT_ROUNDS",
    "BaseAnswers",
    "Judge",
    "Verdict",
    "answer_matches",
    "contains_answer",
    "forced_map",
    "proven_tokens",
    "target_decided",
    "unchanged_decided",
    "unchanged_from_forced",
    "verdict_from_forced",
]

"""The base model's figures an audit compares against, computed once and cached as JSON.

Locality asks whether a probe still gets the base model's greedy answer and drift compares
perplexity with the base model's, so both need the base weights' own results. They are computed
on the base weights once and cached under the hash of those weights, the probe set and the text
sample: a restart reads them back, and a change to any of the three computes them anew.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from editing.checks import DECODE_SLACK_TOKENS, Judge
from editing.models import LoadedModel
from editing.perplexity import TextSampleError, perplexity, text_pairs
from monitoring.errors import AuditError
from monitoring.files import sha256_json, write_atomic
from monitoring.probes.load import Probe, probe_set_hash, text_sample_hash

log = logging.getLogger(__name__)

BASELINE_SCHEMA = "factkeeper-audit-baseline/v2"


@dataclass(frozen=True)
class Baseline:
    """The base model's greedy probe answers and text perplexity, for one probe set and text.

    ``answer_ids[i]`` are the tokens the base model generated for probe ``i`` and
    ``forceable[i]`` says its forced argmax reproduces them (checked on the base weights), so a
    later model gives that answer exactly when its teacher-forced argmax matches every one.
    """

    base_hash: str
    probes_hash: str
    text_hash: str
    answers: tuple[str, ...]
    max_new_tokens: tuple[int, ...]
    forceable: tuple[bool, ...]
    perplexity: float
    text_tokens: int
    answer_ids: tuple[tuple[int, ...], ...] = ()
    seconds: float = field(default=0.0, compare=False)

    @classmethod
    def compute(
        cls,
        lm: LoadedModel,
        probes: Sequence[Probe],
        text: Sequence[str],
        *,
        batch_size: int = 32,
        batch_tokens: int = 2048,
    ) -> Baseline:
        """Run the probes and the text sample on ``lm``, which must hold the BASE weights."""
        if not probes:
            raise AuditError("a baseline needs at least one probe")
        started = time.perf_counter()
        judge = Judge(lm, batch_size=batch_size, batch_tokens=batch_tokens)
        budgets = [judge.answer_length((p.prompt, p.answer)) + DECODE_SLACK_TOKENS for p in probes]
        base = judge.base_answers([p.prompt for p in probes], budgets)
        try:
            ppl, tokens = perplexity(judge.scorer.score(text_pairs(text)))
        except TextSampleError as exc:
            raise AuditError(str(exc)) from None
        baseline = cls(
            base_hash=lm.base_hash,
            probes_hash=probe_set_hash(probes),
            text_hash=text_sample_hash(text),
            answers=base.answers,
            max_new_tokens=base.max_new_tokens,
            forceable=base.forceable,
            perplexity=ppl,
            text_tokens=tokens,
            answer_ids=base.answer_ids,
            seconds=time.perf_counter() - started,
        )
        log.info(
            "audit baseline computed",
            extra={
                "probes": len(probes),
                "forceable": sum(base.forceable),
                "perplexity": round(ppl, 3),
                "seconds": round(baseline.seconds, 1),
            },
        )
        return baseline

    @classmethod
    def load_or_compute(
        cls,
        lm: LoadedModel,
        probes: Sequence[Probe],
        text: Sequence[str],
        folder: Path,
        *,
        batch_size: int = 32,
        batch_tokens: int = 2048,
    ) -> Baseline:
        """The cached baseline for these weights, probes and text, computed and saved if absent.

        Call it while ``lm`` holds the base weights (before restoring any edited version): a
        cache miss computes from whatever weights the model holds.
        """
        probes_hash, text_hash = probe_set_hash(probes), text_sample_hash(text)
        path = folder / f"baseline-{sha256_json([lm.base_hash, probes_hash, text_hash])[:24]}.json"
        cached = cls._read(path)
        if cached is not None and (cached.base_hash, cached.probes_hash, cached.text_hash) == (
            lm.base_hash,
            probes_hash,
            text_hash,
        ):
            log.info("audit baseline loaded from %s", path)
            return cached
        baseline = cls.compute(lm, probes, text, batch_size=batch_size, batch_tokens=batch_tokens)
        write_atomic(path, json.dumps(baseline.to_dict(), indent=1, ensure_ascii=False))
        return baseline

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data = {"schema": BASELINE_SCHEMA, **data}
        for key in ("answers", "max_new_tokens", "forceable"):
            data[key] = list(data[key])
        data["answer_ids"] = [list(ids) for ids in self.answer_ids]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Baseline:
        if data.get("schema") != BASELINE_SCHEMA:
            raise ValueError(f"not a {BASELINE_SCHEMA} file")
        baseline = cls(
            base_hash=str(data["base_hash"]),
            probes_hash=str(data["probes_hash"]),
            text_hash=str(data["text_hash"]),
            answers=tuple(str(a) for a in data["answers"]),
            max_new_tokens=tuple(int(n) for n in data["max_new_tokens"]),
            forceable=tuple(bool(f) for f in data["forceable"]),
            perplexity=float(data["perplexity"]),
            text_tokens=int(data["text_tokens"]),
            answer_ids=tuple(tuple(int(t) for t in ids) for ids in data["answer_ids"]),
            seconds=float(data["seconds"]),
        )
        lengths = {len(baseline.max_new_tokens), len(baseline.forceable), len(baseline.answer_ids)}
        if lengths != {len(baseline.answers)}:
            raise ValueError("per-probe lists differ in length")
        return baseline

    @classmethod
    def _read(cls, path: Path) -> Baseline | None:
        """The cached baseline, or None when absent or unreadable (it is then recomputed)."""
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the unreadable audit baseline %s (%s); recomputing", path, exc)
            return None


__all__ = ["BASELINE_SCHEMA", "Baseline"]

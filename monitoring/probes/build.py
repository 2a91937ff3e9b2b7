"""Rebuild the bundled locality probe set: CounterFact facts SmolLM2 answers correctly unedited.

A locality probe only measures something if the base model gets it right: a probe the model
already fails cannot show an edit breaking it. So candidates come from the CounterFact records
the demo and the benchmark never edit (the ``val`` split, then ``train`` if more are needed),
as (prompt, true answer) pairs: each record's neighbourhood prompts and its own prompt. A
candidate is kept when SmolLM2's greedy answer passes the judge (``editing.checks``), the rule
the audits use. Prompts that also occur anywhere in the ``eval`` split are dropped, and no
answer may fill more than ``max_per_answer`` probes, so "French" and "English" cannot dominate.

Run ``python -m monitoring.probes.build`` (about 5 minutes on one thread); the README next to
this file records the command and the result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import cast

import torch

from editing.checks import Judge
from editing.datasets import CF_MEND, SPLITS, Split, default_data_dir, load_dataset
from editing.models import LoadedModel, load_model

log = logging.getLogger(__name__)

OUTPUT = Path(__file__).with_name("counterfact-smollm2.jsonl")
DEFAULT_COUNT = 300
DEFAULT_MAX_PER_ANSWER = 12
DEFAULT_SEED = 0
CHUNK = 400  # candidates checked per round, so the build stops soon after it has enough


def candidates(split: Split, data_dir: Path, excluded_prompts: set[str]) -> list[tuple[str, str]]:
    """(prompt, true answer) pairs of one split: neighbourhood prompts first, then own prompts."""
    requests = load_dataset("counterfact", split, data_dir=data_dir)
    pairs: list[tuple[str, str]] = []
    for r in requests:
        pairs += [(p.prompt, p.answer) for p in r.locality]
    pairs += [(r.prompt, r.target_true) for r in requests if r.target_true]
    first_answer: dict[str, str] = {}
    for prompt, answer in pairs:
        prompt, answer = prompt.strip(), answer.strip()
        if prompt and answer and prompt not in excluded_prompts:
            first_answer.setdefault(prompt, answer)  # a probe set holds each prompt once
    return list(first_answer.items())


def eval_prompts(data_dir: Path) -> set[str]:
    """Every prompt of the split the demo and benchmark edit: none of them may become a probe."""
    prompts: set[str] = set()
    for r in load_dataset("counterfact", "eval", data_dir=data_dir):
        prompts.add(r.prompt.strip())
        prompts.update(x.strip() for x in r.rephrases)
        prompts.update(p.prompt.strip() for p in r.locality)
    return prompts


def answered(lm: LoadedModel, pairs: Sequence[tuple[str, str]]) -> list[bool]:
    """Whether the greedy answer of each prompt passes the judge (``editing.checks``)."""
    return [v.ok for v in Judge(lm).judge(pairs)]


def select(
    lm: LoadedModel,
    pools: Iterable[list[tuple[str, str]]],
    count: int,
    max_per_answer: int,
    seed: int,
) -> list[tuple[str, str]]:
    """Probes in selection order: each pool shuffled with ``seed``, checked a chunk at a time."""
    chosen: list[tuple[str, str]] = []
    per_answer: Counter[str] = Counter()
    for pool in pools:
        order = list(pool)
        random.Random(seed).shuffle(order)
        while order and len(chosen) < count:
            taken = {prompt for prompt, _ in chosen}  # pools may share prompts
            chunk = [
                (prompt, answer)
                for prompt, answer in order[:CHUNK]
                if per_answer[answer] < max_per_answer and prompt not in taken
            ]
            order = order[CHUNK:]
            for pair, ok in zip(chunk, answered(lm, chunk), strict=True):
                if ok and per_answer[pair[1]] < max_per_answer and len(chosen) < count:
                    chosen.append(pair)
                    per_answer[pair[1]] += 1
            log.info("probes selected: %d of %d", len(chosen), count)
    return chosen


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    """Select the probes and write them as JSONL; prints a summary for the README."""
    parser = argparse.ArgumentParser(prog="python -m monitoring.probes.build", description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=OUTPUT)
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT)
    parser.add_argument("--max-per-answer", type=int, default=DEFAULT_MAX_PER_ANSWER)
    parser.add_argument("--splits", default="val,train", help="comma-separated, in order")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data_dir = args.data_dir or default_data_dir()
    lm = load_model("smollm2")
    excluded = eval_prompts(data_dir)
    splits = [cast(Split, s) for s in args.splits.split(",") if s]
    if not splits or "eval" in splits or not set(splits) <= set(SPLITS):
        parser.error("--splits takes train and/or val: eval is what the demo edits")
    pools = (candidates(split, data_dir, excluded) for split in splits)
    probes = select(lm, pools, args.count, args.max_per_answer, args.seed)
    lines = [json.dumps({"prompt": p, "answer": a}, ensure_ascii=False) for p, a in probes]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {
        "probes": len(probes),
        "distinct_answers": len({a for _, a in probes}),
        "out": str(args.out),
        "out_sha256": sha256(args.out),
        "sources": {s: sha256(data_dir / CF_MEND[s]) for s in (*splits, "eval")},
        "model_base_hash": lm.base_hash,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Why do the fact memory's edits miss paraphrases: does the row not fire, or does its value not
carry over to another wording?

For each method spec (``memory`` with options) it applies a stream of requests in batches on a
fresh SmolLM2, then decodes every edit prompt and real paraphrase greedily and records, per
prompt, whether the request's own row fired anywhere in it and whether the answer is the new
target by the judge's rule (``editing.checks.answer_matches``). A paraphrase that fires but
fails is the value's fault; one that does not fire is the gate's. Failures are split by how the
answer starts (a line break: the model answers in another format). Diagnose on ZsRE train or
CounterFact val; never tune on an eval stream.

    python bench/memory_paraphrase.py --dataset zsre --split train --skip 300 --edits 40 \\
        --methods memory,memory:clamp_norm_factor=1.5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editing.bench import git_revision, machine_info, seed_everything  # noqa: E402
from editing.checks import answer_matches  # noqa: E402
from editing.datasets import load_dataset  # noqa: E402
from editing.generation import greedy_generate  # noqa: E402
from editing.memory.module import FactMemory, memory_of  # noqa: E402
from editing.models import load_model  # noqa: E402
from editing.registry import get_editor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="zsre")
    parser.add_argument("--split", default="train")
    parser.add_argument("--skip", type=int, default=300)
    parser.add_argument("--edits", type=int, default=40)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--methods", default="memory")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory-paraphrase.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    requests = load_dataset(args.dataset, args.split, limit=args.skip + args.edits)[args.skip :]
    out: dict[str, Any] = {
        "command": " ".join(["python", "bench/memory_paraphrase.py", *sys.argv[1:]]),
        "dataset": args.dataset,
        "split": args.split,
        "skip": args.skip,
        "n_edits": len(requests),
        "git_rev": git_revision(),
        "machine": machine_info(),
        "loadavg_start": list(os.getloadavg()),
        "methods": {},
    }
    for spec in [m for m in args.methods.split(",") if m]:
        seed_everything(0)
        lm = load_model("smollm2")
        editor = get_editor(spec)
        editor.prepare_model(lm)
        started = time.perf_counter()
        for start in range(0, len(requests), args.batch):
            editor.apply(lm, requests[start : start + args.batch])
        seconds = time.perf_counter() - started
        memory = memory_of(lm)
        assert memory is not None
        rows = memory.used_rows().tolist()
        fired = _record_fired(memory)
        prompts = []
        for row, request in zip(rows, requests, strict=True):
            kinds = [("prompt", request.prompt)] + [("paraphrase", x) for x in request.rephrases]
            for kind, prompt in kinds:
                fired.clear()
                answer = greedy_generate(lm.model, lm.tokenizer, [prompt], 12)[0]
                prompts.append(
                    {
                        "kind": kind,
                        "prompt": prompt,
                        "target": request.target_new,
                        "answer": answer,
                        "fired": row in (fired[0] if fired else set()),
                        "ok": answer_matches(answer, request.target_new),
                    }
                )
        out["methods"][spec] = {"edit_seconds": seconds, **_counts(prompts), "prompts": prompts}
        print(spec, {k: v for k, v in out["methods"][spec].items() if k != "prompts"})
    out["loadavg_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


def _record_fired(memory: FactMemory) -> list[set[int]]:
    """Wrap ``memory.fired`` so each forward's firing rows (any position) are recorded."""
    seen: list[set[int]] = []
    original = memory.fired

    def fired(activations: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hits = original(activations, positions)
        seen.append(set(hits[0].any(dim=0).nonzero().flatten().tolist()))
        return hits

    memory.fired = fired  # type: ignore[method-assign]
    return seen


def _counts(prompts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("prompt", "paraphrase"):
        rows = [p for p in prompts if p["kind"] == kind]
        value_misses = [p for p in rows if p["fired"] and not p["ok"]]
        out[kind] = {
            "n": len(rows),
            "fired": sum(p["fired"] for p in rows),
            "ok": sum(p["ok"] for p in rows),
            "ok_without_firing": sum(p["ok"] and not p["fired"] for p in rows),
            "fired_but_wrong": len(value_misses),
            "fired_but_wrong_starting_with_a_line_break": sum(
                p["answer"].startswith("\n") for p in value_misses
            ),
        }
    return out


if __name__ == "__main__":
    main()

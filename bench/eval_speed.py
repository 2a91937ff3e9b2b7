"""How long the yardstick takes: the final evaluation of an edited stream, every summary metric.

Loads SmolLM2 and the first ``--edits`` requests of a stream, runs the base pass (kept for reuse,
as ``factkeeper bench`` does), applies every edit with ``--method`` in batches, then times
``Evaluator.evaluate`` over all of them on the edited weights, ``--repeats`` times. Run it alone:
seconds are only comparable on an otherwise idle machine (the load average is recorded).

    python bench/eval_speed.py --dataset zsre --edits 1000 --threads 2

Writes ``bench/results/eval-speed-<dataset>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

# The checkout this script sits in, not whichever one the environment installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editing.bench import (
    WIKITEXT_TEST,
    git_revision,
    json_default,
    machine_info,
    seed_everything,
    utc_now_iso,
)
from editing.datasets import DATASETS, default_data_dir, load_dataset
from editing.editors.base import EditError
from editing.evaluation import EvalConfig, Evaluator, ModelState
from editing.models import load_model
from editing.perplexity import read_text_file
from editing.registry import get_editor
from editing.requests import LocalityProbe
from monitoring.probes.load import load_probe_set

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=DATASETS, default="zsre")
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--method", default="emsedit")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    seed_everything(0)
    loadavg_start = list(os.getloadavg())
    lm = load_model("smollm2")
    requests = load_dataset(args.dataset, "eval", limit=args.edits)
    unrelated = [LocalityProbe(p.prompt, p.answer, "unrelated") for p in load_probe_set(None)]
    text = read_text_file(default_data_dir() / WIKITEXT_TEST, EvalConfig().perplexity_chars)

    editor = get_editor(args.method)
    probe = editor.apply(lm, requests[:1])
    layer = ModelState.from_touched(lm.adapter, set(probe.deltas)).resume_layer
    editor.undo(lm, probe)
    evaluator = Evaluator(lm, requests, EvalConfig(), unrelated=unrelated, text=text)
    started = time.perf_counter()
    evaluator.prepare_base(capture_layers=[layer] if layer else [])
    base_seconds = time.perf_counter() - started

    editor = get_editor(args.method)
    touched: set[str] = set()
    refused = 0
    for start in tqdm(range(0, len(requests), args.batch), desc=args.method):
        try:
            touched |= set(editor.apply(lm, requests[start : start + args.batch]).deltas)
        except EditError:
            refused += len(requests[start : start + args.batch])
    state = ModelState.from_touched(lm.adapter, touched)

    runs: list[dict[str, Any]] = []
    for _ in range(args.repeats):
        tokens, drafted = evaluator.scorer.tokens_run, evaluator.judge.drafted
        started, cpu = time.perf_counter(), time.process_time()
        report = evaluator.evaluate(requests, state)
        runs.append(
            {
                "seconds": time.perf_counter() - started,
                "cpu_seconds": time.process_time() - cpu,
                "breakdown_seconds": report["eval_breakdown_seconds"],
                "pairs": report["n_pairs"],
                "decoded": report["decoded"],
                # positions run through the blocks (drafts included) and drafts forced
                "tokens_run": evaluator.scorer.tokens_run - tokens,
                "drafted": evaluator.judge.drafted - drafted,
            }
        )
    report.pop("per_request")
    out = {
        "command": " ".join(["python", "bench/eval_speed.py", *(argv or sys.argv[1:])]),
        "dataset": args.dataset,
        "n_edits": len(requests),
        "method": args.method,
        "batch": args.batch,
        "threads": args.threads,
        "resume_layer": state.resume_layer,
        "refused": refused,
        "base_pass_seconds": base_seconds,
        "final_eval_seconds": [r["seconds"] for r in runs],
        "final_eval_seconds_median": statistics.median(r["seconds"] for r in runs),
        # The summary's keys alone: the teacher-forced pass and the judge (fluency and
        # multi-hop are reported beside the summary, not in it).
        "summary_eval_seconds_median": statistics.median(
            r["breakdown_seconds"]["teacher_forced"] + r["breakdown_seconds"]["judge"] for r in runs
        ),
        "runs": runs,
        "summary": report["summary"],
        "git_rev": git_revision(),
        "machine": machine_info(),
        "torch_version": torch.__version__,
        "started_at": utc_now_iso(),
        "loadavg_start": loadavg_start,
        "loadavg_end": list(os.getloadavg()),
    }
    path = RESULTS / f"eval-speed-{args.dataset}.json"
    path.write_text(json.dumps(out, indent=1, default=json_default) + "\n")
    print(
        f"{args.dataset}: final evaluation of {len(requests)} edited facts: "
        f"{out['final_eval_seconds_median']:.1f} s median of {args.repeats} "
        f"(summary keys {out['summary_eval_seconds_median']:.1f} s) "
        f"({args.threads} threads, load {loadavg_start[0]:.1f}→{out['loadavg_end'][0]:.1f}); "
        f"base pass {base_seconds:.0f} s -> {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

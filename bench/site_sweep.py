"""Where does an untrained EMSEdit step take, and what does it move? One batch per edit site.

For each candidate site (matrices and key position) and step size, the first ``--edits`` CounterFact
val requests are edited as one batch by an *untrained* EMSEdit (identity hypernetworks with the
lifelong normaliser, so each of its 2 steps is the normalised gradient aggregated by the ridge
solve), then judged (``editing.checks``): ``efficacy_exact`` on the edit prompts and
``neighbourhood_kept`` on each request's neighbourhood prompt; undone before the next. One batch
says where a gradient step can reach the target and what it disturbs on the way; it does not
replace the sequential benchmark, and a trained hypernetwork may behave differently.

    python bench/site_sweep.py --threads 1

Writes ``bench/results/site-sweep.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

# The checkout this script sits in, not whichever one the environment installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editing.bench import RunRecord, seed_everything
from editing.checks import DECODE_SLACK_TOKENS, Judge
from editing.datasets import load_dataset
from editing.models import load_model
from editing.registry import get_editor

RESULTS = Path(__file__).resolve().parent / "results" / "site-sweep.json"
SITES = {
    "up L20-25, answer tokens (EMSEdit today)": "modules=up20-25:key_position=answer",
    "down L20-25, answer tokens": "modules=down20-25:key_position=answer",
    "up L3-7, subject token": "modules=up3-7:key_position=subject",
    "down L3-7, subject token (NSE, MEMIT)": "modules=down3-7:key_position=subject",
}
STEP_SIZES = (1e-4, 1e-3, 1e-2, 1e-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(0)
    record = RunRecord.start("bench/site_sweep.py", argv)
    lm = load_model("smollm2")
    requests = [r for r in load_dataset("counterfact", "val", limit=args.edits) if r.locality]
    judge = Judge(lm)
    neighbours = [r.locality[0] for r in requests]
    base = judge.base_answers(
        [p.prompt for p in neighbours],
        [judge.answer_length((p.prompt, p.answer)) + DECODE_SLACK_TOKENS for p in neighbours],
    )
    rows = []
    for site, spec in SITES.items():
        for lr in STEP_SIZES:
            method = f"emsedit:untrained=true:{spec}:lr_init={lr}:update_normalizer_at_edit=true"
            editor = get_editor(method)
            started = time.perf_counter()
            result = editor.apply(lm, requests)
            seconds = time.perf_counter() - started
            try:
                took = judge.judge([(r.prompt, r.target_new) for r in requests])
                kept, _ = judge.unchanged(base)
            finally:
                editor.undo(lm, result)
            rows.append(
                {
                    "site": site,
                    "method": method,
                    "lr_init": lr,
                    "efficacy_exact": sum(v.ok for v in took) / len(took),
                    "neighbourhood_kept": sum(kept) / len(kept),
                    "edit_seconds": seconds,
                }
            )
            print(
                f"{site:<42} lr {lr:<7g} efficacy {rows[-1]['efficacy_exact']:.2f} "
                f"neighbourhood kept {rows[-1]['neighbourhood_kept']:.2f}",
                flush=True,
            )
    out = {
        "dataset": "counterfact val",
        "n_edits": len(requests),
        "rows": rows,
    }
    record.write(RESULTS, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

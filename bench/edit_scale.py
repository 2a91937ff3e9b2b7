"""Does an EMSEdit edit write the same change alone as inside a batch of 20?

For the first ``--batches`` batches of 20 CounterFact val requests, the first ``--per-batch``
requests of each are edited alone and inside their batch (``compute_deltas``: the model is left
unchanged). Measured per request: the change each edited module's output makes at the request's
own answer-token keys, ``||K_e dW^T||_F`` summed over modules, alone / in the batch. Both loss
scalings are measured side by side: ``per_request`` (the shipped one, ``grad_rows``) and
``micro_batch_mean`` (the reference's mean cross-entropy over the micro-batch's tokens).

    python bench/edit_scale.py --threads 2

Writes ``bench/results/edit-scale.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

# The checkout this script sits in, not whichever one the environment installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import editing.emsedit.keys as keys_module
from editing.bench import RunRecord, seed_everything
from editing.datasets import load_dataset
from editing.emsedit.editor import EMSEditEditor, edit_pairs
from editing.hooks import frozen_parameters
from editing.models import LoadedModel, load_model
from editing.requests import EditRequest

RESULTS = Path(__file__).resolve().parent / "results" / "edit-scale.json"
SCALINGS = ("per_request", "micro_batch_mean")


def _micro_batch_mean(model: Any, batch: Any, grad_rows: int) -> torch.Tensor:
    return keys_module.answer_loss(model, batch)


def own_keys(lm: LoadedModel, editor: EMSEditEditor, request: EditRequest) -> dict[str, Any]:
    """Each edited weight's inputs at the request's answer tokens on the current weights."""
    assert editor.modules is not None and editor.config is not None
    modules = {m.name: dict(lm.model.named_modules())[m.name] for m in editor.modules}
    with frozen_parameters(lm.model):
        cache = keys_module.capture_keys_and_grads(
            lm.model, modules, lm.tokenizer, edit_pairs([request]), 1, lm.device, 1
        )
    return {m.weight_key: cache[m.name][0] for m in editor.modules}  # (n_tok, d_in)


def output_change(lm: LoadedModel, deltas: dict[str, torch.Tensor], keys: dict[str, Any]) -> float:
    total = 0.0
    for key, k in keys.items():
        delta = lm.adapter.to_stored(deltas[key])  # (d_out, d_in)
        total += float((k @ delta.T).norm()) ** 2  # (n_tok, d_in) @ (d_in, d_out)
    return total**0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--per-batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(0)
    record = RunRecord.start("bench/edit_scale.py", argv)
    lm = load_model("smollm2")
    requests = load_dataset("counterfact", "val", limit=20 * args.batches)
    editor = EMSEditEditor()
    editor.edited_matrices(lm)
    original_loss = keys_module.request_loss
    ratios: dict[str, list[float]] = {s: [] for s in SCALINGS}
    try:
        for scaling in SCALINGS:
            keys_module.request_loss = (
                original_loss if scaling == "per_request" else _micro_batch_mean
            )
            for b in tqdm(range(args.batches), desc=scaling):
                batch = requests[20 * b : 20 * (b + 1)]
                together = editor.compute_deltas(lm, batch)
                for request in batch[: args.per_batch]:
                    alone = editor.compute_deltas(lm, [request])
                    keys = own_keys(lm, editor, request)
                    ratios[scaling].append(
                        output_change(lm, alone, keys) / output_change(lm, together, keys)
                    )
    finally:
        keys_module.request_loss = original_loss
    out = {
        "measure": "||K_e dW^T|| alone / inside its batch of 20, summed over edited modules",
        "n_requests": len(ratios[SCALINGS[0]]),
        "per_scaling": {
            s: {
                "median": statistics.median(r),
                "min": min(r),
                "max": max(r),
                "ratios": r,
            }
            for s, r in ratios.items()
        },
        "checkpoint": str(editor.checkpoint),
    }
    record.write(RESULTS, out)
    print(f"{'scaling':<18} {'median':>7} {'min':>7} {'max':>7}  (alone / in batch of 20)")
    for s, row in out["per_scaling"].items():
        print(f"{s:<18} {row['median']:7.2f} {row['min']:7.2f} {row['max']:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

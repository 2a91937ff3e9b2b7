"""What EMSEdit costs: an edit against one forward+backward, and L2 against KL training.

1. Edit cost. For batches of 1 and 20 CounterFact requests, the wall time of one edit call
   (``compute_deltas``: the editor's steps, model unchanged) for each method, interleaved with
   one forward+backward of the same batch on the same model (the mean answer-token
   cross-entropy, gradients for every parameter: one fine-tuning step without the update).
   Ratio = median edit time / median fwd+bwd time, both measured in the same loop.
2. Training time. ``train_editor`` for a few turns on the same training cases with the default
   L2 drift penalty and with the KL ablation (``editing/emsedit/configs/kl.yaml``), seconds per
   turn, run one after the other in this process.

    python bench/emsedit_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# The checkout this script sits in, not whichever one the environment installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editing.bench import git_revision, json_default, machine_info, seed_everything, utc_now_iso
from editing.datasets import load_dataset
from editing.editors.base import EditError
from editing.emsedit.config import EMSEditConfig
from editing.emsedit.keys import answer_loss, tokenize_pairs
from editing.emsedit.train import train_editor
from editing.models import load_model
from editing.registry import get_editor
from editing.requests import continuation

RESULTS = Path(__file__).resolve().parent / "results" / "emsedit-cost.json"
KL_CONFIG = Path(__file__).resolve().parents[1] / "editing" / "emsedit" / "configs" / "kl.yaml"


def fwd_bwd_seconds(lm, requests) -> float:
    pairs = [(r.prompt, continuation(r.target_new)) for r in requests]
    batch = tokenize_pairs(lm.tokenizer, pairs, lm.device)
    params = [p for p in lm.model.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        started = time.perf_counter()
        with torch.enable_grad():
            loss = answer_loss(lm.model, batch)
            grads = torch.autograd.grad(loss, params)
        del grads
        return time.perf_counter() - started
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def edit_cost(lm, methods: list[str], sizes: list[int], reps: int) -> dict[str, Any]:
    requests = load_dataset("counterfact", "eval", limit=max(sizes) * reps)
    editors = {m: get_editor(m) for m in methods}
    refused: dict[str, int] = dict.fromkeys(methods, 0)
    for editor in editors.values():  # load checkpoints, C0 and originals outside the timing
        for size in sizes:
            try:
                editor.undo(lm, editor.apply(lm, requests[:size]))
                break
            except EditError:
                continue
    out: dict[str, Any] = {}
    for size in sizes:
        times: dict[str, list[float]] = {m: [] for m in ["fwd+bwd", *methods]}
        for rep in range(reps):
            batch = requests[rep * size : (rep + 1) * size]
            times["fwd+bwd"].append(fwd_bwd_seconds(lm, batch))
            for name, editor in editors.items():
                started = time.perf_counter()
                try:
                    editor.compute_deltas(lm, batch)
                except EditError:  # a safeguard refused: the work was done all the same
                    refused[name] += 1
                times[name].append(time.perf_counter() - started)
        ref = statistics.median(times["fwd+bwd"])
        out[str(size)] = {
            name: {
                "p50_seconds": statistics.median(values),
                "p95_seconds": sorted(values)[max(0, round(0.95 * len(values)) - 1)],
                "ratio_to_fwd_bwd": statistics.median(values) / ref,
                "per_edit_seconds": statistics.median(values) / size,
            }
            for name, values in times.items()
        }
    out["refused_calls"] = refused
    return out


def training_time(lm, turns: int) -> dict[str, Any]:
    requests = load_dataset("counterfact", "train", limit=20 * turns)
    out = {}
    for label, config in (
        ("l2", EMSEditConfig()),
        ("kl", EMSEditConfig.from_yaml(KL_CONFIG)),
    ):
        seed_everything(0)
        with tempfile.TemporaryDirectory() as tmp:
            result = train_editor(
                lm,
                requests,
                config,
                batches=turns,
                out=Path(tmp),
                save_every=turns,
                progress=False,
                resume=False,
                dataset_name="counterfact/train",
            )
        out[label] = {"turns": turns, "seconds": result.seconds, "per_turn": result.seconds / turns}
    out["kl_over_l2"] = out["kl"]["seconds"] / out["l2"]["seconds"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="emsedit,emsedit:steps=1,emsedit+safeguards")
    parser.add_argument("--sizes", default="1,20")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--train-turns", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    seed_everything(0)
    loadavg_start = list(os.getloadavg())
    lm = load_model("smollm2")
    methods = [m for m in args.methods.split(",") if m]
    sizes = [int(s) for s in args.sizes.split(",")]
    out: dict[str, Any] = {
        "command": " ".join(["python", "bench/emsedit_cost.py", *(argv or sys.argv[1:])]),
        "git_rev": git_revision(),
        "machine": machine_info(),
        "torch_version": torch.__version__,
        "started_at": utc_now_iso(),
        "loadavg_start": loadavg_start,
        "edit_cost": edit_cost(lm, methods, sizes, args.reps),
    }
    if args.train_turns:
        out["training"] = training_time(lm, args.train_turns)
    out["loadavg_end"] = list(os.getloadavg())
    out["finished_at"] = utc_now_iso()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=json_default) + "\n")
    print(f"{'batch':>5} {'method':<22} {'p50 s':>8} {'p95 s':>8} {'x fwd+bwd':>9}")
    for size, rows in out["edit_cost"].items():
        if size == "refused_calls":
            continue
        for name, row in rows.items():
            print(
                f"{size:>5} {name:<22} {row['p50_seconds']:>8.3f} {row['p95_seconds']:>8.3f} "
                f"{row['ratio_to_fwd_bwd']:>9.2f}"
            )
    if "training" in out:
        t = out["training"]
        print(
            f"training s/turn: l2 {t['l2']['per_turn']:.1f}, kl {t['kl']['per_turn']:.1f}, "
            f"kl/l2 {t['kl_over_l2']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

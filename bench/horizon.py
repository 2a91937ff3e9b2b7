"""Long-horizon sequential editing: does an editor collapse over thousands of edits?

Every method edits the same CounterFact stream (``counterfact_mend_edit``, up to 10,000 cases) in
batches, from the same base weights. Every ``--checkpoint`` edits it measures retention (the
share of a fixed sample of earlier edits, every ``--sample-every``-th edit made so far, whose
greedy answer the judge of ``editing.checks`` still accepts) and locality (``neighbourhood_kept``:
the share of neighbourhood prompts of the sample's first 100 requests whose greedy answer is
still the unedited model's). A full evaluation of 10,000 edits per checkpoint would
cost hours on this CPU; the sample is fixed before the run, so every method and checkpoint is
measured on the same edits. The JSON is rewritten after every checkpoint, so a run cut short still
reports what it reached.

    python bench/horizon.py --methods emsedit,emsedit+safeguards --edits 10000 --threads 1

A method ``nse:consolidate_every=500`` re-solves every edit so far jointly from the base weights
every 500 edits (``Editor.consolidate``), the daemon's consolidation on a schedule.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from editing.bench import (
    git_revision,
    json_default,
    machine_info,
    percentile,
    seed_everything,
    split_consolidation,
    utc_now_iso,
)
from editing.datasets import load_dataset
from editing.editors.base import EditError
from editing.evaluation import EvalConfig, Evaluator, ModelState, mean
from editing.models import load_model
from editing.registry import get_editor

log = logging.getLogger("bench.horizon")
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="emsedit,emsedit+safeguards")
    parser.add_argument("--edits", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--checkpoint", type=int, default=1000)
    parser.add_argument("--sample-every", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "horizon-counterfact.json")
    parser.add_argument(
        "--plot-only", type=Path, default=None, help="redraw the PNG of an existing JSON"
    )
    args = parser.parse_args(argv)
    if args.plot_only is not None:
        print(plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png")))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.checkpoint % args.batch:
        parser.error("--checkpoint must be a multiple of --batch")

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    seed_everything(0)
    lm = load_model("smollm2")
    requests = load_dataset("counterfact", "eval", limit=args.edits)
    sample_idx = list(range(0, len(requests), args.sample_every))
    sample = [requests[i] for i in sample_idx]
    evaluator = Evaluator(lm, sample, EvalConfig())
    evaluator.prepare_base()
    base = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    methods = [m for m in args.methods.split(",") if m]
    out: dict[str, Any] = {
        "command": " ".join(["python", "bench/horizon.py", *(argv or sys.argv[1:])]),
        "dataset": "counterfact",
        "split": "eval",
        "n_edits": len(requests),
        "batch_size": args.batch,
        "checkpoint": args.checkpoint,
        "retention_sample": {"every": args.sample_every, "size": len(sample)},
        "git_rev": git_revision(),
        "machine": machine_info(),
        "torch_version": torch.__version__,
        "started_at": utc_now_iso(),
        "loadavg_start": list(os.getloadavg()),
        "base_locality_probes": evaluator.config.curve_locality_requests,
        "methods": {},
    }
    for name in methods:
        with torch.no_grad():
            for key, value in lm.model.state_dict().items():
                value.copy_(base[key])
        seed_everything(0)
        spec, every = split_consolidation(name)
        editor = get_editor(spec)
        if every and not editor.supports_consolidation:
            raise SystemExit(f"{name}: {editor.name} has no joint solve to consolidate with")
        out["methods"][name] = run_method(
            name, editor, lm, requests, sample_idx, evaluator, args, out, base, every
        )
    out["finished_at"] = utc_now_iso()
    out["loadavg_end"] = list(os.getloadavg())
    write(out, args.out)
    plot(out, args.out.with_suffix(".png"))
    print_table(out)
    return 0


def run_method(
    name, editor, lm, requests, sample_idx, evaluator, args, out, base, every
) -> dict[str, Any]:
    """Edit the stream with one method, measuring at every checkpoint (JSON after each); with
    ``every`` > 0, every that many edits the edited weights go back to ``base`` and all edits so
    far are re-solved jointly (``Editor.consolidate``), as the daemon's consolidation does."""
    touched: set[str] = set()
    applied: list[Any] = []
    consolidations: list[dict[str, float]] = []
    seconds: list[float] = []
    refused = 0
    curve: list[dict[str, Any]] = []
    report: dict[str, Any] = {"curve": curve, "consolidate_every": every or None}
    out["methods"][name] = report
    started = time.perf_counter()
    for start in tqdm(range(0, len(requests), args.batch), desc=name):
        batch = requests[start : start + args.batch]
        try:
            result = editor.apply(lm, batch)
        except EditError as exc:
            refused += len(batch)
            log.info("refused %s: %s", start, exc)
        else:
            applied += batch
            touched |= set(result.deltas)
            seconds.append(result.seconds)
            del result
        done = start + len(batch)
        if every and done % every == 0 and applied:
            t0 = time.perf_counter()
            with torch.no_grad():
                params = dict(lm.model.named_parameters())
                for key in touched:
                    params[key].copy_(base[key])
            touched |= set(editor.consolidate(lm, applied).deltas)
            consolidations.append({"held": len(applied), "seconds": time.perf_counter() - t0})
            report["consolidations"] = consolidations
        if done % args.checkpoint and done != len(requests):
            continue
        state = ModelState.from_touched(lm.adapter, touched)
        held = [evaluator.requests[i] for i, idx in enumerate(sample_idx) if idx < done]
        t0 = time.perf_counter()
        retention = mean(evaluator.retained(held, state))
        locality = evaluator.curve_locality(state)
        curve.append(
            {
                "n_edits": done,
                "retention": retention,
                "retention_sample": len(held),
                "locality": locality,
                "refused": refused,
                "eval_seconds": time.perf_counter() - t0,
                "wall_seconds": time.perf_counter() - started,
            }
        )
        log.info(
            "%s %d edits: retention %.3f locality %.3f refused %d",
            name,
            done,
            retention or 0,
            locality or 0,
            refused,
        )
        report.update(
            {
                "edit_seconds_p50": percentile(seconds, 50),
                "edit_seconds_p95": percentile(seconds, 95),
                "edit_seconds_total": sum(seconds),
                "refused_edits": refused,
            }
        )
        write(out, args.out)
    return report


def write(out: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=json_default) + "\n")


def plot(out: dict[str, Any], path: Path) -> Path:
    """Retention, locality and the share of edits refused, per method, against edits made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, report in out["methods"].items():
        xs = [p["n_edits"] for p in report["curve"]]
        axes[0].plot(xs, [p["retention"] for p in report["curve"]], marker="o", label=name)
        axes[1].plot(xs, [p["locality"] for p in report["curve"]], marker="o", label=name)
        axes[2].plot(xs, [p["refused"] / p["n_edits"] for p in report["curve"]], marker="o")
    titles = (
        "retention (sampled earlier edits)",
        "locality (unchanged probe tokens)",
        "share of edits refused",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("edits applied")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend()
    load = out["loadavg_start"][0], out.get("loadavg_end", out["loadavg_start"])[0]
    fig.suptitle(
        f"SmolLM2 · CounterFact · {out['n_edits']} sequential edits, batch {out['batch_size']} · "
        f"git {str(out['git_rev'])[:12]} · load avg {load[0]:.1f}→{load[1]:.1f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(out: dict[str, Any]) -> None:
    print(f"{'method':<24} {'edits':>6} {'retention':>9} {'locality':>8} {'refused':>7}")
    for name, report in out["methods"].items():
        for point in report["curve"]:
            print(
                f"{name:<24} {point['n_edits']:>6} {100 * (point['retention'] or 0):>9.1f} "
                f"{100 * (point['locality'] or 0):>8.1f} {point['refused']:>7}"
            )


if __name__ == "__main__":
    sys.exit(main())

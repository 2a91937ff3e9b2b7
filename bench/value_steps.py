"""How many steps does NSE's target value need? Adam against normalised-gradient steps.

For the first ``--requests`` CounterFact val requests, the value z at NSE's z layer is optimised
on the base weights with each variant (``editing.nse.keys.compute_targets``, all requests in one
batch) and the final target NLL, the steps taken and ||δ|| / ||h|| are recorded, with the wall
time of each variant measured in the same process.

    python bench/value_steps.py --threads 1

Writes ``bench/results/value-steps.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from editing.bench import RunRecord, seed_everything
from editing.datasets import load_dataset
from editing.models import load_model
from editing.nse import PRESETS
from editing.nse.keys import compute_targets

RESULTS = Path(__file__).resolve().parent / "results" / "value-steps.json"
VARIANTS = {
    "adam (preset: 25 steps, early stop)": {},
    "normalised 3 x 0.25": {"v_optimiser": "normalised", "v_num_grad_steps": 4, "v_step": 0.25},
    "normalised 4 x 0.15": {"v_optimiser": "normalised", "v_num_grad_steps": 5, "v_step": 0.15},
    "normalised 6 x 0.12": {"v_optimiser": "normalised", "v_num_grad_steps": 7, "v_step": 0.12},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(0)
    record = RunRecord.start("bench/value_steps.py", argv)
    lm = load_model("smollm2")
    requests = load_dataset("counterfact", "val", limit=args.requests)
    rows = []
    for name, changes in VARIANTS.items():
        config = PRESETS["smollm2"].replace(**changes)
        started = time.perf_counter()
        values = compute_targets(lm, requests, config.z_layer, config)
        seconds = time.perf_counter() - started
        rows.append(
            {
                "variant": name,
                "changes": changes,
                "seconds": seconds,
                "steps": [v.steps for v in values],
                "nll": [v.nll for v in values],
                "delta_over_h": [float((v.z - v.h_init).norm() / v.h_init.norm()) for v in values],
            }
        )
        nll = rows[-1]["nll"]
        print(
            f"{name:<36} {seconds:6.1f} s  nll max {max(nll):.2f}, "
            f"{sum(x > 0.5 for x in nll)} of {len(nll)} above 0.5",
            flush=True,
        )
    out = {
        "dataset": "counterfact val",
        "n_requests": len(requests),
        "rows": rows,
    }
    record.write(RESULTS, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How many steps does NSE's target value need? Adam against normalised and learned steps.

For the first ``--requests`` CounterFact val requests, the value z at NSE's z layer is optimised
on the base weights with each variant (``editing.nse.keys.compute_targets``, all requests in one
batch) and the final target NLL, the steps taken and ||δ|| / ||h|| are recorded, with the wall
time of each variant measured in the same process. With ``--value-net FILE`` the trained value
network's variants (``v_optimiser: net``: its steps, then Adam while the loss is above the early
stop) run too, beside Adam with the same early stops.

    python bench/value_steps.py --threads 1
    python bench/value_steps.py --value-net editors/smollm2/nse-value-net.safetensors --requests 40

Writes ``bench/results/value-steps.json``.
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
from editing.datasets import load_dataset
from editing.models import load_model
from editing.nse import PRESETS
from editing.nse.keys import compute_targets
from editing.nse.value_net import ValueNet

RESULTS = Path(__file__).resolve().parent / "results" / "value-steps.json"
VARIANTS = {
    "adam (preset: 25 steps, early stop)": {},
    "normalised 3 x 0.25": {"v_optimiser": "normalised", "v_num_grad_steps": 4, "v_step": 0.25},
    "normalised 4 x 0.15": {"v_optimiser": "normalised", "v_num_grad_steps": 5, "v_step": 0.15},
    "normalised 6 x 0.12": {"v_optimiser": "normalised", "v_num_grad_steps": 7, "v_step": 0.12},
}
NET_VARIANTS = {
    "net, then adam (early stop 0.05)": {"v_optimiser": "net"},
    "net, then adam (early stop 0.5)": {"v_optimiser": "net", "early_stop_loss": 0.5},
    "adam (early stop 0.5)": {"early_stop_loss": 0.5},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--value-net", default=None, help="a trained value network's file")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(0)
    record = RunRecord.start("bench/value_steps.py", argv)
    lm = load_model("smollm2")
    requests = load_dataset("counterfact", "val", limit=args.requests)
    net = ValueNet.load(args.value_net) if args.value_net else None
    variants = {**VARIANTS, **(NET_VARIANTS if net is not None else {})}
    rows = []
    for name, changes in variants.items():
        config = PRESETS["smollm2"].replace(**changes)
        started = time.perf_counter()
        values = compute_targets(lm, requests, config.z_layer, config, net)
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
            f"{sum(x > 0.5 for x in nll)} of {len(nll)} above 0.5, "
            f"steps {sum(rows[-1]['steps']) / len(nll):.1f} on average",
            flush=True,
        )
    out = {
        "dataset": "counterfact val",
        "n_requests": len(requests),
        "value_net": None if net is None else {"file": args.value_net, "sha256": net.sha256()},
        "rows": rows,
    }
    record.write(Path(args.out), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

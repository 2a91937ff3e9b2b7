"""Which inputs does an edit at a given site move? Key overlap per candidate edit site.

A rank-n update written from an edit's keys moves every input whose key points the same way, so
the overlap between an edit's key and the keys of other prompts predicts its reach. For each
candidate site (an MLP matrix role, its layers, and the token whose key is written) and each
CounterFact val request, the key is that matrix's input at the site's token of the edit prompt;
compared by cosine with:

- ``unrelated``: the keys of the other requests of the sample (other subjects and relations);
- ``neighbourhood``: the request's neighbourhood prompt (same relation and true object, another
  subject: what the edit must not move);
- ``generation``: the request's generation prompt (same subject, another wording: what it
  should move; MEND CounterFact has no true paraphrases in val).

For the two prompts of each request, the overlap is the largest cosine over all their token
positions (an edit moves a prompt if any position responds). Raw cosines: what EMSEdit's ridge
solve sees. ``C0-whitened`` cosines, in the metric of the generic-key second moment, are what a
C0-regularised solve (NSE, MEMIT) sees (one corpus pass computes any statistic not cached).

    python bench/key_overlap.py --requests 100 --threads 2

Writes ``bench/results/key-overlap.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

# The checkout this script sits in, not whichever one the environment installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editing.adapters import MlpRole
from editing.bench import RunRecord, seed_everything
from editing.datasets import load_dataset
from editing.hooks import capture_inputs
from editing.keystats import KeyStatistics
from editing.models import LoadedModel, load_model
from editing.paths import Paths
from editing.requests import EditRequest
from editing.subject import encode_prompt

RESULTS = Path(__file__).resolve().parent / "results" / "key-overlap.json"


@dataclass(frozen=True)
class Site:
    name: str
    role: MlpRole
    layers: tuple[int, ...]
    token: str  # "last": the prompt's last token; "subject": the subject's last token


SITES = (
    Site("up L20-25, last token (EMSEdit today)", MlpRole.UP, (20, 21, 22, 23, 24, 25), "last"),
    Site("down L20-25, last token", MlpRole.DOWN, (20, 21, 22, 23, 24, 25), "last"),
    Site("up L3-7, subject token", MlpRole.UP, (3, 4, 5, 6, 7), "subject"),
    Site("down L3-7, subject token (NSE, MEMIT)", MlpRole.DOWN, (3, 4, 5, 6, 7), "subject"),
    Site("down L8-12, subject token", MlpRole.DOWN, (8, 9, 10, 11, 12), "subject"),
    Site("down L3-7, last token", MlpRole.DOWN, (3, 4, 5, 6, 7), "last"),
)


@torch.no_grad()
def token_keys(lm: LoadedModel, text: str, roles_layers: set[tuple[MlpRole, int]]) -> dict:
    """Every position's input of each (role, layer) matrix for ``text``: {(role, layer): (T, d)}."""
    modules = {
        f"{r.value}.{layer}": lm.adapter.module(lm.model, r, layer) for r, layer in roles_layers
    }
    enc = lm.tokenizer(text, return_tensors="pt").to(lm.device)
    with capture_inputs(modules) as inputs:
        lm.model(**enc)
    return {(r, layer): inputs[f"{r.value}.{layer}"][0].float() for r, layer in roles_layers}


def subject_index(lm: LoadedModel, request: EditRequest) -> int:
    return encode_prompt(lm, "{}", request.prompt, request.subject).subject_index


def whiteners(lm: LoadedModel, targets: set[tuple[MlpRole, int]]) -> dict:
    """C0^{-1/2} per (role, layer), from the key statistics (one corpus pass for the missing)."""
    stats = KeyStatistics(Paths.from_env())
    out = {}
    for target, moments in stats.prepare(
        lm, sorted(targets, key=lambda t: (t[1], t[0].value))
    ).items():
        c0 = moments.c0.double()
        jitter = 1e-6 * c0.diagonal().mean() * torch.eye(c0.shape[0], dtype=c0.dtype)
        vals, vecs = torch.linalg.eigh(c0 + jitter)
        out[target] = (vecs * vals.rsqrt()) @ vecs.T
    return out


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of each row of a (n, d) with each row of b (m, d): (n, m)."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return a @ b.T


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(0)
    record = RunRecord.start("bench/key_overlap.py", argv)
    lm = load_model("smollm2")
    requests = [
        r
        for r in load_dataset("counterfact", "val", limit=args.requests)
        if r.locality and r.extra.get("generation_prompts")
    ]
    needed = {(s.role, layer) for s in SITES for layer in s.layers}
    edit_keys, neighbour_keys, generation_keys = [], [], []
    for r in tqdm(requests, desc="keys"):
        keys = token_keys(lm, r.prompt, needed)
        subject = subject_index(lm, r)
        edit_keys.append({k: (v[-1], v[subject]) for k, v in keys.items()})
        neighbour_keys.append(token_keys(lm, r.locality[0].prompt, needed))
        generation_keys.append(token_keys(lm, str(r.extra["generation_prompts"][0]), needed))

    whitening = whiteners(lm, needed)
    report = []
    for site in SITES:
        pick = 0 if site.token == "last" else 1
        row: dict[str, object] = {"site": site.name, "role": site.role.value}
        row["layers"], row["token"] = list(site.layers), site.token
        for metric in ("raw", "c0_whitened"):
            per_layer = []
            for layer in site.layers:
                transform = whitening[(site.role, layer)] if metric == "c0_whitened" else None

                def view(x: torch.Tensor, t: torch.Tensor | None = transform) -> torch.Tensor:
                    return x.double() if t is None else x.double() @ t

                key = (site.role, layer)
                mine = torch.stack([view(e[key][pick]) for e in edit_keys])  # (n, d)
                pairwise = cosines(mine, mine)
                off = pairwise[~torch.eye(len(mine), dtype=torch.bool)]
                neighbour = [
                    float(cosines(mine[i : i + 1], view(neighbour_keys[i][key])).max())
                    for i in range(len(mine))
                ]
                generation = [
                    float(cosines(mine[i : i + 1], view(generation_keys[i][key])).max())
                    for i in range(len(mine))
                ]
                per_layer.append(
                    {
                        "layer": layer,
                        "unrelated_mean": float(off.mean()),
                        "unrelated_p95": float(off.quantile(0.95)),
                        "neighbourhood_max_mean": statistics.mean(neighbour),
                        "generation_max_mean": statistics.mean(generation),
                    }
                )
            row[metric] = {
                "per_layer": per_layer,
                **{
                    k: statistics.mean(float(p[k]) for p in per_layer)  # type: ignore[arg-type]
                    for k in (
                        "unrelated_mean",
                        "unrelated_p95",
                        "neighbourhood_max_mean",
                        "generation_max_mean",
                    )
                },
            }
        report.append(row)

    out = {
        "dataset": "counterfact val",
        "n_requests": len(requests),
        "sites": report,
    }
    record.write(RESULTS, out)
    print(f"{'site':<42} {'metric':<12} {'unrel':>6} {'p95':>6} {'neigh':>6} {'gen':>6}")
    for row in report:
        for metric in ("raw", "c0_whitened"):
            if metric in row:
                m = row[metric]  # type: ignore[index]
                print(
                    f"{row['site']:<42} {metric:<12} {m['unrelated_mean']:6.2f} "
                    f"{m['unrelated_p95']:6.2f} {m['neighbourhood_max_mean']:6.2f} "
                    f"{m['generation_max_mean']:6.2f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

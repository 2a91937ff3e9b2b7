"""Can a stored key tell an edited subject apart from everything else? (the fact memory's gate)

For the first N CounterFact validation edits and the last N of ZsRE's train sample (ZsRE has no
validation split here; the value network trained on its first 300), a key is read at the
subject's last token of the edit prompt (plain, or averaged over NSE's prefix templates), at
several layers and from two places: the block's output (the residual stream) and the
down-projection's input (the MLP's key). Every token position of other texts is then compared
with every stored key:

* positives: the subject's last token in the edit prompt itself, in the request's real
  paraphrases (ZsRE's rephrased question; CounterFact has them only for cases in the ROME
  sample) and in the prompt under two context templates that the key never saw;
* negatives: every position of wiki text (the key-statistics corpus), of the neighbourhood prompts
  (other subjects, same relation) and of the other requests' prompts.

It prints, per site and similarity (``MODES``), the share of positives whose own key scores at
least τ and is the best match, against the share of negative positions with any key at or above
τ, and writes JSON. Validation splits only: the threshold is chosen here, never on the streams
the Results table reports.

    python bench/memory_gate.py --edits 100 --threads 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editing.adapters import MlpRole  # noqa: E402
from editing.datasets import load_dataset  # noqa: E402
from editing.hooks import capture_inputs, capture_outputs, run_until  # noqa: E402
from editing.keystats import DEFAULT_CORPUS  # noqa: E402
from editing.memory.editor import corpus_centres  # noqa: E402
from editing.memory.module import EARLY_POSITIONS  # noqa: E402
from editing.models import load_model  # noqa: E402
from editing.nse.config import DEFAULT_PREFIXES  # noqa: E402
from editing.subject import encode_prompt  # noqa: E402

SOURCES = ("prompt", "rephrase", "template")
UNSEEN_TEMPLATES = ("Q: {}", "Here is a fact that many people know. {}")
MODES = ("raw", "centred", "position")
"""Cosine of the activations as they are, less the corpus mean, less the mean at their position
(the first ``EARLY_POSITIONS`` apart: what ``editing.memory`` does; MLP keys only)."""
THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def features(lm, ids_rows, layers):
    """Per site name -> list of (T, d) float tensors, one per row."""
    blocks = lm.adapter.layers(lm.model)
    downs = {str(layer): lm.adapter.module(lm.model, MlpRole.DOWN, layer) for layer in layers}
    outs = {str(layer): blocks[layer] for layer in layers}
    result: dict[str, list[torch.Tensor]] = {}
    for ids in ids_rows:
        with capture_inputs(downs) as mlp, capture_outputs(outs) as res:
            run_until(lm.model, blocks[max(layers)], input_ids=torch.tensor([ids]))
        for layer in layers:
            result.setdefault(f"mlp{layer}", []).append(mlp[str(layer)][0].float())
            result.setdefault(f"res{layer}", []).append(res[str(layer)][0].float())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=100, help="per dataset")
    parser.add_argument("--layers", default="4,7,10")
    parser.add_argument("--wiki-chunks", type=int, default=40, help="of 128 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory-gate.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    layers = [int(x) for x in args.layers.split(",")]
    lm = load_model("smollm2")
    requests = (
        load_dataset("counterfact", split="val", limit=args.edits)
        + load_dataset("zsre", split="train")[-args.edits :]
    )

    # Keys: plain prompt and template average (NSE's ½ plain + ½ mean over prefixes).
    key_rows, key_index = [], []
    for r in requests:
        for t in ("{}", *DEFAULT_PREFIXES):
            e = encode_prompt(lm, t, r.prompt, r.subject)
            key_rows.append(e.ids)
            key_index.append(e.subject_index)
    with torch.inference_mode():
        kf = features(lm, key_rows, layers)
    per = 1 + len(DEFAULT_PREFIXES)
    key_at = torch.tensor(key_index).view(len(requests), per)
    # Positives: (request index, ids, subject index).
    positives = []
    for n, r in enumerate(requests):
        e = encode_prompt(lm, "{}", r.prompt, r.subject)
        positives.append((n, "prompt", e.ids, e.subject_index))
        for text in r.rephrases:
            if r.subject in text:
                e = encode_prompt(lm, "{}", text, r.subject)
                positives.append((n, "rephrase", e.ids, e.subject_index))
        for t in UNSEEN_TEMPLATES:
            e = encode_prompt(lm, t, r.prompt, r.subject)
            positives.append((n, "template", e.ids, e.subject_index))
    # Negatives: whole texts.
    wiki = DEFAULT_CORPUS.read_text(encoding="utf-8")
    wiki_ids = lm.tokenizer(wiki[:400_000], add_special_tokens=False).input_ids
    half = len(wiki_ids) // 2
    mean_ids = [wiki_ids[i : i + 128] for i in range(0, 40 * 128, 128)]
    neg_wiki = [wiki_ids[half + i : half + i + 128] for i in range(0, args.wiki_chunks * 128, 128)]
    neg_neigh = []
    for r in requests:
        for p in r.locality:
            if p.kind == "neighbourhood" and r.subject not in p.prompt:
                neg_neigh.append(lm.tokenizer(p.prompt).input_ids)
    neg_other = [lm.tokenizer(r.prompt).input_ids for r in requests]  # own subject masked below
    with torch.inference_mode():
        mean_f = features(lm, mean_ids, layers)
        pos_f = features(lm, [p[2] for p in positives], layers)
        negs = {
            "wiki": features(lm, neg_wiki, layers),
            "neighbourhood": features(lm, neg_neigh, layers),
            "other_prompts": features(lm, neg_other, layers),
        }
    report = {}
    for site in sorted(kf):
        layer, is_mlp = int(site[3:]), site.startswith("mlp")
        mu = torch.cat(mean_f[site]).mean(0)
        centres = corpus_centres(lm, layer) if is_mlp else None
        for mode, kind in itertools.product(MODES, ("plain", "avg")):
            if mode == "position" and not is_mlp:
                continue

            def unit(x, positions, mode=mode, mu=mu, centres=centres):
                if mode == "centred":
                    x = x - mu
                elif mode == "position":
                    x = x - centres[positions.clamp(max=EARLY_POSITIONS)]
                return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)

            at = torch.stack([row[i] for row, i in zip(kf[site], key_index, strict=True)])
            units = unit(at.view(len(requests), per, -1), key_at)  # (n, 1 + P, d)
            k = units[:, 0] if kind == "plain" else 0.5 * units[:, 0] + 0.5 * units[:, 1:].mean(1)
            ku = k / k.norm(dim=-1, keepdim=True)  # (n, d)
            own, best_is_own, by_source = [], [], {}
            for (n, source, _ids, idx), feats in zip(positives, pos_f[site], strict=True):
                s = unit(feats[idx], torch.tensor(idx)) @ ku.T  # (n,)
                own.append(float(s[n]))
                best_is_own.append(int(s.argmax()) == n)
                by_source.setdefault(source, []).append(len(own) - 1)
            own_t = torch.tensor(own)
            best_t = torch.tensor(best_is_own)
            neg_max = {}
            for name, group in negs.items():
                maxes = []
                for j, feats in enumerate(group[site]):
                    s = unit(feats, torch.arange(feats.shape[0])) @ ku.T  # (T, n)
                    if name == "other_prompts":
                        s[:, j] = -1.0  # a request's own prompt is not a negative for its key
                    maxes.append(s.max(dim=1).values)
                neg_max[name] = torch.cat(maxes)
            rows = []
            for tau in THRESHOLDS:
                row = {"tau": tau}
                for source, idx in by_source.items():
                    sel = torch.tensor(idx)
                    row[f"recall_{source}"] = round(
                        float(((own_t[sel] >= tau) & best_t[sel]).float().mean()), 4
                    )
                for name, m in neg_max.items():
                    row[f"fires_{name}"] = round(float((m >= tau).float().mean()), 5)
                rows.append(row)
            report[f"{site}/{kind}/{mode}"] = rows
    for name, rows in report.items():
        print(name)
        for row in rows:
            print("   ", "  ".join(f"{k}={v}" for k, v in row.items()))
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    out = {
        "command": "python " + " ".join(sys.argv),
        "git": git,
        "machine": platform.platform(),
        "load_average": os.getloadavg(),
        "seconds": round(time.time() - started, 1),
        "positives": {s: sum(1 for p in positives if p[1] == s) for s in SOURCES},
        "negative_positions": {
            name: int(sum(x.shape[0] for x in g[f"mlp{layers[0]}"])) for name, g in negs.items()
        },
        "report": report,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

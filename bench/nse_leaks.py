"""Which unrelated answers one batch of edits changes, and through which token of their prompt.

Applies one batch of CounterFact **val** edits with each method spec given, then compares the
greedy answers of the bundled unrelated probes and of the batch's neighbourhood prompts with the
base model's, on their first 1, 2, 3 and 6 tokens (the yardstick's ``unrelated_kept`` uses the
answer's tokens + 2). For every probe whose first token changed it finds the prompt position
whose edited MLP outputs alone move the next-token distribution most (the edit's deltas added at
that one position, KL against the base): a shared last subject token (" Glacier") shows up here.

    python bench/nse_leaks.py --methods nse,nse:clamp_norm_factor=0.3 --edits 20 --threads 2

Writes ``bench/results/nse-leaks.json``. Run it alone; each NSE batch of 20 takes minutes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

# The checkout this script sits in, not whichever one the environment installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editing.bench import RunRecord, seed_everything
from editing.checks import answer_matches
from editing.datasets import load_dataset
from editing.generation import greedy_token_ids
from editing.models import LoadedModel, load_model
from editing.registry import get_editor
from monitoring.probes.load import load_probe_set

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS = (1, 2, 3, 6)


@contextmanager
def deltas_at(lm: LoadedModel, deltas: Mapping[str, torch.Tensor], position: int) -> Iterator[None]:
    """The edited matrices' extra output added at one prompt position only."""
    params = dict(lm.model.named_parameters())
    hooks = []
    for name, delta in deltas.items():
        module = lm.model.get_submodule(name.rsplit(".", 1)[0])
        weight = params[name]
        out_in = delta if delta.shape == weight.shape else delta.T

        def hook(mod: Any, args: tuple[Any, ...], out: torch.Tensor, d: Any = out_in) -> Any:
            extra = args[0][:, position : position + 1] @ d.T.to(out.dtype)  # (B, 1, d_out)
            out = out.clone()
            out[:, position : position + 1] += extra
            return out

        hooks.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def next_token_logprobs(lm: LoadedModel, prompt: str) -> torch.Tensor:
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    return torch.log_softmax(lm.model(ids).logits[0, -1].float(), dim=-1)


def carrier(lm: LoadedModel, deltas: Mapping[str, torch.Tensor], prompt: str) -> dict[str, Any]:
    """The prompt position whose edited outputs alone move the next token most (base weights)."""
    base = next_token_logprobs(lm, prompt)
    ids = lm.tokenizer(prompt).input_ids
    best: dict[str, Any] = {"kl": -1.0}
    for t in range(len(ids)):
        with deltas_at(lm, deltas, t):
            moved = next_token_logprobs(lm, prompt)
        kl = float((base.exp() * (base - moved)).sum())
        if kl > best["kl"]:
            best = {"position": t, "token": lm.tokenizer.decode(ids[t]), "kl": kl}
    best["is_last"] = best["position"] == len(ids) - 1
    return best


def kept_share(base: list[list[int]], new: list[list[int]], k: int) -> float:
    return sum(a[:k] == b[:k] for a, b in zip(base, new, strict=True)) / max(1, len(base))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="nse,nse:clamp_norm_factor=0.3")
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "nse-leaks.json")
    args = parser.parse_args(argv)

    record = RunRecord.start("bench/nse_leaks.py", argv)
    torch.set_num_threads(args.threads)
    seed_everything(0)
    lm = load_model("smollm2")
    requests = load_dataset("counterfact", "val", limit=args.edits)
    probes = [p.prompt for p in load_probe_set(None)]
    neighbours = [p.prompt for r in requests for p in r.locality]
    prompts = probes + neighbours
    n_probes = len(probes)
    base = greedy_token_ids(lm.model, lm.tokenizer, prompts, max(TOKENS), 32)

    runs: dict[str, Any] = {}
    for spec in tqdm(args.methods.split(","), desc="methods"):
        editor = get_editor(spec)
        started = time.perf_counter()
        result = editor.apply(lm, requests)
        seconds = time.perf_counter() - started
        new = greedy_token_ids(lm.model, lm.tokenizer, prompts, max(TOKENS), 32)
        answers = greedy_token_ids(lm.model, lm.tokenizer, [r.prompt for r in requests], 4, 32)
        took = [
            answer_matches(lm.tokenizer.decode(a), r.target_new)
            for a, r in zip(answers, requests, strict=True)
        ]
        editor.undo(lm, result)
        changed = [i for i in range(n_probes) if base[i][:1] != new[i][:1]]
        examples = []
        for i in changed:
            examples.append(
                {
                    "prompt": prompts[i],
                    "base": lm.tokenizer.decode(base[i]),
                    "edited": lm.tokenizer.decode(new[i]),
                    "carrier": carrier(lm, result.deltas, prompts[i]),
                }
            )
        runs[spec] = {
            "efficacy_greedy": sum(took) / len(took),
            "probes_kept_first_tokens": {
                k: kept_share(base[:n_probes], new[:n_probes], k) for k in TOKENS
            },
            "neighbours_kept_first_tokens": {
                k: kept_share(base[n_probes:], new[n_probes:], k) for k in TOKENS
            },
            "edit_seconds": seconds,
            "delta_norms": result.delta_norms(),
            "changed_probes": examples,
        }
        kept = runs[spec]["probes_kept_first_tokens"]
        print(
            f"{spec}: efficacy {runs[spec]['efficacy_greedy']:.2f}, probes kept "
            + ", ".join(f"{k} tok {v:.3f}" for k, v in kept.items())
            + ", neighbours kept "
            + ", ".join(
                f"{k} tok {v:.3f}" for k, v in runs[spec]["neighbours_kept_first_tokens"].items()
            )
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record.write(
        args.out,
        {
            "dataset": "counterfact",
            "split": "val",
            "n_edits": len(requests),
            "n_probes": n_probes,
            "n_neighbours": len(neighbours),
            "threads": args.threads,
            "runs": runs,
            "torch_version": torch.__version__,
        },
    )
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

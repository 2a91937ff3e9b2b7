"""Which texts fire a fact memory's rows, with and without the lead key? (keys only, no values)

For a stream of requests it reads each row's keys and thresholds exactly as ``MemoryEditor``
does, then runs texts that should not fire any row, and texts that should fire their own row,
through the key layer:

* wiki: the benchmark's perplexity sample (WikiText-2 test), every position;
* probes: the daemon's bundled unrelated-knowledge probe set, each prompt;
* own: each request's edit prompt, at its subject (efficacy needs it to fire);
* rephrase: each request's first real paraphrase, anywhere (paraphrases need it to fire).

It reports the counts for the rows keyed on the subject's last token alone (lead threshold 0)
and for each lead threshold given, lists the probes that fire, and writes JSON. Choose the
threshold on ZsRE train or CounterFact val; running it on an eval stream diagnoses, never tunes.

    python bench/memory_collisions.py --dataset zsre --split train --skip 300 --edits 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editing.bench import WIKITEXT_TEST, git_revision, machine_info  # noqa: E402
from editing.datasets import default_data_dir, load_dataset  # noqa: E402
from editing.memory.editor import MemoryEditor, RowKeys, _activations, _keys  # noqa: E402
from editing.memory.module import FactMemory  # noqa: E402
from editing.models import load_model  # noqa: E402
from editing.perplexity import read_text_file  # noqa: E402
from editing.subject import encode_prompt  # noqa: E402
from monitoring.probes.load import bundled_probe_path, load_probe_set  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="zsre")
    parser.add_argument("--split", default="train")
    parser.add_argument("--skip", type=int, default=300, help="requests skipped at the start")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--lead-thresholds", default="0.5,0.85", help="besides 0 (no lead)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory-collisions.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()

    lm = load_model("smollm2")
    requests = load_dataset(args.dataset, args.split)[args.skip : args.skip + args.edits]
    editor = MemoryEditor()
    memory = editor.prepare_model(lm)
    centres = editor.centres(lm)
    keys = _keys(lm, requests, memory, centres, editor.value_config(lm).prefixes)
    gate, _ = editor._thresholds((keys.plain * keys.stored).sum(dim=1))
    lead_own = (keys.lead_plain * keys.lead_stored).sum(dim=1)
    settings = [0.0] + [float(x) for x in args.lead_thresholds.split(",") if x]
    memories = {t: _memory(keys, gate, centres, lead_own, t) for t in settings}

    def fired(ids: list[int]) -> dict[float, torch.Tensor]:
        acts = _activations(lm, memory.key_layer, [ids])
        positions = torch.arange(len(ids))[None]
        return {t: m.fired(acts, positions)[0] for t, m in memories.items()}  # (T, n)

    counts = {t: {"wiki": 0, "probes": 0, "own": 0, "rephrase": 0} for t in settings}
    fired_probes: dict[float, list[dict[str, str]]] = {t: [] for t in settings}
    lines = read_text_file(default_data_dir() / WIKITEXT_TEST, 8000)
    wiki_positions = 0
    for line in lines:
        ids = lm.tokenizer(line).input_ids
        wiki_positions += len(ids)
        for t, f in fired(ids).items():
            counts[t]["wiki"] += int(f.any(dim=1).sum())
    probes = load_probe_set(bundled_probe_path())
    for probe in probes:
        for t, f in fired(lm.tokenizer(probe.prompt).input_ids).items():
            if bool(f.any()):
                counts[t]["probes"] += 1
                row = int(f.nonzero()[0, 1])
                fired_probes[t].append({"probe": probe.prompt, "row": requests[row].subject})
    rephrased = 0
    for i, request in enumerate(requests):
        own = encode_prompt(lm, "{}", request.prompt, request.subject)
        for t, f in fired(own.ids).items():
            counts[t]["own"] += int(bool(f[own.subject_index, i]))
        if request.rephrases:
            rephrased += 1
            for t, f in fired(lm.tokenizer(request.rephrases[0]).input_ids).items():
                counts[t]["rephrase"] += int(bool(f[:, i].any()))

    print(f"{len(requests)} rows ({int(keys.has_lead.sum())} with a lead); {wiki_positions} wiki")
    print(f"positions, {len(probes)} probes, {len(requests)} own prompts, {rephrased} rephrases")
    for t in settings:
        print(f"lead threshold {t}: {counts[t]}")
    out = {
        "command": "python " + " ".join(sys.argv),
        "git": git_revision(),
        "machine": machine_info(),
        "load_average": os.getloadavg(),
        "seconds": round(time.time() - started, 1),
        "stream": {"dataset": args.dataset, "split": args.split, "skip": args.skip},
        "rows": len(requests),
        "rows_with_lead": int(keys.has_lead.sum()),
        "totals": {
            "wiki_positions": wiki_positions,
            "probes": len(probes),
            "own": len(requests),
            "rephrase": rephrased,
        },
        "fired": {str(t): counts[t] for t in settings},
        "fired_probes": {str(t): fired_probes[t] for t in settings},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


def _memory(
    keys: RowKeys, gate: torch.Tensor, centres: torch.Tensor, lead_own: torch.Tensor, lead: float
) -> FactMemory:
    """The rows as ``MemoryEditor`` would write them with lead threshold ``lead`` (values 0)."""
    stored = keys.stored
    memory = FactMemory(stored.shape[1], 1, stored.shape[0], 0, 0)
    lead_gate = (lead_own - 0.01).clamp(max=lead)
    led = keys.has_lead & (lead_gate > 0)
    with torch.no_grad():
        memory.keys[:] = stored
        memory.thresholds[:] = gate
        memory.centres[:] = centres
        memory.lead_keys[:] = keys.lead_stored
        memory.lead_thresholds[:] = torch.where(led, lead_gate, torch.zeros_like(lead_gate))
        memory.lead_offsets[:] = (keys.lead_offset * led).float()
    return memory


if __name__ == "__main__":
    main()

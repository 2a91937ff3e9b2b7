"""Long-horizon sequential editing: does an editor collapse over thousands of edits?

Every method edits the same CounterFact stream (``counterfact_mend_edit``, up to 10,000 cases) in
batches, from the same base weights. Every ``--checkpoint`` edits it evaluates a fixed sample of
the edits made so far (every ``--sample-every``-th edit) with the yardstick's evaluator: the
share whose greedy answer the judge still accepts (``retention``, refused edits count as not
held), ``paraphrase_exact``, ``neighbourhood_kept`` over their neighbourhood prompts,
``unrelated_kept`` over the bundled audit probes and ``perplexity_drift`` on the WikiText test
sample. A full evaluation of 10,000 edits per checkpoint would cost hours on this CPU; the
sample is fixed before the run, so every method and checkpoint is measured on the same edits.

A 10,000-edit run outlives a session, so it is resumable. At every checkpoint the JSON is
rewritten and each method's edited parameters (and, when it consolidates, its edit material)
are saved as safetensors beside it (``<out>.state/``); ``--resume`` continues every unfinished
method from its last checkpoint, and ``--stop-after N`` ends this session's share at N edits.

    python bench/horizon.py --methods memory:capacity=10240 --edits 10000 --threads 1
    python bench/horizon.py --methods memory:capacity=10240 --edits 10000 --resume

A method ``nse:consolidate_every=500`` re-solves every edit so far jointly from the base weights
every 500 edits (``Editor.consolidate``), the daemon's consolidation on a schedule.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

# The checkout this script sits in, not whichever one the environment installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editing.bench import (
    WIKITEXT_TEST,
    git_revision,
    json_default,
    machine_info,
    percentile,
    seed_everything,
    split_consolidation,
    utc_now_iso,
)
from editing.datasets import default_data_dir, load_dataset
from editing.editors.base import EditError, EditMaterial, Editor
from editing.evaluation import EvalConfig, Evaluator, ModelState
from editing.models import LoadedModel, load_model
from editing.perplexity import read_text_file
from editing.registry import get_editor
from editing.requests import EditRequest, LocalityProbe

log = logging.getLogger("bench.horizon")
RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = ("n_edits", "batch_size", "checkpoint", "sample_every")
"""What a resumed run must share with the run it continues."""
CURVE_KEYS = (
    "paraphrase_exact",
    "neighbourhood_kept",
    "unrelated_kept",
    "perplexity_drift",
)


class HorizonError(RuntimeError):
    """The run cannot start or resume as asked."""


@dataclass
class HorizonConfig:
    methods: list[str]
    edits: int = 10_000
    batch: int = 20
    checkpoint: int = 1000
    sample_every: int = 20
    threads: int = 1
    out: Path = RESULTS / "horizon-counterfact.json"
    resume: bool = False
    stop_after: int | None = None
    """End this session's share once every method reached this many edits (a checkpoint)."""
    data_dir: Path | None = None
    eval_config: EvalConfig = field(default_factory=EvalConfig)
    editor_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    unrelated: tuple[LocalityProbe, ...] = ()
    command: str = ""

    def __post_init__(self) -> None:
        if self.checkpoint % self.batch:
            raise HorizonError("--checkpoint must be a multiple of --batch")
        if self.stop_after is not None and self.stop_after % self.checkpoint:
            raise HorizonError("--stop-after must be a multiple of --checkpoint")

    @property
    def state_dir(self) -> Path:
        return self.out.with_suffix(".state")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="memory:capacity=10240")
    parser.add_argument("--edits", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--checkpoint", type=int, default=1000)
    parser.add_argument("--sample-every", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "horizon-counterfact.json")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--stop-after", type=int, default=None, help="end this session here")
    parser.add_argument(
        "--plot-only", type=Path, default=None, help="redraw the PNG of an existing JSON"
    )
    args = parser.parse_args(argv)
    if args.plot_only is not None:
        print(plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png")))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from monitoring.probes.load import load_probe_set

    probes = load_probe_set(None)
    try:
        config = HorizonConfig(
            methods=[m for m in args.methods.split(",") if m],
            edits=args.edits,
            batch=args.batch,
            checkpoint=args.checkpoint,
            sample_every=args.sample_every,
            threads=args.threads,
            out=args.out,
            resume=args.resume,
            stop_after=args.stop_after,
            unrelated=tuple(LocalityProbe(p.prompt, p.answer, "unrelated") for p in probes),
            command=" ".join(["python", "bench/horizon.py", *(argv or sys.argv[1:])]),
        )
        out = run_horizon(config)
    except HorizonError as exc:
        parser.error(str(exc))
    print_table(out)
    return 0


def run_horizon(cfg: HorizonConfig, lm: LoadedModel | None = None) -> dict[str, Any]:
    """Run (or resume) every method of ``cfg``; the JSON at ``cfg.out`` after each checkpoint."""
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    seed_everything(0)
    lm = lm or load_model("smollm2")
    requests = load_dataset("counterfact", "eval", cfg.data_dir, limit=cfg.edits)
    editors = {name: _editor(cfg, name) for name in cfg.methods}
    for editor in editors.values():
        editor.prepare_model(lm)  # before the base copy: added parameters start at zero
    base = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    sample_idx = list(range(0, len(requests), cfg.sample_every))
    text_path = (cfg.data_dir or default_data_dir()) / WIKITEXT_TEST
    evaluator = Evaluator(
        lm,
        [requests[i] for i in sample_idx],
        cfg.eval_config,
        unrelated=cfg.unrelated,
        text=read_text_file(text_path, cfg.eval_config.perplexity_chars),
    )
    evaluator.prepare_base()
    out = _start_or_resume(cfg, requests, sample_idx)
    session = {"git_rev": git_revision(), "started_at": utc_now_iso()}
    session["loadavg_start"] = list(os.getloadavg())
    out["sessions"].append(session)
    for name, editor in editors.items():
        with torch.no_grad():
            for key, value in lm.model.state_dict().items():
                value.copy_(base[key])
        seed_everything(0)
        _run_method(cfg, name, editor, lm, requests, sample_idx, evaluator, out, base)
    session["finished_at"] = utc_now_iso()
    session["loadavg_end"] = list(os.getloadavg())
    out["finished"] = all(m["progress"]["done"] >= len(requests) for m in out["methods"].values())
    _write(out, cfg.out)
    plot(out, cfg.out.with_suffix(".png"))
    return out


def _editor(cfg: HorizonConfig, name: str) -> Editor:
    spec, every = split_consolidation(name)
    editor = get_editor(spec, **cfg.editor_options.get(name, {}))
    if every and not editor.supports_consolidation:
        raise HorizonError(f"{name}: {editor.name} has no joint solve to consolidate with")
    return editor


def _start_or_resume(
    cfg: HorizonConfig, requests: Sequence[EditRequest], sample_idx: list[int]
) -> dict[str, Any]:
    settings = {
        "n_edits": len(requests),
        "batch_size": cfg.batch,
        "checkpoint": cfg.checkpoint,
        "sample_every": cfg.sample_every,
    }
    if cfg.resume:
        if not cfg.out.is_file():
            raise HorizonError(f"--resume: no run at {cfg.out}")
        out = json.loads(cfg.out.read_text())
        differs = {k: (out.get(k), v) for k, v in settings.items() if out.get(k) != v}
        if differs:
            raise HorizonError(f"--resume: settings differ from the run in {cfg.out}: {differs}")
        out["commands"] = [*out.get("commands", [out.get("command")]), cfg.command]
        return out
    if cfg.out.exists():
        raise HorizonError(f"{cfg.out} exists: --resume continues it, or choose another --out")
    return {
        "command": cfg.command,
        "commands": [cfg.command],
        "dataset": "counterfact",
        "split": "eval",
        **settings,
        "retention_sample": {"every": cfg.sample_every, "size": len(sample_idx)},
        "unrelated_n": len(cfg.unrelated),
        "machine": machine_info(),
        "torch_version": torch.__version__,
        "started_at": utc_now_iso(),
        "sessions": [],
        "methods": {},
    }


def _run_method(
    cfg: HorizonConfig,
    name: str,
    editor: Editor,
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    sample_idx: list[int],
    evaluator: Evaluator,
    out: dict[str, Any],
    base: dict[str, torch.Tensor],
) -> None:
    """Edit the stream with one method from its last checkpoint, measuring at every checkpoint
    (state, then JSON, after each); with ``every`` > 0, every that many edits the edited
    weights go back to ``base`` and all edits so far are re-solved jointly."""
    _, every = split_consolidation(name)
    report = out["methods"].setdefault(
        name,
        {
            "curve": [],
            "consolidate_every": every or None,
            "consolidations": [],
            "progress": {"done": 0, "refused_ids": [], "seconds": [], "touched": []},
        },
    )
    progress = report["progress"]
    done = progress["done"]
    if done >= len(requests) or (cfg.stop_after is not None and done >= cfg.stop_after):
        return
    refused_ids = set(progress["refused_ids"])
    applied = [r for r in requests[:done] if r.request_id not in refused_ids]
    touched = set(progress["touched"])
    if done:
        _load_state(cfg, name, editor, lm, applied, done)
        editor.reset_memory(lm, applied)
        log.info("%s resumed at %d edits", name, done)
    seconds: list[float] = progress["seconds"]
    started = time.perf_counter() - progress.get("wall_seconds", 0.0)
    end = len(requests) if cfg.stop_after is None else min(cfg.stop_after, len(requests))
    for start in tqdm(range(done, end, cfg.batch), desc=name):
        batch = requests[start : start + cfg.batch]
        try:
            result = editor.apply(lm, batch)
        except EditError as exc:
            refused_ids |= {r.request_id for r in batch}
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
            report["consolidations"].append(
                {"held": len(applied), "seconds": time.perf_counter() - t0}
            )
        if done % cfg.checkpoint and done != len(requests):
            continue
        held = [evaluator.requests[i] for i, idx in enumerate(sample_idx) if idx < done]
        t0 = time.perf_counter()
        state = ModelState.from_touched(lm.adapter, touched)
        summary = evaluator.evaluate(held, state)["summary"] if held else {}
        point = {
            "n_edits": done,
            "retention": summary.get("efficacy_exact"),
            "retention_sample": len(held),
            **{k: summary.get(k) for k in CURVE_KEYS},
            "refused": len(refused_ids),
            "eval_seconds": time.perf_counter() - t0,
            "wall_seconds": time.perf_counter() - started,
        }
        report["curve"].append(point)
        log.info(
            "%s %d edits: %s",
            name,
            done,
            {k: round(v, 3) for k, v in point.items() if isinstance(v, float)},
        )
        progress.update(
            {
                "done": done,
                "refused_ids": sorted(refused_ids),
                "touched": sorted(touched),
                "wall_seconds": point["wall_seconds"],
            }
        )
        report.update(
            {
                "edit_seconds_p50": percentile(seconds, 50),
                "edit_seconds_p95": percentile(seconds, 95),
                "edit_seconds_total": sum(seconds),
                "refused_edits": len(refused_ids),
            }
        )
        _save_state(cfg, name, editor, lm, applied, touched, done, every > 0)
        _write(out, cfg.out)
        _prune_state(cfg, name, keep=done)


def _state_file(cfg: HorizonConfig, name: str, done: int, kind: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.=-]", "_", name)
    return cfg.state_dir / f"{safe}.{done}.{kind}.safetensors"


def _save_state(
    cfg: HorizonConfig,
    name: str,
    editor: Editor,
    lm: LoadedModel,
    applied: Sequence[EditRequest],
    touched: set[str],
    done: int,
    with_material: bool,
) -> None:
    """The method's edited parameters after ``done`` edits (and its edit material, which a
    consolidation after a resume would otherwise recompute), written before the JSON that
    points at them, each file whole or absent (written aside, then renamed)."""
    params = dict(lm.model.named_parameters())
    weights = {k: params[k].detach().cpu().contiguous() for k in sorted(touched)}
    _save_atomic(weights, _state_file(cfg, name, done, "weights"), {"done": str(done)})
    if not with_material:
        return
    materials = editor.edit_material(lm, applied)
    tensors, index = {}, []
    for i, request in enumerate(applied):
        material = materials.get(request.request_id)
        if material is None:
            continue
        index.append([request.request_id, material.fingerprint, sorted(material.tensors)])
        for key, tensor in material.tensors.items():
            tensors[f"{i}/{key}"] = tensor.detach().cpu().contiguous()
    meta = {"done": str(done), "index": json.dumps(index)}
    _save_atomic(tensors, _state_file(cfg, name, done, "material"), meta)


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=meta)
    os.replace(partial, path)


def _load_state(
    cfg: HorizonConfig,
    name: str,
    editor: Editor,
    lm: LoadedModel,
    applied: Sequence[EditRequest],
    done: int,
) -> None:
    path = _state_file(cfg, name, done, "weights")
    if not path.is_file():
        raise HorizonError(f"{name}: the JSON says {done} edits but {path} is missing")
    params = dict(lm.model.named_parameters())
    with torch.no_grad():
        for key, value in load_file(str(path)).items():
            params[key].copy_(value)
    material_path = _state_file(cfg, name, done, "material")
    if not material_path.is_file():
        return
    from safetensors import safe_open

    with safe_open(str(material_path), "pt") as fh:
        index = json.loads((fh.metadata() or {})["index"])
        by_id = {r.request_id: (i, r) for i, r in enumerate(applied)}
        for request_id, fingerprint, keys in index:
            i, request = by_id[request_id]
            tensors = {k: fh.get_tensor(f"{i}/{k}") for k in keys}
            editor.take_material(lm, request, EditMaterial(fingerprint, tensors))


def _prune_state(cfg: HorizonConfig, name: str, keep: int) -> None:
    """Remove the method's state files of earlier checkpoints (the JSON no longer names them)."""
    safe = re.sub(r"[^A-Za-z0-9_.=-]", "_", name)
    for path in cfg.state_dir.glob(f"{safe}.*.safetensors"):
        parts = path.name[len(safe) + 1 :].split(".")
        if parts[0].isdigit() and int(parts[0]) != keep:
            path.unlink(missing_ok=True)


def _write(out: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(out, indent=1, default=json_default) + "\n")
    os.replace(partial, path)


def plot(out: dict[str, Any], path: Path) -> Path:
    """Retention, neighbourhood and unrelated answers kept, and perplexity drift, per method,
    against edits made (runs written before these keys: retention and ``locality``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("retention", "retention (sampled earlier edits)"),
        ("neighbourhood_kept", "neighbourhood answers kept"),
        ("unrelated_kept", "unrelated answers kept"),
        ("perplexity_drift", "perplexity drift"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(17, 3.8))
    for name, report in out["methods"].items():
        curve = report["curve"]
        xs = [p["n_edits"] for p in curve]
        for ax, (key, _) in zip(axes, panels, strict=True):
            old = "locality" if key == "neighbourhood_kept" else key
            ys = [p.get(key, p.get(old)) for p in curve]
            ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=name)
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.set_title(title)
        ax.set_xlabel("edits applied")
        if key != "perplexity_drift":
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend()
    sessions = out.get("sessions") or [out]
    revs = sorted({str(s.get("git_rev"))[:8] for s in sessions})
    load = [s.get("loadavg_start", [0])[0] for s in sessions]
    fig.suptitle(
        f"SmolLM2 · CounterFact · {out['n_edits']} sequential edits, batch {out['batch_size']} · "
        f"git {', '.join(revs)} · load avg at start {min(load):.1f}-{max(load):.1f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(out: dict[str, Any]) -> None:
    print(
        f"{'method':<28} {'edits':>6} {'retention':>9} {'nbr kept':>8} {'unrel':>6} "
        f"{'ppl':>7} {'refused':>7}"
    )
    for name, report in out["methods"].items():
        for p in report["curve"]:
            nbr = p.get("neighbourhood_kept", p.get("locality")) or 0
            drift = p.get("perplexity_drift")
            print(
                f"{name:<28} {p['n_edits']:>6} {100 * (p['retention'] or 0):>9.1f} "
                f"{100 * nbr:>8.1f} {100 * (p.get('unrelated_kept') or 0):>6.1f} "
                f"{'-' if drift is None else f'{100 * drift:+.1f}%':>7} {p['refused']:>7}"
            )


if __name__ == "__main__":
    sys.exit(main())

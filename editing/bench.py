"""The sequential-editing benchmark: every method on the same request stream, in one process.

Recipe: load the model and the first ``n_edits`` requests; keep a bit-exact copy of the base
weights; probe each method's first edit to learn the lowest block it changes (so the base pass
can keep the residual stream entering that block); run every metric once on the base model; then
per method: restore the base weights, apply the stream in batches, and after every turn measure
retention (efficacy of all edits so far) and locality on a fixed probe sample; after the last turn
run every metric over all edits (the papers' protocol). Results go to
``<out>/<dataset>-<n_edits>.json`` (stable keys, read by other tools) with a PNG of the curves;
each method's ``summary`` holds the yardstick (``editing.evaluation.SUMMARY_KEYS``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import json
import logging
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from editing.datasets import DATASETS, DatasetName, default_data_dir, load_dataset
from editing.editors.base import EditError, Editor
from editing.errors import FactkeeperError
from editing.evaluation import EvalConfig, Evaluator, ModelState, mean, summarise
from editing.models import LoadedModel, load_model
from editing.perplexity import read_text_file
from editing.registry import EDITORS, get_editor, parse_method
from editing.requests import LocalityProbe

WIKITEXT_TEST = "wikitext/wiki.test.raw"
"""The perplexity sample (the key statistics read ``wiki.valid.raw``: never the same text)."""

log = logging.getLogger(__name__)


class BenchError(FactkeeperError):
    """The benchmark's settings are inconsistent, or a method broke the editor contract."""


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run; checked when built."""

    dataset: DatasetName
    methods: tuple[str, ...]
    n_edits: int = 1000
    batch_size: int = 1
    """Requests per editor call."""
    turn_size: int = 100
    """Edits between evaluations (a multiple of batch_size)."""
    model: str = "smollm2"
    seed: int = 0
    out_dir: Path = Path("bench/results")
    threads: int = 1
    """torch intra-op threads (fixed, for deterministic edits)."""
    data_dir: Path | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    editor_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per method, keyword arguments for ``get_editor`` (its config fields)."""
    split: str = "eval"
    """``val`` (CounterFact only) for tuning, so settings are not chosen on the eval stream;
    ``train`` where a dataset has no val split (meta-trained editors may have seen its start)."""
    skip: int = 0
    """Requests skipped at the start of the split (e.g. those a value network trained on)."""
    unrelated: tuple[LocalityProbe, ...] = ()
    """Unrelated probes for ``unrelated_kept`` (the CLI passes the bundled audit probe set)."""
    unrelated_source: str | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise BenchError(f"--dataset must be one of {', '.join(DATASETS)}")
        if not self.methods:
            raise BenchError("--methods needs at least one method")
        unknown = [m for m in self.methods if parse_method(m)[0] not in EDITORS]
        if unknown:
            raise BenchError(
                f"--methods: unknown {', '.join(unknown)}; known: {', '.join(sorted(EDITORS))}"
            )
        if len(set(self.methods)) != len(self.methods):
            raise BenchError("--methods lists a method twice")
        if self.n_edits < 1 or self.batch_size < 1 or self.turn_size < 1 or self.threads < 1:
            raise BenchError("--edits, --batch, --turn-size and threads must be >= 1")
        if self.skip < 0:
            raise BenchError("--skip must be >= 0")
        if self.turn_size % self.batch_size:
            raise BenchError("--turn-size must be a multiple of --batch")
        for method in self.methods:
            every = split_consolidation(method)[1]
            if every % self.batch_size:
                raise BenchError(
                    f"method {method!r}: {CONSOLIDATE_OPTION} is not a multiple of --batch"
                )


CONSOLIDATE_OPTION = "consolidate_every"


def split_consolidation(spec: str) -> tuple[str, int]:
    """``ft:consolidate_every=100`` -> ("ft", 100); 0 when the spec does not consolidate.

    The option belongs to the benchmark, not to the editor: every that many edits the bench
    sets the edited weights back to the base and re-solves all edits so far jointly
    (``Editor.consolidate``), as the daemon's consolidation does with its live set.
    """
    head, *items = spec.split(":")
    kept, every = [], 0
    for item in items:
        key, _, raw = item.partition("=")
        if key != CONSOLIDATE_OPTION:
            kept.append(item)
            continue
        try:
            every = int(raw)
        except ValueError:
            raise BenchError(f"method {spec!r}: {CONSOLIDATE_OPTION} must be an integer") from None
        if every < 1:
            raise BenchError(f"method {spec!r}: {CONSOLIDATE_OPTION} must be >= 1")
    return ":".join([head, *kept]), every


def seed_everything(seed: int) -> None:
    """Seed Python and torch (nothing seeds at import time)."""
    random.seed(seed)
    torch.manual_seed(seed)


def result_path(out_dir: Path, dataset: str, n_edits: int, split: str = "eval") -> Path:
    """Where a run's JSON goes; the plot sits beside it with ``.png``."""
    name = dataset if split == "eval" else f"{dataset}-{split}"
    return Path(out_dir) / f"{name}-{n_edits}.json"


def run_bench(
    dataset: DatasetName,
    methods: Sequence[str],
    n_edits: int = 1000,
    batch_size: int = 1,
    turn_size: int = 100,
    model: str | LoadedModel = "smollm2",
    seed: int = 0,
    out_dir: Path | str = Path("bench/results"),
    *,
    data_dir: Path | None = None,
    eval_config: EvalConfig | None = None,
    threads: int = 1,
    editor_options: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
    command: str | None = None,
    split: str = "eval",
    skip: int = 0,
    unrelated: Sequence[LocalityProbe] = (),
    unrelated_source: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark and write its JSON and PNG; returns the JSON's content.

    Args:
        dataset: ``zsre``, ``counterfact`` or ``mquake`` (the eval split).
        methods: registry names, run in this order on the same stream.
        n_edits: requests from the start of the stream (fewer if the dataset is smaller).
        batch_size: requests per editor call.
        turn_size: edits between evaluations.
        model: ``"smollm2"``, a local Hugging Face folder, or an already loaded model.
        seed: seeds Python and torch before the run and before each method.
        out_dir: folder for ``<dataset>-<n_edits>.json`` and ``.png``.
        data_dir: dataset folder (default ``editing.datasets.default_data_dir()``).
        eval_config: evaluation settings.
        threads: torch threads, fixed for determinism (1 is fastest on a shared machine: spinning
            OpenMP threads lose more to contention than they gain).
        editor_options: per method, config fields passed to ``get_editor``.
        progress: show progress bars (interactive use).
        command: the command line to record (default: this process's argv).
        split: the dataset split whose stream is edited (``val`` for tuning).
        skip: requests skipped at the start of the split.
        unrelated: probes of unrelated knowledge for ``unrelated_kept``.
        unrelated_source: where they came from (recorded in the JSON).
    """
    cfg = BenchConfig(
        dataset=dataset,
        methods=tuple(methods),
        n_edits=n_edits,
        batch_size=batch_size,
        turn_size=turn_size,
        model=model if isinstance(model, str) else model.name,
        seed=seed,
        out_dir=Path(out_dir),
        threads=threads,
        data_dir=data_dir,
        eval=eval_config or EvalConfig(),
        editor_options=dict(editor_options or {}),
        split=split,
        skip=skip,
        unrelated=tuple(unrelated),
        unrelated_source=unrelated_source,
    )
    return Benchmark(cfg, model if isinstance(model, LoadedModel) else None).run(
        progress=progress, command=command
    )


class Benchmark:
    """State of one run: the model, its base weights, the stream and the evaluator."""

    def __init__(self, config: BenchConfig, lm: LoadedModel | None = None) -> None:
        self.config = config
        self.lm = lm
        self.base_state: dict[str, torch.Tensor] = {}

    def run(self, *, progress: bool = True, command: str | None = None) -> dict[str, Any]:
        cfg = self.config
        started_at = utc_now_iso()
        revision = git_revision()  # the code that runs, even if the tree changes meanwhile
        loadavg_start = list(os.getloadavg())
        wall, cpu = time.perf_counter(), time.process_time()
        torch.set_num_threads(cfg.threads)
        torch.use_deterministic_algorithms(True)
        seed_everything(cfg.seed)
        lm = self.lm or load_model(cfg.model)
        self.lm = lm
        requests = load_dataset(cfg.dataset, cfg.split, cfg.data_dir, limit=cfg.skip + cfg.n_edits)
        requests = requests[cfg.skip :]
        if len(requests) < cfg.n_edits:
            log.warning(
                "dataset has %d requests, fewer than --edits %d", len(requests), cfg.n_edits
            )
        editors = {name: self._editor(name) for name in cfg.methods}
        for editor in editors.values():
            editor.prepare_model(lm)  # before the base copy: added parameters start at zero
        self.base_state = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}

        probe_layers = self._probe_resume_layers(requests[:1])
        text_path = (cfg.data_dir or default_data_dir()) / WIKITEXT_TEST
        evaluator = Evaluator(
            lm,
            requests,
            cfg.eval,
            unrelated=cfg.unrelated,
            text=read_text_file(text_path, cfg.eval.perplexity_chars),
        )
        base_report = evaluator.prepare_base(capture_layers=sorted(set(probe_layers.values())))
        log.info("base model evaluated", extra={"seconds": round(evaluator.base_seconds or 0, 1)})

        methods: dict[str, Any] = {}
        for name, editor in editors.items():
            methods[name] = self._run_method(name, editor, requests, evaluator, progress)
        self._restore_base()

        out = {
            "dataset": cfg.dataset,
            "split": cfg.split,
            "skip": cfg.skip,
            "stream_ids": [requests[0].request_id, requests[-1].request_id] if requests else [],
            "n_edits": len(requests),
            "batch_size": cfg.batch_size,
            "turn_size": cfg.turn_size,
            "model": lm.name,
            "base_hash": lm.base_hash,
            "seed": cfg.seed,
            "threads": cfg.threads,
            "git_rev": revision,
            "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "started_at": started_at,
            "finished_at": utc_now_iso(),
            "wall_seconds": time.perf_counter() - wall,
            "cpu_seconds": time.process_time() - cpu,
            "machine": machine_info(),
            "torch_version": torch.__version__,
            "transformers_version": importlib.metadata.version("transformers"),
            "loadavg_start": loadavg_start,
            "loadavg_end": list(os.getloadavg()),
            "eval_config": dataclasses.asdict(cfg.eval),
            "unrelated_source": cfg.unrelated_source,
            "unrelated_dropped_in_stream": evaluator.unrelated_dropped,
            "perplexity_sample": {"file": WIKITEXT_TEST, "tokens": evaluator.text_tokens},
            "subsets": _subsets(requests),
            "base_eval_seconds": evaluator.base_seconds,
            "final_eval_seconds": {n: m["final_eval_seconds"] for n, m in methods.items()},
            "base": base_report,
            "methods": methods,
            "known_before_editing": _known_examples(evaluator, requests),
        }
        path = result_path(cfg.out_dir, cfg.dataset, cfg.n_edits, cfg.split)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1, default=json_default) + "\n")
        from editing.bench_report import plot_curves

        out["plot"] = str(plot_curves(out, path.with_suffix(".png")))
        path.write_text(json.dumps(out, indent=1, default=json_default) + "\n")
        log.info("bench written", extra={"path": str(path), "seconds": round(out["wall_seconds"])})
        return out

    # -- steps --

    def _editor(self, name: str) -> Editor:
        """The editor of method ``name`` (the bench's own options taken out of the spec)."""
        spec, every = split_consolidation(name)
        editor = get_editor(spec, **self.config.editor_options.get(name, {}))
        if every and not editor.supports_consolidation:
            raise BenchError(f"method {name!r}: {editor.name} has no joint solve to consolidate")
        return editor

    def _probe_resume_layers(self, first: Sequence[Any]) -> dict[str, int]:
        """Apply and undo one edit per method to learn the lowest block it changes.

        Each probe uses a fresh editor, thrown away after: an editor that caches per request
        (NSE's target values) must not start the timed run with work already done.
        """
        assert self.lm is not None
        cfg = self.config
        layers = {}
        for name in cfg.methods:
            editor = self._editor(name)
            try:
                result = editor.apply(self.lm, first)
            except EditError:
                continue  # refused: the base pass then keeps no residual for this method
            if result.deltas:
                layers[name] = self._state(set(result.deltas)).resume_layer
            editor.undo(self.lm, result)
        self._check_base(set(), "the probe edit")
        return layers

    def _run_method(
        self,
        name: str,
        editor: Editor,
        requests: Sequence[Any],
        evaluator: Evaluator,
        progress: bool,
    ) -> dict[str, Any]:
        assert self.lm is not None
        cfg = self.config
        self._restore_base()
        seed_everything(cfg.seed)
        touched: set[str] = set()
        edit_seconds: list[float] = []
        immediate: list[float] = []
        infos: list[dict[str, object]] = []
        curve: list[dict[str, Any]] = []
        refused: list[dict[str, Any]] = []
        eval_seconds = 0.0
        turn_edit_seconds = 0.0
        turn_immediate: list[float] = []
        every = split_consolidation(name)[1]
        held: list[Any] = []  # the requests applied so far (not refused): the live set
        consolidations: list[dict[str, Any]] = []
        bar = tqdm(total=len(requests), desc=f"{cfg.dataset} {name}", disable=not progress)
        for start in range(0, len(requests), cfg.batch_size):
            batch = requests[start : start + cfg.batch_size]
            t_edit = time.perf_counter()
            try:
                result = editor.apply(self.lm, batch)
            except EditError as exc:  # refused (e.g. by a safeguard): the model is unchanged
                refused.append({"first_edit": start, "size": len(batch), "reason": str(exc)})
                turn_edit_seconds += time.perf_counter() - t_edit
            else:
                held += batch
                touched |= set(result.deltas)
                edit_seconds.append(result.seconds)
                turn_edit_seconds += result.seconds
                infos.append({k: v for k, v in result.info.items() if isinstance(v, int | float)})
                del result  # deltas and previous values: keeping 1000 of them would not fit
            state = self._state(touched)
            t0 = time.perf_counter()
            eff = evaluator.retained(batch, state)
            eval_seconds += time.perf_counter() - t0
            immediate += eff
            turn_immediate += eff
            done = start + len(batch)
            bar.update(len(batch))
            if every and done % every == 0 and held:
                consolidations.append(self._consolidate(editor, held, touched))
                touched |= set(consolidations[-1].pop("touched"))
                state = self._state(touched)
            if done % cfg.turn_size == 0 or done == len(requests):
                t0 = time.perf_counter()
                retention = mean(evaluator.retained(requests[:done], state))
                locality = evaluator.curve_locality(state)
                seconds = time.perf_counter() - t0
                eval_seconds += seconds
                curve.append(
                    {
                        "turn": len(curve) + 1,
                        "n_edits": done,
                        "retention": retention,
                        "locality": locality,
                        "efficacy_immediate": mean(turn_immediate),
                        "edit_seconds": turn_edit_seconds,
                        "eval_seconds": seconds,
                    }
                )
                log.info(
                    "turn done",
                    extra={
                        "method": name,
                        "n_edits": done,
                        "retention": round(retention or 0, 4),
                        "locality": None if locality is None else round(locality, 4),
                        "edit_s": round(turn_edit_seconds, 1),
                        "eval_s": round(seconds, 1),
                    },
                )
                turn_edit_seconds, turn_immediate = 0.0, []
        bar.close()

        final = evaluator.evaluate(requests, self._state(touched))
        self._check_base(touched, name)
        eval_seconds += final["eval_seconds"]
        per_request = final.pop("per_request")
        report = dict(final)
        report["summary"].update(
            {
                "refused": sum(r["size"] for r in refused),
                "edit_seconds_p50": percentile(edit_seconds, 50),
                "edit_seconds_p95": percentile(edit_seconds, 95),
                "n_edits": len(requests),
                "batch": cfg.batch_size,
            }
        )
        report["summary_by_subset"] = {
            subset: _subset_summary(report["summary"], per_request, rows, cfg.eval.first_n)
            for subset, rows in _subsets(requests).items()
        }
        report.update(
            {
                "efficacy_immediate": mean(immediate),
                "edit_seconds_p50": percentile(edit_seconds, 50),
                "edit_seconds_p95": percentile(edit_seconds, 95),
                "edit_seconds_total": sum(edit_seconds),
                "eval_seconds": eval_seconds,
                "final_eval_seconds": final["eval_seconds"],
                "touched_parameters": sorted(touched),
                "editor_config": _editor_config(editor),
                "editor_info_mean": _mean_info(infos),
                "refused_examples": refused[:5],
                "consolidate_every": every or None,
                "consolidations": consolidations,
                "curve": curve,
            }
        )
        return report

    # -- weights --

    def _state(self, touched: set[str]) -> ModelState:
        assert self.lm is not None
        return ModelState.from_touched(self.lm.adapter, touched)

    def _consolidate(
        self, editor: Editor, held: Sequence[Any], touched: set[str]
    ) -> dict[str, Any]:
        """Base weights back into everything edited so far, then one joint solve of ``held``."""
        assert self.lm is not None
        started = time.perf_counter()
        params = dict(self.lm.model.named_parameters())
        with torch.no_grad():
            for key in touched:
                params[key].copy_(self.base_state[key])
        result = editor.consolidate(self.lm, held)
        seconds = time.perf_counter() - started
        log.info("consolidated", extra={"held": len(held), "seconds": round(seconds, 1)})
        info = {k: v for k, v in result.info.items() if isinstance(v, int | float)}
        return {"held": len(held), "seconds": seconds, "info": info, "touched": list(result.deltas)}

    def _restore_base(self) -> None:
        """Copy the base weights back into every parameter that differs (bit-exact)."""
        assert self.lm is not None
        with torch.no_grad():
            for key, value in self.lm.model.state_dict().items():
                if not torch.equal(value, self.base_state[key]):
                    value.copy_(self.base_state[key])

    def _check_base(self, touched: set[str], what: str) -> None:
        """Parameters an editor did not report must still hold the base weights."""
        assert self.lm is not None
        for key, value in self.lm.model.state_dict().items():
            if key not in touched and not torch.equal(value, self.base_state[key]):
                raise BenchError(f"{what} changed {key} without reporting a delta for it")


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = int(rank), min(int(rank) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _editor_config(editor: Editor) -> dict[str, Any] | None:
    describe = getattr(editor, "describe", None)
    if callable(describe):
        return describe()
    config = getattr(editor, "config", None)
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None


def _mean_info(infos: Sequence[dict[str, object]]) -> dict[str, float]:
    keys = sorted({k for info in infos for k in info})
    return {k: float(mean(float(i[k]) for i in infos if k in i) or 0.0) for k in keys}


def _subsets(requests: Sequence[Any]) -> dict[str, list[int]]:
    """Named parts of the stream reported apart (CounterFact cases outside the MEND train split,
    which a meta-trained editor cannot have seen)."""
    splits = [r.extra.get("mend_split") for r in requests]
    if not any(splits):
        return {}
    return {"not_in_mend_train": [i for i, s in enumerate(splits) if s != "train"]}


def _subset_summary(
    whole: dict[str, Any], per: dict[str, list[Any]], rows: Sequence[int], first_n: int
) -> dict[str, Any]:
    """The summary over ``rows`` of the stream; stream-wide figures (unrelated, perplexity, cost)
    are the whole run's."""
    part = summarise({k: [v[i] for i in rows] for k, v in per.items()}, first_n)
    out = {k: part.get(k, whole.get(k)) for k in whole}
    out["n_edits"] = len(rows)
    return out


def _known_examples(evaluator: Evaluator, requests: Sequence[Any]) -> dict[str, Any]:
    """Which true facts the base model states under greedy decoding (a few examples)."""
    return {
        "true_exact": evaluator.known_true_share(),
        "examples": evaluator.known_true_examples(limit=10),
    }


def git_revision() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("-dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


@dataclass(frozen=True)
class RunRecord:
    """The provenance every benchmark JSON carries, taken when the run starts (the revision and
    load then are what the figures belong to) and completed when it is written."""

    command: str
    git_rev: str | None
    started_at: str
    loadavg_start: list[float]

    @classmethod
    def start(cls, script: str, argv: Sequence[str] | None) -> RunRecord:
        args = list(argv) if argv is not None else sys.argv[1:]
        return cls(
            " ".join(["python", script, *args]),
            git_revision(),
            utc_now_iso(),
            list(os.getloadavg()),
        )

    def write(self, path: Path, results: dict[str, Any]) -> None:
        """``results`` with this record, the machine and the load at the end, as JSON."""
        out = {
            "command": self.command,
            **results,
            "git_rev": self.git_rev,
            "machine": machine_info(),
            "started_at": self.started_at,
            "loadavg_start": self.loadavg_start,
            "loadavg_end": list(os.getloadavg()),
        }
        path.write_text(json.dumps(out, indent=1, default=json_default) + "\n")


def utc_now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")

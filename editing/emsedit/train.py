"""Meta-training of the EMSEdit hypernetworks (spec section 3), seeded and resumable.

Sequential mode (the default) trains as the model is used: turn after turn of N edits is applied
to a model that keeps every earlier turn's edits, for ``turns_per_sequence`` turns, then the model
is reset to its base weights and a new sequence starts. Each turn runs K editing steps (one net
per step), then ONE meta-loss (rephrase cross-entropy + L2 drift of the edited weights from the
base, or KL on locality prompts) is differentiated w.r.t. the final weights and pushed into every
step's net through the closed-form ridge gradient (``shift.backprop_shift``). Batch mode follows
the reference's ``train_batch``: one shared net, every step computed on the unedited model, one
Adam step per step. The recipe: ``train_editor`` -> ``train_turn`` -> ``meta_grads`` ->
``backprop_shift``; checkpoints via ``checkpoint.save_editor`` / ``save_train_state``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from editing.editors.base import EditError
from editing.emsedit.checkpoint import (
    CheckpointError,
    load_editor,
    load_train_state,
    save_editor,
    save_train_state,
)
from editing.emsedit.config import EMSEditConfig
from editing.emsedit.editor import (
    EditedModule,
    StepRecord,
    WeightState,
    build_group,
    edit_pairs,
    key_positions,
    resolve_modules,
    run_steps_,
)
from editing.emsedit.keys import (
    answer_log_probs,
    answer_loss,
    grad_enabled_on,
    tokenize_pairs,
)
from editing.emsedit.nets import HyperNetGroup
from editing.emsedit.shift import backprop_shift
from editing.errors import FactkeeperError
from editing.hooks import frozen_parameters
from editing.models import LoadedModel
from editing.requests import EditRequest, continuation

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python and torch (nothing seeds at import time)."""
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class TurnStats:
    """What one training turn measured (for logs and the progress bar)."""

    gen_loss: float  # rephrase CE after the edit (the meta-loss' main term)
    loc_loss: float  # the regulariser: coef * drift^2 (norm) or coef * KL
    shift_norm: float  # Frobenius norm of this turn's shifts, summed over modules and steps
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    batches: int
    optimizer_steps: int
    seconds: float
    last: TurnStats | None
    out: Path


def rephrase_pairs(requests: Sequence[EditRequest]) -> list[tuple[str, str]]:
    """(first rephrase, new target); a request without rephrases falls back to its prompt."""
    return [
        (r.rephrases[0] if r.rephrases else r.prompt, continuation(r.target_new)) for r in requests
    ]


def locality_pairs(requests: Sequence[EditRequest]) -> list[tuple[str, str]]:
    """(first locality prompt, its answer) for the KL option; requests without one are skipped."""
    return [
        (r.locality[0].prompt, continuation(r.locality[0].answer)) for r in requests if r.locality
    ]


def batch_order(n_items: int, batch: int, edits_per_batch: int, seed: int) -> list[int]:
    """Indices of training batch ``batch``: a seeded permutation per epoch, no item twice."""
    per_epoch = n_items // edits_per_batch
    if per_epoch == 0:
        raise EditError(f"{n_items} training requests < edits_per_batch {edits_per_batch}")
    epoch, position = divmod(batch, per_epoch)
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    start = position * edits_per_batch
    return perm[start : start + edits_per_batch].tolist()


def meta_grads(
    lm: LoadedModel,
    config: EMSEditConfig,
    state: WeightState,
    modules: Sequence[EditedModule],
    requests: Sequence[EditRequest],
    base_log_probs: list[torch.Tensor] | None,
    reg_coef: float,
) -> tuple[dict[str, torch.Tensor], float, float]:
    """Gamma = dL/dW per module as (d_in, d_out), with the generalisation and locality terms."""
    params = [state.params[m.name] for m in modules]
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    device = lm.device

    def accumulate(loss: torch.Tensor) -> None:
        for acc, grad in zip(total, torch.autograd.grad(loss, params), strict=True):
            acc += grad.float()

    gen_loss = 0.0
    loc_loss = 0.0
    size = config.lm_batch_size
    with grad_enabled_on(params):
        pairs = rephrase_pairs(requests)
        for start in range(0, len(pairs), size):  # sum of micro-batch means, as the reference
            loss = answer_loss(
                lm.model, tokenize_pairs(lm.tokenizer, pairs[start : start + size], device)
            )
            accumulate(loss)
            gen_loss += loss.item()
        if config.locality == "norm":
            reg = reg_coef * state.drift_sq()
            accumulate(reg)
            loc_loss = reg.item()
        else:
            loc = locality_pairs(requests)
            assert base_log_probs is not None
            for index, start in enumerate(range(0, len(loc), size)):
                batch = tokenize_pairs(lm.tokenizer, loc[start : start + size], device)
                log_q = answer_log_probs(lm.model, batch)  # (n_tok, V) edited model
                log_p = base_log_probs[index]  # (n_tok, V) base model
                kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()  # KL(base || edited)
                accumulate(config.loc_coef * kl)
                loc_loss += config.loc_coef * kl.item()
    return state.grads_in_out(total), gen_loss, loc_loss


@torch.no_grad()
def _base_log_probs(
    lm: LoadedModel, config: EMSEditConfig, state: WeightState, requests: Sequence[EditRequest]
) -> list[torch.Tensor]:
    """Locality answer distributions of the base model (W0), one tensor per micro-batch."""
    loc = locality_pairs(requests)
    if not loc:
        raise EditError("locality='kl' needs requests with locality probes")
    saved = {name: delta.clone() for name, delta in state.delta.items()}
    state.restore_()
    try:
        return [
            answer_log_probs(
                lm.model, tokenize_pairs(lm.tokenizer, loc[s : s + config.lm_batch_size], lm.device)
            )
            for s in range(0, len(loc), config.lm_batch_size)
        ]
    finally:
        state.set_deltas_(saved)


def backprop_steps(
    group: HyperNetGroup,
    config: EMSEditConfig,
    records: Sequence[StepRecord],
    gamma: dict[str, torch.Tensor],
) -> None:
    """Push Gamma = dL/dW_final into every step's net: each step's shift adds to W_final."""
    for record in records:
        for name, (keys, grads) in record.cache.items():
            net, index = group.net(record.net_index, name)
            backprop_shift(
                net,
                index,
                keys,
                grads,
                record.shifts[name],
                gamma[name],
                config.hypernet_batch_size,
            )


def train_turn(
    lm: LoadedModel,
    group: HyperNetGroup,
    config: EMSEditConfig,
    state: WeightState,
    modules: Sequence[EditedModule],
    requests: Sequence[EditRequest],
    optimizer: torch.optim.Optimizer,
) -> tuple[TurnStats, int]:
    """One training turn; returns its stats and how many optimiser steps it took."""
    started = time.perf_counter()
    params = list(group.parameters())
    pairs = edit_pairs(requests)
    if config.mode == "sequential":
        base = _base_log_probs(lm, config, state, requests) if config.locality == "kl" else None
        records = run_steps_(
            lm,
            group,
            config,
            state,
            pairs,
            steps=config.steps,
            update_normalizer=True,
            device=lm.device,
            positions=key_positions(lm, config, requests),
        )
        reg = config.reg_coef**2 if config.reg_applied_twice else config.reg_coef
        gamma, gen, loc = meta_grads(lm, config, state, modules, requests, base, reg)
        backprop_steps(group, config, records, gamma)
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        shift_norm = sum(float(s.norm()) for r in records for s in r.shifts.values())
        return TurnStats(gen, loc, shift_norm, time.perf_counter() - started), 0
    # Batch mode: every step starts from the unedited model and ends with its own Adam step.
    gen = loc = shift_norm = 0.0
    base = _base_log_probs(lm, config, state, requests) if config.locality == "kl" else None
    for _ in range(config.steps):
        state.reset_()
        records = run_steps_(
            lm,
            group,
            config,
            state,
            pairs,
            steps=1,
            update_normalizer=True,
            device=lm.device,
            positions=key_positions(lm, config, requests),
        )
        gamma, gen, loc = meta_grads(lm, config, state, modules, requests, base, config.reg_coef)
        state.reset_()
        backprop_steps(group, config, records, gamma)
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        shift_norm += sum(float(s.norm()) for s in records[0].shifts.values())
    return TurnStats(gen, loc, shift_norm, time.perf_counter() - started), config.steps


def _provenance(
    lm: LoadedModel, modules: Sequence[EditedModule], training: dict[str, object]
) -> dict[str, object]:
    versions = {d: importlib.metadata.version(d) for d in ("torch", "transformers")}
    return {
        "model": {"name": lm.name, "base_hash": lm.base_hash, "family": lm.adapter.family},
        "modules": [
            {"name": m.name, "weight_key": m.weight_key, "d_in": m.d_in, "d_out": m.d_out}
            for m in modules
        ],
        "training": {**training, **versions, "threads": torch.get_num_threads()},
    }


def train_editor(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    config: EMSEditConfig,
    *,
    batches: int,
    out: str | Path,
    state_dir: str | Path | None = None,
    dataset_name: str = "custom",
    resume: bool = True,
    save_every: int = 50,
    log_every: int = 10,
    progress: bool = True,
) -> TrainResult:
    """Meta-train hypernetworks for ``lm`` on ``requests`` for ``batches`` turns.

    Args:
        lm: the model to edit; its weights are restored exactly when training ends.
        requests: training edits (prompt, new target, rephrases; locality probes for ``kl``).
        config: the method's settings; ``seed`` fixes initialisation and data order.
        batches: total training turns (of ``config.edits_per_batch`` edits each).
        out: checkpoint folder for ``editor.safetensors`` + ``editor.json``.
        state_dir: folder for the resumable train state (default: ``out``).
        dataset_name: recorded in the checkpoint's provenance.
        resume: continue from ``state_dir``'s train state when one exists.
        save_every: write both checkpoint and train state every this many turns.
        log_every: log a line every this many turns.
        progress: show a tqdm bar (disabled automatically when stderr is not a terminal).
    """
    out = Path(out)
    state_dir = Path(state_dir) if state_dir is not None else out
    seed_everything(config.seed)
    modules = resolve_modules(lm, config)
    group = build_group(modules, config).to(lm.device)
    optimizer = torch.optim.Adam(group.parameters(), lr=config.meta_lr)
    start, opt_steps, seconds_before = 0, 0, 0.0
    restored: dict[str, torch.Tensor] = {}
    if resume and (state_dir / "train_state.json").is_file():
        loaded = load_editor(out, device=lm.device)
        if loaded.config.to_dict() | {"extra": {}} != config.to_dict() | {"extra": {}}:
            raise CheckpointError(f"{out} was trained with another config; use a new --out")
        group = loaded.group
        optimizer = torch.optim.Adam(group.parameters(), lr=config.meta_lr)
        found = load_train_state(state_dir, optimizer)
        assert found is not None
        restored, counters = found
        start = int(counters["batches_done"])
        opt_steps = int(counters["optimizer_steps"])
        seconds_before = float(counters["seconds"])
        log.info("resuming EMSEdit training", extra={"batch": start, "state_dir": str(state_dir)})
    params = list(group.parameters())
    for index, param in enumerate(params):
        param.grad = restored.get(f"grad.{index}", torch.zeros_like(param)).to(param.device)
    state = WeightState(lm, modules)
    drift = {m.name: restored[f"drift.{m.name}"] for m in modules if f"drift.{m.name}" in restored}
    started = time.perf_counter()
    last: TurnStats | None = None

    def save(done: int) -> None:
        elapsed = seconds_before + time.perf_counter() - started
        training = {
            "dataset": dataset_name,
            "n_requests": len(requests),
            "batches_done": done,
            "optimizer_steps": opt_steps,
            "seconds": round(elapsed, 1),
            "seed": config.seed,
        }
        save_editor(out, config, group, _provenance(lm, modules, training))
        tensors = {f"grad.{i}": p.grad for i, p in enumerate(params) if p.grad is not None}
        tensors |= {f"drift.{n}": d for n, d in state.delta.items()}
        save_train_state(state_dir, optimizer, tensors, training)

    try:
        with frozen_parameters(lm.model):
            if drift and start % config.turns_per_sequence != 0:
                state.set_deltas_(drift)
            bar = tqdm(range(start, batches), desc="emsedit", disable=not progress or None)
            for batch in bar:
                if batch % config.turns_per_sequence == 0:
                    state.reset_()  # a new sequence starts from the base weights
                idx = batch_order(len(requests), batch, config.edits_per_batch, config.seed)
                last, took = train_turn(
                    lm, group, config, state, modules, [requests[i] for i in idx], optimizer
                )
                opt_steps += took
                interval = config.opt_step_interval
                if config.mode == "sequential" and interval and (batch + 1) % interval == 0:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=False)
                    opt_steps += 1
                bar.set_postfix(gen=f"{last.gen_loss:.3f}", loc=f"{last.loc_loss:.3g}")
                if (batch + 1) % log_every == 0 or batch + 1 == batches:
                    log.info(
                        "emsedit train turn",
                        extra={
                            "batch": batch + 1,
                            "gen_loss": round(last.gen_loss, 4),
                            "loc_loss": round(last.loc_loss, 6),
                            "shift_norm": round(last.shift_norm, 4),
                            "step_size": _mean_step_size(group),
                            "seconds": round(last.seconds, 2),
                        },
                    )
                if (batch + 1) % save_every == 0 and batch + 1 < batches:
                    save(batch + 1)
            if config.mode == "sequential" and config.opt_step_interval == 0 and start < batches:
                optimizer.step()  # the reference's single Adam step per run
                optimizer.zero_grad(set_to_none=False)
                opt_steps += 1
            save(max(start, batches))
    finally:
        state.restore_()
    seconds = seconds_before + time.perf_counter() - started
    return TrainResult(max(start, batches), opt_steps, seconds, last, out)


def _mean_step_size(group: HyperNetGroup) -> float:
    """Mean learned edit step size over all nets and modules (a number to watch in logs)."""
    values = [net.lr.weight.detach().mean() for nets in group.nets for net in nets.values()]
    return float(torch.stack(values).mean())


class TrainingError(FactkeeperError):
    """Training could not start: missing dataset module, bad device, empty split."""


def train_from_dataset(
    *,
    model: str = "smollm2",
    dataset: str = "counterfact",
    device: str = "cpu",
    batches: int = 500,
    out: str | Path | None = None,
    state_dir: str | Path | None = None,
    config_path: str | Path | None = None,
    seed: int | None = None,
    limit: int | None = None,
    threads: int | None = None,
    resume: bool = True,
    save_every: int = 50,
    progress: bool = True,
) -> TrainResult:
    """The ``factkeeper train-editor`` recipe: load model and train split, train, save.

    Args:
        model: ``smollm2`` or a local Hugging Face folder.
        dataset: a name ``editing.datasets.load_dataset`` knows (its ``train`` split is used).
        device: ``cpu`` or ``cuda`` (model and hypernetworks live there).
        batches: training turns of ``edits_per_batch`` edits.
        out: checkpoint folder (default ``$FACTKEEPER_HOME/editors/<model>``).
        state_dir: resumable train state folder (default: ``out``).
        config_path: YAML of ``EMSEditConfig`` fields (default: the built-in defaults).
        seed: overrides the config's seed.
        limit: use only the first ``limit`` training cases.
        threads: ``torch.set_num_threads`` (recorded in the checkpoint).
        resume: continue from an existing train state in ``state_dir``.
        save_every: checkpoint every this many turns (a stopped run resumes from the last one).
        progress: show a progress bar on a terminal.
    """
    from editing.models import load_model
    from editing.paths import Paths

    try:
        from editing.datasets import load_dataset
    except ImportError as exc:
        raise TrainingError(f"editing.datasets is not available: {exc}") from exc
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("--device cuda asked but torch sees no CUDA device")
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    config = EMSEditConfig.from_yaml(config_path) if config_path else EMSEditConfig()
    if seed is not None:
        config = config.replace(seed=seed)
    lm = load_model(model, device=device)
    requests = load_dataset(dataset, "train", limit=limit)
    if not requests:
        raise TrainingError(f"{dataset} train split is empty")
    out = Path(out) if out is not None else Paths.from_env().editors_dir / Path(model).name
    log.info(
        "training EMSEdit",
        extra={"model": model, "dataset": dataset, "n": len(requests), "batches": batches},
    )
    return train_editor(
        lm,
        requests,
        config,
        batches=batches,
        out=out,
        state_dir=state_dir,
        dataset_name=f"{dataset}/train" + (f"[:{limit}]" if limit else ""),
        resume=resume,
        save_every=save_every,
        progress=progress,
    )

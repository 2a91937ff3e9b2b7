"""Training the value network on NSE's own value loss: seeded, resumable, on the base weights.

Each batch of training requests gets ``net.steps`` value updates from the network, each from the
value gradient at the δ reached so far (computed with δ detached: first order, as EMSEdit's
multi-step training treats the earlier steps' inputs), then the clamped result is scored with the
same loss NSE's Adam minimises (``editing.nse.keys.ValueObjective``), and that loss is
back-propagated into the network. No edit is applied: NSE computes every target on the original
weights, so the base model is exactly where the network is used.

A run writes into one folder: ``value-net.safetensors`` (the network, with its settings,
provenance and curve in the header) and the train state EMSEdit's training writes too
(``editing.emsedit.checkpoint.save_train_state``: Adam's moments, the position, the curve so
far), every ``save_every`` batches and at the end, so a stopped run resumes where it was.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from editing.emsedit.checkpoint import TRAIN_META, load_train_state, save_train_state
from editing.hooks import frozen_parameters
from editing.models import LoadedModel
from editing.nse.config import NSEConfig
from editing.nse.keys import ValueObjective, block_width
from editing.nse.value_net import ValueNet, ValueNetError
from editing.requests import EditRequest

log = logging.getLogger(__name__)

NET_FILE = "value-net.safetensors"


@dataclass(frozen=True)
class ValueTraining:
    """How the value network is trained (recorded in its file)."""

    steps: int = 2
    """Network updates per value (the EMSEdit-style steps); NSE's Adam takes ~20."""
    first_step: float = 0.25
    """Initial step size, a share of ||h|` (the untrained network is the normalised step)."""
    batch: int = 8
    epochs: int = 2
    lr: float = 1e-3
    size_weight: float = 0.0
    """Weight of (||δ||/||h||)² in the training loss: NSE's own decay term is nearly free, so
    without it the network learns to write the largest value the clamp allows."""
    step_size_lr_factor: float = 30.0
    """The step sizes' learning rate, as a multiple of ``lr``."""
    seed: int = 0
    save_every: int = 25
    """Batches between checkpoints."""


def clamped(delta: torch.Tensor, h: torch.Tensor, factor: float) -> torch.Tensor:
    """δ scaled into ||δ|| <= factor·||h|| per row, differentiably (the optimisation's clamp)."""
    limit = factor * h.norm(dim=1, keepdim=True)
    norm = delta.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return delta * torch.clamp(limit / norm, max=1.0)


def net_values(
    net: ValueNet, objective: ValueObjective, clamp_factor: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """δ after the network's steps (differentiable in its parameters), and the losses at δ = 0.

    Returns (δ (n, d), total loss at δ = 0 (n,), total loss at δ (n,)).
    """
    everyone = list(range(len(objective)))
    h = objective.h_init
    delta = torch.zeros_like(h)
    start: torch.Tensor | None = None
    for k in range(net.steps):
        leaf = delta.detach().requires_grad_(True)
        losses, _, _ = objective.losses(leaf, everyone)
        if start is None:
            start = losses.detach()
        (grad,) = torch.autograd.grad(losses.sum(), leaf)
        delta = clamped(delta + net.step(k, grad, h), h, clamp_factor)
    final, _, _ = objective.losses(delta, everyone)
    assert start is not None
    return delta, start, final


def train_value_net(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    config: NSEConfig,
    out: Path,
    settings: ValueTraining = ValueTraining(),
    provenance: dict[str, Any] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    resume: bool = True,
) -> ValueNet:
    """Train (or resume training) a value network for ``lm`` at ``config``'s z layer.

    ``lm`` must hold its base weights. ``progress(done, total, loss)`` is called after every
    batch. Returns the trained network, also saved in ``out``.
    """
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    net = ValueNet(block_width(lm), settings.steps, settings.first_step).to(lm.device)
    optimiser = torch.optim.Adam(
        [
            {"params": [net.direction], "lr": settings.lr},
            # two scalars per step, which must move by ~1 where P's entries move by ~0.01
            {"params": [net.step_size], "lr": settings.lr * settings.step_size_lr_factor},
        ]
    )
    batches = [
        [requests[i] for i in order[j : j + settings.batch]]
        for epoch in range(settings.epochs)
        for order in [_order(len(requests), settings.seed + epoch)]
        for j in range(0, len(order), settings.batch)
    ]
    done, curve = 0, []
    if resume and (out / TRAIN_META).is_file():
        done, curve = _resume(out, net, optimiser, settings)
        log.info("value net: resuming after %d of %d batches", done, len(batches))
    meta = {
        "settings": asdict(settings),
        "nse": {
            k: v
            for k, v in config.to_dict().items()
            if k.startswith("v_")
            or k in ("clamp_norm_factor", "kl_factor", "kl_prompt", "layers", "value_prefixes")
        },
        "z_layer": config.z_layer,
        "prefixes": list(config.prefixes[: config.value_prefixes]),
        "model": {"name": lm.name, "base_hash": lm.base_hash},
        "requests": len(requests),
        **(provenance or {}),
    }
    started = time.perf_counter()
    with frozen_parameters(lm.model), torch.enable_grad():
        for index in range(done, len(batches)):
            objective = ValueObjective(lm, batches[index], config.z_layer, config)
            delta, start, final = net_values(net, objective, config.clamp_norm_factor)
            size = (delta.norm(dim=1) / objective.h_init.norm(dim=1)) ** 2
            loss = (final + settings.size_weight * size).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            curve.append([index, float(start.mean()), float(loss.detach())])
            done = index + 1
            if progress is not None:
                progress(done, len(batches), float(loss.detach()))
            if done % settings.save_every == 0 or done == len(batches):
                _save(out, net, optimiser, done, curve, meta, time.perf_counter() - started)
    return net


def _order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _save(
    out: Path,
    net: ValueNet,
    optimiser: torch.optim.Optimizer,
    done: int,
    curve: list[list[float]],
    meta: dict[str, Any],
    seconds: float,
) -> None:
    """The network, then Adam's state and the position: a crash between them repeats batches."""
    net.save(out / NET_FILE, {**meta, "batches_done": done, "curve": curve})
    counters = {"batches_done": done, "curve": curve, "seconds": seconds}
    save_train_state(out, optimiser, {f"net.{k}": v for k, v in net.state_dict().items()}, counters)


def _resume(
    out: Path, net: ValueNet, optimiser: torch.optim.Optimizer, settings: ValueTraining
) -> tuple[int, list[list[float]]]:
    saved = {**asdict(ValueTraining()), **ValueNet.load(out / NET_FILE).meta.get("settings", {})}
    if saved != asdict(settings):  # a field added since the run started has its default
        raise ValueNetError(
            f"{out} holds a run with other settings ({saved}); use another folder or no resume"
        )
    loaded = load_train_state(out, optimiser)
    assert loaded is not None  # the caller saw its counters
    tensors, counters = loaded
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    return int(counters["batches_done"]), list(counters["curve"])


def training_requests(counterfact: int, zsre: int) -> list[EditRequest]:
    """The first ``counterfact`` CounterFact and ``zsre`` ZsRE train requests (never val/eval)."""
    from editing.datasets import load_dataset

    return load_dataset("counterfact", "train", limit=counterfact) + load_dataset(
        "zsre", "train", limit=zsre
    )


__all__ = [
    "NET_FILE",
    "ValueTraining",
    "clamped",
    "net_values",
    "train_value_net",
    "training_requests",
]

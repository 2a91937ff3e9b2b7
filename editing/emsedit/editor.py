"""EMSEdit as a factkeeper editor: K editing steps per batch, pure delta computation.

Each step captures keys and value gradients on the model as the previous steps left it, asks that
step's hypernetwork for one shift per module and writes it (spec section 4). The weights are
written as ``W0 + delta`` from a float32 master delta per module, and restored exactly before
``compute_deltas`` returns, so the editor contract holds: the model at the end equals the model at
the start, and the returned total deltas reproduce the last step's weights when applied.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from editing.adapters import ArchitectureAdapter, MlpRole
from editing.editors.base import EditError, Editor
from editing.emsedit.checkpoint import check_matches, default_checkpoint, load_editor
from editing.emsedit.config import EMSEditConfig, ModuleGroup
from editing.emsedit.keys import capture_keys_and_grads
from editing.emsedit.nets import HyperNetGroup
from editing.emsedit.shift import predict_shift
from editing.hooks import frozen_parameters
from editing.models import LoadedModel
from editing.requests import EditRequest, continuation
from editing.subject import encode_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditedModule:
    """One edited MLP matrix: where it is and its (d_in, d_out)."""

    name: str  # module name, e.g. model.layers.18.mlp.up_proj
    weight_key: str  # state-dict key of its weight
    role: MlpRole
    layer: int
    d_in: int
    d_out: int


def resolve_modules(lm: LoadedModel, config: EMSEditConfig) -> list[EditedModule]:
    """The config's module groups as concrete modules of ``lm``, in config order."""
    resolved = []
    n_layers = lm.adapter.num_layers(lm.model)
    for group in config.modules:
        role = MlpRole(group.role)
        for layer in group.layers:
            if layer >= n_layers:
                raise EditError(f"layer {layer} out of range: {lm.name} has {n_layers} layers")
            d_out, d_in = lm.adapter.weight_out_in(lm.model, role, layer).shape
            resolved.append(
                EditedModule(
                    name=lm.adapter.module_name(role, layer),
                    weight_key=lm.adapter.weight_name(role, layer),
                    role=role,
                    layer=layer,
                    d_in=d_in,
                    d_out=d_out,
                )
            )
    if len({m.name for m in resolved}) != len(resolved):
        raise EditError("the config names a module twice")
    return resolved


def parse_modules(spec: str) -> tuple[ModuleGroup, ...]:
    """``down3-7`` or ``up20-25+down3-7`` -> module groups (an option value of a method spec)."""
    groups = []
    for part in spec.split("+"):
        match = re.fullmatch(r"(gate|up|down)(\d+)(?:-(\d+))?", part.strip())
        if match is None:
            raise EditError(f"modules {spec!r}: each group is ROLE FIRST-LAST, e.g. down3-7")
        first = int(match.group(2))
        last = int(match.group(3) or first)
        groups.append(ModuleGroup(match.group(1), tuple(range(first, last + 1))))  # type: ignore[arg-type]
    return tuple(groups)


def build_group(modules: Sequence[EditedModule], config: EMSEditConfig) -> HyperNetGroup:
    """Untrained hypernetworks for ``modules`` (identity blocks, step size ``lr_init``)."""
    return HyperNetGroup(
        shapes={m.name: (m.d_in, m.d_out) for m in modules},
        ranks=[config.net_rank(i) for i in range(config.n_nets)],
        n_blocks=config.n_blocks,
        lr_init=config.lr_init,
        seed=config.seed,
    )


class WeightState:
    """The edited weights as ``W0 + delta`` with a float32 master delta per module.

    ``W0`` is an exact copy taken at construction; ``restore_`` writes it back bit for bit.
    Deltas are kept in the (out, in) orientation.
    """

    def __init__(self, lm: LoadedModel, modules: Sequence[EditedModule]) -> None:
        self.adapter: ArchitectureAdapter = lm.adapter
        self.modules = list(modules)
        self.views = {
            m.name: lm.adapter.weight_out_in(lm.model, m.role, m.layer) for m in self.modules
        }
        self.params: dict[str, nn.Parameter] = {
            m.name: lm.adapter.module(lm.model, m.role, m.layer).weight for m in self.modules
        }
        self.base = {n: v.detach().clone() for n, v in self.views.items()}  # (out, in) each
        self.delta = {
            n: torch.zeros(v.shape, dtype=torch.float32, device=v.device)
            for n, v in self.views.items()
        }

    @torch.no_grad()
    def add_shifts_(self, shifts: dict[str, torch.Tensor]) -> None:
        """delta += S^T for each module's S (d_in, d_out), then write W0 + delta."""
        for name, shift in shifts.items():
            self.delta[name] += shift.T.to(self.delta[name].device)  # (d_out, d_in)
            self._write(name)

    @torch.no_grad()
    def set_deltas_(self, deltas: dict[str, torch.Tensor]) -> None:
        """Replace the master deltas (out, in) and write the weights."""
        for name, delta in deltas.items():
            self.delta[name].copy_(delta)
            self._write(name)

    def _write(self, name: str) -> None:
        view = self.views[name]
        view.copy_((self.base[name].to(torch.float32) + self.delta[name]).to(view.dtype))

    @torch.no_grad()
    def restore_(self) -> None:
        """Write the exact original weights back."""
        for name, view in self.views.items():
            view.copy_(self.base[name])

    def reset_(self) -> None:
        """Zero the deltas and restore the original weights."""
        for delta in self.delta.values():
            delta.zero_()
        self.restore_()

    def stored_deltas(self) -> dict[str, torch.Tensor]:
        """Deltas keyed by state-dict key in the stored orientation, contiguous on CPU."""
        return {
            m.weight_key: self.adapter.to_stored(self.delta[m.name]).detach().cpu().contiguous()
            for m in self.modules
        }

    def grads_in_out(self, stored_grads: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Gradients w.r.t. the stored parameters as (d_in, d_out), the shape of a shift."""
        # to_stored is its own inverse (a transpose or nothing): stored -> (out, in);
        # then .T -> (in, out)
        return {
            m.name: self.adapter.to_stored(g).T
            for m, g in zip(self.modules, stored_grads, strict=True)
        }

    def drift_sq(self) -> torch.Tensor:
        """sum ||W - W0||_F^2 over modules, differentiable w.r.t. the parameters."""
        terms = [
            (view.float() - self.base[name].float()).pow(2).sum()
            for name, view in self.views.items()
        ]
        return torch.stack(terms).sum()


@dataclass
class StepRecord:
    """What one editing step saw and did, kept for the implicit backprop in training."""

    net_index: int
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (K (n, d_in), G (n, d_out))
    shifts: dict[str, torch.Tensor]  # module -> S (d_in, d_out)


def edit_pairs(requests: Sequence[EditRequest]) -> list[tuple[str, str]]:
    """(prompt, continuation) for the edit itself."""
    return [(r.prompt, continuation(r.target_new)) for r in requests]


def key_positions(
    lm: LoadedModel, config: EMSEditConfig, requests: Sequence[EditRequest]
) -> list[int] | None:
    """Per request, the position keys are read at; None: every answer token."""
    if config.key_position == "answer":
        return None
    return [encode_prompt(lm, "{}", r.prompt, r.subject).subject_index for r in requests]


def run_steps_(
    lm: LoadedModel,
    group: HyperNetGroup,
    config: EMSEditConfig,
    state: WeightState,
    pairs: Sequence[tuple[str, str]],
    *,
    steps: int,
    update_normalizer: bool,
    device: torch.device,
    positions: Sequence[int] | None = None,
) -> list[StepRecord]:
    """Apply ``steps`` editing steps to the model through ``state`` (weights stay changed).

    ``positions``: ``key_positions`` of the requests behind ``pairs``.
    """
    modules = {m.name: dict(lm.model.named_modules())[m.name] for m in state.modules}
    records = []
    for step in range(steps):
        net_index = step if config.mode == "sequential" else 0
        cache = capture_keys_and_grads(
            lm.model,
            modules,
            lm.tokenizer,
            pairs,
            config.lm_batch_size,
            device,
            config.grad_rows,
            positions,
        )
        if update_normalizer:
            for name, (keys, grads) in cache.items():
                net, _ = group.net(net_index, name)
                net.normalizer.update(torch.cat((keys, grads), dim=-1))  # (n, D)
        shifts = {}
        for name, (keys, grads) in cache.items():
            net, index = group.net(net_index, name)
            shifts[name] = predict_shift(net, index, keys, grads, config.hypernet_batch_size)
        state.add_shifts_(shifts)
        records.append(StepRecord(net_index, cache, shifts))
        if log.isEnabledFor(logging.DEBUG):
            norm = sum(float(s.norm()) for s in shifts.values())
            log.debug("emsedit step", extra={"step": step, "shift_norm": norm})
    return records


class EMSEditEditor(Editor):
    """EMSEdit (multi-step meta-learned editing) with a trained hypernetwork checkpoint.

    Args:
        checkpoint: folder of a trained editor (``editor.safetensors`` + ``editor.json``); None
            looks for the model's default checkpoint when the first edit comes.
        steps: editing steps per batch; None = the trained value (``emsedit:steps=1`` is the
            MALMEN-like ablation).
        device: where the hypernetwork runs (the LM stays where it is).
        untrained: no checkpoint: identity hypernetworks with step size ``lr_init`` (a step is
            the gradient direction aggregated by the ridge solve), for comparing edit sites
            before training for one, e.g. ``emsedit:untrained=true:modules=down3-7:
            key_position=subject``.
        overrides: ``EMSEditConfig`` fields for an untrained editor; ``modules`` as
            ``ROLE FIRST-LAST`` groups joined by ``+`` (``down3-7``, ``up20-25+down3-7``).
    """

    name: ClassVar[str] = "emsedit"
    supports_batch: ClassVar[bool] = True
    needs_training: ClassVar[bool] = True

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        steps: int | None = None,
        device: str | torch.device = "cpu",
        untrained: bool = False,
        **overrides: Any,
    ) -> None:
        self.device = torch.device(device)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.steps_override = steps
        self.config: EMSEditConfig | None = None
        self.group: HyperNetGroup | None = None
        self.modules: list[EditedModule] | None = None
        self.checkpoint_meta: dict[str, Any] | None = None
        self._resolved_for: int | None = None  # id of the model the modules were resolved on
        if overrides and not untrained:
            raise EditError(
                f"EMSEdit options {sorted(overrides)} need untrained=true: a trained checkpoint "
                "fixes its own configuration"
            )
        if untrained:
            if self.checkpoint is not None:
                raise EditError("untrained=true and a checkpoint exclude each other")
            values = dict(overrides)
            if "modules" in values:
                values["modules"] = parse_modules(str(values["modules"]))
            if steps is not None:
                values.setdefault("steps", steps)
            try:
                self.config = EMSEditConfig().replace(**values)
            except TypeError as exc:
                raise EditError(f"unknown EMSEdit option: {exc}") from None
        if self.checkpoint is not None:
            self._load(self.checkpoint)

    @classmethod
    def option_names(cls) -> frozenset[str]:
        return frozenset({"checkpoint", "steps", "device", "untrained"}) | frozenset(
            EMSEditConfig.__dataclass_fields__
        )

    @classmethod
    def from_config(
        cls,
        config: EMSEditConfig,
        *,
        group: HyperNetGroup | None = None,
        steps: int | None = None,
        device: str = "cpu",
    ) -> EMSEditEditor:
        """An editor from in-memory nets; ``group=None`` gives untrained ones (identity blocks,
        step size ``config.lr_init``), as used by tests and the module sweep."""
        editor = cls(steps=steps, device=device)
        editor.config = config
        editor.group = group.to(editor.device) if group is not None else None
        return editor

    def _load(self, folder: Path) -> None:
        loaded = load_editor(folder, device=self.device)
        self.config, self.group, self.checkpoint_meta = loaded.config, loaded.group, loaded.meta

    def _ensure_ready(self, lm: LoadedModel) -> None:
        if self.config is None:
            self.checkpoint = default_checkpoint(lm.name)
            self._load(self.checkpoint)
        assert self.config is not None
        if self.modules is None or self._resolved_for != id(lm.model):
            self.modules = resolve_modules(lm, self.config)
            self._resolved_for = id(lm.model)
            if self.group is None:
                self.group = build_group(self.modules, self.config).to(self.device)
            elif self.checkpoint_meta is not None:
                check_matches(self.checkpoint_meta, lm, self.modules)
        steps = self.steps
        if self.config.mode == "sequential" and steps > self.config.n_nets:
            raise EditError(
                f"{steps} steps asked but the checkpoint has {self.config.n_nets} step networks"
            )

    def edited_matrices(self, lm: LoadedModel) -> list[tuple[MlpRole, int]]:
        """The (role, layer) of every matrix the hypernetworks edit (loads the checkpoint)."""
        self._ensure_ready(lm)
        assert self.modules is not None
        return [(m.role, m.layer) for m in self.modules]

    @property
    def steps(self) -> int:
        assert self.config is not None
        return self.steps_override or self.config.steps

    def compute_deltas(
        self, lm: LoadedModel, requests: Sequence[EditRequest]
    ) -> dict[str, torch.Tensor]:
        """The total delta of all steps per edited weight; the model is left as it was."""
        if not requests:
            raise EditError("no requests")
        self._ensure_ready(lm)
        assert self.config is not None and self.group is not None and self.modules is not None
        state = WeightState(lm, self.modules)
        try:
            with frozen_parameters(lm.model):
                run_steps_(
                    lm,
                    self.group,
                    self.config,
                    state,
                    edit_pairs(requests),
                    steps=self.steps,
                    update_normalizer=self.config.update_normalizer_at_edit,
                    device=lm.device,
                    positions=key_positions(lm, self.config, requests),
                )
            return state.stored_deltas()
        finally:
            state.restore_()

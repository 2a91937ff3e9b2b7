"""EMSEdit's knobs in one frozen dataclass, checked when built and loadable from YAML.

Only the method's own settings live here (which modules, hypernetwork shape, meta-training
schedule); paths and devices are runtime arguments. The module imports no torch, so reading or
validating a config is cheap and a checkpoint's JSON round-trips through ``to_dict``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from editing.configfile import ConfigError, dataclass_from_mapping, read_yaml_mapping

Role = Literal["gate", "up", "down"]
Mode = Literal["sequential", "batch"]
Locality = Literal["norm", "kl"]
KeyPosition = Literal["answer", "subject"]


@dataclass(frozen=True)
class ModuleGroup:
    """One MLP role edited in a list of layers, e.g. ``up`` in layers 18..23."""

    role: Role
    layers: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.role not in ("gate", "up", "down"):
            raise ConfigError(f"modules.role must be gate, up or down, got {self.role!r}")
        if not self.layers or any(layer < 0 for layer in self.layers):
            raise ConfigError(f"modules.layers must be non-negative layer indices: {self.layers}")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"modules.layers has duplicates: {self.layers}")


@dataclass(frozen=True)
class EMSEditConfig:
    """Hyperparameters of EMSEdit (spec sections 2, 3 and 5)."""

    modules: tuple[ModuleGroup, ...] = (ModuleGroup("up", (20, 21, 22, 23, 24, 25)),)
    """Edited MLP matrices. Default for SmolLM2 chosen by the sweep in ``README.md``."""
    key_position: KeyPosition = "answer"
    """Where the edited matrices' keys and value gradients are read: ``answer``, every answer
    token (the reference); ``subject``, the subject's last token in the prompt (the
    locate-then-edit site: on SmolLM2's down_proj L3-7 unrelated edits' keys overlap 0.06 there
    against 0.48 at up_proj L20-25's last token, ``bench/results/key-overlap.json``)."""
    steps: int = 2
    """K: editing steps per batch (MSBP). The paper's ablation picks 2."""
    mode: Mode = "sequential"
    """``sequential``: one hypernetwork per step (rank // (i+1)); ``batch``: one shared net."""
    rank: int = 32
    """Rank of the blocks of step 0 (step i: rank // (i+1) in sequential mode). Reference: 1024
    for D ~ 18k; 32 keeps SmolLM2's (D = 2112) checkpoint at ~4 MB."""
    n_blocks: int = 4
    """Residual low-rank blocks per hypernetwork."""
    lr_init: float = 3.0e-4
    """Initial learned edit step size (per module). Reference: 1e-6 (for 6-8B models). On
    SmolLM2 untrained edits take from ~1e-3 but wreck locality when applied sequentially; 3e-4
    starts in between and training moves it (measurements in ``README.md``)."""
    meta_lr: float = 1.0e-5
    """Adam learning rate of the hypernetworks."""
    max_grad_norm: float = 1.0
    """Gradient clipping of all hypernetwork parameters."""
    reg_coef: float = 0.1
    """Weight of the L2 drift penalty sum ||W - W0||_F^2 (norm regulariser). Reference: 0.5
    (0.25 effective); on SmolLM2 that term outweighed the rephrase loss ~10x and drove the
    learned step size towards zero (``README.md``)."""
    reg_applied_twice: bool = True
    """Reference quirk: sequential training multiplies the penalty by reg_coef twice (0.25)."""
    locality: Locality = "norm"
    """``norm``: L2 drift penalty (EMSEdit); ``kl``: KL on locality prompts (MALMEN/RLEdit)."""
    loc_coef: float = 1.0
    """Weight of the KL term when ``locality == "kl"``."""
    edits_per_batch: int = 20
    """N: edits per training batch (turn)."""
    turns_per_sequence: int = 10
    """T: training turns applied to the drifting model before it is reset to the base weights."""
    opt_step_interval: int = 1
    """Adam step every this many batches; 0 = the reference's single step at the end of a run
    (faithful, but it leaves the nets one Adam step from their initialisation)."""
    lm_batch_size: int = 20
    """Prompts per LM forward/backward (memory and speed only). Reference: 4; one micro-batch
    per turn is ~1.6x faster on CPU."""
    grad_rows: int = 20
    """Value gradients are those of each request's mean answer CE divided by this, the same for
    a request alone or in any batch. The reference takes a mean over each micro-batch's tokens,
    which makes a lone edit's step many times larger; 20 keeps the shipped checkpoint's scale
    (it was trained on micro-batches of 20 requests)."""
    hypernet_batch_size: int = 128
    """Rows per hypernetwork chunk (memory only; the net is row-wise)."""
    update_normalizer_at_edit: bool = False
    """Reference behaviour is True (lifelong statistics). False keeps an edit a pure function of
    (weights, requests, checkpoint), which the journal's replay and revert need."""
    seed: int = 0
    """Seed of the hypernetwork initialisation and the training order."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Free-form provenance carried into the checkpoint JSON; never read by the algorithm."""

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (self.rank >= 1, "rank must be >= 1"),
            (self.n_blocks >= 0, "n_blocks must be >= 0"),
            (self.meta_lr > 0, "meta_lr must be > 0"),
            (self.max_grad_norm > 0, "max_grad_norm must be > 0"),
            (self.reg_coef >= 0, "reg_coef must be >= 0"),
            (self.loc_coef >= 0, "loc_coef must be >= 0"),
            (self.edits_per_batch >= 1, "edits_per_batch must be >= 1"),
            (self.turns_per_sequence >= 1, "turns_per_sequence must be >= 1"),
            (self.opt_step_interval >= 0, "opt_step_interval must be >= 0 (0 = once per run)"),
            (self.lm_batch_size >= 1, "lm_batch_size must be >= 1"),
            (self.grad_rows >= 1, "grad_rows must be >= 1"),
            (self.hypernet_batch_size >= 1, "hypernet_batch_size must be >= 1"),
            (self.mode in ("sequential", "batch"), "mode must be sequential or batch"),
            (self.locality in ("norm", "kl"), "locality must be norm or kl"),
            (self.key_position in ("answer", "subject"), "key_position must be answer or subject"),
            (bool(self.modules), "modules must name at least one module group"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"EMSEditConfig: {message}")
        if self.mode == "sequential" and self.rank // self.steps < 1:
            raise ConfigError(f"EMSEditConfig: rank {self.rank} too small for {self.steps} steps")

    @property
    def n_nets(self) -> int:
        """Hypernetworks held: one per step in sequential mode, one shared in batch mode."""
        return self.steps if self.mode == "sequential" else 1

    def net_rank(self, net_index: int) -> int:
        """Rank of hypernetwork ``net_index`` (1024, 512 in the reference's sequential mode)."""
        return self.rank // (net_index + 1) if self.mode == "sequential" else self.rank

    def replace(self, **changes: Any) -> EMSEditConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists instead of tuples)."""
        raw = dataclasses.asdict(self)
        raw["modules"] = [{"role": g.role, "layers": list(g.layers)} for g in self.modules]
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EMSEditConfig:
        values = dict(raw)
        if "modules" in values:
            try:
                values["modules"] = tuple(
                    ModuleGroup(g["role"], tuple(int(x) for x in g["layers"]))
                    for g in values["modules"]
                )
            except (KeyError, TypeError) as exc:
                raise ConfigError(
                    "EMSEditConfig: modules must be a list of {role, layers} mappings"
                ) from exc
        return dataclass_from_mapping(cls, values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> EMSEditConfig:
        """Read a YAML mapping of the fields above (the project's one YAML reader)."""
        return cls.from_dict(read_yaml_mapping(path))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

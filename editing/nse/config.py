"""NSE's knobs in one frozen dataclass, with the per-model presets in one table.

Only the method's own settings live here; the key-statistics corpus and token budget, paths and
devices are runtime objects (``editing.keystats.KeyStatistics``). The module imports no torch, so
a config is cheap to read and validate, and ``to_dict`` round-trips through a snapshot's JSON.
Hidden-state thresholds (``alpha``, ``upper_bound``) and ``lam`` are model-specific, hence the
presets: the reference's three models (spec section 5) and SmolLM2, chosen by the sweep recorded
in ``editing/nse/README.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editing.configfile import ConfigError, dataclass_from_mapping, read_yaml_mapping

# Fixed prefixes for key averaging and the value optimisation, replacing the reference's five
# continuations sampled from the model (seed words "The", "Therefore", "Because", "I", "You").
# A fixed list keeps every edit a pure function of (weights, request, config), which the
# journal's replay needs, and does not depend on a sampler. "{}" is where the prompt goes.
DEFAULT_PREFIXES: tuple[str, ...] = (
    "The following is a short note. {}",
    "Therefore, we looked it up again. {}",
    "Because of this, people often ask. {}",
    "I read about this in a book. {}",
    "You can find this in an encyclopedia. {}",
)


@dataclass(frozen=True)
class NSEConfig:
    """Hyperparameters of Neuron-level Sequential Editing (spec sections 2-5)."""

    layers: tuple[int, ...] = (3, 4, 5, 6, 7)
    """Layers whose MLP down-projection (W_out) is edited, lowest first; z lives at the last."""
    lam: float = 15000.0
    """λ, weight of the generic-key second moment C0 (per token) in the normal equations."""
    neuron_threshold: float = 0.8
    """p: keep the units holding this share of the batch's absolute key mass (1.0 = all)."""
    alpha: float = 2.0
    """Residual ||z - h|| at or below which a request counts as done (hidden-state units)."""
    upper_bound: float = 50.0
    """Residual at or above which a request is treated as an outlier and not edited."""
    max_iterations: int = 3
    """Residual checks per batch; editing passes = max_iterations - 1."""
    v_num_grad_steps: int = 25
    """Adam steps (at most this minus one updates) of the value optimisation."""
    v_lr: float = 0.5
    """Adam learning rate of δ."""
    v_weight_decay: float = 0.5
    """Weight of ||δ|| / ||h_init||² in the value loss."""
    clamp_norm_factor: float = 0.75
    """||δ|| is clamped to this multiple of ||h_init||."""
    kl_factor: float = 0.0625
    """Weight of the KL term on the "{subject} is a" prompt."""
    early_stop_loss: float = 0.05
    """The value optimisation stops once the total loss is below this."""
    stop_margin: float | None = None
    """When set, a request also stops once its target is the greedy continuation of every value
    prompt, each target token ahead of the best other token by this log-probability margin:
    the judge's criterion, with room for the contexts the prompts do not cover."""
    end_of_word: bool = False
    """When set, a target that ends in a word character must also end the word: the token after
    it must not continue it (the judge's whole-word rule: "Tamperei" is not "Tampere"). The
    loss gains the NLL of the word-ending tokens there, and ``stop_margin`` asks the best of
    them to lead the best continuing token by the margin too."""
    v_optimiser: str = "adam"
    """``adam``: the reference's Adam on δ (lr ``v_lr``). ``normalised``: each step moves δ by
    ``v_step``·||h_init|| against the gradient's direction (the untrained form of EMSEdit's
    multi-step value change). ``net``: the first steps come from the trained value network
    (``editing.nse.value_net``), then Adam goes on while the loss is above ``early_stop_loss``."""
    v_step: float = 0.25
    """Step of the ``normalised`` optimiser, as a share of ||h_init||."""
    value_net: str = ""
    """The value network's file for ``net``; empty: ``$FACTKEEPER_HOME/editors/<model>/`` if
    one was trained there, else the one shipped in ``editors/<model>/``."""
    prefixes: tuple[str, ...] = DEFAULT_PREFIXES
    """Prefix templates ("{}" = the prompt); the key is ½·plain + ½·mean over prefixes."""
    value_prefixes: int = 5
    """How many of ``prefixes`` the value optimisation uses besides the plain prompt."""
    kl_prompt: str = "{} is a"
    """KL prompt; "{}" is replaced by the subject."""
    batch_size: int = 64
    """Sequences per forward when collecting keys (memory only)."""
    value_chunk: int = 4
    """Requests whose value loss goes through one forward and backward: the autograd graph of
    the blocks above the z layer grows with it (a batch of 8 SmolLM2 requests in one took the
    process from 0.5 to 1.4 GB)."""

    def __post_init__(self) -> None:
        checks = [
            (bool(self.layers), "layers must name at least one layer"),
            (all(x >= 0 for x in self.layers), "layers must be non-negative"),
            (list(self.layers) == sorted(set(self.layers)), "layers must be ascending, unique"),
            (self.lam >= 0, "lam must be >= 0"),
            (0 < self.neuron_threshold <= 1, "neuron_threshold must be in (0, 1]"),
            (0 <= self.alpha < self.upper_bound, "need 0 <= alpha < upper_bound"),
            (self.max_iterations >= 2, "max_iterations must be >= 2 (one editing pass)"),
            (self.v_num_grad_steps >= 1, "v_num_grad_steps must be >= 1"),
            (self.v_lr > 0, "v_lr must be > 0"),
            (self.stop_margin is None or self.stop_margin >= 0, "stop_margin must be >= 0"),
            (
                self.v_optimiser in ("adam", "normalised", "net"),
                "v_optimiser must be adam, normalised or net",
            ),
            (self.v_step > 0, "v_step must be > 0"),
            (self.clamp_norm_factor > 0, "clamp_norm_factor must be > 0"),
            (all(p.count("{}") == 1 for p in self.prefixes), 'each prefix needs one "{}"'),
            (0 <= self.value_prefixes <= len(self.prefixes), "value_prefixes > len(prefixes)"),
            (self.kl_prompt.count("{}") == 1, 'kl_prompt needs one "{}"'),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.value_chunk >= 1, "value_chunk must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"NSEConfig: {message}")

    @property
    def z_layer(self) -> int:
        """The layer whose block output holds the target value z (the last edited one)."""
        return self.layers[-1]

    def replace(self, **changes: Any) -> NSEConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists instead of tuples)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NSEConfig:
        return dataclass_from_mapping(cls, raw)

    @classmethod
    def from_yaml(cls, path: str | Path) -> NSEConfig:
        """Read a YAML mapping of the fields above; unknown keys are an error."""
        return cls.from_dict(read_yaml_mapping(path))


# Per-model presets. The reference rows copy hparams/NSE/*.json (spec section 5); "smollm2"
# comes from the sweep in README.md; "tiny" fits the 4-layer random test models.
PRESETS: dict[str, NSEConfig] = {
    "smollm2": NSEConfig(
        layers=(3, 4, 5, 6, 7),
        lam=1500.0,  # the sweep's choice (editing/nse/README.md); 15 000 fit ~45 % of top-1
        neuron_threshold=0.8,
        alpha=10.0,
        upper_bound=200.0,
        value_prefixes=2,
    ),
    "gpt2-xl": NSEConfig(
        layers=(13, 14, 15, 16, 17),
        lam=10000.0,
        neuron_threshold=1.0,
        alpha=35.0,
        upper_bound=150.0,
        v_num_grad_steps=20,
        v_lr=0.5,
    ),
    "gpt-j-6b": NSEConfig(
        layers=(3, 4, 5, 6, 7, 8),
        lam=15000.0,
        neuron_threshold=0.8,
        alpha=15.0,
        upper_bound=100.0,
        v_num_grad_steps=25,
        v_lr=0.5,
    ),
    "llama3-8b": NSEConfig(
        layers=(4, 5, 6, 7, 8),
        lam=15000.0,
        neuron_threshold=1.0,
        alpha=2.5,
        upper_bound=50.0,
        v_num_grad_steps=25,
        v_lr=0.1,
    ),
    "tiny": NSEConfig(
        layers=(1, 2),
        lam=100.0,
        neuron_threshold=1.0,
        alpha=0.05,
        upper_bound=1.0e4,
        v_num_grad_steps=40,
        v_lr=0.5,
        clamp_norm_factor=4.0,
        value_prefixes=0,
    ),
}


def preset_for(model_name: str) -> NSEConfig:
    """The preset for a loaded model's name (``LoadedModel.name``; tiny test models map to tiny)."""
    key = "tiny" if model_name.startswith("tiny-") else model_name
    try:
        return PRESETS[key]
    except KeyError:
        raise ConfigError(
            f"no NSE preset for model {model_name!r} (known: {', '.join(sorted(PRESETS))}); "
            f"pass an NSEConfig explicitly"
        ) from None

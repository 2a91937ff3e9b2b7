"""Per-architecture facts that editors need: where the layers are and which MLP matrices to edit.

A model family is a row in ``ADAPTERS``; nothing else in the project branches on the family.
Editors work in one orientation, ``(out_features, in_features)`` like ``torch.nn.Linear``;
GPT-2's ``Conv1D`` stores ``(in, out)``, so the adapter converts at this boundary and asserts the
shape instead of guessing it from the dimensions (a square matrix would make a guess ambiguous).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

from editing.errors import FactkeeperError


class Layout(Enum):
    """How a family stores an MLP matrix."""

    OUT_IN = "out_in"  # torch.nn.Linear: weight is (out_features, in_features)
    IN_OUT = "in_out"  # transformers Conv1D (GPT-2): weight is (in_features, out_features)


class MlpRole(Enum):
    """The MLP matrices an editor may touch."""

    GATE = "gate"  # gated families only: hidden -> intermediate, through the activation
    UP = "up"  # hidden -> intermediate
    DOWN = "down"  # intermediate -> hidden; its input is the "key", its output the "value"


class AdapterError(FactkeeperError):
    """The model's family is unknown, or a module does not have the shape the table promises."""


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where one family keeps its transformer blocks and MLP matrices."""

    family: str
    layers_path: str  # attribute path of the ModuleList of blocks
    mlp_paths: dict[MlpRole, str]  # module path inside one block, per role
    layout: Layout
    hidden_size_attr: str
    intermediate_size_attr: str | None  # None: 4 * hidden (GPT-2's n_inner default)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _get_attr_path(model, self.layers_path)

    def roles(self) -> tuple[MlpRole, ...]:
        return tuple(self.mlp_paths)

    def module_name(self, role: MlpRole, layer: int) -> str:
        """Fully qualified module name, e.g. ``model.layers.7.mlp.down_proj``."""
        if role not in self.mlp_paths:
            raise AdapterError(f"{self.family} has no {role.value} matrix")
        return f"{self.layers_path}.{layer}.{self.mlp_paths[role]}"

    def module(self, model: nn.Module, role: MlpRole, layer: int) -> nn.Module:
        return _get_attr_path(model, self.module_name(role, layer))

    def dims(self, config: Any) -> tuple[int, int]:
        """(hidden, intermediate) sizes from a transformers config."""
        hidden = int(getattr(config, self.hidden_size_attr))
        inner = (
            getattr(config, self.intermediate_size_attr) if self.intermediate_size_attr else None
        )
        return hidden, int(inner) if inner is not None else 4 * hidden

    def expected_shape(self, config: Any, role: MlpRole) -> tuple[int, int]:
        """(out, in) of a role's matrix in the editors' orientation."""
        hidden, inner = self.dims(config)
        return (hidden, inner) if role is MlpRole.DOWN else (inner, hidden)

    def weight_out_in(self, model: nn.Module, role: MlpRole, layer: int) -> torch.Tensor:
        """The stored weight as an (out, in) view: writes through it change the model."""
        weight = self.module(model, role, layer).weight
        view = weight.T if self.layout is Layout.IN_OUT else weight
        expected = self.expected_shape(model.config, role)
        if tuple(view.shape) != expected:
            raise AdapterError(
                f"{self.module_name(role, layer)}: (out, in) shape {tuple(view.shape)}, "
                f"expected {expected} for {self.family}"
            )
        return view

    def weight_name(self, role: MlpRole, layer: int) -> str:
        """The state-dict key of that weight (what snapshots and deltas are keyed by)."""
        return f"{self.module_name(role, layer)}.weight"

    def to_stored(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        """An (out, in) delta in the stored orientation, for saving next to state-dict keys."""
        return delta_out_in.T if self.layout is Layout.IN_OUT else delta_out_in

    def to_out_in(self, stored: torch.Tensor) -> torch.Tensor:
        """A stored-orientation tensor (a weight or a delta) as (out, in): ``to_stored``'s
        inverse."""
        return stored.T if self.layout is Layout.IN_OUT else stored


ADAPTERS: dict[str, ArchitectureAdapter] = {
    "llama": ArchitectureAdapter(
        family="llama",
        layers_path="model.layers",
        mlp_paths={
            MlpRole.GATE: "mlp.gate_proj",
            MlpRole.UP: "mlp.up_proj",
            MlpRole.DOWN: "mlp.down_proj",
        },
        layout=Layout.OUT_IN,
        hidden_size_attr="hidden_size",
        intermediate_size_attr="intermediate_size",
    ),
    "qwen2": ArchitectureAdapter(
        family="qwen2",
        layers_path="model.layers",
        mlp_paths={
            MlpRole.GATE: "mlp.gate_proj",
            MlpRole.UP: "mlp.up_proj",
            MlpRole.DOWN: "mlp.down_proj",
        },
        layout=Layout.OUT_IN,
        hidden_size_attr="hidden_size",
        intermediate_size_attr="intermediate_size",
    ),
    "gpt2": ArchitectureAdapter(
        family="gpt2",
        layers_path="transformer.h",
        mlp_paths={MlpRole.UP: "mlp.c_fc", MlpRole.DOWN: "mlp.c_proj"},
        layout=Layout.IN_OUT,
        hidden_size_attr="n_embd",
        intermediate_size_attr="n_inner",
    ),
}


def adapter_for(model_or_config: Any) -> ArchitectureAdapter:
    """The adapter for a model (or its config), by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    family = getattr(config, "model_type", None)
    try:
        return ADAPTERS[family]
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise AdapterError(f"no adapter for model type {family!r}; known: {known}") from None


def _get_attr_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj

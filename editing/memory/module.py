"""The fact memory as a module of the model: rows of (key, value, threshold) that fire on a match.

Each row is one edited fact. At block ``key_layer`` every token position's MLP activation (the
input of the down-projection) is compared with every row's key by cosine; where it reaches the
row's threshold, the row's value is added to block ``value_layer``'s output at that position.
A fact's key is read at its subject's last token, so the value is added wherever the model has
just read that subject, in any context, and nowhere else: other knowledge passes untouched.
At that layer the last token still says more about itself than about the words before it
("Robert Boulter" reads like "Kelly Boulter"), so a subject of several tokens also has a *lead*
key, its first token, that the position as many tokens back must match too.

The rows are ordinary parameters of the model (``<block key_layer>.fact_memory.keys`` ...), all
zero in the base model (an empty row never fires: its threshold is 0). So an edit is a weight
delta like any other editor's: ``write_deltas`` writes it, ``undo`` restores it, snapshots and
the journal carry it, and evaluation that resumes from the lowest changed block starts at
``key_layer``, where the memory reads.

The module owns its hooks for as long as it is attached (they are its forward): a pre-hook on
the key block notes the token positions, a pre-hook on the key layer's down-projection reads,
a hook on the value layer's block adds. One more, on the model body, forgets a pending addition
at the start of every forward, so a forward that was stopped between the two blocks can never
leak its addition into the next one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from editing.adapters import MlpRole
from editing.errors import EditError
from editing.models import LoadedModel

MODULE_NAME = "fact_memory"
EARLY_POSITIONS = 4
"""Token positions below this are centred on their own corpus mean; later ones share one."""


class FactMemory(nn.Module):
    """Rows of key (d_ff), value (d) and threshold; all zero = empty."""

    def __init__(
        self, key_width: int, value_width: int, capacity: int, key_layer: int, value_layer: int
    ) -> None:
        super().__init__()
        self.key_layer, self.value_layer = key_layer, value_layer
        self.keys = nn.Parameter(torch.zeros(capacity, key_width), requires_grad=False)
        self.values = nn.Parameter(torch.zeros(capacity, value_width), requires_grad=False)
        self.thresholds = nn.Parameter(torch.zeros(capacity), requires_grad=False)
        # The subject's first token, ``lead_offsets`` tokens before its last one; a row with
        # lead threshold 0 has no lead.
        self.lead_keys = nn.Parameter(torch.zeros(capacity, key_width), requires_grad=False)
        self.lead_thresholds = nn.Parameter(torch.zeros(capacity), requires_grad=False)
        self.lead_offsets = nn.Parameter(torch.zeros(capacity), requires_grad=False)
        self.centres = nn.Parameter(
            torch.zeros(EARLY_POSITIONS + 1, key_width), requires_grad=False
        )
        self._positions: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None
        self._handles: list[Any] = []

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[0])

    def used_rows(self) -> torch.Tensor:
        """Indices of the rows that hold a fact."""
        return (self.thresholds > 0).nonzero().flatten()

    def free_rows(self, n: int) -> list[int]:
        """The first ``n`` empty rows; EditError when there are fewer."""
        free = (self.thresholds <= 0).nonzero().flatten()[:n].tolist()
        if len(free) < n:
            raise EditError(
                f"the fact memory is full ({self.capacity} rows, {n} needed): consolidate, "
                f"remove edits or raise its capacity"
            )
        return free

    def unit_keys(
        self,
        activations: torch.Tensor,
        positions: torch.Tensor,
        centres: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Activations (B, T, d_ff) at token ``positions`` (B, T) as unit vectors after taking
        away the corpus mean of their position (``centres``, default the memory's): the first
        tokens of any text share a large component of their own (attention sinks), which would
        make them all look alike."""
        means = self.centres if centres is None else centres.to(self.centres)
        slot = positions.clamp(0, EARLY_POSITIONS).to(activations.device)
        centred = activations.to(self.centres.dtype) - means[slot]
        return centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    def fired(self, activations: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, T, capacity) bool: the rows that fire at each position. A row with a lead key
        fires only where its sequence's token ``lead_offsets`` back, if this forward holds it
        (not so for a token decoded alone), matches it too."""
        keys = self.unit_keys(activations, positions)  # (B, T, d_ff)
        fired = (keys @ self.keys.T >= self.thresholds) & (self.thresholds > 0)
        led = self.lead_thresholds > 0  # (capacity,)
        hits = (fired & led).nonzero()  # (k, 3): batch, position, row; few
        for b, t, row in hits.tolist():
            at = _ancestor(positions[b], t, int(positions[b, t]) - int(self.lead_offsets[row]))
            lead = -1.0 if at is None else float(keys[b, at] @ self.lead_keys[row])
            fired[b, t, row] = lead >= float(self.lead_thresholds[row])
        return fired

    def read(self, activations: torch.Tensor) -> None:
        """Key-layer pre-hook body: compute what the value layer must add at each position."""
        positions, self._positions = self._positions, None
        batch, length = activations.shape[:2]
        if positions is None or positions.shape[-1] != length:
            positions = torch.arange(length)
        positions = positions.expand(batch, length)
        fired = self.fired(activations, positions)  # (B, T, capacity)
        self._pending = fired.to(self.values.dtype) @ self.values if fired.any() else None

    def add(self, hidden: torch.Tensor) -> torch.Tensor:
        """Value-layer hook body: the block output plus the fired rows' values."""
        pending, self._pending = self._pending, None
        if pending is None or pending.shape[:-1] != hidden.shape[:-1]:
            return hidden
        return hidden + pending.to(hidden.dtype)

    def forget(self) -> None:
        self._pending = None
        self._positions = None


def _ancestor(positions: torch.Tensor, t: int, position: int) -> int | None:
    """The index of the token at ``position`` in the sequence of index ``t``: the last index
    before ``t`` holding that position id. This holds for padded rows, for sequences packed one
    after another and for prefix-sharing packing in depth-first order (``editing.scoring``),
    where a token's ancestor at a depth is the latest token of that depth before it."""
    if position < 0:
        return None
    earlier = (positions[:t] == position).nonzero()
    return int(earlier[-1]) if len(earlier) else None


def memory_of(lm: LoadedModel) -> FactMemory | None:
    """The memory attached to ``lm``, if any."""
    for module in lm.model.modules():
        if isinstance(module, FactMemory):
            return module
    return None


def attach_memory(lm: LoadedModel, key_layer: int, value_layer: int, capacity: int) -> FactMemory:
    """Give ``lm`` an empty fact memory, or return the one it has if it has the same shape.

    Call it before the base weights are copied or compared (the bench's reset, the daemon's
    snapshots): its rows are parameters whose base value is zero.
    """
    existing = memory_of(lm)
    if existing is not None:
        if (existing.key_layer, existing.value_layer, existing.capacity) != (
            key_layer,
            value_layer,
            capacity,
        ):
            raise EditError(
                f"the model's fact memory reads layer {existing.key_layer}, writes layer "
                f"{existing.value_layer} and has {existing.capacity} rows; this editor wants "
                f"{key_layer}, {value_layer} and {capacity}"
            )
        return existing
    blocks = lm.adapter.layers(lm.model)
    if value_layer >= len(blocks):
        raise EditError(f"the model has {len(blocks)} blocks; no value layer {value_layer}")
    hidden, d_ff = lm.adapter.dims(lm.model.config)
    memory = FactMemory(d_ff, hidden, capacity, key_layer, value_layer).to(lm.device)
    blocks[key_layer].add_module(MODULE_NAME, memory)
    down = lm.adapter.module(lm.model, MlpRole.DOWN, key_layer)

    def positions(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        given = kwargs.get("position_ids")
        memory._positions = given.detach() if isinstance(given, torch.Tensor) else None

    def read(_module: nn.Module, args: tuple) -> None:
        memory.read(args[0])

    def add(_module: nn.Module, _args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (memory.add(output[0]), *output[1:])
        return memory.add(output)

    def forget(_module: nn.Module, _args: tuple) -> None:
        memory.forget()

    memory._handles = [
        lm.model.base_model.register_forward_pre_hook(forget),
        blocks[key_layer].register_forward_pre_hook(positions, with_kwargs=True),
        down.register_forward_pre_hook(read),
        # First in line, so hooks that capture the block's output see the memory's addition.
        blocks[value_layer].register_forward_hook(add, prepend=True),
    ]
    return memory


def added_parameter_names(lm: LoadedModel) -> list[str]:
    """The parameters of ``lm`` that its base weights do not have (those of a fact memory)."""
    return [name for name, _ in lm.model.named_parameters() if f".{MODULE_NAME}." in name]


ROW_ATTRS = ("keys", "values", "thresholds", "lead_keys", "lead_thresholds", "lead_offsets")
"""The parameters that hold a row, one entry per fact each."""


def memory_parameter_names(lm: LoadedModel, memory: FactMemory) -> dict[str, str]:
    """Each row attribute (``keys`` ... ``lead_thresholds``, ``centres``) -> its parameter name."""
    names = {id(p): n for n, p in lm.model.named_parameters()}
    attrs = (*ROW_ATTRS, "centres")
    return {attr: names[id(getattr(memory, attr))] for attr in attrs}

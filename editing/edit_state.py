"""What a sequential editor must remember between batches: the original weights of the matrices
it edits, the keys of every past edit, and the per-request targets computed on the original
weights.

NSE and the safeguards around other editors both need it: "weights rewinding" swaps the original
matrices in while targets are computed, and the least-squares update protects past edits through
M = Σ k kᵀ over their keys. The state is an object passed to the editor (never a module global),
keyed to the base weights by ``base_hash``, and saved as one safetensors file whose header holds
JSON metadata, so a daemon snapshot can store it next to the weight deltas and a replay can start
from it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from editing.adapters import MlpRole
from editing.errors import FactkeeperError
from editing.models import LoadedModel

log = logging.getLogger(__name__)

FORMAT = "factkeeper-edit-state/1"


class EditStateError(FactkeeperError):
    """The state does not belong to this model, or its file is unreadable."""


@dataclass
class EditState:
    """Original matrices, past-edit key memory and cached targets of one edited model."""

    base_hash: str
    role: MlpRole
    originals: dict[int, torch.Tensor]  # layer -> (out, in) float copy of the base matrix
    memory: dict[int, torch.Tensor]  # layer -> (d_in, d_in) float64 Σ_past k kᵀ
    targets: dict[str, torch.Tensor] = field(default_factory=dict)  # cache key -> (d,) float32
    edits_seen: int = 0  # requests whose keys entered the memory

    @classmethod
    def from_model(
        cls, lm: LoadedModel, layers: Sequence[int], role: MlpRole = MlpRole.DOWN
    ) -> EditState:
        """Snapshot the matrices of ``layers`` as the originals. Call it on the base weights."""
        originals, memory = {}, {}
        for layer in layers:
            weight = lm.adapter.weight_out_in(lm.model, role, layer)  # (out, in)
            originals[layer] = weight.detach().to("cpu", copy=True).contiguous()
            memory[layer] = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64)
        return cls(lm.base_hash, role, originals, memory)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.originals))

    def check(self, lm: LoadedModel, layers: Sequence[int]) -> None:
        """Raise unless this state belongs to ``lm``'s base weights and covers ``layers``."""
        if lm.base_hash != self.base_hash:
            raise EditStateError(
                f"edit state is for base weights {self.base_hash[:12]}, the model has "
                f"{lm.base_hash[:12]}: load the state saved with this model's snapshot"
            )
        missing = sorted(set(layers) - set(self.originals))
        if missing:
            raise EditStateError(f"edit state holds no original weights for layers {missing}")

    @contextlib.contextmanager
    def rewound(self, lm: LoadedModel) -> Iterator[None]:
        """Inside the block the edited matrices hold their original values; restored on exit."""
        current = {}
        with torch.no_grad():
            try:
                for layer, original in self.originals.items():
                    view = lm.adapter.weight_out_in(lm.model, self.role, layer)
                    current[layer] = view.detach().clone()
                    view.copy_(original.to(view.device, view.dtype))
                yield
            finally:
                for layer, value in current.items():
                    lm.adapter.weight_out_in(lm.model, self.role, layer).copy_(value)

    def add_keys_(self, keys: dict[int, torch.Tensor]) -> None:
        """M[layer] += K Kᵀ for keys (d_in, n) per layer."""
        n = None
        for layer, k in keys.items():
            k64 = k.double().cpu()
            self.memory[layer] += k64 @ k64.T  # (d_in, n) @ (n, d_in)
            n = k.shape[1]
        self.edits_seen += int(n or 0)

    def memory_copy(self) -> dict[int, torch.Tensor]:
        """Exact copies of M, to restore on undo."""
        return {layer: m.clone() for layer, m in self.memory.items()}

    def restore_memory_(self, memory: dict[int, torch.Tensor], edits_seen: int) -> None:
        self.memory = {layer: m.clone() for layer, m in memory.items()}
        self.edits_seen = edits_seen

    # --- serialisation: one safetensors file, JSON metadata in its header -----------------------

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Flat tensor dict and string metadata, as ``safetensors`` stores them."""
        tensors: dict[str, torch.Tensor] = {}
        for layer, w in self.originals.items():
            tensors[f"original.{layer}"] = w.contiguous()
        for layer, m in self.memory.items():
            tensors[f"memory.{layer}"] = m.contiguous()
        for key, z in self.targets.items():
            tensors[f"target.{key}"] = z.contiguous()
        meta = {
            "format": FORMAT,
            "base_hash": self.base_hash,
            "role": self.role.value,
            "edits_seen": str(self.edits_seen),
        }
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> EditState:
        if meta.get("format") != FORMAT:
            raise EditStateError(f"not an edit state (format {meta.get('format')!r})")
        groups: dict[str, dict[str, torch.Tensor]] = {"original": {}, "memory": {}, "target": {}}
        for name, value in tensors.items():
            kind, _, key = name.partition(".")
            if kind not in groups:
                raise EditStateError(f"unexpected tensor {name!r} in edit state")
            groups[kind][key] = value
        return cls(
            base_hash=meta["base_hash"],
            role=MlpRole(meta["role"]),
            originals={int(k): v for k, v in groups["original"].items()},
            memory={int(k): v for k, v in groups["memory"].items()},
            targets=dict(groups["target"]),
            edits_seen=int(meta["edits_seen"]),
        )

    def save(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        """Write the state; ``extra`` (e.g. the resolved editor config) goes into the header."""
        tensors, meta = self.to_tensors()
        if extra:
            meta["extra"] = json.dumps(extra, sort_keys=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> EditState:
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise EditStateError(f"cannot read edit state {path}: {exc}") from exc
        return cls.from_tensors(tensors, meta)

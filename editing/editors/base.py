"""The contract every editor meets, and the one place weights are written.

An editor *computes* weight deltas for a batch of requests without changing the model
(``compute_deltas``: the model at the end equals the model at the start); ``apply`` then writes
them and keeps the exact previous values, so ``undo`` restores the weights bit for bit. The
journal, replay and revert depend on that split.
"""

from __future__ import annotations

import hashlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from editing.errors import EditError
from editing.models import LoadedModel
from editing.requests import EditRequest

if TYPE_CHECKING:
    from editing.keystats import KeyStatistics, ProgressCallback

OriginalWeights = Callable[[str], torch.Tensor]
"""State-dict key -> that parameter's base (unedited) value, in the stored orientation."""


@dataclass
class EditResult:
    """What an applied edit changed, enough to undo it exactly and to journal it."""

    deltas: dict[str, torch.Tensor]  # state-dict key -> new - old, stored orientation
    previous: dict[str, torch.Tensor]  # state-dict key -> exact pre-edit tensor
    seconds: float
    info: dict[str, object] = field(default_factory=dict)

    def delta_norms(self) -> dict[str, float]:
        """Frobenius norm of each module's delta (journal column and metric)."""
        return {name: float(d.norm()) for name, d in self.deltas.items()}

    def delta_sha256(self) -> str:
        """sha256 over the deltas' exact bytes (names, dtypes and shapes too), in name order:
        the journal keeps it so replay can prove it rebuilt the same weights."""
        return deltas_sha256(self.deltas)


@dataclass(frozen=True)
class EditMaterial:
    """What ``consolidate`` needs to re-place one request without recomputing it (NSE: the
    target value z, found by an optimisation on the original weights), computed once when the
    request is first edited. ``fingerprint`` names everything the tensors depend on besides the
    base weights (the request and the editor's settings), so material made under other settings
    is never used."""

    fingerprint: str
    tensors: dict[str, torch.Tensor]

    def sha256(self) -> str:
        """The tensors' ``deltas_sha256`` bound to the fingerprint: what the journal keeps."""
        step = f"{self.fingerprint}|{deltas_sha256(self.tensors)}"
        return hashlib.sha256(step.encode("utf-8")).hexdigest()


def deltas_sha256(deltas: Mapping[str, torch.Tensor]) -> str:
    """sha256 over ``name|dtype|shape|`` and the raw bytes of each tensor, sorted by name."""
    digest = hashlib.sha256()
    for name in sorted(deltas):
        t = deltas[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class Editor(ABC):
    """A knowledge editor. Capabilities are class attributes, not entries in another list."""

    name: ClassVar[str]
    supports_batch: ClassVar[bool] = True
    needs_training: ClassVar[bool] = False
    replay_bit_exact: ClassVar[bool] = True
    """Replaying the same requests on the same weights gives bit-identical deltas."""
    keeps_edit_memory: ClassVar[bool] = False
    """The editor's deltas depend on state beyond the weights (original weights, a memory of
    past edits' keys) that the daemon must set up and rebuild for it."""
    supports_consolidation: ClassVar[bool] = False
    """``consolidate`` places a whole set of requests jointly from the base weights (one solve),
    instead of one batch on top of the drift of all earlier ones."""

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """The keyword options a method spec (``ft:num_steps=40``) or the daemon's
        ``editor.options`` may give: the fields of the editor's config and its other scalar
        constructor options. The daemon refuses any other name when its settings load."""
        return frozenset()

    @abstractmethod
    def compute_deltas(
        self, lm: LoadedModel, requests: Sequence[EditRequest]
    ) -> dict[str, torch.Tensor]:
        """Deltas (state-dict key -> tensor in the stored orientation); must not change ``lm``."""

    def apply(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> EditResult:
        """Compute and write the deltas for ``requests``; all of them or none."""
        if not requests:
            raise EditError("no requests to apply")
        if len(requests) > 1 and not self.supports_batch:
            raise EditError(f"{self.name} edits one request at a time, got {len(requests)}")
        started = time.perf_counter()
        deltas = self.compute_deltas(lm, requests)
        previous = write_deltas(lm.model, deltas)
        return EditResult(deltas, previous, time.perf_counter() - started)

    def undo(self, lm: LoadedModel, result: EditResult) -> None:
        """Restore the weights ``result`` changed to their exact previous values."""
        restore(lm.model, result.previous)

    def consolidate(self, lm: LoadedModel, held: Sequence[EditRequest]) -> EditResult:
        """Place every request of ``held`` jointly and write the result, like ``apply``.

        The caller first sets the edited matrices to their base weights, so the result's deltas
        are relative to the base: the edited weights become a function of the live set alone,
        without the interference that sequential batches accumulate. An editor that keeps a
        memory of past edits resets it to ``held``.
        """
        raise EditError(f"{self.name} has no joint solve to consolidate with")

    def edit_material(
        self, lm: LoadedModel, requests: Sequence[EditRequest]
    ) -> dict[str, EditMaterial]:
        """Per request id, the material ``consolidate`` would otherwise recompute; empty for an
        editor whose joint solve needs nothing beyond the requests (FT-L)."""
        return {}

    def take_material(self, lm: LoadedModel, request: EditRequest, material: EditMaterial) -> bool:
        """Use stored material for ``request``; False when it was made under other settings."""
        return False

    # -- the state of editors that keep a memory (``keeps_edit_memory``); no-ops otherwise --

    def set_originals(self, originals: OriginalWeights) -> None:
        """Where the base values come from, so the editor never mistakes edited weights (after a
        restart or a version load) for the originals; the daemon passes its base weights."""
        return None

    def set_statistics(self, stats: KeyStatistics) -> None:
        """Where the key statistics (C0) come from (the daemon's home and corpus)."""
        return None

    def prepare_statistics(
        self, lm: LoadedModel, on_progress: ProgressCallback | None = None
    ) -> int:
        """Compute or load every key statistic the edits will need, before the first edit, on
        the base weights; returns how many matrices need one."""
        return 0

    def reset_memory(self, lm: LoadedModel, held: Sequence[EditRequest]) -> None:
        """The weights were just set to hold exactly ``held`` (a version load, a rollback): make
        the memory of past edits say the same before anything is applied on top."""
        return None

    def prepare_model(self, lm: LoadedModel) -> object:
        """Add to ``lm`` the parameters this editor writes besides the model's own (the fact
        memory's rows, zero in the base model). Call it before base weights are copied."""
        return None

    def variant(self, method: str, **options: Any) -> Editor | None:
        """An editor of ``method`` with ``options`` that shares this one's originals, statistics
        and memory of past edits, so it can retry an edit (a rung of the daemon's retry ladder)
        without its memory missing what either applies; None when there is no such editor."""
        return None


def write_deltas(
    model: torch.nn.Module, deltas: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Add each delta to its parameter; return the exact previous values. All or nothing."""
    params = dict(model.named_parameters())
    for name, delta in deltas.items():
        if name not in params:
            raise EditError(f"delta for unknown parameter {name}")
        if params[name].shape != delta.shape:
            raise EditError(
                f"{name}: delta {tuple(delta.shape)} != weight {tuple(params[name].shape)}"
            )
        if not torch.isfinite(delta).all():
            raise EditError(f"{name}: delta has non-finite values")
    previous = {name: params[name].detach().clone() for name in deltas}
    with torch.no_grad():
        for name, delta in deltas.items():
            # Accumulate in float32 at least: tiny shifts vanish when added in half precision.
            weight = params[name]
            updated = weight.to(torch.float32) + delta.to(weight.device, torch.float32)
            weight.copy_(updated.to(weight.dtype))
    return previous


def restore(model: torch.nn.Module, previous: Mapping[str, torch.Tensor]) -> None:
    """Copy saved tensors back into their parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in previous.items():
            params[name].copy_(value)

"""Each applied event's edit material, kept beside the journal for consolidation.

A consolidation re-solves every live correction from the base weights. What it needs per event
is what the editor computed against the original weights when the event was first applied
(``Editor.edit_material``: NSE's target value z, the result of a 25-step optimisation); without
it, a consolidation after a restart would redo that optimisation for every live event. One
safetensors file per event (``<journal>.material/<sha256 of event id>.safetensors``), written
durably before the event's journal row, whose ``material_sha256`` column names it
(``EditMaterial.sha256``). Like the unit deltas, a file is used only when it hashes to the
journal's value; a missing or mismatching one is reported and the editor recomputes. Bounded:
a SmolLM2 z is 576 float32 values (2.3 KiB plus the header).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

from safetensors import SafetensorError, safe_open

from daemon.records.unit_deltas import SUFFIX, unlink_quietly, write_durably
from editing.editors.base import EditMaterial

log = logging.getLogger(__name__)

FORMAT = "factkeeper-edit-material/1"


def store_dir_for(journal_path: Path) -> Path:
    """``<journal>.material``: where the material of the journal at ``journal_path`` lives."""
    return journal_path.with_name(journal_path.name + ".material")


def file_stem(event_id: str) -> str:
    return hashlib.sha256(event_id.encode("utf-8")).hexdigest()


class MaterialStore:
    """The material files of one journal; used by the daemon's loop thread only."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def beside(cls, journal_path: Path) -> MaterialStore:
        return cls(store_dir_for(journal_path))

    def path_for(self, event_id: str) -> Path:
        return self.folder / (file_stem(event_id) + SUFFIX)

    def try_write(self, event_id: str, material: EditMaterial) -> str | None:
        """Store ``material`` durably; its sha256 for the journal row, or None when it could
        not be written (logged: it only costs a consolidation one recomputation)."""
        tensors = {k: t.detach().to("cpu").contiguous() for k, t in material.tensors.items()}
        meta = {"format": FORMAT, "event_id": event_id, "fingerprint": material.fingerprint}
        try:
            write_durably(self.path_for(event_id), tensors, meta)
        except (OSError, SafetensorError, ValueError) as exc:
            log.warning("edit material of %s not stored: %s", event_id, exc)
            return None
        return EditMaterial(material.fingerprint, tensors).sha256()

    def read(self, event_id: str, expected_sha256: str) -> EditMaterial | None:
        """The stored material of ``event_id`` if it hashes to ``expected_sha256``; else None
        (missing, unreadable, another event's, or changed since), with the reason logged."""
        path = self.path_for(event_id)
        if not path.is_file():
            log.info("no stored edit material for %s", event_id)
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
        except (OSError, SafetensorError, ValueError) as exc:
            log.warning("edit material of %s unreadable: %s", event_id, exc)
            return None
        if meta.get("format") != FORMAT or meta.get("event_id") != event_id:
            log.warning("%s is not the edit material of %s", path.name, event_id)
            return None
        material = EditMaterial(meta.get("fingerprint", ""), tensors)
        if material.sha256() != expected_sha256:
            log.warning("edit material of %s does not hash to the journal's", event_id)
            return None
        return material

    def prune(self, keep: Iterable[str]) -> int:
        """Remove the files of every event not in ``keep`` (no longer live); returns how many."""
        if not self.folder.is_dir():
            return 0
        wanted = {file_stem(event_id) + SUFFIX for event_id in keep}
        removed = sum(
            unlink_quietly(path)
            for path in self.folder.iterdir()
            if path.is_file() and path.name not in wanted
        )
        if removed:
            log.info("edit material pruned", extra={"removed": removed, "kept": len(wanted)})
        return removed

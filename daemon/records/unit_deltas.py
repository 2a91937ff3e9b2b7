"""Each journaled unit's weight change, kept beside the journal so replay need not re-edit.

Replay used to recompute every journaled edit with the editor (49 SmolLM2 units took 69 s after
a ``kill -9``); with the deltas on disk it adds them back instead, at the cost of a read. One
safetensors file per unit (``<journal>.deltas/<sha256 of batch id>.safetensors``) holds
``EditResult.deltas`` as they were written; its header names the batch id and the deltas'
sha256 (``deltas_sha256``). A file is written to a temporary name, fsynced and renamed, so a
reader sees a whole file or none.

The journal stays the truth: a sidecar is used only when its deltas hash to the journal row's
``delta_sha256`` and its ``lineage`` (a hash chain over the applied journal rows before the
unit, ``extend_lineage``) is the journal's now. Deltas are relative to the weights they were
computed on, so a revert or rollback that changed what came before a unit makes its sidecar
stale, even when a crash stopped the rebuild before it was rewritten. A missing, unreadable,
mismatching or stale one is reported (``UnitDeltasError``) and the caller re-edits, as replay
did before. Only safetensors is read, never a pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from daemon.errors import (
    CorruptUnitDeltasError,
    MissingUnitDeltasError,
    StaleUnitDeltasError,
    UnitDeltasError,
)
from daemon.records.row_sparse import ROW_SPARSE_KEY, pack_rows, unpack_rows
from editing.editors.base import deltas_sha256

log = logging.getLogger(__name__)

FORMAT = "factkeeper-unit-deltas/1"
SUFFIX = ".safetensors"
_TEMP_PREFIX = ".tmp-"


#: The lineage of the base weights (no applied row before the unit).
ROOT_LINEAGE = hashlib.sha256(b"factkeeper-lineage/1").hexdigest()

#: An applied journal row as the lineage sees it: (event_id, batch_id, delta_sha256).
LineageRow = tuple[str | None, str | None, str | None]


def extend_lineage(lineage: str, rows: Iterable[LineageRow]) -> str:
    """``lineage`` followed by ``rows``: each step hashes the previous value with one row's
    event id, unit and delta hash, so two lineages match only for the same rows in order."""
    for event_id, batch_id, digest in rows:
        step = f"{lineage}|{event_id or ''}|{batch_id or ''}|{digest or ''}"
        lineage = hashlib.sha256(step.encode("utf-8")).hexdigest()
    return lineage


def lineage_of(rows: Sequence[LineageRow]) -> str:
    """The lineage of weights that hold exactly ``rows`` (``Journal.applied_lineage``)."""
    return extend_lineage(ROOT_LINEAGE, rows)


def store_dir_for(journal_path: Path) -> Path:
    """Where the sidecars of the journal at ``journal_path`` live: ``<journal>.deltas``."""
    return journal_path.with_name(journal_path.name + ".deltas")


def file_stem(batch_id: str) -> str:
    """A file name for any batch id (ids may hold ``/`` after a revert splits a batch)."""
    return hashlib.sha256(batch_id.encode("utf-8")).hexdigest()


class UnitDeltaStore:
    """The sidecar files of one journal; used by the daemon's loop thread only."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def beside(cls, journal_path: Path) -> UnitDeltaStore:
        return cls(store_dir_for(journal_path))

    def path_for(self, batch_id: str) -> Path:
        return self.folder / (file_stem(batch_id) + SUFFIX)

    def write(self, batch_id: str, deltas: Mapping[str, torch.Tensor], lineage: str) -> Path:
        """Store ``deltas`` for ``batch_id``, computed on weights of ``lineage``, durably (temp
        file, fsync, rename), replacing any earlier file of the unit.

        Raises:
            UnitDeltasError: the file could not be written; nothing is left half-written.
        """
        dense = {name: d.detach().to("cpu").contiguous() for name, d in deltas.items()}
        tensors, shapes = pack_rows(dense)
        meta = {
            "format": FORMAT,
            "batch_id": batch_id,
            "delta_sha256": deltas_sha256(dense),
            "lineage": lineage,
        }
        if shapes:
            meta[ROW_SPARSE_KEY] = json.dumps(shapes, sort_keys=True)
        try:
            return write_durably(self.path_for(batch_id), tensors, meta)
        except (OSError, SafetensorError, ValueError) as exc:
            raise UnitDeltasError(f"cannot store the deltas of unit {batch_id}: {exc}") from exc

    def try_write(self, batch_id: str, deltas: Mapping[str, torch.Tensor], lineage: str) -> bool:
        """``write``, with a failure logged instead of raised: it only costs the next replay
        one edit (the unit is re-edited), which must not fail the batch being journaled."""
        try:
            self.write(batch_id, deltas, lineage)
        except UnitDeltasError as exc:
            log.warning("unit deltas not stored; a replay will re-edit the unit: %s", exc)
            return False
        return True

    def load(self, batch_id: str, expected_sha256: str, lineage: str) -> dict[str, torch.Tensor]:
        """The stored deltas of ``batch_id``, proven to hash to ``expected_sha256`` (the
        journal row's ``delta_sha256``) and to have been computed on weights of ``lineage``
        (what the journal applies before the unit) before they are returned.

        Raises:
            MissingUnitDeltasError: no file for the unit.
            CorruptUnitDeltasError: unreadable, of another unit, or hashing to something else.
            StaleUnitDeltasError: computed after other edits than the journal now has.
        """
        path = self.path_for(batch_id)
        if not path.is_file():
            raise MissingUnitDeltasError(f"no stored deltas for unit {batch_id} ({path.name})")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                # A safe_open handle is not iterable: keys() is its listing.
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
            tensors = unpack_rows(tensors, json.loads(meta.get(ROW_SPARSE_KEY, "{}")))
        except (OSError, SafetensorError, ValueError, KeyError, RuntimeError) as exc:
            raise CorruptUnitDeltasError(f"stored deltas of unit {batch_id}: {exc}") from exc
        if meta.get("format") != FORMAT or meta.get("batch_id") != batch_id:
            raise CorruptUnitDeltasError(
                f"{path.name} is not the stored deltas of unit {batch_id} "
                f"(format {meta.get('format')!r}, unit {meta.get('batch_id')!r})"
            )
        got = deltas_sha256(tensors)
        if got != expected_sha256:
            raise CorruptUnitDeltasError(
                f"stored deltas of unit {batch_id} hash to {got[:16]}, the journal says "
                f"{expected_sha256[:16]}"
            )
        if meta.get("lineage") != lineage:
            raise StaleUnitDeltasError(
                f"stored deltas of unit {batch_id} were computed on weights holding other edits "
                "than the journal now applies before it (a revert or rollback since)"
            )
        return tensors

    def discard(self, batch_ids: Iterable[str]) -> None:
        """Remove the files of ``batch_ids`` (a batch the journal did not take)."""
        for batch_id in batch_ids:
            unlink_quietly(self.path_for(batch_id))

    def prune(self, keep: Iterable[str]) -> int:
        """Remove every file except those of the units in ``keep``; returns how many went.

        Leftover temporary files (a crash during ``write``) go too.
        """
        if not self.folder.is_dir():
            return 0
        wanted = {file_stem(batch_id) + SUFFIX for batch_id in keep}
        removed = 0
        for path in self.folder.iterdir():
            if path.name in wanted or not path.is_file():
                continue
            if path.suffix == SUFFIX or path.name.startswith(_TEMP_PREFIX):
                removed += unlink_quietly(path)
        if removed:
            log.info("stored unit deltas pruned", extra={"removed": removed, "kept": len(wanted)})
        return removed

    def size(self) -> tuple[int, int]:
        """(files, bytes) of the stored units, for logs and reports."""
        if not self.folder.is_dir():
            return 0, 0
        files = [p for p in self.folder.iterdir() if p.suffix == SUFFIX and p.is_file()]
        return len(files), sum(p.stat().st_size for p in files)


def write_durably(target: Path, tensors: Mapping[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write a safetensors file so a reader sees all of it or none: a temporary file in the
    same folder, fsynced, renamed over ``target``, and the folder fsynced.

    Raises:
        OSError, SafetensorError, ValueError: nothing is left half-written.
    """
    temp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        data = save(dict(tensors), metadata=meta)
        fd, temp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=SUFFIX, dir=target.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, target)
        temp = None
        _fsync_dir(target.parent)
    finally:
        if temp is not None:
            unlink_quietly(Path(temp))
    return target


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable: without it a crash can lose the directory entry."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: Path) -> int:
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)
        return 0
    return 1

"""Snapshots of the daemon's model as MLflow versions, and restoring from them.

A version holds the edited tensors after every applied journal entry up to its ``journal_seq``.
Start-up restores the newest version that the journal still agrees with (same base weights, its
``journal_seq`` not beyond the journal) and replays only the applied entries after it, which is
what keeps a restart after ``kill -9`` short once there are many edits. Aliases: ``candidate`` is
the newest version; ``production`` moves only through the audit gate (or a rollback).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from daemon.config import Settings
from daemon.records.journal import Journal
from daemon.versions.registry import PRODUCTION, ModelRegistry, RegistryUnavailableError
from daemon.versions.snapshots import (
    BaseWeights,
    FolderBaseWeights,
    InMemoryBaseWeights,
    SnapshotError,
    SnapshotMeta,
    ZeroForAdded,
    delta_norms,
    edited_tensors,
    load_into,
    read_snapshot,
    tensors_hash,
    write_snapshot,
)
from editing.memory.module import added_parameter_names
from editing.models import LoadedModel
from monitoring.metrics import FactkeeperMetrics

log = logging.getLogger(__name__)

CONSOLIDATION_TAG = "consolidation"
"""Tag of a version made by a consolidation: ``pending`` when registered, then ``accepted`` or
``rejected`` (by its audit or the comparison with the weights it would replace). Only an
accepted one is ever restored, so a crash before the verdict restores the weights before it."""


@dataclass(frozen=True)
class Restored:
    version: str | None  # None: started from the base weights
    journal_seq: int
    seconds: float


def editable_weight_names(lm: LoadedModel) -> list[str]:
    """Every MLP weight an editor may change, and the rows of a fact memory attached to the
    model (``Editor.prepare_model``): what a snapshot compares against the base."""
    a = lm.adapter
    mlp = [a.weight_name(role, i) for i in range(a.num_layers(lm.model)) for role in a.roles()]
    return mlp + added_parameter_names(lm)


def base_weights(lm: LoadedModel) -> BaseWeights:
    """The base values: from the model's safetensors folder, else copied now (before edits);
    zero for the parameters factkeeper added (the base model has no fact memory)."""
    added = added_parameter_names(lm)
    params = dict(lm.model.named_parameters())
    zeros = {name: torch.zeros_like(params[name], device="cpu") for name in added}
    if lm.folder is not None:
        return ZeroForAdded(FolderBaseWeights(lm.folder), zeros)
    model_own = [n for n in editable_weight_names(lm) if n not in zeros]
    return ZeroForAdded(InMemoryBaseWeights(lm.model, model_own), zeros)


def config_hash(settings: Settings) -> str:
    """Identifies the editor + safeguards configuration the edits were made with."""
    blob = json.dumps(
        {
            "editor": settings.editor.model_dump(mode="json"),
            "safeguards": settings.safeguards.model_dump(mode="json"),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def checkpoint_sha256(folder: Path | None) -> str:
    """sha256 over a checkpoint folder's files (names and bytes, sorted); ``none`` without one."""
    if folder is None or not folder.is_dir():
        return "none"
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def runtime_tags(editor_checkpoint: Path | None) -> dict[str, str]:
    """Version tags that let a replay be reproduced: library versions, threads, checkpoint."""
    import transformers

    return {
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "editor_checkpoint_sha256": checkpoint_sha256(editor_checkpoint),
    }


def configure_mlflow_http(settings: Settings) -> None:
    """Bound MLflow's HTTP timeout and retries (its defaults retry for minutes), unless the
    operator set MLFLOW_HTTP_REQUEST_TIMEOUT / MLFLOW_HTTP_REQUEST_MAX_RETRIES already."""
    s = settings.snapshots
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(s.request_timeout_s))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(s.request_max_retries))


class SnapshotBackoff:
    """When the next snapshot may be tried after failures: exponential, capped.

    A failed snapshot must not stop the daemon (MLflow down meant a crash loop); it is retried
    after ``initial_s``, then twice as long each time up to ``max_s``, and reset by a success.
    """

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.consecutive_failures = 0
        self._next_attempt = 0.0

    def ready(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self._next_attempt

    def failed(self, now: float | None = None) -> float:
        """Count a failure; returns the seconds until the next attempt."""
        self.consecutive_failures += 1
        wait = min(self.max_s, self.initial_s * 2 ** (self.consecutive_failures - 1))
        self._next_attempt = (time.monotonic() if now is None else now) + wait
        return wait

    def succeeded(self) -> None:
        self.consecutive_failures = 0
        self._next_attempt = 0.0


class VersionKeeper:
    """Writes snapshots of one daemon's model to the registry and restores them."""

    def __init__(
        self,
        settings: Settings,
        lm: LoadedModel,
        journal: Journal,
        metrics: FactkeeperMetrics,
        registry: ModelRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.lm = lm
        self.journal = journal
        self.metrics = metrics
        configure_mlflow_http(settings)
        self.registry = registry or ModelRegistry(
            settings.snapshots.tracking_uri, settings.snapshots.registered_model_name
        )
        self.base = base_weights(lm)
        self.names = editable_weight_names(lm)
        self.current_version: str | None = None
        self.editor_checkpoint: Callable[[], Path | None] = lambda: None
        """The editor's checkpoint folder (the daemon sets it); hashed into every version's
        tags with the torch/transformers versions and threads (``runtime_tags``)."""
        self._runtime_tags: tuple[Path | None, dict[str, str]] | None = None
        self.on_load: Callable[[Sequence[str]], None] | None = None
        """Called with the event ids the weights hold after every load (editor state)."""
        self.on_snapshot: Callable[[int], None] | None = None
        """Called with the journal seq a newly registered version covers (pruning what only
        a replay from an older point would need)."""
        self.snapshot_seq = 0  # journal seq the current weights were last snapshotted at
        self.last_snapshot_time = time.monotonic()

    def runtime_tags(self) -> dict[str, str]:
        """``runtime_tags`` of the current editor checkpoint (hashed once per folder)."""
        folder = self.editor_checkpoint()
        if self._runtime_tags is None or self._runtime_tags[0] != folder:
            self._runtime_tags = (folder, runtime_tags(folder))
        return self._runtime_tags[1]

    def restore(self) -> Restored:
        """Load the newest usable version into the model; say which journal seq it covers.

        With MLflow unreachable this starts from the base weights (seq 0): replaying the whole
        journal gives the same edits, only slower, and the daemon need not wait for MLflow.
        """
        try:
            return self._restore()
        except RegistryUnavailableError as exc:
            log.warning(
                "MLflow unavailable at start: base weights + full journal replay",
                extra={"error": str(exc)},
            )
            load_into(self.lm.model, self.base, {}, reset=self.names)
            self._loaded(())
            self.current_version = None
            return Restored(None, 0, 0.0)

    def _restore(self) -> Restored:
        started = time.perf_counter()
        newest_seq = self.journal.last_seq()
        for info in self.registry.versions():  # newest first
            tags = info.tags
            if tags.get("base_hash") != self.lm.base_hash or _unaccepted(tags):
                continue
            if int(tags.get("journal_seq", -1)) > newest_seq:
                continue  # the journal lost rows this version holds: do not trust it
            with self.registry.downloaded(info.version) as folder:
                tensors, meta = read_snapshot(folder)
            if self._rolled_back_since(meta):
                continue
            load_into(self.lm.model, self.base, tensors, reset=self.names)
            self._loaded(meta.event_ids)
            self.current_version, self.snapshot_seq = info.version, meta.journal_seq
            seconds = time.perf_counter() - started
            log.info("restored", extra={"version": info.version, "journal_seq": meta.journal_seq})
            return Restored(info.version, meta.journal_seq, seconds)
        return Restored(None, 0, time.perf_counter() - started)

    def _rolled_back_since(self, meta: SnapshotMeta) -> bool:
        """A version is stale unless it holds exactly the edits the journal counts as applied
        up to its ``journal_seq`` (a rollback, revert or quarantine since changed that set)."""
        return set(meta.event_ids) != self.applied_ids_upto(meta.journal_seq)

    def applied_ids_upto(self, journal_seq: int) -> set[str]:
        return {e.event_id for e in self.journal.applied_events() if e.seq <= journal_seq}

    def read(self, version: str) -> tuple[dict[str, torch.Tensor], SnapshotMeta]:
        """A version's tensors and metadata, verified against this daemon's base model."""
        with self.registry.downloaded(version) as folder:
            tensors, meta = read_snapshot(folder)
        if meta.base_hash != self.lm.base_hash:
            raise SnapshotError(
                f"version {version} was made from other base weights "
                f"({meta.base_hash[:12]} != {self.lm.base_hash[:12]})"
            )
        return tensors, meta

    def load(self, version: str | None) -> SnapshotMeta | None:
        """Set the model to ``version`` (None: the base weights); nothing changes on error."""
        if version is None:
            load_into(self.lm.model, self.base, {}, reset=self.names)
            self._loaded(())
            self.current_version = None
            return None
        tensors, meta = self.read(version)
        load_into(self.lm.model, self.base, tensors, reset=self.names)
        self._loaded(meta.event_ids)
        self.current_version = version
        return meta

    def _loaded(self, event_ids: Sequence[str]) -> None:
        if self.on_load is not None:
            self.on_load(event_ids)

    def mark_synced(self) -> None:
        """The weights now equal ``current_version``; nothing since the journal's end is new."""
        self.snapshot_seq = self.journal.last_seq()

    def newest_usable_before(self, seq: int) -> tuple[str, SnapshotMeta] | None:
        """The newest version whose edits all come before journal ``seq`` and still stand."""
        for info in self.registry.versions():
            if info.tags.get("base_hash") != self.lm.base_hash or _unaccepted(info.tags):
                continue
            if int(info.tags.get("journal_seq", -1)) >= seq:
                continue
            _, meta = self.read(info.version)
            if not self._rolled_back_since(meta):
                return info.version, meta
        return None

    def production(self) -> str | None:
        return self.registry.alias(PRODUCTION)

    def promote(self, version: str) -> None:
        """Point ``production`` at ``version`` (the gate passed, or an operator rolled back)."""
        self.registry.set_alias(PRODUCTION, version)
        self.metrics.set_model_version(version, self.lm.name, "production")

    def due(self, applied_since: int) -> bool:
        s = self.settings.snapshots
        by_count = s.every_n_edits > 0 and applied_since >= s.every_n_edits
        minutes = (time.monotonic() - self.last_snapshot_time) / 60
        by_time = s.every_minutes > 0 and applied_since > 0 and minutes >= s.every_minutes
        return by_count or by_time

    def snapshot(
        self,
        reason: str,
        kafka_offsets: dict[str, int] | None = None,
        *,
        force: bool = False,
        tags: dict[str, str] | None = None,
    ) -> str | None:
        """Register the current weights as a new version; None when nothing changed since.

        ``force`` registers even when the journal did not move (the weights were rebuilt, as by
        a consolidation); ``tags`` are added to the version's tags.
        """
        seq = self.journal.last_seq()
        if seq == self.snapshot_seq and self.current_version is not None and not force:
            return None
        started = time.perf_counter()
        tensors = edited_tensors(self.lm.model, self.base, self.names)
        applied = self.journal.applied_events()
        meta = SnapshotMeta(
            journal_seq=seq,
            event_ids=tuple(e.event_id for e in applied),
            base_hash=self.lm.base_hash,
            editor_config_hash=config_hash(self.settings),
            tensors_hash=tensors_hash(tensors),
            delta_norms=delta_norms(tensors, self.base),
            kafka_offsets=kafka_offsets or {},
            parent_version=self.current_version,
            created_at=datetime.now(UTC).isoformat(),
        )
        with tempfile.TemporaryDirectory(prefix="factkeeper-snapshot-") as tmp:
            folder = write_snapshot(Path(tmp) / "snapshot", tensors, meta)
            size = sum(f.stat().st_size for f in folder.iterdir())
            tags = {
                "journal_seq": str(seq),
                "edits": str(len(applied)),
                "base_hash": self.lm.base_hash,
                "base_model": self.lm.name,
                "editor": self.settings.editor.method,
                "editor_config_hash": meta.editor_config_hash,
                "tensors_hash": meta.tensors_hash,
                "parent_version": self.current_version or "",
                "reason": reason,
                "created_at": meta.created_at,
                **self.runtime_tags(),
                **(tags or {}),
            }
            version = self.registry.register(folder, tags, {"edits": len(applied)})
        self.journal.assign_model_version(version, seq)
        self.current_version, self.snapshot_seq = version, seq
        self.last_snapshot_time = time.monotonic()
        seconds = time.perf_counter() - started
        self.metrics.snapshot_duration.observe(seconds)
        self.metrics.snapshot_bytes.set(size)
        self.metrics.set_delta_norms(meta.delta_norms)
        self.metrics.set_model_version(version, self.lm.name, "candidate")
        log.info(
            "snapshot registered",
            extra={"version": version, "journal_seq": seq, "bytes": size, "reason": reason},
        )
        if self.on_snapshot is not None:
            self.on_snapshot(seq)
        return version


def _unaccepted(tags: dict[str, str]) -> bool:
    """A consolidation's version that is not (yet) accepted."""
    return tags.get(CONSOLIDATION_TAG, "accepted") != "accepted"

"""What an operator does from the command line: send control commands, list and export versions.

The daemon is the model's only writer, so ``snapshot``, ``audit``, ``rollback`` and ``revert``
are *sent* to it on the control topic and executed between batches; the CLI then waits for the
outcome the daemon journals. Listing and exporting versions only read the registry, so they work
whether the daemon runs or not.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from daemon.config import Settings
from daemon.control.commands import ControlCommand, encode_control
from daemon.errors import DaemonError
from daemon.records.journal import Journal
from daemon.report import ReportFiles
from daemon.versions.registry import ModelRegistry, VersionInfo, audit_label
from daemon.versions.snapshots import FolderBaseWeights, load_into, read_snapshot, tensors_hash
from editing.models import load_model
from editing.paths import Paths

AUDIT_TAGS = (
    "audit_retention_exact_match",
    "audit_locality_agreement",
    "audit_perplexity_drift",
)


class OperationError(DaemonError):
    """An operator command could not be carried out (no answer, unknown version, ...)."""


@dataclass(frozen=True)
class ControlOutcome:
    command: str
    outcome: str | None  # None: no answer within the wait


def audit_reports_dir(settings: Settings) -> Path:
    """Where the daemon writes one JSON report per audit: next to its journal."""
    return settings.journal.path.parent / "audits"


def registry_for(settings: Settings) -> ModelRegistry:
    s = settings.snapshots
    return ModelRegistry(s.tracking_uri, s.registered_model_name)


def send_control(settings: Settings, command: ControlCommand, wait_s: float) -> ControlOutcome:
    """Put ``command`` on the control topic; wait up to ``wait_s`` for the journaled outcome."""
    from daemon.kafka.clients import build_producer

    before = _last_control_seq(settings)
    producer = build_producer(settings.kafka)
    try:
        value = encode_control(command)
        producer.send(settings.kafka.topics.control, value=value, headers=_signed(settings, value))
        producer.flush(timeout=30)
    finally:
        producer.close()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        outcome = _outcome_after(settings, before, command)
        if outcome is not None:
            return ControlOutcome(command.command, outcome)
        time.sleep(0.5)
    return ControlOutcome(command.command, None)


def _signed(settings: Settings, value: bytes) -> list[tuple[str, bytes]]:
    """Sign with ``control.keys`` (the signing key); unsigned only without any key."""
    signing = settings.control.signing_key()
    if signing is None:
        return []
    from daemon.control.auth import sign_control

    key_id, key = signing
    return sign_control(
        value,
        key_id=key_id,
        key=key,
        topic=settings.kafka.topics.control,
        group=settings.kafka.group_id,
    )


def _last_control_seq(settings: Settings) -> int:
    if not settings.journal.path.exists():
        return 0
    with Journal.open(settings.journal.path, create=False) as journal:
        entries = journal.control_commands()
        return entries[-1].seq if entries else 0


def _outcome_after(settings: Settings, after: int, command: ControlCommand) -> str | None:
    if not settings.journal.path.exists():
        return None
    with Journal.open(settings.journal.path, create=False) as journal:
        for entry in journal.control_commands(after):
            if entry.command == command:
                return entry.outcome
    return None


def version_rows(versions: list[VersionInfo]) -> list[dict[str, Any]]:
    """One flat row per version for ``factkeeper versions`` (newest first)."""
    rows = []
    for v in versions:
        t = v.tags
        rows.append(
            {
                "version": v.version,
                "aliases": ",".join(v.aliases),
                "edits": t.get("edits", ""),
                "journal_seq": t.get("journal_seq", ""),
                "parent": t.get("parent_version", ""),
                "reason": t.get("reason", ""),
                "audit": audit_label(t),
                "audit_passed": t.get("audit_passed", ""),
                **{k.removeprefix("audit_"): v.metrics.get(k) for k in AUDIT_TAGS},
            }
        )
    return rows


def export_version(settings: Settings, version: str, out_dir: Path, paths: Paths) -> Path:
    """Write base model + version as a full Hugging Face folder (safetensors) for serving.

    Raises:
        OperationError: the version was made from other base weights, or the folder is not
            empty.
    """
    if out_dir.exists() and any(out_dir.iterdir()):
        raise OperationError(f"{out_dir} is not empty; export into a new folder")
    lm = load_model(settings.model.name, paths=paths, dtype=getattr(torch, settings.model.dtype))
    with registry_for(settings).downloaded(version) as folder:
        tensors, meta = read_snapshot(folder)
    if meta.base_hash != lm.base_hash:
        raise OperationError(
            f"version {version} was made from other base weights than {settings.model.name}"
        )
    if lm.folder is None:
        raise OperationError(f"{settings.model.name} has no safetensors folder to use as base")
    load_into(lm.model, FolderBaseWeights(lm.folder), tensors)
    params = dict(lm.model.named_parameters())
    if tensors_hash({n: params[n] for n in tensors}) != meta.tensors_hash:
        raise OperationError(f"version {version} did not load bit-exact")
    out_dir.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(out_dir, safe_serialization=True)
    lm.tokenizer.save_pretrained(out_dir)
    (out_dir / "factkeeper-version.json").write_text(
        json.dumps(
            {
                "registered_model": settings.snapshots.registered_model_name,
                "version": version,
                "journal_seq": meta.journal_seq,
                "edits": len(meta.event_ids),
                "base_hash": meta.base_hash,
                "tensors_hash": meta.tensors_hash,
            },
            indent=2,
        )
    )
    return out_dir


def write_daemon_report(settings: Settings, output: Path, png: Path | None = None) -> ReportFiles:
    """The one-page report from the registry, the audit reports and the journal."""
    from daemon.report import load_audits, write_html_report

    warnings = []
    try:
        versions = registry_for(settings).versions()
    except Exception as exc:  # the page still shows audits and the journal
        versions = []
        warnings.append(f"registry not readable: {exc}")
    counts: dict[str, int] = {}
    if settings.journal.path.exists():
        with Journal.open(settings.journal.path, create=False) as journal:
            counts = dict(journal.counts_by_status())
    return write_html_report(
        output,
        versions=versions,
        audits=load_audits(audit_reports_dir(settings)),
        journal_counts=counts,
        model_name=settings.model.name,
        png=png,
        warnings=warnings,
    )

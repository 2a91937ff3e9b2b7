"""Model versions in the MLflow registry: one registered model, one version per snapshot.

Each version's source is a snapshot folder logged as run artifacts (safetensors + JSON); its tags
carry the snapshot metadata (journal sequence, base hash, parent, edit count), so lineage is
visible in the MLflow UI. Aliases, not the deprecated stages, point at versions: ``candidate``
is the newest version, ``production`` the newest one that passed the audit gate. Rollback moves
``production``; versions are never rewritten.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editing.errors import FactkeeperError
from editing.paths import Paths

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
PRODUCTION = "production"
SNAPSHOT_ARTIFACT_DIR = "snapshot"
EXPERIMENT = "factkeeper-snapshots"


class RegistryError(FactkeeperError):
    """The registry could not be reached or does not hold what was asked for."""


@dataclass(frozen=True)
class VersionInfo:
    version: str
    aliases: tuple[str, ...]
    tags: dict[str, str]
    metrics: dict[str, float]
    source: str


NEVER_AUDITED = "never audited"


def audit_label(tags: dict[str, str]) -> str:
    """``passed``, ``failed`` or ``never audited``: a version without an audit says so rather
    than showing an empty cell that reads like a pass."""
    passed = tags.get("audit_passed")
    if passed is None or passed == "":
        return NEVER_AUDITED
    return "passed" if passed == "true" else "failed"


class RegistryUnavailableError(RegistryError):
    """MLflow did not answer (down, unreachable, or failing): retry later."""


@contextmanager
def reachable(tracking_uri: str) -> Iterator[None]:
    """Turn MLflow's transport failures into ``RegistryUnavailableError`` (typed, retryable).

    A missing version or alias is not a transport failure and passes through unchanged.
    """
    from mlflow.exceptions import MlflowException

    try:
        yield
    except RegistryError:
        raise
    except MlflowException as exc:
        if not _transport_failure(exc):
            raise
        raise RegistryUnavailableError(
            f"MLflow at {tracking_uri} failed: {str(exc)[:300]}; the daemon keeps consuming "
            "and retries snapshots with backoff"
        ) from exc
    except (OSError, ConnectionError) as exc:
        raise RegistryUnavailableError(f"MLflow at {tracking_uri} is unreachable: {exc}") from exc


_UNAVAILABLE_CODES = frozenset({"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE"})


def _transport_failure(exc: Exception) -> bool:
    """MLflow could not be asked (connection refused, timeout, 5xx), as opposed to an answer
    such as "no such alias"."""
    return getattr(exc, "error_code", "") in _UNAVAILABLE_CODES or isinstance(
        exc.__context__, OSError
    )


def embedded_uri(paths: Paths) -> str:
    """The embedded default: SQLite under FACTKEEPER_HOME."""
    return f"sqlite:///{paths.mlflow_dir / 'mlflow.db'}"


class ModelRegistry:
    """The versions of one registered model."""

    def __init__(self, tracking_uri: str, model_name: str, artifact_root: Path | None = None):
        """Nothing is contacted here: the first call connects, so a daemon whose MLflow is
        down can start (from the base weights and its journal) and keep consuming."""
        # MLflow is imported here: it is slow to import and only the daemon needs it.
        from mlflow import MlflowClient

        if tracking_uri.startswith("sqlite:///"):
            db = Path(tracking_uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            # Without a location MLflow puts artifacts in ./mlruns of whatever the working
            # directory is; the embedded store keeps them next to its database instead.
            artifact_root = artifact_root or db.parent / "artifacts"
        self.model_name = model_name
        self.tracking_uri = tracking_uri
        self._artifact_root = artifact_root
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._experiment: str | None = None

    @property
    def _experiment_id(self) -> str:
        """The snapshot experiment (and the registered model), created on first use."""
        if self._experiment is None:
            with reachable(self.tracking_uri):
                experiment = self._ensure_experiment(self._artifact_root)
                self._ensure_registered_model()
            self._experiment = experiment
        return self._experiment

    @classmethod
    def embedded(cls, paths: Paths, model_name: str) -> ModelRegistry:
        return cls(embedded_uri(paths), model_name, paths.mlflow_dir / "artifacts")

    def _ensure_experiment(self, artifact_root: Path | None) -> str:
        found = self._client.get_experiment_by_name(EXPERIMENT)
        if found is not None:
            return found.experiment_id
        location = artifact_root.resolve().as_uri() if artifact_root else None
        return self._client.create_experiment(EXPERIMENT, artifact_location=location)

    def _ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._client.get_registered_model(self.model_name)
        except MlflowException as exc:
            if _transport_failure(exc):
                raise
            self._client.create_registered_model(
                self.model_name, description="factkeeper snapshots: edited tensors + metadata"
            )

    def register(
        self,
        snapshot_dir: Path,
        tags: dict[str, str],
        metrics: dict[str, float] | None = None,
    ) -> str:
        """Log a snapshot folder, create a version from it, point ``candidate`` at it."""
        client = self._client
        with reachable(self.tracking_uri):
            run = client.create_run(self._experiment_id, tags={"factkeeper.kind": "snapshot"})
            run_id = run.info.run_id
            try:
                client.log_artifacts(run_id, str(snapshot_dir), SNAPSHOT_ARTIFACT_DIR)
                for key, value in (metrics or {}).items():
                    client.log_metric(run_id, key, float(value))
                client.set_terminated(run_id)
            except Exception:
                client.set_terminated(run_id, status="FAILED")
                raise
            source = f"{run.info.artifact_uri}/{SNAPSHOT_ARTIFACT_DIR}"
            mv = client.create_model_version(
                self.model_name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()}
            )
        self.set_alias(CANDIDATE, mv.version)
        log.info("registered version", extra={"model": self.model_name, "version": mv.version})
        return str(mv.version)

    def set_alias(self, alias: str, version: str) -> None:
        with reachable(self.tracking_uri):
            self._client.set_registered_model_alias(self.model_name, alias, str(version))

    def alias(self, alias: str) -> str | None:
        """The version an alias points to, or None when the alias is not set."""
        from mlflow.exceptions import MlflowException

        with reachable(self.tracking_uri):
            try:
                found = self._client.get_model_version_by_alias(self.model_name, alias)
            except MlflowException as exc:
                if _transport_failure(exc):
                    raise
                return None
        return str(found.version)

    def tag(self, version: str, key: str, value: str) -> None:
        with reachable(self.tracking_uri):
            self._client.set_model_version_tag(self.model_name, str(version), key, value)

    def log_metrics(self, version: str, metrics: dict[str, float]) -> None:
        """Attach audit figures to the version's run."""
        with reachable(self.tracking_uri):
            run_id = self._client.get_model_version(self.model_name, str(version)).run_id
            for key, value in metrics.items():
                self._client.log_metric(run_id, key, float(value))

    def download(self, version: str, dst: Path) -> Path:
        """Copy a version's snapshot folder under ``dst``; read it with
        ``snapshots.read_snapshot``. Without a folder of your own, use ``downloaded``."""
        from mlflow.exceptions import MlflowException

        with reachable(self.tracking_uri):
            try:
                mv = self._client.get_model_version(self.model_name, str(version))
            except MlflowException as exc:
                if _transport_failure(exc):
                    raise
                raise RegistryError(f"{self.model_name} has no version {version}") from exc
            local = self._client.download_artifacts(mv.run_id, SNAPSHOT_ARTIFACT_DIR, str(dst))
        return Path(local)

    @contextmanager
    def downloaded(self, version: str) -> Iterator[Path]:
        """A version's snapshot folder in a temporary directory, removed on exit (each
        restore used to leave one of about 21 MB in /tmp)."""
        with tempfile.TemporaryDirectory(prefix=f"factkeeper-v{version}-") as tmp:
            yield self.download(version, Path(tmp))

    def versions(self) -> list[VersionInfo]:
        """Every version, newest first, with aliases, tags and the metrics of its run."""
        with reachable(self.tracking_uri):
            found = self._client.search_model_versions(f"name='{self.model_name}'")
            if not found:
                return []
            # search results omit aliases; the registered model maps alias -> version.
            alias_map = self._client.get_registered_model(self.model_name).aliases or {}
            runs = {
                mv.run_id: dict(self._client.get_run(mv.run_id).data.metrics)
                for mv in found
                if mv.run_id
            }
        infos = []
        for mv in sorted(found, key=lambda v: int(v.version), reverse=True):
            metrics: dict[str, Any] = runs.get(mv.run_id, {}) if mv.run_id else {}
            infos.append(
                VersionInfo(
                    version=str(mv.version),
                    aliases=tuple(
                        sorted(a for a, v in alias_map.items() if str(v) == str(mv.version))
                    ),
                    tags=dict(mv.tags or {}),
                    metrics=metrics,
                    source=mv.source,
                )
            )
        return infos

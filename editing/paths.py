"""Where factkeeper keeps its files: one object derived from ``FACTKEEPER_HOME``.

Every artefact path is a method here so no module builds paths from strings of its own, and a
test can point the whole project at a temporary folder by constructing ``Paths(tmp_path)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "FACTKEEPER_HOME"
DEFAULT_HOME = Path("~/.cache/factkeeper")


@dataclass(frozen=True)
class Paths:
    """Artefact locations under one root folder."""

    home: Path

    @classmethod
    def from_env(cls) -> Paths:
        """The root from ``FACTKEEPER_HOME``, else ``~/.cache/factkeeper``."""
        raw = os.environ.get(HOME_ENV)
        return cls(Path(raw).expanduser() if raw else DEFAULT_HOME.expanduser())

    def model_cache(self, model_key: str) -> Path:
        """A de-quantised model saved as a Hugging Face folder (safetensors + tokenizer)."""
        return self.home / "models" / model_key

    @property
    def kafka_dir(self) -> Path:
        """Data, logs and pid file of the local single-node broker."""
        return self.home / "kafka"

    @property
    def mlflow_dir(self) -> Path:
        """Embedded MLflow: SQLite backend and artifacts folder."""
        return self.home / "mlflow"

    @property
    def stats_dir(self) -> Path:
        """Cached key statistics (second moments of MLP keys), safetensors."""
        return self.home / "stats"

    @property
    def editors_dir(self) -> Path:
        """Trained editor checkpoints (safetensors + JSON config)."""
        return self.home / "editors"

    @property
    def state_dir(self) -> Path:
        """The daemon's durable state: journal and snapshots."""
        return self.home / "state"

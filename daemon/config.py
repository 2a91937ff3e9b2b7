"""The daemon's settings: one typed model, read from a YAML file and ``FACTKEEPER_*`` variables.

Everything the daemon can be told from outside is declared here, once, with its default and a
docstring, and checked when the daemon starts: a typo or a bad value stops it with a message that
names every invalid field, instead of failing an hour later in the consumer. Precedence is
defaults < YAML file < environment (``FACTKEEPER_<SECTION>__<FIELD>``, nested with ``__``).
Secrets are ``SecretStr``: masked in ``repr`` and in ``redacted_dict`` (``factkeeper config
show``). This module must not import torch.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_serializer,
    model_validator,
)

from daemon.errors import SettingsError
from editing.errors import FactkeeperError
from editing.paths import DEFAULT_HOME, HOME_ENV, Paths
from editing.registry import EDITORS
from editing.safeguard_config import GUARDS, SafeguardConfig
from monitoring.gates import GateThresholds

log = logging.getLogger(__name__)

ENV_PREFIX = "FACTKEEPER_"
ENV_NESTING = "__"

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
Dtype = Literal["float32", "bfloat16", "float16"]

_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")
_MIN_ADMIN_TOKEN_CHARS = 16


class _CrossFieldError(ValueError):
    """A rule over several fields; carries one message per field so each is named."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{field}: {message}" for field, message in problems))


def _by_field(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Build an algorithm's config object (a frozen dataclass that checks itself when built).

    If that fails, each value that fails with every other field at its default is named as a
    problem (a value of the wrong type, or one the class's own checks refuse); a rule across
    fields, which no value breaks alone, is reported at the section.
    """
    try:
        return handler(value)
    except (ValidationError, FactkeeperError) as exc:  # the class raises its typed errors
        if not isinstance(value, dict):
            raise
        failed: Exception = exc
    problems = []
    for key, item in value.items():
        try:
            handler({key: item})
        except (ValidationError, FactkeeperError) as alone:
            problems.append((key, _check_message(alone)))
    raise _CrossFieldError(problems) if problems else ValueError(_check_message(failed))


def _check_message(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return exc.errors()[0]["msg"].removeprefix("Value error, ")
    return str(exc)


def _expand_user(path: Path) -> Path:
    return path.expanduser()


def _split_commas(value: Any) -> Any:
    """``"a:9092,b:9092"`` (the natural form in an environment variable) to a list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _check_server(value: str) -> str:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port")
    return value


def _check_topic(value: str) -> str:
    if not _TOPIC.fullmatch(value) or value in {".", ".."}:
        raise ValueError("a Kafka topic is 1-249 of letters, digits, '.', '_', '-'")
    return value


def _check_device(value: str) -> str:
    if not _DEVICE.fullmatch(value):
        raise ValueError("expected 'cpu', 'mps', 'cuda' or 'cuda:N'")
    return value


def _check_editor(name: str) -> str:
    if name not in EDITORS:
        raise ValueError(f"unknown editor {name!r}; known: {', '.join(sorted(EDITORS))}")
    return name


def _unknown_options(method: str, options: Mapping[str, object]) -> list[tuple[str, str]]:
    """``(key, message)`` per option that ``method``'s editor does not take. The editor's class
    is imported (with torch: seconds) only when there are options to check."""
    if not options:
        return []
    known = EDITORS[method].option_names()
    message = f"not an option of {method} (its options: {', '.join(sorted(known)) or 'none'})"
    return [(key, message) for key in sorted(options) if key not in known]


def _paths(info: ValidationInfo) -> Paths:
    """The ``Paths`` that ``load_settings`` derived from its env, else from the process env."""
    context = info.context or {}
    paths = context.get("paths")
    return paths if isinstance(paths, Paths) else Paths.from_env()


UserPath = Annotated[Path, AfterValidator(_expand_user)]
Server = Annotated[str, AfterValidator(_check_server)]
Topic = Annotated[str, AfterValidator(_check_topic)]
Name = Annotated[str, Field(min_length=1, max_length=255)]
#: An editing method: a name in ``editing.registry.EDITORS`` (checked without importing torch).
EditorName = Annotated[str, AfterValidator(_check_editor)]


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        hide_input_in_errors=True,
        validate_default=True,
    )


class _HoldsConfig(_Section):
    """A section that holds an algorithm's config object (a frozen dataclass) as ``config_field``.

    The object's fields are written flat in the section, beside the section's own settings, and
    ``model_dump`` writes them flat again; each is declared, defaulted and checked once, in the
    algorithm's class, and an invalid one is named by its path in the file.
    """

    config_field: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _gather(cls, data: Any) -> Any:
        config_class = cls.model_fields[cls.config_field].annotation
        if not isinstance(data, dict) or isinstance(data.get(cls.config_field), config_class):
            return data  # e.g. AuditSettings(thresholds=GateThresholds(...)) in Python
        if cls.config_field in data:
            message = "unknown setting: its fields are written in the section itself"
            raise _CrossFieldError([(cls.config_field, message)])
        names = config_class.__dataclass_fields__  # type: ignore[union-attr]
        own = {k: v for k, v in data.items() if k not in names}
        return {**own, cls.config_field: {k: v for k, v in data.items() if k in names}}

    @model_serializer(mode="wrap")
    def _spread(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in handler(self).items():
            if key == self.config_field:
                flat.update(value)
            else:
                flat[key] = value
        return flat


class KafkaTopics(_Section):
    """Topic names; all four must differ."""

    corrections: Topic = "fact-corrections"
    """Fact-correction events consumed by the daemon."""
    dlq: Topic = "fact-corrections.dlq"
    """Rejected events and edits that did not take, with the original bytes."""
    control: Topic = "factkeeper.control"
    """Control commands (pause, resume, audit, rollback, revert)."""
    quarantine: Topic = "fact-corrections.quarantine"
    """Edits removed after a failed audit gate, with the audit figures."""

    @model_validator(mode="after")
    def _distinct(self) -> KafkaTopics:
        names = [self.corrections, self.dlq, self.control, self.quarantine]
        if len(set(names)) != len(names):
            raise ValueError("the corrections, dlq, control and quarantine topics must differ")
        return self


#: A ``kafka`` key that used to exist and is now accepted, ignored and warned about.
DEPRECATED_KAFKA_KEY = "max_poll_records"


class KafkaSettings(_Section):
    """Connection and consumer settings (kafka-python 3.x; auto-commit is always off)."""

    bootstrap_servers: Annotated[
        tuple[Server, ...], BeforeValidator(_split_commas), Field(min_length=1)
    ] = ("127.0.0.1:9092",)
    """Brokers as host:port; a comma-separated string is accepted (for the environment)."""
    topics: KafkaTopics = Field(default_factory=KafkaTopics)
    group_id: Name = "factkeeper"
    """Consumer group; one daemon (one model) per group."""
    client_id: Name = "factkeeper"
    group_instance_id: Name | None = None
    """Static membership id (KIP-345): a restarted pod rejoins without a rebalance."""
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    """Required with SASL_PLAINTEXT / SASL_SSL."""
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    """Prefer the environment (FACTKEEPER_KAFKA__SASL_PASSWORD) over the YAML file."""
    ssl_cafile: UserPath | None = None
    ssl_certfile: UserPath | None = None
    ssl_keyfile: UserPath | None = None
    max_poll_interval_ms: int = Field(default=900_000, ge=10_000)
    """Longest gap between polls before the group evicts us: worst batch + snapshot + audit."""
    session_timeout_ms: int = Field(default=45_000, ge=6_000, le=1_800_000)
    """Heartbeat timeout (the broker's group.min/max.session.timeout.ms bound it)."""
    create_topics: bool = True
    """Create missing topics at start (needs the CreateTopics ACL); false where the topics are
    declared elsewhere only (e.g. Strimzi KafkaTopic resources) and the daemon may not."""
    topic_partitions: int = Field(default=1, ge=1)
    """Partitions of a topic the daemon creates (one writer consumes them all)."""
    topic_replication_factor: int = Field(default=1, ge=1, le=32)
    """Replication factor of a topic the daemon creates (3 on a production cluster)."""

    @model_validator(mode="before")
    @classmethod
    def _drop_max_poll_records(cls, data: Any) -> Any:
        """Accept the removed ``max_poll_records`` with a warning, so old files still load.

        It never had an effect: every poll passes ``max_records`` (what ``batching.max_size``
        leaves room for), which overrides the consumer's setting.
        """
        if isinstance(data, dict) and DEPRECATED_KAFKA_KEY in data:
            log.warning(
                "kafka.%s is deprecated and ignored (batching.max_size bounds each poll); "
                "remove it from the settings file or the environment",
                DEPRECATED_KAFKA_KEY,
            )
            data = {k: v for k, v in data.items() if k != DEPRECATED_KAFKA_KEY}
        return data

    @model_validator(mode="after")
    def _security(self) -> KafkaSettings:
        protocol = self.security_protocol
        sasl = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_username": self.sasl_username,
            "sasl_password": self.sasl_password,
        }
        ssl = {
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
        }
        uses_sasl = protocol.startswith("SASL_")
        uses_tls = protocol.endswith("SSL")
        problems = []
        for name, value in sasl.items():
            if uses_sasl and not value:
                problems.append((name, f"required when security_protocol is {protocol}"))
            elif not uses_sasl and value is not None:
                problems.append(
                    (name, f"set, but {protocol} has no SASL; remove it or use SASL_SSL")
                )
        for name, value in ssl.items():
            if not uses_tls and value is not None:
                problems.append(
                    (name, f"set, but {protocol} has no TLS; remove it or use SASL_SSL")
                )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            problems.append(("ssl_keyfile", "ssl_certfile and ssl_keyfile go together"))
        if self.session_timeout_ms >= self.max_poll_interval_ms:
            problems.append(("session_timeout_ms", "must be below max_poll_interval_ms"))
        if problems:
            raise _CrossFieldError(problems)
        return self


class ModelSettings(_Section):
    """Which model the daemon owns and where it runs."""

    name: Name = "smollm2"
    """A known model key (``smollm2``) or a local Hugging Face folder."""
    device: Annotated[str, AfterValidator(_check_device)] = "cpu"
    dtype: Dtype = "float32"
    torch_threads: int | None = Field(default=None, ge=1, le=256)
    """Pin torch's intra-op threads (``torch.set_num_threads``): float reductions, and so edits
    and their replay, are bit-exact only at the same count. None: torch's default (cores)."""


class RetryRung(_Section):
    """One step of the retry ladder: the editor an edit that did not take is tried with next."""

    method: EditorName | None = None
    """The editing method; None: the configured ``editor.method``."""
    options: dict[str, bool | int | float | str] = Field(default_factory=dict)
    """Overrides of the method's config for this rung. For the configured method they go on
    top of ``editor.options``; another method starts from its own defaults."""


#: The ladder used when ``editor.retry_ladder`` is unset, per method. FT-L gets a second try
#: with 40 Adam steps (its default is 10, and the early stop at ``stop_nll`` keeps easy edits
#: cheap). NSE whose values come from the value network (``v_optimiser: net``) gets NSE's own
#: Adam values to the reference's stop (the precise method, ~4x its cost; ``NSE_PRECISE_RUNG``).
#: EMSEdit's trained step count is the most its sequential checkpoint allows, and the guarded
#: editors hold a memory of past edits that another editor would miss, so they retry alone with
#: the same editor only. The fact memory retries a value that fell short with Adam until the
#: target leads by a log-probability margin of 3 (its default: 1) for up to 50 steps (25).
DEFAULT_RETRY_LADDERS: dict[str, tuple[RetryRung, ...]] = {
    "ft": (RetryRung(options={"num_steps": 40}),),
    "memory": (RetryRung(options={"stop_margin": 3.0, "v_num_grad_steps": 50}),),
}
NSE_PRECISE_RUNG = RetryRung(options={"v_optimiser": "adam", "early_stop_loss": 0.05})
#: Most rungs a ladder may have (bounds the ``rung`` metric label and a failing event's cost).
MAX_RETRY_RUNGS = 4


class EditorSettings(_Section):
    """The editing method; its hyperparameters live in the method's own config class."""

    method: EditorName = "memory"
    """The fact memory (``editing.memory``): the one method measured whose edits take, hold and
    leave unrelated answers alone on SmolLM2 (README, Results; it also rewrites the same
    subject's other facts); ``ft``, ``emsedit`` and ``nse`` stay selectable."""
    checkpoint: UserPath | None = None
    """A trained editor checkpoint (safetensors + JSON); default: the one shipped for the model."""
    options: dict[str, bool | int | float | str] = Field(default_factory=dict)
    """Overrides of fields of the method's own config (e.g. ``num_steps: 40`` for ``ft``) and its
    other options (``Editor.option_names``): names are checked at load, values when the editor
    is built."""
    transient_retries: int = Field(default=2, ge=0, le=10)
    """Retries of an editor call that failed with a transient error (below) before its events
    fail to the DLQ; the weights are rebuilt from the journal before each retry."""
    transient_backoff_s: float = Field(default=0.5, ge=0.0, le=60.0)
    """Wait before the first retry; doubled before each further one."""
    transient_error_types: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=lambda: ["torch.OutOfMemoryError"]
    )
    """Exception classes that count as transient, as ``module.QualName`` or ``QualName``;
    subclasses count too."""
    transient_error_messages: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=lambda: ["out of memory"]
    )
    """Text that makes any editor error transient when its message contains it (case is
    ignored), e.g. a ``RuntimeError: ... out of memory`` from an allocator."""
    subset_rounds: int = Field(default=3, ge=1, le=16)
    """Times a batch whose post-check failed for some edits is undone and re-applied as one
    unit without them, before every edit not yet kept is tried alone (the retry ladder)."""
    retry_ladder: list[RetryRung] | None = Field(default=None, max_length=MAX_RETRY_RUNGS)
    """Editors an edit that did not take alone is tried with, in order, before it fails to the
    DLQ with every rung's answer; each rung applies the edit alone and post-checks it. None:
    the method's default (``DEFAULT_RETRY_LADDERS``: FT-L again with ``num_steps: 40``, the
    fact memory with Adam to a loss of 0.05, NSE with the value network again with Adam values,
    none for the other methods); ``[]``: alone
    with the configured editor only. The rungs of an editor that keeps a memory of past edits
    (NSE) must be the same method with other options, which share its memory. Replay rebuilds
    an edit with the rung that applied it, so a rung the journal names must stay in the ladder."""

    @model_validator(mode="after")
    def _known_options(self) -> EditorSettings:
        """A misspelt option is refused at load, before a model loads, not by the editor."""
        problems = [(f"options.{k}", m) for k, m in _unknown_options(self.method, self.options)]
        for index, rung in enumerate(self.retry_ladder or ()):
            found = _unknown_options(rung.method or self.method, rung.options)
            problems += [(f"retry_ladder.{index}.options.{k}", m) for k, m in found]
        if problems:
            raise _CrossFieldError(problems)
        return self

    def ladder(self) -> list[RetryRung]:
        """The rungs in force: ``retry_ladder``, or the method's default."""
        if self.retry_ladder is not None:
            return list(self.retry_ladder)
        if self.method == "nse" and self.options.get("v_optimiser") == "net":
            return [NSE_PRECISE_RUNG]
        return list(DEFAULT_RETRY_LADDERS.get(self.method, ()))

    def rung_options(self, rung: RetryRung) -> tuple[str, dict[str, bool | int | float | str]]:
        """A rung's method and the options its editor is built with."""
        method = rung.method or self.method
        if method == self.method:
            return method, {**self.options, **rung.options}
        return method, dict(rung.options)


#: The safeguards' switches by their former names, now those of method specs (``emsedit+mask``);
#: a file or environment that still uses one loads, with a warning.
RENAMED_SAFEGUARDS: dict[str, str] = {
    "original_weight_targets": "rewind",
    "neuron_mask": "mask",
    "preserved_knowledge": "preserve",
    "norm_guard": "normguard",
}


class SafeguardSettings(_HoldsConfig):
    """Neuron-level safeguards around any editor's delta (nse.md section 8), each switchable."""

    config_field = "config"

    config: Annotated[SafeguardConfig, WrapValidator(_by_field)] = Field(
        default_factory=SafeguardConfig
    )
    """Which safeguards run and their thresholds: the fields of
    ``editing.safeguard_config.SafeguardConfig``, written flat in this section."""
    methods: list[EditorName] = Field(default_factory=lambda: ["emsedit"])
    """Editors the daemon wraps with the safeguards (the hypernetwork editor by default)."""
    corpus: UserPath | None = None
    """Plain text whose key statistics (C0) stand for preserved knowledge; default: the
    shared WikiText-2 validation file (``editing.keystats.DEFAULT_CORPUS``)."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """Read a switch by its former name, with a warning. Runs before ``_gather``: pydantic
        runs a subclass's before-validators first."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for old, new in RENAMED_SAFEGUARDS.items():
            if old not in data:
                continue
            if new in data:
                raise _CrossFieldError([(old, f"the former name of {new}, which is set too")])
            log.warning(
                "safeguards.%s is deprecated: it is now safeguards.%s (as in emsedit+%s); "
                "rename it in the settings file or the environment",
                old,
                new,
                new,
            )
            data[new] = data.pop(old)
        return data

    def wraps(self, method: str) -> bool:
        """Whether the daemon guards ``method`` (at least one safeguard on and listed)."""
        return method in self.methods and any(getattr(self.config, g) for g in GUARDS)


class BatchingSettings(_Section):
    """Micro-batching of events into one edit call."""

    max_size: int = Field(default=8, ge=1, le=256)
    linger_ms: int = Field(default=200, ge=0, le=60_000)
    """How long to wait for a batch to fill once its first event arrived."""


class JournalSettings(_Section):
    """The durable journal (SQLite, WAL, fsync on commit)."""

    path: UserPath
    """Default: ``$FACTKEEPER_HOME/state/journal.sqlite3``."""
    store_deltas: bool = True
    """Keep each applied unit's weight change beside the journal (``<path>.deltas/``), so a
    restart adds it back instead of re-editing; pruned once a version holds the unit."""

    @model_validator(mode="before")
    @classmethod
    def _default_path(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and data.get("path") is None:
            return {**data, "path": _paths(info).state_dir / "journal.sqlite3"}
        return data


class SnapshotSettings(_Section):
    """When to snapshot and where versions are registered (0 disables a trigger)."""

    every_n_edits: int = Field(default=100, ge=0)
    every_minutes: float = Field(default=15.0, ge=0.0)
    on_shutdown: bool = True
    registered_model_name: Name = "factkeeper"
    retry_initial_s: float = Field(default=30.0, gt=0.0)
    """First wait before retrying a failed snapshot (MLflow down); doubles per failure."""
    retry_max_s: float = Field(default=900.0, gt=0.0)
    """Longest wait between snapshot retries."""
    request_timeout_s: int = Field(default=30, ge=1)
    """MLflow HTTP request timeout (MLFLOW_HTTP_REQUEST_TIMEOUT unless that is set)."""
    request_max_retries: int = Field(default=2, ge=0, le=10)
    """MLflow HTTP retries per request (MLFLOW_HTTP_REQUEST_MAX_RETRIES unless set); low, so
    an MLflow outage costs the loop seconds, not minutes; the daemon retries with backoff."""
    tracking_uri: str
    """Default: embedded SQLite under ``$FACTKEEPER_HOME/mlflow``. No credentials in the URI:
    MLflow reads them from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""

    @model_validator(mode="before")
    @classmethod
    def _default_uri(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and data.get("tracking_uri") is None:
            db = (_paths(info).mlflow_dir / "mlflow.db").absolute()
            return {**data, "tracking_uri": f"sqlite:///{db}"}
        return data

    @model_validator(mode="after")
    def _no_password_in_uri(self) -> SnapshotSettings:
        if not self.tracking_uri.strip():
            raise _CrossFieldError([("tracking_uri", "must not be empty")])
        if urlsplit(self.tracking_uri).password is not None:
            raise _CrossFieldError(
                [("tracking_uri", "holds a password; use MLFLOW_TRACKING_PASSWORD instead")]
            )
        return self


class AuditSettings(_HoldsConfig):
    """Audit schedule (0 disables a trigger) and gate thresholds (ratios are in [0, 1]).

    Audits need snapshots on: a failed gate rolls back to a registered version, so audits on
    with every snapshot trigger off is refused at load (``Settings``)."""

    config_field = "thresholds"

    every_n_edits: int = Field(default=100, ge=0)
    every_minutes: float = Field(default=30.0, ge=0.0)
    thresholds: Annotated[GateThresholds, WrapValidator(_by_field)] = Field(
        default_factory=GateThresholds
    )
    """The gate's floors and allowed changes: the fields of ``monitoring.gates.GateThresholds``
    (``retention_floor``, ``locality_floor``, ``max_drop``, ``max_perplexity_drift``), written
    flat in this section."""
    probe_set: UserPath | None = None
    """Locality probes (JSONL); default: the bundled set."""
    text_sample: UserPath | None = None
    """Plain text for the perplexity check, one passage a line; default: the probe set's
    statements ("<prompt> <answer>")."""
    sample_cap: int = Field(default=1000, ge=1)
    """Audit all applied edits up to this many, beyond it a seeded stratified sample."""
    residual_cache_mib: int = Field(default=1024, ge=0)
    """Disk (MiB, in the state folder) for the audited prompts' inputs to the lowest edited
    block, which no edit changes: kept across restarts so the first audit after one does not
    run the lower blocks again; the oldest go past the cap. 0: kept in memory only."""
    on_failure: Literal["quarantine", "warn"] = "quarantine"
    """What a failed gate does. ``quarantine``: roll back to ``production`` and quarantine the
    edits since. ``warn``: keep the edits and the weights, log a warning and record the audit
    (``action: warned``; the floor alerts still fire); ``production`` does not move. For an
    editor that does not meet the floors yet, where quarantine would undo every edit."""


class ConsolidationSettings(_Section):
    """When to re-solve the live set jointly from the base weights (0 disables a trigger).

    Runs only with audits on (a consolidation is judged by auditing the weights before and
    after it) and an editor with a joint solve; otherwise the daemon logs why at start."""

    every_n_edits: int = Field(default=1000, ge=0)
    """The fact memory (the default editor) rebuilds from each live event's stored row, so a
    consolidation costs its two audits; it frees the rows of superseded corrections and gives a
    restart an audited version to start from. With FT-L a rebuild of 200 live edits took 16 min
    and held far fewer of them (README, Consolidation): set 0 there."""
    every_minutes: float = Field(default=0.0, ge=0.0)
    tolerance: float = Field(default=0.0, ge=0.0, le=1.0)
    """How far retention or locality may fall below the current weights' for the consolidated
    version to be accepted anyway."""
    on_removal: bool = False
    """Remove an edit (revert, a correction back to the original answer) by re-solving the live
    set from the base weights instead of replaying every edit after the version before it. Off:
    replay adds the stored deltas back (seconds with the fact memory), and FT-L's joint fit
    holds far fewer facts than its sequential edits (README, Consolidation)."""

    @property
    def enabled(self) -> bool:
        return self.every_n_edits > 0 or self.every_minutes > 0


class MetricsSettings(_Section):
    """The Prometheus endpoint (``/metrics``, ``/healthz``, ``/readyz``)."""

    host: Name = "0.0.0.0"
    port: int = Field(default=9108, ge=1, le=65535)
    healthz_max_age_s: float = Field(default=900.0, gt=0.0)
    """``/healthz`` answers 503 once the main loop has not gone round for this long; keep it
    above the longest batch + snapshot + audit (like ``kafka.max_poll_interval_ms``)."""


class AdminSettings(_Section):
    """The authenticated admin HTTP endpoint for control commands, and the control-topic key."""

    enabled: bool = False
    """Serve ``POST /control`` and ``GET /control/<id>`` (``daemon/control/admin.py``)."""
    host: Name = "127.0.0.1"
    """Interface to listen on; loopback by default (reach it with ``kubectl port-forward``)."""
    port: int = Field(default=9109, ge=1, le=65535)
    token: SecretStr | None = None
    """Bearer token of the HTTP endpoint; required when enabled, at least 16 characters. It
    is not the control-topic key (``control.keys``): the two must differ."""

    @model_validator(mode="after")
    def _token(self) -> AdminSettings:
        if self.enabled and self.token is None:
            raise _CrossFieldError([("token", "required when admin.enabled is true")])
        if self.token is not None and len(self.token.get_secret_value()) < _MIN_ADMIN_TOKEN_CHARS:
            raise _CrossFieldError(
                [("token", f"must be at least {_MIN_ADMIN_TOKEN_CHARS} characters")]
            )
        return self


class ControlSettings(_Section):
    """Who may send commands on the control topic (``daemon/control/auth.py``)."""

    keys: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")], SecretStr] = Field(
        default_factory=dict
    )
    """HMAC keys by key id (>= 16 characters each), e.g. ``FACTKEEPER_CONTROL__KEYS__K2025``;
    several ids allow rotation. Records must be signed with one of them."""
    signing_key_id: str | None = None
    """The key id ``factkeeper rollback`` etc. sign with; default: the only key."""
    max_age_s: float = Field(default=300.0, gt=0.0, le=86_400.0)
    """Refuse a signed record issued longer ago (or further ahead) than this; its nonce is
    remembered for this long."""
    allow_unsigned: bool = False
    """Run unsigned control records when no key is configured; only for local demos and
    tests. Without keys and without this, every control-topic record is refused."""

    @model_validator(mode="after")
    def _keys(self) -> ControlSettings:
        problems = []
        for key_id, key in self.keys.items():
            if len(key.get_secret_value()) < _MIN_ADMIN_TOKEN_CHARS:
                problems.append((f"keys.{key_id}", f"at least {_MIN_ADMIN_TOKEN_CHARS} chars"))
        if self.signing_key_id is not None and self.signing_key_id not in self.keys:
            problems.append(("signing_key_id", "names no key in control.keys"))
        if problems:
            raise _CrossFieldError(problems)
        return self

    def signing_key(self) -> tuple[str, SecretStr] | None:
        """(key id, key) the CLI signs with, or None when there is no key."""
        if self.signing_key_id is not None:
            return self.signing_key_id, self.keys[self.signing_key_id]
        return next(iter(sorted(self.keys.items())), None)


class Settings(_Section):
    """Everything the daemon reads from outside; build it with ``load_settings``."""

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    editor: EditorSettings = Field(default_factory=EditorSettings)
    safeguards: SafeguardSettings = Field(default_factory=SafeguardSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    journal: JournalSettings = Field(default_factory=JournalSettings)
    snapshots: SnapshotSettings = Field(default_factory=SnapshotSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    consolidation: ConsolidationSettings = Field(default_factory=ConsolidationSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    control: ControlSettings = Field(default_factory=ControlSettings)

    @model_validator(mode="after")
    def _separate_secrets(self) -> Settings:
        token = self.admin.token.get_secret_value() if self.admin.token else None
        if token is not None and any(
            k.get_secret_value() == token for k in self.control.keys.values()
        ):
            raise ValueError(
                "control.keys must not reuse admin.token: the bearer token and the control "
                "HMAC key are separate secrets"
            )
        return self

    @model_validator(mode="after")
    def _audits_need_snapshots(self) -> Settings:
        a, s = self.audit, self.snapshots
        audits_on = a.every_n_edits > 0 or a.every_minutes > 0
        snapshots_on = s.every_n_edits > 0 or s.every_minutes > 0 or s.on_shutdown
        if audits_on and not snapshots_on:
            raise ValueError(
                "audits are on (audit.every_n_edits or audit.every_minutes) but snapshots are "
                "off (snapshots.every_n_edits and every_minutes are 0, on_shutdown is false): a "
                "failed audit gate could neither roll back nor quarantine, only report. Turn "
                "snapshots on (e.g. snapshots.on_shutdown: true) or audits off (audit."
                "every_n_edits: 0 and audit.every_minutes: 0)"
            )
        return self

    def redacted_dict(self) -> dict[str, Any]:
        """JSON-ready settings with every secret shown as ``***`` (unset ones stay null)."""
        return _redacted(self)


SECTIONS: tuple[str, ...] = tuple(Settings.model_fields)
#: Section -> the field holding its config object, a name that the settings file never writes.
_CONFIG_FIELDS: dict[str, str] = {
    name: field.annotation.config_field
    for name, field in Settings.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, _HoldsConfig)
}
#: The commented default settings file, shipped in the package (a copy of configs/default.yaml).
DEFAULT_CONFIG_FILE = "default.yaml"


def default_config_text() -> str:
    """The shipped ``default.yaml``: every key with its default and a comment."""
    return resources.files("daemon").joinpath(DEFAULT_CONFIG_FILE).read_text(encoding="utf-8")


def load_settings(path: Path | None, env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings: defaults, then the YAML file, then ``FACTKEEPER_*`` variables.

    Args:
        path: a YAML file such as ``configs/default.yaml``; ``None`` for defaults + environment.
        env: the environment to read (default ``os.environ``); also gives ``FACTKEEPER_HOME``,
            under which the default journal and MLflow locations lie.

    Environment variables name a field by its path: ``FACTKEEPER_KAFKA__GROUP_ID``,
    ``FACTKEEPER_KAFKA__TOPICS__DLQ``. An empty value sets the field to null (its default for
    the path fields). Names without ``__`` (``FACTKEEPER_HOME``) are not settings, but one
    that starts with a section name (``FACTKEEPER_KAFKA_GROUP_ID``) is rejected as a typo.

    Raises:
        SettingsError: listing every invalid field as ``path.to.field: message``. Rules across
            fields of a section (SASL needs credentials) are checked once its fields are valid.
    """
    env = os.environ if env is None else env
    raw_home = env.get(HOME_ENV)
    paths = Paths(Path(raw_home).expanduser() if raw_home else DEFAULT_HOME.expanduser())
    source = str(path) if path is not None else "defaults and environment"
    data = _read_yaml(path) if path is not None else {}
    overrides, origins = _env_overrides(env)
    _merge(data, overrides)
    for section in SECTIONS:
        if data.get(section) is None:  # a section whose keys are all commented out
            data[section] = {}
    try:
        return Settings.model_validate(data, context={"paths": paths})
    except ValidationError as exc:
        # ``from None``: the chained pydantic error could echo an input value (a password).
        raise SettingsError(_problems(exc, origins), source=source) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = "copy configs/default.yaml there (`factkeeper config default` prints it)"
        raise SettingsError([("", f"{path} does not exist; {hint} and edit it")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError([("", f"cannot read {path}: {exc}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SettingsError([("", f"not valid YAML: {exc.problem}{where}")], str(path)) from None
    except yaml.YAMLError:
        raise SettingsError([("", "not valid YAML")], str(path)) from None
    if data is None:
        raise SettingsError(
            [("", "the file is empty (or only comments); start from configs/default.yaml")],
            str(path),
        )
    if not isinstance(data, dict):
        raise SettingsError(
            [("", f"the top level must be a mapping of sections ({', '.join(SECTIONS)})")],
            str(path),
        )
    return data


def _env_overrides(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """Nested overrides from ``FACTKEEPER_*__*`` and, per field path, the variable it came from."""
    overrides: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    problems: list[tuple[str, str]] = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        if ENV_NESTING not in rest:
            head = rest.split("_", 1)[0].lower()
            if head in SECTIONS and rest.lower() != head:
                field = rest[len(head) + 1 :]
                hint = f"{ENV_PREFIX}{head.upper()}{ENV_NESTING}{field}"
                problems.append((name, f"not a setting; did you mean {hint}?"))
            continue
        keys = tuple(part.lower() for part in rest.split(ENV_NESTING))
        if not all(keys):
            problems.append((name, "empty name segment; use FACTKEEPER_<SECTION>__<FIELD>"))
            continue
        clash = next((origins[keys[:n]] for n in range(1, len(keys)) if keys[:n] in origins), None)
        clash = clash or next((o for k, o in origins.items() if k[: len(keys)] == keys), None)
        if clash:
            problems.append((name, f"conflicts with {clash}; set one or the other"))
            continue
        node = overrides
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = env[name] if env[name] != "" else None
        origins[keys] = name
    if problems:
        raise SettingsError(problems, source="environment")
    return overrides, origins


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    """Deep-merge ``overrides`` into ``base``; an override replaces any non-mapping value."""
    for key, value in overrides.items():
        current = base.get(key)
        if isinstance(value, Mapping) and isinstance(current, dict):
            _merge(current, value)
        else:
            base[key] = dict(value) if isinstance(value, Mapping) else value


def _problems(
    exc: ValidationError, origins: Mapping[tuple[str, ...], str]
) -> list[tuple[str, str]]:
    """``(dotted field path, message)`` per error; cross-field rules name each of their fields."""
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = tuple(str(part) for part in err["loc"])
        if len(loc) > 1 and _CONFIG_FIELDS.get(loc[0]) == loc[1]:
            loc = loc[:1] + loc[2:]  # a config object's fields are written flat in the file
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, _CrossFieldError):
            items = [(loc + (field,), message) for field, message in cause.problems]
        elif err["type"] == "extra_forbidden":
            items = [(loc, "unknown setting")]
        else:
            items = [(loc, err["msg"].removeprefix("Value error, "))]
        for where, message in items:
            origin = _origin(where, origins)
            suffix = f" (from {origin})" if origin else ""
            problems.append((".".join(where), message + suffix))
    return problems


def _origin(where: tuple[str, ...], origins: Mapping[tuple[str, ...], str]) -> str | None:
    """The variable that set this field, a field above it, or (unknown keys) one below it."""
    for n in range(len(where), 0, -1):
        if where[:n] in origins:
            return origins[where[:n]]
    return next((name for keys, name in origins.items() if keys[: len(where)] == where), None)


def _redacted(model: BaseModel) -> dict[str, Any]:
    out = model.model_dump(mode="json")
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out[name] = _redacted(value)
        elif isinstance(value, SecretStr):
            out[name] = "***"
        elif isinstance(value, dict) and any(isinstance(v, SecretStr) for v in value.values()):
            out[name] = {k: "***" for k in value}
    return out

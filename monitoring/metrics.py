"""Every Prometheus metric factkeeper exports, defined once, on an injected registry.

Names follow Prometheus conventions: the ``factkeeper_`` prefix, base units (seconds, bytes,
ratios in [0, 1]), ``_total`` on counters (added by prometheus-client), and no high-cardinality
labels: event ids and subjects never become labels, so the endpoint exposes no event contents.
The daemon owns one ``FactkeeperMetrics``; tests pass a fresh ``CollectorRegistry`` each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# Edits take from a fraction of a second (a hypernetwork shift) to minutes (NSE on a big model);
# the default buckets (5 ms to 10 s) would put most observations in +Inf.
EDIT_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
AUDIT_SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
SNAPSHOT_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

EVENT_RESULTS = ("applied", "duplicate", "invalid", "failed", "quarantined", "rolled_back")
#: Where an applied edit took (its ``AppliedUnit.stage`` in ``daemon.ingest.applier``): in the
#: call that first tried it, in a batch re-applied without its failed edits, alone with the
#: configured editor, or on a ladder rung (at most ``daemon.config.MAX_RETRY_RUNGS`` of them, so
#: the label stays bounded). The label keeps its name, ``rung``, for dashboards and alerts.
EDIT_RUNGS = ("first", "subset", "alone", "rung1", "rung2", "rung3", "rung4")


class FactkeeperMetrics:
    """The daemon's metrics; one instance per process (or per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "factkeeper_events",
            "Fact-correction events consumed, by outcome.",
            ["result"],
            registry=r,
        )
        for result in EVENT_RESULTS:
            self.events.labels(result=result)  # export zeros, so rates exist from the start
        self.edits_by_rung = Counter(
            "factkeeper_edits_by_rung",
            "Edits applied, by the step of the retry ladder they took on.",
            ["rung"],
            registry=r,
        )
        for rung in EDIT_RUNGS:
            self.edits_by_rung.labels(rung=rung)
        self.edit_duration = Histogram(
            "factkeeper_edit_duration_seconds",
            "Wall time to compute, apply and post-check one edit batch.",
            buckets=EDIT_SECONDS_BUCKETS,
            registry=r,
        )
        self.edit_batch_size = Histogram(
            "factkeeper_edit_batch_size",
            "Events per applied edit batch.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.edits_applied = Gauge(
            "factkeeper_edits_applied",
            "Edits held by the current model (since the base weights).",
            registry=r,
        )
        self.retention = Gauge(
            "factkeeper_retention_ratio",
            "Share of applied edits that still hold at the last audit.",
            registry=r,
        )
        self.locality = Gauge(
            "factkeeper_locality_ratio",
            "Share of locality probes whose answer is unchanged from the base model.",
            registry=r,
        )
        self.generalization = Gauge(
            "factkeeper_generalization_ratio",
            "Share of rephrased prompts of applied edits answered with the new target.",
            registry=r,
        )
        self.audit_duration = Histogram(
            "factkeeper_audit_duration_seconds",
            "Wall time of one audit.",
            buckets=AUDIT_SECONDS_BUCKETS,
            registry=r,
        )
        self.audit_last_success = Gauge(
            "factkeeper_audit_last_success_timestamp_seconds",
            "Unix time of the last audit that completed (pass or fail).",
            registry=r,
        )
        self.model_version = Info(
            "factkeeper_model_version",
            "The model version the daemon serves edits on.",
            registry=r,
        )
        self.rollbacks = Counter(
            "factkeeper_rollbacks",
            "Rollbacks to an earlier version, by reason.",
            ["reason"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "factkeeper_consumer_lag_messages",
            "Messages between the committed offset and the end of each partition.",
            ["partition"],
            registry=r,
        )
        self.snapshot_duration = Histogram(
            "factkeeper_snapshot_duration_seconds",
            "Wall time to write and register one snapshot.",
            buckets=SNAPSHOT_SECONDS_BUCKETS,
            registry=r,
        )
        self.snapshot_bytes = Gauge(
            "factkeeper_snapshot_bytes",
            "Size of the last snapshot's weight deltas.",
            registry=r,
        )
        self.snapshot_failures = Counter(
            "factkeeper_snapshot_failures",
            "Snapshots that could not be registered (MLflow down or failing); retried later.",
            registry=r,
        )
        self.snapshot_consecutive_failures = Gauge(
            "factkeeper_snapshot_consecutive_failures",
            "Snapshot attempts that failed in a row since the last success (0: healthy).",
            registry=r,
        )
        self.snapshot_last_success = Gauge(
            "factkeeper_snapshot_last_success_timestamp_seconds",
            "Unix time of the last snapshot registered in MLflow.",
            registry=r,
        )
        self.consolidations = Counter(
            "factkeeper_consolidations",
            "Consolidations (joint re-solves of the live set from the base weights), by outcome:"
            " accepted, rejected (lost to the weights it would replace) or failed.",
            ["outcome"],
            registry=r,
        )
        self.consolidation_duration = Histogram(
            "factkeeper_consolidation_duration_seconds",
            "Wall time of one consolidation, both audits included.",
            buckets=AUDIT_SECONDS_BUCKETS,
            registry=r,
        )
        self.memory_rows = Gauge(
            "factkeeper_memory_rows",
            "Rows of the fact memory that hold a correction, read at scrape time (0: no memory).",
            registry=r,
        )
        self.memory_capacity = Gauge(
            "factkeeper_memory_capacity_rows",
            "Rows the fact memory has; a full memory refuses edits (0: no memory).",
            registry=r,
        )
        self.weight_delta_norm = Gauge(
            "factkeeper_weight_delta_norm",
            "Frobenius norm of the accumulated delta of each edited module vs the base weights.",
            ["module"],
            registry=r,
        )

    def set_model_version(self, version: str, base_model: str, alias: str = "") -> None:
        self.model_version.info({"version": version, "base_model": base_model, "alias": alias})

    def set_lag(self, lag_by_partition: Mapping[int, int]) -> None:
        for partition, lag in lag_by_partition.items():
            self.consumer_lag.labels(partition=str(partition)).set(lag)

    def watch_memory(self, used_rows: Callable[[], int], capacity: int) -> None:
        """Export the fact memory's fill: ``used_rows`` is called at every scrape, so the gauge
        follows edits, rollbacks and restores without each of them reporting it."""
        self.memory_rows.set_function(lambda: float(used_rows()))
        self.memory_capacity.set(capacity)

    def set_delta_norms(self, norms: Mapping[str, float]) -> None:
        for module, norm in norms.items():
            self.weight_delta_norm.labels(module=module).set(norm)

"""Soak: drain a backlog through one daemon process and watch its RSS, threads and fds.

N corrections are queued first; one ``factkeeper run`` child then drains them (exiting once
idle) while ``/proc/<pid>`` is sampled every ``sample_period_s``. Samples are placed on the
stream by the journal's row count at the time. Warm-up is the first ``warmup_fraction`` of the
stream (imports, first allocations, allocator pools). Growth compares the median RSS of the
window right after warm-up with the median of the last window of the stream; threads and open
file descriptors in the last window must not exceed their maximum in the first.

Edits use FT-L with fewer steps than the other scenarios (``SOAK_FT_OPTIONS``): the soak is
about what the daemon keeps per event, not edit quality, and the whole edit path (hooks, Adam,
post-check, undo of edits that do not take, DLQ, journal, commit) still runs for every event.
"""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.daemon.builders import to_bytes
from tests.daemon.harness import (
    FT_OPTIONS,
    config_file,
    create_topics,
    env_for,
    fact,
    journal_path,
    produce,
)
from tests.reliability.daemon_process import DaemonProcess
from tests.reliability.observe import JournalView, ProcSample, ProcSampler

SOAK_FT_OPTIONS = {**FT_OPTIONS, "num_steps": 10, "lr": 0.2}


@dataclass(frozen=True)
class SoakConfig:
    """One soak run."""

    events: int = 1000
    warmup_fraction: float = 0.2
    window_fraction: float = 0.1
    sample_period_s: float = 0.5
    max_rss_growth: float = 0.10
    idle_timeout_s: float = 3.0
    run_timeout_s: float = 3600.0
    editor_options: dict[str, Any] = field(default_factory=lambda: dict(SOAK_FT_OPTIONS))

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_fraction < 1 - 2 * self.window_fraction:
            raise ValueError("warm-up plus two windows must fit in the stream")
        if self.window_fraction <= 0:
            raise ValueError("window_fraction must be positive")


@dataclass
class SoakResult:
    """What the soak measured; ``failures()`` lists every broken promise."""

    config: dict[str, Any]
    exit_code: int | None = None
    consumed: int | None = None
    journal_rows: int = 0
    ids_not_claimed_once: int = 0
    process_s: float = 0.0
    drain_s: float = 0.0
    events_per_s: float = 0.0
    samples: int = 0
    baseline_samples: int = 0
    final_samples: int = 0
    rss_baseline_mib: float = 0.0
    rss_final_mib: float = 0.0
    rss_growth: float | None = None
    rss_max_mib: float = 0.0
    rss_slope_mib_per_1k_events: float | None = None
    threads_baseline_max: int = 0
    threads_final_max: int = 0
    fds_baseline_max: int = 0
    fds_final_max: int = 0
    fds_final_min: int = 0
    """The end window's floor. Writing a unit's stored deltas holds two fds for a moment (the
    temporary file, then its folder for fsync), so a sample may catch one more than the last;
    a leak raises the floor, a write in progress does not."""
    series: list[tuple[float, int, float, int, int]] = field(default_factory=list)
    """(t s, journal rows, RSS MiB, threads, fds), every sample, for plotting."""

    def failures(self) -> list[str]:
        n = self.config["events"]
        problems = []
        if self.exit_code != 0 or self.consumed != n:
            problems.append(f"daemon exit {self.exit_code}, consumed {self.consumed} of {n}")
        if self.journal_rows != n or self.ids_not_claimed_once:
            problems.append(
                f"{self.journal_rows} journal rows for {n}; {self.ids_not_claimed_once} ids "
                "not claimed exactly once"
            )
        if self.baseline_samples < 3 or self.final_samples < 3:
            problems.append(
                f"too few samples to judge ({self.baseline_samples} after warm-up, "
                f"{self.final_samples} at the end)"
            )
        elif self.rss_growth is None or self.rss_growth > self.config["max_rss_growth"]:
            problems.append(
                f"RSS grew {self.rss_growth:.1%} after warm-up ({self.rss_baseline_mib:.1f} -> "
                f"{self.rss_final_mib:.1f} MiB), limit {self.config['max_rss_growth']:.0%}"
            )
        if self.threads_final_max > self.threads_baseline_max:
            problems.append(f"threads grew {self.threads_baseline_max} -> {self.threads_final_max}")
        if self.fds_final_min > self.fds_baseline_max:
            problems.append(
                f"open fds grew {self.fds_baseline_max} -> at least {self.fds_final_min}"
            )
        return problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_soak(bootstrap: str, workdir: Path, model_dir: Path, config: SoakConfig) -> SoakResult:
    """Run the scenario against the broker at ``bootstrap``; see the module docstring."""
    result = SoakResult(config=asdict(config))
    topic = f"soak-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, topic)
    produce(bootstrap, topic, [to_bytes(fact(i)) for i in range(config.events)])

    env = env_for(workdir / "daemon", bootstrap, topic, model_dir)
    journal = journal_path(env)
    config_path = config_file(Path(env["FACTKEEPER_HOME"]), config.editor_options)
    args = ("--idle-timeout", str(config.idle_timeout_s))
    with DaemonProcess(config_path, env, workdir / "daemon" / "daemon.log", args) as child:
        with ProcSampler(child.pid, journal, config.sample_period_s) as sampler:
            result.exit_code = child.wait(config.run_timeout_s)
        result.process_s = round(time.monotonic() - child.started, 2)
        result.consumed = child.stats().get("consumed")
    samples = sampler.samples

    view = JournalView.read(journal)
    result.journal_rows = len(view.rows)
    claims = view.claims_per_id()
    result.ids_not_claimed_once = sum(
        1 for i in range(config.events) if claims.get(fact(i)["id"], 0) != 1
    )
    busy = [s for s in samples if 0 < s.progress < config.events]
    if busy:
        result.drain_s = round(busy[-1].t - busy[0].t, 2)
        result.events_per_s = round(
            (busy[-1].progress - busy[0].progress) / max(result.drain_s, 1e-9), 2
        )
    result.samples = len(samples)
    result.series = [
        (s.t, s.progress, round(s.rss_bytes / 2**20, 2), s.threads, s.fds) for s in samples
    ]
    _judge(result, samples, config)
    return result


def _judge(result: SoakResult, samples: list[ProcSample], config: SoakConfig) -> None:
    n = config.events
    start = config.warmup_fraction * n
    baseline = [s for s in samples if start <= s.progress < start + config.window_fraction * n]
    final = [s for s in samples if s.progress >= (1 - config.window_fraction) * n]
    result.baseline_samples, result.final_samples = len(baseline), len(final)
    after_warmup = [s for s in samples if s.progress >= start]
    if after_warmup:
        result.rss_max_mib = round(max(s.rss_bytes for s in after_warmup) / 2**20, 2)
        result.rss_slope_mib_per_1k_events = _slope(after_warmup)
    if not baseline or not final:
        return
    base_rss = statistics.median(s.rss_bytes for s in baseline)
    final_rss = statistics.median(s.rss_bytes for s in final)
    result.rss_baseline_mib = round(base_rss / 2**20, 2)
    result.rss_final_mib = round(final_rss / 2**20, 2)
    result.rss_growth = round(final_rss / base_rss - 1, 4)
    result.threads_baseline_max = max(s.threads for s in baseline)
    result.threads_final_max = max(s.threads for s in final)
    result.fds_baseline_max = max(s.fds for s in baseline)
    result.fds_final_max = max(s.fds for s in final)
    result.fds_final_min = min(s.fds for s in final)


def _slope(samples: list[ProcSample]) -> float | None:
    """Least-squares RSS growth in MiB per 1000 journaled events."""
    xs = [s.progress for s in samples]
    if len(set(xs)) < 2:
        return None
    ys = [s.rss_bytes / 2**20 for s in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    num = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    den = sum((x - mx) ** 2 for x in xs)
    return round(1000 * num / den, 3)

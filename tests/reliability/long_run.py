"""Issue 9's fault and load scenarios at their long sizes, with every figure in one JSON file.

The scenarios are the ones this folder runs at short sizes in CI (one implementation, beside
this file); this script only picks the long sizes, provides a broker and the tiny model, and
records the run. It lives in the test tree, not in ``bench/``, because it drives the test
harness, and ``bench/`` imports only the shipped packages (issue 19):

* **crash**: 1 000 events, 10 kill -9s at seeded points, restarts; weights vs an uninterrupted
  run (bit-exact and max abs diff), exactly-once in the journal, committed <= journaled + 1;
* **outage**: the daemon's own broker stopped for 30 s mid-stream and restarted on the same data
  dir; ``/readyz`` while down and after, exactly-once, no restart of the daemon;
* **fuzz**: 1 000 malformed records (every kind) among 250 valid ones; DLQ reasons, no crash;
* **soak**: 10 000 events drained; RSS growth after warm-up, threads, open fds;
* **topics_late**: a daemon started on a broker without its topics (no auto-creation), 50
  events produced 15 s later; events lost and applied twice, time to the first and last row;
* **mlflow_down**: the real MLflow server stopped for 60 s mid-stream (90 events) and started
  again; the daemon keeps consuming; events lost, applied twice, snapshot failures, recovery.
* **control-redelivered**: a ``rollback`` whose offset commit is lost in a crash is delivered
  again after the restart, with corrections applied since; events lost and applied twice;
* **topic-recreated**: the corrections topic is deleted and re-created (its offsets reused):
  refused without ``--accept-journal-mismatch``, then every new record consumed; events lost
  and applied twice.

Results go to ``bench/results/reliability.json`` (merged by scenario, so ``--only`` re-runs one
without losing the others) with the exact command, git revision, machine (cores, RAM), load
average at start and end, timestamps, and each scenario's config, figures and verdict; a table
goes to stdout, logs to stderr. Exit status 1 if any scenario failed.

Usage: ``python tests/reliability/long_run.py [--only crash,outage,fuzz,soak,topics_late,
mlflow_down,control-redelivered,topic-recreated] [--seed 0]`` (``--scenarios`` is the same as
``--only``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path: put the repository there instead.
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from daemon.devtools.kafka_broker import LocalBrokerConfig, start, stop  # noqa: E402
from editing.bench import git_revision, json_default, machine_info, utc_now_iso  # noqa: E402
from tests.daemon.harness import save_editable_tiny_model  # noqa: E402
from tests.fixtures.kafka import free_loopback_ports  # noqa: E402
from tests.reliability.crash import CrashConfig, run_crash  # noqa: E402
from tests.reliability.dependencies import (  # noqa: E402
    MlflowDownConfig,
    TopicsLateConfig,
    run_mlflow_down,
    run_topics_late,
)
from tests.reliability.fuzz import FuzzConfig, run_fuzz  # noqa: E402
from tests.reliability.outage import OutageConfig, run_outage  # noqa: E402
from tests.reliability.redelivery import (  # noqa: E402
    RecreateConfig,
    RedeliveryConfig,
    run_control_redelivery,
    run_topic_recreated,
)
from tests.reliability.soak import SoakConfig, run_soak  # noqa: E402

log = logging.getLogger("reliability")

DEFAULT_OUT = REPO / "bench" / "results" / "reliability.json"
SCENARIOS = (
    "crash",
    "outage",
    "fuzz",
    "soak",
    "topics_late",
    "mlflow_down",
    "control-redelivered",
    "topic-recreated",
)
#: Scenarios that start a broker of their own (the shared one is not started for them alone).
OWN_BROKER = frozenset({"outage", "topics_late", "mlflow_down"})


def long_configs(seed: int) -> dict[str, Any]:
    """The long version of each scenario (the tests' short versions are in their modules)."""
    return {
        "crash": CrashConfig(events=1000, kills=10, seed=seed),
        "outage": OutageConfig(events=200, outage_s=30.0, stop_after=50),
        "fuzz": FuzzConfig(malformed=1000, valid=250, seed=seed),
        "soak": SoakConfig(events=10_000),
        "topics_late": TopicsLateConfig(events=50, produce_after_s=15.0),
        "mlflow_down": MlflowDownConfig(events=90, down_s=60.0, snapshot_every=5),
        "control-redelivered": RedeliveryConfig(before=10, rolled_back=10, after=20),
        "topic-recreated": RecreateConfig(before=20, after=20),
    }


def parse_only(text: str) -> list[str]:
    """``crash,soak`` -> the scenarios in that order; unknown names are a usage error."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"--only takes a comma-separated subset of {','.join(SCENARIOS)}; got {text!r}"
        )
    return list(dict.fromkeys(names))


def machine() -> dict[str, Any]:
    """CPU, cores, RAM, platform, Python, torch version and threads."""
    ram = None
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            ram = int(line.split()[1]) * 1024
    return {**machine_info(), "ram_bytes": ram, "torch": torch.__version__}


def run_scenario(
    name: str, config: Any, broker: str | None, workdir: Path, model_dir: Path
) -> tuple[dict[str, Any], list[str]]:
    """One scenario's result dict and failures (its own broker for ``outage``)."""
    runners: dict[str, Callable[[], Any]] = {
        "crash": lambda: run_crash(broker, workdir, model_dir, config),
        "outage": lambda: run_outage(workdir, model_dir, config),
        "fuzz": lambda: run_fuzz(broker, workdir, model_dir, config),
        "soak": lambda: run_soak(broker, workdir, model_dir, config),
        "topics_late": lambda: run_topics_late(workdir, model_dir, config),
        "mlflow_down": lambda: run_mlflow_down(workdir, model_dir, config),
        "control-redelivered": lambda: run_control_redelivery(broker, workdir, model_dir, config),
        "topic-recreated": lambda: run_topic_recreated(broker, workdir, model_dir, config),
    }
    result = runners[name]()
    return result.to_dict(), result.failures()


def headline(name: str, r: dict[str, Any]) -> str:
    """The figures that answer the scenario's question, in one line."""
    if name == "crash":
        c = r["config"]
        ahead = sum(len(k["offsets_ahead"]) for k in r["kills"])
        return (
            f"{c['events']} events, {len(r['kills'])} kills; weights equal "
            f"{r['weights_exactly_equal']} (max |diff| {r['max_abs_diff']:.3g}); "
            f"{r['journal_rows']} rows, {len(r['ids_not_claimed_once'])} ids not once; "
            f"committed ahead of journal {ahead}x; {r['statuses']}"
        )
    if name == "outage":
        return (
            f"broker down {r['broker_down_s']} s; not ready after {r['not_ready_after_s']} s "
            f"({r['not_ready_samples_while_down']} not-ready, {r['ready_samples_while_down']} "
            f"ready samples while down); ready {r['ready_again_after_s']} s after broker back; "
            f"{r['journal_rows']} rows {r['statuses']}; exit {r['exit_code']}"
        )
    if name == "fuzz":
        m = r["config"]["malformed"]
        return (
            f"{m} malformed: {r['malformed_in_dlq']} in DLQ "
            f"({100 * r['malformed_in_dlq'] / m:.1f} %), {r['malformed_with_expected_reason']} "
            f"with the expected reason; valid {r['valid_applied']} applied + "
            f"{r['valid_failed']} edit-failed ({r['valid_failed_in_dlq']} in DLQ); "
            f"exit {r['exit_code']}, consumed {r['consumed']}"
        )
    if name in ("topics_late", "mlflow_down"):
        line = f"events lost {r['events_lost']}, applied twice {r['applied_twice']}; "
        if name == "topics_late":
            return line + (
                f"first row {r['first_applied_after_produce_s']} s, all "
                f"{r['config']['events']} rows {r['all_journaled_after_produce_s']} s after "
                f"producing; exit {r['exit_code']}"
            )
        return line + (
            f"MLflow down {r['mlflow_down_s']} s, {r['journaled_while_down']} rows journaled "
            f"meanwhile; {r['snapshot_failures_total']} snapshot failures; version after "
            f"recovery {r['version_registered_after_recovery']}; exit {r['exit_code']}"
        )
    if name in ("control-redelivered", "topic-recreated"):
        extra = (
            f"redelivered rollback skipped {r['redelivered_skipped']}x"
            if name == "control-redelivered"
            else f"refused without the flag {r['refused_without_flag']}, "
            f"{r['retired_rows']} rows retired"
        )
        return (
            f"events lost: {r['events_lost']}, applied twice: {r['applied_twice']}; {extra}; "
            f"{r['statuses']}"
        )
    growth = r["rss_growth"]
    return (
        f"{r['config']['events']} events at {r['events_per_s']}/s; RSS "
        f"{r['rss_baseline_mib']} -> {r['rss_final_mib']} MiB "
        f"({'n/a' if growth is None else f'{growth:+.2%}'}), slope "
        f"{r['rss_slope_mib_per_1k_events']} MiB/1k events; threads "
        f"{r['threads_baseline_max']} -> {r['threads_final_max']}; fds "
        f"{r['fds_baseline_max']} -> {r['fds_final_max']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", "--scenarios", type=parse_only, default=list(SCENARIOS), help="subset"
    )
    parser.add_argument("--seed", type=int, default=0, help="kill points and fuzz stream")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, journals)")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # as the child daemons (OMP_NUM_THREADS=1): identical float sums

    invocation = {
        "command": shlex.join(
            [sys.executable, *(sys.argv if argv is None else [sys.argv[0], *argv])]
        ),
        "cwd": os.getcwd(),
        "git_revision": git_revision(),
        "machine": machine(),
        "started_at": utc_now_iso(),
        "load_average_start": list(os.getloadavg()),
    }
    configs = long_configs(ns.seed)
    records: dict[str, dict[str, Any]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="factkeeper-reliability-"))
    model_dir = save_editable_tiny_model(workdir / "tiny-llama")
    broker_cfg = None
    if any(name not in OWN_BROKER for name in ns.only):
        port, controller_port = free_loopback_ports(2)
        broker_cfg = LocalBrokerConfig(
            port=port,
            controller_port=controller_port,
            data_dir=workdir / "kafka",
            startup_timeout_s=120.0,
        )
        start(broker_cfg)
    try:
        for name in ns.only:
            log.info("scenario %s: %s", name, configs[name])
            record: dict[str, Any] = {
                "started_at": utc_now_iso(),
                "load_average_start": list(os.getloadavg()),
            }
            began = time.monotonic()
            try:
                result, failures = run_scenario(
                    name,
                    configs[name],
                    broker_cfg.bootstrap if broker_cfg else None,
                    workdir / name,
                    model_dir,
                )
                record.update(passed=not failures, failures=failures, result=result)
            except Exception as exc:  # the bench's boundary: record it, run the others
                log.exception("scenario %s raised", name)
                record.update(passed=False, failures=[f"{type(exc).__name__}: {exc}"])
            record.update(
                seconds=round(time.monotonic() - began, 1),
                finished_at=utc_now_iso(),
                load_average_end=list(os.getloadavg()),
            )
            records[name] = record
    finally:
        if broker_cfg is not None:
            stop(broker_cfg)
    invocation.update(finished_at=utc_now_iso(), load_average_end=list(os.getloadavg()))
    write_results(ns.out, invocation, records)
    if ns.keep:
        log.info("work dir kept at %s", workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(records)
    print(ns.out)
    return 0 if all(r["passed"] for r in records.values()) else 1


def write_results(out: Path, invocation: dict[str, Any], records: dict[str, Any]) -> None:
    """Merge this run's scenarios into ``out``; each carries the invocation it came from."""
    previous: dict[str, Any] = {}
    if out.exists():
        try:
            previous = json.loads(out.read_text()).get("scenarios", {})
        except (json.JSONDecodeError, AttributeError):
            log.warning("%s is not a results file; overwriting it", out)
    scenarios = {**previous, **{n: {**r, "invocation": invocation} for n, r in records.items()}}
    payload = {"benchmark": "reliability", "latest": invocation, "scenarios": scenarios}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=json_default) + "\n")


def print_table(records: dict[str, dict[str, Any]]) -> None:
    print(f"{'scenario':<19}  {'verdict':<7}  {'seconds':>8}  figures")
    for name, r in records.items():
        verdict = "pass" if r["passed"] else "FAIL"
        figures = headline(name, r["result"]) if "result" in r else r["failures"][0]
        print(f"{name:<19}  {verdict:<7}  {r['seconds']:>8.1f}  {figures}")
        for failure in r["failures"]:
            print(f"{'':<19}  {'':<7}  {'':>8}  - {failure}")


if __name__ == "__main__":
    sys.exit(main())

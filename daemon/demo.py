"""The README's main job on the embedded defaults: corrections through Kafka into SmolLM2.

Starts the local broker, loads SmolLM2, asks a few CounterFact questions, streams real CounterFact
corrections through the daemon (validate, edit, post-check, journal, commit), asks again, and
prints throughput and the journal summary, lists the MLflow versions the daemon registered (each
audited and gated on the way), rolls back through the control topic to the oldest earlier
version that passed its audit, and writes the HTML/PNG report. Each run uses its own topic,
journal and MLflow store under ``FACTKEEPER_HOME/demo/<run>/`` so it can be repeated; each step
prints one line on stdout.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from daemon.config import Settings, load_settings
from daemon.control.commands import Rollback, encode_control
from daemon.devtools import kafka_broker
from daemon.kafka.clients import ensure_topics
from daemon.kafka.produce import events_from_requests, send
from daemon.operations import audit_reports_dir, version_rows, write_daemon_report
from daemon.report import load_audits
from daemon.service import Daemon
from editing.checks import Judge
from editing.datasets import load_dataset
from editing.generation import greedy_generate
from editing.models import load_model
from editing.paths import Paths

SHOWN = 4  # facts whose answers are printed before and after


def run_demo(
    port: int = 9092,
    prompt: str = "The capital of France is",
    keep_broker: bool = False,
    corrections: int = 50,
    method: str | None = None,
) -> int:
    """Broker, model, corrections through the daemon, answers before/after; 0 on success."""
    paths = Paths.from_env()
    # A new consumer group on a fresh broker logs transient coordinator warnings; the demo's
    # reader needs the step lines, not those.
    logging.getLogger("kafka").setLevel(logging.ERROR)
    cfg = kafka_broker.LocalBrokerConfig(port=port)
    was_running = kafka_broker.status(cfg).running
    started = time.perf_counter()
    broker = kafka_broker.start(cfg)
    print(f"[1/7] kafka ready at {broker.bootstrap} ({time.perf_counter() - started:.1f} s)")
    try:
        lm = load_model("smollm2", paths=paths)
        source = "safetensors cache" if lm.from_cache else "GGUF, now cached"
        print(f"[2/7] model {lm.name} loaded from {source} ({lm.load_seconds:.1f} s)")
        [answer] = greedy_generate(lm.model, lm.tokenizer, [prompt], max_new_tokens=8)
        print(f"      {prompt!r} -> {answer!r}")

        requests = load_dataset("counterfact", "eval", limit=corrections)
        shown = requests[:SHOWN]
        before = greedy_generate(lm.model, lm.tokenizer, [r.prompt for r in shown], 6)

        run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        topic = f"factkeeper-demo-{run_id}"
        run_dir = paths.home / "demo" / run_id
        env = {
            "FACTKEEPER_HOME": str(paths.home),
            "FACTKEEPER_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
            "FACTKEEPER_KAFKA__TOPICS__CORRECTIONS": topic,
            "FACTKEEPER_KAFKA__TOPICS__DLQ": f"{topic}.dlq",
            "FACTKEEPER_KAFKA__TOPICS__CONTROL": f"{topic}.control",
            "FACTKEEPER_KAFKA__TOPICS__QUARANTINE": f"{topic}.quarantine",
            "FACTKEEPER_KAFKA__GROUP_ID": topic,
            "FACTKEEPER_JOURNAL__PATH": str(run_dir / "journal.sqlite3"),
            "FACTKEEPER_SNAPSHOTS__TRACKING_URI": f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}",
            # A version, an audit and a gate decision after each third of the stream, so the
            # rollback has an earlier audited version to return to (batches of 8 overshoot a
            # half: with halves the second audit never came before the stream ended).
            "FACTKEEPER_SNAPSHOTS__EVERY_N_EDITS": str(max(1, corrections // 3)),
            "FACTKEEPER_AUDIT__EVERY_N_EDITS": str(max(1, corrections // 3)),
            "FACTKEEPER_METRICS__HOST": "127.0.0.1",
            # The demo's broker is local and its rollback is sent unsigned, on purpose.
            "FACTKEEPER_CONTROL__ALLOW_UNSIGNED": "true",
        }
        if method:
            env["FACTKEEPER_EDITOR__METHOD"] = method
        settings = load_settings(None, env=env)
        ensure_topics(settings.kafka)
        sent = send(settings.kafka, events_from_requests(requests, source="counterfact/eval"))
        print(f"[3/7] produced {sent} CounterFact corrections to {topic}")

        daemon = Daemon(settings, lm=lm, serve_metrics=False, paths=paths)
        try:
            started = time.perf_counter()
            stats = daemon.run(max_messages=sent, idle_timeout_s=20.0, handle_signals=False)
            seconds = time.perf_counter() - started
            counts = daemon.journal.counts_by_status()
            rate = stats.consumed / seconds if seconds else 0.0
            print(
                f"[4/7] daemon ({settings.editor.method}) consumed {stats.consumed} events in "
                f"{seconds:.1f} s ({rate:.2f} events/s, audits and snapshots included): "
                + ", ".join(f"{k} {v}" for k, v in counts.items() if v)
            )

            now = greedy_generate(lm.model, lm.tokenizer, [r.prompt for r in requests], 6)
            verdicts = Judge(lm).judge([(r.prompt, r.target_new) for r in requests])
            held = sum(v.ok for v in verdicts)
            print(
                f"[5/7] {held}/{len(requests)} corrections hold in the served model; each passed "
                f"its post-check when applied, then the audits judged them "
                f"(gate: {_gate(settings)}):"
            )
            for audit in load_audits(audit_reports_dir(settings)):
                print("      " + _audit_line(audit))
            _show_answers(shown, before, now[:SHOWN])
            [unrelated] = greedy_generate(lm.model, lm.tokenizer, [prompt], max_new_tokens=8)
            verdict = "unchanged" if unrelated == answer else "CHANGED"
            print(f"      unrelated: {prompt!r} -> {unrelated!r} ({verdict})")

            versions = daemon.versions.registry.versions()
            print(f"[6/7] {len(versions)} versions of {settings.snapshots.registered_model_name}:")
            for row in version_rows(versions):
                print("      " + _version_line(row))

            target = _rollback_target(versions)
            if target is None:
                print("[7/7] no earlier version that passed its audit to roll back to")
            else:
                rollback = Rollback(command="rollback", version=int(target))
                send(settings.kafka, [encode_control(rollback)], settings.kafka.topics.control)
                daemon.run(idle_timeout_s=5.0, handle_signals=False)
                [control] = daemon.journal.control_commands()[-1:]
                again = greedy_generate(lm.model, lm.tokenizer, [r.prompt for r in shown], 6)
                print(f"[7/7] rollback to v{target} through the control topic: {control.outcome}")
                _show_answers(shown, now[:SHOWN], again)
            report = write_daemon_report(
                settings, run_dir / "report.html", png=run_dir / "report.png"
            )
            print(f"      report: {report.html} (and {report.png})")
        finally:
            daemon.close()
    finally:
        if not (was_running or keep_broker):
            kafka_broker.stop(cfg)
    return 0


def _show_answers(shown: list, before: list[str], after: list[str]) -> None:
    print("      answers before -> after:")
    for request, old, new in zip(shown, before, after, strict=True):
        print(f"      {request.prompt!r}: {old.strip()!r} -> {new.strip()!r}")
        print(f"      (correction: {request.target_new!r})")


def _version_line(row: dict) -> str:
    if row.get("retention_exact_match") is None:
        audit = "not audited"
    else:
        verdict = "passed" if row.get("audit_passed") == "true" else "failed"
        audit = (
            f"audit {verdict}: retention {row['retention_exact_match']:.2f}, locality "
            f"{row['locality_agreement']:.2f}, perplexity drift {row['perplexity_drift']:+.2f}"
        )
    aliases = f" [{row['aliases']}]" if row["aliases"] else ""
    return f"v{row['version']}{aliases}: {row['edits']} edits ({row['reason']}); {audit}"


def _gate(settings: Settings) -> str:
    a = settings.audit.thresholds
    return (
        f"retention >= {a.retention_floor:g}, locality >= {a.locality_floor:g}, "
        f"perplexity drift <= {a.max_perplexity_drift:g}"
    )


def _audit_line(audit: dict) -> str:
    gate = "passed" if audit["gate"]["passed"] else "FAILED"
    retention = audit["retention"]["exact_match"]
    line = (
        f"audit of v{audit['version']} at {audit['edits_total']} edits: retention "
        f"{'-' if retention is None else f'{retention:.2f}'}, locality "
        f"{audit['locality']['agreement']:.2f}, perplexity drift "
        f"{audit['perplexity']['drift']:+.2f} -> {gate}, {audit['action']}"
    )
    if audit["quarantined_event_ids"]:
        line += f" ({len(audit['quarantined_event_ids'])} edits quarantined)"
    return line


def _rollback_target(versions: list) -> str | None:
    """The oldest earlier version that holds edits and passed its audit: returning to it
    visibly changes the served answers and serves a version the gate accepted.

    None when no such version exists other than the one in production (a version whose audit
    failed is never the demo's target; an operator may still pick one by hand).
    """
    passing = [
        v
        for v in versions
        if int(v.tags.get("edits", "0")) > 0
        and v.tags.get("audit_passed") == "true"
        and "production" not in v.aliases
    ]
    return passing[-1].version if passing else None

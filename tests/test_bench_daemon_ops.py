"""Smoke test of ``bench/daemon_ops.py`` on the tiny model and the session's real broker.

The benchmark's figures are only as good as its bookkeeping: every event it sends must be
consumed and journaled, the stage split must add up to the wall time, the bare editor must see
the same requests in the same batch size, and the JSON must carry the command, machine and
settings. A tiny llama with the daemon tests' FT-L settings keeps the run to seconds; SmolLM2
and EMSEdit are for the real run, which is a benchmark and stays out of the test suite.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest

from editing.requests import EditRequest
from tests.daemon.harness import FT_OPTIONS, TARGETS

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def daemon_ops(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The script as a module. bench/ is not a package, and the benchmark's spawned workers
    import the module by this name, so its folder goes on sys.path (spawn passes it on)."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    return importlib.import_module("daemon_ops")


def tiny_requests(n: int) -> list[EditRequest]:
    """Made-up facts the tiny model's tokenizer was trained to split (as in the daemon tests)."""
    return [
        EditRequest(
            request_id=f"fact:{i}",
            prompt=f"The capital of Zorblax{i} is",
            subject=f"Zorblax{i}",
            target_new=TARGETS[i % len(TARGETS)],
        )
        for i in range(n)
    ]


def test_command_line_becomes_a_checked_config(daemon_ops: ModuleType) -> None:
    config, level = daemon_ops.parse_args(
        ["--methods", "emsedit,ft", "--events", "40", "--latency-seconds", "20", "--threads", "1"]
    )
    assert config.methods == ("emsedit", "ft")
    assert (config.events, config.steady_events, config.threads) == (40, 20, 1)
    assert config.snapshots == ("default",) and config.audits == "off"
    assert config.out == Path("bench/results/daemon-ops.json") and level == "INFO"
    assert (config.restart_edits, config.restart_only) == (0, False)
    restart, _ = daemon_ops.parse_args(
        ["--methods", "ft", "--restart-edits", "100", "--restart-only"]
    )
    assert (restart.restart_edits, restart.restart_only) == (100, True)
    for bad in (
        ["--methods", "nope"],
        ["--snapshots", "sometimes"],
        ["--events", "0"],
        ["--restart-edits", "-1"],
        ["--restart-only"],
    ):
        with pytest.raises(SystemExit):
            daemon_ops.parse_args(bad)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_small_run_accounts_for_every_event(
    daemon_ops: ModuleType, kafka_broker: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = daemon_ops.OpsConfig(
        methods=("ft",),
        events=6,
        latency_seconds=1.5,
        rate_per_s=2.0,
        model=str(tiny_model_dir),
        editor_options={"ft": FT_OPTIONS},
        batch_max_size=2,
        linger_ms=50,
        bootstrap=kafka_broker,
        work_dir=tmp_path / "work",
        out=tmp_path / "daemon-ops.json",
    )
    out = daemon_ops.run_daemon_ops(
        config, requests=tiny_requests(9), command="pytest smoke", log_level="WARNING"
    )

    written = json.loads(config.out.read_text())
    assert written["command"] == "pytest smoke"
    assert written["machine"]["cores"] >= 1 and written["machine"]["ram_bytes"] > 0
    assert len(written["loadavg_start"]) == len(written["loadavg_end"]) == 3
    assert written["config"]["batch_max_size"] == 2 and written["config"]["linger_ms"] == 50
    assert "git_rev" in written and written["broker"]["started_by_bench"] is False

    run = written["methods"]["ft"]["daemon"]["default"]
    drain, steady, bare = run["drain"], run["steady"], written["methods"]["ft"]["bare"]
    assert run["settings"]["batching"] == {"max_size": 2, "linger_ms": 50}
    assert run["settings"]["audit"]["every_n_edits"] == 0  # audits off unless asked for

    # Every event is consumed and journaled once, in both phases.
    assert drain["consumed"] == 6 and drain["applied"] + drain["failed"] == 6
    assert steady["sent"] == steady["consumed"] == 3
    counts = run["journal_counts"]
    assert counts["applied"] + counts["failed"] == 9 and counts["invalid"] == 0

    # The stage split covers the wall time, batches respect max_size, snapshots were timed.
    assert sum(drain["seconds"].values()) == pytest.approx(drain["wall_seconds"], rel=1e-6)
    assert max(int(size) for size in drain["editor_calls_by_size"]) <= 2
    assert drain["seconds"]["edit"] > 0 and drain["seconds"]["journal"] > 0
    assert drain["seconds"]["snapshot"] > 0  # the default policy snapshots on shutdown
    assert drain["events_per_s"] == pytest.approx(6 / drain["wall_seconds"])

    # Latency: one figure per journaled steady event, each after its send.
    assert steady["latency_journaled_s"]["n"] == 3
    assert steady["latency_journaled_s"]["p50"] > 0
    assert steady["latency_applied_s"]["n"] == steady["applied"]

    # The bare editor saw the drain's requests in the daemon's batch size.
    assert (bare["edits"], bare["batch_size"], bare["calls"]) == (6, 2, 3)
    assert drain["ratio_events_per_s_daemon_vs_bare"] == pytest.approx(
        drain["events_per_s"] / bare["edits_per_s"]
    )
    assert run["rss"]["ru_maxrss_bytes"] >= run["rss"]["vmrss_peak_bytes_by_phase"]["drain"] > 0
    assert "| ft | default | 6 |" in daemon_ops.render_table(out)
    assert written["summary"]["ft"] == {
        "drain_applied_per_s": drain["applied_edits_per_s"],
        "drain_ratio_vs_bare": drain["ratio_applied_per_s_daemon_vs_bare"],
        "restart_to_ready_seconds": None,  # not asked for
        "peak_rss_bytes": max(run["rss"]["ru_maxrss_bytes"], bare["rss"]["ru_maxrss_bytes"]),
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_restart_scenario_kills_mid_stream_and_restarts_from_stored_deltas(
    daemon_ops: ModuleType, kafka_broker: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = daemon_ops.OpsConfig(
        methods=("ft",),
        model=str(tiny_model_dir),
        editor_options={"ft": FT_OPTIONS},
        batch_max_size=1,
        linger_ms=50,
        bootstrap=kafka_broker,
        work_dir=tmp_path / "work",
        out=tmp_path / "daemon-ops.json",
        restart_edits=3,
        restart_only=True,
    )
    out = daemon_ops.run_daemon_ops(
        config, requests=tiny_requests(9), command="pytest smoke", log_level="WARNING"
    )

    assert out["methods"] == {}
    r = json.loads(config.out.read_text())["restart"]["ft"]
    at_kill = r["journal_at_kill"]["applied"]
    assert 3 <= at_kill < r["events_sent"] == 9  # killed mid-stream
    assert r["stored_deltas_at_kill"]["files"] >= 1
    re_edit, stored = r["re_edit"], r["stored"]
    assert re_edit["replay"]["events"] == stored["replay"]["events"] == at_kill
    assert re_edit["replay"]["stored"] == 0  # journal.store_deltas: false re-edits
    assert stored["replay"]["stored"] == stored["replay"]["units"] > 0
    assert stored["seconds_to_first_batch"] > stored["seconds_to_ready"] > 0
    assert sum(stored["first_batch_results"].values()) >= 1  # the batch the one record came in
    assert "| ft | " in daemon_ops.render_restart_table(out)
    summary = json.loads(config.out.read_text())["summary"]["ft"]
    assert summary["restart_to_ready_seconds"] == stored["seconds_to_ready"]
    assert summary["drain_applied_per_s"] is None  # --restart-only: no drain measured
    assert summary["peak_rss_bytes"] == stored["ru_maxrss_bytes"] > 0

"""Shared pieces of the daemon tests: a tiny editable model, settings, topics, producing."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
import yaml
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from transformers import AutoModelForCausalLM

from daemon.config import load_settings
from daemon.service import Daemon
from editing.tiny import tiny_config, tiny_tokenizer
from tests.daemon.builders import event_dict
from tests.fixtures.threads import torch_threads

TARGETS = ["Paris", "Rome", "Madrid", "Berlin", "Tokyo", "Guitar"]


FT_OPTIONS = {"norm_constraint": 1.0, "lr": 0.05, "num_steps": 60, "stop_nll": 0.1, "layer": 3}


def save_editable_tiny_model(folder: Path) -> Path:
    """A tiny llama + tokenizer folder whose logits are sharp enough for FT-L edits to take."""
    config = tiny_config("llama")
    config.initializer_range = 0.1  # sharper logits than the default 0.02, so edits can take
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def config_file(tmp_path: Path, editor_options: Mapping[str, object] | None = None) -> Path:
    """The daemon's YAML: FT-L with ``editor_options`` (default ``FT_OPTIONS``), no retry ladder.

    Without rungs an edit that does not take alone fails, and every unit replays with the one
    configured editor, as these tests' ladder-less ``EditApplier`` replays expect; the ladder
    has its own tests (``tests/daemon/test_applier.py``).
    """
    options = dict(FT_OPTIONS if editor_options is None else editor_options)
    path = tmp_path / "factkeeper.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    editor = {"method": "ft", "options": options, "retry_ladder": []}
    path.write_text(yaml.safe_dump({"editor": editor}))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(tmp_path: Path, bootstrap: str, topic: str, model_dir: Path, **extra: str) -> dict:
    env = {
        "FACTKEEPER_HOME": str(tmp_path / "home"),
        "FACTKEEPER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "FACTKEEPER_KAFKA__TOPICS__CORRECTIONS": topic,
        "FACTKEEPER_KAFKA__TOPICS__DLQ": f"{topic}.dlq",
        "FACTKEEPER_KAFKA__TOPICS__CONTROL": f"{topic}.control",
        "FACTKEEPER_KAFKA__TOPICS__QUARANTINE": f"{topic}.quarantine",
        "FACTKEEPER_KAFKA__GROUP_ID": f"{topic}-group",
        "FACTKEEPER_MODEL__NAME": str(model_dir),
        "FACTKEEPER_BATCHING__MAX_SIZE": "1",
        "FACTKEEPER_BATCHING__LINGER_MS": "50",
        "FACTKEEPER_METRICS__HOST": "127.0.0.1",
        "FACTKEEPER_METRICS__PORT": str(free_port()),
        # Versioning off unless a test turns it on: the registry costs seconds per fresh home.
        "FACTKEEPER_SNAPSHOTS__EVERY_N_EDITS": "0",
        "FACTKEEPER_SNAPSHOTS__EVERY_MINUTES": "0",
        "FACTKEEPER_SNAPSHOTS__ON_SHUTDOWN": "false",
        # Audits off too (a test that needs them turns them on): the baseline costs seconds.
        "FACTKEEPER_AUDIT__EVERY_N_EDITS": "0",
        "FACTKEEPER_AUDIT__EVERY_MINUTES": "0",
        "FACTKEEPER_CONSOLIDATION__EVERY_N_EDITS": "0",
        "FACTKEEPER_CONSOLIDATION__EVERY_MINUTES": "0",
    }
    env.update(extra)
    return env


def fact(i: int) -> dict:
    subject = f"Zorblax{i}"
    return event_dict(
        f"fact:{i}",
        subject=subject,
        prompt=f"The capital of {subject} is",
        target_new=TARGETS[i % len(TARGETS)],
        target_old=None,
        rephrases=[],
        locality_probes=[],
    )


def produce(bootstrap: str, topic: str, payloads: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for payload in payloads:
        producer.send(topic, value=payload)
    producer.flush()
    producer.close()


def committed(bootstrap: str, group: str, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return consumer.committed(TopicPartition(topic, 0)) or 0
    finally:
        consumer.close(autocommit=False)


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    """The group's committed offset per partition of ``topic`` (None: nothing committed yet).

    Reads with OffsetFetch only, without joining the group, so it is safe while a daemon of
    that group runs or lies killed.
    """
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        partitions = sorted(consumer.partitions_for_topic(topic) or ())
        return {p: consumer.committed(TopicPartition(topic, p)) for p in partitions}
    finally:
        consumer.close(autocommit=False)


def dlq_records(bootstrap: str, topic: str, expected: int, timeout_s: float = 20.0) -> list:
    consumer = KafkaConsumer(
        f"{topic}.dlq",
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    records: list = []
    deadline = time.monotonic() + timeout_s
    while len(records) < expected and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    consumer.close()
    return records


def create_topics(bootstrap: str, topic: str) -> None:
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    names = [topic, f"{topic}.dlq", f"{topic}.control", f"{topic}.quarantine"]
    admin.create_topics([NewTopic(n, 1, 1) for n in names])
    admin.close()


def daemon_from_env(env: dict, serve_metrics: bool = False) -> Daemon:
    home = Path(env["FACTKEEPER_HOME"])
    return Daemon(load_settings(config_file(home), env=env), serve_metrics=serve_metrics)


def journal_path(env: Mapping[str, str]) -> Path:
    """Where a daemon run with ``env`` keeps its journal (the default under its home)."""
    return Path(env["FACTKEEPER_HOME"]) / "state" / "journal.sqlite3"


def daemon_command(config: Path, *args: str) -> list[str]:
    """``factkeeper run --config CONFIG ARGS`` as a child of this interpreter."""
    return [sys.executable, "-m", "daemon.cli", "run", "--config", str(config), *args]


def subprocess_env(env: Mapping[str, str]) -> dict[str, str]:
    """A child daemon's environment: ours plus ``env``, pinned to one torch thread.

    One thread keeps the child's float reductions identical to an in-process daemon's (whose
    test also runs with one thread), and keeps it from fighting other jobs for the 2 cores.
    """
    pinned = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return {**os.environ, **env, **pinned}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread in a module that imports this fixture: tiny models run faster so on a
    shared machine, and a re-edit must reproduce the journaled hash, which fixes the
    summation order."""
    with torch_threads(1):
        yield

"""The ``factkeeper`` command: a table from subcommand to library function.

Each command is a function taking parsed arguments and returning an exit code; the table below is
the whole CLI, and a test checks it against the README. Library code raises typed exceptions
(``FactkeeperError``); here they become a one-line message on stderr and exit code 2. Command
output goes to stdout, logs to stderr.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daemon.logs import configure_logging
from editing.datasets import DATASETS
from editing.errors import FactkeeperError

log = logging.getLogger("factkeeper")


class UsageError(FactkeeperError):
    """The command's arguments do not fit together."""


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ERROR = 2


@dataclass(frozen=True)
class Arg:
    """One argparse argument: ``flags`` and the keyword arguments of ``add_argument``."""

    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


@dataclass(frozen=True)
class Command:
    func: Callable[[argparse.Namespace], int]
    args: tuple[Arg, ...] = ()


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option, kept for scripts: stores into the new option's ``dest`` and
    says on stderr which option to use instead."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        new = "--" + self.dest.replace("_", "-")
        print(f"{parser.prog}: {option_string} is deprecated; use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


# --- commands --------------------------------------------------------------------------------


def cmd_version(ns: argparse.Namespace) -> int:
    """Print the versions that decide results: factkeeper, torch, transformers."""
    for dist in ("factkeeper", "torch", "transformers", "kafka-python", "mlflow"):
        try:
            print(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"{dist} (not installed)")
    return EXIT_OK


def cmd_ask(ns: argparse.Namespace) -> int:
    """Print the model's greedy continuation of PROMPT (only the answer, on stdout)."""
    from editing.generation import greedy_generate
    from editing.models import load_model

    lm = load_model(ns.model)
    [answer] = greedy_generate(lm.model, lm.tokenizer, [ns.prompt], ns.max_new_tokens)
    print(answer)
    return EXIT_OK


def cmd_kafka(ns: argparse.Namespace) -> int:
    """Start, stop or inspect the local single-node Kafka broker (KRaft, 127.0.0.1)."""
    from daemon.devtools import kafka_broker

    sasl = None
    if ns.sasl_ssl and ns.action != "stop":
        sasl = kafka_broker.local_sasl_ssl(user=ns.sasl_user)
    cfg = kafka_broker.LocalBrokerConfig(port=ns.port, sasl_ssl=sasl)
    if ns.action == "start":
        st = kafka_broker.start(cfg)
    elif ns.action == "stop":
        kafka_broker.stop(cfg)
        st = kafka_broker.status(cfg)
    else:
        st = kafka_broker.status(cfg)
    print(st)
    if sasl is not None and st.running:
        # The daemon's settings for the SASL_SSL listener; the password stays in its file.
        for key, value in kafka_broker.sasl_ssl_client_settings(cfg, ns.sasl_user).items():
            print(f"export FACTKEEPER_KAFKA__{key.upper()}={value}")
        password_file = kafka_broker.sasl_password_file(cfg.data_dir, ns.sasl_user)
        print(f'export FACTKEEPER_KAFKA__SASL_PASSWORD="$(cat {password_file})"')
    return EXIT_OK if (st.running or ns.action == "stop") else EXIT_FAILED


def cmd_demo(ns: argparse.Namespace) -> int:
    """The main job end to end: local Kafka, SmolLM2, corrections streamed and applied."""
    from daemon.demo import run_demo

    return run_demo(
        port=ns.port,
        prompt=ns.prompt,
        keep_broker=ns.keep_broker,
        corrections=ns.corrections,
        method=ns.editor,
    )


def cmd_train_editor(ns: argparse.Namespace) -> int:
    """Meta-train the EMSEdit hypernetwork for a model on a dataset's train split."""
    from editing.emsedit.train import train_from_dataset

    result = train_from_dataset(
        model=ns.model,
        dataset=ns.dataset,
        device=ns.device,
        batches=ns.turns,
        out=ns.out,
        state_dir=ns.state_dir,
        config_path=ns.config,
        seed=ns.seed,
        limit=ns.limit,
        threads=ns.threads,
        resume=not ns.no_resume,
        save_every=ns.save_every,
    )
    print(result.out)
    return EXIT_OK


def cmd_train_value_net(ns: argparse.Namespace) -> int:
    """Train NSE's value network (EMSEdit's multi-step value change) on train splits."""
    import torch
    from tqdm import tqdm

    from editing.bench import git_revision
    from editing.models import load_model
    from editing.nse.config import preset_for
    from editing.nse.value_net import FILE_NAME
    from editing.nse.value_training import (
        NET_FILE,
        ValueTraining,
        train_value_net,
        training_requests,
    )
    from editing.paths import Paths

    if ns.threads:
        torch.set_num_threads(ns.threads)
    lm = load_model(ns.model)
    requests = training_requests(ns.counterfact, ns.zsre)
    out = Path(ns.out) if ns.out else Paths.from_env().editors_dir / ns.model / "value-net-run"
    settings = ValueTraining(
        steps=ns.steps,
        batch=ns.batch,
        epochs=ns.epochs,
        lr=ns.lr,
        size_weight=ns.size_weight,
        seed=ns.seed,
    )
    bar = tqdm(desc="value net", unit="batch")

    def progress(done: int, total: int, loss: float) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.refresh()

    provenance = {
        "command": " ".join(["factkeeper", *ns.argv]),
        "git_rev": git_revision(),
        "data": f"counterfact/train[:{ns.counterfact}] + zsre/train[:{ns.zsre}]",
        "torch_threads": ns.threads,
    }
    train_value_net(
        lm,
        requests,
        preset_for(lm.name),
        out,
        settings,
        provenance=provenance,
        progress=progress,
        resume=not ns.no_resume,
    )
    bar.close()
    print(out / NET_FILE)
    print(f"copy it to {Paths.from_env().editors_dir / ns.model / FILE_NAME} to use it")
    return EXIT_OK


def _settings(ns: argparse.Namespace):
    from daemon.config import load_settings

    return load_settings(ns.config)


def cmd_run(ns: argparse.Namespace) -> int:
    """Run the daemon: replay the journal, then apply corrections from Kafka until SIGTERM."""
    from daemon.service import Daemon

    daemon = Daemon(
        _settings(ns),
        start_version=ns.version,
        accept_journal_mismatch=ns.accept_journal_mismatch,
    )
    try:
        stats = daemon.run(max_messages=ns.max_messages, idle_timeout_s=ns.idle_timeout)
    finally:
        daemon.close()
    print(json.dumps({"consumed": stats.consumed, **stats.results}))
    return EXIT_OK


def cmd_produce(ns: argparse.Namespace) -> int:
    """Send corrections: a JSONL file of events, or dataset records converted to events."""
    from daemon.kafka import produce

    settings = _settings(ns)
    if (ns.file is None) == (ns.dataset is None):
        raise UsageError("give either FILE or --dataset")
    if ns.file is not None:
        payloads = list(produce.read_jsonl(ns.file))
    else:
        from editing.datasets import load_dataset

        requests = load_dataset(ns.dataset, ns.split, limit=ns.limit)
        payloads = produce.events_from_requests(requests, source=f"{ns.dataset}/{ns.split}")
    sent = produce.send(settings.kafka, payloads)
    print(f"sent {sent} records to {settings.kafka.topics.corrections}")
    return EXIT_OK


def cmd_status(ns: argparse.Namespace) -> int:
    """Journal counts and last offsets; with --check, exit 0 only if the daemon is ready."""
    from daemon.status import daemon_status

    report = daemon_status(_settings(ns))
    print(json.dumps(report, indent=2, default=str))
    if ns.check:
        return EXIT_OK if report.get("ready") else EXIT_FAILED
    return EXIT_OK


def cmd_config(ns: argparse.Namespace) -> int:
    """``show``: the effective configuration (file + environment), secrets masked;
    ``default``: the shipped, commented default settings file (a start for ``--config``)."""
    if ns.action == "default":
        from daemon.config import default_config_text

        print(default_config_text(), end="")
        return EXIT_OK
    print(yaml.safe_dump(_settings(ns).redacted_dict(), sort_keys=False), end="")
    return EXIT_OK


def _control(ns: argparse.Namespace, command: Any) -> int:
    from daemon.operations import send_control

    result = send_control(_settings(ns), command, wait_s=ns.wait)
    if result.outcome is None:
        print(f"{result.command}: sent; no outcome journaled within {ns.wait:g} s")
        return EXIT_FAILED
    print(f"{result.command}: {result.outcome}")
    return EXIT_OK if result.outcome.startswith("done") else EXIT_FAILED


def cmd_snapshot(ns: argparse.Namespace) -> int:
    """Ask the running daemon to register its current weights as a new version."""
    from daemon.control.commands import TakeSnapshot

    return _control(ns, TakeSnapshot(command="snapshot"))


def cmd_audit(ns: argparse.Namespace) -> int:
    """Ask the running daemon to audit now and act on the gate."""
    from daemon.control.commands import RunAudit

    return _control(ns, RunAudit(command="audit"))


def cmd_consolidate(ns: argparse.Namespace) -> int:
    """Ask the running daemon to re-solve every live edit jointly from the base weights."""
    from daemon.control.commands import Consolidate

    return _control(ns, Consolidate(command="consolidate"))


def cmd_rollback(ns: argparse.Namespace) -> int:
    """Ask the running daemon to return to VERSION and point `production` at it."""
    from daemon.control.commands import Rollback

    return _control(ns, Rollback(command="rollback", version=ns.version, force=ns.force))


def cmd_revert(ns: argparse.Namespace) -> int:
    """Ask the running daemon to remove one edit (replaying the later ones without it)."""
    from daemon.control.commands import Revert

    return _control(ns, Revert(command="revert", event_id=ns.event_id))


def cmd_versions(ns: argparse.Namespace) -> int:
    """List the registered versions with aliases, lineage tags and audit figures."""
    from rich.console import Console
    from rich.table import Table

    from daemon.operations import registry_for, version_rows

    rows = version_rows(registry_for(_settings(ns)).versions())
    if ns.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no versions registered yet")
        return EXIT_OK
    table = Table(*rows[0].keys())
    for row in rows:
        table.add_row(
            *(
                "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
                for v in row.values()
            )
        )
    Console(width=160).print(table)
    return EXIT_OK


def cmd_export(ns: argparse.Namespace) -> int:
    """Write VERSION as a full Hugging Face folder (safetensors) for serving replicas."""
    from daemon.operations import export_version
    from editing.paths import Paths

    out = export_version(_settings(ns), str(ns.version), ns.dir, Paths.from_env())
    print(f"version {ns.version} exported to {out}")
    return EXIT_OK


def cmd_report(ns: argparse.Namespace) -> int:
    """Write a one-page HTML report (and optionally a PNG) of versions and audit history."""
    from daemon.operations import write_daemon_report

    files = write_daemon_report(_settings(ns), ns.output, png=ns.png)
    print(f"report written to {files.html}" + (f" and {files.png}" if files.png else ""))
    return EXIT_OK


def cmd_bench(ns: argparse.Namespace) -> int:
    """Sequential-editing benchmark: every method on the same stream; JSON + PNG + table."""
    from rich.console import Console

    from editing.bench import run_bench
    from editing.bench_report import render_table
    from editing.requests import LocalityProbe
    from monitoring.probes.load import bundled_probe_path, load_probe_set

    probe_file = ns.probe_set or bundled_probe_path()
    unrelated = [LocalityProbe(p.prompt, p.answer, "unrelated") for p in load_probe_set(probe_file)]
    result = run_bench(
        dataset=ns.dataset,
        methods=[m.strip() for m in ns.methods.split(",") if m.strip()],
        n_edits=ns.edits,
        batch_size=ns.batch,
        turn_size=ns.turn_size,
        model=ns.model,
        seed=ns.seed,
        out_dir=ns.out,
        threads=ns.threads,
        progress=sys.stderr.isatty(),
        command=" ".join(["factkeeper", *ns.argv]),
        split=ns.split,
        skip=ns.skip,
        unrelated=unrelated,
        unrelated_source=probe_file.name,
    )
    Console(width=200).print(render_table(result))
    print(result["plot"].removesuffix(".png") + ".json")
    return EXIT_OK


_MODEL = arg("--model", default="smollm2", help="'smollm2' or a local Hugging Face folder")
_CONFIG = arg("--config", type=Path, default=None, help="YAML settings file (see configs/)")
_PORT = arg("--port", type=int, default=9092, help="broker port on 127.0.0.1")
_WAIT = arg("--wait", type=float, default=120.0, help="seconds to wait for the daemon's outcome")

COMMANDS: dict[str, Command] = {
    "ask": Command(
        cmd_ask,
        (
            arg("prompt", help="text to continue"),
            _MODEL,
            arg("--max-new-tokens", type=int, default=12),
        ),
    ),
    "kafka": Command(
        cmd_kafka,
        (
            arg("action", choices=("start", "stop", "status")),
            _PORT,
            arg(
                "--sasl-ssl",
                action="store_true",
                help="also a TLS + SCRAM listener on port + 2; prints the daemon's settings",
            ),
            arg("--sasl-user", default="factkeeper", help="the SASL_SSL listener's user"),
        ),
    ),
    "demo": Command(
        cmd_demo,
        (
            _PORT,
            arg("--prompt", default="The capital of France is"),
            arg("--keep-broker", action="store_true", help="leave the broker running"),
            arg("--corrections", type=int, default=50, help="CounterFact corrections to stream"),
            arg("--editor", default=None, help="editing method (default: the configured one)"),
        ),
    ),
    "version": Command(cmd_version),
    "run": Command(
        cmd_run,
        (
            _CONFIG,
            arg("--max-messages", type=int, default=None, help="stop after this many records"),
            arg("--idle-timeout", type=float, default=None, help="stop after S idle seconds"),
            arg("--version", default=None, help="start from this registered version"),
            arg(
                "--accept-journal-mismatch",
                action="store_true",
                help="start although the journal does not match the topic or registry",
            ),
        ),
    ),
    "produce": Command(
        cmd_produce,
        (
            arg("file", nargs="?", type=Path, help="JSONL file, one event per line"),
            _CONFIG,
            arg("--dataset", choices=("zsre", "counterfact", "mquake"), default=None),
            arg("--split", choices=("train", "val", "eval"), default="eval"),
            arg("--limit", type=int, default=50),
        ),
    ),
    "status": Command(
        cmd_status, (_CONFIG, arg("--check", action="store_true", help="exit 1 unless ready"))
    ),
    "config": Command(cmd_config, (arg("action", choices=("show", "default")), _CONFIG)),
    "versions": Command(
        cmd_versions, (_CONFIG, arg("--json", action="store_true", help="JSON, not a table"))
    ),
    "snapshot": Command(cmd_snapshot, (_CONFIG, _WAIT)),
    "audit": Command(cmd_audit, (_CONFIG, _WAIT)),
    "consolidate": Command(cmd_consolidate, (_CONFIG, _WAIT)),
    "rollback": Command(
        cmd_rollback,
        (
            arg("version", type=int, help="registered version"),
            arg("--force", action="store_true", help="bring back reverted/quarantined edits"),
            _CONFIG,
            _WAIT,
        ),
    ),
    "revert": Command(cmd_revert, (arg("event_id", help="id of an applied event"), _CONFIG, _WAIT)),
    "export": Command(
        cmd_export,
        (
            arg("version", help="registered version"),
            arg("dir", type=Path, help="new folder for the Hugging Face model"),
            _CONFIG,
        ),
    ),
    "report": Command(
        cmd_report,
        (
            _CONFIG,
            arg("--output", type=Path, default=Path("factkeeper-report.html")),
            arg("--png", type=Path, default=None, help="also write the page as a PNG"),
        ),
    ),
    "train-editor": Command(
        cmd_train_editor,
        (
            _MODEL,
            arg("--dataset", default="counterfact", help="dataset whose train split is used"),
            arg("--device", default="cpu", help="cpu or cuda"),
            arg("--turns", type=int, default=500, help="training turns (batches of edits)"),
            arg(
                "--steps",
                dest="turns",
                type=int,
                action=DeprecatedAlias,
                help="deprecated spelling of --turns",
            ),
            arg("--out", default=None, help="checkpoint folder (default: editors dir/<model>)"),
            arg("--state-dir", default=None, help="resumable train state (default: --out)"),
            arg("--config", default=None, help="YAML of EMSEditConfig fields"),
            arg("--seed", type=int, default=None, help="overrides the config's seed"),
            arg("--limit", type=int, default=None, help="use the first N training cases"),
            arg("--threads", type=int, default=None, help="torch threads"),
            arg("--save-every", type=int, default=50, help="checkpoint every N turns"),
            arg("--no-resume", action="store_true", help="start over even if a state exists"),
        ),
    ),
    "train-value-net": Command(
        cmd_train_value_net,
        (
            _MODEL,
            arg("--counterfact", type=int, default=1200, help="CounterFact train requests"),
            arg("--zsre", type=int, default=400, help="ZsRE train requests"),
            arg("--steps", type=int, default=3, help="network steps per value"),
            arg("--batch", type=int, default=8, help="requests per training step"),
            arg("--epochs", type=int, default=1),
            arg("--lr", type=float, default=1e-3),
            arg("--size-weight", type=float, default=0.0, help="price of (|δ|/|h|)² in the loss"),
            arg("--seed", type=int, default=0),
            arg("--threads", type=int, default=None, help="torch threads"),
            arg("--out", default=None, help="run folder (default: editors/<model>/value-net-run)"),
            arg("--no-resume", action="store_true", help="start over even if a run exists"),
        ),
    ),
    "bench": Command(
        cmd_bench,
        (
            arg("--dataset", choices=DATASETS, required=True),
            arg(
                "--methods",
                default="none,ft",
                help="comma-separated method specs: NAME[+GUARD...][:KEY=VALUE...], e.g. "
                "emsedit, emsedit:steps=1, emsedit+safeguards, emsedit+mask",
            ),
            arg(
                "--split",
                choices=("eval", "val", "train"),
                default="eval",
                help="val: for tuning; train: where a dataset has no val split",
            ),
            arg("--skip", type=int, default=0, help="requests skipped at the split's start"),
            arg("--edits", type=int, default=1000, help="requests from the start of the stream"),
            arg("--batch", type=int, default=1, help="requests per editor call"),
            arg("--turn-size", type=int, default=100, help="edits between evaluations"),
            _MODEL,
            arg("--seed", type=int, default=0),
            arg("--out", type=Path, default=Path("bench/results"), help="results folder"),
            arg("--threads", type=int, default=1, help="torch threads (1: fastest on a busy box)"),
            arg(
                "--probe-set",
                type=Path,
                default=None,
                help="JSONL of unrelated probes for unrelated_kept (default: the bundled set)",
            ),
        ),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="factkeeper", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        summary = (command.func.__doc__ or "").strip().splitlines()[0]
        cmd_parser = sub.add_parser(name, help=summary, description=summary)
        for a in command.args:
            cmd_parser.add_argument(*a.flags, **a.options)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    ns.argv = list(argv) if argv is not None else sys.argv[1:]  # recorded as the command run
    configure_logging(ns.log_level)
    try:
        return COMMANDS[ns.command].func(ns)
    except FactkeeperError as exc:
        print(f"factkeeper {ns.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

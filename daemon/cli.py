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
    from daemon import kafka_broker

    cfg = kafka_broker.LocalBrokerConfig(port=ns.port)
    if ns.action == "start":
        st = kafka_broker.start(cfg)
    elif ns.action == "stop":
        kafka_broker.stop(cfg)
        st = kafka_broker.status(cfg)
    else:
        st = kafka_broker.status(cfg)
    print(st)
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
        batches=ns.steps,
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


def _settings(ns: argparse.Namespace):
    from daemon.config import load_settings

    return load_settings(ns.config)


def cmd_run(ns: argparse.Namespace) -> int:
    """Run the daemon: replay the journal, then apply corrections from Kafka until SIGTERM."""
    from daemon.service import Daemon

    daemon = Daemon(_settings(ns))
    try:
        stats = daemon.run(max_messages=ns.max_messages, idle_timeout_s=ns.idle_timeout)
    finally:
        daemon.close()
    print(json.dumps({"consumed": stats.consumed, **stats.results}))
    return EXIT_OK


def cmd_produce(ns: argparse.Namespace) -> int:
    """Send corrections: a JSONL file of events, or dataset records converted to events."""
    from daemon import produce

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
    """Print the effective configuration (file + environment) with secrets masked."""
    print(yaml.safe_dump(_settings(ns).redacted_dict(), sort_keys=False), end="")
    return EXIT_OK


def cmd_bench(ns: argparse.Namespace) -> int:
    """Sequential-editing benchmark: every method on the same stream; JSON + PNG + table."""
    from rich.console import Console

    from editing.bench import run_bench
    from editing.bench_report import render_table

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
        command="factkeeper " + " ".join(sys.argv[1:]),
    )
    Console(width=200).print(render_table(result))
    print(result["plot"].removesuffix(".png") + ".json")
    return EXIT_OK


_MODEL = arg("--model", default="smollm2", help="'smollm2' or a local Hugging Face folder")
_CONFIG = arg("--config", type=Path, default=None, help="YAML settings file (see configs/)")
_PORT = arg("--port", type=int, default=9092, help="broker port on 127.0.0.1")

COMMANDS: dict[str, Command] = {
    "ask": Command(
        cmd_ask,
        (
            arg("prompt", help="text to continue"),
            _MODEL,
            arg("--max-new-tokens", type=int, default=12),
        ),
    ),
    "kafka": Command(cmd_kafka, (arg("action", choices=("start", "stop", "status")), _PORT)),
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
    "config": Command(cmd_config, (arg("action", choices=("show",)), _CONFIG)),
    "train-editor": Command(
        cmd_train_editor,
        (
            _MODEL,
            arg("--dataset", default="counterfact", help="dataset whose train split is used"),
            arg("--device", default="cpu", help="cpu or cuda"),
            arg("--steps", type=int, default=500, help="training turns (batches of edits)"),
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
    "bench": Command(
        cmd_bench,
        (
            arg("--dataset", choices=("zsre", "counterfact", "mquake"), required=True),
            arg("--methods", default="none,ft", help="comma-separated editor names"),
            arg("--edits", type=int, default=1000, help="requests from the start of the stream"),
            arg("--batch", type=int, default=1, help="requests per editor call"),
            arg("--turn-size", type=int, default=100, help="edits between evaluations"),
            _MODEL,
            arg("--seed", type=int, default=0),
            arg("--out", type=Path, default=Path("bench/results"), help="results folder"),
            arg("--threads", type=int, default=1, help="torch threads (1: fastest on a busy box)"),
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

"""The ``factkeeper`` command: a table from subcommand to library function.

Each command is a function taking parsed arguments and returning an exit code; the table below is
the whole CLI, and a test checks it against the README. Library code raises typed exceptions
(``FactkeeperError``); here they become a one-line message on stderr and exit code 2. Command
output goes to stdout, logs to stderr.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from daemon.logs import configure_logging
from editing.errors import FactkeeperError

log = logging.getLogger("factkeeper")

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
    """The main job end to end on the embedded defaults: local Kafka, SmolLM2, an answer."""
    from daemon.demo import run_demo

    return run_demo(port=ns.port, prompt=ns.prompt, keep_broker=ns.keep_broker)


_MODEL = arg("--model", default="smollm2", help="'smollm2' or a local Hugging Face folder")
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
        ),
    ),
    "version": Command(cmd_version),
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

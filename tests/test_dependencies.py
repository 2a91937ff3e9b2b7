"""Imports point one way: ``bench -> daemon -> monitoring -> editing`` (issue 19).

A module may import from its own package and from the packages to its right only, and nothing
from ``tests``; ``editing`` also stays free of Kafka, MLflow and the daemon. Inside ``daemon``
the subpackages (``ingest``, ``records``, ``versions``, ``control``, ``kafka``, ``audits``) are
the parts that the top-level modules (the service, the CLI and its commands) put together: a
subpackage imports from the top level only the shared ``config``, ``errors`` and ``logs``, and
the development tools (``daemon.devtools``: the local Kafka broker) are imported only by the
``kafka`` and ``demo`` commands, never on the running daemon's path. Every module is parsed, not
imported, so an import inside a function or under ``TYPE_CHECKING`` counts too, as does
``importlib.import_module("...")`` with a literal name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Left to right: each package may import from those after it, never from those before it.
LAYERS = ("bench", "daemon", "monitoring", "editing")
#: Top-level modules no file in the layers may import.
NEVER = ("tests",)
#: What ``editing`` must not import, besides the layers to its left.
EDITING_FORBIDDEN = ("kafka", "mlflow", "confluent_kafka", "daemon")
#: The top-level ``daemon`` modules that its subpackages may import (the rest are the service,
#: the CLI and its commands, which put the subpackages together).
DAEMON_SHARED = ("config", "errors", "logs")
#: Development tools, off the running daemon's path, and the ``daemon`` modules that may use them.
DEVTOOLS = "daemon.devtools"
DEVTOOLS_USERS = ("daemon.cli", "daemon.demo")


def module_name(path: Path) -> tuple[str, str]:
    """``(module, package)`` dotted names of the file at ``path`` (under ``ROOT``)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), ".".join(parts[:-1])
    return ".".join(parts), ".".join(parts[:-1])


def imported_modules(tree: ast.AST, package: str) -> Iterator[tuple[int, str]]:
    """``(line, dotted name)`` of every import in a parsed module, at any depth.

    ``package`` is the dotted package the module is in, for relative imports. ``from A import B``
    gives both ``A`` and ``A.B``, since ``B`` may be a module.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{module}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def daemon_subpackages() -> set[str]:
    return {p.parent.name for p in (ROOT / "daemon").glob("*/__init__.py")}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def daemon_violation(module: str, package: str, name: str) -> str | None:
    """Why ``module`` (in ``package``, under ``daemon``) may not import ``name``, or None."""
    if _within(name, DEVTOOLS) and not _within(module, DEVTOOLS) and module not in DEVTOOLS_USERS:
        return f"only {', '.join(DEVTOOLS_USERS)} may import {DEVTOOLS}"
    target = name.split(".")
    if (
        package != "daemon"  # a module of a subpackage
        and len(target) > 1
        and target[0] == "daemon"
        and target[1] not in daemon_subpackages()
        and target[1] not in DAEMON_SHARED
    ):
        shared = ", ".join(f"daemon.{m}" for m in DAEMON_SHARED)
        return f"a daemon subpackage imports from the top level only {shared}"
    return None


def violations(package: str, path: Path, source: str) -> list[str]:
    """Imports of ``path`` (a module of ``package``) that break the rules, as readable lines."""
    allowed_layers = set(LAYERS[LAYERS.index(package) :])
    module, in_package = module_name(path)
    found: dict[tuple[int, str], str] = {}  # one line per import statement and rule
    for line, name in imported_modules(ast.parse(source, filename=str(path)), in_package):
        top = name.split(".")[0]
        if top in NEVER:
            why = f"nothing under {package}/ may import {top}"
        elif top in LAYERS and top not in allowed_layers:
            why = f"{package} may import only {', '.join(sorted(allowed_layers))}"
        elif package == "editing" and top in EDITING_FORBIDDEN:
            why = f"editing imports no {top}"
        elif package == "daemon":
            why = daemon_violation(module, in_package, name) or ""
        else:
            why = ""
        if why and (line, why) not in found:
            found[line, why] = f"{path.relative_to(ROOT)}:{line} imports {name} ({why})"
    return list(found.values())


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", LAYERS)
def test_imports_point_one_way(package: str) -> None:
    files = modules(package)
    assert files, f"no modules under {package}/"
    found = [v for path in files for v in violations(package, path, path.read_text())]
    assert not found, "imports against bench -> daemon -> monitoring -> editing:\n" + "\n".join(
        found
    )


@pytest.mark.parametrize(
    ("package", "source"),
    [
        ("editing", "import daemon.config"),
        ("editing", "def f():\n    from kafka import KafkaProducer\n"),
        ("editing", "import mlflow"),
        ("editing", "from confluent_kafka import Producer"),
        ("editing", "from monitoring.gates import GateThresholds"),
        ("monitoring", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import daemon\n"),
        ("monitoring", "import importlib\nimportlib.import_module('daemon.records.journal')\n"),
        ("daemon", "def f():\n    import bench.ops\n"),
        ("bench", "from tests.daemon.harness import fact"),
    ],
)
def test_a_wrong_import_is_caught(package: str, source: str) -> None:
    path = ROOT / package / "example.py"
    assert violations(package, path, source)


@pytest.mark.parametrize(
    ("package", "source"),
    [
        ("bench", "import daemon.service\nfrom editing.paths import Paths\nimport torch"),
        ("daemon", "from monitoring.metrics import FactkeeperMetrics\nfrom . import errors"),
        ("monitoring", "from editing.checks import Judge\nimport prometheus_client"),
        ("editing", "from editing.models import load_model\nimport transformers"),
    ],
)
def test_imports_down_the_layers_are_allowed(package: str, source: str) -> None:
    assert violations(package, ROOT / package / "example.py", source) == []


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("daemon/ingest/example.py", "from daemon.service import Daemon"),
        ("daemon/records/example.py", "def f():\n    from daemon import operations\n"),
        ("daemon/versions/example.py", "from .. import cli"),
        ("daemon/audits/example.py", "import daemon.report"),
        ("daemon/control/__init__.py", "from daemon.status import daemon_status"),
        ("daemon/service.py", "from daemon.devtools import kafka_broker"),
        ("daemon/ingest/consumer.py", "def f():\n    import daemon.devtools.kafka_broker\n"),
        ("daemon/operations.py", "from daemon import devtools"),
    ],
)
def test_a_wrong_import_inside_the_daemon_is_caught(module: str, source: str) -> None:
    assert violations("daemon", ROOT / module, source)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        (
            "daemon/ingest/example.py",
            "from daemon.config import Settings\nfrom daemon.records.journal import Journal\n"
            "from ..errors import DaemonError\nfrom . import events\nimport daemon.logs",
        ),
        (
            "daemon/service.py",
            "from daemon.ingest.consumer import FactConsumer\nimport daemon.report",
        ),
        ("daemon/cli.py", "def f():\n    from daemon.devtools import kafka_broker\n"),
        ("daemon/demo.py", "from daemon.devtools import kafka_broker"),
        ("daemon/devtools/example.py", "from daemon.kafka.clients import check_connection"),
    ],
)
def test_imports_the_daemon_allows(module: str, source: str) -> None:
    assert violations("daemon", ROOT / module, source) == []

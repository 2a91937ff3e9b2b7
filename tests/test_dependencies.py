"""Imports point one way: ``bench -> daemon -> monitoring -> editing`` (issue 19).

A module may import from its own package and from the packages to its right only, and nothing
from ``tests``; ``editing`` also stays free of Kafka, MLflow and the daemon. Every module is
parsed, not imported, so an import inside a function or under ``TYPE_CHECKING`` counts too, as
does ``importlib.import_module("...")`` with a literal name.
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


def imported_modules(tree: ast.AST, package: str) -> Iterator[tuple[int, str]]:
    """``(line, dotted name)`` of every import in a parsed module, at any depth."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            # A relative import stays inside the module's own package.
            yield node.lineno, package if node.level else (node.module or "")
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


def violations(package: str, path: Path, source: str) -> list[str]:
    """Imports of ``path`` (a module of ``package``) that break the rules, as readable lines."""
    allowed_layers = set(LAYERS[LAYERS.index(package) :])
    found = []
    for line, name in imported_modules(ast.parse(source, filename=str(path)), package):
        top = name.split(".")[0]
        where = f"{path.relative_to(ROOT)}:{line} imports {name}"
        if top in NEVER:
            found.append(f"{where} (nothing under {package}/ may import {top})")
        elif top in LAYERS and top not in allowed_layers:
            found.append(f"{where} ({package} may import only {', '.join(sorted(allowed_layers))})")
        elif package == "editing" and top in EDITING_FORBIDDEN:
            found.append(f"{where} (editing imports no {top})")
    return found


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

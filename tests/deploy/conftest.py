"""Fixtures for the deploy tests: helm, helmfile and kubeconform, built once per session.

None of the three is packaged for Debian and only the Go module proxy is reachable, so
``deploy/tools/install-tools.sh`` compiles them at pinned versions into
``$FACTKEEPER_HOME/tools/bin`` (``make test`` runs it first; minutes on a new machine, well under
a second once built). The tests that need them skip only when Go
itself is missing. Helm and Helmfile run with their config, cache and data folders in a
temporary directory, and kubeconform reads only the schemas vendored under ``deploy/schemas``,
so nothing here touches the network or the user's home.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "chart" / "factkeeper"
KAFKA_CHART = ROOT / "deploy" / "charts" / "kafka-cluster"
HELMFILE = ROOT / "Helmfile.yaml"
SCHEMAS = ROOT / "deploy" / "schemas"
INSTALL_TOOLS = ROOT / "deploy" / "tools" / "install-tools.sh"
ENVIRONMENTS = ("dev", "prod")
NAMESPACE = "factkeeper"

GO_FALLBACK = Path("/usr/local/go/bin/go")
#: The first build of helm + helmfile on a 2-core machine takes about ten minutes.
BUILD_TIMEOUT_S = 3600
#: For the test modules that use the tools: the session build happens inside the first test.
TOOLS_TEST_TIMEOUT_S = BUILD_TIMEOUT_S + 300
COMMAND_TIMEOUT_S = 300

#: kubeconform looks a kind up in these folders, in order: built-in kinds under the names of
#: yannh/kubernetes-json-schema (deployment-apps-v1.json), CRDs as in the datreeio
#: CRDs-catalog (kafka.strimzi.io/kafka_v1.json). No `default` location: nothing is downloaded.
SCHEMA_LOCATIONS = (
    str(SCHEMAS / "kubernetes" / "{{ .ResourceKind }}{{ .KindSuffix }}.json"),
    str(SCHEMAS / "crds" / "{{ .Group }}" / "{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json"),
)


def chart_values(env: str) -> Path:
    """The factkeeper chart's values file for one environment."""
    return ROOT / "deploy" / "chart" / f"values-{env}.yaml"


def kafka_values(env: str) -> Path:
    """The kafka-cluster chart's values for one environment (what Helmfile passes)."""
    return ROOT / "deploy" / "helmfile" / "values" / env / "kafka-cluster.yaml"


def find_go() -> str | None:
    """The Go toolchain on PATH, else the usual /usr/local/go install, else None."""
    found = shutil.which("go")
    if found:
        return found
    if GO_FALLBACK.is_file() and os.access(GO_FALLBACK, os.X_OK):
        return str(GO_FALLBACK)
    return None


def parse_manifests(text: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a rendered manifest stream."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(docs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc.get("kind") == kind]


def only(docs: Iterable[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = find(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@dataclass(frozen=True)
class Tools:
    """The built binaries and the environment they run in."""

    bin_dir: Path
    env: dict[str, str]

    @property
    def helm(self) -> str:
        return str(self.bin_dir / "helm")

    def run(
        self, tool: str, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run one of the tools from the repo root; with ``check``, fail the test on rc != 0."""
        proc = subprocess.run(
            [str(self.bin_dir / tool), *args],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=self.env,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
        if check and proc.returncode != 0:
            pytest.fail(
                f"{tool} {' '.join(args)} exited {proc.returncode}\n"
                f"stderr:\n{proc.stderr[-4000:]}\nstdout:\n{proc.stdout[-2000:]}"
            )
        return proc

    def template(
        self,
        chart: Path = CHART,
        values: Sequence[Path] = (),
        sets: Sequence[str] = (),
        release: str = "factkeeper",
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """``helm template`` of a chart in the factkeeper namespace."""
        args = ["template", release, str(chart), "--namespace", NAMESPACE]
        for path in values:
            args += ["--values", str(path)]
        for assignment in sets:
            args += ["--set", assignment]
        return self.run("helm", *args, check=check)

    def render(self, chart: Path = CHART, values: Sequence[Path] = (), sets: Sequence[str] = ()):
        """The parsed documents of ``helm template``."""
        return parse_manifests(self.template(chart, values, sets).stdout)

    def kubeconform(self, manifests: str) -> dict[str, Any]:
        """Validate a manifest stream offline; returns kubeconform's JSON report."""
        args = ["-strict", "-summary", "-verbose", "-output", "json"]
        for location in SCHEMA_LOCATIONS:
            args += ["-schema-location", location]
        proc = self.run("kubeconform", *args, "-", stdin=manifests, check=False)
        try:
            return json.loads(proc.stdout)
        except json.JSONDecodeError:
            pytest.fail(f"kubeconform gave no JSON report (rc {proc.returncode}):\n{proc.stderr}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that use the ``tools`` fixture, so that ``make test-fast`` leaves them out."""
    here = Path(__file__).parent
    for item in items:
        if "tools" in getattr(item, "fixturenames", ()) and here in item.path.parents:
            item.add_marker(pytest.mark.tools)


@pytest.fixture(scope="session")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Tools:
    """helm, helmfile and kubeconform, built by deploy/tools/install-tools.sh if missing."""
    go = find_go()
    if go is None:
        pytest.skip(
            "Go is not installed, so helm, helmfile and kubeconform cannot be built: install "
            "Go >= 1.26 (on PATH or in /usr/local/go) to run the chart and Helmfile validation"
        )
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(INSTALL_TOOLS)],
        env={**os.environ, "GO": go},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"{INSTALL_TOOLS.relative_to(ROOT)} failed:\n{proc.stderr[-4000:]}")
    log.info("deploy tools ready in %.1fs", time.monotonic() - started)
    bin_dir = Path(proc.stdout.strip().splitlines()[-1])
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_DATA_HOME": str(home / "data"),
        "HELMFILE_CACHE_HOME": str(home / "helmfile-cache"),
        "HOME": str(home),
    }
    return Tools(bin_dir=bin_dir, env=env)

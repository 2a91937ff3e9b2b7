"""A kind-free end-to-end check: the chart, rendered with the image the build produces, runs
what the daemon actually is.

No cluster: the chart is rendered with ``helm template`` (and validated with kubeconform), then
every piece of the pod is checked against the daemon itself: the container command parses with
the real CLI, the mounted config file loads with the pod's environment, the probes hit paths the
metrics server answers, the ports are the configured metrics port, the journal lands on the
state volume, and the image reference is the one ``deploy/image/build.sh`` tags.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from daemon import cli
from daemon.config import load_settings
from monitoring.http import Readiness, make_app
from tests.deploy.conftest import (
    CHART,
    ENVIRONMENTS,
    ROOT,
    TOOLS_TEST_TIMEOUT_S,
    Tools,
    chart_values,
    only,
)
from tests.deploy.test_chart import assert_all_valid, daemon_claim, daemon_container

pytestmark = pytest.mark.timeout(TOOLS_TEST_TIMEOUT_S)

BUILD_SCRIPT = ROOT / "deploy" / "image" / "build.sh"
CONTAINERFILE = ROOT / "Containerfile"


def built_image() -> tuple[str, list[str]]:
    """The repository and tags build.sh gives the image (read from the script and its inputs)."""
    script = BUILD_SCRIPT.read_text()
    (repository,) = re.findall(r"^IMAGE=(\S+)$", script, re.MULTILINE)
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version is not None
    assert '-t "$IMAGE:$tag" -t "$IMAGE:dev"' in script
    return repository, [version.group(1), "dev"]


def _status(path: str) -> str:
    """What the daemon's metrics server answers on ``path`` (ready: every condition holds)."""
    readiness = Readiness("model")
    readiness.set("model", True)
    app = make_app(CollectorRegistry(), readiness)
    seen: list[str] = []
    app({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, lambda status, headers: seen.append(status))
    return seen[0]


def _volume_for(path: str, container: dict[str, Any], pod: dict[str, Any]) -> dict[str, Any]:
    """The pod volume whose mount holds ``path`` (the deepest mount that contains it)."""
    mounts = [m for m in container["volumeMounts"] if Path(path).is_relative_to(m["mountPath"])]
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    return {v["name"]: v for v in pod["volumes"]}[mount["name"]] | {"mount": mount}


def test_chart_image_is_what_the_build_script_tags(tools: Tools) -> None:
    repository, tags = built_image()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["repository"] == repository
    assert chart["appVersion"] == tags[0]  # the default tag
    for env, tag in ((None, tags[0]), ("dev", "dev"), ("prod", tags[0])):
        docs = tools.render(values=[chart_values(env)] if env else [])
        assert daemon_container(docs)["image"] == f"{repository}:{tag}"
    # The Containerfile's default command is the chart's, and the user is the chart's.
    containerfile = CONTAINERFILE.read_text()
    assert "USER 10001:10001" in containerfile
    assert not re.search(r"^HEALTHCHECK", containerfile, re.MULTILINE)
    pod_context = values["podSecurityContext"]
    assert (pod_context["runAsUser"], pod_context["runAsGroup"]) == (10001, 10001)


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_rendered_pod_matches_the_daemon(tools: Tools, env: str, tmp_path: Path) -> None:
    repository, tags = built_image()
    image = f"{repository}:{tags[0]}"
    manifests = tools.template(
        values=[chart_values(env)], sets=[f"image.tag={tags[0]}"]
    ).stdout  # the image the build produced, whatever the environment's tag
    report = tools.kubeconform(manifests)
    assert_all_valid(report, {r["kind"] for r in report["resources"]})
    docs = [d for d in yaml.safe_load_all(manifests) if d]
    deployment = only(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = daemon_container(docs)
    assert container["image"] == image

    # The command is a valid invocation of the real CLI, naming the mounted config file.
    command = container["command"]
    assert command[0] == "factkeeper"
    parsed = cli.build_parser().parse_args(command[1:])
    assert parsed.command == "run"
    config_path = str(parsed.config)
    config_volume = _volume_for(config_path, container, pod)
    assert config_volume["mount"]["readOnly"] is True
    config_map = only(docs, "ConfigMap")
    assert config_volume["configMap"]["name"] == config_map["metadata"]["name"]
    file_name = Path(config_path).relative_to(config_volume["mount"]["mountPath"])
    config_file = tmp_path / "config.yaml"
    config_file.write_text(config_map["data"][str(file_name)])

    # The config loads in the daemon with the pod's environment (secrets as the Secret would).
    pod_env = {}
    for var in container["env"]:
        # distinct stand-ins: the admin token and the control key must differ
        pod_env[var["name"]] = var.get("value", (var["name"].lower() + "-secret").rjust(32, "s"))
    home = pod_env["FACTKEEPER_HOME"]
    settings = load_settings(config_file, env=pod_env)

    # Ports and probes: the metrics port the daemon listens on, paths its server answers.
    (port,) = container["ports"]
    assert port["containerPort"] == settings.metrics.port
    assert settings.metrics.host == "0.0.0.0"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        http = container[probe]["httpGet"]
        assert http["port"] == port["name"]
        assert _status(http["path"]).startswith("200"), http["path"]
    assert _status("/nowhere").startswith("404")  # so the check above can fail
    service = only(docs, "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port["name"]]
    admin = settings.admin
    if admin.enabled:  # loopback only: not a container port, not reachable through a Service
        assert admin.host in ("127.0.0.1", "::1")
        assert admin.port not in {p["containerPort"] for p in container["ports"]}

    # The journal (and the rest of the state) is on the persistent state volume, writable.
    journal_volume = _volume_for(str(settings.journal.path), container, pod)
    assert str(settings.journal.path).startswith(home + "/")
    assert not journal_volume["mount"].get("readOnly", False)
    claim = journal_volume["persistentVolumeClaim"]["claimName"]
    assert claim == daemon_claim(docs)["metadata"]["name"]
    assert daemon_claim(docs)["spec"]["accessModes"] == ["ReadWriteOncePod"]
    # The root filesystem is read-only: every path the daemon writes is on a volume.
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    for writable in (pod_env["HOME"], pod_env["HF_HOME"], home):
        assert not _volume_for(writable, container, pod)["mount"].get("readOnly", False)

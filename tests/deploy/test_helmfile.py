"""Helmfile.yaml: the whole stack's wiring, checked offline.

Remote charts (Strimzi, CloudNativePG, MLflow, kube-prometheus-stack) cannot be downloaded
here, so the rendering tests select the charts in this repository (label ``origin=local``) and
pass ``--skip-deps`` (no ``helm repo add``, no dependency build). ``helmfile write-values``
still resolves every release, remote ones included: environment, release templates and
values files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import (
    ENVIRONMENTS,
    HELMFILE,
    ROOT,
    TOOLS_TEST_TIMEOUT_S,
    Tools,
    find,
    only,
    parse_manifests,
)

LOCAL = ("-l", "origin=local")
TOPICS = {
    "fact-corrections",
    "fact-corrections.dlq",
    "factkeeper.control",
    "fact-corrections.quarantine",
}


def helmfile_documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(HELMFILE.read_text()) if doc]


def releases() -> dict[str, dict[str, Any]]:
    return {r["name"]: r for doc in helmfile_documents() for r in doc.get("releases", [])}


# --- structure (plain YAML, no tools) -------------------------------------------------------


def test_environments_and_releases_are_separate_documents() -> None:
    """Helmfile v1 requires `environments` and `releases` in different YAML documents."""
    docs = helmfile_documents()
    with_envs = [i for i, doc in enumerate(docs) if "environments" in doc]
    with_releases = [i for i, doc in enumerate(docs) if "releases" in doc]
    assert len(with_envs) == len(with_releases) == 1
    assert with_envs[0] < with_releases[0]
    (envs,) = (doc["environments"] for doc in docs if "environments" in doc)
    assert set(envs) == set(ENVIRONMENTS)
    for env in envs.values():
        for values_file in env["values"]:
            assert (ROOT / values_file).is_file(), values_file


def test_needs_name_existing_releases_and_order_the_stack() -> None:
    by_name = releases()
    keys = {f"{r['namespace']}/{name}": name for name, r in by_name.items()}
    for release in by_name.values():
        for need in release.get("needs", []):
            assert need in keys, f"{release['name']} needs unknown release {need}"
    assert set(by_name["factkeeper"]["needs"]) == {
        "factkeeper/kafka",
        "mlflow/mlflow",
        "monitoring/kube-prometheus-stack",
    }
    assert by_name["kafka"]["needs"] == ["strimzi/strimzi"]
    assert by_name["mlflow"]["needs"] == ["mlflow/mlflow-db"]
    assert by_name["mlflow-db"]["needs"] == ["cnpg-system/cnpg"]


def test_remote_charts_are_pinned_and_local_charts_exist() -> None:
    (repos,) = (doc["repositories"] for doc in helmfile_documents() if "repositories" in doc)
    repositories = {r["name"]: r for r in repos}
    assert repositories["strimzi"] == {
        "name": "strimzi",
        "url": "quay.io/strimzi-helm",
        "oci": True,
    }
    for release in releases().values():
        origin = release["labels"]["origin"]
        if origin == "local":
            assert (ROOT / release["chart"] / "Chart.yaml").is_file(), release["chart"]
            assert "version" not in release
        else:
            assert origin == "remote"
            assert release["chart"].split("/")[0] in repositories, release["chart"]
            assert release["version"][0].isdigit(), release["name"]
    assert {r["chart"] for r in releases().values() if r["labels"]["origin"] == "local"} == {
        "./deploy/chart/factkeeper",
        "./deploy/charts/kafka-cluster",
    }


def _scalars(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in (str(key), *_scalars(value))]
    if isinstance(node, list):
        return [s for item in node for s in _scalars(item)]
    return [str(node)]


def test_no_bitnami_charts_or_images() -> None:
    """Bitnami's images moved to bitnamilegacy (no updates): no repository, chart or image."""
    files = [HELMFILE, *sorted((ROOT / "deploy" / "helmfile").rglob("*.yaml"))]
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            assert not [s for s in _scalars(doc) if "bitnami" in s.lower()], path


# --- rendering (tools) ----------------------------------------------------------------------


def helmfile(tools: Tools, env: str, *args: str) -> str:
    return tools.run("helmfile", "--file", str(HELMFILE), "--environment", env, *args).stdout


@pytest.mark.timeout(TOOLS_TEST_TIMEOUT_S)
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_every_release_resolves(tools: Tools, env: str, tmp_path: Path) -> None:
    """All seven releases, remote ones included, get their environment's values."""
    out = tmp_path / "values"
    template = f"{out}/{{{{ .Release.Name }}}}.yaml"
    helmfile(tools, env, "write-values", "--skip-deps", "--output-file-template", template)
    written = {path.stem: yaml.safe_load(path.read_text()) for path in out.glob("*.yaml")}
    assert set(written) == set(releases())
    assert written["strimzi"]["watchNamespaces"] == ["factkeeper"]
    mlflow = written["mlflow"]
    assert mlflow["backendStore"]["postgres"]["enabled"] is True
    assert mlflow["backendStore"]["postgres"]["host"] == "mlflow-db-rw"
    assert mlflow["backendStore"]["existingDatabaseSecret"]["name"] == "mlflow-db-app"
    assert written["mlflow-db"]["fullnameOverride"] == "mlflow-db"
    factkeeper = written["factkeeper"]
    assert factkeeper["monitoring"]["serviceMonitor"]["enabled"] is True
    assert factkeeper["monitoring"]["prometheusRelease"] == "kube-prometheus-stack"
    assert factkeeper["config"]["snapshots"]["tracking_uri"] == "http://mlflow.mlflow.svc:80"


@pytest.mark.timeout(TOOLS_TEST_TIMEOUT_S)
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_local_releases_render_and_pass_kubeconform(tools: Tools, env: str) -> None:
    manifests = helmfile(tools, env, *LOCAL, "template", "--skip-deps")
    docs = parse_manifests(manifests)
    report = tools.kubeconform(manifests)
    assert report["summary"]["valid"] == len(docs) > 0, report
    assert {t["spec"]["topicName"] for t in find(docs, "KafkaTopic")} == TOPICS
    kafka = only(docs, "Kafka")
    (listener,) = kafka["spec"]["kafka"]["listeners"]
    cluster = kafka["metadata"]["name"]
    bootstrap = f"{cluster}-kafka-bootstrap.factkeeper.svc:{listener['port']}"
    config = yaml.safe_load(only(docs, "ConfigMap")["data"]["config.yaml"])
    assert config["kafka"]["bootstrap_servers"] == [bootstrap]
    # Prod speaks TLS to the listener and checks it against the CA Secret Strimzi writes.
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    protocol = config["kafka"]["security_protocol"]
    assert protocol == ("SASL_SSL" if env == "prod" else "SASL_PLAINTEXT")
    assert listener["tls"] is (protocol == "SASL_SSL")
    ca_volumes = [v for v in pod["volumes"] if v["name"] == "kafka-ca"]
    if env == "prod":
        (ca,) = ca_volumes
        assert ca["secret"]["secretName"] == f"{cluster}-cluster-ca-cert"
    else:
        assert not ca_volumes
    assert set(config["kafka"]["topics"].values()) == TOPICS
    # The daemon logs in as the KafkaUser, with the password from the Secret Strimzi writes.
    (user,) = (u["metadata"]["name"] for u in find(docs, "KafkaUser"))
    (container,) = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    env_vars = {e["name"]: e for e in container["env"]}
    sasl = env_vars["FACTKEEPER_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert sasl == {"name": user, "key": "password"}
    assert config["kafka"]["sasl_username"] == user
    # The stack runs kube-prometheus-stack in both environments: scrape and alert there.
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert only(docs, kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack"
